//! I/O contexts, the per-task [`IoCx`] handle and the [`ReadGuard`].

use std::future::Future;
#[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
use std::panic::Location;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::Result;
use crate::graph::cell::ReadAccess;
use crate::graph::{GraphInner, GraphView};
use crate::proof::{Bql, IoRef, ReadLocked};
use crate::runtime::{InTask, MainLoop, TaskId};
use crate::sync::primitives::Arc as ShardArc;
use crate::sync::ReaderShard;

/// An I/O context: one reader counter of the graph lock (QEMU's
/// `AioContext`, as far as the lock is concerned).
///
/// An [`IoThread`](crate::IoThread) owns one; embedders that run their own
/// runtimes can make more with [`MainLoop::new_io_context`] and start tasks
/// on them with [`IoContext::spawn_on`]. Cheap to clone.
///
/// Tasks get their [`IoCx`] only from a spawner (`IoThread::spawn`,
/// [`IoContext::spawn_on`], [`IoContext::task`]), one per task, and an
/// `IoCx` works only inside the task it was made for: a task cannot mint or
/// receive a second handle and take a second, nested read lock with it.
/// The context stops counting for the writer once the last clone and the
/// last [`IoCx`] made from it are gone; readers still inside keep it
/// counted, so removing a context never loses a reader.
#[derive(Clone)]
pub struct IoContext {
    pub(crate) inner: Arc<ContextShared>,
}

pub(crate) struct ContextShared {
    pub(crate) name: String,
    pub(crate) shard: ShardArc<ReaderShard>,
    pub(crate) graph: Arc<GraphInner>,
    pub(crate) main: MainLoop,
}

impl IoContext {
    pub(crate) fn new(name: String, graph: Arc<GraphInner>, main: MainLoop) -> Self {
        let shard = graph.lock.new_named_shard(&name);
        IoContext {
            inner: Arc::new(ContextShared {
                name,
                shard,
                graph,
                main,
            }),
        }
    }

    /// The context's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Spawns a task on an embedder's tokio runtime (multi-thread or not),
    /// counted in this context. `f` receives the task's own [`IoCx`].
    ///
    /// The future must be `Send` (it may migrate between worker threads; its
    /// read guards release the counter they took wherever they are dropped).
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{MainLoop, drivers::NullDriver};
    ///
    /// let main = MainLoop::new()?;
    /// let disk = main.run(|bql| bql.write(|w| w.add_node("null0", NullDriver::new(4096), &[])))?;
    /// let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build()?;
    /// let ctx = main.new_io_context("embedder");
    /// let task = ctx.spawn_on(runtime.handle(), move |mut cx| async move {
    ///     let guard = cx.read().await;
    ///     disk.io(&guard).length().await
    /// });
    /// assert_eq!(runtime.block_on(task).expect("task panicked")?, 4096);
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn spawn_on<F, Fut, T>(
        &self,
        runtime: &tokio::runtime::Handle,
        f: F,
    ) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce(IoCx) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        runtime.spawn(self.new_task(f))
    }

    /// Makes a task counted in this context for an executor of your own (a
    /// `futures` executor, another async runtime, a plain
    /// `futures::executor::block_on` on a thread without tokio): `f`
    /// receives the task's own [`IoCx`] and the task is the future returned
    /// here. Poll it, spawn it or block on it like any future; it is `Send`
    /// when `f`'s future is.
    ///
    /// `f` is called at once; the `IoCx` it gets works only inside this task
    /// (rule 17): used from anywhere else (sent through a channel to another
    /// task or thread) it panics.
    ///
    /// # Panics
    ///
    /// When polled from inside another I/O task's poll (awaited inline)
    /// while that task holds a read guard: the inner task's read lock would
    /// be a nested read lock of the outer one (rule 11).
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{MainLoop, drivers::NullDriver};
    ///
    /// let main = MainLoop::new()?;
    /// let disk = main.run(|bql| bql.write(|w| w.add_node("null0", NullDriver::new(4096), &[])))?;
    /// let ctx = main.new_io_context("my-executor");
    /// let task = ctx.task(move |mut cx| async move {
    ///     let guard = cx.read().await;
    ///     disk.io(&guard).length().await
    /// });
    /// assert_eq!(futures::executor::block_on(task)?, 4096);
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn task<F, Fut>(&self, f: F) -> impl Future<Output = Fut::Output> + use<F, Fut>
    where
        F: FnOnce(IoCx) -> Fut,
        Fut: Future,
    {
        self.new_task(f)
    }

    /// A new task of this context: its future, with `f` called (as if inside
    /// the task) on the task's one [`IoCx`].
    pub(crate) fn new_task<F, Fut>(&self, f: F) -> InTask<Fut>
    where
        F: FnOnce(IoCx) -> Fut,
    {
        InTask::new(|task| f(self.task_handle(task)))
    }

    /// The handle of task `task`. Crate-private: handing out handles freely
    /// would let one task hold two and nest read locks.
    fn task_handle(&self, task: TaskId) -> IoCx {
        IoCx {
            shard: self.inner.shard.clone(),
            graph: self.inner.graph.clone(),
            ctx: self.inner.clone(),
            task,
        }
    }

    /// Readers currently inside the graph through this context.
    pub fn readers(&self) -> usize {
        self.inner.shard.readers()
    }
}

