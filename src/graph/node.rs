//! Nodes (QEMU's `BlockDriverState`) and the handles user code keeps.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::driver::BlockDriver;
use crate::graph::cell::GraphCell;
use crate::graph::edge::{Edge, ParentLink};
use crate::graph::GraphInner;
use crate::proof::{Bql, GsRef, IoRef, NodeRef, ReadGuard};
use std::sync::{Arc, Weak};

/// A node's storage. Reached from user code only through a proof
/// ([`NodeRef`]); [`NodeHandle`] keeps it alive but cannot look inside.
pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) driver: Box<dyn BlockDriver>,
    pub(crate) graph: Weak<GraphInner>,
    pub(crate) children: GraphCell<Vec<Edge>>,
    pub(crate) parents: GraphCell<Vec<ParentLink>>,
    /// Drain sections covering this node (changed on the main loop only).
    pub(crate) quiesce: AtomicU32,
    /// Drain sections covering this node whose wait has completed: while
    /// non-zero no request may reach the node.
    pub(crate) drained: AtomicU32,
    /// Still part of the graph (cleared by removal).
    pub(crate) in_graph: AtomicBool,
}

impl NodeInner {
    pub(crate) fn is_in_graph(&self) -> bool {
        self.in_graph.load(Ordering::Acquire)
    }
}

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
/// use blockgraph::{MainLoop, drivers::NullDriver};
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
    pub fn gs<'b>(&'b self, bql: &'b Bql) -> GsRef<'b> {
        bql.check_graph(&self.0);
        // SAFETY: the `&'b Bql` borrow proves we are on the main-loop thread
        // and that no mutation (which needs `&mut Bql`) can run during 'b.
        unsafe { NodeRef::new(&self.0) }
    }

    /// The node seen from I/O code, valid while `guard` stays borrowed.
    pub fn io<'r>(&'r self, guard: &'r ReadGuard<'_>) -> IoRef<'r> {
        guard.check_graph(&self.0);
        // SAFETY: the read guard keeps the graph read-locked for 'r.
        unsafe { NodeRef::new(&self.0) }
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
