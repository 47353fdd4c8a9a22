//! Shared helpers for the behaviour tests: bounded waits, a watchdog that
//! turns a hang into a failure, probe drivers that record their callbacks,
//! graph checks (edge symmetry, snapshots), and the driver tests' fixture
//! ([`Stack`], [`Rig`]).
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::{
    driver::{forward, BlockDriver, BlockStatus, Filter, IoFuture},
    CallbackRef, ChildRole, Error, GraphView, MainLoop, OutsideRequest, ParentRef, Permissions,
    RequestRef, Result, TaskHandle,
};

pub mod jobs;
pub mod process;
mod stack;
#[allow(unused_imports)] // not every test binary uses the fixture
pub use stack::{add_alone, Rig, Stack};

/// How long any single wait in a test may take before the test fails.
/// Generous: CI runs debug builds on two busy cores.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Ends the whole test process if a test runs longer than its budget.
///
/// A plain panic is not enough against a hang: unwinding drops the test's
/// `IoThread`s, whose `Drop` joins threads that may be stuck in the very
/// task that hung, so the test would hang in its own clean-up. The watchdog
/// prints what timed out and exits with a failure code instead.
#[must_use = "the watchdog is disarmed when dropped"]
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
}

/// Arms a watchdog for the test `name`, firing after `budget`.
pub fn watchdog(name: &'static str, budget: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::Builder::new()
        .name(format!("watchdog-{name}"))
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(budget) {
                // Straight to stderr: `eprintln!` would be captured by the
                // test harness and lost when the process exits.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "WATCHDOG: test `{name}` did not finish within {budget:?}; exiting"
                );
                std::process::exit(101);
            }
        })
        .expect("spawn watchdog thread");
    Watchdog { done: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

/// Joins a task, failing the test if it does not finish within [`TIMEOUT`].
pub fn join<T: Send + 'static>(handle: TaskHandle<T>, what: &str) -> T {
    join_within(handle, TIMEOUT, what)
}

/// Joins a task, failing the test if it does not finish within `limit`.
pub fn join_within<T: Send + 'static>(handle: TaskHandle<T>, limit: Duration, what: &str) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| handle.join()));
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Joins a plain thread, failing the test if it does not finish within
/// [`TIMEOUT`].
pub fn join_thread<T: Send + 'static>(handle: thread::JoinHandle<T>, what: &str) -> T {
    let deadline = Instant::now() + TIMEOUT;
    while !handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
    match handle.join() {
        Ok(v) => v,
        Err(panic) => resume_unwind(panic),
    }
}

/// Receives from `rx`, failing the test after [`TIMEOUT`].
pub fn recv<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(TIMEOUT)
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

/// Polls `cond` until it holds, failing the test after [`TIMEOUT`].
///
/// Only for states that have no signal of their own (a writer flag, a
/// counter the library exposes); everything else waits on a channel.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Lets every main-loop task that is ready run before returning.
///
/// A `MainLoop::run` round trip alone is not enough: the main loop may take
/// several queued jobs in one go before it polls its tasks. A task that
/// yields a few times is only finished after the loop has polled every task
/// that was woken before it.
pub fn settle(main: &MainLoop) {
    let yielder = main.spawn(|_cx| async {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    });
    join(yielder, "the main loop to run its ready tasks");
    main.run(|_| ());
}

/// Polls `fut` exactly once and tells whether it was pending; the future
/// stays usable (for awaiting later) either way.
pub async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx: &mut Context<'_>| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}

// ---------------------------------------------------------------------------
// Probe drivers
// ---------------------------------------------------------------------------

/// An ordered log of driver callbacks, shared by every probe of a test.
#[derive(Default)]
pub struct Events(Mutex<Vec<String>>);

impl Events {
    pub fn new() -> Arc<Events> {
        Arc::new(Events::default())
    }

    pub fn push(&self, event: String) {
        self.0.lock().unwrap().push(event);
    }

    /// Takes every event recorded so far.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// How many recorded events equal `event` (without taking them).
    pub fn count(&self, event: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == event)
            .count()
    }
}

