//! The storage daemon against `qemu-storage-daemon`, serving the same image
//! over a Unix-socket NBD export to the same clients in the same run.
//!
//! Cases: `qemu-img bench` 4 KiB reads and writes at queue depth 1 and 32,
//! and `nbdcopy` of the whole image out of the export (to `null:`) and
//! into it. Each round starts one daemon, runs every case, stops it, then
//! does the same with the other (the order flips every round); a cell is
//! the median over rounds, the ratio the median of per-round ratios
//! (ours/QEMU; above 1 means ours is faster).
//!
//! `qemu-img bench` has no random mode: it steps through the image. The
//! step here is 7919 blocks of 4 KiB (a prime, so coprime with the
//! power-of-two block count, wrapping around the image), so consecutive
//! requests land far apart and every block is visited once per cycle.
//!
//! The exported node is a raw image in a temporary directory (page-cached
//! after it is written) by default; `STORAGE_DAEMON_BENCH_NODE=direct`
//! opens it with `cache.direct=on,aio=io_uring` in both daemons (`O_DIRECT`:
//! every read goes to the disk, and how a reply's data reaches its buffer
//! counts); `STORAGE_DAEMON_BENCH_NODE=null`
//! exports a `null-co` node (`read-zeroes=off`) instead, which leaves the
//! export's own cost (socket, protocol, request tasks) and nothing of the
//! file path; `STORAGE_DAEMON_BENCH_DIR=/dev/shm` puts the image on tmpfs
//! (memory-backed: no writeback).
//!
//! ```text
//! cargo bench --bench storage_daemon                            # 1 GiB image, 5 rounds
//! STORAGE_DAEMON_BENCH_QUICK=1 cargo bench --bench storage_daemon   # 128 MiB, 3 rounds, fewer requests
//! STORAGE_DAEMON_BENCH_SIZE=4G STORAGE_DAEMON_BENCH_ROUNDS=7 cargo bench --bench storage_daemon
//! STORAGE_DAEMON_BENCH_NODE=direct cargo bench --bench storage_daemon   # O_DIRECT, io_uring
//! STORAGE_DAEMON_BENCH_NODE=null cargo bench --bench storage_daemon   # null-co: the export alone
//! STORAGE_DAEMON_BENCH_DIR=/dev/shm cargo bench --bench storage_daemon
//! ```
//!
//! Not a test: it prints a Markdown table and fails only if a tool or a
//! daemon does. Needs qemu-img, qemu-storage-daemon and nbdcopy; says so
//! and exits 0 without them.

mod common;
// The tests' process helpers; the file depends on nothing else of theirs.
#[path = "../tests/common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{machine, median, median_ratio, qemu_tool_version, Table};
use process::{have, run};

fn env_size(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let (digits, shift) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 10),
        'm' | 'M' => (&v[..v.len() - 1], 20),
        'g' | 'G' => (&v[..v.len() - 1], 30),
        't' | 'T' => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}

/// The release `storage_daemon` binary, built if missing. Always asks
/// cargo: it rebuilds only what changed.
fn daemon_binary() -> PathBuf {
    process::build_example("storage_daemon");
    process::profile_dir()
        .join("examples")
        .join("storage_daemon")
}

/// A running daemon; killed if still running when dropped.
struct Daemon(Child, PathBuf);

/// What the export serves.
#[derive(Clone, Copy, PartialEq)]
enum Node {
    /// `file` + `raw` on the image.
    File,
    /// The same with `cache.direct=on,aio=io_uring` on the file.
    Direct,
    /// `null-co` of the image's size, `read-zeroes=off`.
    Null,
}

impl Node {
    /// The `--blockdev` arguments that make the node `d0`.
    fn blockdevs(self, image: &Path, size: u64) -> Vec<String> {
        match self {
            Node::File | Node::Direct => vec![
                "--blockdev".into(),
                format!(
                    "driver=file,node-name=f0,filename={}{}",
                    image.display(),
                    if self == Node::Direct {
                        ",cache.direct=on,aio=io_uring"
                    } else {
                        ""
                    }
                ),
                "--blockdev".into(),
                "driver=raw,node-name=d0,file=f0".into(),
            ],
            Node::Null => vec![
                "--blockdev".into(),
                format!("driver=null-co,node-name=d0,size={size},read-zeroes=off"),
            ],
        }
    }
}

impl Daemon {
    fn start(bin: &Path, blockdevs: &[String], sock: &Path) -> Daemon {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(bin)
            .args(blockdevs)
            .args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", sock.display()),
                "--export",
                "type=nbd,id=e0,node-name=d0,name=disk,writable=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} did not start",
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon(child, sock.to_owned())
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One case: a name and a client run returning a rate.
struct Case {
    name: String,
    unit: &'static str,
    run: Box<dyn Fn(&str) -> f64>,
}

/// `qemu-img bench` over the export: requests per second.
fn qemu_img_bench(count: u64, depth: u32, write: bool) -> Box<dyn Fn(&str) -> f64> {
    Box::new(move |url| {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["bench", "-f", "raw", "-t", "none", "-s", "4096"])
            .args(["-c", &count.to_string(), "-d", &depth.to_string()])
            .args(["-S", &(7919u64 * 4096).to_string()]);
        if write {
            cmd.args(["-w", "--pattern=90"]);
        }
        cmd.arg(url);
        let out = run(&mut cmd);
        // "Run completed in 1.234 seconds."
        let secs: f64 = out
            .split("Run completed in ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no time in qemu-img bench output:\n{out}"));
        count as f64 / secs
    })
}

