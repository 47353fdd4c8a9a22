//! Edges between nodes (QEMU's `BdrvChild`): a parent's link to its child
//! and the child's record of its parent.

use crate::types::{ChildRole, Permissions};

use crate::graph::backend::BackendInner;
use crate::graph::node::NodeInner;
use std::sync::Arc;

/// A child edge as stored in its parent.
#[derive(Clone)]
pub(crate) struct Edge {
    pub(crate) role: ChildRole,
    pub(crate) child: Arc<NodeInner>,
    pub(crate) perms: Permissions,
}

/// A parent as recorded in its child.
#[derive(Clone)]
pub(crate) enum ParentLink {
    /// A node that has this node as its `role` child.
    Node {
        parent: Arc<NodeInner>,
        role: ChildRole,
    },
    /// A backend whose root this node is.
    Backend(Arc<BackendInner>),
}

impl ParentLink {
    pub(crate) fn describe(&self) -> String {
        match self {
            ParentLink::Node { parent, role } => format!("node '{}' (as {role})", parent.name),
            ParentLink::Backend(b) => format!("backend '{}'", b.name),
        }
    }
}