type Hook = Box<dyn Fn(CallbackRef<'_>) + Send + Sync>;

/// Wraps a driver and records its main-loop callbacks (`open`, `close`,
/// `drained_begin`, `drained_end`) as `"<callback> <node>"` in an
/// [`Events`] log; everything else is passed to the wrapped driver.
///
/// Optional hooks run inside the drain callbacks, and the request alignment
/// can be overridden.
pub struct Probe<D> {
    inner: D,
    events: Arc<Events>,
    on_begin: Option<Hook>,
    on_end: Option<Hook>,
    alignment: Option<u32>,
}

impl<D: BlockDriver> Probe<D> {
    pub fn new(inner: D, events: &Arc<Events>) -> Self {
        Probe {
            inner,
            events: events.clone(),
            on_begin: None,
            on_end: None,
            alignment: None,
        }
    }

    /// Runs `hook` in `drained_begin`, after recording the event.
    pub fn on_drained_begin(
        mut self,
        hook: impl Fn(CallbackRef<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.on_begin = Some(Box::new(hook));
        self
    }

    /// Runs `hook` in `drained_end`, after recording the event.
    pub fn on_drained_end(
        mut self,
        hook: impl Fn(CallbackRef<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.on_end = Some(Box::new(hook));
        self
    }

    /// Reports `alignment` as the request alignment.
    pub fn with_alignment(mut self, alignment: u32) -> Self {
        self.alignment = Some(alignment);
        self
    }

    /// The wrapped driver.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDriver> BlockDriver for Probe<D> {
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn describe(&self) -> String {
        format!("probe({})", self.inner.describe())
    }
    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        self.events.push(format!("open {}", node.name()));
        self.inner.open(node)
    }
    fn close(&self, node: CallbackRef<'_>) {
        self.events.push(format!("close {}", node.name()));
        self.inner.close(node)
    }
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        self.inner.child_permissions(role, users)
    }
    fn drained_begin(&self, node: CallbackRef<'_>) {
        self.events.push(format!("begin {}", node.name()));
        if let Some(hook) = &self.on_begin {
            hook(node);
        }
        self.inner.drained_begin(node)
    }
    fn drained_end(&self, node: CallbackRef<'_>) {
        self.events.push(format!("end {}", node.name()));
        if let Some(hook) = &self.on_end {
            hook(node);
        }
        self.inner.drained_end(node)
    }
    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        self.alignment
            .unwrap_or_else(|| self.inner.request_alignment(node))
    }
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        self.inner.length(node)
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.inner.read(node, offset, buf)
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.inner.write(node, offset, buf)
    }
    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.inner.write_zeroes(node, offset, len)
    }
    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.inner.discard(node, offset, len)
    }
    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        self.inner.flush(node)
    }
    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        self.inner.block_status(node, offset, len)
    }
}

/// A minimal overlay: every request goes to the `Backing` child, and it
/// takes on that child exactly what its own users take (so it can be
/// appended above a written node with [`blockgraph::GraphWriter::append_overlay`]).
/// Counts the reads and writes it passes down. A [`Filter`] on its
/// `Backing` child.
#[derive(Default)]
pub struct Overlay {
    pub requests: AtomicU64,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Filter for Overlay {
    const CHILD: ChildRole = ChildRole::Backing;

    fn format_name(&self) -> &'static str {
        "overlay"
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        forward::read(node, Self::CHILD, offset, buf)
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        forward::write(node, Self::CHILD, offset, buf)
    }
}

/// A driver whose requests wait at a gate until the test opens it: a
/// request that is provably in flight, without timing assumptions.
pub struct Gate {
    size: u64,
    entered: Mutex<mpsc::Sender<()>>,
    open: Arc<tokio::sync::Semaphore>,
    pub requests: AtomicU64,
}

/// The test's side of a [`Gate`].
pub struct GateControl {
    pub entered: mpsc::Receiver<()>,
    open: Arc<tokio::sync::Semaphore>,
}

impl Gate {
    pub fn new(size: u64) -> (Gate, GateControl) {
        let (tx, rx) = mpsc::channel();
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        (
            Gate {
                size,
                entered: Mutex::new(tx),
                open: open.clone(),
                requests: AtomicU64::new(0),
            },
            GateControl { entered: rx, open },
        )
    }

