//! The backend caches its root's length (QEMU's `total_sectors`) and
//! request alignment (QEMU's `bl.request_alignment`); these tests check the
//! caches never serve a stale value: after a graph change puts a node of
//! another size or alignment under the backend, and after a driver resizes
//! its node.

mod common;

use blockgraph::drivers::{FileDriver, FileOptions, MemoryDriver, RawDriver};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, Perm, Permissions};
use common::{join, Events, Probe};

#[test]
fn length_follows_a_node_replacement() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (small, big, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let small = w.add_node("small", MemoryDriver::new(4096), &[])?;
                let big = w.add_node("big", MemoryDriver::new(65536), &[])?;
                let blk = w.add_backend("vda", &small, BackendOptions::default())?;
                Ok::<_, Error>((small, big, blk))
            })
        })
        .unwrap();
    let b = blk.clone();
    let before = io
        .spawn(move |mut cx| async move {
            let len = b.length(&mut cx).await?;
            // Past the end of the small node: refused with its size.
            let beyond = b.read(&mut cx, 8192, &mut [0u8; 512]).await;
            Ok::<_, Error>((len, beyond))
        })
        .join()
        .unwrap();
    assert_eq!(before.0, 4096);
    assert!(
        matches!(before.1, Err(Error::OutOfRange { size: 4096, .. })),
        "{:?}",
        before.1
    );

    main.run(move |bql| {
        let old = bql.drain(&small);
        let new = bql.drain(&big);
        bql.write(|w| w.replace_node(&old, &new)).unwrap();
    });

    let b = blk.clone();
    let after = io
        .spawn(move |mut cx| async move {
            let len = b.length(&mut cx).await?;
            b.read(&mut cx, 8192, &mut [0u8; 512]).await?;
            Ok::<_, Error>(len)
        })
        .join()
        .unwrap();
    assert_eq!(after, 65536, "the backend kept the old node's length");
    drop(io);
    main.shutdown();
}

#[test]
fn alignment_follows_node_replacements() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let events = Events::new();
    let (loose, strict, blk) = main
        .run(move |bql| {
            bql.write(|w| {
                let loose = w.add_node("loose", MemoryDriver::new(65536), &[])?;
                let strict = w.add_node(
                    "strict",
                    Probe::new(MemoryDriver::new(65536), &events).with_alignment(512),
                    &[],
                )?;
                let blk = w.add_backend("vda", &loose, BackendOptions::default())?;
                Ok::<_, Error>((loose, strict, blk))
            })
        })
        .unwrap();
    // A request of 100 bytes at byte 100: fine on a node of alignment 1,
    // refused on one of alignment 512.
    let misaligned_read = |what: &'static str| {
        let b = blk.clone();
        join(
            io.spawn(move |mut cx| async move { b.read(&mut cx, 100, &mut [0u8; 100]).await }),
            what,
        )
    };
    let replace = |old: &blockgraph::NodeHandle, new: &blockgraph::NodeHandle| {
        let (old, new) = (old.clone(), new.clone());
        main.run(move |bql| {
            let old = bql.drain(&old);
            let new = bql.drain(&new);
            bql.write(|w| w.replace_node(&old, &new)).unwrap();
        });
    };

    // Twice each way: the second request on a root is served from the
    // cache the first one filled.
    for _ in 0..2 {
        misaligned_read("a read on the loose node").unwrap();
    }
    replace(&loose, &strict);
    for _ in 0..2 {
        let refused = misaligned_read("a read on the strict node");
        assert!(
            matches!(refused, Err(Error::Misaligned { alignment: 512, .. })),
            "the backend kept the old node's alignment: {refused:?}"
        );
    }
    replace(&strict, &loose);
    for _ in 0..2 {
        misaligned_read("a read on the loose node again")
            .expect("the backend kept the strict node's alignment");
    }
    drop(io);
    main.shutdown();
}

#[test]
fn length_follows_a_file_resize() {
    let dir = std::env::temp_dir().join(format!("blockgraph-len-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();

    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let file = FileDriver::open(&path, FileOptions::default()).unwrap();
    let (blk, resizer) = main
        .run(move |bql| {
            bql.write(|w| {
                let file = w.add_node("file", file, &[])?;
                let raw = w.add_node("raw", RawDriver::new(), &[(ChildRole::File, &file)])?;
                // The guest's backend shares the resize permission with a
                // second one that takes it (QEMU's `block_resize` does the
                // same with a temporary backend).
                let guest = BackendOptions::with_perms(Permissions {
                    take: Perm::CONSISTENT_READ | Perm::WRITE,
                    share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE,
                });
                let blk = w.add_backend("vda", &raw, guest)?;
                let resizer = w.add_backend(
                    "resizer",
                    &raw,
                    BackendOptions::with_perms(Permissions {
                        take: Perm::RESIZE,
                        share: Perm::ALL,
                    }),
                )?;
                Ok::<_, Error>((blk, resizer))
            })
        })
        .unwrap();
    let lengths = io
        .spawn(move |mut cx| async move {
            let before = blk.length(&mut cx).await?;
            resizer.truncate(&mut cx, 1 << 20).await?;
            let after = blk.length(&mut cx).await?;
            // The grown area is usable at once.
            blk.write(&mut cx, (1 << 20) - 512, &[1u8; 512]).await?;
            Ok::<_, Error>((before, after))
        })
        .join()
        .unwrap();
    assert_eq!(lengths, (4096, 1 << 20));
    drop(io);
    main.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}
