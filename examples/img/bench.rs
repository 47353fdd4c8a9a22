//! `img bench`: runs reads or writes through an image or a stack and prints
//! IOPS, throughput and latency percentiles.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::args::{count_parser, parse_size, seconds_parser, size_parser, Common};
use crate::open::{Env, OpenPolicy};
use crate::output::{err, progress_bar, Res};
use crate::stack::StackArg;
use blockgraph::IoBuf;
use indicatif::ProgressBar;

/// Run I/O through an image or a stack; print IOPS, throughput and latency.
///
/// Latency is reported as percentiles of the measured requests.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    stack: StackArg,
    /// The access pattern
    #[arg(long, value_name = "RW", value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// The size of each request (1 byte to 64 MiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true, default_value = "4k",
          value_parser = size_parser("--bs", 64 << 20))]
    bs: u64,
    /// Requests in flight (1 to 1024)
    #[arg(short = 'd', long, value_name = "N", allow_hyphen_values = true, default_value_t = 32,
          value_parser = count_parser("--depth", 1, 1024))]
    depth: u64,
    /// I/O threads the requests are spread over (1 to 64)
    #[arg(short = 't', long, value_name = "N", allow_hyphen_values = true, default_value_t = 1,
          value_parser = count_parser("--threads", 1, 64))]
    threads: u64,
    /// Measure for this many seconds [default: 5]
    #[arg(long, value_name = "SECS", allow_hyphen_values = true,
          value_parser = seconds_parser("--time"), conflicts_with = "count")]
    time: Option<Duration>,
    /// Measure this many requests instead
    #[arg(short = 'c', long, value_name = "N", allow_hyphen_values = true,
          value_parser = count_parser("--count", 1, u64::MAX))]
    count: Option<u64>,
    /// Run this many seconds before measuring (with --time)
    #[arg(long, value_name = "SECS", allow_hyphen_values = true,
          value_parser = seconds_parser("--warmup"), conflicts_with = "count")]
    warmup: Option<Duration>,
    /// Use only the first SIZE bytes of the device
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    size: Option<String>,
    /// Show a progress bar on stderr (when it is a terminal)
    #[arg(short = 'p', long)]
    progress: bool,
    /// The image (none for a stack ending in null or memory)
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
        }
    }
}

/// Latencies in nanoseconds, to three significant digits, from 1 ns to an
/// hour (a slower request counts as an hour).
type Histogram = hdrhistogram::Histogram<u64>;

fn histogram() -> Res<Histogram> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map_err(err)
}

/// What one of the `--depth` request loops measured.
struct BenchResult {
    hist: Histogram,
    errors: u64,
    first_error: Option<String>,
}

