//! [`IoThread`], a thread that runs requests (QEMU's IOThread).

use std::future::Future;
use std::pin::Pin;
use std::thread::{self, JoinHandle};

use tokio::sync::{mpsc, oneshot};

use super::task::{run_and_send, TaskHandle};
use super::{set_thread_role, ThreadRole};
use crate::error::Result;
use crate::proof::{IoContext, IoCx};

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce(IoCx) -> LocalFuture + Send>;

/// A thread with its own single-threaded executor and its own
/// [`IoContext`] (one reader counter of the graph lock).
///
/// Create one with [`MainLoop::new_io_thread`](crate::MainLoop::new_io_thread);
/// remove it by dropping it or calling [`IoThread::shutdown`], at any time,
/// also while the main loop drains or writes.
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let ctx = context.clone();
        let thread = thread::Builder::new()
            .name(format!("blockgraph-io-{name}"))
            .spawn(move || {
                set_thread_role(ThreadRole::Io);
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async {
                    while let Some(job) = rx.recv().await {
                        tokio::task::spawn_local(job(ctx.task_handle()));
                    }
                });
                // Let the tasks already running finish: removing a thread
                // never cancels a request half way.
                runtime.block_on(local);
            })?;
        Ok(IoThread {
            context,
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Spawns a task on this thread. `f` receives the task's own [`IoCx`];
    /// the future it returns may hold `!Send` values.
    ///
    /// # Panics
    ///
    /// Never; if the thread is gone the handle reports the task cancelled.
    pub fn spawn<F, Fut, T>(&self, f: F) -> TaskHandle<T>
    where
        F: FnOnce(IoCx) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |cx| Box::pin(run_and_send(f(cx), tx)));
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
        TaskHandle { rx }
    }

    /// This thread's context.
    pub fn context(&self) -> &IoContext {
        &self.context
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        self.context.name()
    }

    /// Stops taking tasks, waits for the running ones to finish and stops
    /// the thread. Same as dropping it.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.context.name())
            .finish()
    }
}
