//! Permission propagation and conflict checks (QEMU's `bdrv_check_perm`,
//! `bdrv_child_perm`), limited to the part of the graph a mutation touched.

use std::collections::HashMap;
use std::sync::Arc;

use crate::graph::callbacks;
use crate::graph::cell::ReadAccess;
use crate::graph::edge::ParentLink;
use crate::graph::node::NodeInner;
use crate::types::{Error, Result};
use crate::types::{Perm, Permissions};

/// Every user of `node` with what it takes and shares.
pub(crate) fn incoming_edges(
    node: &Arc<NodeInner>,
    access: ReadAccess<'_>,
) -> Vec<(String, Permissions)> {
    node.parents
        .get(access)
        .iter()
        .map(|link| match link {
            ParentLink::Node { parent, role } => {
                let perms = parent
                    .children
                    .get(access)
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
pub(crate) fn incoming(node: &Arc<NodeInner>, access: ReadAccess<'_>) -> Permissions {
    incoming_edges(node, access)
        .into_iter()
        .fold(Permissions::UNRESTRICTED, |acc, (_, p)| Permissions {
            take: acc.take | p.take,
            share: acc.share & p.share,
        })
}

/// The nodes whose edges' permissions a mutation may have changed: the
/// `seeds` (nodes whose own edge lists changed) and everything below them,
/// in an order where every node comes after its parents within the set.
///
/// A cycle made by the mutation goes through one of its new edges, whose
/// both ends are seeds, so it lies inside the set and is found here.
pub(crate) fn affected_in_order(
    seeds: &[Arc<NodeInner>],
    access: ReadAccess<'_>,
) -> Result<Vec<Arc<NodeInner>>> {
    // Everything reachable downwards from the seeds.
    let mut set: Vec<Arc<NodeInner>> = Vec::new();
    let mut index: HashMap<*const NodeInner, usize> = HashMap::new();
    let mut stack: Vec<Arc<NodeInner>> = seeds.to_vec();
    while let Some(node) = stack.pop() {
        if index.contains_key(&Arc::as_ptr(&node)) {
            continue;
        }
        index.insert(Arc::as_ptr(&node), set.len());
        for edge in node.children.get(access) {
            if !index.contains_key(&Arc::as_ptr(&edge.child)) {
                stack.push(edge.child.clone());
            }
        }
        set.push(node);
    }

    // Kahn's algorithm inside the set: parents before children.
    let mut pending = vec![0usize; set.len()];
    for (i, node) in set.iter().enumerate() {
        pending[i] = node
            .parents
            .get(access)
            .iter()
            .filter(|l| match l {
                ParentLink::Node { parent, .. } => index.contains_key(&Arc::as_ptr(parent)),
                ParentLink::Backend(_) => false,
            })
            .count();
    }
    let mut ready: Vec<usize> = (0..set.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(set.len());
    while let Some(i) = ready.pop() {
        let node = set[i].clone();
        for edge in node.children.get(access) {
            // One decrement per edge, as there is one parent link per edge
            // (a node using one child in two roles has two of each).
            if let Some(&c) = index.get(&Arc::as_ptr(&edge.child)) {
                pending[c] -= 1;
                if pending[c] == 0 {
                    ready.push(c);
                }
            }
        }
        order.push(node);
    }
    if order.len() != set.len() {
        // Some node still waits for a parent: it lies on a cycle.
        let (i, _) = pending
            .iter()
            .enumerate()
            .find(|(_, &p)| p > 0)
            .expect("a node with pending parents exists");
        let parent = set[i]
            .parents
            .get(access)
            .iter()
            .find_map(|l| match l {
                ParentLink::Node { parent, .. } if index.contains_key(&Arc::as_ptr(parent)) => {
                    Some(parent.name.clone())
                }
                _ => None,
            })
            .unwrap_or_default();
        return Err(Error::Cycle {
            parent,
            child: set[i].name.clone(),
        });
    }
    Ok(order)
}

/// The permissions `node`'s driver wants on each of its edges, given what
/// its users take and share now. Calls the driver: needs a read token, so
/// no `&mut` into the graph can be alive meanwhile.
pub(crate) fn wanted_child_permissions(
    node: &Arc<NodeInner>,
    access: ReadAccess<'_>,
) -> Vec<Permissions> {
    let from_above = incoming(node, access);
    node.children
        .get(access)
        .iter()
        .map(|e| callbacks::child_permissions(node, e.role, from_above, access))
        .collect()
}

/// Checks that no user of `node` takes what another does not share.
pub(crate) fn check_conflicts(node: &Arc<NodeInner>, access: ReadAccess<'_>) -> Result<()> {
    let users = incoming_edges(node, access);
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
    Ok(())
}

/// Checks that no user of a read-only `node` takes a permission that
/// changes its data (QEMU's "Block node is read-only" in
/// `bdrv_node_check_perm`: `WRITE` and `WRITE_UNCHANGED`; a resize of a
/// read-only node is refused by its driver, as in QEMU).
pub(crate) fn check_read_only(node: &Arc<NodeInner>, access: ReadAccess<'_>) -> Result<()> {
    if !callbacks::is_read_only(node, access) {
        return Ok(());
    }
    let writes = Perm::WRITE | Perm::WRITE_UNCHANGED;
    for (who, perms) in incoming_edges(node, access) {
        let clash = perms.take & writes;
        if !clash.is_empty() {
            return Err(Error::PermissionConflict {
                node: node.name.clone(),
                detail: format!("{who} takes {clash}, but the node is read-only"),
            });
        }
    }
    Ok(())
}
