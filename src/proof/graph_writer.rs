//! [`GraphWriter`], the write section (QEMU's `bdrv_graph_wrlock()`).

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::graph::{GraphInner, GraphView};
use crate::proof::{GlobalState, GsRef};

/// Proof that no reader is inside the graph and that the main loop may
/// change it: the write section.
///
/// Lent as `&mut GraphWriter` to a synchronous closure by
/// [`Bql::write`](crate::Bql::write) or [`MainCx::write`](crate::MainCx::write).
/// Its mutation methods take `&mut self`, so a [`GsRef`] read through
/// [`GraphWriter::graph`] cannot be kept across a mutation; they take
/// [`Drained`](crate::Drained) sections for the nodes whose users they
/// disturb. Every mutation is a transaction: on error the graph is exactly as
/// it was.
///
/// `!Send`; cannot be created in safe code.
pub struct GraphWriter<'w> {
    pub(crate) graph: &'w Arc<GraphInner>,
    _not_send: super::NotSend,
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
            _not_send: PhantomData,
        }
    }

    /// The graph, for reading between mutations.
    pub fn graph(&self) -> GraphView<'_, GlobalState> {
        // SAFETY: `&self` excludes the `&mut self` every mutation needs, and
        // we are the only writer, on the main-loop thread.
        unsafe { GraphView::new(self.graph) }
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
/// `MainCx::write` future is cancelled).
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
