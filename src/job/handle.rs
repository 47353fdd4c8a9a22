//! [`Job`], the handle of one block job: its verbs (main loop only), what
//! it reports, and the registry of a main loop's jobs.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::events::JobEvents;
use super::shared::{JobShared, OnError};
use super::status::{JobStatus, JobType, JobVerb};
use crate::graph::mutation::check_name;
use crate::graph::proof::Bql;
use crate::types::{Error, Result};

/// How a job is made (QEMU's common job arguments).
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The job's id: unique among the main loop's jobs, and a valid node
    /// name (a letter, then letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// Finalize as soon as the work is done (default); otherwise the job
    /// waits in [`JobStatus::Pending`] for [`Job::finalize`].
    pub auto_finalize: bool,
    /// Dismiss as soon as the job concludes (default); otherwise it waits
    /// in [`JobStatus::Concluded`] for [`Job::dismiss`], so its outcome can
    /// still be queried.
    pub auto_dismiss: bool,
    /// Bytes per second the job may copy; 0 (default) for no limit.
    pub speed: u64,
    /// What an I/O error does (default [`OnError::Report`]).
    pub on_error: OnError,
}

impl JobOptions {
    /// Options for a job named `id`, with QEMU's defaults.
    pub fn new(id: impl Into<String>) -> Self {
        JobOptions {
            id: id.into(),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            on_error: OnError::Report,
        }
    }
}

/// What [`query_jobs`] reports about a job (QEMU's `JobInfo`): plain data,
/// for printing or serialising.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Its kind.
    pub job_type: JobType,
    /// Its status.
    pub status: JobStatus,
    /// Work done (bytes, for the copy jobs).
    pub current_progress: u64,
    /// Work known in all; may grow while the job runs.
    pub total_progress: u64,
    /// Its rate limit in bytes per second (0: none).
    pub speed: u64,
    /// Whether some part of the job is working right now (false while all
    /// of it waits at a pause point).
    pub busy: bool,
    /// Whether the user (or a `stop` error policy) paused it.
    pub paused: bool,
    /// Whether it finalizes by itself.
    pub auto_finalize: bool,
    /// Whether it is dismissed by itself.
    pub auto_dismiss: bool,
    /// Why it failed, once it has.
    pub error: Option<String>,
}

/// One block job (QEMU's `Job`): a long-running operation on the graph —
/// streaming, committing, mirroring, backing up — with QEMU's states,
/// verbs and events.
///
/// A job is made on the main loop and does its I/O in a task of an
/// [`IoThread`](crate::IoThread) (given by its
/// [`IoThreadHandle`](crate::IoThreadHandle)), under the graph read lock it takes for each request; it
/// changes the graph only on the main loop, in a write section over
/// drained nodes (see the [module docs](super)). The handle is cheap to
/// clone and may be kept anywhere; its verbs take the [`Bql`], like QEMU's
/// QMP commands, and its queries take nothing.
///
/// # Example
///
/// A stream job on a two-image chain, watched through its events:
///
/// ```
/// use blockgraph::job::{self, JobEvent, JobOptions, JobStatus, StreamOptions};
/// use blockgraph::drivers::{qcow2::{CreateOptions, Qcow2Driver, Qcow2Options}, MemoryDriver};
/// use blockgraph::{BackendOptions, ChildRole, MainLoop};
/// use std::time::Duration;
///
/// let main = MainLoop::new()?;
/// let io = main.new_io_thread("io0")?;
/// // base (raw, in memory) <- top (qcow2 on a memory file)
/// let (base, top_file) = main.run(|bql| bql.write(|w| {
///     let base = w.add_node("base", MemoryDriver::new(1 << 20), &[])?;
///     let file = w.add_node("top-file", MemoryDriver::new(4 << 20), &[])?;
///     Ok::<_, blockgraph::Error>((base, file))
/// }))?;
/// let (b, f) = (base.clone(), top_file.clone());
/// let top = io.spawn(move |mut cx| async move {
///     let drv = {
///         let g = cx.read().await;
///         Qcow2Driver::create(f.io(&g), &CreateOptions::new(1 << 20)).await?;
///         Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await?
///     };
///     cx.run_on_main_loop(move |bql| bql.write(|w| {
///         w.add_node("top", drv, &[(ChildRole::File, &f), (ChildRole::Backing, &b)])
///     })).await?
/// }).join()?;
/// let t = top.clone();
/// let vda = main.run(move |bql| bql.write(|w| w.add_backend("vda", &t, BackendOptions::default())))?;
/// let blk = vda.clone();
/// io.spawn(move |mut cx| async move { blk.write(&mut cx, 0, &[7; 4096]).await }).join()?;
///
/// // Stream everything below `top` into it; `base` leaves the chain.
/// let (io_handle, t) = (io.handle(), top.clone());
/// let (job, mut events) = main.run(move |bql| {
///     let job = job::stream(bql, &io_handle, JobOptions::new("job0"), StreamOptions::new(&t))?;
///     let events = job.events();
///     Ok::<_, blockgraph::Error>((job, events))
/// })?;
/// let mut last = None;
/// while let Some(event) = events.next_timeout(Duration::from_secs(30)) {
///     last = Some(event);
/// }
/// assert_eq!(last, Some(JobEvent::StatusChange(JobStatus::Null)));
/// assert_eq!(job.status(), JobStatus::Null);
/// main.run(move |bql| assert!(top.gs(bql).backing().is_none()));
/// # drop(io); main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Clone)]
pub struct Job {
    pub(crate) shared: Arc<JobShared>,
}

