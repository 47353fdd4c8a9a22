//! The `file` protocol driver: I/O, sparse operations, O_DIRECT bouncing,
//! image locking, bad input.

use std::path::Path;
use std::time::Duration;

use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::{driver::BlockStatus, BackendOptions, Error, Perm};

mod common;
use common::{Rig, Stack};

/// backend `vda` -> file `file0`.
fn setup(driver: FileDriver) -> Rig {
    Stack::new().node("file0", driver).build()
}

/// The same, with the backend taking `options`.
fn setup_with(driver: FileDriver, options: BackendOptions) -> Rig {
    Stack::new()
        .node("file0", driver)
        .backend_options(options)
        .build()
}

fn image(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 0]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(size)
        .unwrap();
    path
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn writes_reach_the_file_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.img", 1 << 20);
    let s = setup(FileDriver::open(&path, FileOptions::default()).unwrap());
    let data = pattern(8192, 1);
    s.write(4096, &data).unwrap();
    assert_eq!(s.read(4096, 8192).unwrap(), data);
    let blk = s.blk.clone();
    s.io.spawn(move |mut cx| async move { blk.flush(&mut cx).await })
        .join()
        .unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4096..12288], &data[..]);
    assert_eq!(on_disk.len(), 1 << 20);
    s.finish();
}

#[test]
fn reads_past_the_end_are_zeroes_and_writes_past_it_grow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "grow.img", 1000);
    let s = setup(FileDriver::open(&path, FileOptions::default()).unwrap());
    let tail = s
        .on_node("file0", |n| {
            Box::pin(async move {
                let mut buf = vec![0xAAu8; 100];
                n.read(950, &mut buf).await.map(|_| buf)
            })
        })
        .unwrap();
    assert!(
        tail.iter().all(|&b| b == 0),
        "bytes past the end read as zero"
    );
    s.on_node("file0", |n| {
        Box::pin(async move { n.write(5000, b"grown").await })
    })
    .unwrap();
    assert_eq!(
        s.on_node("file0", |n| Box::pin(async move { n.length().await }))
            .unwrap(),
        5005
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 5005);
    s.finish();
}

#[test]
fn truncate_grows_and_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "t.img", 4096);
    let s = setup_with(
        FileDriver::open(&path, FileOptions::default()).unwrap(),
        BackendOptions::resizable(),
    );
    s.write(0, &[7u8; 4096]).unwrap();
    s.truncate(1 << 20).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    assert!(s.read(4096, 4096).unwrap().iter().all(|&b| b == 0));
    s.truncate(512).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 512);
    let err = s.read(0, 4096).unwrap_err();
    assert!(
        matches!(err, Error::OutOfRange { size: 512, .. }),
        "the backend sees the new length: {err}"
    );
    s.finish();
}

#[test]
fn discard_punches_holes_and_write_zeroes_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "sparse.img", 1 << 20);
    let s = setup(FileDriver::open(&path, FileOptions::default()).unwrap());
    s.write(0, &[1u8; 256 << 10]).unwrap();
    let status = |off, len| {
        s.on_node("file0", move |n| {
            Box::pin(async move { n.block_status(off, len).await })
        })
        .unwrap()
    };
    assert_eq!(status(0, 4096).0, BlockStatus::Data);
    assert_eq!(
        status(512 << 10, 4096).0,
        BlockStatus::Zero,
        "never written"
    );

    let blk = s.blk.clone();
    s.io.spawn(move |mut cx| async move { blk.discard(&mut cx, 64 << 10, 64 << 10).await })
        .join()
        .unwrap();
    // Punched: a hole that reads as zeroes, data around it untouched.
    assert_eq!(status(64 << 10, 64 << 10), (BlockStatus::Zero, 64 << 10));
    assert!(s.read(64 << 10, 64 << 10).unwrap().iter().all(|&b| b == 0));
    assert!(s.read(0, 64 << 10).unwrap().iter().all(|&b| b == 1));
    assert!(s.read(128 << 10, 4096).unwrap().iter().all(|&b| b == 1));

    let blk = s.blk.clone();
    s.io.spawn(move |mut cx| async move { blk.write_zeroes(&mut cx, 100, 1000).await })
        .join()
        .unwrap();
    let head = s.read(0, 2048).unwrap();
    assert!(head[..100].iter().all(|&b| b == 1));
    assert!(head[100..1100].iter().all(|&b| b == 0));
    assert!(head[1100..].iter().all(|&b| b == 1));

    // Zeroing past the end grows the file, like a write.
    s.on_node("file0", |n| {
        Box::pin(async move { n.write_zeroes(1 << 20, 8192).await })
    })
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), (1 << 20) + 8192);
    s.finish();
}

