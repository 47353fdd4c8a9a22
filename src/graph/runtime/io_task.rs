//! I/O contexts, the per-task [`IoTask`] handle and the [`ReadGuard`].

use std::future::Future;
#[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
use std::panic::Location;
use std::sync::Arc;

use crate::graph::proof::Bql;
use crate::graph::proof::{ReadFuture, ReadGuard};
use crate::graph::runtime::MainLoop;
use crate::graph::GraphInner;
use crate::sync::primitives::Arc as ShardArc;
use crate::sync::ReaderShard;
use crate::thread::{InTask, TaskId};
use crate::types::Result;

/// An I/O context: one reader counter of the graph lock (QEMU's
/// `AioContext`, as far as the lock is concerned).
///
/// An [`IoThread`](crate::IoThread) owns one; embedders that run their own
/// runtimes can make more with [`MainLoop::new_io_context`] and start tasks
/// on them with [`IoContext::spawn_on`]. Cheap to clone.
///
/// Tasks get their [`IoTask`] only from a spawner (`IoThread::spawn`,
/// [`IoContext::spawn_on`], [`IoContext::task`]), one per task, and an
/// `IoTask` works only inside the task it was made for: a task cannot mint or
/// receive a second handle and take a second, nested read lock with it.
/// The context stops counting for the writer once the last clone and the
/// last [`IoTask`] made from it are gone; readers still inside keep it
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
    /// counted in this context. `f` receives the task's own [`IoTask`].
    ///
    /// The future must be `Send` (it may migrate between worker threads; its
    /// read guards release the counter they took wherever they are dropped).
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::NullDriver, MainLoop};
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
        F: FnOnce(IoTask) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        runtime.spawn(self.new_task(f))
    }

    /// Makes a task counted in this context for an executor of your own (a
    /// `futures` executor, another async runtime, a plain
    /// `futures::executor::block_on` on a thread without tokio): `f`
    /// receives the task's own [`IoTask`] and the task is the future returned
    /// here. Poll it, spawn it or block on it like any future; it is `Send`
    /// when `f`'s future is.
    ///
    /// `f` is called at once; the `IoTask` it gets works only inside this task
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
    /// use blockgraph::{drivers::NullDriver, MainLoop};
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
        F: FnOnce(IoTask) -> Fut,
        Fut: Future,
    {
        self.new_task(f)
    }

    /// A new task of this context: its future, with `f` called (as if inside
    /// the task) on the task's one [`IoTask`].
    pub(crate) fn new_task<F, Fut>(&self, f: F) -> InTask<Fut>
    where
        F: FnOnce(IoTask) -> Fut,
    {
        InTask::new(|task| f(self.task_handle(task)))
    }

    /// The handle of task `task`. Crate-private: handing out handles freely
    /// would let one task hold two and nest read locks.
    fn task_handle(&self, task: TaskId) -> IoTask {
        IoTask {
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
/// [`IoTask::read`] borrows it mutably for as long as the guard lives, so a
/// task cannot take the read lock twice (nested read locks deadlock behind a
/// queued writer) and cannot call back into the main loop
/// ([`IoTask::run_on_main_loop`]) while it holds the lock. `Send`: a task may
/// migrate between threads of a multi-thread runtime; the guard releases the
/// counter it took, wherever it is dropped.
///
/// An `IoTask` belongs to the task it was made for (rule 17). Sending it
/// elsewhere compiles (it must be `Send` to migrate with its task), but
/// [`IoTask::read`], [`IoTask::try_read`] and [`IoTask::run_on_main_loop`] panic
/// anywhere but inside that task: otherwise a task holding a guard could
/// wait for a second read lock, or for a drain, through a smuggled handle.
pub struct IoTask {
    pub(crate) shard: ShardArc<ReaderShard>,
    pub(crate) graph: Arc<GraphInner>,
    pub(crate) ctx: Arc<ContextShared>,
    /// The task this handle was made for.
    pub(crate) task: TaskId,
}

static_assertions::assert_impl_all!(IoTask: Send, Sync);

impl IoTask {
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
    /// When the future is polled outside the task this `IoTask` was made for
    /// (rule 17: an `IoTask` never leaves its task).
    ///
    /// In debug builds (or with the `lock-diagnostics` feature) the caller's
    /// location is recorded with the guard, for the report of a writer that
    /// waits too long.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::MemoryDriver, MainLoop};
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
    /// Outside the task this `IoTask` was made for (rule 17).
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
            crate::thread::guard_released(self.task);
            None
        }
    }

    /// Panics unless the calling thread is polling this handle's task.
    ///
    /// One load of a const-initialised thread-local and a compare.
    #[inline(always)]
    fn check_task(&self) {
        if crate::thread::current_task() != self.task {
            outside_task();
        }
    }

    /// [`IoTask::check_task`] and counting a guard for the task, in one look
    /// at the thread-local: the read path's whole cost of rule 17. The
    /// caller uncounts it if it does not get the lock.
    #[inline(always)]
    pub(crate) fn count_guard(&self) {
        if !crate::thread::guard_taken(self.task) {
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
    /// When called, or the future polled, outside the task this `IoTask` was
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

/// An `IoTask` used outside its task: on the main-loop thread (which reads the
/// graph through `GsRef`s; a read guard there would make its own write
/// section or drain wait for itself), on a plain thread, or in another task.
#[cold]
#[inline(never)]
#[track_caller]
fn outside_task() -> ! {
    if crate::thread::thread_role() == crate::thread::ThreadRole::Main {
        panic!(
            "blockgraph: an IoTask was used on the main-loop thread (rule 17: an IoTask never leaves \
             its task); main-loop code reads the graph through GsRef and calls no I/O-task API"
        );
    }
    panic!(
        "blockgraph: an IoTask was used outside the task it was made for (rule 17: an IoTask never \
         leaves its task). A task that could use a second IoTask could take a nested read lock or \
         wait for the main loop while holding a guard; spawn a task per request instead \
         (IoThread::spawn, IoContext::spawn_on, IoContext::task)"
    );
}

impl std::fmt::Debug for IoTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoTask")
            .field("context", &self.ctx.name)
            .finish()
    }
}