thread_local! {
    /// The main loop's jobs: this thread-local exists on every thread, but
    /// only main-loop threads (reached through a `Bql`) ever use it, so
    /// each main loop has its own list.
    static JOBS: RefCell<Vec<Job>> = const { RefCell::new(Vec::new()) };
}

/// Every job of this main loop that is not dismissed yet, in the order
/// they were made (QEMU's `query-jobs`).
pub fn query_jobs(bql: &Bql) -> Vec<JobInfo> {
    let _ = bql;
    JOBS.with(|jobs| jobs.borrow().iter().map(Job::info).collect())
}

/// The job `id` of this main loop, if it is not dismissed yet.
pub fn find_job(bql: &Bql, id: &str) -> Option<Job> {
    let _ = bql;
    JOBS.with(|jobs| jobs.borrow().iter().find(|j| j.id() == id).cloned())
}

impl Job {
    /// Makes a job in [`JobStatus::Created`] and lists it with this main
    /// loop's jobs, for a job kind that sets up the graph before starting
    /// (see [`Job::start`]). Fails on an invalid or duplicate id.
    pub fn create(bql: &Bql, kind: JobType, options: &JobOptions) -> Result<Job> {
        check_name(&options.id)?;
        if find_job(bql, &options.id).is_some() {
            return Err(Error::DuplicateName(options.id.clone()));
        }
        let job = Job {
            shared: Arc::new(JobShared::new(
                options.id.clone(),
                kind,
                options.auto_finalize,
                options.auto_dismiss,
                options.on_error,
                options.speed,
            )),
        };
        job.shared
            .emit(super::events::JobEvent::StatusChange(JobStatus::Created));
        JOBS.with(|jobs| jobs.borrow_mut().push(job.clone()));
        Ok(job)
    }

    /// Ends a job that failed to start (QEMU's `job_early_fail`): from
    /// `created` straight to `null`, unlisted.
    pub fn early_fail(&self, bql: &Bql) {
        let _ = bql;
        let status = self.shared.lock().status;
        if status == JobStatus::Created {
            self.shared.dismiss();
            self.unlist();
        }
    }

    fn unlist(&self) {
        JOBS.with(|jobs| {
            jobs.borrow_mut()
                .retain(|j| !Arc::ptr_eq(&j.shared, &self.shared))
        });
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The job's kind.
    pub fn job_type(&self) -> JobType {
        self.shared.kind
    }

    /// The job's status now.
    pub fn status(&self) -> JobStatus {
        self.shared.lock().status
    }

    /// Work done and work known in all (bytes, for the copy jobs).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.current.load(Ordering::Relaxed),
            self.shared.total.load(Ordering::Relaxed),
        )
    }

    /// The rate limit in bytes per second (0: none).
    pub fn speed(&self) -> u64 {
        self.shared.rate.rate()
    }

    /// Why the job failed, once it has.
    pub fn error(&self) -> Option<String> {
        self.shared.lock().error.clone()
    }

    /// A snapshot of everything [`query_jobs`] reports about this job.
    pub fn info(&self) -> JobInfo {
        let st = self.shared.lock();
        let (current_progress, total_progress) = self.progress();
        JobInfo {
            id: self.shared.id.clone(),
            job_type: self.shared.kind,
            status: st.status,
            current_progress,
            total_progress,
            speed: self.speed(),
            busy: self.shared.busy.load(Ordering::SeqCst) > 0,
            paused: st.user_paused,
            auto_finalize: self.shared.auto_finalize,
            auto_dismiss: self.shared.auto_dismiss,
            error: st.error.clone(),
        }
    }

    /// Subscribes to the job's events: every event since the job was made
    /// (its last 4096, for a very long-lived one), then each as it
    /// happens, so nothing is missed however late one subscribes.
    pub fn events(&self) -> JobEvents {
        JobEvents {
            sub: self.shared.subscribe(),
        }
    }

    /// Whether two handles are the same job.
    pub fn ptr_eq(&self, other: &Job) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// The verbs: main-loop commands, each checked against QEMU's table
