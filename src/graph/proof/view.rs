//! [`GraphView`] and [`BackendRef`]: the whole graph and its backends seen
//! under a proof.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::graph::backend::BackendInner;
use crate::graph::cell::ReadAccess;
use crate::graph::dot;
use crate::graph::proof::{NodeRef, Proof};
use crate::graph::GraphInner;
use crate::types::Permissions;

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
