//! Mirror benchmark (not a timed test): in one run,
//!
//! 1. a mirror (`sync=full`, background, to a new raw file, completed as
//!    soon as it is READY) of a raw image full of data, against
//!    `qemu-img convert -O raw` of the same image — the ratio of the wall
//!    times;
//! 2. guest 4 KiB random-write latency (p50/p99) on that image with no
//!    mirror, and with a mirror running in each copy mode (rate-limited
//!    so that it runs for the whole measurement).
//!
//! Size: `MIRROR_BENCH_SIZE` (bytes, default 1 GiB); `MIRROR_BENCH_QUICK=1`
//! for 64 MiB. Needs `qemu-img`. Run:
//! `MIRROR_BENCH_QUICK=1 cargo bench --bench mirror`. Figures:
//! `benches/README.md`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::job::{
    self, CopyMode, ImageFormat, Job, JobOptions, JobStatus, MirrorOptions, MirrorTarget,
};
use blockgraph::{BackendOptions, BlockBackend, IoThread, MainLoop, NodeHandle};

fn size() -> u64 {
    if std::env::var("MIRROR_BENCH_QUICK").is_ok_and(|v| v == "1") {
        return 64 << 20;
    }
    std::env::var("MIRROR_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 30)
}

fn write_image(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create source");
    let mut block = vec![0u8; 1 << 20];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    for _ in 0..size / (1 << 20) {
        f.write_all(&block).expect("write source");
    }
    f.sync_all().expect("sync source");
}

fn wait(job: &Job, status: JobStatus) {
    let start = Instant::now();
    while job.status() != status {
        assert!(
            start.elapsed() < Duration::from_secs(3600),
            "job never {status}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn start_mirror(
    main: &MainLoop,
    io: &IoThread,
    src: &NodeHandle,
    target: &Path,
    id: &str,
    mode: CopyMode,
    speed: u64,
) -> Job {
    let (io, src, target, id) = (io.handle(), src.clone(), target.to_owned(), id.to_owned());
    main.run(move |bql| {
        let mut options = JobOptions::new(id.clone());
        options.speed = speed;
        let m = MirrorOptions::new(
            &src,
            MirrorTarget::NewImage {
                path: target,
                format: ImageFormat::Raw,
                node_name: format!("{id}-target"),
                backing: false,
            },
        )
        .copy_mode(mode);
        job::mirror(bql, &io, options, m)
    })
    .expect("mirror")
}

fn finish(main: &MainLoop, job: &Job, cancel: bool) {
    let j = job.clone();
    main.run(move |bql| {
        if cancel {
            j.cancel(bql, true)
        } else {
            j.complete(bql)
        }
    })
    .expect("verb");
    wait(job, JobStatus::Null);
}

/// 4 KiB random writes for `n` requests; returns (p50, p99) in µs.
fn latencies(io: &IoThread, blk: &BlockBackend, size: u64, n: usize) -> (f64, f64) {
    let blk = blk.clone();
    let mut lat = io
        .spawn(move |mut cx| async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let data = vec![0xa5u8; 4096];
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size / 4096)) * 4096;
                let t = Instant::now();
                blk.write(&mut cx, off, &data).await.expect("guest write");
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            lat
        })
        .join();
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

fn main() {
    let size = size();
    let dir = tempfile::tempdir().expect("tempdir");
    let src_path = dir.path().join("source.raw");
    write_image(&src_path, size);

    // qemu-img convert of the same image.
    let t = Instant::now();
    let ok = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&src_path)
        .arg(dir.path().join("convert.raw"))
        .status()
        .is_ok_and(|s| s.success());
    let convert = t.elapsed();
    assert!(ok, "qemu-img convert failed (is qemu-img installed?)");

    let main = MainLoop::new().expect("main loop");
    let io = main.new_io_thread("io0").expect("io thread");
    let guest_io = main.new_io_thread("io1").expect("io thread");
    let file = FileDriver::open(&src_path, FileOptions::default()).expect("source");
    let (src, vda) = main
        .run(|bql| {
            bql.write(|w| {
                let n = w.add_node("source", file, &[])?;
                let b = w.add_backend("vda", &n, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((n, b))
            })
        })
        .expect("graph");

    // The mirror of the whole image (idle guest), completed at READY.
    let t = Instant::now();
    let job = start_mirror(
        &main,
        &io,
        &src,
        &dir.path().join("mirror.raw"),
        "copy",
        CopyMode::Background,
        0,
    );
    wait(&job, JobStatus::Ready);
    finish(&main, &job, false);
    let mirror = t.elapsed();
    // vda is on the mirror's target now: measure on it from here.
    let n = 20_000usize.min((size / 4096) as usize * 4);
    let (p50_none, p99_none) = latencies(&guest_io, &vda, size, n);
    let mut rows = Vec::new();
    for (i, mode) in [CopyMode::Background, CopyMode::WriteBlocking]
        .into_iter()
        .enumerate()
    {
        let target = dir.path().join(format!("lat{i}.raw"));
        // Slow enough to run through the whole measurement.
        let job = start_mirror(
            &main,
            &io,
            &main.run(|bql| {
                bql.query_backends()
                    .into_iter()
                    .find(|b| b.name == "vda")
                    .and_then(|b| b.root)
                    .and_then(|r| bql.node(&r).map(|n| n.to_handle()))
                    .expect("vda's node")
            }),
            &target,
            &format!("lat{i}"),
            mode,
            (size / 20).max(1 << 20),
        );
        let (p50, p99) = latencies(&guest_io, &vda, size, n);
        let running = matches!(job.status(), JobStatus::Running | JobStatus::Ready);
        finish(&main, &job, true);
        let _ = std::fs::remove_file(&target);
        rows.push((mode, p50, p99, running));
    }

    println!("mirror benchmark, image {} MiB", size >> 20);
    println!(
        "| copy | wall | ratio to qemu-img convert |\n|---|---|---|\n| qemu-img convert -O raw | {:.3} s | 1.00 |\n| mirror sync=full → raw, complete at READY | {:.3} s | {:.2} |",
        convert.as_secs_f64(),
        mirror.as_secs_f64(),
        mirror.as_secs_f64() / convert.as_secs_f64()
    );
    println!("\n| guest 4 KiB random writes ({n}) | p50 µs | p99 µs |\n|---|---|---|");
    println!("| no mirror | {p50_none:.1} | {p99_none:.1} |");
    for (mode, p50, p99, running) in rows {
        let note = if running { "" } else { " (job ended early)" };
        println!("| mirror running, {mode:?}{note} | {p50:.1} | {p99:.1} |");
    }
    drop(io);
    drop(guest_io);
    main.shutdown();
}
