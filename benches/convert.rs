//! `img convert` against `qemu-img convert`: the issue 11 cases, built with
//! qemu-img, each converted by our release `img` and by `qemu-img`
//! alternately; the ratio is the median of the per-round ratios of wall
//! times (ours / QEMU's).
//!
//! `CONVERT_QUICK=1`: 64 MiB images and 3 rounds (default: 1 GiB, 7 rounds).
//! The 16 GiB image holding 1 MiB is the same in both modes.

mod common;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{alternate, median, Table};

/// Runs `cmd`; panics with its output if it fails (a bench, not a tool).
fn run(cmd: &mut Command) {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The release `img` binary, built (cargo rebuilds only what changed).
fn img_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("bench binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--example", "img", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR")),
    );
    target_dir.join("release").join("examples").join("img")
}

/// A raw file of `size` bytes: data (half-compressible bytes) in every
/// MiB, or with `half`, in every other MiB with holes between.
fn make_raw(path: &Path, size: u64, half: bool) {
    let mut f = fs::File::create(path).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (1u64 << 20).min(size - off) as usize;
        if half && (off >> 20) % 2 == 1 {
            off += n as u64;
            continue;
        }
        for b in buf[..n].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x as u8 & 0x0f) | 1;
        }
        use std::os::unix::fs::FileExt as _;
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
    f.set_len(size).unwrap();
    f.flush().unwrap();
}

fn qemu_img(dir: &Path, args: &[&str]) {
    run(Command::new("qemu-img").args(args).current_dir(dir));
}

/// Seconds `cmd` takes, after removing `out`.
fn timed(dir: &Path, out: &str, cmd: &mut Command) -> f64 {
    let _ = fs::remove_file(dir.join(out));
    let t = Instant::now();
    run(cmd.current_dir(dir));
    t.elapsed().as_secs_f64()
}

fn main() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("qemu-img is not installed; nothing to compare against");
        return;
    }
    let quick = std::env::var_os("CONVERT_QUICK").is_some_and(|v| v != "0");
    let (size, rounds) = if quick {
        (64u64 << 20, 3)
    } else {
        (1 << 30, 7)
    };
    let img = img_binary();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_raw(&d.join("full.raw"), size, false);
    make_raw(&d.join("half.raw"), size, true);
    qemu_img(d, &["convert", "-O", "qcow2", "full.raw", "full.qcow2"]);
    qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "full.raw", "comp.qcow2"],
    );
    qemu_img(d, &["convert", "-O", "qcow2", "half.raw", "half.qcow2"]);
    qemu_img(d, &["create", "-f", "qcow2", "sparse.qcow2", "16G"]);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 5G 1M", "sparse.qcow2"])
        .current_dir(d));

    let cases: [(&str, &str, &str, &str); 6] = [
        ("qcow2 → qcow2", "full.qcow2", "qcow2", "qcow2"),
        ("raw → raw", "full.raw", "raw", "raw"),
        ("raw → qcow2", "full.raw", "raw", "qcow2"),
        ("compressed qcow2 → raw", "comp.qcow2", "qcow2", "raw"),
        ("half-allocated qcow2 → raw", "half.qcow2", "qcow2", "raw"),
        (
            "16 GiB qcow2 holding 1 MiB → raw",
            "sparse.qcow2",
            "qcow2",
            "raw",
        ),
    ];
    let mut table = Table::new(&["case", "ours (s)", "qemu-img (s)", "ours / qemu-img"]);
    for (name, src, src_fmt, out_fmt) in cases {
        let m = alternate(
            rounds,
            || {
                timed(
                    d,
                    "theirs.out",
                    Command::new("qemu-img").args([
                        "convert",
                        "-f",
                        src_fmt,
                        "-O",
                        out_fmt,
                        src,
                        "theirs.out",
                    ]),
                )
            },
            || {
                timed(
                    d,
                    "ours.out",
                    Command::new(&img)
                        .args(["convert", "-f", src_fmt, "-O", out_fmt, src, "ours.out"]),
                )
            },
        );
        // The outputs must be the same, or the times mean nothing.
        qemu_img(
            d,
            &[
                "compare",
                "-f",
                out_fmt,
                "-F",
                out_fmt,
                "ours.out",
                "theirs.out",
            ],
        );
        table.row([
            name.to_string(),
            format!("{:.3}", median(&m.b)),
            format!("{:.3}", median(&m.a)),
            format!("{:.2}x", m.ratio()),
        ]);
    }
    println!(
        "\nimg convert vs qemu-img convert: {} images, {rounds} alternated rounds, median wall times\n",
        if quick { "64 MiB" } else { "1 GiB" }
    );
    table.print();
    println!("\n{}", common::machine());
}
