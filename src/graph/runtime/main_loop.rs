//! [`MainLoop`], the thread that owns the graph (QEMU's main loop).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::task::{run_and_send, TaskHandle};
use super::IoThread;
use crate::graph::cell::WriteAccess;
use crate::graph::node::NodeInner;
use crate::graph::proof::NodeHandle;
use crate::graph::proof::{Bql, GsRef};
use crate::graph::runtime::{IoContext, MainTask};
use crate::graph::GraphInner;
use crate::thread::{
    current_task, refuse_under_guard, set_thread_role, thread_role, BqlScope, ThreadRole,
};
use crate::types::{Error, Result};

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

enum Job {
    Run(Box<dyn FnOnce(&mut Bql) + Send>),
    Spawn(Box<dyn FnOnce(MainTask) -> LocalFuture + Send>),
    Shutdown,
}

struct Shared {
    jobs: mpsc::UnboundedSender<Job>,
    graph: Arc<GraphInner>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_context: AtomicU64,
}

/// The main loop: a thread running a single-threaded executor that owns the
/// graph, and the only place graph writes start.
///
/// The handle is cheap to clone and `Send + Sync`. Synchronous main-loop code
/// runs through [`MainLoop::run`] (like a QMP command), async main-loop code
/// through [`MainLoop::spawn`] (like a block job's coroutine). Both get the
/// [`Bql`] only inside synchronous closures.
///
/// The loop runs until [`MainLoop::shutdown`], which removes every backend
/// and node (closing their drivers) and stops the thread.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::NullDriver, MainLoop};
///
/// let main = MainLoop::new()?;
/// main.run(|bql| bql.write(|w| w.add_node("null0", NullDriver::new(1 << 30), &[])))?;
/// let names = main.run(|bql| bql.graph().nodes().map(|n| n.name().to_owned()).collect::<Vec<_>>());
/// assert_eq!(names, ["null0"]);
/// main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Clone)]
pub struct MainLoop {
    shared: Arc<Shared>,
}

