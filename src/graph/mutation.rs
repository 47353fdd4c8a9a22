//! Graph mutations, each one a transaction (QEMU's `Transaction` with
//! `tran_add` / `tran_commit` / `tran_abort`, and `bdrv_replace_node`,
//! `bdrv_append`, `bdrv_set_backing_hd`, …).
//!
//! A mutation edits the live structures (we are the only one looking: the
//! write section excludes every reader and every `GsRef`), saving each
//! node's edge lists the first time it touches them. Then it checks the
//! whole result: no cycle, every edge's permissions recomputed, no two
//! users in conflict, every new node's driver accepts its `open`. If
//! anything fails, the saved lists are put back and the graph is exactly as
//! it was.

use std::collections::HashSet;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::graph::backend::BackendInner;
use crate::graph::callbacks;
use crate::graph::cell::WriteAccess;
use crate::graph::drain::{self, NewEdge};
use crate::graph::driver::BlockDriver;
use crate::graph::edge::{Edge, ParentLink};
use crate::graph::node::NodeInner;
use crate::graph::proof::NodeHandle;
use crate::graph::proof::{Drained, GraphWriter};
use crate::graph::{permission, GraphInner};
use crate::types::{ChildRole, Permissions};
use crate::types::{Error, Result};

/// A change to the node or backend list, logged so that rollback undoes
/// exactly it (instead of copying the whole list per mutation).
enum ListChange {
    NodeAdded(Arc<NodeInner>),
    NodeRemoved(usize, Arc<NodeInner>),
    BackendAdded(Arc<BackendInner>),
    BackendRemoved(usize, Arc<BackendInner>),
}

