//! [`GraphWriter`], the write section (QEMU's `bdrv_graph_wrlock()`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::graph::cell::WriteAccess;
use crate::graph::proof::GraphView;
use crate::graph::proof::{GlobalState, GsRef};
use crate::graph::GraphInner;

/// Proof that no reader is inside the graph and that the main loop may
/// change it: the write section.
///
/// Lent as `&mut GraphWriter` to a synchronous closure by
/// [`Bql::write`](crate::Bql::write) or [`MainTask::write`](crate::MainTask::write).
/// Its mutation methods take `&mut self`, so a [`GsRef`] read through
/// [`GraphWriter::graph`] cannot be kept across a mutation; they take
/// [`Drained`](crate::Drained) sections for the nodes whose users they
/// disturb. Every mutation is a transaction: on error the graph is exactly as
/// it was.
///
/// `!Send`; cannot be created in safe code.
pub struct GraphWriter<'w> {
    pub(crate) graph: &'w Arc<GraphInner>,
    /// The token that opens graph state for writing; mutations borrow it
    /// mutably, reads borrow it shared.
    pub(crate) access: WriteAccess<'w>,
}

static_assertions::assert_not_impl_any!(GraphWriter<'static>: Send, Sync);

impl<'w> GraphWriter<'w> {
    /// # Safety
    ///
    /// A write section is active on `graph` (flag up, readers gone), on the
    /// main-loop thread, and no `GsRef` into `graph` is alive.
    pub(crate) unsafe fn new(graph: &'w Arc<GraphInner>) -> Self {
        GraphWriter {
            graph,
            // SAFETY: by this function's contract.
            access: unsafe { WriteAccess::assume() },
        }
    }

    /// The graph, for reading between mutations.
    pub fn graph(&self) -> GraphView<'_, GlobalState> {
        // SAFETY: the token is this graph's writer's, borrowed shared (so no
        // mutation runs while the view lives); main-loop thread.
        unsafe { GraphView::new(self.graph, self.access.read()) }
    }

    /// Shortcut for `self.graph().node(name)`.
    pub fn node(&self, name: &str) -> Option<GsRef<'_>> {
        self.graph().node(name)
    }
}

impl std::fmt::Debug for GraphWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphWriter").finish_non_exhaustive()
    }
}

/// The writer's announcement, withdrawn on drop (also when a waiting
/// `MainTask::write` future is cancelled).
pub(crate) struct WriteLockHeld<'g> {
    graph: &'g GraphInner,
}

impl<'g> WriteLockHeld<'g> {
    pub(crate) fn announce(graph: &'g GraphInner) -> Self {
        graph.main.with(|_| ()); // main-loop thread only (panics otherwise)
        graph.lock.write_announce();
        WriteLockHeld { graph }
    }

    pub(crate) fn readers_gone(&self) -> ReadersGone<'_> {
        ReadersGone { graph: self.graph }
    }

    /// Marks the write section as running (every reader gone) until the
    /// mark is dropped: drains refuse to start inside it.
    pub(crate) fn enter(&self) -> WriteSectionMark<'g> {
        self.graph.main.with(|state| state.in_write_section += 1);
        WriteSectionMark { graph: self.graph }
    }
}

/// The write section is running (see [`WriteLockHeld::enter`]).
pub(crate) struct WriteSectionMark<'g> {
    graph: &'g GraphInner,
}

impl Drop for WriteSectionMark<'_> {
    fn drop(&mut self) {
        self.graph.main.with(|state| state.in_write_section -= 1);
    }
}

impl Drop for WriteLockHeld<'_> {
    fn drop(&mut self) {
        self.graph.lock.write_leave();
    }
}

/// Ready once every reader has left the graph.
pub(crate) struct ReadersGone<'g> {
    graph: &'g GraphInner,
}

impl Future for ReadersGone<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.graph.lock.poll_readers_gone(cx)
    }
}
