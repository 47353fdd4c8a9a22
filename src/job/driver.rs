//! What a kind of job implements ([`JobDriver`], QEMU's `JobDriver`), the
//! context its steps get ([`JobCx`]), and the job's task, which runs the
//! steps in QEMU's order.
//!
//! Every step runs in the job's I/O task, which holds no read guard
//! between requests. I/O takes the read lock per request
//! ([`IoTask::read`] or a [`BlockBackend`](crate::BlockBackend) call);
//! graph changes go to the main loop through [`JobCx::on_main_loop`],
//! which needs the task's `&mut IoTask` and so cannot be called while the
//! task holds a guard; there they need a write section and `Drained`
//! proofs like any other graph change.

use std::future::Future;
use std::sync::atomic::Ordering;

use super::events::{ErrorAction, IoOperation, JobEvent};
use super::handle::Job;
use super::status::{JobStatus, JobType};
use crate::graph::proof::Bql;
use crate::graph::runtime::{IoTask, IoThreadHandle};
use crate::types::{Error, Result};

/// A kind of job (QEMU's `JobDriver`): its work and its completion steps.
///
/// The job's task calls them in QEMU's order:
///
/// 1. [`run`](JobDriver::run) — the work (copying). Ends with the job
///    `pending` on success, `aborting` on failure or cancellation.
/// 2. On success, once finalized (at once with auto-finalize, else at
///    [`Job::finalize`]): [`prepare`](JobDriver::prepare) — the graph
///    changes that make the work take effect, which may still fail.
/// 3. [`commit`](JobDriver::commit) if everything succeeded, else
///    [`abort`](JobDriver::abort).
/// 4. [`clean`](JobDriver::clean), always.
///
/// Every step runs in the job's I/O task and receives its [`JobCx`]. Write
/// them as `async fn`s.
pub trait JobDriver: Send + 'static {
    /// The job's kind.
    fn job_type(&self) -> JobType;

    /// The work (QEMU's `.run`). Call [`JobRunner::pause_point`] between
    /// pieces of work (the copy engine does), so that pausing,
    /// cancelling and drains take effect.
    fn run(&mut self, cx: &mut JobCx<'_>) -> impl Future<Output = Result<()>>;

    /// Makes the work take effect (QEMU's `.prepare`): graph changes, on
    /// the main loop through [`JobCx::on_main_loop`], and any I/O they
    /// need. Default: nothing.
    fn prepare(&mut self, cx: &mut JobCx<'_>) -> impl Future<Output = Result<()>> {
        let _ = cx;
        async { Ok(()) }
    }

    /// Everything succeeded (QEMU's `.commit`). Default: nothing.
    fn commit(&mut self, cx: &mut JobCx<'_>) -> impl Future<Output = ()> {
        let _ = cx;
        async {}
    }

    /// The job failed or was cancelled (QEMU's `.abort`): undo. Default:
    /// nothing.
    fn abort(&mut self, cx: &mut JobCx<'_>) -> impl Future<Output = ()> {
        let _ = cx;
        async {}
    }

    /// Either way, at the end (QEMU's `.clean`): release what the job set
    /// up. Default: nothing.
    fn clean(&mut self, cx: &mut JobCx<'_>) -> impl Future<Output = ()> {
        let _ = cx;
        async {}
    }
}

/// What a job's steps work with: the job's I/O task and its own side of
/// the job ([`JobRunner`]).
pub struct JobCx<'t> {
    io: &'t mut IoTask,
    runner: JobRunner,
}

impl<'t> JobCx<'t> {
    /// The job's I/O task: take read guards with it, or pass it to
    /// [`BlockBackend`](crate::BlockBackend) calls.
    pub fn io(&mut self) -> &mut IoTask {
        self.io
    }

    /// The job's own side: pause points, progress, the rate limit, the
    /// error policy. Clone it for worker tasks.
    pub fn runner(&self) -> &JobRunner {
        &self.runner
    }

    /// The job.
    pub fn job(&self) -> &Job {
        &self.runner.job
    }

    /// [`JobRunner::pause_point`] for the job's own task.
    pub async fn pause_point(&mut self) -> Result<()> {
        self.runner.pause_point(self.io).await
    }

