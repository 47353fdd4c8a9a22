//! [`Drained`], a drained section (QEMU's `bdrv_drained_begin()`/`end()`).

use std::marker::PhantomData;
use std::sync::Arc;

use crate::graph::drain;
use crate::graph::node::NodeInner;
use crate::graph::proof::NodeHandle;
use crate::graph::GraphInner;

/// Proof that no request can reach a node, and the section that keeps it so.
///
/// Made by [`Bql::drain`](crate::Bql::drain) or
/// [`MainTask::drain`](crate::MainTask::drain). While it lives, every user above
/// the node is quiesced (backends queue new requests) and nothing is in flight
/// on it. Dropping it ends the section: when the last section covering a
/// user ends, its queued requests resume.
///
/// It borrows the [`NodeHandle`] it was made from, so it cannot outlive it.
/// Graph mutations that disturb a node's users take its `&Drained`.
/// Sections nest and overlap; callbacks fire only on the first begin and the
/// last end. `!Send`: it ends on the main loop, where it began.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};
///
/// let main = MainLoop::new()?;
/// main.run(|bql| -> blockgraph::Result<()> {
///     let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))?;
///     let drained = bql.drain(&disk);
///     bql.write(|w| w.insert_filter(&drained, "filter0", PassthroughFilter::new()))?;
///     drop(drained); // requests resume, now through filter0
///     Ok(())
/// })?;
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[must_use = "the drain section ends as soon as this is dropped"]
pub struct Drained<'g> {
    state: Box<DrainedState>,
    _borrow: PhantomData<&'g NodeHandle>,
    _not_send: crate::thread::NotSend,
}

static_assertions::assert_not_impl_any!(Drained<'static>: Send, Sync);

/// What a section needs to end itself.
pub(crate) struct DrainedState {
    pub(crate) graph: Arc<GraphInner>,
    /// The drained node; `None` for [`DrainedAll`].
    pub(crate) node: Option<Arc<NodeInner>>,
    pub(crate) section: u64,
}

impl DrainedState {
    /// What the section drains, for reports.
    pub(crate) fn what(&self) -> String {
        match &self.node {
            Some(n) => format!("node '{}'", n.name),
            None => "every node (drain_all)".to_owned(),
        }
    }
}

impl<'g> Drained<'g> {
    pub(crate) fn new(state: DrainedState) -> Self {
        Drained {
            state: Box::new(state),
            _borrow: PhantomData,
            _not_send: PhantomData,
        }
    }

    /// Name of the drained node.
    pub fn name(&self) -> &str {
        &self.node().name
    }

    /// Flushes the drained node from a task on `io` and waits for it (QEMU
    /// flushes inside drained sections, e.g. in `bdrv_reopen_prepare`).
    ///
    /// It is a flush *to close*
    /// ([`BlockDriver::flush_to_close`](crate::driver::BlockDriver::flush_to_close)):
    /// what a driver keeps until its image is closed is written too (qcow2
    /// stores its persistent dirty bitmaps), because a drain section's owner
    /// flushes before removing the node or making it read-only.
    ///
    /// The section keeps the node's users out; its owner may still write
    /// back what the node caches, which is what a qcow2 node must do before
    /// it becomes read-only ([`GraphWriter::set_read_only`](crate::GraphWriter::set_read_only)).
    /// The flush is one request entering at the node, counted like any
    /// other (another drain of the node waits for it). Await it outside any
    /// write section (a write section waits for it: it holds the read lock);
    /// from synchronous main-loop code use `bql.block_on(drained.flush(&io))`.
    ///
    /// # Errors
    ///
    /// The flush's own error; [`Error::WrongGraph`](crate::Error::WrongGraph)
    /// if `io` belongs to another main loop.
    ///
    /// # Panics
    ///
    /// Awaiting it panics if `io`'s thread shut down before the flush ran.
    pub fn flush(
        &self,
        io: &crate::IoThread,
    ) -> impl std::future::Future<Output = crate::Result<()>> + '_ {
        let node = self.node().clone();
        let task = io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            if !node.belongs_to(guard.graph_inner()) {
                return Err(crate::Error::WrongGraph {
                    what: format!("drained node '{}'", node.name),
                });
            }
            // SAFETY: the node belongs to the graph whose read lock `guard`
            // holds (checked just above).
            let node_ref: crate::IoRef<'_> =
                unsafe { crate::graph::proof::NodeRef::new(&node, guard.access()) };
            node_ref.flush_for_drain_owner().await
        });
        async move {
            let _section = self;
            task.await
        }
    }

    pub(crate) fn state(&self) -> &DrainedState {
        &self.state
    }

    pub(crate) fn node(&self) -> &Arc<NodeInner> {
        self.state
            .node
            .as_ref()
            .expect("a Drained is made for one node")
    }

    pub(crate) fn graph(&self) -> &Arc<GraphInner> {
        &self.state.graph
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        drain::end(&self.state);
    }
}