/// ([`JobVerb::allowed_in`]); a refused verb changes nothing and says why
/// ([`Error::JobState`]).
impl Job {
    /// Pauses the job (QEMU's `job-pause`): `running` → `paused`, `ready`
    /// → `standby`. Requests already in flight finish; no new ones start.
    pub fn pause(&self, bql: &Bql) -> Result<()> {
        let _ = bql;
        let mut st = self.shared.lock();
        self.shared.check_verb(&st, JobVerb::Pause)?;
        if st.user_paused {
            return Err(Error::InvalidArgument(format!(
                "job '{}' is already paused",
                self.id()
            )));
        }
        st.user_paused = true;
        self.shared.sync_pause(&mut st);
        Ok(())
    }

    /// Resumes a job the user (or a `stop` error policy) paused (QEMU's
    /// `job-resume`). A job also paused by a drain stays paused until the
    /// drain ends.
    pub fn resume(&self, bql: &Bql) -> Result<()> {
        let _ = bql;
        let mut st = self.shared.lock();
        self.shared.check_verb(&st, JobVerb::Resume)?;
        if !st.user_paused {
            return Err(Error::InvalidArgument(format!(
                "job '{}' cannot resume: it was not paused",
                self.id()
            )));
        }
        st.user_paused = false;
        self.shared.sync_pause(&mut st);
        Ok(())
    }

    /// Cancels the job (QEMU's `job-cancel`): it stops at its next pause
    /// point (a paused job is woken for it), undoes what it set up and
    /// concludes with [`JobEvent::Cancelled`](super::JobEvent::Cancelled).
    /// `force` matters to jobs that are ready (QEMU's `force`: do not
    /// complete, abandon): without it, a ready job of a kind that
    /// completes on cancel (mirror, active commit) is not cancelled but asked to complete
    /// without its graph change (QEMU's cancel of a ready mirror: the
    /// target is brought in sync and left, the source stays in use), and
    /// concludes with [`JobEvent::Completed`](super::JobEvent::Completed).
    pub fn cancel(&self, bql: &Bql, force: bool) -> Result<()> {
        let _ = bql;
        let mut st = self.shared.lock();
        self.shared.check_verb(&st, JobVerb::Cancel)?;
        let ready = matches!(st.status, JobStatus::Ready | JobStatus::Standby);
        // Only jobs that go ready (mirror, active commit) get here.
        if ready && !force {
            st.cancel_after_ready = true;
            st.complete_requested = true;
            st.user_paused = false;
            self.shared.sync_pause(&mut st);
            self.shared.wake.notify_waiters();
            return Ok(());
        }
        st.cancelled = true;
        st.force |= force;
        st.user_paused = false;
        self.shared.sync_pause(&mut st);
        self.shared.wake.notify_waiters();
        Ok(())
    }

    /// Asks a ready job to complete (QEMU's `job-complete`).
    pub fn complete(&self, bql: &Bql) -> Result<()> {
        let _ = bql;
        let mut st = self.shared.lock();
        self.shared.check_verb(&st, JobVerb::Complete)?;
        st.complete_requested = true;
        self.shared.wake.notify_waiters();
        Ok(())
    }

    /// Finalizes a pending job (QEMU's `job-finalize`): it makes its graph
    /// changes and concludes.
    pub fn finalize(&self, bql: &Bql) -> Result<()> {
        let _ = bql;
        let mut st = self.shared.lock();
        self.shared.check_verb(&st, JobVerb::Finalize)?;
        st.finalize_requested = true;
        self.shared.wake.notify_waiters();
        Ok(())
    }

    /// Dismisses a concluded job (QEMU's `job-dismiss`): `null`, and gone
    /// from [`query_jobs`].
    pub fn dismiss(&self, bql: &Bql) -> Result<()> {
        let _ = bql;
        {
            let st = self.shared.lock();
            self.shared.check_verb(&st, JobVerb::Dismiss)?;
        }
        self.shared.dismiss();
        self.unlist();
        Ok(())
    }

    /// Changes the rate limit (QEMU's `block-job-set-speed`), effective for
    /// the next chunk; 0 lifts it.
    pub fn set_speed(&self, bql: &Bql, bytes_per_sec: u64) -> Result<()> {
        let _ = bql;
        let st = self.shared.lock();
        self.shared.check_verb(&st, JobVerb::SetSpeed)?;
        self.shared.rate.set_rate(bytes_per_sec);
        drop(st);
        self.shared.wake.notify_waiters();
        Ok(())
    }

    /// The last step of the job's task, on the main loop: `concluded`, and
    /// dismissed if it dismisses itself.
    pub(crate) fn conclude(&self, bql: &Bql, cancelled: bool, error: Option<String>) {
        let _ = bql;
        self.shared.conclude(cancelled, error);
        if self.shared.auto_dismiss {
            self.shared.dismiss();
            self.unlist();
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.shared.id)
            .field("type", &self.shared.kind)
            .field("status", &self.status())
            .finish()
    }
}