impl MainLoop {
    /// Starts the main-loop thread.
    pub fn new() -> Result<MainLoop> {
        // The graph lock's membarrier registration, before this starts a
        // thread: while the process has one thread the kernel registers it
        // at once, after that it waits for an RCU grace period (about
        // 12 ms here, most of a short tool's start-up). Once per process;
        // the lock created below asks again and finds the answer cached.
        let _ = crate::sync::membarrier::asymmetric_available();
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (init_tx, init_rx) = std_mpsc::channel::<MainLoop>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let thread = thread::Builder::new()
            .name("blockgraph-main".into())
            .stack_size(super::THREAD_STACK_SIZE)
            .spawn(move || {
                let Ok(main) = init_rx.recv() else { return };
                set_thread_role(ThreadRole::Main);
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, serve(main, jobs_rx));
            })?;
        let graph = Arc::new(GraphInner::new(thread.thread().id()));
        let main = MainLoop {
            shared: Arc::new(Shared {
                jobs: jobs_tx,
                graph,
                thread: Mutex::new(Some(thread)),
                next_context: AtomicU64::new(0),
            }),
        };
        init_tx
            .send(main.clone())
            .map_err(|_| io::Error::other("main-loop thread exited during start-up"))?;
        Ok(main)
    }

    /// Runs `f` on the main loop with the [`Bql`] and returns its result,
    /// blocking the calling thread until then.
    ///
    /// # Panics
    ///
    /// If `f` panics (the panic is resumed here), if the main loop has shut
    /// down, or if called on the main-loop thread (it would wait for itself:
    /// use the `Bql` you have), on an I/O thread or its blocking pool, or
    /// inside an I/O task (from `block_in_place` on an embedder's runtime).
    /// There it would block a thread whose tasks may hold the read lock that
    /// a drain or write section in `f` waits for (rules 9/10): use
    /// [`IoTask::run_on_main_loop`](crate::IoTask::run_on_main_loop).
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce(&mut Bql) -> R + Send + 'static,
        R: Send + 'static,
    {
        match thread_role() {
            ThreadRole::Main => panic!(
                "blockgraph: MainLoop::run called on the main-loop thread; use the Bql you already have"
            ),
            ThreadRole::Io => panic!(
                "blockgraph: MainLoop::run called on an I/O thread; use IoTask::run_on_main_loop"
            ),
            ThreadRole::IoBlocking => panic!(
                "blockgraph: MainLoop::run called on an I/O thread's blocking pool (spawn_blocking \
                 from an I/O task, which may hold the read lock that a drain or write section \
                 would wait for: rules 9/10); return to the task and use IoTask::run_on_main_loop"
            ),
            ThreadRole::Other => {}
        }
        refuse_under_guard("MainLoop::run");
        if current_task() != 0 {
            panic!(
                "blockgraph: MainLoop::run called inside an I/O task: it blocks the executor \
                 thread, whose other tasks may hold the read lock that a drain or write section \
                 waits for (rules 9/10); use IoTask::run_on_main_loop"
            );
        }
        let (tx, rx) = oneshot::channel();
        let job = Job::Run(Box::new(move |bql| {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(bql)));
            let _ = tx.send(outcome);
        }));
        if self.shared.jobs.send(job).is_err() {
            panic!("blockgraph: the main loop has shut down");
        }
        TaskHandle { rx }.join()
    }

    /// Queues `f` to run on the main loop; the future resolves to its result.
    pub(crate) fn submit_run<F, R>(&self, f: F) -> impl Future<Output = Result<R>> + use<F, R>
    where
        F: FnOnce(&mut Bql) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .shared
            .jobs
            .send(Job::Run(Box::new(move |bql| {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(bql)));
                let _ = tx.send(outcome);
            })))
            .is_ok();
        async move {
            if !sent {
                return Err(Error::ShutDown("main loop"));
            }
            match rx.await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(_) => Err(Error::ShutDown("main loop")),
            }
        }
    }

    /// Spawns an async task on the main loop. `f` receives the task's
    /// [`MainTask`]; the future it returns may hold `!Send` values (it never
    /// leaves the main-loop thread).
    ///
    /// # Panics
    ///
    /// If the main loop has shut down, or if called on an I/O thread or its
    /// blocking pool (a request that awaited main-loop work could deadlock a
    /// drain: use [`IoTask::run_on_main_loop`](crate::IoTask::run_on_main_loop)).
    pub fn spawn<F, Fut, T>(&self, f: F) -> TaskHandle<T>
    where
        F: FnOnce(MainTask) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        assert!(
            !matches!(thread_role(), ThreadRole::Io | ThreadRole::IoBlocking),
            "blockgraph: MainLoop::spawn called on an I/O thread; use IoTask::run_on_main_loop"
        );
        let (tx, rx) = oneshot::channel();
        let job = Job::Spawn(Box::new(move |cx| Box::pin(run_and_send(f(cx), tx))));
        if self.shared.jobs.send(job).is_err() {
            panic!("blockgraph: the main loop has shut down");
        }
        TaskHandle { rx }
    }

    /// Starts an I/O thread with its own executor and [`IoContext`].
    pub fn new_io_thread(&self, name: &str) -> Result<IoThread> {
        IoThread::start(name, self.new_io_context(name))
    }

    /// Creates an [`IoContext`] for an executor the embedder runs itself (a
    /// multi-thread tokio runtime, say). Tasks are started there with
    /// [`IoContext::spawn_on`], each with its own [`IoTask`](crate::IoTask).
    pub fn new_io_context(&self, name: &str) -> IoContext {
        let n = self.shared.next_context.fetch_add(1, Ordering::Relaxed);
        let name = if name.is_empty() {
            format!("ctx{n}")
        } else {
            name.to_owned()
        };
        IoContext::new(name, self.shared.graph.clone(), self.clone())
    }

    /// Contexts the graph lock's writer still counts readers in: live
    /// contexts, and removed ones that still have handles or readers.
    pub fn lock_contexts(&self) -> usize {
        self.shared.graph.lock.shard_count()
    }

    /// Readers inside the graph right now, over all contexts.
    pub fn readers_inside(&self) -> usize {
        self.shared.graph.lock.total_readers()
    }

    /// Whether a writer is waiting for, or inside, a write section.
    pub fn writer_active(&self) -> bool {
        self.shared.graph.lock.writer_active()
    }

    /// Sets how long a writer (a write section) waits for readers to leave
    /// the graph before it reports, through `tracing` (target
    /// `blockgraph::graph_lock`, level WARN), which contexts still hold
    /// readers and, in debug builds or with the `lock-diagnostics` feature,
    /// where each of their guards was taken. The writer keeps waiting and
    /// reports again after twice the time. `None` turns the report off.
    ///
    /// The default is 1 s, or the `BLOCKGRAPH_LOCK_REPORT_MS` environment
    /// variable (milliseconds, or `off`) when the main loop starts. Such a
    /// wait is almost always a task holding a guard while it waits for
    /// something that needs the lock (DESIGN §2.9).
    pub fn set_lock_report_after(&self, after: Option<Duration>) {
        self.shared.graph.lock.set_report_after(after);
    }

    /// Removes every backend and node (closing their drivers) and stops the
    /// main-loop thread; tasks still running on it are dropped. Idempotent.
    ///
    /// Waits for the thread to finish when called from a plain thread.
    /// Called on the main-loop thread, on an I/O thread or its blocking pool,
    /// or inside an I/O task, it only starts the shutdown and returns: the
    /// teardown's write section waits for every read guard, and waiting for
    /// it there could wait for this very task, or for a task of this thread,
    /// that holds one. A later call from a plain thread waits.
    pub fn shutdown(&self) {
        let _ = self.shared.jobs.send(Job::Shutdown);
        if thread_role() == ThreadRole::Other && current_task() == 0 {
            let handle = self
                .shared
                .thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
    }
}

