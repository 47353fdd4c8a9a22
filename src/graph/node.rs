//! Nodes (QEMU's `BlockDriverState`) and the handles user code keeps.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::driver::BlockDriver;
use crate::graph::cell::GraphCell;
use crate::graph::edge::{Edge, ParentLink};
use crate::graph::GraphInner;
use crate::proof::{Bql, GsRef, IoRef, NodeRef, ReadGuard};
use crate::sync::WaitList;
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
    /// Requests admitted directly on this node under a read guard (not
    /// through a backend) and not finished yet: QEMU's `bs->in_flight` for
    /// requests that enter the graph here. Requests a driver passes down to
    /// its children are covered by the request that entered above them.
    ///
    /// The top bit ([`NodeInner::QUIESCED`]) is up while a drain section
    /// covers the node: one word, so a request's one RMW both counts it and
    /// sees the drain, and the drain's one RMW both raises the bit and sees
    /// every request counted before it (a single location's modification
    /// order is total).
    pub(crate) in_flight: CachePadded<AtomicUsize>,
    /// Drains waiting for `in_flight` to reach zero.
    pub(crate) idle: WaitList,
}

impl NodeInner {
    pub(crate) fn new(
        name: &str,
        driver: Box<dyn BlockDriver>,
        graph: &std::sync::Arc<GraphInner>,
    ) -> Self {
        NodeInner {
            name: name.to_owned(),
            driver,
            graph: std::sync::Arc::downgrade(graph),
            children: GraphCell::new(Vec::new()),
            parents: GraphCell::new(Vec::new()),
            quiesce: AtomicU32::new(0),
            drained: AtomicU32::new(0),
            in_graph: AtomicBool::new(false),
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            idle: WaitList::default(),
        }
    }

    /// The bit of `in_flight` that says a drain section covers the node.
    pub(crate) const QUIESCED: usize = 1 << (usize::BITS - 1);

    pub(crate) fn is_in_graph(&self) -> bool {
        self.in_graph.load(Ordering::Acquire)
    }

    /// Requests that entered here and are still in flight.
    #[inline]
    pub(crate) fn requests_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst) & !Self::QUIESCED
    }

    /// Whether this node belongs to `graph`.
    #[inline]
    pub(crate) fn belongs_to(&self, graph: &GraphInner) -> bool {
        std::ptr::eq(self.graph.as_ptr(), graph)
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
    pub fn try_io<'r>(&'r self, guard: &'r ReadGuard<'_>) -> crate::Result<IoRef<'r>> {
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
