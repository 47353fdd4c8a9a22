//! The `raw` format driver: pass-through and offset/size windows.

use blockgraph::drivers::{FileDriver, FileOptions, MemoryDriver, RawDriver};
use blockgraph::{driver::BlockStatus, ChildRole, Error, MainLoop};

mod common;
use common::{add_alone, Rig, Stack};

/// backend -> raw `raw0` -> memory `disk`.
fn stack(raw: RawDriver, disk: MemoryDriver) -> Rig {
    Stack::new()
        .node("disk", disk)
        .above(ChildRole::File, "raw0", raw)
        .build()
}

fn disk_contents(s: &Rig) -> Vec<u8> {
    s.driver("disk", MemoryDriver::contents)
}

/// A request on the raw node itself (no backend checks).
fn node_read(s: &Rig, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
    s.on_node("raw0", move |n| {
        Box::pin(async move {
            let mut buf = vec![0u8; len];
            n.read(offset, &mut buf).await.map(|_| buf)
        })
    })
}

#[test]
fn without_a_window_raw_passes_everything_through() {
    let s = stack(RawDriver::new(), MemoryDriver::new(65536));
    assert_eq!(s.length().unwrap(), 65536);
    s.write(1000, b"through").unwrap();
    assert_eq!(&disk_contents(&s)[1000..1007], b"through");
    assert_eq!(s.read(1000, 7).unwrap(), b"through");
    s.finish();
}

#[test]
fn a_window_shifts_and_confines_requests() {
    let s = stack(
        RawDriver::with_window(8192, Some(16384)).unwrap(),
        MemoryDriver::new(65536),
    );
    assert_eq!(s.length().unwrap(), 16384);
    s.write(0, &[1; 512]).unwrap();
    s.write(16384 - 512, &[2; 512]).unwrap();
    let disk = disk_contents(&s);
    assert!(
        disk[..8192].iter().all(|&b| b == 0),
        "nothing before the window"
    );
    assert!(disk[8192..8704].iter().all(|&b| b == 1));
    assert!(disk[24576 - 512..24576].iter().all(|&b| b == 2));
    assert!(disk[24576..].iter().all(|&b| b == 0), "nothing after it");
    assert_eq!(s.read(0, 512).unwrap(), vec![1; 512]);

    // The backend refuses past the window's end...
    let err = s.write(16384 - 511, &[3; 512]).unwrap_err();
    assert!(
        matches!(err, Error::OutOfRange { size: 16384, .. }),
        "{err}"
    );
    // ...and so does the node itself, for callers that skip the backend.
    let err = node_read(&s, 16000, 512).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfRange {
                offset: 16000,
                len: 512,
                size: 16384
            }
        ),
        "{err}"
    );
    let err = node_read(&s, u64::MAX - 10, 100).unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    s.finish();
}

#[test]
fn an_offset_without_size_runs_to_the_childs_end() {
    let s = stack(
        RawDriver::with_window(4096, None).unwrap(),
        MemoryDriver::new(65536),
    );
    assert_eq!(s.length().unwrap(), 65536 - 4096);
    s.write(0, b"shifted").unwrap();
    assert_eq!(&disk_contents(&s)[4096..4103], b"shifted");
    s.finish();
}

#[test]
fn a_window_past_the_childs_end_is_a_clear_error() {
    let s = stack(
        RawDriver::with_window(60000, Some(8192)).unwrap(),
        MemoryDriver::new(65536),
    );
    let err = s.read(0, 512).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidArgument(_)), "{msg}");
    assert!(
        msg.contains("raw0") && msg.contains("disk") && msg.contains("65536"),
        "{msg}"
    );
    assert!(matches!(s.length(), Err(Error::InvalidArgument(_))));
    s.finish();

    let s = stack(
        RawDriver::with_window(70000, None).unwrap(),
        MemoryDriver::new(65536),
    );
    let err = s.length().unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    s.finish();
}