impl std::fmt::Debug for MainLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MainLoop").finish_non_exhaustive()
    }
}

async fn serve(main: MainLoop, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let graph = main.shared.graph.clone();
    // SAFETY: this is the main-loop thread of `graph`, and the `Bql` is only
    // lent to one synchronous closure at a time (under `BqlScope`).
    let mut bql = unsafe { Bql::new(graph.clone(), main.clone()) };
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Run(f) => {
                let _scope = BqlScope::enter();
                f(&mut bql);
            }
            Job::Spawn(f) => {
                // SAFETY: as above; the task's `MainTask` lends it only to
                // synchronous closures, under `BqlScope`.
                let cx = MainTask::new(unsafe { Bql::new(graph.clone(), main.clone()) });
                tokio::task::spawn_local(f(cx));
            }
            Job::Shutdown => break,
        }
    }
    flush_all(&mut bql);
    teardown(&mut bql);
    drop(bql);
    // `main` (and with it the job sender's `Shared`) may be the last handle;
    // drop it before the runtime goes so nothing outlives the loop.
    drop(main);
}

/// Flushes every node as for closing it ([`BlockDriver::flush_to_close`]),
/// users before what they use (QEMU's `bdrv_flush_all` and inactivation in
/// `bdrv_close_all`): a format driver writes back cached metadata (qcow2:
/// its persistent dirty bitmaps too), and its `close` callback cannot do
/// I/O.
///
/// [`BlockDriver::flush_to_close`]: crate::driver::BlockDriver::flush_to_close
///
/// The main loop never takes the read lock itself, so the flushes run on a
/// short-lived thread with a context of its own while the main loop waits
/// (the nested wait: nothing else runs on it meanwhile). Drained nodes are
/// skipped: their drain section is still active. Errors cannot be returned
/// from a shutdown; they are reported on stderr.
fn flush_all(bql: &mut Bql) {
    let order = users_first(bql);
    if order.is_empty() {
        return;
    }
    let ctx = IoContext::new("shutdown-flush".into(), bql.graph.clone(), bql.main.clone());
    let flusher = thread::Builder::new()
        .name("blockgraph-flush".into())
        .stack_size(super::THREAD_STACK_SIZE)
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()?;
            // A task of its own, like any reader (rule 17).
            runtime.block_on(ctx.new_task(|mut cx| async move {
                let guard = cx.read().await;
                for node in &order {
                    let node = node.io(&guard);
                    if node.is_in_graph() && !node.is_drained() {
                        if let Err(e) = node.flush_to_close().await {
                            eprintln!(
                                "blockgraph: flushing '{}' at shutdown failed: {e}",
                                node.name()
                            );
                        }
                    }
                }
            }));
            Ok::<_, io::Error>(())
        });
    match flusher.map(|t| t.join()) {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) | Err(e) => eprintln!("blockgraph: could not flush at shutdown: {e}"),
        Ok(Err(_)) => eprintln!("blockgraph: a driver panicked while flushing at shutdown"),
    }
}

