//! qcow2 fidelity with QEMU (issue 9): what QEMU writes, we keep; what QEMU
//! reports, we report.
//!
//! * Persistent dirty bitmaps (`qemu-img bitmap`): listed, counted by our
//!   check (never leaks, never freed by a repair), untouched by read-only
//!   use and by a writable open that changes nothing, and marked in use
//!   (QEMU's "inconsistent") before the first change we make.
//! * Internal snapshots (`qemu-img snapshot -c`): `check` counts every
//!   snapshot's tables, reports damage as `qemu-img check` does, and
//!   `Qcow2Driver::check_image` repairs without freeing anything a snapshot
//!   uses.
//! * Check disagreements with QEMU, each settled and judged by
//!   `qemu-img check` too.
//!
//! Every image is made by `qemu-img`/`qemu-io` and judged by them
//! afterwards. Decisions and reasons: DESIGN.md §6.

mod common;
mod qcow2_util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockgraph::drivers::qcow2::BitmapInfo;
use blockgraph::drivers::{
    qcow2::{Qcow2Driver, Qcow2Options},
    FileDriver, FileOptions,
};
use blockgraph::{BackendOptions, NodeHandle};
use qcow2_util::{close_chain, open_chain, p, qemu_img, qemu_io, require_qemu, Env};

fn our_bitmaps(env: &Env, node: &NodeHandle) -> Vec<BitmapInfo> {
    let node = node.clone();
    env.main.run(move |bql| {
        node.gs(bql)
            .driver_as::<Qcow2Driver>()
            .expect("a qcow2 node")
            .bitmaps()
    })
}

/// `qemu-img check` with its exit code and output.
fn qemu_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", p(img)])
        .output()
        .expect("run qemu-img check");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_qemu_check_clean(img: &Path) {
    let (rc, out) = qemu_check(img);
    assert!(
        rc == 0 && out.contains("No errors were found"),
        "qemu-img check (exit {rc}): {out}"
    );
}

/// QEMU's list of bitmaps: (name, granularity, flags), from the human
/// output of `qemu-img info` (no JSON parser among our dependencies).
fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = qemu_img(&["info", "-U", p(img)]);
    let mut list: Vec<(String, u64, Vec<String>)> = Vec::new();
    let mut in_bitmaps = false;
    let mut in_flags = false;
    for line in out.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if t == "bitmaps:" {
            in_bitmaps = true;
            continue;
        }
        if !in_bitmaps {
            continue;
        }
        if indent <= 4 {
            break;
        }
        if indent == 8 && t.starts_with('[') {
            list.push((String::new(), 0, Vec::new()));
            in_flags = false;
        } else if t == "flags:" {
            in_flags = true;
        } else if let Some(v) = t.strip_prefix("name: ") {
            list.last_mut().unwrap().0 = v.to_owned();
            in_flags = false;
        } else if let Some(v) = t.strip_prefix("granularity: ") {
            list.last_mut().unwrap().1 = v.parse().unwrap();
            in_flags = false;
        } else if in_flags && t.starts_with('[') {
            let flag = t.split_once(": ").unwrap().1;
            list.last_mut().unwrap().2.push(flag.to_owned());
        }
    }
    list
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// An image with data and two bitmaps that hold set bits (data clusters
/// of their own): `b0` (auto, 64 KiB) and `b1` (disabled, 128 KiB), both
/// consistent.
fn image_with_bitmaps(dir: &Path) -> PathBuf {
    let img = dir.join("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    qemu_io(&img, "write -P 0x11 0 1M");
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", p(&img), "b1"]);
    // Tracked by both (qemu-io enables auto bitmaps and saves them).
    qemu_io(&img, "write -P 0x22 2M 1M");
    qemu_img(&["bitmap", "--disable", p(&img), "b1"]);
    qemu_io(&img, "write -P 0x33 4M 64k");
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), 65536, strs(&["auto"])),
            ("b1".to_owned(), 131072, strs(&[])),
        ]
    );
    assert_qemu_check_clean(&img);
    img
}

fn expected_bitmaps(in_use: bool) -> Vec<BitmapInfo> {
    vec![
        BitmapInfo {
            name: "b0".into(),
            granularity: 65536,
            in_use,
            auto: true,
        },
        BitmapInfo {
            name: "b1".into(),
            granularity: 131072,
            in_use,
            auto: false,
        },
    ]
}