    async fn pass(&self) -> Result<()> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let _ = self.entered.lock().unwrap().send(());
        let permit = self
            .open
            .acquire()
            .await
            .map_err(|_| Error::InvalidArgument("gate closed".into()))?;
        permit.forget();
        Ok(())
    }
}

impl GateControl {
    /// Lets `n` waiting (or future) requests through.
    pub fn release(&self, n: usize) {
        self.open.add_permits(n);
    }
}

/// Closing the gate on drop fails every waiting request, so a test that
/// panics while a request waits at the gate can still shut its I/O thread
/// down instead of hanging in clean-up.
impl Drop for GateControl {
    fn drop(&mut self) {
        self.open.close();
    }
}

impl BlockDriver for Gate {
    fn format_name(&self) -> &'static str {
        "gate"
    }
    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.size) })
    }
    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.pass().await?;
            buf.fill(0);
            Ok(())
        })
    }
    fn write<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        _buf: &'a [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move { self.pass().await })
    }
}

/// A shared flag, for "has X happened yet" checks across threads.
#[derive(Default, Clone)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A shared counter.
#[derive(Default, Clone)]
pub struct Counter(Arc<AtomicU32>);

impl Counter {
    pub fn incr(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// Graph checks
// ---------------------------------------------------------------------------

/// Checks that the graph's edges are symmetric and complete: every child
/// edge is recorded in the child's parents and vice versa, every backend's
/// root lists it as a parent and every backend parent link names a backend
/// rooted there, every node reached by an edge is in the node list and in
/// the graph, names are unique, no parent has two children in one role, and
/// there is no cycle. Returns every problem found.
pub fn graph_problems<P: OutsideRequest>(graph: GraphView<'_, P>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    for node in graph.nodes() {
        if !names.insert(node.name()) {
            problems.push(format!("node name '{}' appears twice", node.name()));
        }
        if !node.is_in_graph() {
            problems.push(format!("listed node '{}' is not in the graph", node.name()));
        }
    }
    let backends: HashMap<&str, Option<&str>> = graph
        .backends()
        .map(|b| (b.name(), b.root().map(|r| r.name())))
        .collect();

    for node in graph.nodes() {
        let n = node.name();
        let mut roles = HashSet::new();
        for edge in node.children() {
            let c = edge.node.name();
            if !roles.insert(edge.role) {
                problems.push(format!("'{n}' has two {} children", edge.role));
            }
            if !names.contains(c) || !edge.node.is_in_graph() {
                problems.push(format!(
                    "'{n}' has {} child '{c}' that is not in the graph",
                    edge.role
                ));
            }
            let back = edge
                .node
                .parents()
                .filter(|p| matches!(p, ParentRef::Node { node: p, role } if p.name() == n && *role == edge.role))
                .count();
            if back != 1 {
                problems.push(format!(
                    "'{n}' -{}-> '{c}' is recorded {back} times in '{c}''s parents",
                    edge.role
                ));
            }
        }
        for parent in node.parents() {
            match parent {
                ParentRef::Node { node: p, role } => {
                    let pn = p.name();
                    if !names.contains(pn) || !p.is_in_graph() {
                        problems.push(format!("'{n}' has parent '{pn}' that is not in the graph"));
                    }
                    let fwd = p
                        .children()
                        .filter(|e| e.role == role && e.node.name() == n)
                        .count();
                    if fwd != 1 {
                        problems.push(format!(
                            "'{n}' lists parent '{pn}' as {role}, but '{pn}' has that edge {fwd} times"
                        ));
                    }
                }
                ParentRef::Backend { name } => {
                    if backends.get(name) != Some(&Some(n)) {
                        problems.push(format!(
                            "'{n}' lists backend '{name}' as a parent, but its root is {:?}",
                            backends.get(name)
                        ));
                    }
                }
            }
        }
    }
    for backend in graph.backends() {
        if let Some(root) = backend.root() {
            let links = root
                .parents()
                .filter(|p| matches!(p, ParentRef::Backend { name } if *name == backend.name()))
                .count();
            if links != 1 {
                problems.push(format!(
                    "backend '{}' has root '{}', which lists it {links} times",
                    backend.name(),
                    root.name()
                ));
            }
            if !names.contains(root.name()) {
                problems.push(format!(
                    "backend '{}' has root '{}' that is not in the graph",
                    backend.name(),
                    root.name()
                ));
            }
        }
    }
    // Cycle check: depth-first search with colours.
    fn visit<'a, P: OutsideRequest>(
        node: blockgraph::NodeRef<'a, P>,
        state: &mut HashMap<&'a str, u8>,
        problems: &mut Vec<String>,
    ) {
        match state.get(node.name()) {
            Some(1) => {
                problems.push(format!("cycle through '{}'", node.name()));
                return;
            }
            Some(_) => return,
            None => {}
        }
        state.insert(node.name(), 1);
        for edge in node.children() {
            visit(edge.node, state, problems);
        }
        state.insert(node.name(), 2);
    }
    let mut state = HashMap::new();
    for node in graph.nodes() {
        visit(node, &mut state, &mut problems);
    }
    problems
}

