//! Internal snapshots against QEMU's own tools: what `qemu-img snapshot`
//! makes we list, apply and delete; what we make `qemu-img` lists, applies
//! and checks clean. After every operation `qemu-img check` finds no error
//! and no leak (refcounts exact), and `qemu-img compare` shows that an
//! applied snapshot reads as the disk did when it was taken.

mod common;
mod qcow2_util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockgraph::drivers::qcow2::{open_image_chain, ChainOptions, SnapshotInfo};
use blockgraph::drivers::{
    qcow2::{Qcow2Driver, Qcow2Options},
    FileDriver, FileOptions,
};
use blockgraph::{Error, NodeHandle};
use qcow2_util::{p, qemu_img, qemu_io, require_qemu, Env, Rng};

const BUDGET: Duration = Duration::from_secs(240);

#[derive(Clone)]
enum Op {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// Runs one snapshot operation on the image at `path` through a file node
/// of its own, then removes the node (closing and unlocking the file).
fn snap(env: &Env, path: &Path, op: Op) -> Result<Vec<SnapshotInfo>, Error> {
    let write = !matches!(op, Op::List);
    let file = FileDriver::open(
        path,
        FileOptions {
            read_only: !write,
            ..FileOptions::default()
        },
    )?;
    let name = env.name("file");
    let node: NodeHandle = env
        .main
        .run(move |bql| bql.write(|w| w.add_node(&name, file, &[])))?;
    let n = node.clone();
    let r = env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        let f = n.io(&g);
        let o = Qcow2Options::default();
        match op {
            Op::List => Qcow2Driver::list_snapshots(f, o).await,
            Op::Create(name) => Qcow2Driver::create_snapshot(f, o, &name)
                .await
                .map(|i| vec![i]),
            Op::Apply(k) => Qcow2Driver::apply_snapshot(f, o, &k)
                .await
                .map(|()| Vec::new()),
            Op::Delete(k) => Qcow2Driver::delete_snapshot(f, o, &k)
                .await
                .map(|()| Vec::new()),
        }
    });
    env.remove(&node).unwrap();
    r
}

fn create(env: &Env, path: &Path, name: &str) -> SnapshotInfo {
    snap(env, path, Op::Create(name.into()))
        .unwrap_or_else(|e| panic!("creating snapshot {name}: {e}"))
        .remove(0)
}

fn apply(env: &Env, path: &Path, key: &str) {
    snap(env, path, Op::Apply(key.into()))
        .unwrap_or_else(|e| panic!("applying snapshot {key}: {e}"));
}

fn delete(env: &Env, path: &Path, key: &str) {
    snap(env, path, Op::Delete(key.into()))
        .unwrap_or_else(|e| panic!("deleting snapshot {key}: {e}"));
}

fn list(env: &Env, path: &Path) -> Vec<SnapshotInfo> {
    snap(env, path, Op::List).unwrap_or_else(|e| panic!("listing snapshots: {e}"))
}

/// `qemu-img check` finds nothing wrong: no corruption, no leak.
fn assert_clean(path: &Path) {
    let out = qemu_img(&["check", p(path)]);
    assert!(
        out.contains("No errors were found on the image."),
        "{}:\n{out}",
        path.display()
    );
}

/// The guest disk as QEMU reads it now, saved as a raw file.
fn save_raw(path: &Path, raw: &Path) {
    qemu_img(&["convert", "-O", "raw", p(path), p(raw)]);
}

fn assert_same_content(path: &Path, raw: &Path) {
    let out = qemu_img(&["compare", "-F", "raw", p(path), p(raw)]);
    assert!(out.contains("Images are identical."), "{out}");
}