#[test]
fn bitmaps_are_listed_counted_and_untouched_by_read_only_use() {
    require_qemu();
    let _w = common::watchdog("bitmaps_read_only", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let before = std::fs::read(&img).unwrap();
    let env = Env::new();
    let chain = open_chain(&env, &img, false);
    assert_eq!(our_bitmaps(&env, chain.top()), expected_bitmaps(false));
    let r = env.check(chain.top(), false).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    env.read_all(chain.top()).unwrap();
    close_chain(&env, chain);
    assert_eq!(std::fs::read(&img).unwrap(), before, "the file changed");
    assert_qemu_check_clean(&img);
}

#[test]
fn writable_open_and_repair_without_changes_keep_bitmaps_consistent() {
    require_qemu();
    let _w = common::watchdog("bitmaps_writable_no_change", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let before = std::fs::read(&img).unwrap();
    let env = Env::new();
    let chain = open_chain(&env, &img, true);
    // A repair finds nothing to free: the bitmaps' clusters are references.
    let r = env.check(chain.top(), true).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    assert_eq!((r.repaired_corruptions, r.repaired_leaks), (0, 0));
    env.read_all(chain.top()).unwrap();
    env.flush(chain.top()).unwrap();
    assert_eq!(our_bitmaps(&env, chain.top()), expected_bitmaps(false));
    close_chain(&env, chain);
    assert_eq!(std::fs::read(&img).unwrap(), before, "the file changed");
    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), 65536, strs(&["auto"])),
            ("b1".to_owned(), 131072, strs(&[])),
        ]
    );
}

#[test]
fn our_writes_mark_bitmaps_in_use_and_qemu_check_stays_clean() {
    require_qemu();
    let _w = common::watchdog("bitmaps_writes", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let env = Env::new();
    let chain = open_chain(&env, &img, true);
    env.write(chain.top(), 8 << 20, vec![0x44; 128 << 10])
        .unwrap();
    env.write_zeroes(chain.top(), 0, 64 << 10).unwrap();
    env.flush(chain.top()).unwrap();
    assert_eq!(our_bitmaps(&env, chain.top()), expected_bitmaps(true));
    let r = env.check(chain.top(), false).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let ours = env.read_all(chain.top()).unwrap();
    close_chain(&env, chain);

    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), 65536, strs(&["in-use", "auto"])),
            ("b1".to_owned(), 131072, strs(&["in-use"])),
        ]
    );
    let raw = dir.path().join("want.raw");
    std::fs::write(&raw, &ours).unwrap();
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(&img), p(&raw)]);
    assert!(out.contains("Images are identical"), "{out}");

    // Reopened by us: still listed, still in use; QEMU can remove them and
    // the image stays clean.
    let chain = open_chain(&env, &img, false);
    assert_eq!(our_bitmaps(&env, chain.top()), expected_bitmaps(true));
    close_chain(&env, chain);
    qemu_img(&["bitmap", "--remove", p(&img), "b0"]);
    qemu_img(&["bitmap", "--remove", p(&img), "b1"]);
    assert!(qemu_bitmaps(&img).is_empty());
    assert_qemu_check_clean(&img);
}

#[test]
fn our_resize_marks_bitmaps_in_use_and_qemu_accepts_the_image() {
    require_qemu();
    let _w = common::watchdog("bitmaps_resize", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let env = Env::new();
    let chain = open_chain(&env, &img, true);
    let node = chain.top().clone();
    let name = env.name("blk");
    let blk = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend(&name, &node, BackendOptions::resizable())))
        .unwrap();
    let b = blk.clone();
    env.on_io(move |mut cx| async move { b.truncate(&mut cx, 64 << 20).await })
        .unwrap();
    let b = blk.clone();
    env.on_io(move |mut cx| async move { b.flush(&mut cx).await })
        .unwrap();
    assert_eq!(our_bitmaps(&env, chain.top()), expected_bitmaps(true));
    env.main
        .run(move |bql| bql.write(|w| w.remove_backend(&blk)))
        .unwrap();
    close_chain(&env, chain);
    assert_qemu_check_clean(&img);
    // In use, their tables sized for 16 MiB: QEMU accepts them as stale.
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), 65536, strs(&["in-use", "auto"])),
            ("b1".to_owned(), 131072, strs(&["in-use"])),
        ]
    );
    assert!(qemu_img(&["info", p(&img)]).contains("64 MiB"));
}

