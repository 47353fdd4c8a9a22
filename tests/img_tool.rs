//! The `img` example as a user runs it: real processes, exit codes, output,
//! and interop with `qemu-img` where it is installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::process::{self, have, run_ok};

/// The `img` binary: the one `cargo test` built with the examples, or,
/// when it is missing or older than its sources (`cargo test --test
/// img_tool` builds no examples), built here.
fn img_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| process::example_binary("img"))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn img(dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(img_binary())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let r = img(dir, args);
    assert_eq!(r.code, 0, "img {args:?} failed: {}{}", r.stdout, r.stderr);
    r.stdout
}

fn qemu(dir: &Path, tool: &str, args: &[&str]) -> Output {
    run_ok(Command::new(tool).args(args).current_dir(dir))
}

#[test]
fn bad_arguments_and_bad_images_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("short.qcow2"), b"QFI\xfb\0\0\0\x03truncated").unwrap();
    std::fs::write(d.join("junk.bin"), b"junk").unwrap();
    let mut header = vec![0u8; 4096];
    header[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    header[20..24].copy_from_slice(&40u32.to_be_bytes()); // cluster_bits 40
    std::fs::write(d.join("hostile.qcow2"), &header).unwrap();
    ok(d, &["create", "-f", "raw", "good.raw", "1M"]);
    let cases: &[(&[&str], &str)] = &[
        (&[], "missing command"),
        (&["frobnicate"], "unknown command"),
        (&["create", "x.raw"], "needs a SIZE"),
        (&["create", "-f", "raw", "x.raw", "0"], "must be positive"),
        (&["create", "-f", "raw", "x.raw", "lots"], "is not a size"),
        (&["create", "-f", "vmdk", "x", "1M"], "unknown format"),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=3k",
                "y.qcow2",
                "1M",
            ],
            "power of two",
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "/etc/hostname",
                "-F",
                "raw",
                "z.qcow2",
            ],
            "absolute",
        ),
        (
            &["create", "-f", "qcow2", "-b", "missing.raw", "z.qcow2"],
            "missing.raw",
        ),
        (&["info"], "expected FILE"),
        (&["info", "missing.img"], "missing.img"),
        (&["info", "short.qcow2"], "too short"),
        (&["info", "hostile.qcow2"], "qcow2"),
        (&["info", "-f", "qcow2", "junk.bin"], "qcow2"),
        (&["info", "--bogus", "good.raw"], "unknown option"),
        (&["info", "-f"], "needs a value"),
        (&["check", "short.qcow2"], "too short"),
        (&["convert", "good.raw"], "expected SRC DST"),
        (
            &["convert", "-S", "1000", "good.raw", "o"],
            "multiple of 512",
        ),
        (&["convert", "-m", "17", "good.raw", "o"], "-m must be"),
        (&["convert", "-t", "none", "good.raw", "o"], "-t must be"),
        (
            &["convert", "--target-is-zero", "good.raw", "o"],
            "existing target (-n)",
        ),
        (&["convert", "-n", "good.raw", "missing.raw"], "missing.raw"),
        (
            &["convert", "-O", "vmdk", "good.raw", "o"],
            "unknown output format",
        ),
        (
            &["bench", "--stack", "null", "--depth", "0"],
            "--depth must be",
        ),
        (&["bench", "--stack", "null", "--bs", "0"], "--bs must be"),
        (
            &["bench", "--stack", "null", "--time", "-3"],
            "--time must be",
        ),
        (
            &["bench", "--stack", "throttle:iops-total=0/null"],
            "must be positive",
        ),
        (
            &["bench", "--stack", "throttle:iops-total=5,iops-read=5/null"],
            "cannot be combined",
        ),
        (&["bench", "--stack", "raw:size=0/null"], "must be positive"),
        (
            &["bench", "--stack", "raw:offset=2G/null:size=1G"],
            "past the end",
        ),
        (&["bench", "--stack", "null/raw"], "must be the last layer"),
        (&["bench", "--stack", "cor"], "must end in"),
        (&["bench", "--stack", "warp/null"], "unknown stack layer"),
        (
            &["bench", "--stack", "null:size=1G", "--size", "2G"],
            "larger than the device",
        ),
        (&["bench", "--stack", "null", "good.raw"], "takes no FILE"),
        (&["bench"], "no image given"),
        (
            &["bench", "--rw", "sideways", "--stack", "null"],
            "--rw must be",
        ),
    ];
    for (args, expect) in cases {
        let r = img(d, args);
        assert!(
            r.code != 0 && r.code != 70 && r.code != 101,
            "img {args:?} exited {}: {}",
            r.code,
            r.stderr
        );
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "img {args:?}: not one line: {}", r.stderr);
        assert!(lines[0].starts_with("img: "), "img {args:?}: {}", r.stderr);
        assert!(lines[0].contains(expect), "img {args:?}: {}", r.stderr);
    }
    // Nothing half-made was left behind by the failed creates.
    for f in ["x.raw", "y.qcow2", "z.qcow2"] {
        assert!(!d.join(f).exists(), "{f} left behind");
    }
    // compare reports errors with status 2 (1 means "different").
    assert_eq!(img(d, &["compare", "good.raw", "missing.raw"]).code, 2);
}