/// The snapshots as `qemu-img info --output=json` lists them:
/// (id, name, date-sec, date-nsec, vm-state-size).
fn qemu_snapshots(path: &Path) -> Vec<(String, String, u64, u64, u64)> {
    let out = qemu_img(&["info", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.get("snapshots")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_owned(),
                        s["name"].as_str().unwrap().to_owned(),
                        s["date-sec"].as_u64().unwrap(),
                        s["date-nsec"].as_u64().unwrap(),
                        s["vm-state-size"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn ours_as_qemu(snaps: &[SnapshotInfo]) -> Vec<(String, String, u64, u64, u64)> {
    snaps
        .iter()
        .map(|s| {
            (
                s.id.clone(),
                s.name.clone(),
                u64::from(s.date_sec),
                u64::from(s.date_nsec),
                s.vm_state_size,
            )
        })
        .collect()
}

fn new_image(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&["create", "-f", "qcow2", "-o", opts, p(&path), size]);
    path
}

#[test]
fn snapshots_qemu_made_are_listed_applied_and_deleted_exactly() {
    let _w = common::watchdog("qemu_made", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = new_image(d, "q.qcow2", "cluster_size=4096", "8M");
    qemu_io(&img, "write -P 0x11 0 1M");
    qemu_io(&img, "write -c -P 0x12 4M 64k");
    qemu_img(&["snapshot", "-c", "first", p(&img)]);
    save_raw(&img, &d.join("first.raw"));
    qemu_io(&img, "write -P 0x21 512k 1M");
    qemu_io(&img, "write -z 6M 256k");
    qemu_img(&["snapshot", "-c", "second", p(&img)]);
    save_raw(&img, &d.join("second.raw"));
    qemu_io(&img, "write -P 0x31 0 64k");
    qemu_io(&img, "discard 4M 64k");
    save_raw(&img, &d.join("last.raw"));

    let ours = list(&env, &img);
    assert_eq!(ours_as_qemu(&ours), qemu_snapshots(&img));
    assert_eq!(ours[0].disk_size, Some(8 << 20));

    apply(&env, &img, "first");
    assert_clean(&img);
    assert_same_content(&img, &d.join("first.raw"));
    apply(&env, &img, "2"); // by id
    assert_clean(&img);
    assert_same_content(&img, &d.join("second.raw"));
    delete(&env, &img, "first");
    assert_clean(&img);
    assert_eq!(ours_as_qemu(&list(&env, &img)), qemu_snapshots(&img));
    assert_same_content(&img, &d.join("second.raw"));
    delete(&env, &img, "second");
    assert_clean(&img);
    assert!(qemu_snapshots(&img).is_empty());
    assert_same_content(&img, &d.join("second.raw"));
    // Without snapshots the image is writable again, and stays exact.
    qemu_io(&img, "write -P 0x41 0 2M");
    assert_clean(&img);
    let e = snap(&env, &img, Op::Apply("first".into())).unwrap_err();
    assert!(e.to_string().contains("no snapshot"), "{e}");
}

#[test]
fn snapshots_we_make_are_what_qemu_img_lists_applies_and_checks() {
    let _w = common::watchdog("ours", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, opts) in [
        "cluster_size=65536",
        "compat=0.10,cluster_size=4096",
        "refcount_bits=64,cluster_size=512",
        "refcount_bits=8,lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let img = new_image(d, &format!("o{i}.qcow2"), opts, "4M");
        qemu_io(&img, "write -P 0x51 0 768k");
        if !opts.contains("0.10") {
            qemu_io(&img, "write -z 1M 128k");
        }
        qemu_io(&img, "write -c -P 0x52 2M 64k");
        let a = create(&env, &img, "a");
        assert_eq!((a.id.as_str(), a.name.as_str()), ("1", "a"));
        assert_clean(&img);
        save_raw(&img, &d.join("a.raw"));
        assert_eq!(ours_as_qemu(&list(&env, &img)), qemu_snapshots(&img));

        // QEMU writes over the shared clusters (copy on write: ours must
        // have cleared the copied flags) and takes a snapshot of its own.
        qemu_io(&img, "write -P 0x61 64k 256k");
        qemu_io(&img, "write -P 0x62 3M 64k");
        assert_clean(&img);
        qemu_img(&["snapshot", "-c", "b", p(&img)]);
        save_raw(&img, &d.join("b.raw"));
        let c = create(&env, &img, "c");
        assert_eq!(c.id, "3");
        assert_clean(&img);
        qemu_io(&img, "write -P 0x71 0 4M");
        assert_clean(&img);

        // QEMU applies ours; we apply QEMU's; both read back.
        qemu_img(&["snapshot", "-a", "a", p(&img)]);
        assert_clean(&img);
        assert_same_content(&img, &d.join("a.raw"));
        apply(&env, &img, "b");
        assert_clean(&img);
        assert_same_content(&img, &d.join("b.raw"));
        qemu_img(&["snapshot", "-d", "c", p(&img)]);
        assert_clean(&img);
        delete(&env, &img, "a");
        assert_clean(&img);
        assert_eq!(ours_as_qemu(&list(&env, &img)), qemu_snapshots(&img));
        assert_eq!(list(&env, &img).len(), 1);
        delete(&env, &img, "b");
        assert_clean(&img);
        assert_same_content(&img, &d.join("b.raw"));
    }
}

/// A random sequence of guest writes and snapshot operations, checked by
/// `qemu-img check` and against saved contents after every step.
#[test]
fn random_snapshot_operations_keep_refcounts_exact() {
    let _w = common::watchdog("random", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = new_image(d, "r.qcow2", "cluster_size=4096", "2M");
    let mut rng = Rng::new(7);
    // (name, saved content) of the snapshots that exist.
    let mut live: Vec<(String, PathBuf)> = Vec::new();
    let mut current = d.join("empty.raw");
    save_raw(&img, &current);
    let mut done = [0usize; 4];
    for step in 0..60 {
        let op = rng.below(5) as usize;
        match op {
            0 | 1 => {
                let off = rng.below(512) * 4096;
                let len = (rng.below(64) + 1) * 1024;
                let pat = rng.below(255) + 1;
                // Guest writes (copy on write once snapshots exist), by
                // QEMU or by us.
                if rng.below(2) == 0 {
                    qemu_io(&img, &format!("write -P {pat} {off} {len}"));
                } else {
                    let data = vec![pat as u8; len as usize];
                    write_through_us(&env, &img, vec![(off, data)], Vec::new(), Vec::new());
                }
                done[0] += 1;
                current = d.join(format!("s{step}.raw"));
                save_raw(&img, &current);
            }
            2 => {
                let name = format!("snap{step}");
                create(&env, &img, &name);
                done[1] += 1;
                live.push((name, current.clone()));
            }
            3 if !live.is_empty() => {
                let (name, raw) = live[rng.below(live.len() as u64) as usize].clone();
                apply(&env, &img, &name);
                done[2] += 1;
                current = raw;
            }
            _ if !live.is_empty() => {
                let (name, _) = live.remove(rng.below(live.len() as u64) as usize);
                delete(&env, &img, &name);
                done[3] += 1;
            }
            _ => {}
        }
        assert_clean(&img);
        assert_same_content(&img, &current);
        let names: Vec<String> = list(&env, &img).into_iter().map(|s| s.name).collect();
        let want: Vec<String> = live.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, want, "step {step}");
    }
    assert!(
        done.iter().all(|&n| n >= 3),
        "writes, creates, applies, deletes: {done:?}"
    );
    for (name, raw) in live.clone() {
        apply(&env, &img, &name);
        assert_clean(&img);
        assert_same_content(&img, &raw);
    }
}

#[test]
fn apply_restores_the_size_the_disk_had() {
    let _w = common::watchdog("size", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = new_image(d, "g.qcow2", "cluster_size=65536", "1M");
    qemu_io(&img, "write -P 7 0 64k");
    create(&env, &img, "small");
    save_raw(&img, &d.join("small.raw"));
    qemu_img(&["resize", p(&img), "600M"]);
    qemu_io(&img, "write -P 8 590M 64k");
    assert_clean(&img);
    apply(&env, &img, "small");
    assert_clean(&img);
    assert_same_content(&img, &d.join("small.raw"));
    let info = qemu_img(&["info", "--output=json", p(&img)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(1 << 20));
}

#[test]
fn refused_operations_change_nothing() {
    let _w = common::watchdog("refused", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1-bit refcounts cannot count a second reference: refused up front
    // (QEMU fails half way and leaks a cluster).
    let one = new_image(d, "one.qcow2", "refcount_bits=1", "1M");
    qemu_io(&one, "write 0 64k");
    let before = std::fs::read(&one).unwrap();
    let e = snap(&env, &one, Op::Create("x".into())).unwrap_err();
    assert!(e.to_string().contains("1-bit refcounts"), "{e}");
    assert_eq!(std::fs::read(&one).unwrap(), before);
    assert_clean(&one);

    // Duplicate names, unknown snapshots, empty names.
    let img = new_image(d, "n.qcow2", "cluster_size=65536", "1M");
    qemu_io(&img, "write 0 64k");
    create(&env, &img, "same");
    let before = std::fs::read(&img).unwrap();
    for op in [
        Op::Create("same".into()),
        Op::Create(String::new()),
        Op::Apply("nope".into()),
        Op::Delete("nope".into()),
    ] {
        assert!(snap(&env, &img, op).is_err());
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);

    // A dirty image with snapshots: the repair on a writable open follows
    // the snapshots' tables, so it is repaired and the snapshot is made.
    let mut bytes = before.clone();
    bytes[79] |= 1; // incompatible features: dirty
    std::fs::write(&img, &bytes).unwrap();
    assert_eq!(list(&env, &img).len(), 1); // listing needs no write
    snap(&env, &img, Op::Create("other".into())).unwrap();
    assert_eq!(list(&env, &img).len(), 2);
    assert_clean(&img);
}

#[test]
fn hostile_snapshot_tables_are_errors_not_panics() {
    let _w = common::watchdog("hostile", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = new_image(d, "h.qcow2", "cluster_size=65536", "1M");
    qemu_io(&img, "write 0 64k");
    qemu_img(&["snapshot", "-c", "s", p(&img)]);
    let good = std::fs::read(&img).unwrap();
    let table = u64::from_be_bytes(good[64..72].try_into().unwrap()) as usize;
    // (what, where, the bytes written there)
    let cases: Vec<(&str, usize, Vec<u8>)> = vec![
        (
            "more entries than the file holds",
            60,
            60000u32.to_be_bytes().to_vec(),
        ),
        (
            "L1 table outside the file",
            table,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("absurd L1 size", table + 8, u32::MAX.to_be_bytes().to_vec()),
        (
            "absurd extra data",
            table + 36,
            u32::MAX.to_be_bytes().to_vec(),
        ),
    ];
    for (what, at, bytes) in cases {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(&bytes);
        std::fs::write(&img, &b).unwrap();
        for op in [Op::List, Op::Apply("s".into()), Op::Delete("s".into())] {
            let r = snap(&env, &img, op);
            assert!(r.is_err(), "{what}: accepted");
        }
        assert_eq!(std::fs::read(&img).unwrap(), b, "{what}: changed");
    }
}

/// Writes through our driver to the image at `path` (writable, with its
/// backing chain): `(offset, data)` writes, then zeroes and discards, then
/// a flush; the nodes are removed again.
fn write_through_us(
    env: &Env,
    path: &Path,
    writes: Vec<(u64, Vec<u8>)>,
    zeroes: Vec<(u64, u64)>,
    discards: Vec<(u64, u64)>,
) {
    let path = path.to_path_buf();
    let name = env.name("img");
    let chain = env
        .on_io(move |mut cx| async move {
            let opts = ChainOptions::new(name);
            open_image_chain(&mut cx, &path, opts).await
        })
        .unwrap_or_else(|e| panic!("opening writable: {e}"));
    let top = chain.top().clone();
    for (off, data) in writes {
        env.write(&top, off, data).unwrap();
    }
    for (off, len) in zeroes {
        env.write_zeroes(&top, off, len).unwrap();
    }
    for (off, len) in discards {
        env.discard(&top, off, len).unwrap();
    }
    env.flush(&top).unwrap();
    for img in &chain.images {
        if img.format == "qcow2" {
            env.remove(&img.node).unwrap();
        }
    }
    for img in &chain.images {
        env.remove(&img.file).unwrap();
    }
}

/// Guest writes, write-zeroes and discards through our driver on an image
/// whose clusters and L2 tables snapshots share: the shared clusters are
/// copied, never changed, so every snapshot still reads as it did, the
/// active layer reads what was written, and refcounts stay exact.
#[test]
fn guest_writes_copy_what_snapshots_share() {
    let _w = common::watchdog("cow", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for opts in [
        "cluster_size=4096",
        "cluster_size=65536,compat=0.10",
        "cluster_size=512,refcount_bits=64",
    ] {
        let img = new_image(d, "w.qcow2", opts, "3M");
        qemu_io(&img, "write -P 0x11 0 1M");
        qemu_io(&img, "write -c -P 0x12 2M 64k");
        create(&env, &img, "ours");
        save_raw(&img, &d.join("ours.raw"));
        qemu_io(&img, "write -P 0x13 512k 256k");
        qemu_img(&["snapshot", "-c", "theirs", p(&img)]);
        save_raw(&img, &d.join("theirs.raw"));

        let mut model = std::fs::read(d.join("theirs.raw")).unwrap();
        let mut rng = Rng::new(opts.len() as u64);
        let mut writes = Vec::new();
        for _ in 0..40 {
            let off = rng.below(3 << 20);
            let len = (rng.below(96 << 10) + 1).min((3 << 20) - off);
            let data = rng.bytes(len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            writes.push((off, data));
        }
        let v3 = !opts.contains("0.10");
        let (zeroes, discards) = if v3 {
            model[(1 << 20)..(1 << 20) + (128 << 10)].fill(0);
            model[(2 << 20)..(2 << 20) + (64 << 10)].fill(0);
            (vec![(1 << 20, 128 << 10)], vec![(2 << 20, 64 << 10)])
        } else {
            model[(1 << 20)..(1 << 20) + (128 << 10)].fill(0);
            (vec![(1 << 20, 128 << 10)], Vec::new())
        };
        write_through_us(&env, &img, writes, zeroes, discards);
        assert_clean(&img);
        std::fs::write(d.join("model.raw"), &model).unwrap();
        assert_same_content(&img, &d.join("model.raw"));

        // Each snapshot still reads as when it was taken.
        for name in ["ours", "theirs"] {
            let copy = d.join(format!("{name}.qcow2"));
            std::fs::copy(&img, &copy).unwrap();
            apply(&env, &copy, name);
            assert_clean(&copy);
            assert_same_content(&copy, &d.join(format!("{name}.raw")));
            // And once QEMU applies it.
            std::fs::copy(&img, &copy).unwrap();
            qemu_img(&["snapshot", "-a", name, p(&copy)]);
            assert_same_content(&copy, &d.join(format!("{name}.raw")));
        }
        // Deleting the snapshots leaves only what the active layer uses.
        delete(&env, &img, "ours");
        delete(&env, &img, "theirs");
        assert_clean(&img);
        assert_same_content(&img, &d.join("model.raw"));
        std::fs::remove_file(&img).unwrap();
    }
}

/// Snapshots of an overlay: unallocated clusters stay unallocated (they
/// read from the backing file in the snapshot too), and writes through the
/// chain copy what the snapshot shares.
#[test]
fn snapshots_of_an_overlay_keep_reading_through_the_backing_file() {
    let _w = common::watchdog("overlay", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = new_image(d, "base.qcow2", "cluster_size=65536", "2M");
    qemu_io(&base, "write -P 0x33 0 2M");
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io(&top, "write -P 0x44 64k 64k");
    create(&env, &top, "s");
    save_raw(&top, &d.join("s.raw"));
    let mut model = std::fs::read(d.join("s.raw")).unwrap();
    let mut rng = Rng::new(11);
    let mut writes = Vec::new();
    for _ in 0..20 {
        let off = rng.below(2 << 20);
        let len = (rng.below(20 << 10) + 1).min((2 << 20) - off);
        let data = rng.bytes(len as usize);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        writes.push((off, data));
    }
    write_through_us(&env, &top, writes, Vec::new(), Vec::new());
    assert_clean(&top);
    std::fs::write(d.join("model.raw"), &model).unwrap();
    assert_same_content(&top, &d.join("model.raw"));
    apply(&env, &top, "s");
    assert_clean(&top);
    assert_same_content(&top, &d.join("s.raw"));
    assert_clean(&base);
}

/// Writes from two I/O threads at once into L2 tables a snapshot shares:
/// each table is copied once, no write is lost, refcounts stay exact.
#[test]
fn concurrent_writes_into_shared_tables() {
    let _w = common::watchdog("concurrent", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = new_image(d, "c.qcow2", "cluster_size=4096", "4M");
    qemu_io(&img, "write -P 0x55 0 4M");
    create(&env, &img, "s");
    save_raw(&img, &d.join("s.raw"));
    let path = img.clone();
    let name = env.name("img");
    let chain = env
        .on_io(move |mut cx| async move {
            open_image_chain(&mut cx, &path, ChainOptions::new(name)).await
        })
        .unwrap();
    let top = chain.top().clone();
    // Thread t writes 2 KiB pieces at 4 KiB * (2k + t) + 1 KiB, k < 512:
    // every cluster is copied by one writer, tables by whichever comes first.
    let tasks: Vec<_> = [&env.io, &env.io2]
        .iter()
        .enumerate()
        .map(|(t, thread)| {
            let top = top.clone();
            thread.spawn(move |mut cx| async move {
                for k in 0..512u64 {
                    let off = 4096 * (2 * k + t as u64) + 1024;
                    let g = cx.read().await;
                    top.io(&g).write(off, &[t as u8 + 1; 2048]).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for t in tasks {
        common::join(t, "writer").unwrap();
    }
    env.flush(&top).unwrap();
    for i in &chain.images {
        env.remove(&i.node).unwrap();
    }
    for i in &chain.images {
        env.remove(&i.file).unwrap();
    }
    assert_clean(&img);
    let mut model = vec![0x55u8; 4 << 20];
    for k in 0..1024usize {
        let off = 4096 * k + 1024;
        model[off..off + 2048].fill((k % 2) as u8 + 1);
    }
    std::fs::write(d.join("model.raw"), &model).unwrap();
    assert_same_content(&img, &d.join("model.raw"));
    apply(&env, &img, "s");
    assert_clean(&img);
    assert_same_content(&img, &d.join("s.raw"));
}

/// Applying a snapshot changes guest data, so persistent bitmaps stop
/// describing it: they are marked in use first (as our guest writes do),
/// kept, and QEMU's check stays clean.
#[test]
fn applying_a_snapshot_marks_persistent_bitmaps_in_use() {
    let _w = common::watchdog("apply_bitmaps", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), "bm.qcow2", "cluster_size=65536", "1M");
    qemu_io(&img, "write -P 1 0 64k");
    qemu_img(&["snapshot", "-c", "s", p(&img)]);
    qemu_io(&img, "write -P 2 0 64k");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    let info = qemu_img(&["info", "--output=json", p(&img)]);
    assert!(!info.contains("in-use"), "{info}");

    apply(&env, &img, "s");
    let info = qemu_img(&["info", "--output=json", p(&img)]);
    assert!(info.contains("\"b0\"") && info.contains("in-use"), "{info}");
    assert_clean(&img);
    let data = qemu_io(&img, "read -P 1 0 64k");
    assert!(!data.contains("Pattern verification failed"), "{data}");
}
