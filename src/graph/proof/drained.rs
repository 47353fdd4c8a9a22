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
    pub(crate) node: Arc<NodeInner>,
    pub(crate) section: u64,
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
        &self.state.node.name
    }

    pub(crate) fn state(&self) -> &DrainedState {
        &self.state
    }

    pub(crate) fn node(&self) -> &Arc<NodeInner> {
        &self.state.node
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
            .field("node", &self.state.node.name)
            .finish()
    }
}