#[test]
fn create_info_check_convert_compare_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "-f", "raw", "base.raw", "4M"]);
    ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    // Write through the stack (img has no write command): a bench of
    // sequential writes fills the first 64 KiB of the top image.
    ok(
        d,
        &[
            "bench",
            "-f",
            "qcow2",
            "--rw",
            "write",
            "--bs",
            "4k",
            "--count",
            "16",
            "--depth",
            "1",
            "top.qcow2",
        ],
    );
    let info = ok(d, &["info", "top.qcow2"]);
    for expect in [
        "file format: qcow2",
        "virtual size: 4 MiB (4194304 bytes)",
        "cluster_size: 4096",
        "backing file: base.raw",
        "backing file format: raw",
        "allocated data: 64 KiB (65536 bytes)",
        "file format: raw",
    ] {
        assert!(info.contains(expect), "missing '{expect}' in:\n{info}");
    }
    let json = ok(d, &["info", "--json", "top.qcow2"]);
    assert!(json.trim_start().starts_with('{') && json.trim_end().ends_with('}'));
    for expect in [
        "\"virtual-size\": 4194304",
        "\"cluster-size\": 4096",
        "\"backing-filename\": \"base.raw\"",
        "\"backing-image\": {",
        "\"compat\": \"1.1\"",
    ] {
        assert!(json.contains(expect), "missing '{expect}' in:\n{json}");
    }
    assert!(ok(d, &["check", "top.qcow2"]).contains("No errors were found"));
    assert_eq!(img(d, &["check", "base.raw"]).code, 63);

    // Flatten to raw and to qcow2 v2; all three read the same.
    ok(d, &["convert", "top.qcow2", "flat.raw"]);
    ok(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=64k",
            "top.qcow2",
            "flat.qcow2",
        ],
    );
    assert!(ok(d, &["compare", "top.qcow2", "flat.raw"]).contains("identical"));
    assert!(ok(d, &["compare", "flat.raw", "flat.qcow2"]).contains("identical"));
    let raw = std::fs::read(d.join("flat.raw")).unwrap();
    assert!(
        raw[..65536].iter().all(|&b| b == 0xA5),
        "the bench's pattern"
    );
    assert!(raw[65536..].iter().all(|&b| b == 0));
    // And a difference is found, at the right offset.
    let r = img(d, &["compare", "base.raw", "flat.raw"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("Content mismatch at offset 0!"),
        "{}",
        r.stdout
    );

    // A stack as the source: a window of the raw file.
    ok(
        d,
        &[
            "convert",
            "--stack",
            "raw:offset=32k,size=64k",
            "flat.raw",
            "window.raw",
        ],
    );
    let window = std::fs::read(d.join("window.raw")).unwrap();
    assert_eq!(window.len(), 65536);
    assert_eq!(&window[..32768], &raw[32768..65536]);
    assert!(window[32768..].iter().all(|&b| b == 0));
}

