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

use std::collections::HashSet;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use crate::graph::backend::BackendInner;
use crate::graph::callbacks;
use crate::graph::cell::ReadAccess;
use crate::graph::edge::ParentLink;
use crate::graph::node::NodeInner;
use crate::graph::GraphInner;

use crate::graph::proof::{Drained, DrainedAll, DrainedState};
use crate::thread::BqlScope;

/// One drain section: exactly the nodes and backends it quiesced, so that
/// ending it undoes exactly that, whatever the graph looks like by then.
#[derive(Default)]
pub(crate) struct Section {
    pub(crate) nodes: Vec<Arc<NodeInner>>,
    pub(crate) backends: Vec<Arc<BackendInner>>,
    /// The addresses of `nodes` and `backends`, so that covering a node is
    /// O(1) and a drain costs what it covers, not its square. The `Arc`s in
    /// the vectors keep the addresses alive and unique.
    covered_nodes: HashSet<usize>,
    covered_backends: HashSet<usize>,
    /// The wait for requests in flight has completed.
    pub(crate) waited: bool,
    /// A drain-all section: nodes joining the graph join it too.
    pub(crate) all: bool,
}

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
///
/// The section exists (and ends when the returned proof is dropped) before
/// any `drained_begin` callback runs, so a callback that panics unwinds
/// through a `Drained` that ends the section again (rule 20).
///
/// # Panics
///
/// Inside a write section (rule 21: a drain waits for requests, which wait
/// for the write section to end).
pub(crate) fn begin<'g>(graph: &Arc<GraphInner>, node: &Arc<NodeInner>) -> Drained<'g> {
    let _scope = BqlScope::enter_if_idle();
    // SAFETY: main-loop thread (`MainCell::with` below panics elsewhere);
    // no write section is running (checked first thing inside `with`), so
    // no write token of this graph exists and the graph cannot change while
    // this function runs (it runs no user code until the callbacks, which
    // only get read-only `GsRef`s).
    let access = unsafe { ReadAccess::assume() };
    let mut began = Vec::new();
    let section = graph.main.with(|state| {
        assert!(
            state.in_write_section == 0,
            "blockgraph: a drain was started inside a write section (rule 21: drain before \
             Bql::write/MainTask::write, not inside it; inside, the drain would wait for requests \
             that wait for the write section)"
        );
        let id = state.next_section;
        state.next_section += 1;
        let mut section = Section::default();
        cover_node(&mut section, node, &mut began, access);
        state.sections.insert(id, section);
        id
    });
    let drained = Drained::new(DrainedState {
        graph: graph.clone(),
        node: Some(node.clone()),
        section,
    });
    fire_drained_begin(&began, access);
    drained
}

/// Begins a section on every node of the graph (QEMU's
/// `bdrv_drain_all_begin`): each node, hence every backend too. Nodes
/// added while it lives are covered as they join (`cover_new_nodes`).
///
/// # Panics
///
/// Inside a write section (rule 21), as [`begin`].
pub(crate) fn begin_all(graph: &Arc<GraphInner>) -> DrainedAll {
    let _scope = BqlScope::enter_if_idle();
    // SAFETY: as in `begin`.
    let access = unsafe { ReadAccess::assume() };
    let mut began = Vec::new();
    let section = graph.main.with(|state| {
        assert!(
            state.in_write_section == 0,
            "blockgraph: a drain was started inside a write section (rule 21: drain before \
             Bql::write/MainTask::write, not inside it; inside, the drain would wait for requests \
             that wait for the write section)"
        );
        let id = state.next_section;
        state.next_section += 1;
        let mut section = Section {
            all: true,
            ..Section::default()
        };
        for node in graph.nodes.get(access) {
            cover_node(&mut section, node, &mut began, access);
        }
        for backend in graph.backends.get(access) {
            cover_backend(&mut section, backend);
        }
        state.sections.insert(id, section);
        id
    });
    let drained = DrainedAll::new(DrainedState {
        graph: graph.clone(),
        node: None,
        section,
    });
    fire_drained_begin(&began, access);
    drained
}

/// Whether the section of `state` covers `node`.
pub(crate) fn section_covers(state: &DrainedState, node: &Arc<NodeInner>) -> bool {
    state.graph.main.with(|s| {
        s.sections
            .get(&state.section)
            .is_some_and(|sec| covers(sec, node))
    })
}

