//! Live reconfiguration under load: 10,000 graph mutations on the main loop
//! while two I/O threads run verified read/write traffic through one
//! backend. No write may be lost, no request may fail, nothing may hang.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgraph::driver::require_child;
use blockgraph::drivers::MemoryDriver;
use blockgraph::{
    BackendOptions, BlockDriver, ChildRole, Error, IoFuture, IoRef, MainLoop, Permissions,
};
use common::{assert_consistent, join_within, watchdog, Flag, Overlay};

/// Committed graph mutations (transactions) the test makes.
const MUTATIONS: u64 = 10_000;
/// Each cycle commits five: insert filter, remove filter, append overlay,
/// replace the overlay by its backing node, remove the overlay.
const PER_CYCLE: u64 = 5;
const SIZE: usize = 1 << 20;
const BLOCK: usize = 4096;
const THREADS: usize = 2;
const REGION: usize = SIZE / THREADS;

/// A filter whose requests stay in flight across two yields (before and
/// after passing down), so drains and writers really have to wait for them
/// while the I/O threads run.
#[derive(Default)]
struct YieldingFilter {
    requests: AtomicU64,
}

impl YieldingFilter {
    async fn child<'a>(&self, node: IoRef<'a>) -> blockgraph::Result<IoRef<'a>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        require_child(node, ChildRole::Filtered)
    }
}

impl BlockDriver for YieldingFilter {
    fn format_name(&self) -> &'static str {
        "yielding-filter"
    }
    fn child_permissions(&self, _role: ChildRole, users: Permissions) -> Permissions {
        users
    }
    fn length<'a>(&'a self, node: IoRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::Filtered)?.length().await })
    }
    fn read<'a>(&'a self, node: IoRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.child(node).await?.read(offset, buf).await?;
            tokio::task::yield_now().await;
            Ok(())
        })
    }
    fn write<'a>(&'a self, node: IoRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.child(node).await?.write(offset, buf).await?;
            tokio::task::yield_now().await;
            Ok(())
        })
    }
}

/// The bytes thread `t` writes to block `b` on its `seq`-th write: unique
/// per (thread, block, write), so a lost or misdirected write shows.
fn pattern(t: usize, b: usize, seq: u64, buf: &mut [u8]) {
    let seed = (seq as u8) ^ ((b as u8) << 1) ^ ((t as u8) << 7);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = seed
            .wrapping_add((i / 8) as u8)
            .wrapping_mul(31)
            .wrapping_add(seq as u8);
    }
    buf[..8].copy_from_slice(&seq.to_le_bytes());
}