impl std::fmt::Debug for IoContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoContext")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// One task's handle to its I/O context: where read guards come from.
///
/// [`IoCx::read`] borrows it mutably for as long as the guard lives, so a
/// task cannot take the read lock twice (nested read locks deadlock behind a
/// queued writer) and cannot call back into the main loop
/// ([`IoCx::run_on_main_loop`]) while it holds the lock. `Send`: a task may
/// migrate between threads of a multi-thread runtime; the guard releases the
/// counter it took, wherever it is dropped.
///
/// An `IoCx` belongs to the task it was made for (rule 17). Sending it
/// elsewhere compiles (it must be `Send` to migrate with its task), but
/// [`IoCx::read`], [`IoCx::try_read`] and [`IoCx::run_on_main_loop`] panic
/// anywhere but inside that task: otherwise a task holding a guard could
/// wait for a second read lock, or for a drain, through a smuggled handle.
pub struct IoCx {
    shard: ShardArc<ReaderShard>,
    graph: Arc<GraphInner>,
    ctx: Arc<ContextShared>,
    /// The task this handle was made for.
    task: TaskId,
}

static_assertions::assert_impl_all!(IoCx: Send, Sync);

impl IoCx {
    /// Takes the graph read lock (QEMU's `bdrv_graph_co_rdlock()`).
    ///
    /// Uncontended, this is one increment of the context's own counter and
    /// one load of the writer flag. If a writer is active the task is parked
    /// (never spins, never blocks the thread) and resumes when the writer
    /// leaves.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a pending `ReadFuture` holds no count.
    ///
    /// # Panics
    ///
    /// When the future is polled outside the task this `IoCx` was made for
    /// (rule 17: an `IoCx` never leaves its task).
    ///
    /// In debug builds (or with the `lock-diagnostics` feature) the caller's
    /// location is recorded with the guard, for the report of a writer that
    /// waits too long.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{MainLoop, drivers::MemoryDriver};
    ///
    /// let main = MainLoop::new()?;
    /// let disk = main.run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))?;
    /// let io = main.new_io_thread("io0")?;
    /// let len = io.spawn(move |mut cx| async move {
    ///     let guard = cx.read().await;
    ///     disk.io(&guard).length().await
    /// }).join()?;
    /// assert_eq!(len, 4096);
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    #[inline]
    #[cfg_attr(any(debug_assertions, feature = "lock-diagnostics"), track_caller)]
    pub fn read(&mut self) -> ReadFuture<'_> {
        ReadFuture {
            cx: Some(self),
            #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
            at: Location::caller(),
        }
    }

    /// Takes the read lock if no writer is active, without waiting.
    ///
    /// # Panics
    ///
    /// Outside the task this `IoCx` was made for (rule 17).
    #[inline]
    #[cfg_attr(any(debug_assertions, feature = "lock-diagnostics"), track_caller)]
    pub fn try_read(&mut self) -> Option<ReadGuard<'_>> {
        self.count_guard();
        if self.graph.lock.try_read(&self.shard) {
            Some(ReadGuard::new(
                self,
                #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
                Location::caller(),
            ))
        } else {
            crate::runtime::guard_released(self.task);
            None
        }
    }

    /// Panics unless the calling thread is polling this handle's task.
    ///
    /// One load of a const-initialised thread-local and a compare.
    #[inline(always)]
    fn check_task(&self) {
        if crate::runtime::current_task() != self.task {
            outside_task();
        }
    }

    /// [`IoCx::check_task`] and counting a guard for the task, in one look
    /// at the thread-local: the read path's whole cost of rule 17. The
    /// caller uncounts it if it does not get the lock.
    #[inline(always)]
    fn count_guard(&self) {
        if !crate::runtime::guard_taken(self.task) {
            outside_task();
        }
    }

    /// The context this handle belongs to.
    pub fn context(&self) -> IoContext {
        IoContext {
            inner: self.ctx.clone(),
        }
    }

    /// The graph this handle read-locks (for identity checks only).
    #[inline]
    pub(crate) fn graph_ptr(&self) -> *const GraphInner {
        Arc::as_ptr(&self.graph)
    }

    /// Runs `f` on the main loop with the [`Bql`] and returns its result.
    ///
    /// Needs `&mut self`, so the task cannot hold a read guard meanwhile: a
    /// drain or a write section started by `f` can never wait for a read lock
    /// that this very task holds (the QEMU 10.0 deadlock).
    ///
    /// # Panics
    ///
    /// When called, or the future polled, outside the task this `IoCx` was
    /// made for (rule 17): another task, which may hold a guard, must not
    /// wait for main-loop work through a borrowed handle.
    pub fn run_on_main_loop<F, R>(&mut self, f: F) -> impl Future<Output = Result<R>> + '_
    where
        F: FnOnce(&mut Bql) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.check_task();
        let reply = self.ctx.main.submit_run(f);
        async move {
            let exclusive = self;
            let mut reply = std::pin::pin!(reply);
            std::future::poll_fn(|task| {
                exclusive.check_task();
                reply.as_mut().poll(task)
            })
            .await
        }
    }
}