pub fn run(a: Args) -> Res<i32> {
    let write = matches!(a.rw, Rw::Write | Rw::Randwrite);
    let random = matches!(a.rw, Rw::Randread | Rw::Randwrite);
    let (bs, depth, threads, count) = (a.bs, a.depth, a.threads, a.count);
    if depth < threads {
        return Err(
            "bench: --depth must be at least --threads (each thread runs part of the queue)".into(),
        );
    }
    let time = match count {
        Some(_) => None,
        None => Some(a.time.unwrap_or(Duration::from_secs(5))),
    };
    let layers = a.stack.layers(a.common.format, a.file.as_deref())?;
    let env = Env::new(threads as usize)?;
    let opened = env.open(layers, a.file, OpenPolicy::new(&a.common, write), "")?;
    let blk = env.backend("bench", &opened.top, write)?;
    let b = blk.clone();
    let (dev_size, align) = {
        let top = opened.top.clone();
        env.io(move |mut cx| async move {
            let size = b.length(&mut cx).await.map_err(err)?;
            let g = cx.read().await;
            Ok::<_, String>((size, u64::from(top.io(&g).request_alignment().max(1))))
        })?
    };
    let region = match &a.size {
        Some(s) => parse_size("bench: --size", s)?,
        None => dev_size,
    };
    if region > dev_size {
        return Err(format!(
            "bench: --size {region} is larger than the device ({dev_size} bytes)"
        ));
    }
    if bs % align != 0 {
        return Err(format!(
            "bench: --bs must be a multiple of the stack's {align}-byte alignment"
        ));
    }
    if region < bs {
        return Err(format!(
            "bench: the region ({region} bytes) is smaller than one block ({bs} bytes)"
        ));
    }
    let blocks = region / bs;
    let start = Instant::now();
    let measure_from = start + a.warmup.unwrap_or(Duration::ZERO);
    let deadline = time.map(|t| measure_from + t);
    let issued = Arc::new(AtomicU64::new(0));
    let cursor = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..depth {
        let thread = &env.threads[(w % threads) as usize];
        let (blk, issued, cursor) = (blk.clone(), issued.clone(), cursor.clone());
        let histogram = histogram()?;
        tasks.push(thread.spawn(move |mut cx| async move {
            // Owned by the request while it runs (`read_buf`/`write_buf`):
            // the file driver hands it to the kernel as it is, as QEMU
            // hands down its bench buffers.
            let mut buf = Some(IoBuf::zeroed(bs as usize));
            if let Some(b) = buf.as_mut() {
                b.fill(0xA5);
            }
            let mut hist = histogram;
            let mut errors = 0;
            let mut first_error = None;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            loop {
                if let Some(d) = deadline {
                    if Instant::now() >= d {
                        break;
                    }
                }
                if let Some(c) = count {
                    if issued.fetch_add(1, Ordering::Relaxed) >= c {
                        break;
                    }
                }
                let block = if random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % blocks
                } else {
                    cursor.fetch_add(1, Ordering::Relaxed) % blocks
                };
                let t = Instant::now();
                let owned = buf.take().unwrap_or_else(|| {
                    // The last request failed and took the buffer with it.
                    let mut b = IoBuf::zeroed(bs as usize);
                    b.fill(0xA5);
                    b
                });
                let r = if write {
                    blk.write_buf(&mut cx, block * bs, owned).await
                } else {
                    blk.read_buf(&mut cx, block * bs, owned).await
                };
                let r = r.map(|back| buf = Some(back));
                if t < measure_from {
                    continue;
                }
                match r {
                    Ok(()) => hist.saturating_record(t.elapsed().as_nanos() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            BenchResult {
                hist,
                errors,
                first_error,
            }
        }));
    }
    let bar = match count {
        Some(c) => progress_bar(a.progress, c, "{wide_bar} {pos}/{len} requests, {elapsed}"),
        None => {
            let run = measure_from + time.unwrap_or_default() - start;
            let bar = progress_bar(
                a.progress,
                run.as_millis() as u64,
                "{wide_bar} {percent:>3}% of {msg}",
            );
            bar.set_message(format!("{:.1} s", run.as_secs_f64()));
            bar
        }
    };
    let finished = AtomicBool::new(false);
    let (results, elapsed) = std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            if a.progress {
                tick(&bar, &finished, &issued, count, start);
            }
        });
        let results: Vec<BenchResult> = tasks.into_iter().map(|t| t.join()).collect();
        let elapsed = Instant::now()
            .saturating_duration_since(measure_from)
            .as_secs_f64()
            .max(1e-9);
        finished.store(true, Ordering::Relaxed);
        ticker.thread().unpark();
        (results, elapsed)
    });
    // The bar goes before the report is printed.
    bar.finish_and_clear();
    let mut total = histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    for r in results {
        total.add(&r.hist).map_err(err)?;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    if write {
        let b = blk.clone();
        env.io(move |mut cx| async move { b.flush(&mut cx).await })
            .map_err(err)?;
    }
    let ops = total.len();
    let iops = ops as f64 / elapsed;
    let rw = a.rw.name();
    println!(
        "bench: {rw}, bs {bs}, depth {depth}, {threads} I/O thread(s), {elapsed:.2} s measured"
    );
    println!(
        "  ops: {ops}  IOPS: {iops:.0}  throughput: {:.2} MiB/s",
        iops * bs as f64 / (1 << 20) as f64
    );
    if ops > 0 {
        let us = |ns: u64| ns as f64 / 1000.0;
        println!(
            "  latency (us): min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            us(total.min()),
            us(total.value_at_quantile(0.50)),
            us(total.value_at_quantile(0.90)),
            us(total.value_at_quantile(0.99)),
            us(total.value_at_quantile(0.999)),
            us(total.max())
        );
    }
    if errors > 0 {
        return Err(format!(
            "bench: {errors} request(s) failed; first: {}",
            first_error.unwrap_or_default()
        ));
    }
    Ok(0)
}

/// Moves `-p`'s bar until `finished`: the requests issued of `--count`, or
/// the milliseconds run of `--warmup` plus `--time`. (A thread of its own,
/// so that the request loops do no more than without `-p`.)
fn tick(
    bar: &ProgressBar,
    finished: &AtomicBool,
    issued: &AtomicU64,
    count: Option<u64>,
    start: Instant,
) {
    while !finished.load(Ordering::Relaxed) {
        bar.set_position(match count {
            Some(c) => issued.load(Ordering::Relaxed).min(c),
            None => start.elapsed().as_millis() as u64,
        });
        std::thread::park_timeout(Duration::from_millis(100));
    }
}