/// A second writer on an image in use is refused by its lock.
#[test]
fn an_image_in_use_is_locked() {
    if !have("qemu-io") {
        eprintln!("qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "-f", "qcow2", "busy.qcow2", "1M"]);
    // qemu-io holds the image (and its lock) for a minute, or until it is
    // killed below.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 60000", "busy.qcow2"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until qemu-io holds its lock (seen in /proc/locks, which takes no
    // lock: trying img meanwhile could make qemu-io's own open fail, and
    // then nothing would hold the image).
    process::wait_until_locked(
        &d.join("busy.qcow2"),
        &mut holder,
        std::time::Duration::from_secs(30),
    );
    let r = img(d, &["bench", "--rw", "write", "--count", "1", "busy.qcow2"]);
    let locked = (r.code != 0).then_some(r.stderr);
    let _ = holder.kill();
    let _ = holder.wait();
    let msg = locked.expect("img was not refused while qemu-io held the image");
    assert!(msg.contains("failed to lock"), "{msg}");
    // -U looks anyway.
    assert_eq!(img(d, &["info", "-U", "busy.qcow2"]).code, 0);
}

#[test]
fn qemu_img_reads_what_img_writes_and_the_other_way_round() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping the interop check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qemu-img's image, our tools.
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "theirs.qcow2",
            "8M",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 256k",
            "-c",
            "write -z 2M 64k",
            "theirs.qcow2",
        ],
    );
    let info = ok(d, &["info", "theirs.qcow2"]);
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    ok(d, &["convert", "theirs.qcow2", "ours.raw"]);
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "theirs.qcow2", "ref.raw"],
    );
    assert_eq!(
        std::fs::read(d.join("ours.raw")).unwrap(),
        std::fs::read(d.join("ref.raw")).unwrap()
    );
    // Our image, qemu-img's tools.
    ok(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "theirs.qcow2",
            "ours.qcow2",
        ],
    );
    qemu(d, "qemu-img", &["check", "ours.qcow2"]);
    let out = qemu(d, "qemu-img", &["compare", "theirs.qcow2", "ours.qcow2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    assert!(ok(d, &["compare", "theirs.qcow2", "ours.qcow2"]).contains("identical"));
}

fn field(out: &str, name: &str) -> f64 {
    let at = out
        .find(name)
        .unwrap_or_else(|| panic!("no '{name}' in {out}"))
        + name.len();
    out[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The issue's acceptance check: a throttle limit measured by `img bench`
/// lands within 10% of the configured rate.
#[test]
fn bench_measures_a_throttle_limit_within_ten_percent() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(
        dir.path(),
        &[
            "bench",
            "--stack",
            "throttle:iops-total=200/null:size=1G",
            "--rw",
            "randread",
            "--depth",
            "8",
            "--warmup",
            "0.3",
            "--time",
            "2",
        ],
    );
    let iops = field(&out, "IOPS:");
    assert!(
        (iops - 200.0).abs() <= 20.0,
        "{iops} IOPS against 200:\n{out}"
    );
    let p50 = field(&out, "p50");
    let p99 = field(&out, "p99");
    let max = field(&out, "max");
    assert!(p50 <= p99 && p99 <= max, "{out}");
    // Eight requests in flight at 200 IOPS: each waits about 40 ms.
    assert!((25_000.0..80_000.0).contains(&p50), "{out}");
}

#[test]
fn bench_counts_injected_errors_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let r = img(
        dir.path(),
        &[
            "bench",
            "--stack",
            "fault:op=read,error=eio,after=10,times=5/memory:size=1M",
            "--count",
            "100",
            "--threads",
            "2",
            "--depth",
            "4",
        ],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("ops: 95"),
        "the other 95 completed: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("5 request(s) failed") && r.stderr.contains("os error 5"),
        "{}",
        r.stderr
    );
}

#[test]
fn resize_grows_and_shrinks_like_qemu_img_resize() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "a.qcow2",
            "1M",
        ],
    );
    ok(d, &["create", "-f", "raw", "r.raw", "1M"]);
    // Growing the qcow2 image moves its L1 table (2 MiB per table cluster).
    assert!(ok(d, &["resize", "a.qcow2", "+3M"]).contains("Image resized."));
    assert!(ok(d, &["info", "--json", "a.qcow2"]).contains("\"virtual-size\": 4194304"));
    ok(d, &["resize", "r.raw", "2M"]);
    assert_eq!(std::fs::metadata(d.join("r.raw")).unwrap().len(), 2 << 20);
    // Shrinking needs --shrink, and is refused over stored data.
    let r = img(d, &["resize", "r.raw", "-512k"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("--shrink"), "{}", r.stderr);
    ok(d, &["resize", "--shrink", "r.raw", "-512k"]);
    assert_eq!(
        std::fs::metadata(d.join("r.raw")).unwrap().len(),
        1536 << 10
    );
    ok(d, &["resize", "--shrink", "a.qcow2", "-1M"]);
    assert!(ok(d, &["info", "--json", "a.qcow2"]).contains("\"virtual-size\": 3145728"));
    if have("qemu-img") {
        qemu(d, "qemu-img", &["check", "a.qcow2"]);
        let info = qemu(d, "qemu-img", &["info", "--output=json", "a.qcow2"]);
        assert!(String::from_utf8_lossy(&info.stdout).contains("\"virtual-size\": 3145728"));
    }
}

