//! A job's shared state: its status and the flags the verbs set, progress,
//! the rate limit, the subscribers, and the waits of its workers (pause
//! points, the rate limit, the wait for `finalize`).
//!
//! The state is behind one mutex, as QEMU's is behind `job_mutex`: verbs
//! change it on the main loop, the job's I/O task changes it as it works,
//! and a change that matters to a waiting worker wakes it (`wake`). No
//! graph state lives here, so nothing here needs a graph proof; the verbs
//! that reach it take the `Bql` because QEMU's verbs are main-loop
//! commands, serialised with graph changes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::events::{ErrorAction, IoOperation, JobEvent, Subscriber};
use super::rate::RateLimit;
use super::status::{JobStatus, JobType, JobVerb};
use crate::types::{Error, Result};

/// What a job does when one of its I/O requests fails (QEMU's
/// `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnError {
    /// Fail the job (the default).
    #[default]
    Report,
    /// Go on (each job says what happens to the failed range).
    Ignore,
    /// Pause the job; resuming it retries the failed range.
    Stop,
    /// `Stop` on "no space left on device", `Report` on anything else.
    Enospc,
}

impl OnError {
    /// The action for `error`.
    pub fn action(self, error: &Error) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc => {
                let enospc =
                    matches!(error, Error::Io(e) if e.raw_os_error() == Some(libc::ENOSPC));
                if enospc {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        }
    }
}

pub(crate) struct State {
    pub status: JobStatus,
    /// Paused by the user (or by an error policy's `stop`).
    pub user_paused: bool,
    /// Drain sections over the nodes the job uses.
    pub drain_pauses: u32,
    pub cancelled: bool,
    pub force: bool,
    pub finalize_requested: bool,
    pub complete_requested: bool,
    /// Cancelled without force while ready (QEMU: a ready mirror then
    /// completes without pivoting); `complete_requested` is set with it.
    pub cancel_after_ready: bool,
    /// Why the job failed, once it has.
    pub error: Option<String>,
}

pub(crate) struct JobShared {
    pub id: String,
    pub kind: JobType,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub on_error: OnError,
    state: Mutex<State>,
    /// Woken on every change a waiting worker may care about.
    pub wake: Notify,
    pub current: AtomicU64,
    pub total: AtomicU64,
    pub rate: RateLimit,
    /// Workers not parked at a pause point.
    pub busy: AtomicUsize,
    subscribers: Mutex<Subscribers>,
}

/// The live subscribers, and every event so far (up to `HISTORY`), so that
/// a subscriber sees the job's events from its creation whenever it
/// subscribes: the job runs on its own as soon as it is started, and an
/// event between `start` and `events()` would otherwise be lost.
#[derive(Default)]
struct Subscribers {
    live: Vec<Arc<Subscriber>>,
    history: std::collections::VecDeque<JobEvent>,
}

/// Events a job keeps for late subscribers; the oldest go first.
const HISTORY: usize = 4096;

