//! [`JobFilter`]: a job's filter node (QEMU's stream, commit, mirror and
//! backup jobs each insert one above the node they work on), which pauses
//! the job while a drain covers it.
//!
//! A drain of any node below the filter covers the filter too (a drain
//! covers every user above the drained node), so the filter's
//! `drained_begin`/`drained_end` callbacks see every drain of every node
//! the job reads through it: they pause and resume the job (QEMU's
//! `child_job_drained_begin`/`_end`), and its status says `paused` (or
//! `standby`) for exactly as long. The drain itself needs no help from the
//! job: the job's requests enter through its own backend above the filter,
//! so they are counted, waited for and queued like the guest's.

use crate::driver::Filter;
use crate::graph::driver::{IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::{BlockStatus, ChildRole, Permissions, Result};

use super::handle::Job;

/// A filter driver `F` that belongs to a job: every callback is `F`'s, and
/// the drained callbacks also pause and resume the job.
pub struct JobFilter<F> {
    inner: F,
    job: Job,
}

impl<F: Filter> JobFilter<F> {
    /// `inner`, pausing `job` while drained.
    pub fn new(inner: F, job: Job) -> Self {
        JobFilter { inner, job }
    }

    /// The filter it wraps.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// The job it belongs to.
    pub fn job(&self) -> &Job {
        &self.job
    }
}

impl<F: Filter> Filter for JobFilter<F> {
    const CHILD: ChildRole = F::CHILD;

    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }

    fn describe(&self) -> String {
        format!("{} (job '{}')", self.inner.describe(), self.job.id())
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        self.inner.open(node)
    }

    fn close(&self, node: CallbackRef<'_>) {
        self.inner.close(node)
    }

    fn reopen(&self, node: CallbackRef<'_>, options: &[(&str, &str)]) -> Result<()> {
        self.inner.reopen(node, options)
    }

    fn reopen_commit(&self, node: CallbackRef<'_>) {
        self.inner.reopen_commit(node)
    }

    fn reopen_abort(&self, node: CallbackRef<'_>) {
        self.inner.reopen_abort(node)
    }

    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        self.inner.child_permissions(role, users)
    }

    fn drained_begin(&self, node: CallbackRef<'_>) {
        self.inner.drained_begin(node);
        self.job.shared.drain_begin();
    }

    fn drained_end(&self, node: CallbackRef<'_>) {
        self.inner.drained_end(node);
        self.job.shared.drain_end();
    }

    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        self.inner.request_alignment(node)
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        self.inner.length(node)
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.inner.read(node, offset, buf)
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.inner.write(node, offset, buf)
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.inner.write_zeroes(node, offset, len)
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.inner.discard(node, offset, len)
    }

    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        self.inner.flush(node)
    }

    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        self.inner.truncate(node, size, permit)
    }

    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        self.inner.block_status(node, offset, len)
    }
}

impl<F: std::fmt::Debug> std::fmt::Debug for JobFilter<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobFilter")
            .field("inner", &self.inner)
            .field("job", &self.job.id())
            .finish()
    }
}
