//! I/O stack benchmarks, measured side by side in one run and reported as
//! ratios.
//!
//! `qcow2_over_memory`: a 4 KiB request at a random offset through a
//! qcow2 node whose file is a memory node, against the same request on a
//! memory node directly ("raw-ish"). Every cluster is allocated first, so
//! this is the steady-state cost of the format layer (cached L2 lookup,
//! metadata lock, in-flight bookkeeping, one more boxed request). The disk
//! is 8 MiB so both stacks stay in the CPU caches and the ratio shows the
//! layer's own cost rather than memory bandwidth.
//!
//! `qcow2_vectored`: the same 4 KiB requests on the qcow2 stack as
//! vectored requests (`readv`/`writev`), in one segment and in eight
//! 512-byte segments (a guest's scattered buffers), against the contiguous
//! `read`/`write`: what the I/O vector costs, and that qcow2 passes a
//! scattered request down without bouncing it (eight segments would cost a
//! 4 KiB copy more otherwise).
//!
//! Criterion measures each stack on its own; the table after it comes from
//! batches run alternately (memory, qcow2, memory, …) and gives the median
//! of the per-pair ratios, which load on the machine affects least.
//!
//! Run: `cargo bench --bench io_stack` (`-- --quick` for criterion's short
//! mode; the alternated batches are the same). Figures: `benches/README.md`.

use std::time::{Duration, Instant};

use blockgraph::drivers::qcow2::CreateOptions;
use blockgraph::drivers::{
    qcow2::{Qcow2Driver, Qcow2Options},
    MemoryDriver,
};
use std::io::{IoSlice, IoSliceMut};

use blockgraph::{ChildRole, IoThread, IoVec, IoVecMut, MainLoop, NodeHandle};
use criterion::{criterion_group, criterion_main, Criterion};

mod common;

const DISK: u64 = 8 << 20;
const REQ: usize = 4096;

struct Qcow2Setup {
    main: MainLoop,
    io: IoThread,
    memory: NodeHandle,
    qcow2: NodeHandle,
}

fn setup() -> Qcow2Setup {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("bench-io").unwrap();
    let memory = main
        .run(|bql| bql.write(|w| w.add_node("mem", MemoryDriver::new(DISK), &[])))
        .unwrap();
    let file = main
        .run(|bql| bql.write(|w| w.add_node("qfile", MemoryDriver::new(DISK + (8 << 20)), &[])))
        .unwrap();
    let f = file.clone();
    let qcow2 = io
        .spawn(move |mut cx| async move {
            let drv = {
                let g = cx.read().await;
                Qcow2Driver::create(f.io(&g), &CreateOptions::new(DISK)).await?;
                Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await?
            };
            let node = cx
                .run_on_main_loop(move |bql| {
                    bql.write(|w| w.add_node("q", drv, &[(ChildRole::File, &f)]))
                })
                .await??;
            // Allocate every cluster, so the benchmark sees the steady state.
            {
                let g = cx.read().await;
                let n = node.io(&g);
                let chunk = vec![0x5au8; 1 << 20];
                for off in (0..DISK).step_by(1 << 20) {
                    n.write(off, &chunk).await?;
                }
                n.flush().await?;
            }
            Ok::<_, blockgraph::Error>(node)
        })
        .join()
        .unwrap();
    Qcow2Setup {
        main,
        io,
        memory,
        qcow2,
    }
}

/// Runs `iters` 4 KiB requests on `node` from the I/O thread and returns
/// the time they took (pseudo-random offsets, same sequence every time).
fn run(io: &IoThread, node: &NodeHandle, write: bool, iters: u64) -> Duration {
    let node = node.clone();
    io.spawn(move |mut cx| async move {
        let g = cx.read().await;
        let n = node.io(&g);
        let mut buf = vec![0u8; REQ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let blocks = DISK / REQ as u64;
        let start = Instant::now();
        for _ in 0..iters {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % blocks) * REQ as u64;
            if write {
                n.write(off, &buf).await.unwrap();
            } else {
                n.read(off, &mut buf).await.unwrap();
            }
        }
        start.elapsed()
    })
    .join()
}