impl JobShared {
    pub(crate) fn new(
        id: String,
        kind: JobType,
        auto_finalize: bool,
        auto_dismiss: bool,
        on_error: OnError,
        speed: u64,
    ) -> Self {
        JobShared {
            id,
            kind,
            auto_finalize,
            auto_dismiss,
            on_error,
            state: Mutex::new(State {
                status: JobStatus::Created,
                user_paused: false,
                drain_pauses: 0,
                cancelled: false,
                force: false,
                finalize_requested: false,
                complete_requested: false,
                cancel_after_ready: false,
                error: None,
            }),
            wake: Notify::new(),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            rate: RateLimit::new(speed),
            busy: AtomicUsize::new(0),
            subscribers: Mutex::new(Subscribers::default()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn subscribe(&self) -> Arc<Subscriber> {
        let sub = Arc::new(Subscriber::default());
        let closed = self.lock().status == JobStatus::Null;
        let mut subs = self.subs();
        for event in &subs.history {
            sub.push(event.clone());
        }
        if closed {
            sub.close();
        } else {
            subs.live.push(sub.clone());
        }
        sub
    }

    fn subs(&self) -> MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emit(&self, event: JobEvent) {
        let mut subs = self.subs();
        for s in subs.live.iter() {
            s.push(event.clone());
        }
        if subs.history.len() == HISTORY {
            subs.history.pop_front();
        }
        subs.history.push_back(event);
    }

    pub(crate) fn close_subscribers(&self) {
        for s in self.subs().live.drain(..) {
            s.close();
        }
    }

    /// Moves to `next`, which QEMU's table must allow, and tells the
    /// subscribers. A move the table forbids is a bug in this module:
    /// debug builds stop there, release builds leave the status as it is.
    pub(crate) fn transition(&self, st: &mut State, next: JobStatus) {
        if st.status == next && next != JobStatus::Aborting {
            return;
        }
        debug_assert!(
            st.status.can_become(next),
            "job '{}': {} -> {} is not a QEMU transition",
            self.id,
            st.status,
            next
        );
        if !st.status.can_become(next) {
            return;
        }
        if st.status != next {
            st.status = next;
            self.emit(JobEvent::StatusChange(next));
        }
    }

    /// Whether the job should stop at its pause points.
    fn should_pause(st: &State) -> bool {
        !st.cancelled && (st.user_paused || st.drain_pauses > 0)
    }

    /// Brings the status in line with the pause flags (QEMU's pause point
    /// moves `running` ↔ `paused` and `ready` ↔ `standby`). A completed
    /// job's status is not a pause's business.
    pub(crate) fn sync_pause(&self, st: &mut State) {
        let pause = Self::should_pause(st);
        let next = match (st.status, pause) {
            (JobStatus::Running, true) => JobStatus::Paused,
            (JobStatus::Ready, true) => JobStatus::Standby,
            (JobStatus::Paused, false) => JobStatus::Running,
            (JobStatus::Standby, false) => JobStatus::Ready,
            _ => return,
        };
        self.transition(st, next);
        self.wake.notify_waiters();
    }

    /// Checks `verb` against QEMU's table.
    pub(crate) fn check_verb(&self, st: &State, verb: JobVerb) -> Result<()> {
        if verb.allowed_in(st.status) {
            Ok(())
        } else {
            Err(Error::JobState {
                job: self.id.clone(),
                verb: verb.as_str(),
                status: st.status.as_str(),
            })
        }
    }

    pub(crate) fn cancelled_error(&self) -> Error {
        Error::JobCancelled(self.id.clone())
    }

    /// A drain section began over a node the job uses.
    pub(crate) fn drain_begin(&self) {
        let mut st = self.lock();
        st.drain_pauses = st.drain_pauses.saturating_add(1);
        self.sync_pause(&mut st);
    }

    /// A drain section over a node the job uses ended.
    pub(crate) fn drain_end(&self) {
        let mut st = self.lock();
        st.drain_pauses = st.drain_pauses.saturating_sub(1);
        self.sync_pause(&mut st);
    }

    /// Waits, without any graph lock, until `done` says so; woken by every
    /// change of the state.
    pub(crate) async fn wait_for<T>(&self, mut done: impl FnMut(&State) -> Option<T>) -> T {
        loop {
            let notified = self.wake.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = done(&self.lock()) {
                return v;
            }
            notified.await;
        }
    }

    /// A pause point: returns at once unless the job should pause, else
    /// waits (counted as not busy) until it should not. Fails when the
    /// job was cancelled.
    pub(crate) async fn pause_point(&self) -> Result<()> {
        let mut parked = false;
        let outcome = loop {
            let notified = self.wake.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.cancelled {
                    break Err(self.cancelled_error());
                }
                if !Self::should_pause(&st) {
                    break Ok(());
                }
            }
            if !parked {
                parked = true;
                self.busy.fetch_sub(1, Ordering::SeqCst);
            }
            notified.await;
        };
        if parked {
            self.busy.fetch_add(1, Ordering::SeqCst);
        }
        outcome
    }

    /// Waits until the rate limit lets `bytes` go. Fails when the job was
    /// cancelled meanwhile.
    pub(crate) async fn throttle(&self, bytes: u64) -> Result<()> {
        loop {
            let notified = self.wake.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.lock().cancelled {
                return Err(self.cancelled_error());
            }
            let Some(wait) = self.rate.try_take(bytes) else {
                return Ok(());
            };
            let sleep = std::pin::pin!(tokio::time::sleep(wait));
            futures::future::select(sleep, notified).await;
        }
    }

    /// Applies the error policy to a failed request: tells the
    /// subscribers, and with `stop` pauses the job as the user would.
    pub(crate) fn error_action(&self, error: &Error, operation: IoOperation) -> ErrorAction {
        let action = self.on_error.action(error);
        let mut st = self.lock();
        self.emit(JobEvent::Error {
            operation,
            action,
            error: error.to_string(),
        });
        if action == ErrorAction::Stop && !st.user_paused {
            st.user_paused = true;
            self.sync_pause(&mut st);
        }
        action
    }

    /// The job's run is over: `waiting` then `pending` on success,
    /// `aborting` on failure or cancellation. Returns the outcome with a
    /// cancellation made an error (QEMU's `job_update_rc`).
    pub(crate) fn run_finished(&self, result: Result<()>) -> Result<()> {
        let mut st = self.lock();
        // A pause that came after the last pause point: the job is done
        // regardless.
        match st.status {
            JobStatus::Paused => self.transition(&mut st, JobStatus::Running),
            JobStatus::Standby => self.transition(&mut st, JobStatus::Ready),
            _ => {}
        }
        let result = match result {
            Ok(()) if st.cancelled => Err(self.cancelled_error()),
            other => other,
        };
        match &result {
            Ok(()) => {
                self.transition(&mut st, JobStatus::Waiting);
                self.transition(&mut st, JobStatus::Pending);
                self.emit(JobEvent::Pending);
            }
            Err(e) => {
                st.error.get_or_insert_with(|| e.to_string());
                self.transition(&mut st, JobStatus::Aborting);
            }
        }
        self.wake.notify_waiters();
        result
    }

    /// Marks the job failed during finalization.
    pub(crate) fn abort_after_prepare(&self, error: &Error) {
        let mut st = self.lock();
        st.error.get_or_insert_with(|| error.to_string());
        self.transition(&mut st, JobStatus::Aborting);
    }

    /// The last step: `concluded`, the completion event.
    pub(crate) fn conclude(&self, cancelled: bool, error: Option<String>) {
        let mut st = self.lock();
        let (current, total) = (
            self.current.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        if cancelled {
            self.emit(JobEvent::Cancelled { current, total });
        } else {
            self.emit(JobEvent::Completed {
                current,
                total,
                error,
            });
        }
        self.transition(&mut st, JobStatus::Concluded);
        self.wake.notify_waiters();
    }

    /// `null`: the job is gone.
    pub(crate) fn dismiss(&self) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Null);
        drop(st);
        self.close_subscribers();
        self.wake.notify_waiters();
    }
}
