//! S5: async `read().await` looping in one spawned task, uncontended
//! (against the sync pair, tokio's and async-lock's `RwLock` and std's, in
//! the same task), and readers queued behind a writer (wake-up latency
//! after the writer leaves, spread across the queued readers).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgraph::MainLoop;

use crate::common::{best, median, median_ratio, percentile, print_raw, Table};
use crate::ours::{self, pin_to, unexpected};
use crate::Config;

/// Both halves of S5, per fence mode.
pub struct Results {
    /// Per mode: per kernel of [`ASYNC_KERNELS`], per round, ns per op.
    pub uncontended: Vec<(&'static str, Vec<Vec<f64>>)>,
    pub queued: Vec<(&'static str, Queued)>,
}

pub const ASYNC_KERNELS: [&str; 5] = [
    "ours async",
    "ours sync pair",
    "tokio RwLock",
    "async_lock",
    "std RwLock",
];

/// One spawned task looping over every async kernel for every round.
pub fn run_uncontended(cfg: &Config, main: &MainLoop, label: &str) -> Vec<Vec<f64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    pin_to(0);
    let ctx = main.new_io_context(label);
    let rounds = cfg.rounds;
    let n = cfg.s1_iters;
    let task = ctx.spawn_on(rt.handle(), move |mut cx| async move {
        let tokio_rw = tokio::sync::RwLock::new(0u64);
        let async_rw = async_lock::RwLock::new(0u64);
        let std_rw = std::sync::RwLock::new(0u64);
        let mut res = vec![Vec::new(); ASYNC_KERNELS.len()];
        for round in 0..rounds + 1 {
            for i in 0..ASYNC_KERNELS.len() {
                let k = (i + round) % ASYNC_KERNELS.len();
                let start = Instant::now();
                match k {
                    0 => {
                        for _ in 0..n {
                            // Consumed like the sync pair's guard (no
                            // black_box: dropping it has side effects).
                            let g = cx.read().await;
                            drop(g);
                        }
                    }
                    1 => {
                        for _ in 0..n {
                            ours::pair(&mut cx);
                        }
                    }
                    2 => {
                        for _ in 0..n {
                            drop(tokio_rw.read().await);
                        }
                    }
                    3 => {
                        for _ in 0..n {
                            drop(async_rw.read().await);
                        }
                    }
                    4 => {
                        for _ in 0..n {
                            drop(std_rw.read().unwrap_or_else(|e| e.into_inner()));
                        }
                    }
                    _ => unreachable!(),
                }
                if round > 0 {
                    // round 0 warms up
                    res[k].push(start.elapsed().as_nanos() as f64 / n as f64);
                }
            }
        }
        res
    });
    rt.block_on(task).expect("S5 task")
}

pub struct Queued {
    /// Per reader, ns from the writer's last instant inside to the reader
    /// holding the lock.
    wake: Vec<f64>,
    /// Per trial, latest minus earliest reader.
    spread: Vec<f64>,
}

/// Readers (2 I/O threads x 2 tasks) queue behind a write section; how fast
/// do they all get in once it ends?
pub fn run_queued(cfg: &Config, main: &MainLoop) -> Queued {
    const READERS_PER_THREAD: usize = 2;
    let threads: Vec<_> = (0..2)
        .map(|i| main.new_io_thread(&format!("s5-io{i}")).expect("io thread"))
        .collect();
    let total = threads.len() * READERS_PER_THREAD;
    let mut out = Queued {
        wake: vec![],
        spread: vec![],
    };
    for _ in 0..cfg.s5_trials {
        let ready = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Instant>();
        let go = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        // The writer enters first, then lets the readers loose and waits
        // until they have all polled (and queued) before leaving.
        let leave = {
            let (ready, go) = (ready.clone(), go.clone());
            main.spawn(move |mut cx| async move {
                cx.write(|_w| {
                    go.store(true, Ordering::SeqCst);
                    let t = Instant::now();
                    while ready.load(Ordering::SeqCst) < total {
                        if t.elapsed() > Duration::from_secs(10) {
                            unexpected("readers did not queue");
                        }
                        std::hint::spin_loop();
                    }
                    // Let the last poll reach the queue.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                    Instant::now()
                })
                .await
            })
        };
        for io in &threads {
            for _ in 0..READERS_PER_THREAD {
                let (ready, go, tx) = (ready.clone(), go.clone(), tx.clone());
                handles.push(io.spawn(move |mut cx| async move {
                    while !go.load(Ordering::SeqCst) {
                        tokio::task::yield_now().await;
                    }
                    ready.fetch_add(1, Ordering::SeqCst);
                    let g = cx.read().await;
                    let t = Instant::now();
                    drop(g);
                    let _ = tx.send(t);
                }));
            }
        }
        drop(tx);
        let left = leave.join();
        let times: Vec<Instant> = (0..total)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("queued reader never resumed")
            })
            .collect();
        for h in handles {
            h.join();
        }
        let lat: Vec<f64> = times
            .iter()
            .map(|t| t.saturating_duration_since(left).as_nanos() as f64)
            .collect();
        let first = times.iter().min().copied().expect("readers");
        let last = times.iter().max().copied().expect("readers");
        out.spread.push((last - first).as_nanos() as f64);
        out.wake.extend(lat);
    }
    out
}

pub fn print(cfg: &Config, res: &Results) {
    if cfg.raw {
        for (mode, r) in &res.uncontended {
            for (k, name) in ASYNC_KERNELS.iter().enumerate() {
                print_raw(&format!("S5 {mode} {name}"), &r[k]);
            }
        }
    }
    println!("## S5: async read().await looping in one spawned task (ns/op)");
    let mut t = Table::new(&["mode", "kernel", "median", "best", "ours async/it"]).left_aligned(2);
    for (mode, r) in &res.uncontended {
        for (k, name) in ASYNC_KERNELS.iter().enumerate() {
            t.row([
                mode.to_string(),
                name.to_string(),
                format!("{:.2}", median(&r[k])),
                format!("{:.2}", best(&r[k])),
                format!("{:.3}", median_ratio(&r[0], &r[k])),
            ]);
        }
    }
    t.print();
    println!();
    println!("## S5: 4 readers (2 I/O threads x 2 tasks) queued behind a writer");
    let mut t = Table::new(&[
        "mode",
        "wake p50 us",
        "wake p99 us",
        "wake max us",
        "spread p50 us",
    ]);
    for (mode, q) in &res.queued {
        t.row([
            mode.to_string(),
            format!("{:.1}", percentile(&q.wake, 50.0) / 1e3),
            format!("{:.1}", percentile(&q.wake, 99.0) / 1e3),
            format!("{:.1}", percentile(&q.wake, 100.0) / 1e3),
            format!("{:.1}", percentile(&q.spread, 50.0) / 1e3),
        ]);
    }
    t.print();
    println!("(every queued reader resumed in every trial)");
    println!();
}