/// Sets or clears bit `bit` of the big-endian 64-bit header field at `at`.
fn set_header_bit(img: &Path, at: usize, bit: u32, on: bool) {
    let mut b = std::fs::read(img).unwrap();
    let mut v = u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    if on {
        v |= 1 << bit;
    } else {
        v &= !(1 << bit);
    }
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(img, b).unwrap();
}

/// The number `N` of `qemu-img check`'s line "N <what>" (0 when absent).
fn qemu_count(out: &str, what: &str) -> u64 {
    out.lines()
        .find(|l| l.contains(what))
        .and_then(|l| l.split_whitespace().next())
        .map_or(0, |n| n.parse().unwrap())
}

/// The number in "N leaked clusters were found" (0 when absent).
fn qemu_leaks(out: &str) -> u64 {
    qemu_count(out, "leaked clusters were found")
}

#[test]
fn stale_bitmaps_extension_is_ignored_and_its_clusters_are_leaks_as_in_qemu() {
    require_qemu();
    let _w = common::watchdog("bitmaps_stale", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    // What a program that does not know bitmaps leaves: auto-clear bit 0
    // cleared, the extension still there.
    set_header_bit(&img, 88, 0, false);
    let (rc, out) = qemu_check(&img);
    assert_eq!(rc, 3, "qemu-img check: {out}");
    let qemu = qemu_leaks(&out);
    assert!(qemu > 0, "{out}");
    let env = Env::new();
    let chain = open_chain(&env, &img, false);
    assert!(our_bitmaps(&env, chain.top()).is_empty());
    let r = env.check(chain.top(), false).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, qemu), "{:?}", r.messages);
    close_chain(&env, chain);
}

#[test]
fn dirty_image_repair_on_open_keeps_bitmaps() {
    require_qemu();
    let _w = common::watchdog("bitmaps_dirty_repair", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    // Incompatible bit 0: refcounts may be stale; a writable open repairs.
    set_header_bit(&img, 72, 0, true);
    let env = Env::new();
    let chain = open_chain(&env, &img, true);
    assert_eq!(our_bitmaps(&env, chain.top()), expected_bitmaps(false));
    close_chain(&env, chain);
    assert_qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("b0".to_owned(), 65536, strs(&["auto"])),
            ("b1".to_owned(), 131072, strs(&[])),
        ]
    );
}

/// An image with two internal snapshots and clusters in every state:
/// shared by all three L1 tables, by some, and the active layer's own
/// (copied after a snapshot), plus compressed and zero clusters.
fn image_with_snapshots(dir: &Path) -> PathBuf {
    let img = dir.join("sn.qcow2");
    let src = dir.join("src.raw");
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate().take(1 << 20) {
        *b = (i / 4096) as u8 | 1;
    }
    std::fs::write(&src, &data).unwrap();
    // Compressed clusters in the first MiB.
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&src), p(&img)]);
    qemu_io(&img, "write -P 0x11 1M 1M");
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    qemu_io(&img, "write -P 0x22 1536k 64k");
    qemu_io(&img, "write -z 1600k 128k");
    qemu_io(&img, "write -P 0x23 3M 256k");
    qemu_img(&["snapshot", "-c", "s2", p(&img)]);
    qemu_io(&img, "write -P 0x33 3M 64k");
    qemu_io(&img, "write -P 0x34 8k 4k");
    assert_qemu_check_clean(&img);
    img
}