#[test]
fn read_only_files_refuse_changes_but_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "ro.img", 65536);
    let ro = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    // A reader that may resize: the permission is there, the file refuses.
    let s = setup_with(
        FileDriver::open(&path, ro).unwrap(),
        BackendOptions::with_perms(blockgraph::Permissions {
            take: Perm::CONSISTENT_READ | Perm::RESIZE,
            share: Perm::ALL,
        }),
    );
    assert_eq!(s.read(0, 512).unwrap(), vec![0; 512]);
    for op in 0..4u8 {
        let err = if op == 3 {
            s.truncate(0).unwrap_err()
        } else {
            s.on_node("file0", move |n| {
                Box::pin(async move {
                    match op {
                        0 => n.write(0, &[1; 512]).await,
                        1 => n.write_zeroes(0, 512).await,
                        _ => n.discard(0, 512).await,
                    }
                })
            })
            .unwrap_err()
        };
        assert!(
            matches!(err, Error::ReadOnly(ref p) if p.ends_with("ro.img")),
            "{err}"
        );
    }
    s.on_node("file0", |n| Box::pin(async move { n.flush().await }))
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), vec![0; 65536]);
    s.finish();
}

#[test]
fn bad_paths_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let err = FileDriver::open(&missing, FileOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound));
    assert!(err.to_string().contains("missing.img"), "{err}");

    let ro = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    let err = FileDriver::open(dir.path(), ro).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("not a regular file")),
        "{err}"
    );
    let err = FileDriver::open(dir.path(), FileOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Io(_)),
        "a directory cannot be opened for writing: {err}"
    );

    let err = FileDriver::create(dir.path().join("x.img"), 4096, ro).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = FileDriver::create(
        dir.path().join("no/such/dir.img"),
        4096,
        FileOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("dir.img"), "{err}");
}

#[test]
fn create_sizes_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.img");
    std::fs::write(&path, b"old contents").unwrap();
    let f = FileDriver::create(&path, 3 << 20, FileOptions::default()).unwrap();
    drop(f);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 3 << 20);
    assert!(
        std::fs::read(&path).unwrap().iter().all(|&b| b == 0),
        "emptied"
    );
    // Size 0 over an old file empties it too; a fresh file of size 0 or
    // more comes out as asked.
    std::fs::write(&path, b"old contents").unwrap();
    drop(FileDriver::create(&path, 0, FileOptions::default()).unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    for size in [0u64, 4096] {
        let fresh = dir.path().join(format!("fresh{size}.img"));
        drop(FileDriver::create(&fresh, size, FileOptions::default()).unwrap());
        assert_eq!(std::fs::metadata(&fresh).unwrap().len(), size);
    }
}

#[test]
fn a_second_writer_is_refused_with_a_lock_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "locked.img", 65536);
    let first = FileDriver::open(&path, FileOptions::default()).unwrap();
    assert!(first.is_locked());

    let err = FileDriver::open(&path, FileOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Locked { path: p, .. } if p.ends_with("locked.img")),
        "{err}"
    );
    assert!(
        err.to_string().contains("\"write\""),
        "names the permission: {err}"
    );

    // A plain reader is refused too (it does not share writes)...
    let ro = FileOptions {
        read_only: true,
        ..FileOptions::default()
    };
    assert!(matches!(
        FileDriver::open(&path, ro),
        Err(Error::Locked { .. })
    ));
    // ...unless it tolerates a writer, or locking is off.
    let shared = FileOptions {
        share_writes: true,
        ..ro
    };
    let reader = FileDriver::open(&path, shared).unwrap();
    let unlocked = FileOptions {
        locking: false,
        ..FileOptions::default()
    };
    let rogue = FileDriver::open(&path, unlocked).unwrap();
    assert!(!rogue.is_locked());
    drop((reader, rogue));

    // Two writers that both share writes (QEMU's share-rw) coexist.
    drop(first);
    let sharing = FileOptions {
        share_writes: true,
        ..FileOptions::default()
    };
    let a = FileDriver::open(&path, sharing).unwrap();
    let b = FileDriver::open(&path, sharing).unwrap();
    drop((a, b));

    // Readers coexist, and keep a writer out.
    let r1 = FileDriver::open(&path, ro).unwrap();
    let r2 = FileDriver::open(&path, ro).unwrap();
    assert!(matches!(
        FileDriver::open(&path, FileOptions::default()),
        Err(Error::Locked { .. })
    ));
    drop((r1, r2));
    // Closing releases the locks.
    FileDriver::open(&path, FileOptions::default()).unwrap();
}

