//! `img bench` against `qemu-img bench` on the same RBD image, in the same
//! run: both through librbd to the test cluster (`tests/ceph/cluster.sh`,
//! one memstore OSD on loopback), ours through the `rbd` driver, QEMU's
//! through its own rbd driver (`qemu-block-extra`). Each case runs a fixed
//! number of requests in each tool, alternately; the figure is the
//! process's wall time per request, and the ratio the median of the
//! per-round ratios (ours / QEMU's).
//!
//! `cargo bench --features rbd --bench rbd`; `RBD_BENCH_QUICK=1` runs fewer
//! requests and rounds. The cluster: `BLOCKGRAPH_CEPH_CONF`, or started
//! here; without one the bench says why, loudly, and does nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{alternate, median, Table};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The release `img` binary with the `rbd` feature.
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
            .args([
                "build",
                "--release",
                "--features",
                "rbd",
                "--example",
                "img",
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR")),
    );
    target_dir.join("release").join("examples").join("img")
}

fn cluster() -> Result<PathBuf, String> {
    if let Some(conf) = std::env::var_os("BLOCKGRAPH_CEPH_CONF") {
        return Ok(conf.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("start")
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout
        .lines()
        .find_map(|l| l.strip_prefix("BLOCKGRAPH_CEPH_CONF="))
    {
        Some(conf) if out.status.success() => Ok(conf.trim().into()),
        _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

/// Seconds per request of `cmd`, which runs `count` requests.
fn per_request(cmd: &mut Command, count: u64) -> f64 {
    let t = Instant::now();
    run(cmd);
    t.elapsed().as_secs_f64() / count as f64
}

fn main() {
    let conf = match cluster() {
        Ok(conf) => conf,
        Err(why) => {
            eprintln!("\n*** SKIP rbd bench: no Ceph cluster: {why} ***\n");
            return;
        }
    };
    let quick = std::env::var_os("RBD_BENCH_QUICK").is_some_and(|v| v != "0");
    let rounds = if quick { 3 } else { 7 };
    let img = img_binary();
    let image = format!("bench{}", std::process::id());
    let name = format!("rbd:rbd/{image}:conf={}", conf.display());
    run(Command::new("qemu-img").args(["create", "-f", "raw", &name, "256M"]));
    // Every object written once, so reads read data.
    run(Command::new("qemu-img").args([
        "bench", "-w", "-f", "raw", "-c", "256", "-d", "8", "-s", "1M", &name,
    ]));

    // (case, ours' --rw, qemu-img's -w, block size, depth, requests)
    let scale = if quick { 4 } else { 1 };
    let cases: [(&str, &str, bool, &str, &str, u64); 4] = [
        (
            "4 KiB sequential read, QD 32",
            "read",
            false,
            "4k",
            "32",
            20_000 / scale,
        ),
        (
            "4 KiB sequential write, QD 32",
            "write",
            true,
            "4k",
            "32",
            10_000 / scale,
        ),
        (
            "1 MiB sequential read, QD 8",
            "read",
            false,
            "1M",
            "8",
            1_000 / scale,
        ),
        (
            "1 MiB sequential write, QD 8",
            "write",
            true,
            "1M",
            "8",
            500 / scale,
        ),
    ];
    let mut table = Table::new(&[
        "case",
        "ours (µs/req)",
        "qemu-img (µs/req)",
        "ours / qemu-img",
    ])
    .left_aligned(1);
    for (case, rw, write, bs, depth, count) in cases {
        let n = count.to_string();
        let m = alternate(
            rounds,
            || {
                let mut c = Command::new("qemu-img");
                c.args(["bench", "-f", "raw", "-c", &n, "-d", depth, "-s", bs]);
                if write {
                    c.arg("-w");
                }
                per_request(c.arg(&name), count)
            },
            || {
                per_request(
                    Command::new(&img).args([
                        "bench", "-f", "raw", "--rw", rw, "-c", &n, "-d", depth, "--bs", bs,
                        "--size", "256M", &name,
                    ]),
                    count,
                )
            },
        );
        table.row([
            case.to_string(),
            format!("{:.1}", median(&m.b) * 1e6),
            format!("{:.1}", median(&m.a) * 1e6),
            format!("{:.2}x", m.ratio()),
        ]);
    }
    let _ = Command::new("rbd")
        .arg("-c")
        .arg(&conf)
        .args(["rm", &format!("rbd/{image}")])
        .output();
    println!(
        "\nimg bench vs qemu-img bench on one RBD image (256 MiB, memstore OSD on loopback), \
         {rounds} alternated rounds, process wall time per request (connect included)\n"
    );
    table.print();
    println!("\n{}", common::machine());
}