/// `img info --output=json` against `qemu-img info --output=json`, parsed
/// and compared whole (every field, its type and value), less the two
/// fields only we print (`allocated-data-bytes`, `backing-image`).
fn assert_info_like_qemu(d: &Path, image: &str) {
    let theirs = qemu(d, "qemu-img", &["info", "--output=json", image]);
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    let ours = ok(d, &["info", "--output=json", image]);
    let mut ours: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let obj = ours.as_object_mut().unwrap();
    assert!(obj.remove("allocated-data-bytes").is_some());
    obj.remove("backing-image");
    if ours != theirs {
        let (o, t) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
        let mut diff = Vec::new();
        for k in o.keys().chain(t.keys()) {
            if o.get(k) != t.get(k) {
                diff.push(format!("{k}: ours {:?}, qemu {:?}", o.get(k), t.get(k)));
            }
        }
        panic!(
            "img info {image} differs from qemu-img:\n{}",
            diff.join("\n")
        );
    }
    // --json is the same as --output=json.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ok(d, &["info", "--json", image])).unwrap()
            ["format-specific"],
        theirs["format-specific"]
    );
}

#[test]
fn info_json_matches_qemu_img_field_by_field() {
    let _w = common::watchdog("info_json", std::time::Duration::from_secs(240));
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    let create = |args: &[&str]| {
        let mut all = vec!["create", "-f", "qcow2"];
        all.extend_from_slice(args);
        qemu(d, "qemu-img", &all);
    };
    create(&["plain.qcow2", "1M"]);
    create(&["-o", "compat=0.10", "v2.qcow2", "1M"]);
    create(&["-o", "lazy_refcounts=on", "lazy.qcow2", "1M"]);
    create(&["-o", "refcount_bits=64,cluster_size=4k", "r64.qcow2", "1M"]);
    create(&["-o", "refcount_bits=16", "r16.qcow2", "3M"]);
    create(&["b.qcow2", "2M"]);
    create(&["-b", "b.qcow2", "-F", "qcow2", "same-dir.qcow2"]);
    create(&["sub/base.qcow2", "2M"]);
    create(&["-b", "base.qcow2", "-F", "qcow2", "sub/top.qcow2"]);
    create(&["-b", "sub/base.qcow2", "-F", "qcow2", "into-sub.qcow2"]);
    qemu(d, "qemu-img", &["create", "-f", "raw", "disk.raw", "1M"]);
    create(&["-b", "disk.raw", "-F", "raw", "over-raw.qcow2"]);
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 192k", "r16.qcow2"],
    );
    create(&["snaps.qcow2", "1M"]);
    qemu(d, "qemu-img", &["snapshot", "-c", "one", "snaps.qcow2"]);
    qemu(d, "qemu-img", &["snapshot", "-c", "two", "snaps.qcow2"]);
    // A dirty image: the dirty bit set as a crash with lazy refcounts
    // leaves it (incompatible feature bit 0, header byte 79).
    create(&["-o", "lazy_refcounts=on", "dirty.qcow2", "1M"]);
    let mut b = std::fs::read(d.join("dirty.qcow2")).unwrap();
    b[79] |= 1;
    std::fs::write(d.join("dirty.qcow2"), b).unwrap();
    // A corrupt one (incompatible bit 1), and cluster size extremes.
    create(&["corrupt.qcow2", "1M"]);
    let mut b = std::fs::read(d.join("corrupt.qcow2")).unwrap();
    b[79] |= 2;
    std::fs::write(d.join("corrupt.qcow2"), b).unwrap();
    create(&["-o", "cluster_size=2M", "big.qcow2", "10G"]);
    create(&["-o", "cluster_size=512,compat=0.10", "small.qcow2", "100M"]);
    // Persistent bitmaps: one auto, one disabled with another granularity.
    create(&["bitmaps.qcow2", "1M"]);
    qemu(d, "qemu-img", &["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    qemu(
        d,
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "--disable",
            "-g",
            "128k",
            "bitmaps.qcow2",
            "b1",
        ],
    );
    // And one we made.
    ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "ours.qcow2",
            "2M",
        ],
    );
    for image in [
        "plain.qcow2",
        "v2.qcow2",
        "lazy.qcow2",
        "r64.qcow2",
        "r16.qcow2",
        "same-dir.qcow2",
        "sub/top.qcow2",
        "into-sub.qcow2",
        "over-raw.qcow2",
        "disk.raw",
        "snaps.qcow2",
        "dirty.qcow2",
        "corrupt.qcow2",
        "big.qcow2",
        "small.qcow2",
        "bitmaps.qcow2",
        "ours.qcow2",
    ] {
        assert_info_like_qemu(d, image);
    }
    // --backing-chain: an array, one object per image, as qemu-img's.
    for image in [
        "same-dir.qcow2",
        "sub/top.qcow2",
        "into-sub.qcow2",
        "over-raw.qcow2",
    ] {
        let args = ["info", "--output=json", "--backing-chain", image];
        let theirs: serde_json::Value =
            serde_json::from_slice(&qemu(d, "qemu-img", &args).stdout).unwrap();
        let mut ours: serde_json::Value = serde_json::from_str(&ok(d, &args)).unwrap();
        for o in ours.as_array_mut().unwrap() {
            o.as_object_mut().unwrap().remove("allocated-data-bytes");
        }
        assert_eq!(ours, theirs, "{image}");
    }
    // The backing image is named as QEMU names it, not './b.qcow2'.
    let json = ok(d, &["info", "--json", "same-dir.qcow2"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["backing-image"]["filename"], "b.qcow2");
    assert_eq!(v["full-backing-filename"], "b.qcow2");
    let v: serde_json::Value =
        serde_json::from_str(&ok(d, &["info", "--json", "sub/top.qcow2"])).unwrap();
    assert_eq!(v["backing-image"]["filename"], "sub/base.qcow2");
}

