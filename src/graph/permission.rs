//! Permission propagation and conflict checks (QEMU's `bdrv_check_perm`,
//! `bdrv_child_perm`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::graph::edge::{ParentLink, Perm, Permissions};
use crate::graph::node::NodeInner;
use crate::graph::GraphInner;

/// Every user of `node` with what it takes and shares.
///
/// # Safety
///
/// The caller holds a read proof (or is the writer, outside any `get_mut`).
pub(crate) unsafe fn incoming_edges(node: &Arc<NodeInner>) -> Vec<(String, Permissions)> {
    // SAFETY: by the caller's contract.
    let links = unsafe { node.parents.get() };
    links
        .iter()
        .map(|link| match link {
            ParentLink::Node { parent, role } => {
                // SAFETY: by the caller's contract.
                let edges = unsafe { parent.children.get() };
                let perms = edges
                    .iter()
                    .find(|e| e.role == *role && Arc::ptr_eq(&e.child, node))
                    .map(|e| e.perms)
                    .unwrap_or(Permissions::UNRESTRICTED);
                (format!("node '{}'", parent.name), perms)
            }
            ParentLink::Backend(b) => (format!("backend '{}'", b.name), b.perms),
        })
        .collect()
}

/// What all users of `node` take together, and what all of them share.
///
/// # Safety
///
/// As for [`incoming_edges`].
pub(crate) unsafe fn incoming(node: &Arc<NodeInner>) -> Permissions {
    // SAFETY: by the caller's contract.
    unsafe { incoming_edges(node) }
        .into_iter()
        .fold(Permissions::UNRESTRICTED, |acc, (_, p)| Permissions {
            take: acc.take | p.take,
            share: acc.share & p.share,
        })
}

/// Recomputes every edge's permissions top-down and checks every node for
/// conflicts and the graph for cycles.
///
/// # Safety
///
/// Inside a write section on the main-loop thread, with no reference into
/// any node's `children` or `parents` alive.
pub(crate) unsafe fn recompute_and_check(graph: &GraphInner) -> Result<()> {
    // SAFETY: writer, no other reference alive (caller's contract).
    let nodes = unsafe { graph.nodes.get() }.clone();
    let index: HashMap<*const NodeInner, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (Arc::as_ptr(n), i))
        .collect();

    // Kahn's algorithm over node-to-node edges: parents before children.
    let mut pending_parents = vec![0usize; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        // SAFETY: as above.
        let links = unsafe { node.parents.get() };
        pending_parents[i] = links
            .iter()
            .filter(|l| matches!(l, ParentLink::Node { .. }))
            .count();
    }
    let mut ready: Vec<usize> = (0..nodes.len())
        .filter(|&i| pending_parents[i] == 0)
        .collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        let node = &nodes[i];
        // SAFETY: as above; the shared borrow ends before `get_mut` below.
        let from_above = unsafe { incoming(node) };
        // SAFETY: as above; no other reference into this vector is alive.
        let edges = unsafe { node.children.get_mut() };
        for edge in edges.iter_mut() {
            edge.perms = node.driver.child_permissions(edge.role, from_above);
        }
        let children: Vec<Arc<NodeInner>> = edges.iter().map(|e| e.child.clone()).collect();
        for child in children {
            if let Some(&c) = index.get(&Arc::as_ptr(&child)) {
                pending_parents[c] -= 1;
                if pending_parents[c] == 0 {
                    ready.push(c);
                }
            }
        }
    }
    if done != nodes.len() {
        // Some node still waits for a parent: it lies on a cycle.
        let (i, _) = pending_parents
            .iter()
            .enumerate()
            .find(|(_, &p)| p > 0)
            .expect("a node with pending parents exists");
        // SAFETY: as above.
        let links = unsafe { nodes[i].parents.get() };
        let parent = links
            .iter()
            .find_map(|l| match l {
                ParentLink::Node { parent, .. } => Some(parent.name.clone()),
                ParentLink::Backend(_) => None,
            })
            .unwrap_or_default();
        return Err(Error::Cycle {
            parent,
            child: nodes[i].name.clone(),
        });
    }

    for node in &nodes {
        // SAFETY: as above.
        let users = unsafe { incoming_edges(node) };
        for (a, (who_a, pa)) in users.iter().enumerate() {
            for (b, (who_b, pb)) in users.iter().enumerate() {
                if a == b {
                    continue;
                }
                let clash = pa.take & !pb.share;
                if clash != Perm::NONE {
                    return Err(Error::PermissionConflict {
                        node: node.name.clone(),
                        detail: format!("{who_a} takes {clash}, which {who_b} does not share"),
                    });
                }
            }
        }
    }
    Ok(())
}
