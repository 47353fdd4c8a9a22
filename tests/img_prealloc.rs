//! Preallocation (`-o preallocation=off|metadata|falloc|full`, QEMU's
//! option): `img create` and `img convert` make the same images as
//! `qemu-img` 10 (same map, same allocation on disk within a tolerance, a
//! clean check), bad values are refused, and the qcow2 driver writes into
//! a preallocated image in place.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use blockgraph::drivers::qcow2::{CreateOptions, Preallocation, Qcow2Driver, Qcow2Options};
use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop};

use common::process::{self, have, output_within, skip, text};

/// The `img` binary, built here when `cargo test --test img_prealloc`
/// built no examples.
fn img_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| process::example_binary("img"))
}

const LIMIT: Duration = Duration::from_secs(60);

fn img(dir: &Path, args: &[&str]) -> Output {
    output_within(
        Command::new(img_binary()).args(args).current_dir(dir),
        LIMIT,
    )
}

fn img_ok(dir: &Path, args: &[&str]) -> String {
    let out = img(dir, args);
    assert!(out.status.success(), "img {args:?} failed: {}", text(&out));
    text(&out)
}

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    let out = output_within(Command::new("qemu-img").args(args).current_dir(dir), LIMIT);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have_qemu_img() -> bool {
    if have("qemu-img") {
        true
    } else {
        skip("qemu-img is not installed: no comparison with it");
        false
    }
}

/// Bytes the file takes on disk (`st_blocks`, what `qemu-img info` calls
/// the disk size).
fn disk_size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

const MODES: [&str; 4] = ["off", "metadata", "falloc", "full"];

/// Each mode, raw and qcow2, made by both tools: the same map (`qemu-img
/// map` on both), the same file length, the same allocation on disk within
/// a tolerance (QEMU writes its header cluster partly; raw `off` QEMU also
/// writes the first block), and a clean `qemu-img check` on ours.
#[test]
fn create_matches_qemu_img_in_every_mode() {
    let _w = common::watchdog("prealloc_create", Duration::from_secs(240));
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = "3M";
    for mode in MODES {
        let o = format!("preallocation={mode}");
        for (fmt, ext) in [("qcow2", "qcow2"), ("raw", "raw")] {
            let ours = format!("ours-{mode}.{ext}");
            let theirs = format!("theirs-{mode}.{ext}");
            if fmt == "raw" && mode == "metadata" {
                continue; // refused, see `bad_values_are_refused`
            }
            let said = img_ok(d, &["create", "-f", fmt, "-o", &o, &ours, size]);
            assert!(said.contains(&format!("preallocation={mode}")), "{said}");
            qemu_img(d, &["create", "-q", "-f", fmt, "-o", &o, &theirs, size]);
            let (po, pt) = (d.join(&ours), d.join(&theirs));
            if fmt == "raw" || mode != "off" {
                // An empty qcow2 image: QEMU writes only the L1 table's
                // first bytes, we write its cluster.
                assert_eq!(len(&po), len(&pt), "{fmt} {mode}: file length");
            }
            let map = |f: &str| qemu_img(d, &["map", "--output=json", "-f", fmt, f]);
            if fmt == "qcow2" || mode != "off" {
                // A raw `off` image: QEMU writes the first block, we do not.
                assert_eq!(map(&ours), map(&theirs), "{fmt} {mode}: map");
            }
            let (a, b) = (disk_size(&po), disk_size(&pt));
            assert!(
                a.abs_diff(b) <= 128 << 10,
                "{fmt} {mode}: {a} bytes on disk, qemu-img's {b}"
            );
            match mode {
                "falloc" | "full" => assert!(a >= 3 << 20, "{fmt} {mode}: {a} on disk"),
                _ => assert!(a < 1 << 20, "{fmt} {mode}: {a} on disk"),
            }
            if fmt == "qcow2" {
                let check = qemu_img(d, &["check", &ours]);
                assert!(check.contains("No errors were found"), "{mode}: {check}");
                let ours_check = img_ok(d, &["check", &ours]);
                assert!(ours_check.contains("No errors"), "{mode}: {ours_check}");
            }
        }
    }
    // compat=0.10 too (the same tables, version 2).
    let o = "preallocation=metadata,compat=0.10";
    img_ok(d, &["create", "-f", "qcow2", "-o", o, "v2.qcow2", "1M"]);
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", o, "v2q.qcow2", "1M"],
    );
    let map = |f: &str| qemu_img(d, &["map", "--output=json", f]);
    assert_eq!(map("v2.qcow2"), map("v2q.qcow2"));
    assert!(qemu_img(d, &["check", "v2.qcow2"]).contains("No errors were found"));
}

