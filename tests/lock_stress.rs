//! Graph lock stress: several contexts x many tasks hold the read lock
//! across awaits and check the graph while the main loop takes the write
//! section thousands of times to insert and remove filters.
//!
//! Checked, with zero tolerance:
//!
//! * readers: under one guard the graph never changes (mutation count and
//!   the whole chain from the backend down are the same before and after
//!   the awaits), the chain is well formed (each node is its child's
//!   parent, it ends at the base node, no node twice), and no write section
//!   is running;
//! * the writer: inside every write section no reader holds a guard.
//!
//! Readers run on three I/O threads and on an embedder's two-worker
//! multi-thread runtime (tasks, and the guards they hold across awaits,
//! migrate between its workers). Every wait is bounded: a hang fails the
//! test instead of stalling CI. Both fence modes run (the symmetric one
//! forced through `BLOCKGRAPH_LOCK_FENCE`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::drivers::{NullDriver, PassthroughFilter};
use blockgraph::{BackendOptions, GraphView, MainLoop, ReadLocked};

/// Write sections per mode (debug build: a few seconds).
const WRITES: u64 = 3_000;
/// Reader tasks per I/O thread and on the embedder runtime.
const TASKS_PER_CONTEXT: usize = 6;
const IO_THREADS: usize = 3;
/// At most this many filters stacked above the base node.
const MAX_FILTERS: usize = 3;
/// Generous bound on every wait in this test.
const TIMEOUT: Duration = Duration::from_secs(90);

/// Serialises the tests of this file: the fence mode is chosen from the
/// environment when a main loop starts.
static MODE_LOCK: Mutex<()> = Mutex::new(());

#[derive(Default)]
struct Shared {
    /// Readers currently holding a guard (bumped right after taking it,
    /// dropped right before releasing it).
    holding: AtomicUsize,
    /// Raised by the writer for the duration of each write section.
    writing: AtomicBool,
    stop: AtomicBool,
    violations: AtomicUsize,
    first_violation: Mutex<Option<String>>,
    /// Read sections completed, and awaits done while holding a guard.
    sections: AtomicU64,
    awaits: AtomicU64,
}

impl Shared {
    fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::SeqCst);
        let mut first = self
            .first_violation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }
}

/// The chain from backend `vda` down, as node names; checks its shape.
fn chain(graph: GraphView<'_, ReadLocked>) -> Result<Vec<String>, String> {
    let backend = graph
        .backends()
        .find(|b| b.name() == "vda")
        .ok_or("backend vda missing")?;
    let mut node = backend.root().ok_or("backend vda has no root")?;
    let mut names = vec![node.name().to_owned()];
    loop {
        let children: Vec<_> = node.children().collect();
        match children.as_slice() {
            [] => break,
            [child] => {
                let is_parent = child.node.parents().any(|p| match p {
                    blockgraph::ParentRef::Node { node: parent, .. } => {
                        parent.name() == node.name()
                    }
                    blockgraph::ParentRef::Backend { .. } => false,
                });
                if !is_parent {
                    return Err(format!(
                        "{} is a child of {} but does not list it as parent",
                        child.node.name(),
                        node.name()
                    ));
                }
                node = child.node;
                if names.iter().any(|n| n == node.name()) {
                    return Err(format!("{} twice in the chain", node.name()));
                }
                names.push(node.name().to_owned());
            }
            more => return Err(format!("{} has {} children", node.name(), more.len())),
        }
    }
    if names.last().map(String::as_str) != Some("base") {
        return Err(format!("chain does not end at base: {names:?}"));
    }
    if names.len() != graph.nodes().len() {
        return Err(format!(
            "chain {names:?} but {} nodes in the graph",
            graph.nodes().len()
        ));
    }
    if names.len() > MAX_FILTERS + 1 {
        return Err(format!("too many filters: {names:?}"));
    }
    Ok(names)
}

/// One reader task's loop: hold the lock across a few awaits, checking.
async fn reader(mut cx: blockgraph::IoTask, shared: Arc<Shared>, seed: u64) -> u64 {
    let mut sections = 0;
    let mut rng = seed | 1;
    while !shared.stop.load(Ordering::Relaxed) {
        let guard = cx.read().await;
        shared.holding.fetch_add(1, Ordering::SeqCst);
        if shared.writing.load(Ordering::SeqCst) {
            shared.violation("reader got a guard during a write section".into());
        }
        let before = guard.graph().mutation_count();
        let first = chain(guard.graph());
        if let Err(e) = &first {
            shared.violation(format!("malformed graph under a guard: {e}"));
        }
        // xorshift: 0-3 awaits while holding the guard.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        for _ in 0..(rng % 4) {
            tokio::task::yield_now().await;
            shared.awaits.fetch_add(1, Ordering::Relaxed);
            if shared.writing.load(Ordering::SeqCst) {
                shared.violation("write section began while a reader held its guard".into());
            }
        }
        let after = guard.graph().mutation_count();
        let second = chain(guard.graph());
        if before != after || first != second {
            shared.violation(format!(
                "graph changed under a guard: {before}->{after}, {first:?} -> {second:?}"
            ));
        }
        shared.holding.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        sections += 1;
        if sections % 8 == 0 {
            // Let the other tasks of this thread in without the lock too.
            tokio::task::yield_now().await;
        }
    }
    shared.sections.fetch_add(sections, Ordering::Relaxed);
    sections
}

