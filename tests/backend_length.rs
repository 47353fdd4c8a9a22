//! The backend caches its root's length (QEMU's `total_sectors`); these
//! tests check the cache never serves a stale length: after a graph change
//! puts a node of another size under the backend, and after a driver
//! resizes its node.

use blockgraph::drivers::{FileDriver, FileOptions, MemoryDriver, RawDriver};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, Perm, Permissions};

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
