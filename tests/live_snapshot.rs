//! Live external snapshots (`snapshot::snapshot_sync`, `snapshot::snapshot`)
//! of two disks at one instant, under guest writes on two I/O threads, with
//! real qcow2 files checked by `qemu-img` afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockgraph::drivers::qcow2::{Qcow2Driver, Qcow2Options};
use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::snapshot::{self, SnapshotSync};
use blockgraph::{BackendOptions, BlockBackend, ChildRole, Error, MainLoop, NodeHandle};

const BLOCK: usize = 4096;
const BLOCKS: usize = 64;

fn qemu_img(args: &[&str], path: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The image (with its backing chain) as raw bytes, through qemu-img.
fn contents(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.out",
        path.file_name().unwrap().to_string_lossy()
    ));
    let status = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap()
}

fn pattern(tag: u8, block: usize) -> Vec<u8> {
    vec![tag.wrapping_add(block as u8); BLOCK]
}

/// A qcow2 disk made by qemu-img, opened as `name` on `name-file`.
fn open_disk(
    main: &MainLoop,
    io: &blockgraph::IoThread,
    path: &Path,
    name: &str,
) -> (NodeHandle, BlockBackend) {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{}", BLOCK * BLOCKS))
        .status()
        .unwrap();
    assert!(status.success());
    let file = FileDriver::open(path, FileOptions::default()).unwrap();
    let file_name = format!("{name}-file");
    let file_node = main
        .run(move |bql| bql.write(|w| w.add_node(&file_name, file, &[])))
        .unwrap();
    let f = file_node.clone();
    let driver = common::join(
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await
        }),
        "open",
    )
    .unwrap();
    let name = name.to_owned();
    main.run(move |bql| {
        bql.write(|w| {
            let disk = w.add_node(&name, driver, &[(ChildRole::File, &file_node)])?;
            let blk = w.add_backend(&format!("vd-{name}"), &disk, BackendOptions::default())?;
            Ok::<_, Error>((disk, blk))
        })
    })
    .unwrap()
}

/// Writes blocks `range` with `tag` through `blk`, in order.
fn write_blocks(
    io: &blockgraph::IoThread,
    blk: &BlockBackend,
    range: std::ops::Range<usize>,
    tag: u8,
) {
    let blk = blk.clone();
    common::join(
        io.spawn(move |mut cx| async move {
            for b in range {
                blk.write(&mut cx, (b * BLOCK) as u64, &pattern(tag, b))
                    .await?;
            }
            blk.flush(&mut cx).await
        }),
        "writes",
    )
    .unwrap();
}