#[test]
fn locks_are_released_when_the_node_leaves_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "graph.img", 65536);
    let s = setup(FileDriver::open(&path, FileOptions::default()).unwrap());
    assert!(matches!(
        FileDriver::open(&path, FileOptions::default()),
        Err(Error::Locked { .. })
    ));
    let (node, blk) = (s.node("file0"), s.blk.clone());
    s.main
        .run(move |bql| {
            bql.write(|w| w.remove_backend(&blk))?;
            let drained = bql.drain(&node);
            bql.write(|w| w.remove_node(&drained))
        })
        .unwrap();
    let Rig {
        main,
        io,
        nodes,
        blk,
    } = s;
    drop((nodes, blk, io));
    main.shutdown();
    FileDriver::open(&path, FileOptions::default()).unwrap();
}

/// Removal releases the locks at once, as QEMU's close does, even while a
/// handle still keeps the driver (and its descriptor) alive.
#[test]
fn locks_are_released_on_removal_while_a_handle_lives() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "held.img", 65536);
    let s = setup(FileDriver::open(&path, FileOptions::default()).unwrap());
    let (node, blk) = (s.node("file0"), s.blk.clone());
    s.main
        .run(move |bql| {
            bql.write(|w| w.remove_backend(&blk))?;
            let drained = bql.drain(&node);
            bql.write(|w| w.remove_node(&drained))
        })
        .unwrap();
    // `s.nodes` still holds the removed node: the file is open, but unlocked.
    FileDriver::open(&path, FileOptions::default()).expect("the removed node's locks are gone");
    let Rig {
        main,
        io,
        nodes,
        blk,
    } = s;
    drop((nodes, blk, io));
    main.shutdown();
}

/// The lock bytes are QEMU's: a running `qemu-io` keeps us out.
#[test]
fn qemu_io_holding_the_image_keeps_a_writer_out() {
    if std::process::Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-io not installed; skipping the interop check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "shared.img", 1 << 20);
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 60000"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until qemu-io holds its lock (seen in /proc/locks, which takes none:
    // opening meanwhile could make qemu-io's own open fail).
    common::process::wait_until_locked(&path, &mut child, Duration::from_secs(30));
    let refused = match FileDriver::open(&path, FileOptions::default()) {
        Err(e @ Error::Locked { .. }) => Some(e),
        Ok(_) => None,
        Err(e) => panic!("unexpected error: {e}"),
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(refused.is_some(), "qemu-io's write lock was never seen");
    FileDriver::open(&path, FileOptions::default()).expect("free again once qemu-io exits");
}

fn direct() -> FileOptions {
    FileOptions {
        direct: true,
        ..FileOptions::default()
    }
}

#[test]
fn direct_io_bounces_unaligned_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "direct.img", 1 << 20);
    let driver = match FileDriver::open(&path, direct()) {
        Ok(d) => d,
        Err(Error::InvalidArgument(m)) if m.contains("O_DIRECT") => {
            eprintln!("no O_DIRECT on this filesystem; skipping");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let align = driver.direct_alignment().expect("direct");
    assert!([512, 1024, 2048, 4096].contains(&align), "{align}");
    let s = setup(driver);
    let mut expect = vec![0u8; 1 << 20];
    // Aligned, unaligned head, unaligned tail, both inside one block, and
    // spanning several blocks with both ends partial.
    for (i, (off, len)) in [
        (0u64, 8192usize),
        (100, 4000),
        (8192, 5000),
        (20_001, 7),
        (30_000, 3 * 4096 + 123),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(len, i as u8 + 1);
        s.write(off, &data).unwrap();
        expect[off as usize..off as usize + len].copy_from_slice(&data);
    }
    assert_eq!(s.read(0, 1 << 20).unwrap(), expect);
    assert_eq!(s.read(20_000, 9).unwrap(), &expect[20_000..20_009]);
    assert_eq!(s.read(4095, 2).unwrap(), &expect[4095..4097]);
    let blk = s.blk.clone();
    s.io.spawn(move |mut cx| async move { blk.flush(&mut cx).await })
        .join()
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), expect, "what the file holds");
    s.finish();
}

/// Concurrent read-modify-writes of neighbouring bytes in one block must not
/// lose each other's bytes (the serialising range lock).
#[test]
fn concurrent_unaligned_direct_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "rmw.img", 1 << 16);
    let Ok(driver) = FileDriver::open(&path, direct()) else {
        eprintln!("no O_DIRECT on this filesystem; skipping");
        return;
    };
    let s = setup(driver);
    let io2 = s.main.new_io_thread("io1").unwrap();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let blk = s.blk.clone();
        let io = if i % 2 == 0 { &s.io } else { &io2 };
        tasks.push(io.spawn(move |mut cx| async move {
            // 64 writers of 3 bytes each, all in the first 4 KiB, plus an
            // aligned 4 KiB writer on the block after, overlapping nothing.
            blk.write(&mut cx, 1000 + i * 3, &[i as u8 + 1; 3]).await?;
            blk.write(&mut cx, 4096, &[0xAB; 4096]).await
        }));
    }
    for t in tasks {
        t.join().unwrap();
    }
    let data = s.read(0, 8192).unwrap();
    for i in 0..64usize {
        assert_eq!(
            &data[1000 + i * 3..1003 + i * 3],
            &[i as u8 + 1; 3],
            "writer {i}"
        );
    }
    assert!(data[..1000].iter().all(|&b| b == 0));
    assert!(data[4096..].iter().all(|&b| b == 0xAB));
    drop(io2);
    s.finish();
}

