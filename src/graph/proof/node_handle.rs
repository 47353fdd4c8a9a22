//! [`NodeHandle`]: a name for a node that proofs turn into a view of it.

use std::fmt;
use std::sync::Arc;

use crate::graph::node::NodeInner;
use crate::graph::proof::{Bql, GsRef, IoRef, NodeRef, ReadGuard};

/// A refcounted name for a node: keeps the node alive, reveals nothing.
///
/// This is what embedder code stores (in a device model, a job, a table of
/// disks). It is `Send + Sync` and `'static`, and it cannot reach the node's
/// state, children or parents by itself: turn it into a [`GsRef`] with
/// [`NodeHandle::gs`] on the main loop, or into an [`IoRef`] with
/// [`NodeHandle::io`] under a read guard.
///
/// A handle may outlive the node's membership in the graph: after the node
/// is removed, proofs made from the handle show a node with no edges, and
/// [`NodeRef::is_in_graph`] is `false`.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::NullDriver, MainLoop};
///
/// let main = MainLoop::new()?;
/// let handle = main.run(|bql| {
///     bql.write(|w| w.add_node("null0", NullDriver::new(1 << 20), &[]))
/// })?;
/// let name = main.run(move |bql| handle.gs(bql).name().to_owned());
/// assert_eq!(name, "null0");
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Clone)]
pub struct NodeHandle(pub(crate) Arc<NodeInner>);

impl NodeHandle {
    /// The node's name (names never change, so no proof is needed).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The node seen from main-loop code, valid while `bql` stays borrowed.
    ///
    /// # Panics
    ///
    /// If the node belongs to another main loop's graph (rule 16: a proof
    /// of one graph never reaches into another).
    pub fn gs<'b>(&'b self, bql: &'b Bql) -> GsRef<'b> {
        bql.check_graph(&self.0);
        // SAFETY: the node belongs to the `Bql`'s graph (checked above), and
        // the token is that graph's.
        unsafe { NodeRef::new(&self.0, bql.access()) }
    }

    /// The node seen from I/O code, valid while `guard` stays borrowed.
    ///
    /// # Panics
    ///
    /// If the node belongs to another main loop's graph (rule 16); use
    /// [`NodeHandle::try_io`] to get an [`Error`](crate::Error) instead.
    pub fn io<'r>(&'r self, guard: &'r ReadGuard<'_>) -> IoRef<'r> {
        match self.try_io(guard) {
            Ok(node) => node,
            Err(e) => panic!("blockgraph: {e}"),
        }
    }

    /// The node seen from I/O code, or [`Error::WrongGraph`](crate::Error::WrongGraph)
    /// if `guard` read-locks another main loop's graph (its lock does not
    /// keep this node's graph from changing).
    pub fn try_io<'r>(&'r self, guard: &'r ReadGuard<'_>) -> crate::types::Result<IoRef<'r>> {
        if !self.0.belongs_to(guard.graph_inner()) {
            return Err(crate::Error::WrongGraph {
                what: format!("node '{}'", self.0.name),
            });
        }
        // SAFETY: the node belongs to the guard's graph (checked above), and
        // the token is that graph's read lock.
        Ok(unsafe { NodeRef::new(&self.0, guard.access()) })
    }

    /// Whether two handles name the same node.
    pub fn ptr_eq(&self, other: &NodeHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NodeHandle").field(&self.0.name).finish()
    }
}
