//! Persistent dirty bitmaps in qcow2 (DESIGN §15), judged by QEMU's tools:
//! a bitmap we create is listed by `qemu-img info` and its bits are read by
//! QEMU (`qemu-nbd --bitmap` + `qemu-img map` with `x-dirty-bitmap`, and
//! `qemu-img bitmap --merge`); a bitmap `qemu-img bitmap --add` made
//! records our writes; an unclean close leaves it `in_use`, which the next
//! open reports as inconsistent; `qemu-img check` stays clean throughout;
//! hostile bitmap tables are refused without a panic.

mod common;
mod qcow2_util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockgraph::drivers::qcow2::ImageChain;
use blockgraph::{DirtyBitmapInfo, DirtyBitmapOptions, Error, NodeHandle};
use qcow2_util::{close_chain, open_chain, p, qemu_img, qemu_io, require_qemu, Env};

const MIB: u64 = 1 << 20;
const K64: u64 = 65536;
const BUDGET: Duration = Duration::from_secs(180);

/// Closes a chain the way an embedder closes a node: drain, flush to close
/// (`Drained::flush`, which stores the bitmaps), remove; then the files.
fn close_cleanly(env: &Env, chain: ImageChain) {
    for img in &chain.images {
        if img.format == "qcow2" {
            let node = img.node.clone();
            env.main
                .run(move |bql| {
                    let io = bql.main_loop().new_io_thread("closer")?;
                    let d = bql.drain(&node);
                    bql.block_on(d.flush(&io))?;
                    bql.write(|w| w.remove_node(&d))
                })
                .unwrap();
        }
    }
    for img in &chain.images {
        env.remove(&img.file).unwrap();
    }
}

/// Closes without storing the bitmaps (metadata flushed, as after a crash
/// of a program that flushed its writes): they stay `in_use`.
fn close_uncleanly(env: &Env, chain: ImageChain) {
    env.flush(chain.top()).unwrap();
    close_chain(env, chain);
}

fn bitmaps(env: &Env, node: &NodeHandle) -> Vec<DirtyBitmapInfo> {
    let node = node.clone();
    env.main.run(move |bql| node.gs(bql).dirty_bitmaps())
}

fn ranges(env: &Env, node: &NodeHandle, name: &str) -> Vec<(u64, u64)> {
    let (node, name) = (node.clone(), name.to_owned());
    env.main
        .run(move |bql| node.gs(bql).dirty_bitmap_snapshot(&name))
        .unwrap()
        .dirty_ranges()
}

fn add(
    env: &Env,
    node: &NodeHandle,
    name: &str,
    opts: DirtyBitmapOptions,
) -> blockgraph::Result<()> {
    let (node, name) = (node.clone(), name.to_owned());
    env.main
        .run(move |bql| node.gs(bql).add_dirty_bitmap(&name, opts))
}

fn info_json(img: &Path) -> serde_json::Value {
    // `-U`: also while we hold the image open (QEMU's force-share).
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p(img)])).unwrap()
}

/// QEMU's list: (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = info_json(img);
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

fn assert_check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", p(img)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
}

struct Nbd(Child);

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The dirty areas of bitmap `name` as QEMU reads them: `qemu-nbd`
/// exports the image with the bitmap, `qemu-img map` reads it through
/// `x-dirty-bitmap` (dirty areas come back as `"data": false`).
fn qemu_dirty_ranges(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = img.with_extension("sock");
    let child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            p(&sock),
            p(img),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd");
    let _nbd = Nbd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    // The socket file exists from bind(); wait until qemu-nbd accepts
    // (`-t` keeps it serving after this probe disconnects).
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        p(&sock)
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"].as_bool() == Some(false) {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match dirty.last_mut() {
                Some((a, b)) if *a + *b == s => *b += l,
                _ => dirty.push((s, l)),
            }
        }
    }
    dirty
}

fn create(img: &Path, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        p(img),
        size,
    ]);
}

/// A new qcow2 image `file` of `size` in a temporary folder, which lives
/// as long as the returned `TempDir`.
fn new_image(file: &str, size: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(file);
    create(&img, size);
    (dir, img)
}