    /// Runs `f` on the main loop with the [`Bql`] (graph changes: drains
    /// and write sections) and returns its result. Needs the task's
    /// `&mut IoTask`, so it cannot be called while the task holds a read
    /// guard ([`IoTask::run_on_main_loop`]).
    pub async fn on_main_loop<F, R>(&mut self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Bql) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.io.run_on_main_loop(f).await
    }
}

/// The job's own side, for its task and its worker tasks: pause points,
/// progress, the rate limit, the error policy, readiness. Only a
/// [`JobCx`] hands one out, so only the job's own code moves its status.
#[derive(Clone)]
pub struct JobRunner {
    job: Job,
}

impl JobRunner {
    /// The job.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// A pause point (QEMU's `job_pause_point`): returns at once unless the
    /// job is paused (by the user, a `stop` error policy or a drain of a
    /// node it uses), else waits until it is resumed. Fails with
    /// [`Error::JobCancelled`] once the job is cancelled: stop working then.
    ///
    /// It takes the calling task's `&mut IoTask` and does nothing with it:
    /// that borrow is the proof that the task holds no read guard while it
    /// waits (a paused job holding the lock would keep out the write
    /// section of whoever drained it, who waits for the job's guard while
    /// the job waits for the drain to end).
    pub async fn pause_point(&self, io: &mut IoTask) -> Result<()> {
        let _ = io;
        self.job.shared.pause_point().await
    }

    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.job.shared.lock().cancelled
    }

    /// Whether the user asked a ready job to complete.
    pub fn completion_requested(&self) -> bool {
        self.job.shared.lock().complete_requested
    }

    /// Whether the user cancelled the job without force while it was
    /// ready: it completes, without the graph change that `complete` would
    /// make (QEMU's cancel of a ready mirror). [`completion_requested`]
    /// is true then too.
    ///
    /// [`completion_requested`]: Self::completion_requested
    pub fn cancelled_after_ready(&self) -> bool {
        self.job.shared.lock().cancel_after_ready
    }

    /// Waits until the rate limit lets `bytes` more go (QEMU's
    /// `block_job_ratelimit_sleep`), then is a pause point (QEMU's
    /// `job_sleep_ns` is one: a job paused or drained while it slept does
    /// not go on with the request it slept for). Fails with
    /// [`Error::JobCancelled`] if the job is cancelled meanwhile. Takes
    /// `&mut IoTask` for the same reason as
    /// [`pause_point`](Self::pause_point): no read guard is held across the
    /// sleep.
    pub async fn throttle(&self, io: &mut IoTask, bytes: u64) -> Result<()> {
        self.job.shared.throttle(bytes).await?;
        self.pause_point(io).await
    }

    /// Adds `bytes` to the work done.
    pub fn add_progress(&self, bytes: u64) {
        self.job.shared.current.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Sets the work still to do: the total becomes done + `remaining`
    /// (QEMU's `job_progress_set_remaining`).
    pub fn set_remaining(&self, remaining: u64) {
        let s = &self.job.shared;
        let current = s.current.load(Ordering::Relaxed);
        s.total
            .store(current.saturating_add(remaining), Ordering::Relaxed);
    }

    /// Applies the job's error policy to a failed request: emits
    /// [`JobEvent::Error`] and, for [`ErrorAction::Stop`], pauses the job
    /// (retry after the next pause point).
    pub fn error_action(&self, error: &Error, operation: IoOperation) -> ErrorAction {
        self.job.shared.error_action(error, operation)
    }

    /// The job is in sync and waits for `complete` (QEMU's
    /// `job_transition_to_ready`): `running` → `ready`, with
    /// [`JobEvent::Ready`].
    pub fn set_ready(&self) {
        let s = &self.job.shared;
        let mut st = s.lock();
        if st.status == JobStatus::Running {
            s.transition(&mut st, JobStatus::Ready);
            s.emit(JobEvent::Ready);
            s.sync_pause(&mut st);
        }
    }

    /// Marks the calling worker busy for [`JobInfo::busy`](super::JobInfo)
    /// until the guard drops.
    pub(crate) fn busy(&self) -> BusyGuard<'_> {
        self.job.shared.busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self)
    }

    /// The calling worker waits (for its own workers) and is not busy
    /// until the guard drops.
    pub(crate) fn idle(&self) -> IdleGuard<'_> {
        self.job.shared.busy.fetch_sub(1, Ordering::SeqCst);
        IdleGuard(self)
    }
}

