//! A job's event stream (QEMU's `JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`,
//! `BLOCK_JOB_PENDING`, `BLOCK_JOB_ERROR`, `BLOCK_JOB_COMPLETED`,
//! `BLOCK_JOB_CANCELLED`): a small unbounded queue per subscriber that is
//! both a [`Stream`] for async code and a blocking receiver for plain
//! threads.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::Stream;
use futures::task::AtomicWaker;

use super::status::JobStatus;
use crate::sync::wake::wake_catching;

/// Read or write: which half of a copy failed (QEMU's `IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}

/// What a job did about an I/O error (QEMU's `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    /// The job fails with the error.
    Report,
    /// The job goes on; what it does with the failed range is the job's
    /// own rule (stream: skips it and fails at the end, as QEMU's does).
    Ignore,
    /// The job pauses (as if the user paused it) and retries the range
    /// when resumed.
    Stop,
}

/// One thing that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobEvent {
    /// The job's status changed (QEMU's `JOB_STATUS_CHANGE`).
    StatusChange(JobStatus),
    /// The job is ready for `complete` (QEMU's `BLOCK_JOB_READY`).
    Ready,
    /// The job finished its work and waits for `finalize` or is being
    /// finalized (QEMU's `BLOCK_JOB_PENDING`).
    Pending,
    /// An I/O error met the job's error policy (QEMU's `BLOCK_JOB_ERROR`).
    Error {
        /// Which half of the copy failed.
        operation: IoOperation,
        /// What the policy made the job do.
        action: ErrorAction,
        /// The error.
        error: String,
    },
    /// The job concluded after finishing its work, successfully or not
    /// (QEMU's `BLOCK_JOB_COMPLETED`).
    Completed {
        /// Progress when it ended.
        current: u64,
        /// Total work when it ended.
        total: u64,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// The job concluded because it was cancelled (QEMU's
    /// `BLOCK_JOB_CANCELLED`).
    Cancelled {
        /// Progress when it ended.
        current: u64,
        /// Total work when it ended.
        total: u64,
    },
}

#[derive(Default)]
pub(crate) struct Subscriber {
    queue: Mutex<Queue>,
    ready: Condvar,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<JobEvent>,
    closed: bool,
}

impl Subscriber {
    pub(crate) fn push(&self, event: JobEvent) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.events.push_back(event);
        drop(q);
        self.ready.notify_all();
        wake_catching(|| self.waker.wake(), "a job event");
    }

    pub(crate) fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
        wake_catching(|| self.waker.wake(), "a job event stream closing");
    }
}

/// A job's events, in the order they happened, from the job's creation
/// ([`Job::events`](super::Job::events)). The stream ends after
/// the job's last event (its move to [`JobStatus::Null`]).
///
/// Use it as a [`Stream`] from async code, or with
/// [`JobEvents::next_timeout`] from a plain thread.
pub struct JobEvents {
    pub(crate) sub: Arc<Subscriber>,
}

impl JobEvents {
    /// The next event if one is queued, without waiting.
    pub fn try_next(&mut self) -> Option<JobEvent> {
        self.sub
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .pop_front()
    }

    /// Blocks the thread for at most `timeout` until an event arrives;
    /// `None` when none came in time or the job is gone and every event
    /// was taken.
    ///
    /// Blocks: call it from a plain thread, not from the main loop or an
    /// I/O task (whose progress the event may depend on). Async code uses
    /// the [`Stream`].
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<JobEvent> {
        let deadline = Instant::now() + timeout;
        let mut q = self.sub.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(event) = q.events.pop_front() {
                return Some(event);
            }
            let now = Instant::now();
            if q.closed || now >= deadline {
                return None;
            }
            q = self
                .sub
                .ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Stream for JobEvents {
    type Item = JobEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<JobEvent>> {
        self.sub.waker.register(cx.waker());
        let mut q = self.sub.queue.lock().unwrap_or_else(|e| e.into_inner());
        match q.events.pop_front() {
            Some(event) => Poll::Ready(Some(event)),
            None if q.closed => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl std::fmt::Debug for JobEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEvents").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event stream polled under a waker that panics: the job's code
    /// that pushes the event (a status change on the main loop) goes on,
    /// and the event is queued for the stream all the same.
    #[test]
    fn a_panicking_stream_waker_does_not_unwind_into_the_job() {
        let mut events = JobEvents {
            sub: Arc::new(Subscriber::default()),
        };
        let waker = crate::sync::wake::panicking_waker();
        let polled = Pin::new(&mut events).poll_next(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
        events.sub.push(JobEvent::StatusChange(JobStatus::Running));
        events.sub.close();
        assert!(matches!(
            events.next_timeout(Duration::ZERO),
            Some(JobEvent::StatusChange(JobStatus::Running))
        ));
        assert!(events.next_timeout(Duration::ZERO).is_none());
    }
}