/// Like [`run`], with each request a vectored one of `segs` equal
/// segments.
fn run_vectored(
    io: &IoThread,
    node: &NodeHandle,
    write: bool,
    segs: usize,
    iters: u64,
) -> Duration {
    let node = node.clone();
    io.spawn(move |mut cx| async move {
        let g = cx.read().await;
        let n = node.io(&g);
        // The segments are set up once, as a VMM keeps its iovec arrays.
        let mut bufs = vec![vec![0u8; REQ / segs]; segs];
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let data = vec![vec![0x33u8; REQ / segs]; segs];
        let wslices: Vec<IoSlice<'_>> = data.iter().map(|b| IoSlice::new(b)).collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let blocks = DISK / REQ as u64;
        let start = Instant::now();
        for _ in 0..iters {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % blocks) * REQ as u64;
            if write {
                n.writev(off, IoVec::new(&wslices)).await.unwrap();
            } else {
                n.readv(off, IoVecMut::new(&mut slices)).await.unwrap();
            }
        }
        start.elapsed()
    })
    .join()
}

fn qcow2_vectored(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("qcow2_vectored");
    for (name, write) in [("read_4k", false), ("write_4k", true)] {
        group.bench_function(format!("contiguous/{name}"), |b| {
            b.iter_custom(|iters| run(&s.io, &s.qcow2, write, iters))
        });
        for segs in [1, 8] {
            group.bench_function(format!("{segs}_segments/{name}"), |b| {
                b.iter_custom(|iters| run_vectored(&s.io, &s.qcow2, write, segs, iters))
            });
        }
    }
    group.finish();

    const BATCH: u64 = 20_000;
    const ROUNDS: usize = 9;
    let mut t = common::Table::new(&[
        "qcow2 over memory, 4 KiB random, QD1",
        "contiguous ns",
        "vectored ns",
        "vectored/contiguous",
    ]);
    for (name, write) in [("read", false), ("write", true)] {
        for segs in [1, 8] {
            let flat = || run(&s.io, &s.qcow2, write, BATCH).as_nanos() as f64 / BATCH as f64;
            let vectored = || {
                run_vectored(&s.io, &s.qcow2, write, segs, BATCH).as_nanos() as f64 / BATCH as f64
            };
            let r = common::alternate(ROUNDS, flat, vectored);
            t.row([
                format!("{name}v, {segs} x {} B", REQ / segs),
                format!("{:.0}", common::median(&r.a)),
                format!("{:.0}", common::median(&r.b)),
                format!("{:.2}x", r.ratio()),
            ]);
        }
    }
    println!("\nmedians of {ROUNDS} alternated batches of {BATCH} requests; ratio: median of per-pair ratios");
    t.print();
    drop(s.io);
    s.main.shutdown();
}

fn qcow2_over_memory(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("qcow2_over_memory");
    for (name, write) in [("read_4k", false), ("write_4k", true)] {
        group.bench_function(format!("memory/{name}"), |b| {
            b.iter_custom(|iters| run(&s.io, &s.memory, write, iters))
        });
        group.bench_function(format!("qcow2/{name}"), |b| {
            b.iter_custom(|iters| run(&s.io, &s.qcow2, write, iters))
        });
    }
    group.finish();

    // The ratios: batches run alternately (memory, qcow2, memory, ...), so
    // that load on the machine hits both alike.
    const BATCH: u64 = 20_000;
    const ROUNDS: usize = 9;
    println!("\n{}", common::machine());
    let mut t = common::Table::new(&["4 KiB random, QD1", "memory ns", "qcow2 ns", "qcow2/memory"]);
    for (name, write) in [("read", false), ("write", true)] {
        let per_request = |node| run(&s.io, node, write, BATCH).as_nanos() as f64 / BATCH as f64;
        let r = common::alternate(ROUNDS, || per_request(&s.memory), || per_request(&s.qcow2));
        t.row([
            name.to_string(),
            format!("{:.0}", common::median(&r.a)),
            format!("{:.0}", common::median(&r.b)),
            format!("{:.2}x", r.ratio()),
        ]);
    }
    println!("medians of {ROUNDS} alternated batches of {BATCH} requests; ratio: median of per-pair ratios");
    t.print();
    drop(s.io);
    s.main.shutdown();
}

criterion_group!(benches, qcow2_over_memory, qcow2_vectored);
criterion_main!(benches);
