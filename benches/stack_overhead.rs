//! What the layers of an I/O stack cost, measured side by side in one run
//! and reported as ratios (the target: a 4 KiB request through
//! backend → throttle (no limits) → raw → null within 5% of backend → null).
//!
//! Both stacks live in one graph and are driven alternately, in batches,
//! from one I/O thread at queue depth 1; the ratio is computed per pair of
//! batches and the median reported, so that load on the machine hits both
//! alike. Node-direct I/O (an `IoRef` on the null node, no backend and no
//! read lock per request) is shown for reference.
//!
//! Run: `cargo bench --bench stack_overhead` (`-- --quick` for criterion's
//! short mode; the paired batches are the same). Figures:
//! `benches/README.md`.

use std::time::{Duration, Instant};

use blockgraph::drivers::{NullDriver, RawDriver, ThrottleConfig, ThrottleDriver};
use blockgraph::{BackendOptions, BlockBackend, ChildRole, IoBuf, IoThread, MainLoop, NodeHandle};
use criterion::{criterion_group, criterion_main, Criterion};

mod common;

const DISK: u64 = 1 << 30;
const REQ: usize = 4096;

struct Stacks {
    main: MainLoop,
    io: IoThread,
    direct: BlockBackend,
    layered: BlockBackend,
    null_node: NodeHandle,
}

fn setup() -> Stacks {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("bench-io").unwrap();
    let (direct, layered, null_node) = main
        .run(|bql| {
            bql.write(|w| {
                let null_a = w.add_node("null-a", NullDriver::new(DISK), &[])?;
                let direct = w.add_backend("direct", &null_a, BackendOptions::default())?;
                let null_b = w.add_node("null-b", NullDriver::new(DISK), &[])?;
                let raw = w.add_node("raw", RawDriver::new(), &[(ChildRole::File, &null_b)])?;
                let throttle = ThrottleDriver::with_config("unlimited", ThrottleConfig::default())?;
                let thr = w.add_node("throttle", throttle, &[(ChildRole::Filtered, &raw)])?;
                let layered = w.add_backend("layered", &thr, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((direct, layered, null_a))
            })
        })
        .unwrap();
    Stacks {
        main,
        io,
        direct,
        layered,
        null_node,
    }
}

fn offsets() -> impl FnMut() -> u64 {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % (DISK / REQ as u64)) * REQ as u64
    }
}

/// `iters` 4 KiB reads through `blk`, each taking the read lock as a
/// device's request does.
fn via_backend(io: &IoThread, blk: &BlockBackend, iters: u64) -> Duration {
    let blk = blk.clone();
    io.spawn(move |mut cx| async move {
        let mut buf = IoBuf::zeroed(REQ);
        let mut next = offsets();
        let start = Instant::now();
        for _ in 0..iters {
            blk.read(&mut cx, next(), &mut buf).await.unwrap();
        }
        start.elapsed()
    })
    .join()
}

/// `iters` 4 KiB reads on the null node's `IoRef`, under one read lock.
fn node_direct(io: &IoThread, node: &NodeHandle, iters: u64) -> Duration {
    let node = node.clone();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let n = node.io(&guard);
        let mut buf = IoBuf::zeroed(REQ);
        let mut next = offsets();
        let start = Instant::now();
        for _ in 0..iters {
            n.read(next(), &mut buf).await.unwrap();
        }
        start.elapsed()
    })
    .join()
}

/// `iters` 4 KiB writes through `blk` (the write path: where dirty bitmaps
/// are marked, DESIGN §15; none exist here, so this measures what their
/// absence costs).
fn write_via_backend(io: &IoThread, blk: &BlockBackend, iters: u64) -> Duration {
    let blk = blk.clone();
    io.spawn(move |mut cx| async move {
        let buf = IoBuf::zeroed(REQ);
        let mut next = offsets();
        let start = Instant::now();
        for _ in 0..iters {
            blk.write(&mut cx, next(), &buf).await.unwrap();
        }
        start.elapsed()
    })
    .join()
}

/// `iters` 4 KiB writes on the null node's `IoRef`, under one read lock.
fn write_node_direct(io: &IoThread, node: &NodeHandle, iters: u64) -> Duration {
    let node = node.clone();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let n = node.io(&guard);
        let buf = IoBuf::zeroed(REQ);
        let mut next = offsets();
        let start = Instant::now();
        for _ in 0..iters {
            n.write(next(), &buf).await.unwrap();
        }
        start.elapsed()
    })
    .join()
}

fn per_request(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e9 / n as f64
}

fn stack_overhead(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group("stack_overhead_read_4k");
    group.bench_function("null_node_direct", |b| {
        b.iter_custom(|iters| node_direct(&s.io, &s.null_node, iters))
    });
    group.bench_function("backend_null", |b| {
        b.iter_custom(|iters| via_backend(&s.io, &s.direct, iters))
    });
    group.bench_function("backend_throttle_raw_null", |b| {
        b.iter_custom(|iters| via_backend(&s.io, &s.layered, iters))
    });
    group.finish();
    let mut group = c.benchmark_group("stack_overhead_write_4k");
    group.bench_function("null_node_direct", |b| {
        b.iter_custom(|iters| write_node_direct(&s.io, &s.null_node, iters))
    });
    group.bench_function("backend_null", |b| {
        b.iter_custom(|iters| write_via_backend(&s.io, &s.direct, iters))
    });
    group.bench_function("backend_throttle_raw_null", |b| {
        b.iter_custom(|iters| write_via_backend(&s.io, &s.layered, iters))
    });
    group.finish();

    // The ratio: batches run alternately (direct, layered, direct, ...), so
    // that load on the machine hits both alike.
    const BATCH: u64 = 50_000;
    const ROUNDS: usize = 51;
    let r = common::alternate(
        ROUNDS,
        || per_request(via_backend(&s.io, &s.direct, BATCH), BATCH),
        || per_request(via_backend(&s.io, &s.layered, BATCH), BATCH),
    );
    println!("\n{}", common::machine());
    println!(
        "ratio (backend->throttle->raw->null) / (backend->null), 4 KiB random read, QD1: {:.3}x  \
         (median {:.1} ns vs {:.1} ns per request, {ROUNDS} paired batches of {BATCH})",
        r.ratio(),
        common::median(&r.b),
        common::median(&r.a)
    );
    drop(s.io);
    s.main.shutdown();
}

criterion_group!(benches, stack_overhead);
criterion_main!(benches);
