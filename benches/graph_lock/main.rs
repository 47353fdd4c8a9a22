//! Graph lock benchmark: our read lock against `std::sync::RwLock`,
//! `parking_lot::RwLock`, `crossbeam_utils::sync::ShardedLock`,
//! `tokio::sync::RwLock`, `async_lock::RwLock` and three calibration kernels,
//! in one binary, with ratios computed per round (DESIGN §3; the figures
//! and the targets they are held against are in `benches/README.md`).
//!
//! ```sh
//! cargo bench --bench graph_lock                # full run
//! cargo bench --bench graph_lock -- --quick     # shorter rounds and fewer
//! cargo bench --bench graph_lock -- --quick --raw --only=s12,s5
//! ```
//!
//! `--raw` also prints every round's figures; `--only=` takes a comma list
//! of `s12`, `s3`, `s4`, `s5`.
//!
//! Rounds are short (a fraction of a millisecond per kernel) and many, and
//! every ratio is taken within a round, so a burst of interference from
//! other processes spoils a few rounds rather than skewing a kernel; the
//! tables show medians (and the best round, the least disturbed).
//!
//! One module per scenario:
//!
//! * `kernels`: the sync kernels, ours and the calibration ones (F0, the
//!   floor; F0+owner; F1, a locked RMW; F2, QEMU's three-full-fence
//!   sequence) and the competitors;
//! * `s1_s2`: **S1** one thread, lock + unlock pair; **S2** two threads
//!   pinned to two cores, each with its own context, per-thread cost;
//! * `s3`: S2 plus a main-loop writer every 10 µs / 100 µs / 1 ms / 10 ms
//!   holding ~1 µs: reader throughput retained, reader latency, writer
//!   acquisition;
//! * `s4`: writer acquisition with 1 / 8 / 64 / 256 idle contexts, and
//!   with one reader holding the lock 10 µs;
//! * `s5`: async `read().await` in one spawned task against the sync
//!   pair, tokio and async-lock; and readers queued behind a writer;
//! * `targets`: every performance target, met or gap.
//!
//! Every lock scenario runs in both fence modes: "asym" (membarrier; the
//! default where available) and "sym" (forced with
//! `BLOCKGRAPH_LOCK_FENCE=symmetric`). Shared statistics and tables:
//! `benches/common/mod.rs`.

use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;

mod kernels;
mod ours;
mod s1_s2;
mod s3;
mod s4;
mod s5;
mod targets;
mod worker;

/// Settings, from the command line.
#[derive(Clone)]
pub struct Config {
    pub quick: bool,
    pub raw: bool,
    only: Option<Vec<String>>,
    /// Rounds of S1/S2/S5 (ratios are taken per round).
    pub rounds: usize,
    /// Lock/unlock pairs per kernel per round, one thread.
    pub s1_iters: u64,
    /// Pairs per thread per kernel per round, two threads.
    pub s2_iters: u64,
    /// Length of each S3 window.
    pub s3_window: Duration,
    /// S3 rounds (each: one window without writer, one with).
    pub s3_rounds: usize,
    /// Writes measured per S4 configuration.
    pub s4_writes: usize,
    /// Queued-reader trials in S5.
    pub s5_trials: usize,
}

impl Config {
    fn from_args() -> Config {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let raw = args.iter().any(|a| a == "--raw");
        let only = args
            .iter()
            .find_map(|a| a.strip_prefix("--only="))
            .map(|l| l.split(',').map(str::to_owned).collect());
        let base = Config {
            quick,
            raw,
            only,
            rounds: 301,
            s1_iters: 100_000,
            s2_iters: 100_000,
            s3_window: Duration::from_millis(40),
            s3_rounds: 25,
            s4_writes: 2_000,
            s5_trials: 100,
        };
        if quick {
            base
        } else {
            Config {
                rounds: 1001,
                s3_rounds: 61,
                s4_writes: 10_000,
                s5_trials: 400,
                ..base
            }
        }
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|l| l.iter().any(|s| s == scenario))
    }
}

fn print_machine(cfg: &Config) {
    println!(
        "# graph lock benchmark ({} mode)",
        if cfg.quick { "quick" } else { "full" }
    );
    println!("machine   : {}", common::machine());
    println!("cpu0/cpu1 hyperthread siblings: {}", common::ht_siblings());
    println!("fence mode (default lock): {}", ours::default_fence_mode());
    println!();
}

fn main() {
    let cfg = Config::from_args();
    print_machine(&cfg);
    let t0 = Instant::now();

    let main_a = ours::main_loop(false);
    let main_s = ours::main_loop(true);

    let sync = cfg.runs("s12").then(|| s1_s2::run(&cfg, &main_a, &main_s));
    if let Some(sync) = &sync {
        s1_s2::print(&cfg, sync);
    }
    let s3 = if cfg.runs("s3") {
        s3::run(&cfg, &main_a, &main_s)
    } else {
        Vec::new()
    };
    if !s3.is_empty() {
        s3::print(&s3);
    }
    let s4 = if cfg.runs("s4") {
        s4::run(&cfg)
    } else {
        Vec::new()
    };
    if !s4.is_empty() {
        s4::print(&s4);
    }
    let s5 = cfg.runs("s5").then(|| {
        let res = s5::Results {
            uncontended: vec![
                ("asym", s5::run_uncontended(&cfg, &main_a, "s5-asym")),
                ("sym", s5::run_uncontended(&cfg, &main_s, "s5-sym")),
            ],
            queued: vec![
                ("asym", s5::run_queued(&cfg, &main_a)),
                ("sym", s5::run_queued(&cfg, &main_s)),
            ],
        };
        s5::print(&cfg, &res);
        res
    });

    targets::print(sync.as_ref(), &s3, &s4, s5.as_ref());
    println!("total bench time: {:.1} s", t0.elapsed().as_secs_f64());

    main_a.shutdown();
    main_s.shutdown();
}