/// Opens the chain of `img` and names its top node.
fn open_top(env: &Env, img: &Path, writable: bool) -> (ImageChain, NodeHandle) {
    let chain = open_chain(env, img, writable);
    let top = chain.top().clone();
    (chain, top)
}

/// Writes through the qcow2 node (an `IoRef`: a job's or a test's direct
/// I/O; backends mark the same way).
fn write(env: &Env, node: &NodeHandle, writes: &[(u64, usize)]) {
    for &(off, len) in writes {
        env.write(node, off, vec![0x5a; len]).unwrap();
    }
}

#[test]
fn a_bitmap_we_create_is_listed_and_read_back_by_qemu() {
    require_qemu();
    let _w = common::watchdog("we_create", BUDGET);
    let (_dir, img) = new_image("a.qcow2", "64M");
    let env = Env::new();
    let (chain, node) = open_top(&env, &img, true);
    add(
        &env,
        &node,
        "b0",
        DirtyBitmapOptions::new().persistent(true),
    )
    .unwrap();
    add(
        &env,
        &node,
        "b1",
        DirtyBitmapOptions::new().persistent(true).granularity(4096),
    )
    .unwrap();
    add(&env, &node, "temp", DirtyBitmapOptions::new()).unwrap();
    write(
        &env,
        &node,
        &[(MIB, 4096), (10 * MIB + 100, 100), (63 * MIB, 4096)],
    );
    env.write_zeroes(&node, 20 * MIB, 2 * K64).unwrap();
    // b1 stops recording: stored without the `auto` flag.
    let n = node.clone();
    env.main
        .run(move |bql| n.gs(bql).disable_dirty_bitmap("b1"))
        .unwrap();
    write(&env, &node, &[(30 * MIB, 512)]);
    let b0 = ranges(&env, &node, "b0");
    assert_eq!(
        b0,
        vec![
            (MIB, K64),
            (10 * MIB, K64),
            (20 * MIB, 2 * K64),
            (30 * MIB, K64),
            (63 * MIB, K64)
        ]
    );
    close_cleanly(&env, chain);

    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), K64, vec!["auto".to_owned()]),
            ("b1".to_owned(), 4096, vec![]),
        ],
        "non-persistent bitmaps are not stored"
    );
    assert_check_clean(&img);
    assert_eq!(qemu_dirty_ranges(&img, "b0"), b0);
    assert_eq!(
        qemu_dirty_ranges(&img, "b1"),
        vec![
            (MIB, 4096),
            (10 * MIB, 4096),
            (20 * MIB, 2 * K64),
            (63 * MIB, 4096)
        ]
    );
    // QEMU's own tools read and write them: merge b1 into a new bitmap.
    qemu_img(&["bitmap", "--add", "-g", "4096", p(&img), "copy"]);
    qemu_img(&["bitmap", "--merge", "b1", p(&img), "copy"]);
    assert_check_clean(&img);

    // And we read back what QEMU wrote (a restart of a backup chain).
    let (chain, node) = open_top(&env, &img, true);
    let infos = bitmaps(&env, &node);
    let names: Vec<_> = infos
        .iter()
        .map(|b| (b.name.as_str(), b.enabled, b.persistent, b.inconsistent))
        .collect();
    assert_eq!(
        names,
        vec![
            ("b0", true, true, false),
            ("b1", false, true, false),
            ("copy", true, true, false)
        ]
    );
    assert_eq!(ranges(&env, &node, "b0"), b0);
    assert_eq!(
        ranges(&env, &node, "copy"),
        ranges(&env, &node, "b1"),
        "QEMU's merge of our bits, read by us"
    );
    close_cleanly(&env, chain);
    assert_check_clean(&img);
}