/// Covers nodes that just joined the graph in every drain-all section.
pub(crate) fn cover_new_nodes(
    graph: &GraphInner,
    nodes: &[Arc<NodeInner>],
    access: ReadAccess<'_>,
) {
    if nodes.is_empty() {
        return;
    }
    let mut began = Vec::new();
    graph.main.with(|state| {
        for section in state.sections.values_mut().filter(|s| s.all) {
            for node in nodes {
                cover_node(section, node, &mut began, access);
            }
        }
    });
    fire_drained_begin(&began, access);
}

/// Waits until nothing the section covers has a request in flight: no
/// backend it quiesced, and no node it covers where a request entered
/// directly (`IoRef` I/O). Requests passed down by drivers are part of a
/// request that entered above, at a covered node or backend.
///
/// Requests in flight hold the read lock and never wait for the main loop,
/// so this never waits for the main loop itself.
pub(crate) async fn wait(state: &DrainedState) {
    #[cfg(not(loom))]
    let mut slow = SlowDrain::default();
    poll_fn(|cx| {
        let (backends, nodes) = state.graph.main.with(|s| {
            s.sections
                .get(&state.section)
                .map(|sec| (sec.backends.clone(), sec.nodes.clone()))
                .unwrap_or_default()
        });
        let mut busy = false;
        for backend in &backends {
            backend.idle.register(cx.waker());
            if backend.in_flight.load(Ordering::SeqCst) != 0 {
                busy = true;
                break;
            }
        }
        if !busy {
            for node in &nodes {
                node.idle.register(cx.waker());
                if node.requests_in_flight() != 0 {
                    busy = true;
                    break;
                }
            }
        }
        #[cfg(not(loom))]
        slow.poll(state, busy, &backends, &nodes, cx.waker());
        if busy {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

/// A drain that waits longer than the graph lock's report threshold says,
/// through `tracing`, what it waits for, and keeps waiting (rule 21): the
/// requests it waits for may themselves wait for something that needs the
/// main loop or another task (the cross-task form of rules 9-11, which no
/// type sees).
#[cfg(not(loom))]
#[derive(Default)]
struct SlowDrain {
    /// When the wait began, when the next report is due, reports so far.
    wait: Option<(std::time::Instant, std::time::Instant, u32)>,
}

#[cfg(not(loom))]
impl SlowDrain {
    fn poll(
        &mut self,
        state: &DrainedState,
        busy: bool,
        backends: &[Arc<BackendInner>],
        nodes: &[Arc<NodeInner>],
        waker: &std::task::Waker,
    ) {
        use std::time::Instant;
        let lock = &state.graph.lock;
        if !busy {
            if let Some((since, _, reports)) = self.wait.take() {
                if reports > 0 {
                    tracing::warn!(
                        target: "blockgraph::drain",
                        "blockgraph: the drain of {} reported above completed after {:?}",
                        state.what(),
                        since.elapsed()
                    );
                }
            }
            return;
        }
        let Some(after) = lock.report_threshold() else {
            return;
        };
        let now = Instant::now();
        let (since, next, reports) = self.wait.get_or_insert((now, now + after, 0));
        if now >= *next {
            report_slow_drain(state, now.duration_since(*since), backends, nodes);
            *reports = reports.saturating_add(1);
            *next = now + after.saturating_mul(1u32 << (*reports).min(20));
        }
        crate::sync::GraphLock::wake_for_report(*next, waker);
    }
}

#[cfg(not(loom))]
fn report_slow_drain(
    state: &DrainedState,
    waited: std::time::Duration,
    backends: &[Arc<BackendInner>],
    nodes: &[Arc<NodeInner>],
) {
    let mut waiting_for: Vec<String> = backends
        .iter()
        .filter_map(|b| match b.in_flight.load(Ordering::SeqCst) {
            0 => None,
            n => Some(format!("backend '{}' ({n} request(s))", b.name)),
        })
        .collect();
    waiting_for.extend(nodes.iter().filter_map(|n| match n.requests_in_flight() {
        0 => None,
        k => Some(format!("node '{}' ({k} request(s) entered there)", n.name)),
    }));
    let (_, holders) = state.graph.lock.describe_readers(std::time::Instant::now());
    tracing::warn!(
        target: "blockgraph::drain",
        waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        "blockgraph: a drain of {} has waited {waited:?} for requests in flight on {}, \
         and keeps waiting. Read guards held:{holders}\n\
         A request that waits for something that needs the main loop or another task's \
         request never lets the drain finish: rules 9-11 hold per task, not across tasks \
         (DESIGN §2.14)",
        state.what(),
        waiting_for.join(", ")
    );
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
            node.in_flight
                .fetch_and(!NodeInner::QUIESCED, Ordering::SeqCst);
            ended.push(node.clone());
        }
    }
    for backend in &section.backends {
        if backend.quiesce.fetch_sub(1, Ordering::SeqCst) == 1 {
            backend.quiesced.store(false, Ordering::SeqCst);
            backend.resume.wake_all();
        }
    }
    // SAFETY: main-loop thread (the section is `!Send` and ends where it
    // began). A section may end inside a write section (its `Drained`
    // dropped in the writer's closure or in a callback), but the crate
    // never runs user code while a `&mut` from the write token is alive
    // (callbacks need a read token, `graph::callbacks`), so none is alive
    // now; the callbacks get read-only `GsRef`s and cannot start a
    // mutation (the `Bql` is lent out or `BqlScope` refuses a second one).
    let access = unsafe { ReadAccess::assume() };
    let ended: Vec<_> = ended.into_iter().filter(|n| n.is_in_graph()).collect();
    // SAFETY: as above.
    callbacks::run_all(&ended, |n| unsafe { callbacks::drained_end(n, access) });
}

/// Extends every active section over edges a mutation just created.
///
/// Runs inside the write section (no request is executing), so newly
/// covered nodes of a section that has finished waiting are drained at once.
pub(crate) fn cover_new_edges(graph: &GraphInner, edges: &[NewEdge], access: ReadAccess<'_>) {
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
                                cover_node(section, parent, &mut began, access);
                                changed = true;
                            } else if has_parent && !has_child {
                                cover_node(section, child, &mut began, access);
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
    fire_drained_begin(&began, access);
}

fn covers(section: &Section, node: &Arc<NodeInner>) -> bool {
    section
        .covered_nodes
        .contains(&(Arc::as_ptr(node) as usize))
}

/// Covers `node` and everything above it (its parents, their parents, …,
/// and their backends). Iterative, so a deep chain cannot overflow the
/// stack.
fn cover_node(
    section: &mut Section,
    node: &Arc<NodeInner>,
    began: &mut Vec<Arc<NodeInner>>,
    access: ReadAccess<'_>,
) {
    let mut todo = vec![node.clone()];
    while let Some(node) = todo.pop() {
        if !section.covered_nodes.insert(Arc::as_ptr(&node) as usize) {
            continue;
        }
        if node.quiesce.fetch_add(1, Ordering::SeqCst) == 0 {
            // From here on a request entering at the node sees the bit, and
            // the wait below sees every request that entered before it.
            node.in_flight
                .fetch_or(NodeInner::QUIESCED, Ordering::SeqCst);
            began.push(node.clone());
        }
        if section.waited {
            node.drained.fetch_add(1, Ordering::SeqCst);
        }
        for link in node.parents.get(access) {
            match link {
                ParentLink::Node { parent, .. } => todo.push(parent.clone()),
                ParentLink::Backend(backend) => cover_backend(section, backend),
            }
        }
        section.nodes.push(node);
    }
}

fn cover_backend(section: &mut Section, backend: &Arc<BackendInner>) {
    if !section
        .covered_backends
        .insert(Arc::as_ptr(backend) as usize)
    {
        return;
    }
    section.backends.push(backend.clone());
    if backend.quiesce.fetch_add(1, Ordering::SeqCst) == 0 {
        backend.quiesced.store(true, Ordering::SeqCst);
    }
}

fn fire_drained_begin(nodes: &[Arc<NodeInner>], access: ReadAccess<'_>) {
    // SAFETY: main-loop thread, `access` of this graph (callers' tokens);
    // the callbacks get read-only `GsRef`s.
    callbacks::run_all(nodes, |n| unsafe { callbacks::drained_begin(n, access) });
}