/// Every node, each one before the nodes it uses: a depth-first
/// post-order over children, reversed (a topological order; mutations
/// reject cycles). Iterative with a visited set, so that it costs what the
/// graph holds and no stack in proportion to its depth.
fn users_first(bql: &Bql) -> Vec<NodeHandle> {
    let graph = bql.graph();
    let mut order: Vec<NodeHandle> = Vec::new();
    let mut seen: std::collections::HashSet<*const NodeInner> = std::collections::HashSet::new();
    let mut stack: Vec<(GsRef<'_>, bool)> = Vec::new();
    for root in graph.nodes() {
        stack.push((root, false));
        while let Some((node, children_done)) = stack.pop() {
            if children_done {
                order.push(node.to_handle());
                continue;
            }
            if !seen.insert(Arc::as_ptr(&node.to_handle().0)) {
                continue;
            }
            stack.push((node, true));
            // Reversed, so that children are visited in their order.
            let children: Vec<GsRef<'_>> = node.children().map(|c| c.node).collect();
            for child in children.into_iter().rev() {
                stack.push((child, false));
            }
        }
    }
    order.reverse();
    order
}

/// Removes every backend and node, breaking the parent/child `Arc` cycles.
fn teardown(bql: &mut Bql) {
    let _scope = BqlScope::enter();
    bql.write(|w| {
        let graph = w.graph.clone();
        clear_graph(&graph, &mut w.access);
    });
}

/// Empties the graph inside its write section. Drivers are closed and
/// references dropped only once no `&mut` into the graph is alive.
fn clear_graph(graph: &GraphInner, w: &mut WriteAccess<'_>) {
    let backends = std::mem::take(graph.backends.get_mut(w));
    graph.names.get_mut(w).clear();
    let mut roots = Vec::new();
    for b in &backends {
        b.in_graph.store(false, Ordering::Release);
        roots.push(b.root.get_mut(w).take());
    }
    let nodes = std::mem::take(graph.nodes.get_mut(w));
    let r = w.read();
    let closing: Vec<_> = nodes
        .iter()
        .filter(|n| n.in_graph.swap(false, Ordering::AcqRel))
        .collect();
    // SAFETY: main-loop thread (the writer), this graph's token; `close`
    // only gets a read-only `GsRef`.
    crate::graph::callbacks::run_all(closing, |n| unsafe { crate::graph::callbacks::close(n, r) });
    let mut children = Vec::new();
    let mut parents = Vec::new();
    for n in &nodes {
        children.push(std::mem::take(n.children.get_mut(w)));
        parents.push(std::mem::take(n.parents.get_mut(w)));
    }
    // Dropped here, after the last `&mut`: the last reference to a node
    // runs its driver's `Drop`.
    drop((children, parents, roots, backends, nodes));
}