impl std::fmt::Debug for Drained<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drained")
            .field("node", &self.node().name)
            .finish()
    }
}

/// Proof that no request can reach any node of the graph, and the section
/// that keeps it so (QEMU's `bdrv_drain_all_begin()`/`end()`).
///
/// Made by [`Bql::drain_all`](crate::Bql::drain_all) or
/// [`MainTask::drain_all`](crate::MainTask::drain_all). While it lives,
/// every node and every backend of the graph is quiesced (backends queue new
/// requests) and nothing is in flight; nodes added meanwhile start drained,
/// as QEMU's do during a drain-all. Dropping it ends the section.
///
/// Mutations want a [`Drained`] for the node they disturb:
/// [`DrainedAll::drained`] lends one for any node it covers without
/// waiting again. `!Send`: it ends on the main loop, where it began.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};
///
/// let main = MainLoop::new()?;
/// main.run(|bql| -> blockgraph::Result<()> {
///     let a = bql.write(|w| w.add_node("a", MemoryDriver::new(4096), &[]))?;
///     let b = bql.write(|w| w.add_node("b", MemoryDriver::new(4096), &[]))?;
///     let all = bql.drain_all();
///     let (da, db) = (all.drained(&a)?, all.drained(&b)?);
///     bql.write(|w| w.transaction(|w| {
///         w.insert_filter(&da, "fa", PassthroughFilter::new())?;
///         w.insert_filter(&db, "fb", PassthroughFilter::new())?;
///         Ok(())
///     }))?;
///     Ok(())
/// })?;
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[must_use = "the drain section ends as soon as this is dropped"]
pub struct DrainedAll {
    state: Box<DrainedState>,
    _not_send: crate::thread::NotSend,
}

static_assertions::assert_not_impl_any!(DrainedAll: Send, Sync);

impl DrainedAll {
    pub(crate) fn new(state: DrainedState) -> Self {
        DrainedAll {
            state: Box::new(state),
            _not_send: PhantomData,
        }
    }

    pub(crate) fn state(&self) -> &DrainedState {
        &self.state
    }

    /// A [`Drained`] section of `node`, for mutations, without waiting:
    /// this section already keeps every request away from it and from
    /// everything above it. It nests inside this one and may outlive it.
    ///
    /// # Errors
    ///
    /// [`Error::WrongGraph`](crate::Error::WrongGraph) for a node of another
    /// graph; [`Error::InvalidArgument`](crate::Error::InvalidArgument) if
    /// this section does not cover the node (it left the graph and came
    /// back, which cannot happen: a removed node never returns).
    pub fn drained<'g>(&self, node: &'g NodeHandle) -> crate::Result<Drained<'g>> {
        if !node.0.belongs_to(&self.state.graph) {
            return Err(crate::Error::WrongGraph {
                what: format!("node '{}'", node.name()),
            });
        }
        if !drain::section_covers(&self.state, &node.0) {
            return Err(crate::Error::InvalidArgument(format!(
                "node '{}' is not covered by this drain_all section",
                node.name()
            )));
        }
        let drained = drain::begin(&self.state.graph, &node.0);
        // Everything the new section covers is covered by this one, which
        // has waited: nothing is in flight there, so the wait is immediate.
        futures::executor::block_on(drain::wait(drained.state()));
        drain::finish_wait(drained.state());
        Ok(drained)
    }
}

impl Drop for DrainedAll {
    fn drop(&mut self) {
        drain::end(&self.state);
    }
}

impl std::fmt::Debug for DrainedAll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainedAll").finish_non_exhaustive()
    }
}
