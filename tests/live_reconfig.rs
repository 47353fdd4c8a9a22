//! Live reconfiguration under load: 10,000 graph mutations on the main loop
//! while two I/O threads run verified read/write traffic through one
//! backend. No write may be lost, no request may fail, nothing may hang.

mod common;

/// The main example, run by `the_main_example_runs_on_small_disks` below.
#[allow(dead_code)] // its `main` (argument parsing) is not called here
#[path = "../examples/live_reconfig.rs"]
mod live_reconfig_example;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgraph::driver::require_child;
use blockgraph::drivers::MemoryDriver;
use blockgraph::{
    driver::{BlockDriver, IoFuture},
    BackendOptions, ChildRole, Error, MainLoop, Permissions, RequestRef,
};
use common::{assert_consistent, graph_problems, join_within, structure, watchdog, Flag, Overlay};

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
    async fn child<'a>(&self, node: RequestRef<'a>) -> blockgraph::Result<RequestRef<'a>> {
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
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::Filtered)?.length().await })
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.child(node).await?.read(offset, buf).await?;
            tokio::task::yield_now().await;
            Ok(())
        })
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
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

/// Lock-step pacing between the mutator and the I/O tasks.
///
/// Busy I/O loops on two threads would keep both cores of a CI machine
/// runnable, and the main loop would then wait milliseconds for every
/// wake-up. Instead the mutator opens a new *stage* at each point where the
/// graph should carry traffic, and each I/O task does a small budget of work
/// per stage and then parks until the next one. The mutator's [`Pace::traffic`]
/// returns once every writer has completed a verified write+read in the
/// current graph; the rest of the budget overlaps the next mutation.
struct Pace {
    stage: tokio::sync::watch::Sender<u64>,
    /// Verified write+read rounds per writer.
    ops: Vec<AtomicU64>,
    /// Signalled by writer `t` after each round.
    progress: Vec<tokio::sync::Notify>,
    /// Read-locked graph walks per walker.
    walks: Vec<AtomicU64>,
    stop: Flag,
}

/// Writer rounds per stage.
const WRITES_PER_STAGE: u32 = 4;
/// Graph walks per stage.
const WALKS_PER_STAGE: u32 = 2;

impl Pace {
    fn new() -> Arc<Pace> {
        Arc::new(Pace {
            stage: tokio::sync::watch::channel(0).0,
            ops: (0..THREADS).map(|_| AtomicU64::new(0)).collect(),
            progress: (0..THREADS).map(|_| tokio::sync::Notify::new()).collect(),
            walks: (0..THREADS).map(|_| AtomicU64::new(0)).collect(),
            stop: Flag::default(),
        })
    }

    /// Opens a new stage and waits until every writer has completed a round
    /// in it.
    async fn traffic(&self) {
        let before: Vec<u64> = self.ops.iter().map(|o| o.load(Ordering::SeqCst)).collect();
        self.stage.send_modify(|s| *s += 1);
        for ((o, p), b) in self.ops.iter().zip(&self.progress).zip(before) {
            while o.load(Ordering::SeqCst) <= b {
                p.notified().await;
            }
        }
    }

    /// Stops every I/O task.
    fn finish(&self) {
        self.stop.set();
        self.stage.send_modify(|s| *s += 1);
    }
}

/// An I/O task's share of the pacing: `budget` units of work per stage.
struct Budget {
    stage: tokio::sync::watch::Receiver<u64>,
    per_stage: u32,
    left: u32,
}

impl Budget {
    fn new(pace: &Pace, per_stage: u32) -> Budget {
        Budget {
            stage: pace.stage.subscribe(),
            per_stage,
            left: per_stage,
        }
    }

    /// Takes one unit of work, waiting for the next stage when this one's
    /// budget is spent.
    async fn take(&mut self) {
        if self.left == 0 {
            let _ = self.stage.changed().await;
            self.left = self.per_stage;
        }
        self.left -= 1;
    }
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
    let pace = Pace::new();
    let writers: Vec<_> = ios
        .iter()
        .enumerate()
        .map(|(t, io)| {
            let (blk, pace) = (blk.clone(), pace.clone());
            io.spawn(move |mut cx| async move {
                let mut budget = Budget::new(&pace, WRITES_PER_STAGE);
                let base = (t * REGION) as u64;
                let blocks = REGION / BLOCK;
                let mut model = vec![0u8; REGION];
                let mut buf = vec![0u8; BLOCK];
                let mut back = vec![0u8; BLOCK];
                let mut seq = 0u64;
                loop {
                    budget.take().await;
                    if pace.stop.get() {
                        break;
                    }
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
                    pace.ops[t].store(seq, Ordering::SeqCst);
                    pace.progress[t].notify_one();
                    // Requests on a memory stack complete without ever
                    // being pending; let the walker on this thread run.
                    tokio::task::yield_now().await;
                }
                Ok::<_, String>(model)
            })
        })
        .collect();

