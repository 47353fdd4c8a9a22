//! I/O contexts, the per-task [`IoCx`] handle and the [`ReadGuard`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::error::Result;
use crate::graph::cell::ReadAccess;
use crate::graph::{GraphInner, GraphView};
use crate::proof::{Bql, IoRef, ReadLocked};
use crate::runtime::MainLoop;
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
/// `IoContext::spawn_on`), one per task: a task cannot mint a second handle
/// and take a second, nested read lock with it.
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
        let shard = graph.lock.new_shard();
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
        runtime.spawn(f(self.task_handle()))
    }

    /// A handle for one task running on this context. Crate-private: handing
    /// out handles freely would let one task hold two and nest read locks.
    pub(crate) fn task_handle(&self) -> IoCx {
        IoCx {
            shard: self.inner.shard.clone(),
            graph: self.inner.graph.clone(),
            ctx: self.inner.clone(),
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
pub struct IoCx {
    shard: ShardArc<ReaderShard>,
    graph: Arc<GraphInner>,
    ctx: Arc<ContextShared>,
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
    pub fn read(&mut self) -> ReadFuture<'_> {
        debug_assert_not_main_loop();
        ReadFuture { cx: Some(self) }
    }

    /// Takes the read lock if no writer is active, without waiting.
    #[inline]
    pub fn try_read(&mut self) -> Option<ReadGuard<'_>> {
        debug_assert_not_main_loop();
        if self.graph.lock.try_read(&self.shard) {
            Some(ReadGuard { cx: self })
        } else {
            None
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
    pub fn run_on_main_loop<F, R>(&mut self, f: F) -> impl Future<Output = Result<R>> + '_
    where
        F: FnOnce(&mut Bql) -> R + Send + 'static,
        R: Send + 'static,
    {
        let reply = self.ctx.main.submit_run(f);
        async move {
            let _exclusive = self;
            reply.await
        }
    }
}

/// The main loop never takes the read lock (it reads the graph through
/// `GsRef`s); a read guard held there would make its own write section or
/// drain wait for itself. An `IoCx` is `Send`, so only a run-time check can
/// catch one moved onto the main-loop thread.
#[inline]
fn debug_assert_not_main_loop() {
    debug_assert!(
        crate::runtime::thread_role() != crate::runtime::ThreadRole::Main,
        "blockgraph: the read lock was taken on the main-loop thread; main-loop code reads the graph through GsRef"
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
}

impl<'cx> Future for ReadFuture<'cx> {
    type Output = ReadGuard<'cx>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, task: &mut Context<'_>) -> Poll<ReadGuard<'cx>> {
        let cx = self.cx.take().expect("ReadFuture polled after completion");
        match cx.graph.lock.poll_read(&cx.shard, task) {
            Poll::Ready(()) => Poll::Ready(ReadGuard { cx }),
            Poll::Pending => {
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
