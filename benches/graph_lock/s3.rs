//! S3: S2 plus a main-loop writer every 10 µs / 100 µs / 1 ms / 10 ms,
//! holding ~1 µs: reader throughput retained (against a writer-less window
//! in the same round), reader latency percentiles (one op in 64 timed,
//! timer overhead included), writer acquisition p50/p99.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::MainLoop;

use crate::common::{median, percentile, Table};
use crate::kernels::{Shared, ThreadKernels};
use crate::worker::{Cmd, Reply, Worker};
use crate::Config;

pub struct S3Row {
    pub mode: &'static str,
    pub period: Duration,
    /// Per round, reader ops with the writer / without.
    pub retained: Vec<f64>,
    reader_p99: Vec<f64>,
    reader_p999: Vec<f64>,
    writer: Vec<f64>,
    writes_per_s: Vec<f64>,
    /// Reader ops that found the writer and parked, per write.
    waits_per_write: Vec<f64>,
}

/// A main-loop task writing every `period`, holding ~1 µs; returns the
/// acquisition latencies (ns) once `stop` is set.
fn spawn_writer(
    main: &MainLoop,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> blockgraph::TaskHandle<Vec<f64>> {
    main.spawn(move |mut cx| async move {
        let mut lat = Vec::new();
        let mut next = Instant::now() + period;
        while !stop.load(Ordering::Relaxed) {
            // Periods of 1 ms and more: sleep (timer slack adds some tens of
            // microseconds). Shorter ones cannot be slept precisely: sleep
            // while far from the deadline, spin the rest, at the price of
            // the writer's core time (blocking the main-loop thread is fine
            // here: nothing else runs on it).
            loop {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                let left = next - now;
                if period >= Duration::from_millis(1) {
                    thread::sleep(left);
                } else if left > Duration::from_micros(120) {
                    thread::sleep(left - Duration::from_micros(80));
                } else {
                    std::hint::spin_loop();
                }
            }
            next += period;
            let t0 = Instant::now();
            let entered = cx
                .write(|_w| {
                    let t1 = Instant::now();
                    while t1.elapsed() < Duration::from_micros(1) {
                        std::hint::spin_loop();
                    }
                    t1
                })
                .await;
            lat.push((entered - t0).as_nanos() as f64);
            let now = Instant::now();
            if next < now {
                next = now; // fell behind: do not burst
            }
        }
        lat
    })
}

pub fn run(cfg: &Config, main_a: &MainLoop, main_s: &MainLoop) -> Vec<S3Row> {
    let periods = [
        Duration::from_micros(10),
        Duration::from_micros(100),
        Duration::from_millis(1),
        Duration::from_millis(10),
    ];
    let shared = Shared::new();
    let start = Arc::new(Barrier::new(2));
    let workers: Vec<Worker> = (0..2)
        .map(|cpu| {
            let kernels = ThreadKernels::new("s3", cpu, main_a, main_s, &shared);
            Worker::start(cpu, kernels, start.clone())
        })
        .collect();
    let window = |mode: usize, writer: Option<(&MainLoop, Duration)>| {
        let stop = Arc::new(AtomicBool::new(false));
        let wstop = Arc::new(AtomicBool::new(false));
        let w = writer.map(|(main, period)| spawn_writer(main, period, wstop.clone()));
        for wk in &workers {
            wk.cmd
                .send(Cmd::Reader(mode, stop.clone()))
                .expect("worker");
        }
        thread::sleep(cfg.s3_window);
        stop.store(true, Ordering::Relaxed);
        let mut ops = 0;
        let mut waited = 0;
        let mut samples = Vec::new();
        for wk in &workers {
            match wk.recv() {
                Reply::Reader(n, s, p) => {
                    ops += n;
                    waited += p;
                    samples.extend(s);
                }
                Reply::NsPerOp(_) => unreachable!(),
            }
        }
        wstop.store(true, Ordering::Relaxed);
        let lat = w.map(|h| h.join()).unwrap_or_default();
        (ops, samples, lat, waited)
    };
    let mut rows = Vec::new();
    for (mode, name, main) in [(0, "asym", main_a), (1, "sym", main_s)] {
        for period in periods {
            let mut row = S3Row {
                mode: name,
                period,
                retained: vec![],
                reader_p99: vec![],
                reader_p999: vec![],
                writer: vec![],
                writes_per_s: vec![],
                waits_per_write: vec![],
            };
            for _ in 0..cfg.s3_rounds {
                let (base, _, _, _) = window(mode, None);
                let (ops, samples, lat, waited) = window(mode, Some((main, period)));
                row.waits_per_write
                    .push(waited as f64 / lat.len().max(1) as f64);
                row.retained.push(ops as f64 / base as f64);
                row.reader_p99.push(percentile(&samples, 99.0));
                row.reader_p999.push(percentile(&samples, 99.9));
                row.writes_per_s
                    .push(lat.len() as f64 / cfg.s3_window.as_secs_f64());
                row.writer.extend(lat);
            }
            rows.push(row);
        }
    }
    rows
}

pub fn print(rows: &[S3Row]) {
    println!("## S3: S2 plus a writer holding ~1 us (medians over rounds)");
    let mut t = Table::new(&[
        "mode",
        "period",
        "writes/s",
        "retained",
        "rd p99 ns",
        "rd p99.9 ns",
        "wr p50 us",
        "wr p99 us",
        "waits/write",
    ])
    .left_aligned(2);
    for r in rows {
        t.row([
            r.mode.to_string(),
            format!("{:?}", r.period),
            format!("{:.0}", median(&r.writes_per_s)),
            format!("{:.2}%", median(&r.retained) * 100.0),
            format!("{:.0}", median(&r.reader_p99)),
            format!("{:.0}", median(&r.reader_p999)),
            format!("{:.1}", percentile(&r.writer, 50.0) / 1e3),
            format!("{:.1}", percentile(&r.writer, 99.0) / 1e3),
            format!("{:.2}", median(&r.waits_per_write)),
        ]);
    }
    t.print();
    println!(
        "(rd: one reader op in 64 timed with Instant, ~20-40 ns timer overhead included; \
         wr: writer acquisition; waits/write: reader ops that found the writer and parked)"
    );
    println!();
}
