//! Drain sections (QEMU's `bdrv_drained_begin()` / `bdrv_drained_end()`).
//!
//! A section records exactly which nodes and backends it quiesced. Draining
//! a node quiesces it and every user above it, up to the backends (which
//! then queue new requests); the section then waits until those backends
//! have nothing in flight. Counts live on the nodes and backends, so nested
//! and overlapping sections add up and callbacks fire on the 0↔1
//! transitions only.
//!
//! When the graph changes under an active section, [`cover_new_edges`]
//! extends it: a new parent of a covered node is covered too (a drained node
//! never receives a request), and a child attached under a covered parent
//! starts covered. Ending the section undoes exactly what it recorded,
//! whatever happened to the graph in between.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use crate::backend::BackendInner;
use crate::graph::edge::ParentLink;
use crate::graph::node::NodeInner;
use crate::graph::{GraphInner, Section};
use crate::proof::{DrainedState, NodeRef};
use crate::runtime::BqlScope;

/// A new edge made by a committed mutation: `parent` now uses `child`.
pub(crate) enum NewEdge {
    Node {
        parent: Arc<NodeInner>,
        child: Arc<NodeInner>,
    },
    Backend {
        backend: Arc<BackendInner>,
        root: Arc<NodeInner>,
    },
}

/// Begins a section on `node`: quiesces it and everything above it.
pub(crate) fn begin(graph: &Arc<GraphInner>, node: &Arc<NodeInner>) -> DrainedState {
    let _scope = BqlScope::enter_if_idle();
    let mut began = Vec::new();
    let section = graph.main.with(|state| {
        let id = state.next_section;
        state.next_section += 1;
        let mut section = Section::default();
        cover_node(&mut section, node, &mut began);
        state.sections.insert(id, section);
        id
    });
    fire_drained_begin(&began);
    DrainedState {
        graph: graph.clone(),
        node: node.clone(),
        section,
    }
}

/// Waits until no backend the section quiesced has a request in flight.
///
/// Requests in flight hold the read lock and never wait for the main loop,
/// so this never waits for the main loop itself.
pub(crate) async fn wait(state: &DrainedState) {
    poll_fn(|cx| {
        let backends = state.graph.main.with(|s| {
            s.sections
                .get(&state.section)
                .map(|sec| sec.backends.clone())
                .unwrap_or_default()
        });
        for backend in &backends {
            backend.idle.register(cx.waker());
            if backend.in_flight.load(Ordering::SeqCst) != 0 {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    })
    .await
}

/// Marks the section's nodes drained: from now on no request reaches them.
pub(crate) fn finish_wait(state: &DrainedState) {
    state.graph.main.with(|s| {
        if let Some(sec) = s.sections.get_mut(&state.section) {
            sec.waited = true;
            for node in &sec.nodes {
                node.drained.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
}

/// Ends the section: undoes exactly what it did, resumes queued requests
/// where this was the last section.
pub(crate) fn end(state: &DrainedState) {
    let _scope = BqlScope::enter_if_idle();
    let Some(section) = state.graph.main.with(|s| s.sections.remove(&state.section)) else {
        return;
    };
    let mut ended = Vec::new();
    for node in section.nodes.iter().rev() {
        if section.waited {
            node.drained.fetch_sub(1, Ordering::SeqCst);
        }
        if node.quiesce.fetch_sub(1, Ordering::SeqCst) == 1 {
            ended.push(node.clone());
        }
    }
    for backend in &section.backends {
        if backend.quiesce.fetch_sub(1, Ordering::SeqCst) == 1 {
            backend.quiesced.store(false, Ordering::SeqCst);
            backend.resume.wake_all();
        }
    }
    for node in ended {
        if node.is_in_graph() {
            // SAFETY: main-loop thread (the section is `!Send` and ends where
            // it began) with the Bql scope held, so no mutation runs during
            // the callback, which only gets a read-only `GsRef`.
            let gs = unsafe { NodeRef::new(&node) };
            node.driver.drained_end(gs);
        }
    }
}

/// Extends every active section over edges a mutation just created.
///
/// Runs inside the write section (no request is executing), so newly
/// covered nodes of a section that has finished waiting are drained at once.
pub(crate) fn cover_new_edges(graph: &GraphInner, edges: &[NewEdge]) {
    if edges.is_empty() {
        return;
    }
    let mut began = Vec::new();
    graph.main.with(|state| {
        for section in state.sections.values_mut() {
            let mut changed = true;
            while changed {
                changed = false;
                for edge in edges {
                    match edge {
                        NewEdge::Node { parent, child } => {
                            let has_child = covers(section, child);
                            let has_parent = covers(section, parent);
                            if has_child && !has_parent {
                                cover_node(section, parent, &mut began);
                                changed = true;
                            } else if has_parent && !has_child {
                                cover_node(section, child, &mut began);
                                changed = true;
                            }
                        }
                        NewEdge::Backend { backend, root } => {
                            if covers(section, root)
                                && !section.backends.iter().any(|b| Arc::ptr_eq(b, backend))
                            {
                                cover_backend(section, backend);
                                changed = true;
                            }
                        }
                    }
                }
            }
        }
    });
    fire_drained_begin(&began);
}

fn covers(section: &Section, node: &Arc<NodeInner>) -> bool {
    section.nodes.iter().any(|n| Arc::ptr_eq(n, node))
}

fn cover_node(section: &mut Section, node: &Arc<NodeInner>, began: &mut Vec<Arc<NodeInner>>) {
    if covers(section, node) {
        return;
    }
    section.nodes.push(node.clone());
    if node.quiesce.fetch_add(1, Ordering::SeqCst) == 0 {
        began.push(node.clone());
    }
    if section.waited {
        node.drained.fetch_add(1, Ordering::SeqCst);
    }
    // SAFETY: main-loop thread, outside any `GraphCell::get_mut` (sections
    // are begun outside mutations and extended after a mutation's edits).
    let parents = unsafe { node.parents.get() }.clone();
    for link in &parents {
        match link {
            ParentLink::Node { parent, .. } => cover_node(section, parent, began),
            ParentLink::Backend(backend) => cover_backend(section, backend),
        }
    }
}

fn cover_backend(section: &mut Section, backend: &Arc<BackendInner>) {
    if section.backends.iter().any(|b| Arc::ptr_eq(b, backend)) {
        return;
    }
    section.backends.push(backend.clone());
    if backend.quiesce.fetch_add(1, Ordering::SeqCst) == 0 {
        backend.quiesced.store(true, Ordering::SeqCst);
    }
}

fn fire_drained_begin(nodes: &[Arc<NodeInner>]) {
    for node in nodes {
        // SAFETY: main-loop thread with the Bql scope held; the callback gets
        // a read-only `GsRef` and cannot reach a `Bql` to mutate the graph.
        let gs = unsafe { NodeRef::new(node) };
        node.driver.drained_begin(gs);
    }
}