#[test]
fn info_human_output_shows_the_same_facts_as_qemu_img() {
    let _w = common::watchdog("info_human", std::time::Duration::from_secs(240));
    if !have("qemu-img") {
        eprintln!("qemu-img not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    qemu(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "sub/base.qcow2", "1M"],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,refcount_bits=64",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "sub/top.qcow2",
        ],
    );
    qemu(d, "qemu-img", &["snapshot", "-c", "s1", "sub/top.qcow2"]);
    let mut b = std::fs::read(d.join("sub/top.qcow2")).unwrap();
    b[79] |= 1;
    std::fs::write(d.join("sub/top.qcow2"), b).unwrap();
    let theirs =
        String::from_utf8(qemu(d, "qemu-img", &["info", "-U", "sub/top.qcow2"]).stdout).unwrap();
    let ours = ok(d, &["info", "sub/top.qcow2"]);
    // Every line QEMU prints about the top image and its file, we print
    // the same (ours adds 'allocated data' and the backing images).
    for line in theirs.lines() {
        assert!(
            ours.lines().any(|l| l == line),
            "missing '{line}' in:\n{ours}\nqemu-img:\n{theirs}"
        );
    }
    for expect in [
        "backing file: base.qcow2 (actual path: sub/base.qcow2)",
        "cleanly shut down: no",
        "    lazy refcounts: true",
        "    refcount bits: 64",
        "Snapshot list:",
    ] {
        assert!(ours.contains(expect), "missing '{expect}' in:\n{ours}");
    }
}