/// Beyond one L2 table (512-byte clusters: 64 clusters an L2 table): the
/// layout differs from QEMU's (all L2 tables first), the map's guest side
/// and the check do not.
#[test]
fn several_l2_tables_and_refcount_blocks() {
    let _w = common::watchdog("prealloc_l2", Duration::from_secs(240));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for mode in ["metadata", "full"] {
        let o = format!("cluster_size=512,preallocation={mode}");
        let f = format!("small-{mode}.qcow2");
        img_ok(d, &["create", "-f", "qcow2", "-o", &o, &f, "5M"]);
        // 10240 data clusters, 160 L2 tables, refcount blocks of 256.
        let data = 10240u64;
        assert!(len(&d.join(&f)) >= (data + 160 + 40) * 512);
        let check = img_ok(d, &["check", &f]);
        assert!(check.contains("No errors"), "{mode}: {check}");
        if have("qemu-img") {
            let check = qemu_img(d, &["check", &f]);
            assert!(check.contains("No errors were found"), "{check}");
            assert!(check.contains("10240/10240 = 100.00% allocated"), "{check}");
        }
    }
}

/// `img convert -o preallocation=…`: the target is made preallocated and
/// the copy writes into it in place; it equals the source.
#[test]
fn convert_into_a_preallocated_target() {
    let _w = common::watchdog("prealloc_convert", Duration::from_secs(240));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let mut bytes = vec![0u8; 3 << 20];
    bytes[70_000..70_005].copy_from_slice(b"hello");
    for (i, b) in bytes[(20 << 16)..(23 << 16)].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(&src, &bytes).unwrap();
    for mode in MODES {
        let o = format!("preallocation={mode}");
        let q = format!("c-{mode}.qcow2");
        img_ok(d, &["convert", "-O", "qcow2", "-o", &o, "src.raw", &q]);
        let fresh = format!("fresh-{mode}.qcow2");
        img_ok(d, &["create", "-f", "qcow2", "-o", &o, &fresh, "3M"]);
        if mode != "off" {
            // Written in place: no cluster past the preallocated ones.
            assert_eq!(len(&d.join(&q)), len(&d.join(&fresh)), "{mode}");
        }
        let r = format!("c-{mode}.raw");
        if mode != "metadata" {
            img_ok(d, &["convert", "-O", "raw", "-o", &o, "src.raw", &r]);
            assert_eq!(std::fs::read(d.join(&r)).unwrap(), bytes, "raw {mode}");
            if mode != "off" {
                assert!(disk_size(&d.join(&r)) >= 3 << 20, "raw {mode}");
            }
        }
        img_ok(d, &["compare", "src.raw", &q]);
        if have("qemu-img") {
            let same = qemu_img(d, &["compare", "src.raw", &q]);
            assert!(same.contains("identical"), "{mode}: {same}");
            let check = qemu_img(d, &["check", &q]);
            assert!(check.contains("No errors were found"), "{mode}: {check}");
            if mode != "off" {
                assert!(check.contains("48/48 = 100.00% allocated"), "{check}");
            }
        }
    }
}

#[test]
fn bad_values_are_refused() {
    let _w = common::watchdog("prealloc_bad", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("src.raw"), vec![1u8; 65536]).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "preallocation=sparse",
                "x.qcow2",
                "1M",
            ],
            "-o preallocation must be off, metadata, falloc or full, not 'sparse'",
        ),
        (
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "preallocation=metadata",
                "x.raw",
                "1M",
            ],
            "Unsupported preallocation mode: metadata",
        ),
        (
            &["create", "-f", "raw", "-o", "preallocation", "x.raw", "1M"],
            "not 'on'",
        ),
        (
            &[
                "create",
                "-f",
                "raw",
                "-o",
                "cluster_size=4k",
                "x.raw",
                "1M",
            ],
            "raw images take no",
        ),
        (
            &[
                "convert",
                "-O",
                "raw",
                "-o",
                "preallocation=metadata",
                "src.raw",
                "y.raw",
            ],
            "Unsupported preallocation mode: metadata",
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "preallocation=",
                "src.raw",
                "y.qcow2",
            ],
            "-o preallocation must be",
        ),
    ];
    for (args, want) in cases {
        let out = img(d, args);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "img {args:?}: {said}");
        assert!(said.contains(want), "img {args:?}: {said}");
        assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
    }
    for f in ["x.qcow2", "x.raw", "y.raw", "y.qcow2"] {
        assert!(!d.join(f).exists(), "{f} left behind");
    }
    // A backing file and preallocation: refused (QEMU allows it only with
    // extended L2 entries).
    img_ok(d, &["create", "-f", "qcow2", "base.qcow2", "1M"]);
    let out = img(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "z.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("backing file"), "{}", text(&out));
}