/// `nbdcopy` of the whole export out to `null:` or in from `src`: MiB/s.
fn nbdcopy(size: u64, src: Option<PathBuf>) -> Box<dyn Fn(&str) -> f64> {
    Box::new(move |url| {
        let mut cmd = Command::new("nbdcopy");
        match &src {
            None => cmd.args([url, "null:"]),
            Some(file) => cmd.arg(file).arg(url),
        };
        let start = Instant::now();
        run(&mut cmd);
        size as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used.
    for tool in ["qemu-img", "qemu-storage-daemon", "nbdcopy"] {
        if !have(tool) {
            println!("storage_daemon bench: skipped, {tool} is not installed");
            return;
        }
    }
    let quick = std::env::var_os("STORAGE_DAEMON_BENCH_QUICK").is_some();
    let size =
        env_size("STORAGE_DAEMON_BENCH_SIZE").unwrap_or(if quick { 128 << 20 } else { 1 << 30 });
    let rounds: usize = std::env::var("STORAGE_DAEMON_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3 } else { 5 });
    let (qd1, qd32) = if quick {
        (10_000, 40_000)
    } else {
        (50_000, 200_000)
    };

    let node = match std::env::var("STORAGE_DAEMON_BENCH_NODE").as_deref() {
        Ok("null") => Node::Null,
        Ok("direct") => Node::Direct,
        Ok("file") | Err(_) => Node::File,
        Ok(other) => panic!("STORAGE_DAEMON_BENCH_NODE={other}: use file, direct or null"),
    };

    let ours = daemon_binary();
    let dir = match std::env::var_os("STORAGE_DAEMON_BENCH_DIR") {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let image = dir.path().join("bench.raw");
    let src = dir.path().join("src.raw");
    for (file, pattern) in [(&image, "0x5a"), (&src, "0xa5")] {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(file)
            .arg(size.to_string()));
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 {size}")])
            .arg(file));
    }
    let sock = dir.path().join("nbd.sock");
    let url = format!("nbd+unix:///disk?socket={}", sock.display());

    let cases = [
        Case {
            name: "4 KiB read, depth 1".into(),
            unit: "IOPS",
            run: qemu_img_bench(qd1, 1, false),
        },
        Case {
            name: "4 KiB read, depth 32".into(),
            unit: "IOPS",
            run: qemu_img_bench(qd32, 32, false),
        },
        Case {
            name: "4 KiB write, depth 1".into(),
            unit: "IOPS",
            run: qemu_img_bench(qd1, 1, true),
        },
        Case {
            name: "4 KiB write, depth 32".into(),
            unit: "IOPS",
            run: qemu_img_bench(qd32, 32, true),
        },
        Case {
            name: format!("nbdcopy {} MiB out (to null:)", size >> 20),
            unit: "MiB/s",
            run: nbdcopy(size, None),
        },
        Case {
            name: format!("nbdcopy {} MiB in (from a file)", size >> 20),
            unit: "MiB/s",
            run: nbdcopy(size, Some(src.clone())),
        },
    ];

    let mut results: Vec<(Vec<f64>, Vec<f64>)> =
        cases.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for round in 0..rounds {
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            let bin: &Path = if is_ours {
                &ours
            } else {
                Path::new("qemu-storage-daemon")
            };
            let d = Daemon::start(bin, &node.blockdevs(&image, size), &sock);
            for (case, r) in cases.iter().zip(results.iter_mut()) {
                let v = (case.run)(&url);
                if is_ours {
                    r.0.push(v)
                } else {
                    r.1.push(v)
                }
            }
            d.stop();
        }
        eprintln!("storage_daemon bench: round {}/{rounds} done", round + 1);
    }

    let what = match node {
        Node::File => format!("raw image of {} MiB on {}", size >> 20, fs_of(dir.path())),
        Node::Direct => format!(
            "raw image of {} MiB on {}, O_DIRECT and io_uring",
            size >> 20,
            fs_of(dir.path())
        ),
        Node::Null => format!("null-co node of {} MiB", size >> 20),
    };
    println!(
        "\nstorage_daemon vs qemu-storage-daemon {}: {what}, \
         NBD over a Unix socket, {rounds} rounds{}",
        qemu_tool_version("qemu-storage-daemon"),
        if quick { " (quick mode)" } else { "" }
    );
    println!("machine: {}\n", machine());
    let mut t = Table::new(&[
        "case",
        "unit",
        "ours (median)",
        "QEMU (median)",
        "ours/QEMU",
    ])
    .left_aligned(2);
    for (case, (a, b)) in cases.iter().zip(&results) {
        t.row([
            case.name.clone(),
            case.unit.to_string(),
            format!("{:.0}", median(a)),
            format!("{:.0}", median(b)),
            format!("{:.2}", median_ratio(a, b)),
        ]);
    }
    t.print();
}

fn fs_of(path: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}
