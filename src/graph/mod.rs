//! The graph: nodes, edges, permissions, and the transactions that change
//! them.

pub(crate) mod backend;
pub(crate) mod callbacks;
pub(crate) mod cell;
pub(crate) mod dirty_bitmap;
mod dot;
pub(crate) mod drain;
pub(crate) mod driver;
pub(crate) mod edge;
pub(crate) mod mutation;
pub(crate) mod node;
pub(crate) mod permission;
pub(crate) mod proof;
pub(crate) mod query;
pub(crate) mod runtime;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::ThreadId;

use crate::sync::GraphLock;
use backend::BackendInner;
use cell::{GraphCell, MainCell};
use drain::Section;
use node::NodeInner;

/// Everything the graph is made of. One per [`crate::MainLoop`].
pub(crate) struct GraphInner {
    pub(crate) lock: GraphLock,
    pub(crate) nodes: GraphCell<Vec<Arc<NodeInner>>>,
    pub(crate) backends: GraphCell<Vec<Arc<BackendInner>>>,
    /// Every node and backend name in the graph (they share one namespace),
    /// so a mutation checks a name without walking the graph.
    pub(crate) names: GraphCell<HashSet<String>>,
    pub(crate) main: MainCell<MainState>,
    /// The group of mutations open through `GraphWriter::transaction`
    /// (only inside a write section).
    pub(crate) group: GraphCell<Option<mutation::Group>>,
    pub(crate) mutations: AtomicU64,
    /// Bumped whenever a node's length may have changed: by every committed
    /// mutation and by [`NodeRef::notify_length_changed`]. Backends cache
    /// their root's length per epoch.
    pub(crate) size_epoch: Arc<AtomicU64>,
}

/// Main-loop-only bookkeeping.
#[derive(Default)]
pub(crate) struct MainState {
    pub(crate) sections: BTreeMap<u64, Section>,
    pub(crate) next_section: u64,
    /// Write sections running now (0 or 1): a drain may not start inside
    /// one.
    pub(crate) in_write_section: u32,
}

impl GraphInner {
    pub(crate) fn new(main_thread: ThreadId) -> Self {
        GraphInner {
            lock: GraphLock::default(),
            nodes: GraphCell::new(Vec::new()),
            backends: GraphCell::new(Vec::new()),
            names: GraphCell::new(HashSet::new()),
            main: MainCell::new(main_thread, MainState::default()),
            group: GraphCell::new(None),
            mutations: AtomicU64::new(0),
            size_epoch: Arc::new(AtomicU64::new(0)),
        }
    }
}