#[test]
fn snapshot_commands_work_like_qemu_img_snapshot() {
    let _w = common::watchdog("snapshot_cmds", std::time::Duration::from_secs(240));
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "-f", "qcow2", "s.qcow2", "4M"]);
    // Nothing listed for an image without snapshots (as qemu-img).
    assert_eq!(ok(d, &["snapshot", "-l", "s.qcow2"]), "");
    ok(
        d,
        &[
            "bench", "--rw", "write", "--count", "8", "--bs", "64k", "--depth", "1", "s.qcow2",
        ],
    );
    ok(d, &["snapshot", "-c", "before", "s.qcow2"]);
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "s.qcow2", "before.raw"],
    );
    qemu(d, "qemu-img", &["snapshot", "-c", "theirs", "s.qcow2"]);
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 9 0 1M", "s.qcow2"],
    );
    let theirs =
        String::from_utf8(qemu(d, "qemu-img", &["snapshot", "-l", "s.qcow2"]).stdout).unwrap();
    assert_eq!(ok(d, &["snapshot", "-l", "s.qcow2"]), theirs);
    assert_eq!(ok(d, &["snapshot", "s.qcow2"]), theirs, "-l is the default");
    assert!(
        theirs.contains("before") && theirs.contains("theirs"),
        "{theirs}"
    );
    ok(d, &["snapshot", "-a", "before", "s.qcow2"]);
    qemu(d, "qemu-img", &["check", "s.qcow2"]);
    let cmp = qemu(d, "qemu-img", &["compare", "s.qcow2", "before.raw"]);
    assert!(String::from_utf8_lossy(&cmp.stdout).contains("identical"));
    ok(d, &["snapshot", "-d", "1", "s.qcow2"]);
    qemu(d, "qemu-img", &["check", "s.qcow2"]);
    let theirs =
        String::from_utf8(qemu(d, "qemu-img", &["snapshot", "-l", "s.qcow2"]).stdout).unwrap();
    assert_eq!(ok(d, &["snapshot", "-l", "s.qcow2"]), theirs);
    assert!(!theirs.contains("before"), "{theirs}");
    // Errors: one line each, exit status 1.
    ok(d, &["create", "-f", "raw", "r.raw", "1M"]);
    for (args, expect) in [
        (&["snapshot", "-a", "nope", "s.qcow2"][..], "no snapshot"),
        (
            &["snapshot", "-c", "theirs", "s.qcow2"][..],
            "already exists",
        ),
        (&["snapshot", "-c", "x", "-d", "y", "s.qcow2"][..], "one of"),
        (&["snapshot", "-l", "r.raw"][..], "no internal snapshots"),
        (&["snapshot", "-l"][..], "expected FILE"),
    ] {
        let r = img(d, args);
        assert_eq!(r.code, 1, "img {args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(expect), "img {args:?}: {}", r.stderr);
    }
    // Guest writes to an image with snapshots copy what they change.
    ok(
        d,
        &[
            "bench",
            "--rw",
            "randwrite",
            "--count",
            "64",
            "--bs",
            "4k",
            "s.qcow2",
        ],
    );
    qemu(d, "qemu-img", &["check", "s.qcow2"]);
    qemu(d, "qemu-img", &["snapshot", "-a", "theirs", "s.qcow2"]);
    let cmp = qemu(d, "qemu-img", &["compare", "s.qcow2", "before.raw"]);
    assert!(String::from_utf8_lossy(&cmp.stdout).contains("identical"));
}

/// The command line's own rules, which the tool keeps by hand over clap's
/// defaults: help on stdout with status 0, usage errors as one line with
/// status 1 (2 for compare), and `-p` drawing nothing where stderr is not
/// a terminal.
#[test]
fn help_usage_errors_and_progress_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["--help"][..],
        &["help"],
        &["help", "bench"],
        &["convert", "-h"],
    ] {
        let r = img(d, args);
        assert_eq!(r.code, 0, "img {args:?}: {}", r.stderr);
        assert!(
            r.stdout.contains("Usage: img"),
            "img {args:?}: {}",
            r.stdout
        );
    }
    assert!(ok(d, &["help"]).contains("snapshot"));
    for (args, code, expect) in [
        (&["compare", "a.raw"][..], 2, "compare: expected A B"),
        (
            &["compare", "--bogus", "a", "b"],
            2,
            "unknown option '--bogus'",
        ),
        (&["info", "a", "b"], 1, "unexpected argument 'b'"),
        (&["resize", "x.raw"], 1, "expected FILE SIZE"),
        (
            &["bench", "--time", "1", "--count", "2"],
            1,
            "cannot be used with",
        ),
        (&["check", "-r", "some", "x"], 1, "-r must be leaks or all"),
    ] {
        let r = img(d, args);
        assert_eq!(r.code, code, "img {args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "img {args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("img: "), "img {args:?}: {}", r.stderr);
        assert!(r.stderr.contains(expect), "img {args:?}: {}", r.stderr);
    }
    // -p is accepted and, with stderr not a terminal, prints nothing there.
    ok(d, &["create", "-f", "raw", "p.raw", "4M"]);
    for args in [
        &["convert", "-p", "-O", "qcow2", "p.raw", "p.qcow2"][..],
        &["bench", "-p", "--stack", "null", "--count", "50"],
        &["bench", "-p", "--stack", "null", "--time", "0.2"],
    ] {
        let r = img(d, args);
        assert_eq!(r.code, 0, "img {args:?}: {}", r.stderr);
        assert_eq!(r.stderr, "", "img {args:?}");
    }
    assert!(ok(d, &["compare", "p.raw", "p.qcow2"]).contains("identical"));
}

