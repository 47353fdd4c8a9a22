//! [`TaskHandle`], the result of a task spawned on the main loop or an I/O
//! thread.

use std::any::Any;
use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

pub(crate) type TaskResult<T> = Result<T, Box<dyn Any + Send>>;

/// Waits for a spawned task's result: `.await` it from async code or
/// [`TaskHandle::join`] it from a plain thread. A panic in the task is
/// resumed in the waiter.
#[must_use = "dropping the handle detaches the task; its result is lost"]
pub struct TaskHandle<T> {
    pub(crate) rx: oneshot::Receiver<TaskResult<T>>,
}

impl<T> TaskHandle<T> {
    /// Blocks the calling thread until the task finishes.
    ///
    /// # Panics
    ///
    /// If the task panicked (the panic is resumed here), if its thread shut
    /// down before it finished, if called on the main-loop or an I/O thread
    /// (it would block the thread the task may need), or if called inside an
    /// I/O task that holds a read guard (from `block_in_place` on an
    /// embedder's runtime): the task waited for may need the read lock, which
    /// a queued writer keeps from it until this task's guard is gone (rule
    /// 11 across tasks).
    pub fn join(self) -> T {
        match crate::thread::thread_role() {
            crate::thread::ThreadRole::Main | crate::thread::ThreadRole::Io => panic!(
                "blockgraph: TaskHandle::join would block a main-loop or I/O thread; .await the handle instead"
            ),
            // A blocking-pool thread is there to block.
            crate::thread::ThreadRole::IoBlocking | crate::thread::ThreadRole::Other => {}
        }
        crate::thread::refuse_under_guard("TaskHandle::join");
        unwrap(self.rx.blocking_recv())
    }
}

fn unwrap<T>(r: Result<TaskResult<T>, oneshot::error::RecvError>) -> T {
    match r {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("blockgraph: the task was cancelled because its thread shut down"),
    }
}

impl<T> Future for TaskHandle<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        Pin::new(&mut self.rx).poll(cx).map(unwrap)
    }
}

impl<T> std::fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").finish_non_exhaustive()
    }
}

/// Runs `future`, catching a panic, and sends the outcome.
pub(crate) async fn run_and_send<T, F>(future: F, tx: oneshot::Sender<TaskResult<T>>)
where
    F: Future<Output = T>,
{
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(future).catch_unwind().await;
    let _ = tx.send(outcome);
}