#[test]
fn a_bitmap_qemu_made_records_our_writes() {
    require_qemu();
    let _w = common::watchdog("qemu_made", BUDGET);
    let (_dir, img) = new_image("q.qcow2", "32M");
    qemu_io(&img, "write -P 1 0 128k");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", p(&img), "off"]);
    let env = Env::new();
    let (chain, node) = open_top(&env, &img, true);
    let infos = bitmaps(&env, &node);
    assert_eq!(infos.len(), 2);
    assert!(infos[0].enabled && infos[0].persistent && infos[0].count == 0);
    assert!(!infos[1].enabled);
    write(&env, &node, &[(2 * MIB, 4096)]);
    env.write_zeroes(&node, 5 * MIB, K64).unwrap();
    env.discard(&node, 8 * MIB, K64).unwrap();
    // Storing twice (a flush to close, more writes, the close) is fine.
    let n = node.clone();
    env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        n.io(&g).flush_to_close().await
    })
    .unwrap();
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), K64, vec!["auto".to_owned()]),
            ("off".to_owned(), K64, vec![])
        ],
        "stored and consistent while still open"
    );
    write(&env, &node, &[(12 * MIB, 1)]);
    let expect = vec![
        (2 * MIB, K64),
        (5 * MIB, K64),
        (8 * MIB, K64),
        (12 * MIB, K64),
    ];
    assert_eq!(ranges(&env, &node, "b0"), expect);
    close_cleanly(&env, chain);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), K64, vec!["auto".to_owned()]),
            ("off".to_owned(), K64, vec![])
        ]
    );
    assert_check_clean(&img);
    assert_eq!(qemu_dirty_ranges(&img, "b0"), expect);
    assert!(qemu_dirty_ranges(&img, "off").is_empty());
}

#[test]
fn an_unclean_close_leaves_the_bitmap_inconsistent_until_removed() {
    require_qemu();
    let _w = common::watchdog("unclean", BUDGET);
    let (_dir, img) = new_image("u.qcow2", "16M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    let env = Env::new();
    let (chain, node) = open_top(&env, &img, true);
    write(&env, &node, &[(0, 4096)]);
    close_uncleanly(&env, chain);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![(
            "b0".to_owned(),
            K64,
            vec!["in-use".to_owned(), "auto".to_owned()]
        )]
    );

    // The next open reports it inconsistent and refuses to use it.
    let (chain, node) = open_top(&env, &img, true);
    let b = &bitmaps(&env, &node)[0];
    assert!(b.inconsistent && !b.enabled && b.persistent && b.count == 0);
    let nodes = env.main.run(|bql| bql.query_nodes());
    let listed = nodes
        .iter()
        .find(|n| n.name == node.name())
        .unwrap()
        .dirty_bitmaps
        .clone();
    assert!(listed[0].inconsistent, "queries report it");
    let n = node.clone();
    let refused = env.main.run(move |bql| {
        let g = n.gs(bql);
        [
            g.enable_dirty_bitmap("b0"),
            g.clear_dirty_bitmap("b0"),
            g.dirty_bitmap_snapshot("b0").map(drop),
            g.set_dirty_bitmap_busy("b0", true),
        ]
    });
    for r in refused {
        assert!(matches!(r, Err(Error::BitmapInconsistent(_))), "{r:?}");
    }
    // Writes and a clean close keep it as it is (QEMU keeps it too).
    write(&env, &node, &[(MIB, 4096)]);
    close_cleanly(&env, chain);
    assert_eq!(qemu_bitmaps(&img)[0].2, vec!["in-use", "auto"]);
    assert_check_clean(&img);

    // Removed through us: gone from the image, its clusters freed.
    let (chain, n) = open_top(&env, &img, true);
    env.main
        .run(move |bql| n.gs(bql).remove_dirty_bitmap("b0"))
        .unwrap();
    close_cleanly(&env, chain);
    assert!(qemu_bitmaps(&img).is_empty());
    assert_check_clean(&img);
    let v = info_json(&img);
    assert!(v["format-specific"]["data"]["bitmaps"].is_null());
}

