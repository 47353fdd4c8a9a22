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

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backend::{BackendInner, BackendOptions, BlockBackend};
use crate::drain::{self, NewEdge};
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::graph::cell::GraphCell;
use crate::graph::edge::{ChildRole, Edge, ParentLink, Permissions};
use crate::graph::node::{NodeHandle, NodeInner};
use crate::graph::{permission, GraphInner};
use crate::proof::{Drained, GraphWriter, NodeRef};

/// The undo log of one mutation.
struct Transaction<'g> {
    graph: &'g GraphInner,
    saved_nodes: Vec<(Arc<NodeInner>, Vec<Edge>, Vec<ParentLink>)>,
    saved_roots: Vec<(Arc<BackendInner>, Option<Arc<NodeInner>>)>,
    saved_node_list: Option<Vec<Arc<NodeInner>>>,
    saved_backend_list: Option<Vec<Arc<BackendInner>>>,
    new_edges: Vec<NewEdge>,
    added: Vec<Arc<NodeInner>>,
    removed: Vec<Arc<NodeInner>>,
    added_backends: Vec<Arc<BackendInner>>,
    removed_backends: Vec<Arc<BackendInner>>,
}

// Every `get`/`get_mut` below runs inside a write section on the main-loop
// thread (a `Transaction` only exists inside `GraphWriter::transaction`), and
// each `get_mut` result is used and dropped before any other reference into
// the same cell is made. That is the `GraphCell` contract.
impl<'g> Transaction<'g> {
    fn new(graph: &'g GraphInner) -> Self {
        Transaction {
            graph,
            saved_nodes: Vec::new(),
            saved_roots: Vec::new(),
            saved_node_list: None,
            saved_backend_list: None,
            new_edges: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
            added_backends: Vec::new(),
            removed_backends: Vec::new(),
        }
    }

    fn touch(&mut self, node: &Arc<NodeInner>) {
        if self
            .saved_nodes
            .iter()
            .any(|(n, _, _)| Arc::ptr_eq(n, node))
        {
            return;
        }
        // SAFETY: write section; shared borrows end before the push.
        let (children, parents) =
            unsafe { (node.children.get().clone(), node.parents.get().clone()) };
        self.saved_nodes.push((node.clone(), children, parents));
    }

    fn touch_root(&mut self, backend: &Arc<BackendInner>) {
        if self
            .saved_roots
            .iter()
            .any(|(b, _)| Arc::ptr_eq(b, backend))
        {
            return;
        }
        // SAFETY: write section.
        let root = unsafe { backend.root.get() }.clone();
        self.saved_roots.push((backend.clone(), root));
    }

    fn node_list(&mut self) -> &mut Vec<Arc<NodeInner>> {
        if self.saved_node_list.is_none() {
            // SAFETY: write section.
            self.saved_node_list = Some(unsafe { self.graph.nodes.get() }.clone());
        }
        // SAFETY: write section; the only reference into the node list.
        unsafe { self.graph.nodes.get_mut() }
    }

    fn backend_list(&mut self) -> &mut Vec<Arc<BackendInner>> {
        if self.saved_backend_list.is_none() {
            // SAFETY: write section.
            self.saved_backend_list = Some(unsafe { self.graph.backends.get() }.clone());
        }
        // SAFETY: write section; the only reference into the backend list.
        unsafe { self.graph.backends.get_mut() }
    }

    fn name_taken(&self, name: &str) -> bool {
        // SAFETY: write section.
        let nodes = unsafe { self.graph.nodes.get() };
        // SAFETY: write section.
        let backends = unsafe { self.graph.backends.get() };
        nodes.iter().any(|n| n.name == name) || backends.iter().any(|b| b.name == name)
    }

    fn add_node(&mut self, node: Arc<NodeInner>) -> Result<()> {
        check_name(&node.name)?;
        if self.name_taken(&node.name) {
            return Err(Error::DuplicateName(node.name.clone()));
        }
        self.node_list().push(node.clone());
        self.added.push(node);
        Ok(())
    }