/// A request whose future is dropped while the host call runs: the call
/// finishes into the driver's own buffer, and its range lock is released by
/// the blocking closure, so later requests to the same blocks go through.
#[test]
fn cancelled_requests_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "cancel.img", 1 << 16);
    let Ok(driver) = FileDriver::open(&path, direct()) else {
        eprintln!("no O_DIRECT on this filesystem; skipping");
        return;
    };
    let s = setup(driver);
    let blk = s.blk.clone();
    s.io.spawn(move |mut cx| async move {
        for i in 0..50u64 {
            let mut buf = vec![0u8; 100];
            // Dropped after the first poll, with the host call dispatched.
            let _ = tokio::time::timeout(Duration::ZERO, blk.write(&mut cx, 10 + i, &[9; 5])).await;
            let _ = tokio::time::timeout(Duration::ZERO, blk.read(&mut cx, 0, &mut buf)).await;
            drop(buf);
        }
        blk.write(&mut cx, 10, b"final").await
    })
    .join()
    .unwrap();
    assert_eq!(s.read(10, 5).unwrap(), b"final");
    assert_eq!(s.blk.in_flight(), 0);
    s.finish();
}

#[test]
fn strict_alignment_is_reported_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "strict.img", 1 << 16);
    let opts = FileOptions {
        strict_alignment: true,
        ..direct()
    };
    let Ok(driver) = FileDriver::open(&path, opts) else {
        eprintln!("no O_DIRECT on this filesystem; skipping");
        return;
    };
    let align = driver.direct_alignment().unwrap();
    let s = setup(driver);
    let reported = s
        .on_node("file0", |n| {
            Box::pin(async move { Ok(n.request_alignment()) })
        })
        .unwrap();
    assert_eq!(reported, align);
    let err = s.write(1, &[1; 512]).unwrap_err();
    assert!(
        matches!(err, Error::Misaligned { alignment, .. } if alignment == align),
        "{err}"
    );
    // The driver refuses too, for callers that skip the backend.
    let err = s
        .on_node("file0", |n| {
            Box::pin(async move { n.write(0, &[1; 100]).await })
        })
        .unwrap_err();
    assert!(matches!(err, Error::Misaligned { .. }), "{err}");
    s.write(0, &vec![5; align as usize]).unwrap();
    assert_eq!(s.read(0, align as usize).unwrap(), vec![5; align as usize]);
    s.finish();
}

/// Without a tokio runtime (an embedder polling futures itself), host calls
/// run on helper threads instead of panicking.
#[test]
fn works_outside_a_tokio_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "plain.img", 65536);
    let s = setup(FileDriver::open(&path, FileOptions::default()).unwrap());
    // A task of the I/O thread's context, polled by a plain executor on a
    // plain thread.
    let ctx = s.io.context().clone();
    let node = s.node("file0");
    let data = std::thread::spawn(move || {
        futures::executor::block_on(ctx.task(move |mut cx| async move {
            let guard = cx.read().await;
            let n = node.io(&guard);
            n.write(100, b"no runtime").await?;
            n.flush().await?;
            let mut buf = [0u8; 10];
            n.read(100, &mut buf).await.map(|_| buf)
        }))
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(&data, b"no runtime");
    s.finish();
}

/// `no_flush` (QEMU's `cache.no-flush=on`): flushes succeed and the node
/// says so in its description; what was written still reaches the file
/// (through the page cache).
#[test]
fn a_no_flush_file_acknowledges_flushes_and_keeps_the_writes() {
    use blockgraph::driver::BlockDriver as _;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "nf.img", 1 << 20);
    let opts = FileOptions {
        no_flush: true,
        ..FileOptions::default()
    };
    let driver = FileDriver::open(&path, opts).unwrap();
    assert!(
        driver.describe().contains("no-flush"),
        "{}",
        driver.describe()
    );
    assert!(driver.options().no_flush);
    let s = setup(driver);
    let data = pattern(4096, 7);
    s.write(8192, &data).unwrap();
    let blk = s.blk.clone();
    s.io.spawn(move |mut cx| async move { blk.flush(&mut cx).await })
        .join()
        .unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[8192..12288], &data[..]);
    s.finish();
}
