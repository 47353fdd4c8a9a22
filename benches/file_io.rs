//! File I/O: `img bench` against `qemu-img bench` on the same images, in
//! the same run (issue 11's table).
//!
//! Cells: raw and qcow2, page cache and `O_DIRECT`, 4 KiB random reads and
//! writes at queue depth 1 and 32, and 64 KiB sequential reads and writes
//! at depth 1 and 32. Our side runs twice per cell, with `aio=io_uring`
//! and with `aio=threads` (the thread pool: the "before" column); QEMU's
//! side runs once per `aio=` mode it accepts for the cell (`threads`,
//! `native` with `O_DIRECT` only, `io_uring`), and its best mode (the one
//! with the highest median over the rounds) counts. A round runs every side
//! of a cell back to back (the order rotating between rounds) before moving
//! to the next cell; a figure is the median over rounds, a ratio the median
//! of per-round ratios (ours/QEMU's best mode; above 1 means ours is
//! faster).
//!
//! `qemu-img bench` has no random mode: for the random cells it steps
//! through the image 7919 blocks at a time (a prime, so every block is
//! visited once per cycle and consecutive requests land far apart); ours
//! uses `--rw randread`/`randwrite`. Its request count is calibrated per
//! cell so that a run lasts about as long as ours (`--time`).
//!
//! The two sides do not treat memory alike, in QEMU's favour: `qemu-img
//! bench` (10.0) sets up one buffer per request of the queue but passes
//! the first one to every request, so all of its requests in flight read
//! into, or write from, the same `--bs` bytes; ours gives each request its
//! own, as a guest's requests have. At 64 KiB and depth 32 that is 64 KiB
//! of memory for the kernel (or the virtual disk) to pin and fill, against
//! 2 MiB; `benches/README.md` has what it is worth.
//!
//! ```text
//! cargo bench --bench file_io                          # 1 GiB images, 3 s per run, 2 rounds
//! FILE_IO_BENCH_QUICK=1 cargo bench --bench file_io    # 256 MiB, 1 s per run, 1 round
//! FILE_IO_BENCH_SIZE=4G FILE_IO_BENCH_SECS=5 FILE_IO_BENCH_ROUNDS=3 cargo bench --bench file_io
//! FILE_IO_BENCH_FILTER=qcow2 cargo bench --bench file_io   # only cells whose name contains it
//! ```
//!
//! Not a test: it prints a Markdown table and fails only if a tool does.
//! Needs qemu-img and qemu-io; says so and exits 0 without them.

mod common;
// The tests' process helpers; the file depends on nothing else of theirs.
#[path = "../tests/common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{machine, median, median_ratio, Table};
use process::{have, run};

fn env_size(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let (digits, shift) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 10),
        'm' | 'M' => (&v[..v.len() - 1], 20),
        'g' | 'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits.parse::<u64>().ok().map(|n| n << shift)
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// One cell of the table.
#[derive(Clone, Copy)]
struct Cell {
    format: &'static str,
    direct: bool,
    write: bool,
    random: bool,
    bs: u64,
    depth: u32,
}

impl Cell {
    fn name(&self) -> String {
        format!(
            "{} {} {} {} KiB {}, qd{}",
            self.format,
            if self.direct {
                "O_DIRECT"
            } else {
                "page cache"
            },
            if self.random { "rand" } else { "seq" },
            self.bs >> 10,
            if self.write { "write" } else { "read" },
            self.depth
        )
    }
}

/// Writes back what the last run left dirty, then puts `image` in the page
/// cache (page-cache cells) or drops its cached pages (`O_DIRECT` cells:
/// with pages of the range cached, the kernel cannot do an `O_DIRECT` write
/// without blocking, so io_uring hands it to a worker, serialised per file —
/// a leftover of the page-cache cells that would make io_uring look slow for
/// no reason a real VM has). Done before every run, for both sides alike.
fn prepare(image: &Path, direct: bool) {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    let mut file = std::fs::File::open(image).expect("image opens");
    // No dirty pages of the last run left to write back during this one.
    file.sync_all().expect("fsync");
    if direct {
        // SAFETY: an advice call on our own open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    } else {
        let mut buf = vec![0u8; 1 << 20];
        while file.read(&mut buf).expect("read") > 0 {}
    }
}

