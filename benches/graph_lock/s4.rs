//! S4: writer acquisition (announce, barrier, wait, enter) with 1 / 8 / 64
//! / 256 idle contexts, and with one reader holding the lock 10 µs at a
//! time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::{IoContext, MainLoop};

use crate::common::{percentile, Table};
use crate::ours::{self, in_task, main_loop, pin_to};
use crate::Config;

pub struct S4Row {
    pub mode: &'static str,
    pub what: String,
    /// Acquisition latencies, ns.
    pub lat: Vec<f64>,
}

/// Write-section acquisition latencies (ns) measured on the main loop.
fn measure_writes(main: &MainLoop, n: usize, gap: Duration) -> Vec<f64> {
    main.run(move |bql| {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let t1 = bql.write(|_w| Instant::now());
            lat.push((t1 - t0).as_nanos() as f64);
            if !gap.is_zero() {
                let until = Instant::now() + gap;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }
        lat
    })
}

pub fn run(cfg: &Config) -> Vec<S4Row> {
    let mut rows = Vec::new();
    for (symmetric, mode) in [(false, "asym"), (true, "sym")] {
        for n in [1usize, 8, 64, 256] {
            let main = main_loop(symmetric);
            let contexts: Vec<IoContext> = (0..n)
                .map(|i| main.new_io_context(&format!("idle{i}")))
                .collect();
            // Idle, but used once (claimed) on another thread, like an I/O
            // thread that has gone quiet.
            thread::scope(|s| {
                s.spawn(|| {
                    for c in &contexts {
                        in_task(c, ours::pair);
                    }
                });
            });
            assert_eq!(main.lock_contexts(), n);
            measure_writes(&main, cfg.s4_writes / 10, Duration::ZERO);
            let lat = measure_writes(&main, cfg.s4_writes, Duration::from_micros(5));
            rows.push(S4Row {
                mode,
                what: format!("{n} idle contexts"),
                lat,
            });
            drop(contexts);
            main.shutdown();
        }
        // One reader holding the lock 10 us at a time, on cpu1.
        let main = main_loop(symmetric);
        let ctx = main.new_io_context("holder");
        let stop = Arc::new(AtomicBool::new(false));
        let holder = {
            let stop = stop.clone();
            let ctx = ctx.clone();
            thread::spawn(move || {
                pin_to(1);
                in_task(&ctx, |cx| {
                    let mut held = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let g = futures::executor::block_on(cx.read());
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(10) {
                            std::hint::spin_loop();
                        }
                        drop(g);
                        held += 1;
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(2) {
                            std::hint::spin_loop();
                        }
                    }
                    held
                })
            })
        };
        let lat = measure_writes(&main, cfg.s4_writes / 4, Duration::from_micros(23));
        stop.store(true, Ordering::Relaxed);
        let held = holder.join().expect("holder");
        assert!(held > 0);
        rows.push(S4Row {
            mode,
            what: "1 reader holding 10 us".into(),
            lat,
        });
        main.shutdown();
    }
    rows
}

pub fn print(rows: &[S4Row]) {
    println!("## S4: writer acquisition latency (announce + barrier + wait + enter)");
    let mut t = Table::new(&["mode", "setting", "p50 us", "p99 us", "max us"]).left_aligned(2);
    for r in rows {
        t.row([
            r.mode.to_string(),
            r.what.clone(),
            format!("{:.2}", percentile(&r.lat, 50.0) / 1e3),
            format!("{:.2}", percentile(&r.lat, 99.0) / 1e3),
            format!("{:.1}", percentile(&r.lat, 100.0) / 1e3),
        ]);
    }
    t.print();
    println!();
}