    fn add_edge(
        &mut self,
        parent: &Arc<NodeInner>,
        role: ChildRole,
        child: &Arc<NodeInner>,
    ) -> Result<()> {
        if !child.is_in_graph() && !self.added.iter().any(|n| Arc::ptr_eq(n, child)) {
            return Err(Error::NodeRemoved(child.name.clone()));
        }
        // SAFETY: write section.
        if unsafe { parent.children.get() }
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
        // SAFETY: write section; the only reference into these vectors.
        unsafe { parent.children.get_mut() }.push(Edge {
            role,
            child: child.clone(),
            perms: Permissions::UNRESTRICTED,
        });
        // SAFETY: as above.
        unsafe { child.parents.get_mut() }.push(ParentLink::Node {
            parent: parent.clone(),
            role,
        });
        self.new_edges.push(NewEdge::Node {
            parent: parent.clone(),
            child: child.clone(),
        });
        Ok(())
    }

    fn remove_edge(&mut self, parent: &Arc<NodeInner>, role: ChildRole) -> Result<Arc<NodeInner>> {
        // SAFETY: write section.
        let Some(pos) = unsafe { parent.children.get() }
            .iter()
            .position(|e| e.role == role)
        else {
            return Err(Error::NoSuchChild {
                node: parent.name.clone(),
                role,
            });
        };
        self.touch(parent);
        // SAFETY: write section; the only reference into this vector.
        let edge = unsafe { parent.children.get_mut() }.remove(pos);
        self.touch(&edge.child);
        // SAFETY: as above.
        let links = unsafe { edge.child.parents.get_mut() };
        if let Some(i) = links.iter().position(|l| {
            matches!(l, ParentLink::Node { parent: p, role: r } if Arc::ptr_eq(p, parent) && *r == role)
        }) {
            links.remove(i);
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
        // SAFETY: write section.
        let links = unsafe { from.parents.get() }.clone();
        self.touch(from);
        self.touch(to);
        for link in links {
            match &link {
                ParentLink::Node { parent, role } => {
                    if skip.is_some_and(|s| Arc::ptr_eq(s, parent)) {
                        continue;
                    }
                    self.touch(parent);
                    // SAFETY: write section; the only reference into it.
                    for edge in unsafe { parent.children.get_mut() }.iter_mut() {
                        if edge.role == *role && Arc::ptr_eq(&edge.child, from) {
                            edge.child = to.clone();
                        }
                    }
                    self.new_edges.push(NewEdge::Node {
                        parent: parent.clone(),
                        child: to.clone(),
                    });
                }
                ParentLink::Backend(backend) => {
                    if backend.stay_at_node {
                        continue;
                    }
                    self.touch_root(backend);
                    // SAFETY: write section; the only reference into it.
                    unsafe { *backend.root.get_mut() = Some(to.clone()) };
                    self.new_edges.push(NewEdge::Backend {
                        backend: backend.clone(),
                        root: to.clone(),
                    });
                }
            }
            // SAFETY: write section; the only references into them.
            let from_links = unsafe { from.parents.get_mut() };
            if let Some(i) = from_links.iter().position(|l| same_link(l, &link)) {
                from_links.remove(i);
            }
            // SAFETY: as above.
            unsafe { to.parents.get_mut() }.push(link);
        }
    }

    fn remove_node(&mut self, node: &Arc<NodeInner>) -> Result<()> {
        // SAFETY: write section.
        let users = unsafe { node.parents.get() };
        if !users.is_empty() {
            let who: Vec<String> = users.iter().map(ParentLink::describe).collect();
            return Err(Error::HasParents {
                node: node.name.clone(),
                parents: who.join(", "),
            });
        }
        // SAFETY: write section.
        let roles: Vec<ChildRole> = unsafe { node.children.get() }
            .iter()
            .map(|e| e.role)
            .collect();
        for role in roles {
            self.remove_edge(node, role)?;
        }
        let list = self.node_list();
        if let Some(i) = list.iter().position(|n| Arc::ptr_eq(n, node)) {
            list.remove(i);
        }
        self.removed.push(node.clone());
        Ok(())
    }

    fn rollback(self) {
        for (node, children, parents) in self.saved_nodes {
            // SAFETY: write section; nothing else references these vectors.
            unsafe {
                *node.children.get_mut() = children;
                *node.parents.get_mut() = parents;
            }
        }
        for (backend, root) in self.saved_roots {
            // SAFETY: as above.
            unsafe { *backend.root.get_mut() = root };
        }
        if let Some(list) = self.saved_node_list {
            // SAFETY: as above.
            unsafe { *self.graph.nodes.get_mut() = list };
        }
        if let Some(list) = self.saved_backend_list {
            // SAFETY: as above.
            unsafe { *self.graph.backends.get_mut() = list };
        }
        // The restored edges carry the permissions they had before.
    }

    fn check_and_commit(self) -> Result<()> {
        // SAFETY: write section, no reference into any edge list alive.
        if let Err(e) = unsafe { permission::recompute_and_check(self.graph) } {
            self.rollback();
            return Err(e);
        }
        for node in &self.added {
            // SAFETY: write section; `open` only gets a read-only `GsRef`.
            let gs = unsafe { NodeRef::new(node) };
            if let Err(e) = node.driver.open(gs) {
                self.rollback();
                return Err(e);
            }
        }
        for node in &self.added {
            node.in_graph.store(true, Ordering::Release);
        }
        for backend in &self.added_backends {
            backend.in_graph.store(true, Ordering::Release);
        }
        for backend in &self.removed_backends {
            backend.in_graph.store(false, Ordering::Release);
        }
        for node in &self.removed {
            node.in_graph.store(false, Ordering::Release);
            // SAFETY: write section; `close` only gets a read-only `GsRef`.
            let gs = unsafe { NodeRef::new(node) };
            node.driver.close(gs);
        }
        drain::cover_new_edges(self.graph, &self.new_edges);
        self.graph.mutations.fetch_add(1, Ordering::Relaxed);
        // No reader is inside; the next one sees the new epoch (the write
        // section's release orders it) and re-reads its root's length.
        self.graph.size_epoch.fetch_add(1, Ordering::Release);
        Ok(())
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
fn check_name(name: &str) -> Result<()> {
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
    Arc::new(NodeInner {
        name: name.to_owned(),
        driver,
        graph: Arc::downgrade(graph),
        children: GraphCell::new(Vec::new()),
        parents: GraphCell::new(Vec::new()),
        quiesce: Default::default(),
        drained: Default::default(),
        in_graph: Default::default(),
    })
}

/// Graph mutations. Each is all-or-nothing: on error the graph is unchanged.
impl GraphWriter<'_> {
    fn transaction<T>(
        &mut self,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut tx = Transaction::new(self.graph);
        match edit(&mut tx) {
            Ok(value) => {
                tx.check_and_commit()?;
                Ok(value)
            }
            Err(e) => {
                tx.rollback();
                Err(e)
            }
        }
    }

    fn own<'d>(&self, drained: &'d Drained<'_>) -> Result<&'d Arc<NodeInner>> {
        if !Arc::ptr_eq(drained.graph(), self.graph) {
            return Err(Error::InvalidArgument(format!(
                "drained node '{}' belongs to another main loop's graph",
                drained.name()
            )));
        }
        let node = drained.node();
        if !node.is_in_graph() {
            return Err(Error::NodeRemoved(node.name.clone()));
        }
        Ok(node)
    }

    fn own_handle<'h>(&self, handle: &'h NodeHandle) -> Result<&'h Arc<NodeInner>> {
        if !std::ptr::eq(handle.0.graph.as_ptr(), Arc::as_ptr(self.graph)) {
            return Err(Error::InvalidArgument(format!(
                "node '{}' belongs to another main loop's graph",
                handle.name()
            )));
        }
        if !handle.0.is_in_graph() {
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
        self.transaction(|tx| {
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
        self.transaction(|tx| tx.add_edge(&parent, role, &child))
    }

    /// Detaches the `role` child of the drained `parent` and returns it.
    pub fn detach_child(&mut self, parent: &Drained<'_>, role: ChildRole) -> Result<NodeHandle> {
        let parent = self.own(parent)?.clone();
        self.transaction(|tx| tx.remove_edge(&parent, role))
            .map(NodeHandle)
    }

    /// Sets (or with `None` clears) the backing node of the drained `node`
    /// (QEMU's `bdrv_set_backing_hd`). A backing that would make a cycle is
    /// refused.
    pub fn set_backing(&mut self, node: &Drained<'_>, backing: Option<&NodeHandle>) -> Result<()> {
        let node = self.own(node)?.clone();
        let backing = backing.map(|b| self.own_handle(b).cloned()).transpose()?;
        self.transaction(|tx| {
            // SAFETY: write section.
            if unsafe { node.children.get() }
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
    /// created with [`BackendOptions::stay_at_node`]) keep `old`; edges from
    /// `new` itself to `old` are kept as they are.
    pub fn replace_node(&mut self, old: &Drained<'_>, new: &Drained<'_>) -> Result<()> {
        let old = self.own(old)?.clone();
        let new = self.own(new)?.clone();
        if Arc::ptr_eq(&old, &new) {
            return Ok(());
        }
        self.transaction(|tx| {
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
        self.transaction(|tx| {
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
        self.transaction(|tx| {
            let child = tx.remove_edge(&filter, ChildRole::Filtered)?;
            tx.move_parents(&filter, &child, None);
            tx.remove_node(&filter)
        })
    }

    /// Removes the drained `node`, which must have no users left; its edges
    /// to its children go with it and its driver is closed.
    pub fn remove_node(&mut self, node: &Drained<'_>) -> Result<()> {
        let node = self.own(node)?.clone();
        self.transaction(|tx| tx.remove_node(&node))
    }

    /// Adds a backend named `name` on `root`: the device-facing user of the
    /// graph. Fails if its permissions conflict with `root`'s other users.
    pub fn add_backend(
        &mut self,
        name: &str,
        root: &NodeHandle,
        options: BackendOptions,
    ) -> Result<BlockBackend> {
        let root = self.own_handle(root)?.clone();
        check_name(name)?;
        let backend = BackendInner::new(name, self.graph, options, root.clone());
        self.transaction(|tx| {
            if tx.name_taken(name) {
                return Err(Error::DuplicateName(name.to_owned()));
            }
            tx.touch(&root);
            // SAFETY: write section; the only reference into it.
            unsafe { root.parents.get_mut() }.push(ParentLink::Backend(backend.clone()));
            tx.backend_list().push(backend.clone());
            tx.added_backends.push(backend.clone());
            tx.new_edges.push(NewEdge::Backend {
                backend: backend.clone(),
                root: root.clone(),
            });
            Ok(())
        })?;
        Ok(BlockBackend { inner: backend })
    }

    /// Removes `backend` from the graph. Requests it still receives fail with
    /// [`Error::NoMedium`].
    pub fn remove_backend(&mut self, backend: &BlockBackend) -> Result<()> {
        let b = backend.inner.clone();
        if !std::ptr::eq(b.graph.as_ptr(), Arc::as_ptr(self.graph))
            || !b.in_graph.load(Ordering::Acquire)
        {
            return Err(Error::InvalidArgument(format!(
                "backend '{}' is not part of this graph",
                b.name
            )));
        }
        self.transaction(|tx| {
            tx.touch_root(&b);
            // SAFETY: write section; the only reference into it.
            let root = unsafe { b.root.get_mut() }.take();
            if let Some(root) = root {
                tx.touch(&root);
                // SAFETY: as above.
                let links = unsafe { root.parents.get_mut() };
                links.retain(|l| !matches!(l, ParentLink::Backend(x) if Arc::ptr_eq(x, &b)));
            }
            let list = tx.backend_list();
            list.retain(|x| !Arc::ptr_eq(x, &b));
            tx.removed_backends.push(b.clone());
            Ok(())
        })
    }

    /// Changes the drained node's driver options (QEMU's `bdrv_reopen`).
    pub fn reopen(&mut self, node: &Drained<'_>, options: &[(&str, &str)]) -> Result<()> {
        let node = self.own(node)?.clone();
        // SAFETY: write section; `reopen` only gets a read-only `GsRef`.
        let gs = unsafe { NodeRef::new(&node) };
        node.driver.reopen(gs, options)
    }
}
