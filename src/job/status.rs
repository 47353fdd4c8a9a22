//! QEMU's job state machine: the statuses, the verbs, and the two tables
//! that say which status may follow which and which verb each status
//! accepts (QEMU's `JobSTT` and `JobVerbTable`, `qapi/job.json`).

use std::fmt;

/// Where a job is in its life (QEMU's `JobStatus`).
///
/// ```text
///  created ─► running ◄──► paused
///               │   ╲
///               │    ready ◄──► standby
///               ▼      │
///            waiting ◄─┘
///               │
///            pending ──────────┐
///               │              ▼
///            aborting ─► concluded ─► null
/// ```
///
/// (`aborting` is reachable from `created`, `running`, `ready`, `waiting`
/// and `pending`; [`JobStatus::can_become`] is the whole table.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    /// Made, not started yet.
    Created,
    /// Working.
    Running,
    /// Paused by the user, an error policy (`stop`) or a drain, while
    /// running.
    Paused,
    /// Work done so far is in sync; waiting for `complete` (mirror, active
    /// commit).
    Ready,
    /// Paused while ready.
    Standby,
    /// Finished its work; waiting for the other jobs of its transaction.
    Waiting,
    /// Finished; waiting for `finalize` (graph changes not made yet).
    Pending,
    /// Failed or cancelled; undoing.
    Aborting,
    /// Done (successfully or not); waiting for `dismiss`.
    Concluded,
    /// Dismissed: gone from the job list.
    Null,
}

impl JobStatus {
    /// Every status, in QEMU's order.
    pub const ALL: [JobStatus; 10] = [
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The QMP name (`"running"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU allows a job in `self` to move to `next` (QEMU's
    /// `JobSTT`). A status never "moves" to itself.
    ///
    /// ```
    /// use blockgraph::job::JobStatus;
    /// assert!(JobStatus::Running.can_become(JobStatus::Paused));
    /// assert!(!JobStatus::Paused.can_become(JobStatus::Ready));
    /// ```
    pub const fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether the job has finished its work (QEMU's `job_is_completed`).
    pub const fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }

    /// Whether the job is ready (QEMU's `job_is_ready`: `ready` or
    /// `standby`).
    pub const fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command a user gives a job (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel`.
    Cancel,
    /// `job-pause`.
    Pause,
    /// `job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete` (ready jobs).
    Complete,
    /// `job-finalize` (pending jobs).
    Finalize,
    /// `job-dismiss` (concluded jobs).
    Dismiss,
}

impl JobVerb {
    /// Every verb.
    pub const ALL: [JobVerb; 7] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
    ];

    /// The QMP name (`"cancel"`, `"set-speed"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// Whether a job in `status` accepts this verb (QEMU's
    /// `JobVerbTable`). A verb that is accepted may still be refused for
    /// another reason (resuming a job the user did not pause).
    ///
    /// ```
    /// use blockgraph::job::{JobStatus, JobVerb};
    /// assert!(JobVerb::Dismiss.allowed_in(JobStatus::Concluded));
    /// assert!(!JobVerb::Complete.allowed_in(JobStatus::Running));
    /// ```
    pub const fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(status, Ready),
            JobVerb::Finalize => matches!(status, Pending),
            JobVerb::Dismiss => matches!(status, Concluded),
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of job it is (QEMU's `JobType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    /// `block-stream`.
    Stream,
    /// `block-commit` (not the active layer).
    Commit,
    /// `drive-mirror` / `blockdev-mirror`.
    Mirror,
    /// `drive-backup` / `blockdev-backup`.
    Backup,
    /// A job of the embedder's own.
    Other(&'static str),
}

impl JobType {
    /// The QMP name (`"stream"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
            JobType::Commit => "commit",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Other(name) => name,
        }
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