/// An `IoCx` used outside its task: on the main-loop thread (which reads the
/// graph through `GsRef`s; a read guard there would make its own write
/// section or drain wait for itself), on a plain thread, or in another task.
#[cold]
#[inline(never)]
#[track_caller]
fn outside_task() -> ! {
    if crate::runtime::thread_role() == crate::runtime::ThreadRole::Main {
        panic!(
            "blockgraph: an IoCx was used on the main-loop thread (rule 17: an IoCx never leaves \
             its task); main-loop code reads the graph through GsRef and calls no I/O-task API"
        );
    }
    panic!(
        "blockgraph: an IoCx was used outside the task it was made for (rule 17: an IoCx never \
         leaves its task). A task that could use a second IoCx could take a nested read lock or \
         wait for the main loop while holding a guard; spawn a task per request instead \
         (IoThread::spawn, IoContext::spawn_on, IoContext::task)"
    );
}

impl std::fmt::Debug for IoCx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCx")
            .field("context", &self.ctx.name)
            .finish()
    }
}

/// The future returned by [`IoCx::read`].
#[must_use = "futures do nothing unless awaited"]
pub struct ReadFuture<'cx> {
    cx: Option<&'cx mut IoCx>,
    /// Where `read()` was called, recorded with the guard.
    #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
    at: &'static Location<'static>,
}

impl<'cx> Future for ReadFuture<'cx> {
    type Output = ReadGuard<'cx>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, task: &mut Context<'_>) -> Poll<ReadGuard<'cx>> {
        let cx = self.cx.take().expect("ReadFuture polled after completion");
        cx.count_guard();
        match cx.graph.lock.poll_read(&cx.shard, task) {
            Poll::Ready(()) => Poll::Ready(ReadGuard::new(
                cx,
                #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
                self.at,
            )),
            Poll::Pending => {
                crate::runtime::guard_released(cx.task);
                self.cx = Some(cx);
                Poll::Pending
            }
        }
    }
}

/// Proof that this task holds the graph read lock (QEMU's
/// `GRAPH_RDLOCK_GUARD()`).
///
/// [`IoRef`]s borrow it, so none outlives the lock. Released on drop, on
/// whichever thread that happens. One pointer wide. Leaking it with
/// `mem::forget` is memory-safe: every `IoRef` borrowed from it has ended
/// before it can be moved into `forget`. The leaked count keeps writers out
/// for as long as its context lives; once the context and every `IoCx` of it
/// are gone, the writer stops counting that context.
#[must_use = "the read lock is released as soon as the guard is dropped"]
pub struct ReadGuard<'cx> {
    cx: &'cx mut IoCx,
}

static_assertions::assert_impl_all!(ReadGuard<'static>: Send, Sync);
static_assertions::assert_eq_size!(ReadGuard<'static>, usize);

impl<'cx> ReadGuard<'cx> {
    /// Wraps the read lock just taken through `cx` (and counted for its
    /// task by [`IoCx::count_guard`]); records where it was taken, in
    /// diagnostic builds.
    #[inline(always)]
    fn new(
        cx: &'cx mut IoCx,
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))] at: &'static Location<'static>,
    ) -> Self {
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
        cx.shard.note_guard_taken(cx.task, at);
        ReadGuard { cx }
    }

    /// The graph, for reading.
    pub fn graph(&self) -> GraphView<'_, ReadLocked> {
        // SAFETY: the token is this guard's graph's.
        unsafe { GraphView::new(&self.cx.graph, self.access()) }
    }

    /// A read token for the guard's graph, valid while `self` is borrowed.
    #[inline]
    pub(crate) fn access(&self) -> ReadAccess<'_> {
        // SAFETY: the guard holds its graph's read lock for as long as
        // `&self` lives: the writer waits for it to leave before it mints
        // the write token, so no `&mut` into the graph exists meanwhile.
        unsafe { ReadAccess::assume() }
    }

    /// The graph this guard read-locks.
    #[inline]
    pub(crate) fn graph_inner(&self) -> &GraphInner {
        &self.cx.graph
    }

    /// Shortcut for `self.graph().node(name)`.
    pub fn node(&self, name: &str) -> Option<IoRef<'_>> {
        self.graph().node(name)
    }
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        crate::runtime::guard_released(self.cx.task);
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
        self.cx.shard.note_guard_released(self.cx.task);
        self.cx.graph.lock.read_unlock(&self.cx.shard);
    }
}

impl std::fmt::Debug for ReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("context", &self.cx.ctx.name)
            .finish()
    }
}