#[test]
fn two_disks_are_snapshotted_at_one_instant_under_guest_writes() {
    let _w = common::watchdog("live_snapshot", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let main = MainLoop::new().unwrap();
    let ios = [
        main.new_io_thread("io0").unwrap(),
        main.new_io_thread("io1").unwrap(),
    ];
    let control = main.new_io_thread("control").unwrap();
    let bases: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("base{i}.qcow2")))
        .collect();
    let disks: Vec<(NodeHandle, BlockBackend)> = (0..2)
        .map(|i| open_disk(&main, &ios[i], &bases[i], &format!("disk{i}")))
        .collect();

    // Before: blocks 0..32 hold A.
    for (i, (_, blk)) in disks.iter().enumerate() {
        write_blocks(&ios[i], blk, 0..BLOCKS / 2, b'A');
    }

    // During: each I/O thread keeps rewriting blocks 32..64 with B while
    // the snapshot happens.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = disks
        .iter()
        .enumerate()
        .map(|(i, (_, blk))| {
            let blk = blk.clone();
            let stop = stop.clone();
            ios[i].spawn(move |mut cx| async move {
                let mut passes = 0u32;
                while !stop.load(Ordering::Relaxed) || passes < 2 {
                    for b in BLOCKS / 2..BLOCKS {
                        blk.write(&mut cx, (b * BLOCK) as u64, &pattern(b'B', b))
                            .await?;
                    }
                    passes += 1;
                }
                blk.flush(&mut cx).await?;
                Ok::<_, Error>(passes)
            })
        })
        .collect();

    let overlays: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("snap{i}.qcow2")))
        .collect();
    let requests: Vec<SnapshotSync> = (0..2)
        .map(|i| SnapshotSync::new(&disks[i].0, &overlays[i], &format!("snap{i}")))
        .collect();
    let made = common::join(
        main.spawn(move |mut task| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let made = snapshot::snapshot_sync(&mut task, &control, &requests).await;
            (made, control)
        }),
        "snapshot",
    );
    let (made, _control) = made;
    let made = made.unwrap();
    assert_eq!(made.len(), 2);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let passes = common::join(w, "writer").unwrap();
        assert!(passes >= 2);
    }

    // The graph: each backend on its overlay, the old tops read-only.
    main.run(|bql| {
        let nodes = bql.query_nodes();
        for i in 0..2 {
            let snap = nodes.iter().find(|n| n.name == format!("snap{i}")).unwrap();
            assert_eq!(snap.backing_chain, [format!("disk{i}")]);
            assert_eq!(snap.parents, [format!("backend 'vd-disk{i}'")]);
            assert_eq!(
                snap.driver_info.backing_file.as_deref(),
                Some(format!("base{i}.qcow2").as_str())
            );
            assert_eq!(snap.driver_info.backing_format.as_deref(), Some("qcow2"));
            assert!(!snap.read_only);
            for old in [format!("disk{i}"), format!("disk{i}-file")] {
                assert!(
                    nodes.iter().find(|n| n.name == old).unwrap().read_only,
                    "{old}"
                );
            }
        }
        common::assert_consistent(bql.graph());
    });

    // After: blocks 0..16 get C, into the overlays only.
    for (i, (_, blk)) in disks.iter().enumerate() {
        write_blocks(&ios[i], blk, 0..BLOCKS / 4, b'C');
    }
    drop(ios);
    main.shutdown();

    for i in 0..2 {
        let info = qemu_img(&["info", "--backing-chain"], &overlays[i]);
        assert!(
            info.contains(&format!("backing file: base{i}.qcow2")),
            "{info}"
        );
        assert!(info.contains(&format!("base{i}.qcow2")), "{info}");
        qemu_img(&["check"], &overlays[i]);
        qemu_img(&["check"], &bases[i]);
        let chain = contents(&overlays[i], dir.path());
        let base = contents(&bases[i], dir.path());
        for b in 0..BLOCKS {
            let r = b * BLOCK..(b + 1) * BLOCK;
            let (want_chain, want_base) = if b < BLOCKS / 4 {
                (pattern(b'C', b), Some(pattern(b'A', b)))
            } else if b < BLOCKS / 2 {
                (pattern(b'A', b), Some(pattern(b'A', b)))
            } else {
                // B was written before and after: the chain has it; the
                // base has it or nothing, depending on the instant.
                (pattern(b'B', b), None)
            };
            assert_eq!(
                chain[r.clone()],
                want_chain[..],
                "disk {i} block {b} through the chain"
            );
            match want_base {
                Some(want) => assert_eq!(base[r], want[..], "disk {i} block {b} in the base"),
                None => assert!(
                    base[r.clone()] == pattern(b'B', b)[..] || base[r].iter().all(|&x| x == 0),
                    "disk {i} block {b} in the base is torn"
                ),
            }
        }
        // The overlay stores only what was written after the snapshot.
        let map = Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(&overlays[i])
            .output()
            .unwrap();
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        for e in map.as_array().unwrap() {
            let start = e["start"].as_u64().unwrap() as usize;
            let depth = e["depth"].as_u64().unwrap();
            if e["data"].as_bool().unwrap() && depth == 0 {
                assert!(
                    !(BLOCKS / 4 * BLOCK..BLOCKS / 2 * BLOCK).contains(&start),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn a_refused_snapshot_changes_nothing_and_removes_its_files() {
    let _w = common::watchdog("snapshot_refused", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let control = main.new_io_thread("control").unwrap();
    let (d0, _b0) = open_disk(&main, &io, &dir.path().join("a.qcow2"), "a");
    let (d1, _b1) = open_disk(&main, &io, &dir.path().join("b.qcow2"), "b");
    let before = main.run(|bql| common::snapshot(bql.graph()));
    let o0 = dir.path().join("oa.qcow2");
    let o1 = dir.path().join("ob.qcow2");
    // The second overlay's node name is taken: the whole snapshot fails.
    let requests = vec![
        SnapshotSync::new(&d0, &o0, "snap"),
        SnapshotSync::new(&d1, &o1, "a"),
    ];
    let (err, control) = common::join(
        main.spawn(move |mut task| async move {
            let r = snapshot::snapshot_sync(&mut task, &control, &requests).await;
            (r.unwrap_err(), control)
        }),
        "snapshot",
    );
    assert!(matches!(err, Error::DuplicateName(_)), "{err}");
    assert!(!o0.exists() && !o1.exists(), "created files are removed");
    let after = main.run(|bql| common::snapshot(bql.graph()));
    // Only the mutation count moved (file nodes added and removed again).
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("mutations"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&after), strip(&before));

    // blockdev-snapshot with an overlay that already has users is refused.
    let (d2, _b2) = open_disk(&main, &io, &dir.path().join("c.qcow2"), "c");
    let err = common::join(
        main.spawn(move |mut task| async move {
            snapshot::snapshot(&mut task, &control, &[(d0, d2)])
                .await
                .unwrap_err()
        }),
        "blockdev-snapshot",
    );
    assert!(err.to_string().contains("in use"), "{err}");
    drop(io);
    main.shutdown();
}

#[test]
fn blockdev_snapshot_puts_an_added_overlay_on_top() {
    let _w = common::watchdog("blockdev_snapshot", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let control = main.new_io_thread("control").unwrap();
    let base = dir.path().join("base.qcow2");
    let (top, blk) = open_disk(&main, &io, &base, "top");
    write_blocks(&io, &blk, 0..4, b'A');
    let over = dir.path().join("over.qcow2");
    let status = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ])
        .arg(&over)
        .status()
        .unwrap();
    assert!(status.success());
    let file = FileDriver::open(&over, FileOptions::default()).unwrap();
    let file_node = main
        .run(move |bql| bql.write(|w| w.add_node("over-file", file, &[])))
        .unwrap();
    let f = file_node.clone();
    let driver = common::join(
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let mut o = Qcow2Options::default();
            o.require_backing = false;
            Qcow2Driver::open(f.io(&g), o).await
        }),
        "open overlay",
    )
    .unwrap();
    let overlay = main
        .run(move |bql| bql.write(|w| w.add_node("over", driver, &[(ChildRole::File, &file_node)])))
        .unwrap();
    let (t, o) = (top.clone(), overlay.clone());
    common::join(
        main.spawn(move |mut task| async move {
            snapshot::snapshot(&mut task, &control, &[(t, o)]).await
        }),
        "blockdev-snapshot",
    )
    .unwrap();
    main.run(|bql| {
        let nodes = bql.query_nodes();
        let over = nodes.iter().find(|n| n.name == "over").unwrap();
        assert_eq!(over.backing_chain, ["top"]);
        assert_eq!(over.parents, ["backend 'vd-top'"]);
        assert!(nodes.iter().find(|n| n.name == "top").unwrap().read_only);
    });
    write_blocks(&io, &blk, 0..2, b'C');
    drop(io);
    main.shutdown();
    qemu_img(&["check"], &over);
    let chain = contents(&over, dir.path());
    let base_bytes = contents(&base, dir.path());
    for b in 0..4 {
        let r = b * BLOCK..(b + 1) * BLOCK;
        let tag = if b < 2 { b'C' } else { b'A' };
        assert_eq!(chain[r.clone()], pattern(tag, b)[..], "block {b}");
        assert_eq!(base_bytes[r], pattern(b'A', b)[..], "base block {b}");
    }
}