/// The library: a qcow2 image created with metadata preallocation, opened
/// by the driver, written and read back; the writes go into the
/// preallocated clusters (the file does not grow) and the image stays
/// clean.
#[test]
fn the_driver_writes_into_preallocated_clusters_in_place() {
    let _w = common::watchdog("prealloc_lib", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let file = FileDriver::create(&path, 0, FileOptions::default()).unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let file_node = main
        .run(|bql| bql.write(|w| w.add_node("disk-file", file, &[])))
        .unwrap();
    let f = file_node.clone();
    let opts = CreateOptions::new(4 << 20).preallocation(Preallocation::Metadata);
    assert_eq!(opts.preallocation, Preallocation::Metadata);
    let driver = common::join(
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::create(f.io(&g), &opts).await?;
            Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await
        }),
        "create",
    )
    .unwrap();
    // Header, refcount table and block, L1, one L2, 64 data clusters.
    let made = len(&path);
    assert_eq!(made, (5 + 64) * 65536);
    assert!(
        disk_size(&path) < 1 << 20,
        "metadata leaves the data sparse"
    );
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
    let read = common::join(
        io.spawn(move |mut cx| async move {
            let mut zeroes = vec![1u8; 8192];
            b.read(&mut cx, 1 << 20, &mut zeroes).await?;
            assert!(zeroes.iter().all(|&x| x == 0), "preallocated reads zeroes");
            b.write(&mut cx, 65536 + 512, &[7; 4096]).await?;
            b.write(&mut cx, (4 << 20) - 4096, &[9; 4096]).await?;
            b.flush(&mut cx).await?;
            let mut back = vec![0u8; 8192];
            b.read(&mut cx, 65536, &mut back).await?;
            Ok::<_, Error>(back)
        }),
        "writes",
    )
    .unwrap();
    assert!(read[..512].iter().all(|&x| x == 0));
    assert!(read[512..4608].iter().all(|&x| x == 7));
    assert!(read[4608..].iter().all(|&x| x == 0));
    assert_eq!(
        len(&path),
        made,
        "no cluster allocated past the preallocated ones"
    );
    // The data went to the preallocated cluster of guest cluster 1.
    let raw = std::fs::read(&path).unwrap();
    let at = (5 + 1) * 65536 + 512;
    assert!(raw[at..at + 4096].iter().all(|&x| x == 7));
    let end = made as usize;
    assert!(raw[end - 4096..].iter().all(|&x| x == 9));
    let d = disk.clone();
    let report = common::join(
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = d.io(&g);
            n.driver_as::<Qcow2Driver>()
                .expect("a qcow2 node")
                .check(n, false)
                .await
        }),
        "check",
    )
    .unwrap();
    assert!(report.is_clean(), "{:?}", report.messages);
    assert_eq!(report.allocated_clusters, 64);
    main.run(move |bql| bql.write(|w| w.remove_backend(&blk)))
        .unwrap();
}

/// Our driver writes into qemu-img's preallocated image in place (`img
/// convert -n --target-is-zero`: only the data is written), and without
/// `--target-is-zero` zeroes the rest as `qemu-img convert -n` does
/// (freeing those clusters: both tools leave 4 of 48 allocated).
#[test]
fn writes_into_qemu_img_preallocated_images_in_place() {
    let _w = common::watchdog("prealloc_interop", Duration::from_secs(120));
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut bytes = vec![0u8; 3 << 20];
    bytes[70_000..70_005].copy_from_slice(b"hello");
    for (i, b) in bytes[(20 << 16)..(23 << 16)].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(d.join("src.raw"), &bytes).unwrap();
    let o = "preallocation=metadata";
    for (target, zero) in [("kept.qcow2", true), ("zeroed.qcow2", false)] {
        qemu_img(d, &["create", "-q", "-f", "qcow2", "-o", o, target, "3M"]);
        let made = len(&d.join(target));
        let mut args = vec!["convert", "-n", "-O", "qcow2"];
        if zero {
            args.push("--target-is-zero");
        }
        args.extend(["src.raw", target]);
        img_ok(d, &args);
        assert_eq!(len(&d.join(target)), made, "{target}: the file grew");
        assert!(qemu_img(d, &["compare", "src.raw", target]).contains("identical"));
        let check = qemu_img(d, &["check", target]);
        let want = if zero { "48/48" } else { "4/48" };
        assert!(check.contains("No errors were found"), "{check}");
        assert!(check.contains(want), "{target}: {check}");
    }
    // qemu-img's own `convert -n` frees the same clusters.
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", o, "theirs.qcow2", "3M"],
    );
    qemu_img(
        d,
        &["convert", "-n", "-O", "qcow2", "src.raw", "theirs.qcow2"],
    );
    assert!(qemu_img(d, &["check", "theirs.qcow2"]).contains("4/48"));
}