#[test]
fn bitmaps_survive_a_restart_and_an_unchanged_close_writes_nothing() {
    require_qemu();
    let _w = common::watchdog("restart", BUDGET);
    let (_dir, img) = new_image("r.qcow2", "16M");
    let env = Env::new();
    let (chain, node) = open_top(&env, &img, true);
    add(
        &env,
        &node,
        "inc0",
        DirtyBitmapOptions::new().persistent(true).granularity(512),
    )
    .unwrap();
    write(&env, &node, &[(4096, 1), (15 * MIB, 4096)]);
    close_cleanly(&env, chain);
    let before = std::fs::read(&img).unwrap();

    // Open writable, change nothing, close: the file is byte-identical.
    let (chain, node) = open_top(&env, &img, true);
    assert_eq!(
        ranges(&env, &node, "inc0"),
        vec![(4096, 512), (15 * MIB, 4096)]
    );
    close_cleanly(&env, chain);
    assert_eq!(std::fs::read(&img).unwrap(), before);

    // Read-only: loaded, never stored.
    let (chain, node) = open_top(&env, &img, false);
    assert_eq!(bitmaps(&env, &node)[0].name, "inc0");
    close_cleanly(&env, chain);
    assert_eq!(std::fs::read(&img).unwrap(), before);

    // Cleared through us, the clear survives too.
    let (chain, n) = open_top(&env, &img, true);
    env.main
        .run(move |bql| n.gs(bql).clear_dirty_bitmap("inc0"))
        .unwrap();
    close_cleanly(&env, chain);
    assert!(qemu_dirty_ranges(&img, "inc0").is_empty());
    assert_check_clean(&img);
}

#[test]
fn shutdown_stores_the_bitmaps() {
    require_qemu();
    let _w = common::watchdog("shutdown", BUDGET);
    let (_dir, img) = new_image("s.qcow2", "8M");
    {
        let env = Env::new();
        let (_chain, node) = open_top(&env, &img, true);
        add(&env, &node, "b", DirtyBitmapOptions::new().persistent(true)).unwrap();
        write(&env, &node, &[(K64, 1)]);
        // Env's drop shuts the main loop down with the image open.
    }
    assert_eq!(
        qemu_bitmaps(&img),
        vec![("b".to_owned(), K64, vec!["auto".to_owned()])]
    );
    assert_check_clean(&img);
    assert_eq!(qemu_dirty_ranges(&img, "b"), vec![(K64, K64)]);
}

/// Byte offset of the first bitmap's table entry 0 in `img`.
fn first_table_entry(img: &[u8]) -> usize {
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    let mut pos = be32(100) as usize;
    loop {
        let (ty, len) = (be32(pos), be32(pos + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            let dir = be64(pos + 8 + 16) as usize;
            return be64(dir) as usize;
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn hostile_bitmap_tables_are_refused_without_a_panic() {
    require_qemu();
    let _w = common::watchdog("hostile", BUDGET);
    let (_dir, img) = new_image("h.qcow2", "8M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    // qemu-io tracks the write in b0 and stores it: a data cluster.
    qemu_io(&img, "write 0 4k");
    let good = std::fs::read(&img).unwrap();
    let at = first_table_entry(&good);
    let env = Env::new();
    for (what, entry) in [
        ("past the end of the file", 0x00ff_ffff_ffff_0000u64),
        ("reserved bits", 0x0100_0000_0001_0000),
        ("unaligned", 0x0000_0000_0001_0200),
        ("all-ones flag with an offset", 0x0000_0000_0001_0001),
    ] {
        let mut bad = good.clone();
        bad[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        std::fs::write(&img, &bad).unwrap();
        let node = env.mem_node(bad.clone(), bad.len());
        let r = env.open(&node, None, Default::default());
        assert!(
            matches!(r, Err(Error::InvalidImage { .. })),
            "{what}: {r:?}"
        );
        env.remove(&node).unwrap();
    }
    // The all-ones entry without an offset is valid: every bit set.
    let mut ones = good.clone();
    ones[at..at + 8].copy_from_slice(&1u64.to_be_bytes());
    let file = env.mem_node(ones.clone(), ones.len());
    let node = env.open(&file, None, Default::default()).unwrap();
    assert_eq!(ranges(&env, &node, "b0"), vec![(0, 8 * MIB)]);
}