    // Graph walkers: one more task per I/O thread that reads the graph
    // itself under the read lock (not through the backend, so drains do not
    // stop it). The graph must be consistent, and must not change while the
    // guard is held, even across an `.await`.
    let walkers: Vec<_> = ios
        .iter()
        .enumerate()
        .map(|(t, io)| {
            let pace = pace.clone();
            io.spawn(move |mut cx| async move {
                let mut budget = Budget::new(&pace, WALKS_PER_STAGE);
                let mut shapes = std::collections::HashSet::new();
                let mut n = 0u64;
                loop {
                    budget.take().await;
                    if pace.stop.get() {
                        break;
                    }
                    let guard = cx.read().await;
                    let before = structure(guard.graph());
                    let problems = graph_problems(guard.graph());
                    if !problems.is_empty() {
                        return Err(format!("io{t}: reader saw {problems:?} in\n{before}"));
                    }
                    tokio::task::yield_now().await;
                    let after = structure(guard.graph());
                    if after != before {
                        return Err(format!(
                            "io{t}: graph changed under a read guard:\n{before}\n--- became ---\n{after}"
                        ));
                    }
                    drop(guard);
                    shapes.insert(before.lines().filter(|l| l.starts_with("node")).count());
                    n += 1;
                    pace.walks[t].store(n, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
                Ok::<_, String>(shapes)
            })
        })
        .collect();
    common::wait_until("writers and walkers to get going", || {
        pace.ops
            .iter()
            .chain(pace.walks.iter())
            .all(|o| o.load(Ordering::SeqCst) > 0)
    });

    // The mutator: an async main-loop task, so the main loop keeps serving
    // other work while it waits for drains and readers.
    let ops_at_start: Vec<u64> = pace.ops.iter().map(|o| o.load(Ordering::SeqCst)).collect();
    let started = Instant::now();
    let mutator = main.spawn({
        let (disk, pace) = (disk.clone(), pace.clone());
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
                pace.traffic().await;

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
                pace.traffic().await;

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
    let ops_during: Vec<u64> = pace
        .ops
        .iter()
        .zip(&ops_at_start)
        .map(|(o, s)| o.load(Ordering::SeqCst) - s)
        .collect();
    pace.finish();
    let models: Vec<Vec<u8>> = writers
        .into_iter()
        .map(|w| join_within(w, Duration::from_secs(60), "a writer").unwrap())
        .collect();
    let mut shapes_seen = std::collections::HashSet::new();
    for w in walkers {
        shapes_seen.extend(join_within(w, Duration::from_secs(60), "a walker").unwrap());
    }
    let walks: Vec<u64> = pace
        .walks
        .iter()
        .map(|w| w.load(Ordering::SeqCst))
        .collect();
    eprintln!(
        "{committed} mutations in {elapsed:?}; writes per thread meanwhile {ops_during:?}; \
         {} requests completed ({via_filters} through filters, {via_overlays} through overlays), \
         {} had to queue; graph walks {walks:?} saw node counts {shapes_seen:?}",
        blk.completed_requests(),
        blk.queued_requests()
    );

    assert_eq!(committed, MUTATIONS);
    // Two stages per cycle, each with at least one round per writer.
    for (t, n) in ops_during.iter().enumerate() {
        assert!(
            *n >= 2 * (MUTATIONS / PER_CYCLE),
            "io{t} made only {n} writes during the mutations"
        );
    }
    assert!(blk.queued_requests() > 0, "no request ever met a drain");
    // Every filter and every overlay carried at least one request from
    // each thread (see `Pace::traffic`).
    let cycles = MUTATIONS / PER_CYCLE;
    assert!(
        via_filters >= cycles,
        "only {via_filters} requests went through filters"
    );
    assert!(
        via_overlays >= cycles,
        "only {via_overlays} requests went through overlays"
    );
    // The walkers saw the graph in more than one shape: they really ran
    // while it changed.
    assert!(shapes_seen.len() > 1, "walkers saw only {shapes_seen:?}");
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

/// The main example (`examples/live_reconfig.rs`) end to end on 8 MiB
/// disks: snapshots, a stream and a commit, then a mirror with pivot and
/// a point-in-time backup, all under guest I/O; DOT files, every block of
/// both disks and the backup read back, every qcow2 image checked. So it
/// cannot rot.
#[test]
fn the_main_example_runs_on_small_disks() {
    let _w = watchdog("live_reconfig_example", Duration::from_secs(240));
    let out = tempfile::tempdir().unwrap();
    let options = live_reconfig_example::Options {
        disk_mib: 8,
        speed: 16 << 20,
        out_dir: out.path().to_owned(),
        phase: Duration::from_millis(300),
    };
    let report = live_reconfig_example::run(&options).unwrap();
    assert!(report.writes > 0, "{report:?}");
    assert_eq!(report.mismatches, 0, "{report:?}");
    // Both disks and the backup, block by block.
    assert_eq!(report.verified_blocks, 3 * (8 << 20) / 4096);
    assert_eq!(
        report.job_bytes[..2],
        [
            ("stream-A".to_owned(), 8 << 20),
            ("commit-B".to_owned(), 8 << 20)
        ]
    );
    // The mirror copies what the guest dirtied again, on top of the disk.
    assert_eq!(report.job_bytes[2].0, "mirror-A");
    assert!(report.job_bytes[2].1 >= 8 << 20, "{report:?}");
    assert_eq!(report.job_bytes[3], ("backup-B".to_owned(), 8 << 20));
    // A was pivoted onto its mirror.
    assert_eq!(report.chains, [vec!["a-mirror"], vec!["b-top", "b-base"]]);
    // a-top (left by the pivot), a-mirror, b-top, b-base, b-backup.
    assert_eq!(report.checked.len(), 5, "{report:?}");
    assert!(report.checked.iter().all(|(_, clean)| *clean), "{report:?}");
    assert_eq!(report.dot_files.len(), 3);
    for file in &report.dot_files {
        let dot = std::fs::read_to_string(file).unwrap();
        assert!(dot.starts_with("digraph"), "{}", file.display());
    }
    // The jobs' filters show in the graph while they run, not after.
    let during = std::fs::read_to_string(&report.dot_files[1]).unwrap();
    assert!(during.contains("stream-A-stream") && during.contains("commit-B-commit"));
    let after = std::fs::read_to_string(&report.dot_files[2]).unwrap();
    assert!(!after.contains("commit-B-commit") && !after.contains("b-mid\""));
}