/// `convert --stats`' value for `key`.
fn stat(out: &str, key: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("stats: "))
        .unwrap_or_else(|| panic!("no stats line in {out}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// `qemu-img check`'s count of allocated clusters.
fn allocated_clusters(d: &Path, image: &str) -> u64 {
    let out = qemu(d, "qemu-img", &["check", "--output=json", image]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["allocated-clusters"].as_u64().unwrap()
}

#[test]
fn convert_reads_only_what_block_status_says_is_data() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 16 GiB holding 1 MiB: a full read would take seconds to minutes; the
    // counts say what was read.
    qemu(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "big.qcow2", "16G"],
    );
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 5G 1M", "big.qcow2"],
    );
    for (fmt, out) in [("raw", "big.raw"), ("qcow2", "big2.qcow2")] {
        let o = ok(d, &["convert", "--stats", "-O", fmt, "big.qcow2", out]);
        assert_eq!(stat(&o, "source_read_bytes"), 1 << 20, "{o}");
        assert_eq!(stat(&o, "target_write_bytes"), 1 << 20, "{o}");
        let cmp = qemu(d, "qemu-img", &["compare", "big.qcow2", out]);
        assert!(String::from_utf8_lossy(&cmp.stdout).contains("identical"));
    }
    assert!(allocated_clusters(d, "big2.qcow2") <= allocated_clusters(d, "big.qcow2"));
}

#[test]
fn convert_allocates_no_more_clusters_than_qemu_img() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-f", "qcow2", "half.qcow2", "32M"],
    );
    // Every other cluster holds data; some of it is all zeroes, some only
    // one 4 KiB block of the cluster is non-zero.
    let mut cmds = Vec::new();
    for i in (0..512u64).step_by(2) {
        cmds.push(format!("write -P {} {}k 64k", i % 250 + 1, i * 64));
    }
    cmds.push("write -P 0 640k 64k".into());
    cmds.push("write -P 0 1024k 64k".into());
    cmds.push("write -P 9 1028k 4k".into());
    cmds.push("write -z 2M 256k".into());
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push("half.qcow2");
    qemu(d, "qemu-io", &args);
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "half.qcow2", "theirs.qcow2"],
    );
    for (opts, out) in [
        (&[][..], "ours.qcow2"),
        (&["-o", "cluster_size=4k"][..], "small.qcow2"),
    ] {
        let mut args = vec!["convert", "--stats", "-O", "qcow2"];
        args.extend(opts);
        args.extend(["half.qcow2", out]);
        let o = ok(d, &args);
        // The zero blocks are never read, half the clusters are.
        assert!(stat(&o, "source_read_bytes") <= 17 << 20, "{o}");
        qemu(d, "qemu-img", &["check", out]);
        let cmp = qemu(d, "qemu-img", &["compare", "half.qcow2", out]);
        assert!(String::from_utf8_lossy(&cmp.stdout).contains("identical"));
    }
    let (ours, theirs) = (
        allocated_clusters(d, "ours.qcow2"),
        allocated_clusters(d, "theirs.qcow2"),
    );
    assert!(ours <= theirs, "ours {ours} clusters, qemu-img's {theirs}");
    // And a raw target stays as sparse as qemu-img's.
    ok(d, &["convert", "half.qcow2", "ours.raw"]);
    qemu(d, "qemu-img", &["compare", "half.qcow2", "ours.raw"]);
}

