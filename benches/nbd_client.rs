//! The `nbd` driver against QEMU's own NBD client: `img bench` (the img
//! example over an `nbd` node) and `qemu-img bench`, on the same
//! `nbd+unix://` URI of one `qemu-nbd` export, in the same run.
//!
//! Cases: 4 KiB reads and writes at queue depth 1 and 32. `img bench`
//! uses `--rw randread|randwrite` (uniformly random aligned offsets);
//! `qemu-img bench` has no random mode, so it steps through the image by
//! 7919 blocks of 4 KiB (a prime, coprime with the power-of-two block
//! count, as `benches/storage_daemon.rs` does), which lands consecutive
//! requests far apart. In each round every case runs both clients, in an
//! order that flips every round; a cell is the median over rounds, the
//! ratio the median of per-round ratios (ours/QEMU; above 1 means ours is
//! faster). The server is the same process for both, so the figures
//! compare the clients (and their I/O paths), not the servers.
//!
//! ```text
//! cargo bench --bench nbd_client                         # 1 GiB image, 5 rounds
//! NBD_CLIENT_BENCH_QUICK=1 cargo bench --bench nbd_client    # 128 MiB, 3 rounds, fewer requests
//! NBD_CLIENT_BENCH_ROUNDS=7 cargo bench --bench nbd_client
//! ```
//!
//! Not a test: it prints a Markdown table and fails only if a tool does.
//! Needs qemu-img, qemu-io and qemu-nbd; says so and exits 0 without them.

mod common;
// The tests' process helpers; the file depends on nothing else of theirs.
#[path = "../tests/common/process.rs"]
mod process;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{machine, median, median_ratio, qemu_tool_version, Table};
use process::{have, run};

/// The release `img` binary, built if missing (cargo rebuilds only what
/// changed).
fn img_binary() -> PathBuf {
    process::build_example("img");
    process::profile_dir().join("examples").join("img")
}

/// `qemu-nbd` serving `image` raw as export `disk`; killed when dropped.
struct Server(Child);

impl Server {
    fn start(image: &Path, sock: &Path) -> Server {
        let _ = std::fs::remove_file(sock);
        let child = Command::new("qemu-nbd")
            .args(["-t", "-e", "4", "-x", "disk", "-f", "raw", "--cache=none"])
            .arg("-k")
            .arg(sock)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-nbd: {e}"));
        let start = Instant::now();
        // The socket file exists from bind(); wait until it accepts.
        while UnixStream::connect(sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One case: 4 KiB, this depth, read or write, `count` requests.
struct Case {
    name: String,
    depth: u32,
    write: bool,
    count: u64,
}

/// `img bench` over the URI: requests per second.
fn ours(img: &Path, url: &str, c: &Case) -> f64 {
    let rw = if c.write { "randwrite" } else { "randread" };
    let out = run(Command::new(img)
        .args(["bench", "-f", "raw", "--rw", rw, "--bs", "4k"])
        .args(["-d", &c.depth.to_string(), "-c", &c.count.to_string()])
        .arg(url));
    // "  ops: N  IOPS: N  throughput: …"
    out.split("IOPS: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no IOPS in img bench output:\n{out}"))
}

/// `qemu-img bench` over the URI: requests per second.
fn qemu(url: &str, c: &Case) -> f64 {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw", "-t", "none", "-s", "4096"])
        .args(["-c", &c.count.to_string(), "-d", &c.depth.to_string()])
        .args(["-S", &(7919u64 * 4096).to_string()]);
    if c.write {
        cmd.args(["-w", "--pattern=90"]);
    }
    let out = run(cmd.arg(url));
    // "Run completed in 1.234 seconds."
    let secs: f64 = out
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no time in qemu-img bench output:\n{out}"));
    c.count as f64 / secs
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used.
    for tool in ["qemu-img", "qemu-io", "qemu-nbd"] {
        if !have(tool) {
            println!("nbd_client bench: skipped, {tool} is not installed");
            return;
        }
    }
    let quick = std::env::var_os("NBD_CLIENT_BENCH_QUICK").is_some();
    let size: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let rounds: usize = std::env::var("NBD_CLIENT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3 } else { 5 });
    let (qd1, qd32) = if quick {
        (10_000, 40_000)
    } else {
        (50_000, 200_000)
    };

    let img = img_binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("bench.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&image)
        .arg(size.to_string()));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 0x5a 0 {size}")])
        .arg(&image));
    let sock = dir.path().join("nbd.sock");
    let url = format!("nbd+unix:///disk?socket={}", sock.display());

    let mut cases = Vec::new();
    for write in [false, true] {
        for (depth, count) in [(1, qd1), (32, qd32)] {
            cases.push(Case {
                name: format!(
                    "4 KiB random {}, depth {depth}",
                    if write { "write" } else { "read" }
                ),
                depth,
                write,
                count,
            });
        }
    }

    let server = Server::start(&image, &sock);
    let mut results: Vec<(Vec<f64>, Vec<f64>)> =
        cases.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for round in 0..rounds {
        for (c, r) in cases.iter().zip(results.iter_mut()) {
            if round % 2 == 0 {
                r.0.push(ours(&img, &url, c));
                r.1.push(qemu(&url, c));
            } else {
                r.1.push(qemu(&url, c));
                r.0.push(ours(&img, &url, c));
            }
        }
        eprintln!("nbd_client bench: round {}/{rounds} done", round + 1);
    }
    drop(server);

    println!(
        "\nnbd driver (img bench) vs QEMU's nbd client (qemu-img bench) {}: \
         raw image of {} MiB served by qemu-nbd over a Unix socket, {rounds} rounds{}",
        qemu_tool_version("qemu-img"),
        size >> 20,
        if quick { " (quick mode)" } else { "" }
    );
    println!("machine: {}\n", machine());
    let mut t = Table::new(&[
        "case",
        "ours IOPS (median)",
        "QEMU IOPS (median)",
        "ours/QEMU",
    ])
    .left_aligned(1);
    for (c, (a, b)) in cases.iter().zip(&results) {
        t.row([
            c.name.clone(),
            format!("{:.0}", median(a)),
            format!("{:.0}", median(b)),
            format!("{:.2}", median_ratio(a, b)),
        ]);
    }
    t.print();
}