#[test]
fn check_accounts_for_internal_snapshots_like_qemu() {
    require_qemu();
    let _w = common::watchdog("snapshots_check", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshots(dir.path());
    let env = Env::new();
    let chain = open_chain(&env, &img, false);
    let r = env.check(chain.top(), false).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(r.image_end_offset <= size);
    close_chain(&env, chain);
}

/// The byte offset of the 16-bit refcount of every cluster of the first
/// refcount block, with its value (images made by qemu-img: 16-bit
/// refcounts, one block covers them all here).
fn refcounts(img: &Path) -> Vec<(usize, u16)> {
    let b = std::fs::read(img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cs = 1usize << u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert_eq!(u32::from_be_bytes(b[96..100].try_into().unwrap()), 4);
    let block = be64(be64(48) as usize) as usize;
    (0..b.len().div_ceil(cs))
        .map(|c| {
            let at = block + 2 * c;
            (at, u16::from_be_bytes([b[at], b[at + 1]]))
        })
        .collect()
}

fn set_refcount(img: &Path, at: usize, v: u16) {
    let mut b = std::fs::read(img).unwrap();
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    std::fs::write(img, b).unwrap();
}

/// The number in "N errors were found" (0 when absent).
fn qemu_errors(out: &str) -> u64 {
    qemu_count(out, "errors were found on the image")
}

#[test]
fn snapshot_refcount_damage_is_reported_as_qemu_reports_it() {
    require_qemu();
    let _w = common::watchdog("snapshots_damage", Duration::from_secs(180));
    let dir = tempfile::tempdir().unwrap();
    let clean = image_with_snapshots(dir.path());
    let rcs = refcounts(&clean);
    let shared: Vec<usize> = rcs
        .iter()
        .filter(|r| r.1 == 3)
        .map(|r| r.0)
        .take(1)
        .chain(rcs.iter().filter(|r| r.1 == 2).map(|r| r.0).take(2))
        .collect();
    assert!(shared.len() >= 2, "the image shares clusters");
    let env = Env::new();
    let mut cases = 0;
    for (i, &at) in shared.iter().enumerate() {
        let old = rcs.iter().find(|r| r.0 == at).unwrap().1;
        for new in [old + 1, old - 1] {
            let img = dir.path().join(format!("damaged-{i}-{new}.qcow2"));
            std::fs::copy(&clean, &img).unwrap();
            set_refcount(&img, at, new);
            let (rc, out) = qemu_check(&img);
            let chain = open_chain(&env, &img, false);
            let r = env.check(chain.top(), false).unwrap();
            close_chain(&env, chain);
            assert_eq!(
                (r.corruptions, r.leaks),
                (qemu_errors(&out), qemu_leaks(&out)),
                "refcount {old} -> {new}: ours {:?}\nqemu-img check (exit {rc}):\n{out}",
                r.messages
            );
            assert!(r.corruptions + r.leaks > 0, "damage went unseen");
            let want_rc = if r.corruptions > 0 {
                2
            } else if r.leaks > 0 {
                3
            } else {
                0
            };
            assert_eq!(rc, want_rc, "{out}");
            cases += 1;
        }
    }
    assert!(cases >= 4);
}

// ---- check disagreements (issue 9, third bullet) ----------------------------

const CS64K: usize = 65536;

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A 2 GiB image (four L1 entries) with 128 KiB of data at offset 0, as
/// qemu-img/qemu-io make it; returns its bytes, the L1 table's offset, the
/// first L2 table's offset and the first refcount block's offset.
fn small_qemu_image(dir: &Path) -> (Vec<u8>, usize, usize, usize) {
    let img = dir.join("small.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "2G"]);
    qemu_io(&img, "write -P 0x5a 0 128k");
    let b = std::fs::read(&img).unwrap();
    let l1 = be64_at(&b, 40) as usize;
    let l2 = (be64_at(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb = be64_at(&b, be64_at(&b, 48) as usize) as usize;
    assert_eq!(b.len() % CS64K, 0);
    (b, l1, l2, rb)
}

fn write_variant(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let img = dir.join(name);
    std::fs::write(&img, bytes).unwrap();
    img
}

fn our_check(env: &Env, img: &Path) -> (u64, u64, Vec<String>) {
    let chain = open_chain(env, img, false);
    let r = env.check(chain.top(), false).unwrap();
    close_chain(env, chain);
    (r.corruptions, r.leaks, r.messages)
}

#[test]
fn refcounts_past_the_end_of_the_file_are_ignored_as_qemu_does() {
    require_qemu();
    let _w = common::watchdog("past_end_refcounts", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _, _, rb) = small_qemu_image(dir.path());
    let past = b.len() / CS64K + 5;
    b[rb + 2 * past..rb + 2 * past + 2].copy_from_slice(&1u16.to_be_bytes());
    let img = write_variant(dir.path(), "past.qcow2", &b);
    assert_eq!(qemu_check(&img).0, 0);
    let env = Env::new();
    let (c, l, msgs) = our_check(&env, &img);
    assert_eq!((c, l), (0, 0), "{msgs:?}");
    // Writing allocates around it (as QEMU's allocator would): once the
    // file has grown over it, it is a leak for QEMU and for us alike, and
    // our repair leaves QEMU nothing to find.
    let chain = open_chain(&env, &img, true);
    env.write(chain.top(), 1 << 30, vec![7; 1 << 20]).unwrap();
    env.flush(chain.top()).unwrap();
    let r = env.check(chain.top(), false).unwrap();
    close_chain(&env, chain);
    let (rc, out) = qemu_check(&img);
    assert_eq!((rc, qemu_leaks(&out)), (3, 1), "{out}");
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{:?}", r.messages);
    let chain = open_chain(&env, &img, true);
    let r = env.check(chain.top(), true).unwrap();
    assert_eq!(r.repaired_leaks, 1);
    close_chain(&env, chain);
    assert_qemu_check_clean(&img);
}

#[test]
fn copied_flag_on_an_unallocated_l2_entry_reads_unallocated_as_in_qemu() {
    require_qemu();
    let _w = common::watchdog("l2_copied_offset0", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _, l2, _) = small_qemu_image(dir.path());
    // Guest cluster 5: unallocated, now with only the copied flag.
    b[l2 + 8 * 5..l2 + 8 * 6].copy_from_slice(&(1u64 << 63).to_be_bytes());
    let img = write_variant(dir.path(), "l2.qcow2", &b);
    assert_eq!(qemu_check(&img).0, 0);
    let env = Env::new();
    let (c, l, msgs) = our_check(&env, &img);
    assert_eq!((c, l), (0, 0), "{msgs:?}");
    let chain = open_chain(&env, &img, false);
    let got = env.read(chain.top(), 5 * CS64K as u64, CS64K).unwrap();
    close_chain(&env, chain);
    assert_eq!(got, vec![0; CS64K]);
    let raw = dir.path().join("l2.raw");
    qemu_img(&["convert", "-O", "raw", p(&img), p(&raw)]);
    let q = std::fs::read(&raw).unwrap();
    assert_eq!(&q[5 * CS64K..6 * CS64K], &got[..]);
}

#[test]
fn copied_flag_on_an_empty_l1_entry_is_corruption_as_in_qemu() {
    require_qemu();
    let _w = common::watchdog("l1_copied_offset0", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let (mut b, l1, _, _) = small_qemu_image(dir.path());
    b[l1 + 8..l1 + 16].copy_from_slice(&(1u64 << 63).to_be_bytes());
    let img = write_variant(dir.path(), "l1.qcow2", &b);
    assert_eq!(qemu_check(&img).0, 2);
    let env = Env::new();
    let (c, _, msgs) = our_check(&env, &img);
    assert!(c >= 1, "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m.contains("without an L2 table")),
        "{msgs:?}"
    );
    // Reads see no table there (QEMU reads zeroes too).
    let chain = open_chain(&env, &img, false);
    assert_eq!(env.read(chain.top(), 1 << 29, 4096).unwrap(), vec![0; 4096]);
    close_chain(&env, chain);
}

#[test]
fn an_l2_table_cut_by_the_end_of_the_file_is_corruption_for_us() {
    require_qemu();
    let _w = common::watchdog("truncated_l2", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let (b, l1, l2, rb) = small_qemu_image(dir.path());
    // Move the L2 table to the end of the file, then cut the file in the
    // middle of it (its entries for the data survive).
    let k = b.len() / CS64K;
    let mut c = b.clone();
    c.extend_from_slice(&b[l2..l2 + CS64K]);
    c[l1..l1 + 8].copy_from_slice(&((k * CS64K) as u64 | 1 << 63).to_be_bytes());
    c[rb + 2 * k..rb + 2 * k + 2].copy_from_slice(&1u16.to_be_bytes());
    c[rb + 2 * (l2 / CS64K)..rb + 2 * (l2 / CS64K) + 2].copy_from_slice(&0u16.to_be_bytes());
    c.truncate(k * CS64K + CS64K / 2);
    let img = write_variant(dir.path(), "cut.qcow2", &c);
    // QEMU reads the missing half as zeroes and finds nothing wrong.
    assert_eq!(qemu_check(&img).0, 0);
    // We call it corruption: QEMU writes L2 tables whole, so a cut one
    // means lost mappings; and requests through it fail rather than
    // guess.
    let env = Env::new();
    let (corruptions, _, msgs) = our_check(&env, &img);
    assert!(corruptions >= 1, "{msgs:?}");
    let chain = open_chain(&env, &img, false);
    assert!(matches!(
        env.read(chain.top(), 0, 4096),
        Err(blockgraph::Error::InvalidImage { .. })
    ));
    close_chain(&env, chain);
}

/// `Qcow2Driver::check_image` on the file at `path` (a file node of its
/// own, removed afterwards).
fn check_image(env: &Env, path: &Path, repair: bool) -> blockgraph::drivers::qcow2::CheckReport {
    let drv = FileDriver::open(path, FileOptions::default()).unwrap();
    let name = env.name("f");
    let file = env
        .main
        .run(move |bql| bql.write(|w| w.add_node(&name, drv, &[])))
        .unwrap();
    let f = file.clone();
    let r = env
        .on_io(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::check_image(f.io(&g), Qcow2Options::default(), repair).await
        })
        .unwrap();
    env.remove(&file).unwrap();
    r
}

/// What QEMU reads from snapshot `sn` (or the active layer).
fn qemu_read(img: &Path, sn: Option<&str>, out: &Path) -> Vec<u8> {
    let mut args = vec!["convert".to_owned(), "-O".into(), "raw".into()];
    if let Some(sn) = sn {
        args.push("-l".into());
        args.push(format!("snapshot.name={sn}"));
    }
    args.push(p(img).into());
    args.push(p(out).into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&args);
    std::fs::read(out).unwrap()
}

#[test]
fn repair_of_a_snapshot_image_never_frees_what_snapshots_use() {
    require_qemu();
    let _w = common::watchdog("snapshots_repair", Duration::from_secs(180));
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshots(dir.path());
    let out = dir.path().join("out.raw");
    let before: Vec<Vec<u8>> = [Some("s1"), Some("s2"), None]
        .iter()
        .map(|sn| qemu_read(&img, *sn, &out))
        .collect();
    let rcs = refcounts(&img);
    // A leak (a cluster shared by three tables counted four times) and a
    // corruption (one shared by two counted once), plus the dirty bit.
    let three = rcs
        .iter()
        .find(|r| r.1 == 3)
        .expect("a cluster shared by 3")
        .0;
    let two = rcs
        .iter()
        .rfind(|r| r.1 == 2)
        .expect("a cluster shared by 2")
        .0;
    set_refcount(&img, three, 4);
    set_refcount(&img, two, 1);
    set_header_bit(&img, 72, 0, true);
    let (rc, out_q) = qemu_check(&img);
    assert_eq!(rc, 2, "{out_q}");

    let env = Env::new();
    let r = check_image(&env, &img, false);
    assert_eq!(
        (r.corruptions, r.leaks),
        (qemu_errors(&out_q), qemu_leaks(&out_q)),
        "{:?}",
        r.messages
    );
    let r = check_image(&env, &img, true);
    assert!(r.is_clean(), "{r:?}");
    assert!(
        r.repaired_leaks >= 1 && r.repaired_corruptions >= 1,
        "{r:?}"
    );
    assert_qemu_check_clean(&img);
    let info = qemu_img(&["info", p(&img)]);
    assert!(info.contains("s1") && info.contains("s2"), "{info}");
    assert!(!info.contains("dirty"), "{info}");
    let after: Vec<Vec<u8>> = [Some("s1"), Some("s2"), None]
        .iter()
        .map(|sn| qemu_read(&img, *sn, &out))
        .collect();
    assert!(before == after, "a snapshot or the active layer changed");
    // And our own check agrees.
    let r = check_image(&env, &img, false);
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}
