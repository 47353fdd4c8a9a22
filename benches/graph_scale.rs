//! What one graph mutation costs as the graph grows: it should
//! cost what it touches, not the size of the whole graph.
//!
//! The graph holds N independent disks (`backend -> null`). One round
//! drains disk 0, inserts a pass-through filter above it in a write
//! section, ends the drain, then drains the filter and removes it in
//! another write section: two drains, two write sections, as a live filter
//! change on one disk of a VM. Reported per graph size (100 / 1,000 /
//! 10,000 / 100,000 nodes):
//!
//! * the whole round (median of many rounds),
//! * the write sections alone: the time readers are held out, from the
//!   writer's announcement to its leaving (no reader is active here, so this
//!   is the mutation itself),
//! * the ratio of each to the 100-node graph's, measured in the same run.
//!
//! Then the same round on top of a chain of D pass-through filters (D = 1,
//! 10, 100, 1,000): permissions below the change are recomputed, so this
//! one grows with D, which is what the mutation touches. Last, memory per
//! node and per edge, from the process's resident size.
//!
//! Run: `cargo bench --bench graph_scale` (`GRAPH_SCALE_QUICK=1` for a
//! short run; `GRAPH_SCALE_MAX_NODES=N` leaves out graphs larger than N
//! nodes). Figures: `benches/README.md`.

use std::time::{Duration, Instant};

use blockgraph::drivers::{NullDriver, PassthroughFilter};
use blockgraph::{BackendOptions, ChildRole, MainLoop, NodeHandle};
use criterion::{criterion_group, criterion_main, Criterion};

mod common;

/// One round on `disk`: (whole round, time inside the two write sections).
fn round(main: &MainLoop, disk: &NodeHandle) -> (Duration, Duration) {
    let disk = disk.clone();
    main.run(move |bql| {
        let start = Instant::now();
        let drained = bql.drain(&disk);
        let w0 = Instant::now();
        let filter = bql
            .write(|w| w.insert_filter(&drained, "scale-filter", PassthroughFilter::new()))
            .expect("insert the filter");
        let mut in_write = w0.elapsed();
        drop(drained);
        let drained = bql.drain(&filter);
        let w1 = Instant::now();
        bql.write(|w| w.remove_filter(&drained))
            .expect("remove the filter");
        in_write += w1.elapsed();
        drop(drained);
        (start.elapsed(), in_write)
    })
}

/// A graph of `n` disks; returns disk 0.
fn disks(main: &MainLoop, n: usize) -> NodeHandle {
    main.run(move |bql| {
        bql.write(|w| {
            let mut first = None;
            for i in 0..n {
                let node = w.add_node(&format!("disk{i}"), NullDriver::new(1 << 20), &[])?;
                w.add_backend(&format!("vd{i}"), &node, BackendOptions::default())?;
                first.get_or_insert(node);
            }
            Ok::<_, blockgraph::Error>(first.expect("n > 0"))
        })
    })
    .expect("build the graph")
}

/// A chain `backend -> f(d-1) -> … -> f0 -> disk` of `depth` filters;
/// returns the top filter.
fn chain(main: &MainLoop, depth: usize) -> NodeHandle {
    main.run(move |bql| {
        bql.write(|w| {
            let mut top = w.add_node("chain-disk", NullDriver::new(1 << 20), &[])?;
            for i in 0..depth {
                top = w.add_node(
                    &format!("chain{i}"),
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &top)],
                )?;
            }
            w.add_backend("chain", &top, BackendOptions::default())?;
            Ok::<_, blockgraph::Error>(top)
        })
    })
    .expect("build the chain")
}

/// Medians over `rounds` rounds, in µs: (whole round, in write sections).
fn measure(main: &MainLoop, disk: &NodeHandle, rounds: usize) -> (f64, f64) {
    for _ in 0..rounds / 10 + 1 {
        round(main, disk);
    }
    let (total, write): (Vec<_>, Vec<_>) = (0..rounds)
        .map(|_| {
            let (total, write) = round(main, disk);
            (us(total), us(write))
        })
        .unzip();
    (common::median(&total), common::median(&write))
}

