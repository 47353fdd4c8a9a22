//! The graph: nodes, edges, permissions, and the transactions that change
//! them.

pub(crate) mod callbacks;
pub(crate) mod cell;
mod dot;
pub(crate) mod edge;
mod mutation;
pub(crate) mod node;
pub(crate) mod permission;

use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::ThreadId;

use crate::backend::BackendInner;
use crate::proof::{NodeRef, Proof};
use crate::sync::GraphLock;
use cell::{GraphCell, MainCell, ReadAccess};
use edge::Permissions;
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

/// One drain section: exactly the nodes and backends it quiesced, so that
/// ending it undoes exactly that, whatever the graph looks like by then.
#[derive(Default)]
pub(crate) struct Section {
    pub(crate) nodes: Vec<Arc<NodeInner>>,
    pub(crate) backends: Vec<Arc<BackendInner>>,
    /// The wait for requests in flight has completed.
    pub(crate) waited: bool,
}

impl GraphInner {
    pub(crate) fn new(main_thread: ThreadId) -> Self {
        GraphInner {
            lock: GraphLock::default(),
            nodes: GraphCell::new(Vec::new()),
            backends: GraphCell::new(Vec::new()),
            names: GraphCell::new(HashSet::new()),
            main: MainCell::new(main_thread, MainState::default()),
            mutations: AtomicU64::new(0),
            size_epoch: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// The whole graph seen under a proof `P` (from [`crate::Bql::graph`],
/// [`crate::ReadGuard::graph`] or [`crate::GraphWriter::graph`]).
pub struct GraphView<'a, P: Proof> {
    graph: &'a GraphInner,
    access: ReadAccess<'a>,
    _proof: PhantomData<P>,
}

impl<P: Proof> Clone for GraphView<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P: Proof> Copy for GraphView<'_, P> {}

impl<'a, P: Proof> GraphView<'a, P> {
    /// # Safety
    ///
    /// `access` was minted for `graph`, by the rule `P` stands for.
    pub(crate) unsafe fn new(graph: &'a GraphInner, access: ReadAccess<'a>) -> Self {
        GraphView {
            graph,
            access,
            _proof: PhantomData,
        }
    }

    /// Every node, in the order they were added.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = NodeRef<'a, P>> + 'a {
        let access = self.access;
        let nodes = self.graph.nodes.get(access);
        // SAFETY: the nodes of the graph `access` was minted for.
        nodes
            .iter()
            .map(move |n| unsafe { NodeRef::new(n, access) })
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<NodeRef<'a, P>> {
        self.nodes().find(|n| n.name() == name)
    }

    /// Every backend, in the order they were added.
    pub fn backends(&self) -> impl ExactSizeIterator<Item = BackendRef<'a, P>> + 'a {
        let access = self.access;
        let backends = self.graph.backends.get(access);
        backends.iter().map(move |b| BackendRef {
            inner: b,
            access,
            _proof: PhantomData,
        })
    }

    /// Number of graph mutations committed so far.
    pub fn mutation_count(&self) -> u64 {
        self.graph
            .mutations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The graph in Graphviz DOT: nodes with their drivers, edges with roles
    /// and permissions, backends as boxes.
    pub fn to_dot(&self) -> String {
        dot::render(*self)
    }
}

/// A backend seen under a proof.
pub struct BackendRef<'a, P: Proof> {
    inner: &'a Arc<BackendInner>,
    access: ReadAccess<'a>,
    _proof: PhantomData<P>,
}

impl<'a, P: Proof> BackendRef<'a, P> {
    /// The backend's name.
    pub fn name(&self) -> &'a str {
        &self.inner.name
    }

    /// The node the backend sends requests to, if it has one.
    pub fn root(&self) -> Option<NodeRef<'a, P>> {
        let root = self.inner.root.get(self.access);
        // SAFETY: a backend's root belongs to the backend's graph, which
        // `access` was minted for.
        root.as_ref()
            .map(|r| unsafe { NodeRef::new(r, self.access) })
    }

    /// What the backend takes and shares on its root.
    pub fn permissions(&self) -> Permissions {
        self.inner.perms
    }
}
