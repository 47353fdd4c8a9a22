//! [`ReadGuard`], the proof that a task holds the graph read lock, and the
//! [`ReadFuture`] that takes it.

use std::future::Future;
#[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
use std::panic::Location;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::graph::cell::ReadAccess;
use crate::graph::proof::{GraphView, IoRef, ReadLocked};
use crate::graph::runtime::IoTask;
use crate::graph::GraphInner;

/// The future returned by [`IoTask::read`].
#[must_use = "futures do nothing unless awaited"]
pub struct ReadFuture<'cx> {
    pub(crate) cx: Option<&'cx mut IoTask>,
    /// Where `read()` was called, recorded with the guard.
    #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
    pub(crate) at: &'static Location<'static>,
}

impl<'cx> Future for ReadFuture<'cx> {
    type Output = ReadGuard<'cx>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, task: &mut Context<'_>) -> Poll<ReadGuard<'cx>> {
        let cx = self.cx.take().expect("ReadFuture polled after completion");
        cx.count_guard();
        match cx.graph.lock.poll_read(&cx.shard, task) {
            Poll::Ready(()) => Poll::Ready(ReadGuard::new(
                cx,
                #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
                self.at,
            )),
            Poll::Pending => {
                crate::thread::guard_released(cx.task);
                self.cx = Some(cx);
                Poll::Pending
            }
        }
    }
}

/// Proof that this task holds the graph read lock (QEMU's
/// `GRAPH_RDLOCK_GUARD()`).
///
/// [`IoRef`]s borrow it, so none outlives the lock. Released on drop, on
/// whichever thread that happens. One pointer wide. Leaking it with
/// `mem::forget` is memory-safe: every `IoRef` borrowed from it has ended
/// before it can be moved into `forget`. The leaked count keeps writers out
/// for as long as its context lives; once the context and every `IoTask` of it
/// are gone, the writer stops counting that context.
#[must_use = "the read lock is released as soon as the guard is dropped"]
pub struct ReadGuard<'cx> {
    cx: &'cx mut IoTask,
}

static_assertions::assert_impl_all!(ReadGuard<'static>: Send, Sync);
static_assertions::assert_eq_size!(ReadGuard<'static>, usize);

impl<'cx> ReadGuard<'cx> {
    /// Wraps the read lock just taken through `cx` (and counted for its
    /// task by [`IoTask::count_guard`]); records where it was taken, in
    /// diagnostic builds.
    #[inline(always)]
    pub(crate) fn new(
        cx: &'cx mut IoTask,
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))] at: &'static Location<'static>,
    ) -> Self {
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
        cx.shard.note_guard_taken(cx.task, at);
        ReadGuard { cx }
    }

    /// The graph, for reading.
    pub fn graph(&self) -> GraphView<'_, ReadLocked> {
        // SAFETY: the token is this guard's graph's.
        unsafe { GraphView::new(&self.cx.graph, self.access()) }
    }

    /// A read token for the guard's graph, valid while `self` is borrowed.
    #[inline]
    pub(crate) fn access(&self) -> ReadAccess<'_> {
        // SAFETY: the guard holds its graph's read lock for as long as
        // `&self` lives: the writer waits for it to leave before it mints
        // the write token, so no `&mut` into the graph exists meanwhile.
        unsafe { ReadAccess::assume() }
    }

    /// The graph this guard read-locks.
    #[inline]
    pub(crate) fn graph_inner(&self) -> &GraphInner {
        &self.cx.graph
    }

    /// Shortcut for `self.graph().node(name)`.
    pub fn node(&self, name: &str) -> Option<IoRef<'_>> {
        self.graph().node(name)
    }
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        crate::thread::guard_released(self.cx.task);
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
        self.cx.shard.note_guard_released(self.cx.task);
        self.cx.graph.lock.read_unlock(&self.cx.shard);
    }
}

impl std::fmt::Debug for ReadGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("context", &self.cx.ctx.name)
            .finish()
    }
}