fn run_stress(symmetric: bool) {
    let _serial = MODE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if symmetric {
        std::env::set_var("BLOCKGRAPH_LOCK_FENCE", "symmetric");
    } else {
        std::env::remove_var("BLOCKGRAPH_LOCK_FENCE");
    }
    let main = MainLoop::new().expect("main loop");
    std::env::remove_var("BLOCKGRAPH_LOCK_FENCE");

    main.run(|bql| {
        bql.write(|w| -> blockgraph::Result<()> {
            let base = w.add_node("base", NullDriver::new(1 << 20), &[])?;
            w.add_backend("vda", &base, BackendOptions::default())?;
            Ok(())
        })
    })
    .expect("initial graph");

    let shared = Arc::new(Shared::default());
    let (done_tx, done_rx) = mpsc::channel::<u64>();

    let io_threads: Vec<_> = (0..IO_THREADS)
        .map(|i| {
            main.new_io_thread(&format!("stress-io{i}"))
                .expect("io thread")
        })
        .collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for io in &io_threads {
        for _ in 0..TASKS_PER_CONTEXT {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let (shared, done_tx) = (shared.clone(), done_tx.clone());
            let s = seed;
            drop(io.spawn(move |cx| async move {
                let n = reader(cx, shared, s).await;
                let _ = done_tx.send(n);
            }));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("embedder runtime");
    let embedder = main.new_io_context("embedder");
    for _ in 0..TASKS_PER_CONTEXT {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let (shared, done_tx) = (shared.clone(), done_tx.clone());
        let s = seed;
        drop(embedder.spawn_on(runtime.handle(), move |cx| async move {
            let n = reader(cx, shared, s).await;
            let _ = done_tx.send(n);
        }));
    }
    drop(done_tx);
    let readers = IO_THREADS * TASKS_PER_CONTEXT + TASKS_PER_CONTEXT;

    // The writer: thousands of drained write sections on the main loop,
    // from a thread of its own so that this thread can time it out.
    let (writer_tx, writer_rx) = mpsc::channel::<Result<u64, String>>();
    let writer = {
        let (main, shared) = (main.clone(), shared.clone());
        thread::spawn(move || {
            let mut filters: Vec<String> = Vec::new();
            for i in 0..WRITES {
                let grow = filters.len() < MAX_FILTERS && (filters.is_empty() || i % 5 < 3);
                let (shared2, name) = (shared.clone(), format!("f{i}"));
                let removing = filters.first().cloned();
                let outcome = main.run(move |bql| -> Result<(), String> {
                    let target = if grow {
                        bql.node("base").map(|n| n.to_handle())
                    } else {
                        removing
                            .as_deref()
                            .and_then(|n| bql.node(n))
                            .map(|n| n.to_handle())
                    }
                    .ok_or("node vanished")?;
                    let drained = bql.drain(&target);
                    bql.write(|w| {
                        shared2.writing.store(true, Ordering::SeqCst);
                        let holding = shared2.holding.load(Ordering::SeqCst);
                        if holding != 0 {
                            shared2.violation(format!(
                                "write section entered with {holding} readers holding guards"
                            ));
                        }
                        let r = if grow {
                            w.insert_filter(&drained, &name, PassthroughFilter::new())
                                .map(drop)
                        } else {
                            w.remove_filter(&drained)
                        };
                        shared2.writing.store(false, Ordering::SeqCst);
                        r.map_err(|e| e.to_string())
                    })
                });
                if let Err(e) = outcome {
                    let _ = writer_tx.send(Err(format!("write {i}: {e}")));
                    return;
                }
                if grow {
                    // insert_filter goes right above base: the newest filter
                    // is the lowest, the oldest right below the backend.
                    filters.push(format!("f{i}"));
                } else {
                    filters.remove(0);
                }
            }
            let _ = writer_tx.send(Ok(WRITES));
        })
    };

    let started = Instant::now();
    let written = writer_rx
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("writer hung (symmetric: {symmetric})"));
    let elapsed = started.elapsed();
    shared.stop.store(true, Ordering::SeqCst);
    let mut per_task = Vec::new();
    for _ in 0..readers {
        per_task.push(
            done_rx
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("a reader task hung (symmetric: {symmetric})")),
        );
    }
    writer.join().expect("writer thread");

    let first = shared
        .first_violation
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(
        shared.violations.load(Ordering::SeqCst),
        0,
        "lock violations (symmetric: {symmetric}); first: {first:?}"
    );
    assert_eq!(
        written,
        Ok(WRITES),
        "writer failed (symmetric: {symmetric})"
    );
    // The readers really ran while the writer did, and held guards across
    // awaits.
    assert!(
        per_task.iter().all(|&n| n > 0),
        "a reader never entered: {per_task:?}"
    );
    assert!(shared.awaits.load(Ordering::Relaxed) > 0);
    assert_eq!(main.readers_inside(), 0);
    assert!(!main.writer_active());
    eprintln!(
        "lock_stress (symmetric: {symmetric}): {WRITES} write sections in {elapsed:?}, \
         {} read sections, {} awaits under a guard",
        shared.sections.load(Ordering::Relaxed),
        shared.awaits.load(Ordering::Relaxed)
    );

    drop(io_threads);
    drop(embedder);
    drop(runtime);
    main.shutdown();
}

#[test]
fn stress_default_fence_mode() {
    run_stress(false);
}

#[test]
fn stress_symmetric_fence_mode() {
    run_stress(true);
}
