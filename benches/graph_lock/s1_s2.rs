//! S1: one thread, lock + unlock pair. S2: two threads pinned to two cores,
//! each with its own context; cost per thread.
//!
//! S1 runs on worker 0 alone, S2 on both: the same threads, contexts and
//! kernel state, so S2/S1 isolates the effect of the second core. The
//! kernels' order rotates every round.

use std::sync::{Arc, Barrier};

use blockgraph::MainLoop;

use crate::common::{best, median, median_ratio, print_raw, Table};
use crate::kernels::{Shared, ThreadKernels, SYNC_KERNELS};
use crate::worker::{Cmd, Reply, Worker};
use crate::Config;

pub struct SyncResults {
    /// Per kernel, per round: ns per pair.
    pub s1: Vec<Vec<f64>>,
    /// Per kernel, per round: mean of the two threads' ns per pair.
    pub s2: Vec<Vec<f64>>,
}

/// The index of kernel `name` in [`SYNC_KERNELS`].
pub fn kernel(name: &str) -> usize {
    SYNC_KERNELS
        .iter()
        .position(|k| *k == name)
        .expect("a kernel of SYNC_KERNELS")
}

pub fn run(cfg: &Config, main_a: &MainLoop, main_s: &MainLoop) -> SyncResults {
    let shared = Shared::new();
    let start = Arc::new(Barrier::new(2));
    let workers: Vec<Worker> = (0..2)
        .map(|cpu| {
            let kernels = ThreadKernels::new("s2", cpu, main_a, main_s, &shared);
            Worker::start(cpu, kernels, start.clone())
        })
        .collect();

    let n_k = SYNC_KERNELS.len();
    let mut s1 = vec![Vec::new(); n_k];
    let mut s2 = vec![Vec::new(); n_k];
    for round in 0..cfg.rounds {
        for i in 0..n_k {
            let k = (i + round) % n_k; // rotate the order every round
            workers[0]
                .cmd
                .send(Cmd::Kernel(k, cfg.s1_iters, false))
                .expect("worker");
            match workers[0].recv() {
                Reply::NsPerOp(ns) => s1[k].push(ns),
                Reply::Reader(..) => unreachable!(),
            }
            for w in &workers {
                w.cmd
                    .send(Cmd::Kernel(k, cfg.s2_iters, true))
                    .expect("worker");
            }
            let mut sum = 0.0;
            for w in &workers {
                match w.recv() {
                    Reply::NsPerOp(ns) => sum += ns,
                    Reply::Reader(..) => unreachable!(),
                }
            }
            s2[k].push(sum / workers.len() as f64);
        }
    }
    SyncResults { s1, s2 }
}

pub fn print(cfg: &Config, res: &SyncResults) {
    let (asym, sym, f0) = (kernel("ours asym"), kernel("ours sym"), kernel("F0"));
    if cfg.raw {
        for (k, name) in SYNC_KERNELS.iter().enumerate() {
            print_raw(&format!("S1 {name}"), &res.s1[k]);
            print_raw(&format!("S2 {name}"), &res.s2[k]);
        }
    }
    println!("## S1: one thread, lock+unlock pair (ns/pair; ratios: median of per-round ratios)");
    let mut t = Table::new(&[
        "kernel",
        "median",
        "best",
        "asym/kernel",
        "sym/kernel",
        "kernel/F0",
    ]);
    for (k, name) in SYNC_KERNELS.iter().enumerate() {
        let s1 = &res.s1;
        t.row([
            name.to_string(),
            format!("{:.2}", median(&s1[k])),
            format!("{:.2}", best(&s1[k])),
            format!("{:.3}", median_ratio(&s1[asym], &s1[k])),
            format!("{:.3}", median_ratio(&s1[sym], &s1[k])),
            format!("{:.2}", median_ratio(&s1[k], &s1[f0])),
        ]);
    }
    t.print();
    println!();
    println!("## S2: two threads on two cores, own context each (ns/pair per thread)");
    let mut t = Table::new(&[
        "kernel",
        "median",
        "best",
        "S2/S1",
        "kernel/asym",
        "kernel/sym",
    ]);
    for (k, name) in SYNC_KERNELS.iter().enumerate() {
        let s2 = &res.s2;
        t.row([
            name.to_string(),
            format!("{:.2}", median(&s2[k])),
            format!("{:.2}", best(&s2[k])),
            format!("{:.3}", median_ratio(&s2[k], &res.s1[k])),
            format!("{:.1}", median_ratio(&s2[k], &s2[asym])),
            format!("{:.1}", median_ratio(&s2[k], &s2[sym])),
        ]);
    }
    t.print();
    println!();
}
