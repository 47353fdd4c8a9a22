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

/// Refuses a change that makes any path down the graph longer than
/// [`MAX_GRAPH_DEPTH`] nodes (the graph's depth rule; DESIGN §5).
///
/// A path that the change made longer runs through a seed (every new edge
/// has seeds at both ends), so only those are measured: a seed's height
/// (the longest path down from it) comes from `order`, which holds the
/// seeds and everything below them, children after parents; the longest
/// path down to it from above is walked upwards over its ancestors, which
/// the change did not touch except through seeds. Iterative, so that the
/// check itself needs no stack in proportion to the depth.
pub(crate) fn check_depth(
    seeds: &[Arc<NodeInner>],
    order: &[Arc<NodeInner>],
    access: ReadAccess<'_>,
) -> Result<()> {
    // Nodes above each seed (the longest path down to it, the seed left
    // out), memoised across seeds: a post-order walk over parent links.
    let mut above = Memo::default();
    let mut stack: Vec<(Arc<NodeInner>, bool)> = Vec::new();
    for seed in seeds {
        stack.push((seed.clone(), false));
        while let Some((node, parents_done)) = stack.pop() {
            let key = Arc::as_ptr(&node);
            if above.get(key).is_some() {
                continue;
            }
            let parents = node.parents.get(access).iter().filter_map(|l| match l {
                ParentLink::Node { parent, .. } => Some(parent),
                ParentLink::Backend(_) => None,
            });
            if parents_done {
                let depth = parents
                    .map(|p| above.get(Arc::as_ptr(p)).map_or(1, |a| a + 1))
                    .max()
                    .unwrap_or(0);
                above.insert(key, depth);
            } else {
                stack.push((node.clone(), true));
                for p in parents {
                    if above.get(Arc::as_ptr(p)).is_none() {
                        stack.push((p.clone(), false));
                    }
                }
            }
        }
    }
    // No path below a seed is longer than the set below the seeds: most
    // changes end here, without measuring heights.
    let most_above = seeds
        .iter()
        .map(|s| above.get(Arc::as_ptr(s)).unwrap_or(0))
        .max()
        .unwrap_or(0);
    if most_above + order.len() <= MAX_GRAPH_DEPTH {
        return Ok(());
    }
    // Heights, children first.
    let mut height: HashMap<*const NodeInner, usize> = HashMap::with_capacity(order.len());
    for node in order.iter().rev() {
        let below = node
            .children
            .get(access)
            .iter()
            .map(|e| height.get(&Arc::as_ptr(&e.child)).copied().unwrap_or(1))
            .max()
            .unwrap_or(0);
        height.insert(Arc::as_ptr(node), below + 1);
    }
    for seed in seeds {
        let key = Arc::as_ptr(seed);
        let depth = above.get(key).unwrap_or(0) + height.get(&key).copied().unwrap_or(1);
        if depth > MAX_GRAPH_DEPTH {
            return Err(Error::GraphTooDeep {
                node: seed.name.clone(),
                depth,
                max: MAX_GRAPH_DEPTH,
            });
        }
    }
    Ok(())
}

/// A memo of per-node values for [`check_depth`]: a vector while it is
/// small (a change usually has a handful of ancestors), a map beyond.
#[derive(Default)]
struct Memo {
    few: Vec<(*const NodeInner, usize)>,
    many: HashMap<*const NodeInner, usize>,
}

impl Memo {
    const FEW: usize = 32;

    fn get(&self, key: *const NodeInner) -> Option<usize> {
        if self.many.is_empty() {
            self.few.iter().find(|(k, _)| *k == key).map(|&(_, v)| v)
        } else {
            self.many.get(&key).copied()
        }
    }

    fn insert(&mut self, key: *const NodeInner, value: usize) {
        if self.many.is_empty() && self.few.len() < Self::FEW {
            self.few.push((key, value));
        } else {
            if self.many.is_empty() {
                self.many.extend(self.few.drain(..));
            }
            self.many.insert(key, value);
        }
    }
}

/// The most nodes a path down the graph may hold (a backend's root, every
/// filter and format layer, down to the protocol node at the bottom).
///
/// Each layer a request goes through nests the request's future and its
/// poll inside the layer above, on the stack of the thread that runs it,
/// and drains, flushes and queries walk the same way; past a depth the
/// thread's stack cannot hold, the process would abort with a stack
/// overflow. A mutation that would make the graph deeper is refused with
/// [`Error::GraphTooDeep`] and changes nothing.
///
/// The crate's own threads that run requests (`IoThread`s, the main loop,
/// NBD server threads) have 16 MiB stacks, which hold a chain of 1,024
/// qcow2 images (the heaviest built-in layer, about 9 KiB of stack each in
/// a debug build) in debug builds too. A request running on an embedder's
/// own runtime ([`IoContext::spawn_on`](crate::IoContext::spawn_on)) uses
/// that runtime's worker stacks: tokio's default 2 MiB holds 1,024
/// pass-through layers in a debug build, but not as many qcow2 images;
/// give the workers more (`thread_stack_size`) for deep chains. Real
/// chains are far shallower
/// ([`open_image_chain`](crate::drivers::qcow2::open_image_chain) follows
/// 16 backing files by default).
pub const MAX_GRAPH_DEPTH: usize = 1024;

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