/// Panics with every problem [`graph_problems`] finds.
pub fn assert_consistent<P: OutsideRequest>(graph: GraphView<'_, P>) {
    let problems = graph_problems(graph);
    assert!(
        problems.is_empty(),
        "graph inconsistent:\n  {}\n{}",
        problems.join("\n  "),
        graph.to_dot()
    );
}

/// Everything observable about the graph's structure, as text: nodes in
/// order with drivers, drain state, children (role, permissions), parents,
/// combined parent permissions; backends with roots and permissions; the
/// mutation count; and the DOT dump. Two equal snapshots mean an unchanged
/// graph.
pub fn snapshot(graph: GraphView<'_, blockgraph::GlobalState>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for node in graph.nodes() {
        let p = node.parent_permissions();
        let _ = writeln!(
            s,
            "node {} driver={} drained={} drain_count={} users take {} share {}",
            node.name(),
            node.driver().describe(),
            node.is_drained(),
            node.drain_count(),
            p.take,
            p.share
        );
        for c in node.children() {
            let _ = writeln!(
                s,
                "  child {} -> {} take {} share {}",
                c.role,
                c.node.name(),
                c.perms.take,
                c.perms.share
            );
        }
        for parent in node.parents() {
            match parent {
                ParentRef::Node { node, role } => {
                    let _ = writeln!(s, "  parent node {} as {role}", node.name());
                }
                ParentRef::Backend { name } => {
                    let _ = writeln!(s, "  parent backend {name}");
                }
            }
        }
    }
    for b in graph.backends() {
        let _ = writeln!(
            s,
            "backend {} root={:?} take {} share {}",
            b.name(),
            b.root().map(|r| r.name()),
            b.permissions().take,
            b.permissions().share
        );
    }
    let _ = writeln!(s, "mutations {}", graph.mutation_count());
    s.push_str(&graph.to_dot());
    s
}

/// The graph's structure as text, under any proof: nodes in order with
/// drivers, children with roles and permissions, parents, backends with
/// roots. Only graph mutations change it (drain state is left out: drains
/// begin and end without a write section).
pub fn structure<P: OutsideRequest>(graph: GraphView<'_, P>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for node in graph.nodes() {
        let _ = writeln!(s, "node {} {}", node.name(), node.driver_name());
        for c in node.children() {
            let _ = writeln!(
                s,
                "  child {} -> {} take {} share {}",
                c.role,
                c.node.name(),
                c.perms.take,
                c.perms.share
            );
        }
        let _ = writeln!(s, "  parents {:?}", parent_names(node));
    }
    for b in graph.backends() {
        let _ = writeln!(
            s,
            "backend {} root={:?}",
            b.name(),
            b.root().map(|r| r.name())
        );
    }
    s
}

/// Names of `node`'s parents, in order (`backend:<name>` for backends).
pub fn parent_names<P: OutsideRequest>(node: blockgraph::NodeRef<'_, P>) -> Vec<String> {
    node.parents()
        .map(|p| match p {
            ParentRef::Node { node, role } => format!("{}:{role}", node.name()),
            ParentRef::Backend { name } => format!("backend:{name}"),
        })
        .collect()
}

/// Names of `node`'s children with roles, in order.
pub fn child_names<P: OutsideRequest>(node: blockgraph::NodeRef<'_, P>) -> Vec<String> {
    node.children()
        .map(|c| format!("{}:{}", c.role, c.node.name()))
        .collect()
}
