//! Block jobs (QEMU's `job.c`, `blockjob.c`): long-running operations on
//! the graph with QEMU's states, verbs and events, a copy engine they
//! share, and the first of them: [`stream`], [`commit`] (of an
//! intermediate image) and [`backup`].
//!
//! # The model
//!
//! A [`Job`] is made and commanded on the main loop (its verbs take the
//! [`Bql`](crate::Bql), like QEMU's QMP commands), reports through its
//! status, progress and an event stream ([`Job::events`]), and is listed
//! by [`query_jobs`]. Its status follows QEMU's state machine exactly
//! ([`JobStatus::can_become`]); each verb is accepted only in the statuses
//! QEMU's table allows ([`JobVerb::allowed_in`]), and refused otherwise
//! with [`Error::JobState`](crate::Error::JobState), changing nothing.
//!
//! What a kind of job does is a [`JobDriver`]: its work (`run`) and its
//! completion steps (`prepare`, `commit`, `abort`, `clean`), called in
//! QEMU's order by the job's task on an [`IoThread`](crate::IoThread).
//!
//! # Which proof each step holds
//!
//! * **The work** runs in the job's I/O task and the copy engine's worker
//!   tasks ([`copy_range`]). Each request takes the graph read lock for
//!   itself, through the task's [`IoTask`](crate::IoTask) (a
//!   [`BlockBackend`](crate::BlockBackend) call or an
//!   [`IoTask::read`](crate::IoTask::read) guard): the lock is held per
//!   request, never across a pause point, a rate-limit sleep or a wait for
//!   the main loop, none of which takes an `IoTask`.
//! * **Its I/O is a graph user's.** A job reads and writes through its own
//!   [`BlockBackend`](crate::BlockBackend)s (`stay_at_node`: they stay
//!   where the job put them), so a drain of any node they reach counts its
//!   requests in flight, waits for them and queues new ones, exactly like
//!   the guest's. Its filter node ([`JobFilter`], above everything it
//!   reads) sees the drain begin and end and pauses and resumes the job,
//!   whose status says `paused`/`standby` meanwhile.
//! * **Graph changes** happen only on the main loop:
//!   [`JobCx::on_main_loop`] runs a closure with the `Bql`, and it needs
//!   the job task's `&mut IoTask`, so it cannot be called while the task
//!   holds a read guard (the QEMU 10.0 deadlock). There a change needs a
//!   write section ([`GraphWriter`](crate::GraphWriter)) and the `Drained`
//!   proofs of the nodes it disturbs, like any other.
//!
//! See DESIGN.md §13 for the QEMU bugs this rules out.

#[macro_use]
mod setup;
mod backup;
mod commit;
mod copy;
mod driver;
mod events;
mod filter;
mod handle;
mod mirror;
mod rate;
mod shared;
mod status;
mod stream;

pub use backup::{
    backup, BackupOptions, BackupSync, BitmapSyncMode, CopyBeforeWrite, DEFAULT_BACKUP_CLUSTER,
};
pub use commit::{commit, CommitOptions};
pub use copy::{copy_range, BackendCopy, ChunkError, CopyChunks, CopyOptions, CopyReport};
pub use driver::{JobCx, JobDriver, JobRunner};
pub use events::{ErrorAction, IoOperation, JobEvent, JobEvents};
pub use filter::JobFilter;
pub use handle::{find_job, query_jobs, Job, JobInfo, JobOptions};
pub use mirror::{mirror, CopyMode, ImageFormat, MirrorOptions, MirrorSync, MirrorTarget};
pub use shared::OnError;
pub use status::{JobStatus, JobType, JobVerb};
pub use stream::{stream, StreamOptions};
