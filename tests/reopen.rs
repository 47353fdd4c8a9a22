//! Reopening nodes read-only and read-write (`GraphWriter::set_read_only`,
//! `GraphWriter::reopen` with `read-only`), with real files: the file's
//! OFD image locks follow (seen by `qemu-io`), permissions follow (a
//! read-only node grants no writer), qcow2 needs its metadata flushed
//! first (`Drained::flush`), and a refused reopen changes nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, Permissions};

/// Whether anyone holds QEMU's "write" permission lock byte (offset 101)
/// on `path`: what `qemu-io`/QEMU test before they open an image in a way
/// that does not share writes.
fn write_lock_held(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a plain C struct; all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 101;
    fl.l_len = 1;
    // SAFETY: valid descriptor and struct for the call.
    let r = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    assert_eq!(r, 0, "F_OFD_GETLK");
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Whether `qemu-img check` (a read-only qcow2 opener, which does not
/// share writes) can open `path` now; a failure must be about the lock.
fn qemu_img_checks(path: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        assert!(
            text.contains("lock"),
            "qemu-img check failed for another reason: {text}"
        );
    }
    out.status.success()
}

#[test]
fn a_file_goes_read_only_and_back_and_its_locks_follow() {
    let _w = common::watchdog("file_ro_rw", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let file = FileDriver::create(&path, 1 << 20, FileOptions::default()).unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let node = main
        .run(|bql| bql.write(|w| w.add_node("disk", file, &[])))
        .unwrap();
    assert!(write_lock_held(&path), "read-write: we hold the write lock");

    // A writer keeps it read-write: refused, nothing changed.
    let n = node.clone();
    let writer = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &n, BackendOptions::default())))
        .unwrap();
    let n = node.clone();
    main.run(move |bql| {
        let before = common::snapshot(bql.graph());
        let drained = bql.drain(&n);
        let err = bql.write(|w| w.set_read_only(&drained, true)).unwrap_err();
        assert!(
            matches!(err, Error::PermissionConflict { ref detail, .. } if detail.contains("read-only")),
            "{err}"
        );
        drop(drained);
        assert_eq!(common::snapshot(bql.graph()), before);
    });
    assert!(write_lock_held(&path), "still read-write after the refusal");
    let w = writer.clone();
    common::join(
        io.spawn(move |mut cx| async move { w.write(&mut cx, 0, &[7; 512]).await }),
        "write before",
    )
    .unwrap();

    // Without the writer it may go read-only; qemu-io may read it then.
    main.run(move |bql| bql.write(|w| w.remove_backend(&writer)))
        .unwrap();
    let n = node.clone();
    let reader = main
        .run(move |bql| {
            bql.write(|w| {
                w.add_backend(
                    "reader",
                    &n,
                    BackendOptions::with_perms(Permissions::SHARED_READER),
                )
            })
        })
        .unwrap();
    let n = node.clone();
    main.run(move |bql| {
        let drained = bql.drain(&n);
        bql.write(|w| w.reopen(&drained, &[("read-only", "on")]))
            .unwrap();
        let info = bql.query_nodes();
        assert!(info[0].read_only);
        assert!(info[0]
            .driver_info
            .filename
            .as_deref()
            .unwrap()
            .ends_with("disk.raw"));
        // Writers are refused now, at the graph.
        let err = bql
            .write(|w| w.add_backend("late", &n, BackendOptions::default()))
            .unwrap_err();
        assert!(matches!(err, Error::PermissionConflict { .. }), "{err}");
    });
    assert!(!write_lock_held(&path), "read-only: the write lock is gone");
    let r = reader.clone();
    let data = common::join(
        io.spawn(move |mut cx| async move {
            let mut buf = vec![0; 512];
            r.read(&mut cx, 0, &mut buf).await.map(|()| buf)
        }),
        "read while read-only",
    )
    .unwrap();
    assert_eq!(data, vec![7; 512]);

    // Back to read-write: the lock comes back, writes work again.
    let n = node.clone();
    main.run(move |bql| {
        let drained = bql.drain(&n);
        bql.write(|w| w.reopen(&drained, &[("read-only", "off")]))
            .unwrap();
        assert!(!bql.query_nodes()[0].read_only);
    });
    assert!(write_lock_held(&path), "read-write again");
    main.run(move |bql| bql.write(|w| w.remove_backend(&reader)))
        .unwrap();
    let n = node.clone();
    let writer = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &n, BackendOptions::default())))
        .unwrap();
    common::join(
        io.spawn(move |mut cx| async move {
            writer.write(&mut cx, 512, &[9; 512]).await?;
            writer.flush(&mut cx).await
        }),
        "write after",
    )
    .unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[512..1024], &[9; 512]);

    // A bad value is refused before anything happens.
    main.run(move |bql| {
        let drained = bql.drain(&node);
        let err = bql
            .write(|w| w.reopen(&drained, &[("read-only", "maybe")]))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    });
    drop(io);
    main.shutdown();
}

