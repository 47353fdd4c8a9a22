//! Structured queries (QEMU's `query-named-block-nodes`, `query-block`,
//! `query-blockstats`): the graph as plain values, read on the main loop
//! with the `Bql`'s read token, detached from the graph afterwards.
//!
//! The job list (QEMU's `query-block-jobs`) belongs beside these, as
//! `Bql::query_jobs`, with the job module; its values go in
//! `types::info` next to [`NodeInfo`] and [`BackendInfo`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::graph::callbacks;
use crate::graph::cell::ReadAccess;
use crate::graph::edge::ParentLink;
use crate::graph::node::NodeInner;
use crate::graph::GraphInner;
use crate::types::{BackendInfo, ChildInfo, ChildRole, NodeInfo};

/// Every node, in the order they joined the graph.
pub(crate) fn nodes(graph: &GraphInner, access: ReadAccess<'_>) -> Vec<NodeInfo> {
    graph
        .nodes
        .get(access)
        .iter()
        .map(|n| node(n, access))
        .collect()
}

fn node(n: &Arc<NodeInner>, access: ReadAccess<'_>) -> NodeInfo {
    let driver_info = n.driver.info();
    let mut backing_chain = Vec::new();
    let mut at = n.clone();
    // Bounded by the node count: the graph has no cycles.
    while let Some(e) = at
        .children
        .get(access)
        .iter()
        .find(|e| e.role == ChildRole::Backing)
    {
        let next = e.child.clone();
        backing_chain.push(next.name.clone());
        at = next;
    }
    NodeInfo {
        name: n.name.clone(),
        driver: n.driver.format_name().to_owned(),
        description: n.driver.describe(),
        size: driver_info.size,
        read_only: callbacks::is_read_only(n, access),
        backing_chain,
        children: n
            .children
            .get(access)
            .iter()
            .map(|e| ChildInfo {
                role: e.role.to_string(),
                node: e.child.name.clone(),
                take: e.perms.take.to_string(),
                share: e.perms.share.to_string(),
            })
            .collect(),
        parents: n
            .parents
            .get(access)
            .iter()
            .map(ParentLink::describe)
            .collect(),
        in_flight: n.requests_in_flight(),
        drain_count: n.quiesce.load(Ordering::SeqCst),
        driver_info,
        dirty_bitmaps: n.bitmaps.infos(),
    }
}

/// Every backend, in the order they joined the graph.
pub(crate) fn backends(graph: &GraphInner, access: ReadAccess<'_>) -> Vec<BackendInfo> {
    graph
        .backends
        .get(access)
        .iter()
        .map(|b| BackendInfo {
            name: b.name.clone(),
            root: b.root.get(access).as_ref().map(|r| r.name.clone()),
            take: b.perms.take.to_string(),
            share: b.perms.share.to_string(),
            quiesced: b.quiesced.load(Ordering::SeqCst),
            in_flight: b.in_flight.load(Ordering::SeqCst),
            queued_requests: b.queued.load(Ordering::Relaxed),
            stats: b.stats.snapshot(),
        })
        .collect()
}
