//! Nodes (QEMU's `BlockDriverState`) and the handles user code keeps.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::graph::cell::GraphCell;
use crate::graph::dirty_bitmap::NodeBitmaps;
use crate::graph::driver::BlockDriver;
use crate::graph::edge::{Edge, ParentLink};
use crate::graph::GraphInner;
use crate::sync::WaitList;
use std::sync::Weak;

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
    /// Its dirty bitmaps (DESIGN §15).
    pub(crate) bitmaps: NodeBitmaps,
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
            bitmaps: NodeBitmaps::default(),
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