/// Our `img bench` on `image` with `aio`: IOPS.
fn ours(bin: &Path, image: &Path, cell: Cell, aio: &str, secs: f64) -> f64 {
    prepare(image, cell.direct);
    let rw = match (cell.random, cell.write) {
        (true, false) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (false, true) => "write",
    };
    let stack = format!(
        "{}/file:direct={},aio={aio}",
        cell.format,
        if cell.direct { "on" } else { "off" }
    );
    let out = run(Command::new(bin)
        .args(["bench", "--stack", &stack, "--rw", rw])
        .args(["--bs", &cell.bs.to_string(), "-d", &cell.depth.to_string()])
        .args(["--time", &secs.to_string()])
        .arg(image));
    // "  ops: N  IOPS: N  throughput: ..."
    out.split("IOPS: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no IOPS in img bench output:\n{out}"))
}

/// `qemu-img bench` with `-i aio` and `count` requests: IOPS, or `None`
/// when it refuses the mode for this cell.
fn qemu_run(image: &Path, cell: Cell, aio: &str, count: u64) -> Option<f64> {
    let step = if cell.random { 7919 * cell.bs } else { cell.bs };
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", cell.format])
        .args(["-t", if cell.direct { "none" } else { "writeback" }])
        .args(["-i", aio])
        .args(["-c", &count.to_string(), "-d", &cell.depth.to_string()])
        .args(["-s", &cell.bs.to_string(), "-S", &step.to_string()]);
    if cell.write {
        cmd.args(["-w", "--pattern=90"]);
    }
    cmd.arg(image);
    let out = cmd.output().expect("qemu-img runs");
    if !out.status.success() {
        // Refused (a mode this build or this cell cannot use) or failed:
        // the round does not count for this mode. Said, so that a failure
        // is not mistaken for a slow mode.
        eprintln!(
            "qemu-img bench -i {aio} on {}: {} {}",
            cell.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "Run completed in 1.234 seconds."
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no time in qemu-img bench output:\n{text}"));
    Some(count as f64 / secs.max(1e-6))
}

/// QEMU's side for one mode: a short calibration run, then one of about
/// `secs`.
fn qemu(image: &Path, cell: Cell, aio: &str, secs: f64) -> Option<f64> {
    let probe = if cell.depth > 1 { 4000 } else { 1000 };
    prepare(image, cell.direct);
    let rate = qemu_run(image, cell, aio, probe)?;
    let count = ((rate * secs) as u64).max(probe);
    prepare(image, cell.direct);
    qemu_run(image, cell, aio, count)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used.
    for tool in ["qemu-img", "qemu-io"] {
        if !have(tool) {
            println!("file_io bench: skipped, {tool} is not installed");
            return;
        }
    }
    let quick = std::env::var_os("FILE_IO_BENCH_QUICK").is_some();
    let size = env_size("FILE_IO_BENCH_SIZE").unwrap_or(if quick { 256 << 20 } else { 1 << 30 });
    let secs: f64 = env_num("FILE_IO_BENCH_SECS").unwrap_or(if quick { 1.0 } else { 3.0 });
    let rounds: usize = env_num("FILE_IO_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 2 });
    let filter = std::env::var("FILE_IO_BENCH_FILTER").unwrap_or_default();

    process::build_example("img");
    let bin: PathBuf = process::profile_dir().join("examples").join("img");
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("bench.raw");
    let qcow2 = dir.path().join("bench.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg(size.to_string()));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 0x5a 0 {size}")])
        .arg(&raw));
    // Fully allocated, so writes measure overwrites, as on a used disk.
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));

    let mut cells = Vec::new();
    for format in ["raw", "qcow2"] {
        for direct in [false, true] {
            for (random, bs) in [(true, 4096), (false, 64 << 10)] {
                for write in [false, true] {
                    for depth in [1, 32] {
                        cells.push(Cell {
                            format,
                            direct,
                            write,
                            random,
                            bs,
                            depth,
                        });
                    }
                }
            }
        }
    }
    cells.retain(|c| c.name().contains(&filter));

    println!("# file_io: img bench against qemu-img bench");
    println!();
    println!("{}", machine());
    println!(
        "images {} MiB (raw, qcow2 fully allocated), {secs} s per run, {rounds} round(s); {}",
        size >> 20,
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| format!(
                "loadavg {}",
                l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
            ))
            .unwrap_or_default()
    );
    println!();
    let mut table = Table::new(&[
        "cell",
        "ours io_uring",
        "ours threads",
        "QEMU best",
        "QEMU mode",
        "io_uring/QEMU",
        "threads/QEMU",
    ]);
    let started = Instant::now();
    for cell in cells {
        let image = if cell.format == "raw" { &raw } else { &qcow2 };
        let modes: &[&str] = if cell.direct {
            &["threads", "native", "io_uring"]
        } else {
            &["threads", "io_uring"]
        };
        let (mut uring, mut threads) = (Vec::new(), Vec::new());
        // Per mode, its IOPS in each round (`None`: it failed or refused).
        let mut per_mode: Vec<Vec<Option<f64>>> = vec![Vec::new(); modes.len()];
        for round in 0..rounds {
            // Ours with io_uring, ours with threads, then QEMU's modes,
            // starting at a different side each round.
            let n = 2 + modes.len();
            for i in 0..n {
                match (i + round) % n {
                    0 => uring.push(ours(&bin, image, cell, "io_uring", secs)),
                    1 => threads.push(ours(&bin, image, cell, "threads", secs)),
                    k => per_mode[k - 2].push(qemu(image, cell, modes[k - 2], secs)),
                }
            }
        }
        // QEMU's best mode is the one with the highest median over the
        // rounds, and ours is compared with that mode's runs. Taking the
        // best mode per round instead would compare one of our runs with
        // the largest of two or three of QEMU's: where the modes are alike
        // and the device is noisy (`O_DIRECT` 64 KiB), that alone favours
        // QEMU by most of a standard deviation.
        // (A round where a mode failed does not count for it, and its
        // ratio is left out.)
        let ran = |runs: &[Option<f64>]| runs.iter().flatten().copied().collect::<Vec<f64>>();
        let (mode, best) = modes
            .iter()
            .zip(&per_mode)
            .filter(|(_, runs)| runs.iter().any(Option::is_some))
            .max_by(|a, b| median(&ran(a.1)).total_cmp(&median(&ran(b.1))))
            .map(|(m, runs)| (*m, runs.clone()))
            .unwrap_or(("none", vec![None; rounds]));
        let paired = |ours: &[f64], theirs: &[Option<f64>]| -> (Vec<f64>, Vec<f64>) {
            ours.iter()
                .zip(theirs)
                .filter_map(|(o, t)| t.map(|t| (*o, t)))
                .unzip()
        };
        let per_round_max: Vec<Option<f64>> = (0..rounds)
            .map(|r| {
                per_mode
                    .iter()
                    .filter_map(|runs| runs[r])
                    .max_by(f64::total_cmp)
            })
            .collect();
        eprintln!(
            "{}: QEMU per mode (median IOPS) {}; io_uring against the best mode per round {:.2}",
            cell.name(),
            modes
                .iter()
                .zip(&per_mode)
                .map(|(m, runs)| format!("{m} {:.0}", median(&ran(runs))))
                .collect::<Vec<_>>()
                .join(", "),
            {
                let (o, t) = paired(&uring, &per_round_max);
                median_ratio(&o, &t)
            },
        );
        let (uring_paired, best_for_uring) = paired(&uring, &best);
        let (threads_paired, best_for_threads) = paired(&threads, &best);
        let row = [
            cell.name(),
            format!("{:.0}", median(&uring)),
            format!("{:.0}", median(&threads)),
            format!("{:.0}", median(&ran(&best))),
            mode.to_string(),
            format!("{:.2}", median_ratio(&uring_paired, &best_for_uring)),
            format!("{:.2}", median_ratio(&threads_paired, &best_for_threads)),
        ];
        eprintln!("{}", row.join(" | "));
        table.row(row);
    }
    println!("IOPS per cell (4 KiB and 64 KiB requests); ratios above 1 mean ours is faster.");
    println!(
        "qemu-img bench puts every request in flight in one buffer; ours gives each its own \
         (see the bench's docs)."
    );
    println!();
    table.print();
    println!();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!(
        "({:.0} s in all; loadavg at the end {load})",
        started.elapsed().as_secs_f64()
    );
}
