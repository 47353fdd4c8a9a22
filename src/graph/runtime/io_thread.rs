//! [`IoThread`], a thread that runs requests (QEMU's IOThread).

use std::future::Future;
use std::pin::Pin;
use std::thread::{self, JoinHandle};

use tokio::sync::{mpsc, oneshot};

use super::task::{run_and_send, TaskHandle};
use crate::graph::runtime::{IoContext, IoTask};
use crate::thread::{
    current_task, set_local_set, set_thread_role, stop_local_set, thread_role, ThreadRole,
};
use crate::types::Result;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce(IoTask) -> LocalFuture + Send>;

/// A thread with its own single-threaded executor and its own
/// [`IoContext`] (one reader counter of the graph lock).
///
/// Create one with [`MainLoop::new_io_thread`](crate::MainLoop::new_io_thread);
/// remove it by dropping it or calling [`IoThread::shutdown`], at any time,
/// also while the main loop drains or writes: where waiting for the thread
/// could wait for that drain or write section, removing it does not wait
/// (see [`IoThread::shutdown`]).
///
/// # Examples
///
/// ```
/// use blockgraph::MainLoop;
///
/// let main = MainLoop::new()?;
/// let io = main.new_io_thread("io0")?;
/// let answer = io.spawn(|_cx| async { 6 * 7 }).join();
/// assert_eq!(answer, 42);
/// io.shutdown();
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
pub struct IoThread {
    context: IoContext,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    pub(crate) fn start(name: &str, context: IoContext) -> Result<IoThread> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_time();
        // The file driver's io_uring path registers each thread's ring with
        // this reactor (`drivers::file`, DESIGN §file I/O).
        #[cfg(feature = "io-uring")]
        builder.enable_io();
        // `spawn_blocking` from one of our tasks runs on the runtime's
        // blocking pool while the task (which may hold the read lock) waits
        // for it: mark those threads so that blocking main-loop calls refuse
        // to run there. (tokio built for loom models has no such hook; the
        // models never run an I/O thread.)
        #[cfg(not(loom))]
        builder.on_thread_start(|| set_thread_role(ThreadRole::IoBlocking));
        let runtime = builder.build()?;
        let ctx = context.clone();
        let thread = thread::Builder::new()
            .name(format!("blockgraph-io-{name}"))
            .stack_size(super::THREAD_STACK_SIZE)
            .spawn(move || {
                set_thread_role(ThreadRole::Io);
                let local = std::rc::Rc::new(tokio::task::LocalSet::new());
                // Where the file driver's ring spawns its reaper, beside
                // the requests (`drivers::file::uring`).
                set_local_set(std::rc::Rc::downgrade(&local));
                local.block_on(&runtime, async {
                    while let Some(job) = rx.recv().await {
                        tokio::task::spawn_local(ctx.new_task(job));
                    }
                });
                // Let the tasks already running finish: removing a thread
                // never cancels a request half way.
                // Tasks that wait for more work (the file ring's idle
                // reaper) end now. (The registration ends here too: the set
                // is ours alone again.)
                stop_local_set();
                let local = std::rc::Rc::into_inner(local).expect("only the thread holds its set");
                runtime.block_on(local);
            })?;
        Ok(IoThread {
            context,
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Spawns a task on this thread. `f` receives the task's own [`IoTask`]
    /// (which works only inside this task: rule 17); the future it returns
    /// may hold `!Send` values. `f` itself runs on this thread, as part of
    /// the task: a panic in it is resumed by the handle like one in the
    /// future.
    ///
    /// # Panics
    ///
    /// Never; if the thread is gone the handle reports the task cancelled.
    pub fn spawn<F, Fut, T>(&self, f: F) -> TaskHandle<T>
    where
        F: FnOnce(IoTask) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |cx| Box::pin(run_and_send(async move { f(cx).await }, tx)));
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
        TaskHandle { rx }
    }

    /// A handle that spawns tasks on this thread and may be cloned and
    /// sent anywhere (into a main-loop closure, to a block job), without
    /// keeping the thread alive: once the `IoThread` is gone, tasks spawned
    /// through it are reported cancelled.
    pub fn handle(&self) -> IoThreadHandle {
        IoThreadHandle {
            context: self.context.clone(),
            jobs: self.jobs.as_ref().map(mpsc::UnboundedSender::downgrade),
        }
    }

    /// This thread's context.
    pub fn context(&self) -> &IoContext {
        &self.context
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        self.context.name()
    }

    /// Stops taking tasks; the tasks already spawned run to completion (a
    /// request is never cancelled half way) and then the thread exits. Same
    /// as dropping it.
    ///
    /// From a plain thread this waits for the thread to exit. Anywhere the
    /// wait could depend on the writer it returns at once instead and the
    /// thread finishes on its own: on the main-loop thread (inside a drain
    /// or write section a task of this thread may be queued for the read
    /// lock, or at a drained node, until the section ends), on an I/O thread
    /// or its blocking pool, inside an I/O task (one of which may hold the
    /// read guard that the writer waits for), and on this thread itself.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let may_wait = thread.thread().id() != thread::current().id()
                && thread_role() == ThreadRole::Other
                && current_task() == 0;
            if may_wait {
                let _ = thread.join();
            }
            // Otherwise dropping the handle detaches the thread: it runs its
            // remaining tasks and exits when they are done.
        }
    }
}

/// Spawns tasks on an [`IoThread`] from anywhere ([`IoThread::handle`]).
/// Cheap to clone; does not keep the thread alive.
#[derive(Clone)]
pub struct IoThreadHandle {
    context: IoContext,
    jobs: Option<mpsc::WeakUnboundedSender<Job>>,
}

impl IoThreadHandle {
    /// Spawns a task on the thread, as [`IoThread::spawn`] does. If the
    /// thread is gone, the handle reports the task cancelled.
    pub fn spawn<F, Fut, T>(&self, f: F) -> TaskHandle<T>
    where
        F: FnOnce(IoTask) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |cx| Box::pin(run_and_send(async move { f(cx).await }, tx)));
        if let Some(jobs) = self.jobs.as_ref().and_then(|w| w.upgrade()) {
            let _ = jobs.send(job);
        }
        TaskHandle { rx }
    }

    /// The thread's context.
    pub fn context(&self) -> &IoContext {
        &self.context
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        self.context.name()
    }
}

impl std::fmt::Debug for IoThreadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThreadHandle")
            .field("name", &self.context.name())
            .finish()
    }
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.context.name())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::thread::spawn_on_local_set;
    use crate::MainLoop;

    /// The file driver's ring spawns its reaper on the thread's own set
    /// (`drivers::file::uring`), also from a plain tokio task.
    #[test]
    fn io_threads_register_the_local_set_that_runs_their_tasks() {
        let main = MainLoop::new().unwrap();
        let io = main.new_io_thread("set").unwrap();
        let (from_task, from_plain) = io
            .spawn(|_cx| async {
                let spawned = |tag: u8| {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let ok = spawn_on_local_set(async move {
                        let _ = tx.send(tag);
                    })
                    .is_ok();
                    (ok, rx)
                };
                let (ok, rx) = spawned(1);
                assert!(ok);
                let from_task = rx.await.unwrap();
                let plain = tokio::spawn(async move {
                    let (ok, rx) = spawned(2);
                    assert!(ok);
                    rx.await.unwrap()
                });
                (from_task, plain.await.unwrap())
            })
            .join();
        assert_eq!((from_task, from_plain), (1, 2));
        io.shutdown();
        main.shutdown();
    }
}