/// A value taken out of the graph, dropped only once no `&mut` into graph
/// state is alive: dropping the last reference to a node runs its driver's
/// `Drop`, which is user code (rule 19).
enum Garbage {
    Node(#[allow(dead_code)] Arc<NodeInner>),
    Edges(#[allow(dead_code)] Vec<Edge>),
    Links(#[allow(dead_code)] Vec<ParentLink>),
    Link(#[allow(dead_code)] ParentLink),
    Root(#[allow(dead_code)] Option<Arc<NodeInner>>),
    Backend(#[allow(dead_code)] Arc<BackendInner>),
}

/// Driver options of a reopen, owned.
type Options = Vec<(String, String)>;

/// A group of mutations open through [`GraphWriter::transaction`].
#[derive(Default)]
pub(crate) struct Group {
    /// Everything the group changed so far.
    log: TxLog,
    /// Why a mutation of the group failed (the group was rolled back).
    failed: Option<String>,
}

/// The undo log of one mutation, holding the write section's token.
///
/// Dropped without [`Transaction::commit`] succeeding — an error, or a panic
/// in a driver callback unwinding through it — it rolls back: every list it
/// touched is put back as it was, including the permissions on edges that
/// the recomputation changed (rule 20).
pub(crate) struct Transaction<'t, 'w> {
    graph: &'t Arc<GraphInner>,
    w: &'t mut WriteAccess<'w>,
    log: TxLog,
    committed: bool,
}

/// What a transaction has changed so far: the undo log, and what to do
/// once it commits. Owned (it borrows nothing), so a group of mutations
/// ([`GraphWriter::transaction`]) keeps it in the write section between
/// them.
#[derive(Default)]
pub(crate) struct TxLog {
    touched: HashSet<usize>,
    saved_nodes: Vec<(Arc<NodeInner>, Vec<Edge>, Vec<ParentLink>)>,
    saved_roots: Vec<(Arc<BackendInner>, Option<Arc<NodeInner>>)>,
    lists: Vec<ListChange>,
    new_edges: Vec<NewEdge>,
    added: Vec<Arc<NodeInner>>,
    removed: Vec<Arc<NodeInner>>,
    added_backends: Vec<Arc<BackendInner>>,
    removed_backends: Vec<Arc<BackendInner>>,
    garbage: Vec<Garbage>,
    /// Added nodes whose driver accepted `open`: closed again on rollback.
    opened: usize,
    /// Nodes whose read-only mode was switched, with the old mode, oldest
    /// first: switched back on rollback, newest first.
    read_only: Vec<(Arc<NodeInner>, bool)>,
    /// Driver options to apply once every check passed.
    reopens: Vec<(Arc<NodeInner>, Options)>,
    /// Nodes whose driver accepted a `reopen`, oldest first: each gets
    /// `reopen_commit` when the transaction commits, or `reopen_abort`,
    /// newest first, when it rolls back.
    reopened: Vec<Arc<NodeInner>>,
}

impl TxLog {
    /// Whether `node` joins the graph in this transaction (and has not
    /// left it again).
    pub(crate) fn adds(&self, node: &Arc<NodeInner>) -> bool {
        self.added.iter().any(|n| Arc::ptr_eq(n, node))
    }

    /// Whether `node` leaves the graph in this transaction.
    pub(crate) fn removes(&self, node: &Arc<NodeInner>) -> bool {
        self.removed.iter().any(|n| Arc::ptr_eq(n, node))
    }
}

impl<'t, 'w> Transaction<'t, 'w> {
    fn new(graph: &'t Arc<GraphInner>, w: &'t mut WriteAccess<'w>, log: TxLog) -> Self {
        Transaction {
            graph,
            w,
            log,
            committed: false,
        }
    }

    /// Saves `node`'s edge lists the first time the mutation changes them.
    fn touch(&mut self, node: &Arc<NodeInner>) {
        if !self.log.touched.insert(Arc::as_ptr(node) as usize) {
            return;
        }
        let r = self.w.read();
        let saved = (
            node.clone(),
            node.children.get(r).clone(),
            node.parents.get(r).clone(),
        );
        self.log.saved_nodes.push(saved);
    }

    fn touch_root(&mut self, backend: &Arc<BackendInner>) {
        if self
            .log
            .saved_roots
            .iter()
            .any(|(b, _)| Arc::ptr_eq(b, backend))
        {
            return;
        }
        let root = backend.root.get(self.w.read()).clone();
        self.log.saved_roots.push((backend.clone(), root));
    }

    fn name_taken(&self, name: &str) -> bool {
        self.graph.names.get(self.w.read()).contains(name)
    }

    fn add_node(&mut self, node: Arc<NodeInner>) -> Result<()> {
        check_name(&node.name)?;
        if self.name_taken(&node.name) {
            return Err(Error::DuplicateName(node.name.clone()));
        }
        self.graph.nodes.get_mut(self.w).push(node.clone());
        self.graph.names.get_mut(self.w).insert(node.name.clone());
        self.log.lists.push(ListChange::NodeAdded(node.clone()));
        self.log.added.push(node);
        Ok(())
    }

    fn add_edge(
        &mut self,
        parent: &Arc<NodeInner>,
        role: ChildRole,
        child: &Arc<NodeInner>,
    ) -> Result<()> {
        if !child.is_in_graph() && !self.log.added.iter().any(|n| Arc::ptr_eq(n, child)) {
            return Err(Error::NodeRemoved(child.name.clone()));
        }
        if parent
            .children
            .get(self.w.read())
            .iter()
            .any(|e| e.role == role)
        {
            return Err(Error::InvalidArgument(format!(
                "node '{}' already has a {role} child",
                parent.name
            )));
        }
        self.touch(parent);
        self.touch(child);
        parent.children.get_mut(self.w).push(Edge {
            role,
            child: child.clone(),
            perms: Permissions::UNRESTRICTED,
        });
        child.parents.get_mut(self.w).push(ParentLink::Node {
            parent: parent.clone(),
            role,
        });
        self.log.new_edges.push(NewEdge::Node {
            parent: parent.clone(),
            child: child.clone(),
        });
        Ok(())
    }

    fn remove_edge(&mut self, parent: &Arc<NodeInner>, role: ChildRole) -> Result<Arc<NodeInner>> {
        let Some(pos) = parent
            .children
            .get(self.w.read())
            .iter()
            .position(|e| e.role == role)
        else {
            return Err(Error::NoSuchChild {
                node: parent.name.clone(),
                role,
            });
        };
        self.touch(parent);
        let edge = parent.children.get_mut(self.w).remove(pos);
        self.touch(&edge.child);
        let links = edge.child.parents.get_mut(self.w);
        if let Some(i) = links.iter().position(|l| {
            matches!(l, ParentLink::Node { parent: p, role: r } if Arc::ptr_eq(p, parent) && *r == role)
        }) {
            let link = links.remove(i);
            self.log.garbage.push(Garbage::Link(link));
        }
        Ok(edge.child)
    }

    /// Points every user of `from` at `to` instead, except `skip` and
    /// users that stay at their node.
    fn move_parents(
        &mut self,
        from: &Arc<NodeInner>,
        to: &Arc<NodeInner>,
        skip: Option<&Arc<NodeInner>>,
    ) {
        let links = from.parents.get(self.w.read()).clone();
        self.touch(from);
        self.touch(to);
        for link in links {
            match &link {
                ParentLink::Node { parent, role } => {
                    if skip.is_some_and(|s| Arc::ptr_eq(s, parent)) {
                        continue;
                    }
                    self.touch(parent);
                    let mut old = Vec::new();
                    for edge in parent.children.get_mut(self.w).iter_mut() {
                        if edge.role == *role && Arc::ptr_eq(&edge.child, from) {
                            old.push(std::mem::replace(&mut edge.child, to.clone()));
                        }
                    }
                    self.log.garbage.extend(old.into_iter().map(Garbage::Node));
                    self.log.new_edges.push(NewEdge::Node {
                        parent: parent.clone(),
                        child: to.clone(),
                    });
                }
                ParentLink::Backend(backend) => {
                    if backend.stay_at_node {
                        continue;
                    }
                    self.touch_root(backend);
                    let old = backend.root.get_mut(self.w).replace(to.clone());
                    self.log.garbage.push(Garbage::Root(old));
                    self.log.new_edges.push(NewEdge::Backend {
                        backend: backend.clone(),
                        root: to.clone(),
                    });
                }
            }
            let from_links = from.parents.get_mut(self.w);
            if let Some(i) = from_links.iter().position(|l| same_link(l, &link)) {
                let old = from_links.remove(i);
                self.log.garbage.push(Garbage::Link(old));
            }
            to.parents.get_mut(self.w).push(link);
        }
    }

    fn remove_node(&mut self, node: &Arc<NodeInner>) -> Result<()> {
        let users = node.parents.get(self.w.read());
        if !users.is_empty() {
            let who: Vec<String> = users.iter().map(ParentLink::describe).collect();
            return Err(Error::HasParents {
                node: node.name.clone(),
                parents: who.join(", "),
            });
        }
        let roles: Vec<ChildRole> = node
            .children
            .get(self.w.read())
            .iter()
            .map(|e| e.role)
            .collect();
        for role in roles {
            let child = self.remove_edge(node, role)?;
            self.log.garbage.push(Garbage::Node(child));
        }
        // Searched from the end: filters and overlays, the nodes removed
        // most often, are usually among the newest.
        let list = self.graph.nodes.get_mut(self.w);
        if let Some(i) = list.iter().rposition(|n| Arc::ptr_eq(n, node)) {
            let gone = list.remove(i);
            self.log.lists.push(ListChange::NodeRemoved(i, gone));
        }
        self.graph.names.get_mut(self.w).remove(&node.name);
        self.log.removed.push(node.clone());
        Ok(())
    }

    pub(crate) fn add_backend(
        &mut self,
        backend: &Arc<BackendInner>,
        root: &Arc<NodeInner>,
    ) -> Result<()> {
        if self.name_taken(&backend.name) {
            return Err(Error::DuplicateName(backend.name.clone()));
        }
        self.touch(root);
        root.parents
            .get_mut(self.w)
            .push(ParentLink::Backend(backend.clone()));
        self.graph.backends.get_mut(self.w).push(backend.clone());
        self.graph
            .names
            .get_mut(self.w)
            .insert(backend.name.clone());
        self.log
            .lists
            .push(ListChange::BackendAdded(backend.clone()));
        self.log.added_backends.push(backend.clone());
        self.log.new_edges.push(NewEdge::Backend {
            backend: backend.clone(),
            root: root.clone(),
        });
        Ok(())
    }

    pub(crate) fn remove_backend(&mut self, backend: &Arc<BackendInner>) {
        self.touch_root(backend);
        let root = backend.root.get_mut(self.w).take();
        if let Some(root) = &root {
            self.touch(root);
            let links = root.parents.get_mut(self.w);
            if let Some(i) = links
                .iter()
                .position(|l| matches!(l, ParentLink::Backend(x) if Arc::ptr_eq(x, backend)))
            {
                let old = links.remove(i);
                self.log.garbage.push(Garbage::Link(old));
            }
        }
        self.log.garbage.push(Garbage::Root(root));
        let list = self.graph.backends.get_mut(self.w);
        if let Some(i) = list.iter().rposition(|b| Arc::ptr_eq(b, backend)) {
            let gone = list.remove(i);
            self.log.lists.push(ListChange::BackendRemoved(i, gone));
        }
        self.graph.names.get_mut(self.w).remove(&backend.name);
        self.log.removed_backends.push(backend.clone());
    }

    /// Puts back everything the mutation changed, newest change first.
    fn rollback(&mut self) {
        // Driver state first, with the graph as the changes left it (the
        // callbacks see it through a read token; no `&mut` is alive).
        {
            let r = self.w.read();
            let opened: Vec<Arc<NodeInner>> =
                self.log.added[..self.log.opened.min(self.log.added.len())].to_vec();
            let switched: Vec<(Arc<NodeInner>, bool)> = std::mem::take(&mut self.log.read_only)
                .into_iter()
                .rev()
                .collect();
            let reopened = std::mem::take(&mut self.log.reopened);
            self.log.opened = 0;
            callbacks::run_all([0, 1, 2], |step| {
                if step == 0 {
                    // SAFETY: main-loop thread (the writer), this graph's token.
                    callbacks::run_all(reopened.iter().rev(), |n| unsafe {
                        callbacks::reopen_abort(n, r)
                    });
                } else if step == 1 {
                    // SAFETY: as above.
                    callbacks::run_all(opened.iter().rev(), |n| unsafe { callbacks::close(n, r) });
                } else {
                    callbacks::run_all(&switched, |(n, old)| {
                        // SAFETY: as above.
                        if let Err(e) = unsafe { callbacks::set_read_only(n, r, *old) } {
                            eprintln!(
                                "blockgraph: node '{}' could not be switched back to {} while \
                                 rolling back: {e}",
                                n.name,
                                if *old { "read-only" } else { "read-write" }
                            );
                        }
                    });
                }
            });
        }
        for change in std::mem::take(&mut self.log.lists).into_iter().rev() {
            match change {
                ListChange::NodeAdded(node) => {
                    self.graph.names.get_mut(self.w).remove(&node.name);
                    let list = self.graph.nodes.get_mut(self.w);
                    if let Some(i) = list.iter().rposition(|n| Arc::ptr_eq(n, &node)) {
                        let gone = list.remove(i);
                        self.log.garbage.push(Garbage::Node(gone));
                    }
                    self.log.garbage.push(Garbage::Node(node));
                }
                ListChange::NodeRemoved(i, node) => {
                    self.graph.names.get_mut(self.w).insert(node.name.clone());
                    self.graph.nodes.get_mut(self.w).insert(i, node);
                }
                ListChange::BackendAdded(backend) => {
                    self.graph.names.get_mut(self.w).remove(&backend.name);
                    let list = self.graph.backends.get_mut(self.w);
                    if let Some(i) = list.iter().rposition(|b| Arc::ptr_eq(b, &backend)) {
                        let gone = list.remove(i);
                        self.log.garbage.push(Garbage::Backend(gone));
                    }
                    self.log.garbage.push(Garbage::Backend(backend));
                }
                ListChange::BackendRemoved(i, backend) => {
                    self.graph
                        .names
                        .get_mut(self.w)
                        .insert(backend.name.clone());
                    self.graph.backends.get_mut(self.w).insert(i, backend);
                }
            }
        }
        for (node, children, parents) in std::mem::take(&mut self.log.saved_nodes) {
            let old_children = std::mem::replace(node.children.get_mut(self.w), children);
            let old_parents = std::mem::replace(node.parents.get_mut(self.w), parents);
            self.log.garbage.push(Garbage::Edges(old_children));
            self.log.garbage.push(Garbage::Links(old_parents));
        }
        for (backend, root) in std::mem::take(&mut self.log.saved_roots) {
            let old = std::mem::replace(backend.root.get_mut(self.w), root);
            self.log.garbage.push(Garbage::Root(old));
        }
        self.log.touched.clear();
    }

    /// Checks the result: no cycle, every affected edge's permissions
    /// recomputed, no two users of an affected node in conflict, no user
    /// writing a read-only node, every new node's driver accepts its
    /// `open`, driver options applied. On error the caller drops the
    /// transaction, which rolls back. Run after each mutation, also inside
    /// a group (so a later mutation sees checked permissions).
    fn check(&mut self) -> Result<()> {
        let mut seeds: Vec<Arc<NodeInner>> = self
            .log
            .saved_nodes
            .iter()
            .map(|(n, _, _)| n.clone())
            .collect();
        seeds.extend(self.log.added.iter().cloned());
        let order = permission::affected_in_order(&seeds, self.w.read())?;
        permission::check_depth(&seeds, &order, self.w.read())?;

        // Only nodes whose users changed need their edges recomputed: the
        // seeds, then the children of every edge whose permissions changed.
        let mut dirty: HashSet<*const NodeInner> = seeds.iter().map(Arc::as_ptr).collect();
        for node in &order {
            if !dirty.contains(&Arc::as_ptr(node)) {
                continue;
            }
            // Compute with a read token (the driver's callback runs here)...
            let wanted = permission::wanted_child_permissions(node, self.w.read());
            let changed: Vec<bool> = node
                .children
                .get(self.w.read())
                .iter()
                .zip(&wanted)
                .map(|(e, p)| e.perms != *p)
                .collect();
            if changed.iter().any(|&c| c) {
                // ...then write, with no user code running.
                self.touch(node);
                let edges = node.children.get_mut(self.w);
                for ((edge, perms), changed) in edges.iter_mut().zip(wanted).zip(&changed) {
                    edge.perms = perms;
                    if *changed {
                        dirty.insert(Arc::as_ptr(&edge.child));
                    }
                }
            }
        }
        for node in &order {
            if dirty.contains(&Arc::as_ptr(node)) {
                permission::check_conflicts(node, self.w.read())?;
                permission::check_read_only(node, self.w.read())?;
            }
        }

        while self.log.opened < self.log.added.len() {
            let node = self.log.added[self.log.opened].clone();
            // SAFETY: main-loop thread (the writer), token of this graph.
            unsafe { callbacks::open(&node, self.w.read()) }?;
            self.log.opened += 1;
        }

        for (node, options) in std::mem::take(&mut self.log.reopens) {
            let options: Vec<(&str, &str)> = options
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // SAFETY: as above.
            unsafe { callbacks::reopen(&node, self.w.read(), &options) }?;
            self.log.reopened.push(node);
        }
        Ok(())
    }

    /// Makes the checked result the graph: the point of no return, then
    /// the callbacks that follow a commit.
    fn finish(mut self) {
        // Point of no return: the graph is the new one.
        self.committed = true;
        for node in &self.log.added {
            node.in_graph.store(true, Ordering::Release);
        }
        for backend in &self.log.added_backends {
            backend.in_graph.store(true, Ordering::Release);
        }
        for backend in &self.log.removed_backends {
            backend.in_graph.store(false, Ordering::Release);
        }
        for node in &self.log.removed {
            node.in_graph.store(false, Ordering::Release);
        }
        self.graph.mutations.fetch_add(1, Ordering::Relaxed);
        // No reader is inside; the next one sees the new epoch (the write
        // section's release orders it) and re-reads its root's length.
        self.graph.size_epoch.fetch_add(1, Ordering::Release);

        // Callbacks after the commit: each runs even if another panics, and
        // the first panic resumes once the graph's bookkeeping is done.
        let r = self.w.read();
        let removed = std::mem::take(&mut self.log.removed);
        let new_edges = std::mem::take(&mut self.log.new_edges);
        let added = self.log.added.clone();
        let reopened = std::mem::take(&mut self.log.reopened);
        callbacks::run_all([0, 1, 2, 3], |step| {
            if step == 0 {
                // SAFETY: main-loop thread (the writer), this graph's token.
                callbacks::run_all(&reopened, |n| unsafe { callbacks::reopen_commit(n, r) });
            } else if step == 1 {
                // SAFETY: as above.
                callbacks::run_all(&removed, |n| unsafe { callbacks::close(n, r) });
            } else if step == 2 {
                drain::cover_new_nodes(self.graph, &added, r);
            } else {
                drain::cover_new_edges(self.graph, &new_edges, r);
            }
        });
    }

    /// Hands the log back to the group it belongs to, without rolling
    /// back: the group commits or rolls back everything at its end.
    fn suspend(mut self) -> TxLog {
        self.committed = true;
        std::mem::take(&mut self.log)
    }

    /// Switches `node` and the nodes below it that inherit `read-only`
    /// (through `File`, `Data` and `Filtered` edges, as QEMU's children
    /// inherit it) to `read_only`: top down when going read-only, bottom
    /// up when going read-write, each switch logged for rollback.
    fn set_read_only(&mut self, node: &Arc<NodeInner>, read_only: bool) -> Result<()> {
        let mut order: Vec<Arc<NodeInner>> = Vec::new();
        let mut stack = vec![node.clone()];
        while let Some(n) = stack.pop() {
            if order.iter().any(|o| Arc::ptr_eq(o, &n)) {
                continue;
            }
            for e in n.children.get(self.w.read()).iter().rev() {
                if e.role != ChildRole::Backing {
                    stack.push(e.child.clone());
                }
            }
            order.push(n);
        }
        if !read_only {
            order.reverse();
        }
        for n in &order {
            let r = self.w.read();
            let old = callbacks::is_read_only(n, r);
            if old == read_only {
                continue;
            }
            // SAFETY: main-loop thread (the writer), this graph's token.
            unsafe { callbacks::set_read_only(n, r, read_only) }?;
            self.log.read_only.push((n.clone(), old));
            self.touch(n);
        }
        Ok(())
    }
}

impl Drop for Transaction<'_, '_> {
    fn drop(&mut self) {
        if !self.committed {
            self.rollback();
        }
        // `garbage` is dropped after this, with no `&mut` into the graph
        // alive: a driver's `Drop` may run there.
    }
}

fn same_link(a: &ParentLink, b: &ParentLink) -> bool {
    match (a, b) {
        (ParentLink::Node { parent: p, role: r }, ParentLink::Node { parent: q, role: s }) => {
            Arc::ptr_eq(p, q) && r == s
        }
        (ParentLink::Backend(x), ParentLink::Backend(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// Node and backend names: what QEMU's `node-name` accepts.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_owned()))
    }
}

fn new_node(graph: &Arc<GraphInner>, name: &str, driver: Box<dyn BlockDriver>) -> Arc<NodeInner> {
    Arc::new(NodeInner::new(name, driver, graph))
}

/// Graph mutations. Each is all-or-nothing: on error the graph is unchanged.
impl<'w> GraphWriter<'w> {
    pub(crate) fn mutate<T>(
        &mut self,
        edit: impl FnOnce(&mut Transaction<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        // On an error or a panic the transaction is dropped uncommitted and
        // rolls back: inside a group, everything the group changed so far.
        let log = match self.graph.group.get_mut(&mut self.access) {
            None => TxLog::default(),
            Some(group) => {
                if let Some(why) = &group.failed {
                    return Err(Error::InvalidArgument(format!(
                        "an earlier change of this transaction failed ({why}); it was rolled back \
                         and the transaction can only end"
                    )));
                }
                std::mem::take(&mut group.log)
            }
        };
        let mut tx = Transaction::new(self.graph, &mut self.access, log);
        let outcome = edit(&mut tx).and_then(|value| tx.check().map(|()| value));
        let in_group = self.graph.group.get(tx.w.read()).is_some();
        match outcome {
            Ok(value) if !in_group => {
                tx.finish();
                Ok(value)
            }
            Ok(value) => {
                let log = tx.suspend();
                if let Some(group) = self.graph.group.get_mut(&mut self.access) {
                    group.log = log;
                }
                Ok(value)
            }
            Err(e) => {
                drop(tx);
                if let Some(group) = self.graph.group.get_mut(&mut self.access) {
                    group.failed = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Runs several mutations as one transaction (QEMU's `transaction` QMP
    /// command, `tran_commit`/`tran_abort` over several actions): either
    /// all of them take effect or none does.
    ///
    /// Every mutation inside `f` is checked as it is made (cycles,
    /// permissions, read-only nodes, `open`), so a later one sees the
    /// earlier ones' results. The first that fails rolls back *every*
    /// change made so far in the group — graph, permissions, names,
    /// read-only modes, nodes opened — and returns its error; later
    /// mutations in the same group are refused, and the group returns an
    /// error even if `f` ignored that one. `f` returning an error, or
    /// panicking, rolls back too. Only when `f` returns `Ok` with every
    /// mutation succeeded does the group commit: nodes join the graph,
    /// removed nodes are closed, drain sections are extended over the new
    /// edges, once, at the end. A `transaction` inside `f` joins the outer
    /// group.
    ///
    /// Driver options given to [`GraphWriter::reopen`] (other than
    /// `read-only`) have no undo: they are applied after that reopen's
    /// checks, and stay if a later mutation of the group fails.
    ///
    /// # Examples
    ///
    /// Two changes, the second refused: the first is undone too.
    ///
    /// ```
    /// use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// main.run(|bql| -> blockgraph::Result<()> {
    ///     let a = bql.write(|w| w.add_node("a", MemoryDriver::new(4096), &[]))?;
    ///     let b = bql.write(|w| w.add_node("b", MemoryDriver::new(4096), &[]))?;
    ///     let (da, db) = (bql.drain(&a), bql.drain(&b));
    ///     let result = bql.write(|w| {
    ///         w.transaction(|w| {
    ///             w.insert_filter(&da, "fa", PassthroughFilter::new())?;
    ///             w.insert_filter(&db, "fa", PassthroughFilter::new())?; // duplicate name
    ///             Ok(())
    ///         })
    ///     });
    ///     assert!(result.is_err());
    ///     assert!(bql.node("fa").is_none()); // the first filter is gone too
    ///     Ok(())
    /// })?;
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut GraphWriter<'w>) -> Result<T>,
    ) -> Result<T> {
        if self.graph.group.get(self.access.read()).is_some() {
            return f(self);
        }
        *self.graph.group.get_mut(&mut self.access) = Some(Group::default());
        let result = catch_unwind(AssertUnwindSafe(|| f(self)));
        let group = self
            .graph
            .group
            .get_mut(&mut self.access)
            .take()
            .unwrap_or_default();
        let tx = Transaction::new(self.graph, &mut self.access, group.log);
        match (result, group.failed) {
            (Ok(Ok(value)), None) => {
                tx.finish();
                Ok(value)
            }
            (Ok(Ok(_)), Some(why)) => {
                drop(tx);
                Err(Error::InvalidArgument(format!(
                    "the transaction was rolled back: {why}"
                )))
            }
            (Ok(Err(e)), _) => {
                drop(tx);
                Err(e)
            }
            (Err(panic), _) => {
                drop(tx);
                resume_unwind(panic)
            }
        }
    }

    fn own<'d>(&self, drained: &'d Drained<'_>) -> Result<&'d Arc<NodeInner>> {
        if !Arc::ptr_eq(drained.graph(), self.graph) {
            return Err(Error::WrongGraph {
                what: format!("drained node '{}'", drained.name()),
            });
        }
        let node = drained.node();
        if !self.in_graph_now(node) {
            return Err(Error::NodeRemoved(node.name.clone()));
        }
        Ok(node)
    }

    /// Whether `node` is part of the graph as the open group leaves it.
    fn in_graph_now(&self, node: &Arc<NodeInner>) -> bool {
        match self.graph.group.get(self.access.read()) {
            None => node.is_in_graph(),
            Some(g) => (node.is_in_graph() || g.log.adds(node)) && !g.log.removes(node),
        }
    }

    pub(crate) fn own_handle<'h>(&self, handle: &'h NodeHandle) -> Result<&'h Arc<NodeInner>> {
        if !handle.0.belongs_to(self.graph) {
            return Err(Error::WrongGraph {
                what: format!("node '{}'", handle.name()),
            });
        }
        if !self.in_graph_now(&handle.0) {
            return Err(Error::NodeRemoved(handle.name().to_owned()));
        }
        Ok(&handle.0)
    }

    /// Adds a node named `name` driven by `driver`, with `children`.
    ///
    /// The children gain a parent but are not otherwise disturbed, so they
    /// need not be drained. Fails on a bad or duplicate name, a permission
    /// conflict on a child, or the driver's `open` refusing.
    pub fn add_node(
        &mut self,
        name: &str,
        driver: impl BlockDriver,
        children: &[(ChildRole, &NodeHandle)],
    ) -> Result<NodeHandle> {
        self.add_node_boxed(name, Box::new(driver), children)
    }

    /// [`GraphWriter::add_node`] for a driver chosen at run time.
    pub fn add_node_boxed(
        &mut self,
        name: &str,
        driver: Box<dyn BlockDriver>,
        children: &[(ChildRole, &NodeHandle)],
    ) -> Result<NodeHandle> {
        let kids = children
            .iter()
            .map(|(role, h)| Ok((*role, self.own_handle(h)?.clone())))
            .collect::<Result<Vec<_>>>()?;
        let node = new_node(self.graph, name, driver);
        self.mutate(|tx| {
            tx.add_node(node.clone())?;
            for (role, child) in &kids {
                tx.add_edge(&node, *role, child)?;
            }
            Ok(())
        })?;
        Ok(NodeHandle(node))
    }

    /// Attaches `child` to the drained `parent` as its `role` child.
    pub fn attach_child(
        &mut self,
        parent: &Drained<'_>,
        role: ChildRole,
        child: &NodeHandle,
    ) -> Result<()> {
        let parent = self.own(parent)?.clone();
        let child = self.own_handle(child)?.clone();
        self.mutate(|tx| tx.add_edge(&parent, role, &child))
    }

    /// Detaches the `role` child of the drained `parent` and returns it.
    pub fn detach_child(&mut self, parent: &Drained<'_>, role: ChildRole) -> Result<NodeHandle> {
        let parent = self.own(parent)?.clone();
        self.mutate(|tx| tx.remove_edge(&parent, role))
            .map(NodeHandle)
    }

    /// Sets (or with `None` clears) the backing node of the drained `node`
    /// (QEMU's `bdrv_set_backing_hd`). A backing that would make a cycle is
    /// refused.
    pub fn set_backing(&mut self, node: &Drained<'_>, backing: Option<&NodeHandle>) -> Result<()> {
        let node = self.own(node)?.clone();
        let backing = backing.map(|b| self.own_handle(b).cloned()).transpose()?;
        self.mutate(|tx| {
            if node
                .children
                .get(tx.w.read())
                .iter()
                .any(|e| e.role == ChildRole::Backing)
            {
                tx.remove_edge(&node, ChildRole::Backing)?;
            }
            if let Some(b) = &backing {
                tx.add_edge(&node, ChildRole::Backing, b)?;
            }
            Ok(())
        })
    }

    /// Makes every user of the drained `old` use the drained `new` instead
    /// (QEMU's `bdrv_replace_node`). Users that stay at their node (backends
    /// created with [`BackendOptions::stay_at_node`](crate::BackendOptions::stay_at_node)) keep `old`; edges from
    /// `new` itself to `old` are kept as they are.
    pub fn replace_node(&mut self, old: &Drained<'_>, new: &Drained<'_>) -> Result<()> {
        let old = self.own(old)?.clone();
        let new = self.own(new)?.clone();
        if Arc::ptr_eq(&old, &new) {
            return Ok(());
        }
        self.mutate(|tx| {
            tx.move_parents(&old, &new, Some(&new));
            Ok(())
        })
    }

    /// Inserts a new filter node above the drained `below`: the filter takes
    /// over `below`'s users and gets `below` as its `Filtered` child.
    pub fn insert_filter(
        &mut self,
        below: &Drained<'_>,
        name: &str,
        driver: impl BlockDriver,
    ) -> Result<NodeHandle> {
        self.insert_above(below, name, Box::new(driver), ChildRole::Filtered, &[])
    }

    /// [`GraphWriter::insert_filter`] with more children than the filtered
    /// one (the mirror filter's edge to the mirror target), attached in
    /// the same step so the filter opens with all of them.
    pub(crate) fn insert_filter_with(
        &mut self,
        below: &Drained<'_>,
        name: &str,
        driver: impl BlockDriver,
        other_children: &[(ChildRole, &NodeHandle)],
    ) -> Result<NodeHandle> {
        self.insert_above(
            below,
            name,
            Box::new(driver),
            ChildRole::Filtered,
            other_children,
        )
    }

    /// Appends an overlay above the drained `base` (a snapshot, QEMU's
    /// `bdrv_append`): the new node takes over `base`'s users and gets
    /// `base` as its backing. `other_children` are attached too (for a qcow2
    /// overlay, its `File`). The overlay is new, so this can never create a
    /// cycle.
    pub fn append_overlay(
        &mut self,
        base: &Drained<'_>,
        name: &str,
        driver: impl BlockDriver,
        other_children: &[(ChildRole, &NodeHandle)],
    ) -> Result<NodeHandle> {
        self.insert_above(
            base,
            name,
            Box::new(driver),
            ChildRole::Backing,
            other_children,
        )
    }

    fn insert_above(
        &mut self,
        below: &Drained<'_>,
        name: &str,
        driver: Box<dyn BlockDriver>,
        role: ChildRole,
        others: &[(ChildRole, &NodeHandle)],
    ) -> Result<NodeHandle> {
        let below = self.own(below)?.clone();
        let others = others
            .iter()
            .map(|(r, h)| Ok((*r, self.own_handle(h)?.clone())))
            .collect::<Result<Vec<_>>>()?;
        let node = new_node(self.graph, name, driver);
        self.mutate(|tx| {
            tx.add_node(node.clone())?;
            tx.add_edge(&node, role, &below)?;
            for (r, child) in &others {
                tx.add_edge(&node, *r, child)?;
            }
            tx.move_parents(&below, &node, Some(&node));
            Ok(())
        })?;
        Ok(NodeHandle(node))
    }

    /// Removes the drained filter node: its users go back to its `Filtered`
    /// child, and the filter leaves the graph.
    pub fn remove_filter(&mut self, filter: &Drained<'_>) -> Result<()> {
        let filter = self.own(filter)?.clone();
        self.mutate(|tx| {
            let child = tx.remove_edge(&filter, ChildRole::Filtered)?;
            tx.move_parents(&filter, &child, None);
            tx.log.garbage.push(Garbage::Node(child));
            tx.remove_node(&filter)
        })
    }

    /// Removes the drained `node`, which must have no users left; its edges
    /// to its children go with it and its driver is closed.
    pub fn remove_node(&mut self, node: &Drained<'_>) -> Result<()> {
        let node = self.own(node)?.clone();
        self.mutate(|tx| tx.remove_node(&node))
    }

    /// Changes the drained node's options (QEMU's `bdrv_reopen`).
    ///
    /// `read-only` (`on`/`off`, also `true`/`false`) is the graph's:
    /// see [`GraphWriter::set_read_only`]. The other options go to the
    /// driver's [`reopen`](crate::driver::BlockDriver::reopen) callback,
    /// after every check passed. All-or-nothing: on error the graph, its
    /// permissions and every read-only mode are as before, and so are the
    /// driver's options where the driver implements
    /// [`reopen_abort`](crate::driver::BlockDriver::reopen_abort) (every
    /// built-in driver with options does); the same holds when a later
    /// step of a [`transaction`](GraphWriter::transaction) fails.
    pub fn reopen(&mut self, node: &Drained<'_>, options: &[(&str, &str)]) -> Result<()> {
        let node = self.own(node)?.clone();
        let mut read_only = None;
        let mut rest = Vec::new();
        for (key, value) in options {
            if *key == "read-only" {
                read_only = Some(match *value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "read-only must be 'on' or 'off', not '{other}'"
                        )))
                    }
                });
            } else {
                rest.push(((*key).to_owned(), (*value).to_owned()));
            }
        }
        self.mutate(|tx| {
            if let Some(ro) = read_only {
                tx.set_read_only(&node, ro)?;
            }
            if !rest.is_empty() || read_only.is_none() {
                tx.log.reopens.push((node.clone(), rest));
            }
            Ok(())
        })
    }

    /// Switches the drained node between read-only and read-write (QEMU's
    /// `bdrv_reopen_set_read_only`; the same as [`GraphWriter::reopen`]
    /// with `read-only`).
    ///
    /// The nodes below it that inherit the mode in QEMU switch with it:
    /// its `File`, `Data` and `Filtered` children, recursively (a qcow2
    /// node's file, a raw node's file), but not its backing chain. Then
    /// permissions are recomputed: a read-only node grants no user
    /// [`Perm::WRITE`](crate::Perm::WRITE) or
    /// [`WRITE_UNCHANGED`](crate::Perm::WRITE_UNCHANGED), so going read-only while a user
    /// still writes fails with [`Error::PermissionConflict`] and changes
    /// nothing (every node switched is switched back).
    ///
    /// A qcow2 node going read-only must have its metadata written back
    /// first: flush it inside the drained section with
    /// [`Drained::flush`] before this call.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::{FileDriver, FileOptions}, BackendOptions, MainLoop, Permissions};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let file = FileDriver::create(dir.path().join("disk.img"), 1 << 20, FileOptions::default())?;
    /// let main = MainLoop::new()?;
    /// main.run(|bql| -> blockgraph::Result<()> {
    ///     let node = bql.write(|w| w.add_node("disk", file, &[]))?;
    ///     let reader = BackendOptions::with_perms(Permissions::SHARED_READER);
    ///     bql.write(|w| w.add_backend("ro-user", &node, reader))?;
    ///     let drained = bql.drain(&node);
    ///     bql.write(|w| w.set_read_only(&drained, true))?;
    ///     // A writer is refused now.
    ///     assert!(bql.write(|w| w.add_backend("writer", &node, BackendOptions::default())).is_err());
    ///     bql.write(|w| w.set_read_only(&drained, false))?;
    ///     Ok(())
    /// })?;
    /// # main.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_read_only(&mut self, node: &Drained<'_>, read_only: bool) -> Result<()> {
        let node = self.own(node)?.clone();
        self.mutate(|tx| tx.set_read_only(&node, read_only))
    }
}