/// `GRAPH_SCALE_MAX_NODES`: the largest graph to build (to run this bench
/// against an older build whose mutations cost the whole graph).
fn max_nodes() -> usize {
    std::env::var("GRAPH_SCALE_MAX_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Memory per node and per edge, from the resident size. Runs first, before
/// any large graph was freed (freed memory stays resident and would be
/// reused unseen).
fn memory(quick: bool) {
    // Memory: resident size before and after adding nodes, and edges.
    let n = if quick { 20_000 } else { 100_000 };
    let main = MainLoop::new().expect("main loop");
    let before = resident_bytes();
    let nodes: Vec<NodeHandle> = main
        .run(move |bql| {
            bql.write(|w| {
                (0..n)
                    .map(|i| w.add_node(&format!("m{i}"), NullDriver::new(1 << 20), &[]))
                    .collect::<blockgraph::Result<Vec<_>>>()
            })
        })
        .expect("add nodes");
    let after_nodes = resident_bytes();
    let filters = main
        .run({
            let nodes = nodes.clone();
            move |bql| {
                bql.write(|w| {
                    nodes
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            w.add_node(
                                &format!("e{i}"),
                                PassthroughFilter::new(),
                                &[(ChildRole::Filtered, n)],
                            )
                        })
                        .collect::<blockgraph::Result<Vec<_>>>()
                })
            }
        })
        .expect("add edges");
    let after_edges = resident_bytes();
    if let (Some(b), Some(an), Some(ae)) = (before, after_nodes, after_edges) {
        let per_node = an.saturating_sub(b) as f64 / n as f64;
        // Each filter is a node and an edge: subtract a node's share.
        let per_edge = ae.saturating_sub(an) as f64 / n as f64 - per_node;
        println!(
            "\nmemory: {per_node:.0} bytes per node (null driver, name, edge lists), \
             {per_edge:.0} bytes per edge (both ends); resident size over {n} nodes"
        );
    }
    drop((nodes, filters));
    main.shutdown();
}

fn tables(quick: bool) {
    let rounds = if quick { 50 } else { 400 };
    println!(
        "\ninsert + remove one filter on disk 0 of N independent disks \
         (medians of {rounds} rounds; ratios to the first size)"
    );
    let mut t = common::Table::new(&[
        "nodes",
        "round µs",
        "ratio",
        "in write sections µs",
        "ratio",
    ])
    .left_aligned(0);
    let mut base = None;
    for &n in [100usize, 1_000, 10_000, 100_000]
        .iter()
        .filter(|&&n| n <= max_nodes())
    {
        let main = MainLoop::new().expect("main loop");
        let disk = disks(&main, n);
        let (total, write) = measure(&main, &disk, rounds);
        let (bt, bw) = *base.get_or_insert((total, write));
        t.row([
            n.to_string(),
            format!("{total:.1}"),
            format!("{:.2}x", total / bt),
            format!("{write:.1}"),
            format!("{:.2}x", write / bw),
        ]);
        main.shutdown();
    }
    t.print();

    println!(
        "\nthe same round on top of a chain of D filters (what the change touches grows with D)"
    );
    let mut t = common::Table::new(&["depth", "round µs", "in write sections µs"]).left_aligned(0);
    for &d in &[1usize, 10, 100, 1_000] {
        let main = MainLoop::new().expect("main loop");
        let top = chain(&main, d);
        let (total, write) = measure(&main, &top, rounds.min(100));
        t.row([d.to_string(), format!("{total:.1}"), format!("{write:.1}")]);
        main.shutdown();
    }
    t.print();
}

fn scale(c: &mut Criterion) {
    let quick = std::env::var_os("GRAPH_SCALE_QUICK").is_some();
    println!("{}", common::machine());
    memory(quick);
    let mut group = c.benchmark_group("graph_scale_insert_remove_filter");
    if quick {
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(1));
        group.warm_up_time(Duration::from_millis(200));
    }
    for &n in [100usize, 10_000].iter().filter(|&&n| n <= max_nodes()) {
        let main = MainLoop::new().expect("main loop");
        let disk = disks(&main, n);
        group.bench_function(format!("{n}_nodes"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| round(&main, &disk).0).sum())
        });
        main.shutdown();
    }
    group.finish();
    tables(quick);
}

criterion_group!(benches, scale);
criterion_main!(benches);