pub(crate) struct BusyGuard<'a>(&'a JobRunner);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.job.shared.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct IdleGuard<'a>(&'a JobRunner);

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.job.shared.busy.fetch_add(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner")
            .field("job", &self.job.id())
            .finish()
    }
}

/// Starting a job: its task on an I/O thread.
impl Job {
    /// Starts a job made by [`Job::create`]: `running`, and `driver`'s
    /// work runs in a task of `io` (its I/O thread: QEMU's job
    /// `AioContext`). Fails unless the job is `created`.
    pub fn start<D: JobDriver>(&self, bql: &Bql, io: &IoThreadHandle, driver: D) -> Result<()> {
        let _ = bql;
        {
            let mut st = self.shared.lock();
            if st.status != JobStatus::Created {
                return Err(Error::JobState {
                    job: self.id().to_owned(),
                    verb: "start",
                    status: st.status.as_str(),
                });
            }
            self.shared.transition(&mut st, JobStatus::Running);
            // The job starts busy; a pause asked for while created takes
            // effect now.
            self.shared.sync_pause(&mut st);
        }
        let job = self.clone();
        // The handle is dropped: the job reports through its state and
        // events, and its task never panics out of the job's own code.
        drop(io.spawn(move |cx| run_job(cx, job, driver)));
        Ok(())
    }
}

/// The job's task: the steps in QEMU's order (see [`JobDriver`]), then
/// `concluded` on the main loop.
pub(crate) async fn run_job<D: JobDriver>(mut io: IoTask, job: Job, mut driver: D) {
    let runner = JobRunner { job: job.clone() };
    let mut cx = JobCx {
        io: &mut io,
        runner: runner.clone(),
    };
    let result = {
        let _busy = runner.busy();
        match runner.pause_point(cx.io()).await {
            Ok(()) => guarded("run", driver.run(&mut cx)).await,
            Err(e) => Err(e),
        }
    };
    let shared = &job.shared;
    let mut result = shared.run_finished(result);
    if result.is_ok() {
        // Pending: wait for `finalize` (or a cancel).
        let go = shared
            .wait_for(|st| {
                if st.cancelled {
                    Some(false)
                } else if shared.auto_finalize || st.finalize_requested {
                    Some(true)
                } else {
                    None
                }
            })
            .await;
        result = if go {
            guarded("prepare", driver.prepare(&mut cx)).await
        } else {
            Err(shared.cancelled_error())
        };
        if let Err(e) = &result {
            shared.abort_after_prepare(e);
        }
    }
    // A panic in these is reported in the job's error, if it has none.
    let tail = match &result {
        Ok(()) => {
            guarded("commit", async {
                driver.commit(&mut cx).await;
                Ok(())
            })
            .await
        }
        Err(_) => {
            guarded("abort", async {
                driver.abort(&mut cx).await;
                Ok(())
            })
            .await
        }
    };
    let tail = tail.and(
        guarded("clean", async {
            driver.clean(&mut cx).await;
            Ok(())
        })
        .await,
    );
    if let (Ok(()), Err(e)) = (&result, tail) {
        shared.abort_after_prepare(&e);
        result = Err(e);
    }
    drop(driver);
    let cancelled = matches!(result, Err(Error::JobCancelled(_)));
    let error = result.err().map(|e| e.to_string());
    let j = job.clone();
    let e = error.clone();
    if cx
        .on_main_loop(move |bql| j.conclude(bql, cancelled, e))
        .await
        .is_err()
    {
        // The main loop has shut down: its job list is gone with it.
        shared.conclude(cancelled, error);
        shared.dismiss();
    }
}

/// `step`'s outcome, with a panic in it turned into an error: a job whose
/// driver panics concludes with the panic as its error instead of hanging
/// in its status.
async fn guarded(step: &'static str, fut: impl Future<Output = Result<()>>) -> Result<()> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(Error::driver(
                "job",
                format!("the job's {step} step panicked: {message}"),
            ))
        }
    }
}