#[test]
fn a_qcow2_node_goes_read_only_with_its_file_after_a_flush_in_the_drain() {
    let _w = common::watchdog("qcow2_ro_rw", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let file = FileDriver::create(&path, 0, FileOptions::default()).unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let file_node = main
        .run(|bql| bql.write(|w| w.add_node("disk-file", file, &[])))
        .unwrap();
    let f = file_node.clone();
    let driver = common::join(
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::create(f.io(&g), &CreateOptions::new(4 << 20)).await?;
            Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await
        }),
        "create",
    )
    .unwrap();
    let f = file_node.clone();
    let (disk, blk) = main
        .run(move |bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", driver, &[(ChildRole::File, &f)])?;
                let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, Error>((disk, blk))
            })
        })
        .unwrap();
    let b = blk.clone();
    common::join(
        io.spawn(move |mut cx| async move { b.write(&mut cx, 65536, &[5; 4096]).await }),
        "allocating write",
    )
    .unwrap();
    main.run(move |bql| bql.write(|w| w.remove_backend(&blk)))
        .unwrap();

    let d = disk.clone();
    let flusher = main.new_io_thread("flusher").unwrap();
    assert!(
        !qemu_img_checks(&path),
        "read-write: qemu-img is locked out"
    );
    main.run(move |bql| {
        let drained = bql.drain(&d);
        let before = common::snapshot(bql.graph());
        // Metadata not written back yet: refused, nothing changed.
        let err = bql.write(|w| w.set_read_only(&drained, true)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains("flush")),
            "{err}"
        );
        assert_eq!(common::snapshot(bql.graph()), before);
        bql.block_on(drained.flush(&flusher)).unwrap();
        bql.write(|w| w.set_read_only(&drained, true)).unwrap();
        let nodes = bql.query_nodes();
        for n in &nodes {
            assert!(n.read_only, "{} follows the qcow2 node", n.name);
        }
        let q = nodes.iter().find(|n| n.name == "disk").unwrap();
        assert_eq!(q.driver, "qcow2");
        assert_eq!(q.driver_info.cluster_size, Some(65536));
        assert_eq!(q.size, Some(4 << 20));
    });
    // Read-only: qemu-img may check it meanwhile.
    assert!(qemu_img_checks(&path), "read-only: qemu-img may open it");

    // Back to read-write, with the file first; a writer works again.
    let d = disk.clone();
    main.run(move |bql| {
        let drained = bql.drain(&d);
        bql.write(|w| w.set_read_only(&drained, false)).unwrap();
        assert!(bql.query_nodes().iter().all(|n| !n.read_only));
    });
    let blk = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &disk, BackendOptions::default())))
        .unwrap();
    let data = common::join(
        io.spawn(move |mut cx| async move {
            blk.write(&mut cx, 0, &[6; 4096]).await?;
            blk.flush(&mut cx).await?;
            let mut buf = vec![0; 4096];
            blk.read(&mut cx, 65536, &mut buf).await.map(|()| buf)
        }),
        "write after",
    )
    .unwrap();
    assert_eq!(data, vec![5; 4096]);
    drop(io);
    main.shutdown();
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