#[test]
fn ten_thousand_mutations_under_verified_io_on_two_threads() {
    let _wd = watchdog("ten_thousand_mutations", Duration::from_secs(600));
    let main = MainLoop::new().unwrap();
    let ios: Vec<_> = (0..THREADS)
        .map(|t| main.new_io_thread(&format!("io{t}")).unwrap())
        .collect();
    let (disk, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(SIZE as u64), &[])?;
                let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, Error>((disk, blk))
            })
        })
        .unwrap();

    // Writers: each thread owns a region, writes a block, reads it back
    // and checks it, and keeps a model of what its region must hold.
    let stop = Flag::default();
    let ops: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let writers: Vec<_> = ios
        .iter()
        .enumerate()
        .map(|(t, io)| {
            let (blk, stop, ops) = (blk.clone(), stop.clone(), ops.clone());
            io.spawn(move |mut cx| async move {
                let base = (t * REGION) as u64;
                let blocks = REGION / BLOCK;
                let mut model = vec![0u8; REGION];
                let mut buf = vec![0u8; BLOCK];
                let mut back = vec![0u8; BLOCK];
                let mut seq = 0u64;
                while !stop.get() {
                    // Walk the region with a stride co-prime to its size.
                    let b = (seq as usize * 37) % blocks;
                    let at = base + (b * BLOCK) as u64;
                    pattern(t, b, seq, &mut buf);
                    blk.write(&mut cx, at, &buf)
                        .await
                        .map_err(|e| format!("io{t}: write #{seq} at {at} failed: {e}"))?;
                    model[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&buf);
                    blk.read(&mut cx, at, &mut back)
                        .await
                        .map_err(|e| format!("io{t}: read #{seq} at {at} failed: {e}"))?;
                    if back != buf {
                        return Err(format!(
                            "io{t}: block {b} read back wrong after write #{seq}"
                        ));
                    }
                    // Now and then, re-read an older block from the model.
                    if seq % 16 == 0 {
                        let old = (b + blocks / 2) % blocks;
                        let at = base + (old * BLOCK) as u64;
                        blk.read(&mut cx, at, &mut back)
                            .await
                            .map_err(|e| format!("io{t}: re-read at {at} failed: {e}"))?;
                        if back[..] != model[old * BLOCK..(old + 1) * BLOCK] {
                            return Err(format!(
                                "io{t}: block {old} lost a write (seen at #{seq})"
                            ));
                        }
                    }
                    seq += 1;
                    ops[t].store(seq, Ordering::Relaxed);
                }
                Ok::<_, String>(model)
            })
        })
        .collect();
    common::wait_until("both writers to get going", || {
        ops.iter().all(|o| o.load(Ordering::Relaxed) > 10)
    });

    // The mutator: an async main-loop task, so the main loop keeps serving
    // other work while it waits for drains and readers.
    let ops_at_start: Vec<u64> = ops.iter().map(|o| o.load(Ordering::Relaxed)).collect();
    let started = Instant::now();
    let mutator = main.spawn({
        let disk = disk.clone();
        move |mut cx| async move {
            let first = cx.bql(|bql| bql.graph().mutation_count());
            // Requests that went through the short-lived filters and
            // overlays: the traffic really crossed the changing graph.
            let (mut via_filters, mut via_overlays) = (0u64, 0u64);
            for c in 0..MUTATIONS / PER_CYCLE {
                let d = cx.drain(&disk).await;
                let f = cx
                    .write(|w| w.insert_filter(&d, &format!("f{c}"), YieldingFilter::default()))
                    .await?;
                drop(d);

                let d = cx.drain(&f).await;
                cx.write(|w| w.remove_filter(&d)).await?;
                drop(d);
                via_filters += cx.bql(|bql| {
                    let gs = f.gs(bql);
                    assert!(!gs.is_in_graph());
                    let filter = gs.driver_as::<YieldingFilter>().unwrap();
                    filter.requests.load(Ordering::Relaxed)
                });

                let d = cx.drain(&disk).await;
                let o = cx
                    .write(|w| w.append_overlay(&d, &format!("o{c}"), Overlay::new(), &[]))
                    .await?;
                drop(d);

                let d_o = cx.drain(&o).await;
                let d_disk = cx.drain(&disk).await;
                cx.write(|w| {
                    w.replace_node(&d_o, &d_disk)?;
                    w.remove_node(&d_o)
                })
                .await?;
                drop(d_disk);
                drop(d_o);
                via_overlays += cx.bql(|bql| {
                    let gs = o.gs(bql);
                    assert!(!gs.is_in_graph());
                    gs.driver_as::<Overlay>()
                        .unwrap()
                        .requests
                        .load(Ordering::Relaxed)
                });

                if c % 200 == 0 {
                    cx.bql(|bql| {
                        let names: Vec<_> = bql.graph().nodes().map(|n| n.name()).collect();
                        assert_eq!(names, ["disk"], "the graph grew");
                        assert_consistent(bql.graph());
                    });
                }
            }
            let last = cx.bql(|bql| bql.graph().mutation_count());
            Ok::<_, Error>((last - first, via_filters, via_overlays))
        }
    });
    let (committed, via_filters, via_overlays) =
        join_within(mutator, Duration::from_secs(540), "the mutator").expect("a mutation failed");
    let elapsed = started.elapsed();
    let ops_during: Vec<u64> = ops
        .iter()
        .zip(&ops_at_start)
        .map(|(o, s)| o.load(Ordering::Relaxed) - s)
        .collect();
    stop.set();
    let models: Vec<Vec<u8>> = writers
        .into_iter()
        .map(|w| join_within(w, Duration::from_secs(60), "a writer").unwrap())
        .collect();
    eprintln!(
        "{committed} mutations in {elapsed:?}; writes per thread meanwhile {ops_during:?}; \
         {} requests completed ({via_filters} through filters, {via_overlays} through overlays), \
         {} had to queue",
        blk.completed_requests(),
        blk.queued_requests()
    );

    assert_eq!(committed, MUTATIONS);
    for (t, n) in ops_during.iter().enumerate() {
        assert!(*n >= 50, "io{t} made only {n} writes during the mutations");
    }
    assert!(blk.queued_requests() > 0, "no request ever met a drain");
    assert!(via_filters > 0, "no request went through a filter");
    assert!(via_overlays > 0, "no request went through an overlay");
    assert_eq!(blk.in_flight(), 0);
    assert!(!blk.is_quiesced());

    // The memory node holds exactly what the writers last wrote.
    let contents = main.run(move |bql| {
        let gs = disk.gs(bql);
        assert_eq!(gs.drain_count(), 0);
        assert_consistent(bql.graph());
        let names: Vec<_> = bql.graph().nodes().map(|n| n.name().to_owned()).collect();
        assert_eq!(names, ["disk"]);
        gs.driver_as::<MemoryDriver>().unwrap().contents()
    });
    for (t, model) in models.iter().enumerate() {
        let region = &contents[t * REGION..(t + 1) * REGION];
        if region != &model[..] {
            let first = (0..REGION / BLOCK)
                .find(|&b| region[b * BLOCK..(b + 1) * BLOCK] != model[b * BLOCK..(b + 1) * BLOCK])
                .unwrap();
            panic!("io{t}: block {first} on the memory node differs from the last write");
        }
    }
    drop(ios);
    main.shutdown();
}