#[test]
fn bad_windows_and_options_are_refused() {
    let err = RawDriver::with_window(0, Some(0)).unwrap_err();
    assert!(err.to_string().contains("positive"), "{err}");
    assert!(RawDriver::with_window(u64::MAX, Some(2)).is_err());
    let raw = RawDriver::from_options(&[("offset", "1M"), ("size", "64k")]).unwrap();
    assert_eq!((raw.offset(), raw.size()), (1 << 20, Some(64 << 10)));
    for bad in [
        &[("size", "0")][..],
        &[("size", "lots")],
        &[("offset", "-5")],
        &[("colour", "blue")],
    ] {
        let err = RawDriver::from_options(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
    }
}

#[test]
fn a_raw_node_needs_a_file_child() {
    // add_alone also checks that the failed add left nothing behind.
    let err = add_alone("raw0", RawDriver::new());
    assert!(
        matches!(err, Error::NoSuchChild { ref node, role: ChildRole::File } if node == "raw0"),
        "{err}"
    );
}

#[test]
fn block_status_is_shifted_into_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.img");
    let file = FileDriver::create(&path, 1 << 20, FileOptions::default()).unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let raw = main
        .run(move |bql| {
            bql.write(|w| {
                let f = w.add_node("file0", file, &[])?;
                let raw = RawDriver::with_window(256 << 10, Some(256 << 10))?;
                w.add_node("raw0", raw, &[(ChildRole::File, &f)])
            })
        })
        .unwrap();
    let statuses = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let n = raw.io(&guard);
            // Data at window offset 64 KiB = file offset 320 KiB.
            n.write(64 << 10, &[9u8; 4096]).await?;
            let a = n.block_status(0, 64 << 10).await?;
            let b = n.block_status(64 << 10, 4096).await?;
            // Clamped to the window's end.
            let c = n.block_status(250 << 10, 1 << 20).await?;
            Ok::<_, Error>((a, b, c))
        })
        .join()
        .unwrap();
    assert_eq!(statuses.0, (BlockStatus::Zero, 64 << 10));
    assert_eq!(statuses.1, (BlockStatus::Data, 4096));
    assert_eq!(statuses.2 .0, BlockStatus::Zero);
    assert!(statuses.2 .1 <= 6 << 10, "{:?}", statuses.2);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[(320 << 10)..(324 << 10)].iter().all(|&b| b == 9));
    drop(io);
    main.shutdown();
}

#[test]
fn alignment_passes_up_and_a_misaligned_window_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strict.img");
    drop(FileDriver::create(&path, 1 << 20, FileOptions::default()).unwrap());
    let strict = FileOptions {
        direct: true,
        strict_alignment: true,
        ..FileOptions::default()
    };
    let Ok(file) = FileDriver::open(&path, strict) else {
        eprintln!("no O_DIRECT here; skipping");
        return;
    };
    let align = file.direct_alignment().unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (good, bad) = main
        .run(move |bql| {
            bql.write(|w| {
                let f = w.add_node("file0", file, &[])?;
                let good = RawDriver::with_window(u64::from(align), Some(8192))?;
                let good = w.add_node("good", good, &[(ChildRole::File, &f)])?;
                let bad = RawDriver::with_window(100, Some(8192))?;
                let bad = w.add_node("bad", bad, &[(ChildRole::File, &f)])?;
                Ok::<_, Error>((good, bad))
            })
        })
        .unwrap();
    let (reported, bad_err) = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let reported = good.io(&guard).request_alignment();
            let mut buf = vec![0u8; align as usize];
            good.io(&guard).read(0, &mut buf).await.unwrap();
            let err = bad.io(&guard).read(0, &mut buf).await.unwrap_err();
            (reported, err)
        })
        .join();
    assert_eq!(reported, align);
    assert!(bad_err.to_string().contains("alignment"), "{bad_err}");
    drop(io);
    main.shutdown();
}