/// `qemu-img convert`'s `-n` (an existing target), `--target-is-zero`,
/// `-S 0` (every byte written), `-S SIZE`, `-m` and `-W`: each gives an
/// image identical to the source, and writes what the option says.
#[test]
fn convert_into_existing_targets_and_with_qemu_img_copy_options() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, "qemu-img", &["create", "-f", "qcow2", "s.qcow2", "16M"]);
    qemu(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0 4M 1M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x22 13M 70k",
            "s.qcow2",
        ],
    );
    // What a raw target gets written: the data, in whole 4 KiB granules.
    let data = (1 << 20) + (72 << 10);
    let identical = |img: &str| {
        let cmp = qemu(d, "qemu-img", &["compare", "s.qcow2", img]);
        assert!(
            String::from_utf8_lossy(&cmp.stdout).contains("identical"),
            "{img} differs from the source"
        );
    };
    // -n into a raw file and a qcow2 image full of other bytes: the
    // source's zeroes are zeroed there.
    let garbage = vec![0x5au8; 16 << 20];
    std::fs::write(d.join("t.raw"), &garbage).unwrap();
    qemu(d, "qemu-img", &["create", "-f", "qcow2", "t.qcow2", "16M"]);
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 16M", "t.qcow2"],
    );
    ok(d, &["convert", "-n", "s.qcow2", "t.raw"]);
    identical("t.raw");
    ok(d, &["convert", "-n", "-O", "qcow2", "s.qcow2", "t.qcow2"]);
    identical("t.qcow2");
    qemu(d, "qemu-img", &["check", "t.qcow2"]);
    // With --target-is-zero, only the data is written (and a target that
    // does read zeroes ends up identical).
    qemu(d, "qemu-img", &["create", "-f", "raw", "z.raw", "16M"]);
    let o = ok(
        d,
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "--stats",
            "s.qcow2",
            "z.raw",
        ],
    );
    assert_eq!(stat(&o, "target_write_bytes"), data, "{o}");
    identical("z.raw");
    // Without it, the same command zeroes the rest (the backend counts
    // zeroed bytes as written): a target left with other bytes is
    // identical afterwards.
    std::fs::write(d.join("z.raw"), &garbage).unwrap();
    let o = ok(d, &["convert", "-n", "--stats", "s.qcow2", "z.raw"]);
    assert_eq!(stat(&o, "target_write_bytes"), 16 << 20, "{o}");
    identical("z.raw");
    // -S 0: every byte is written, without asking block_status; a qcow2
    // target is fully allocated.
    let o = ok(
        d,
        &[
            "convert",
            "-S",
            "0",
            "--stats",
            "-O",
            "qcow2",
            "s.qcow2",
            "full.qcow2",
        ],
    );
    assert_eq!(stat(&o, "target_write_bytes"), 16 << 20, "{o}");
    assert_eq!(stat(&o, "block_status_calls"), 0, "{o}");
    assert_eq!(allocated_clusters(d, "full.qcow2"), 256);
    identical("full.qcow2");
    // -S 64k on a raw target: zero 64 KiB granules stay holes, the 70 KiB
    // write becomes two whole granules (128 KiB).
    let o = ok(
        d,
        &["convert", "-S", "64k", "--stats", "s.qcow2", "s64.raw"],
    );
    assert_eq!(
        stat(&o, "target_write_bytes"),
        (1 << 20) + (128 << 10),
        "{o}"
    );
    identical("s64.raw");
    // -m 1 and -W (alone and together) change the schedule, not the
    // result; neither does -t writeback (which flushes the target first).
    for (i, opts) in [
        &["-m", "1"][..],
        &["-W"],
        &["-m", "16", "-W"],
        &["-t", "writeback"],
    ]
    .iter()
    .enumerate()
    {
        let out = format!("m{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(*opts);
        args.extend(["s.qcow2", &out]);
        ok(d, &args);
        identical(&out);
        qemu(d, "qemu-img", &["check", &out]);
    }
    // A target smaller than the source is refused, and left as it was.
    qemu(d, "qemu-img", &["create", "-f", "raw", "small.raw", "1M"]);
    let r = img(d, &["convert", "-n", "s.qcow2", "small.raw"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("smaller than the source"), "{}", r.stderr);
    assert_eq!(
        std::fs::metadata(d.join("small.raw")).unwrap().len(),
        1 << 20
    );
}

#[test]
fn convert_copies_holes_zero_and_compressed_clusters_and_backing_chains() {
    if !have("qemu-img") || !have("qemu-io") {
        eprintln!("qemu-img/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A raw source with holes, and data that is zero in places.
    qemu(d, "qemu-img", &["create", "-f", "raw", "holes.raw", "8M"]);
    qemu(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x21 0 12k",
            "-c",
            "write -P 0 1M 64k",
            "-c",
            "write -P 0x22 3M 5k",
            "-c",
            "write -P 0x23 8188k 4k",
            "holes.raw",
        ],
    );
    // A compressed qcow2 image.
    qemu(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "holes.raw", "comp.qcow2"],
    );
    // A backing chain: base with data, top with data, zero clusters and a
    // discard over the base's data.
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base.qcow2",
            "8M",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x31 0 4M", "base.qcow2"],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x32 1M 100k",
            "-c",
            "write -z 2M 512k",
            "-c",
            "write -P 0x33 6M 64k",
            "top.qcow2",
        ],
    );
    for src in ["holes.raw", "comp.qcow2", "top.qcow2"] {
        for (fmt, out) in [("raw", "out.raw"), ("qcow2", "out.qcow2")] {
            ok(d, &["convert", "-p", "-O", fmt, src, out]);
            let cmp = qemu(d, "qemu-img", &["compare", src, out]);
            assert!(
                String::from_utf8_lossy(&cmp.stdout).contains("identical"),
                "{src} -> {fmt}"
            );
            std::fs::remove_file(d.join(out)).unwrap();
        }
    }
    // The chain's zero clusters over the base's data are not read.
    let o = ok(d, &["convert", "--stats", "top.qcow2", "out.raw"]);
    assert!(
        stat(&o, "source_read_bytes") <= (4 << 20) + (64 << 10),
        "{o}"
    );
}
