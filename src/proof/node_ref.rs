//! [`NodeRef`], the one way to look inside a node, and its two flavours
//! [`GsRef`] and [`IoRef`].

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::driver::{BlockDriver, BlockStatus, IoFuture};
use crate::graph::edge::{ChildRole, ParentLink, Permissions};
use crate::graph::node::{NodeHandle, NodeInner};

mod sealed {
    pub trait Sealed {}
}

/// Which lock a [`NodeRef`] was obtained under. Sealed: only
/// [`GlobalState`] and [`ReadLocked`] exist.
pub trait Proof: sealed::Sealed + 'static {}

/// Implemented only by [`GlobalState`]: operations bounded by it are
/// main-loop-only (QEMU's `GLOBAL_STATE_CODE()`).
#[diagnostic::on_unimplemented(
    message = "this is a main-loop-only operation, and an `IoRef` only proves that the graph is read-locked",
    label = "needs a `GsRef` (main-loop proof, from `Bql`), found a node reference of kind `{Self}`",
    note = "main-loop-only operations take a `GsRef`; I/O code reaches the main loop with `IoCx::run_on_main_loop` after dropping its read guard"
)]
pub trait MainLoopProof: Proof {}

/// Implemented only by [`ReadLocked`]: I/O needs the graph read lock.
#[diagnostic::on_unimplemented(
    message = "I/O needs an `IoRef`: the proof that this task holds the graph read lock",
    label = "this node reference is of kind `{Self}`, not an `IoRef`",
    note = "take the read lock once at the top of the request (`IoCx::read().await`) and pass the `IoRef` down; main-loop code submits I/O to an `IoThread`"
)]
pub trait IoProof: Proof {}

/// Marker for node references obtained on the main loop (see [`GsRef`]).
///
/// `!Send` and `!Sync`: main-loop proofs never leave the main-loop thread.
#[derive(Debug, Clone, Copy)]
pub struct GlobalState {
    _not_send: super::NotSend,
}

/// Marker for node references obtained under a read guard (see [`IoRef`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadLocked {
    _private: (),
}

impl sealed::Sealed for GlobalState {}
impl sealed::Sealed for ReadLocked {}
impl Proof for GlobalState {}
impl Proof for ReadLocked {}
impl MainLoopProof for GlobalState {}
impl IoProof for ReadLocked {}

/// A node seen from main-loop code (QEMU: a `bs` in `GLOBAL_STATE_CODE()`).
///
/// Borrowed from [`Bql`](crate::Bql) (or from a [`GraphWriter`](crate::GraphWriter)),
/// so it cannot survive a graph mutation or the nested event loop, both of
/// which need the `Bql` exclusively. `!Send`. One pointer wide.
pub type GsRef<'b> = NodeRef<'b, GlobalState>;

/// A node seen from I/O code (QEMU: a `bs` in a `GRAPH_RDLOCK` function).
///
/// Borrowed from a [`ReadGuard`](crate::ReadGuard): it cannot outlive the read
/// lock. `Send`, so I/O futures may migrate between threads. One pointer
/// wide. Driver I/O callbacks receive one and recurse into children with it,
/// never re-taking the lock.
pub type IoRef<'r> = NodeRef<'r, ReadLocked>;

/// A node seen under a proof `P` that the graph cannot change during `'a`.
///
/// Use the aliases [`GsRef`] and [`IoRef`]. Everything readable about a node
/// (name, driver, children, parents, permissions) is here for both; I/O
/// needs `P = ReadLocked`; main-loop-only operations need
/// `P = GlobalState`. Calling one with the wrong proof is a compile error
/// that names the missing proof.
pub struct NodeRef<'a, P: Proof> {
    node: &'a Arc<NodeInner>,
    _proof: PhantomData<P>,
}

impl<P: Proof> Clone for NodeRef<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P: Proof> Copy for NodeRef<'_, P> {}

impl<'a, P: Proof> NodeRef<'a, P> {
    /// # Safety
    ///
    /// The graph must not change during `'a`, by the rule `P` stands for: the
    /// main-loop lock borrowed for `'a` (`GlobalState`) or a read guard
    /// borrowed for `'a` (`ReadLocked`).
    pub(crate) unsafe fn new(node: &'a Arc<NodeInner>) -> Self {
        NodeRef {
            node,
            _proof: PhantomData,
        }
    }

    /// Same node, same proof, a child reached through the graph.
    fn derive(&self, node: &'a Arc<NodeInner>) -> NodeRef<'a, P> {
        NodeRef {
            node,
            _proof: PhantomData,
        }
    }

    /// The node's unique name.
    pub fn name(&self) -> &'a str {
        &self.node.name
    }

    /// The driver's format name (`"null"`, `"memory"`, `"filter"`, …).
    pub fn driver_name(&self) -> &'static str {
        self.node.driver.format_name()
    }

    /// The driver instance, for driver-specific queries.
    pub fn driver(&self) -> &'a dyn BlockDriver {
        &*self.node.driver
    }

    /// The driver instance as its concrete type, if it is a `D`.
    pub fn driver_as<D: BlockDriver>(&self) -> Option<&'a D> {
        let any: &'a dyn Any = &*self.node.driver;
        any.downcast_ref::<D>()
    }

    /// Whether the node is still part of the graph.
    pub fn is_in_graph(&self) -> bool {
        self.node.is_in_graph()
    }

    /// Whether a completed drain section covers the node: no request reaches
    /// it until the section ends.
    pub fn is_drained(&self) -> bool {
        self.node.drained.load(Ordering::SeqCst) > 0
    }

    /// The node's children, in the order they were attached.
    pub fn children(&self) -> impl ExactSizeIterator<Item = ChildRef<'a, P>> + 'a {
        // SAFETY: `P` guarantees the graph does not change during 'a.
        let edges = unsafe { self.node.children.get() };
        edges.iter().map(|e| ChildRef {
            role: e.role,
            node: NodeRef {
                node: &e.child,
                _proof: PhantomData,
            },
            perms: e.perms,
        })
    }

    /// The child with `role`, if any.
    pub fn child(&self, role: ChildRole) -> Option<NodeRef<'a, P>> {
        // SAFETY: `P` guarantees the graph does not change during 'a.
        let edges = unsafe { self.node.children.get() };
        edges
            .iter()
            .find(|e| e.role == role)
            .map(|e| self.derive(&e.child))
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<NodeRef<'a, P>> {
        self.child(ChildRole::Backing)
    }

    /// This node, then each backing (or filtered) node below it, top down.
    pub fn backing_chain(&self) -> Vec<NodeRef<'a, P>> {
        let mut chain = vec![*self];
        let mut cur = *self;
        // The graph is acyclic (mutations reject cycles), so this ends.
        while let Some(next) = cur
            .child(ChildRole::Backing)
            .or_else(|| cur.child(ChildRole::Filtered))
        {
            chain.push(next);
            cur = next;
        }
        chain
    }

    /// Everything that uses this node: parent nodes and backends.
    pub fn parents(&self) -> impl ExactSizeIterator<Item = ParentRef<'a, P>> + 'a {
        // SAFETY: `P` guarantees the graph does not change during 'a.
        let links = unsafe { self.node.parents.get() };
        links.iter().map(|l| match l {
            ParentLink::Node { parent, role } => ParentRef::Node {
                node: NodeRef {
                    node: parent,
                    _proof: PhantomData,
                },
                role: *role,
            },
            ParentLink::Backend(b) => ParentRef::Backend { name: &b.name },
        })
    }

    /// What all parents together take on this node, and what all of them
    /// share.
    pub fn parent_permissions(&self) -> Permissions {
        // SAFETY: `P` guarantees the graph does not change during 'a.
        unsafe { crate::graph::permission::incoming(self.node) }
    }
}

/// I/O: needs an [`IoRef`].
///
/// The `P: IoProof` bound sits on each method, not on the `impl`: a bound on
/// a method fails with E0277 and shows `IoProof`'s `on_unimplemented`
/// message, while a bound on the `impl` only gives E0599 ("method exists but
/// its trait bounds were not satisfied"), which never names the proof.
impl<'a, P: Proof> NodeRef<'a, P> {
    fn io(&self) -> IoRef<'a>
    where
        P: IoProof,
    {
        NodeRef {
            node: self.node,
            _proof: PhantomData,
        }
    }

    fn enter(&self) -> &'a dyn BlockDriver
    where
        P: IoProof,
    {
        debug_assert_eq!(
            self.node.drained.load(Ordering::SeqCst),
            0,
            "blockgraph: a request reached drained node '{}'",
            self.node.name
        );
        &*self.node.driver
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read<'b>(&self, offset: u64, buf: &'b mut [u8]) -> IoFuture<'b, ()>
    where
        P: IoProof,
        'a: 'b,
    {
        self.enter().read(self.io(), offset, buf)
    }

    /// Writes `buf` at `offset`.
    pub fn write<'b>(&self, offset: u64, buf: &'b [u8]) -> IoFuture<'b, ()>
    where
        P: IoProof,
        'a: 'b,
    {
        self.enter().write(self.io(), offset, buf)
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'a, ()>
    where
        P: IoProof,
    {
        self.enter().write_zeroes(self.io(), offset, len)
    }

    /// Tells the node that `len` bytes at `offset` are no longer needed.
    pub fn discard(&self, offset: u64, len: u64) -> IoFuture<'a, ()>
    where
        P: IoProof,
    {
        self.enter().discard(self.io(), offset, len)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> IoFuture<'a, ()>
    where
        P: IoProof,
    {
        self.enter().flush(self.io())
    }

    /// What is stored at `offset`, and for how many bytes the answer holds.
    pub fn block_status(&self, offset: u64, len: u64) -> IoFuture<'a, (BlockStatus, u64)>
    where
        P: IoProof,
    {
        self.enter().block_status(self.io(), offset, len)
    }

    /// The node's size in bytes.
    pub fn length(&self) -> IoFuture<'a, u64>
    where
        P: IoProof,
    {
        self.enter().length(self.io())
    }

    /// Tells the graph that this node's length changed (a driver that
    /// resizes calls it after the resize): backends stop using the length
    /// they cached.
    pub fn notify_length_changed(&self)
    where
        P: IoProof,
    {
        if let Some(graph) = self.node.graph.upgrade() {
            graph.size_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The alignment, in bytes, every request to this node must have.
    pub fn request_alignment(&self) -> u32
    where
        P: IoProof,
    {
        self.node.driver.request_alignment(self.io())
    }
}

/// Main-loop-only: needs a [`GsRef`].
///
/// `P: MainLoopProof` is on each method for the same reason as above.
impl<'a, P: Proof> NodeRef<'a, P> {
    /// A refcounted handle to the node (QEMU's `bdrv_ref()`, which is
    /// global-state code too): handles decide node lifetime, and only the
    /// main loop manages that.
    pub fn to_handle(&self) -> NodeHandle
    where
        P: MainLoopProof,
    {
        NodeHandle(self.node.clone())
    }

    /// How many drain sections cover the node right now (QEMU's
    /// `quiesce_counter`), counting sections still waiting for requests.
    pub fn drain_count(&self) -> u32
    where
        P: MainLoopProof,
    {
        self.node.quiesce.load(Ordering::SeqCst)
    }
}

impl<P: Proof> fmt::Debug for NodeRef<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeRef")
            .field("name", &self.node.name)
            .field("driver", &self.driver_name())
            .finish()
    }
}

/// One child edge seen through a proof.
#[derive(Debug, Clone, Copy)]
pub struct ChildRef<'a, P: Proof> {
    /// What the child is to the parent.
    pub role: ChildRole,
    /// The child.
    pub node: NodeRef<'a, P>,
    /// What the parent takes and shares on the child.
    pub perms: Permissions,
}

/// One parent seen through a proof.
#[derive(Debug, Clone, Copy)]
pub enum ParentRef<'a, P: Proof> {
    /// A node that has this node as a child.
    Node {
        /// The parent node.
        node: NodeRef<'a, P>,
        /// What this node is to it.
        role: ChildRole,
    },
    /// A backend whose root this node is.
    Backend {
        /// The backend's name.
        name: &'a str,
    },
}

/// Resizing (QEMU's `bdrv_co_truncate`): the one path to
/// [`BlockDriver::truncate`], always behind a check of
/// [`Perm::RESIZE`](crate::Perm::RESIZE).
///
/// There is no `NodeRef::truncate`: a node is resized either by a backend
/// that took the permission
/// ([`BlockBackend::truncate`](crate::BlockBackend::truncate)) or by a parent
/// whose edge to it took the permission ([`NodeRef::truncate_child`]), the
/// way QEMU's `bdrv_co_truncate(BdrvChild *, …)` needs
/// `child->perm & BLK_PERM_RESIZE`. Both hand the driver a
/// [`ResizePermit`](crate::ResizePermit), which nothing else can make.
impl<'a, P: Proof> NodeRef<'a, P> {
    /// Resizes this node's `role` child to `size` bytes: for a driver whose
    /// callback resizes its child (`raw` passing a resize down, a filter,
    /// a format growing its file).
    ///
    /// The edge from this node to the child must have taken
    /// [`Perm::RESIZE`](crate::Perm::RESIZE) (this node's driver decides in
    /// [`BlockDriver::child_permissions`], from what its own users take). On
    /// return, successful or not, backends forget the lengths they cached.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchChild`](crate::Error::NoSuchChild) without a `role`
    /// child, [`Error::PermissionDenied`](crate::Error::PermissionDenied)
    /// (nothing changed) when the edge did not take the permission, and
    /// whatever the child's driver reports.
    pub fn truncate_child(&self, role: ChildRole, size: u64) -> IoFuture<'a, ()>
    where
        P: IoProof,
    {
        // SAFETY: `P` guarantees the graph does not change during 'a.
        let edges = unsafe { self.node.children.get() };
        let Some(edge) = edges.iter().find(|e| e.role == role) else {
            return Box::pin(std::future::ready(Err(crate::Error::NoSuchChild {
                node: self.name().to_owned(),
                role,
            })));
        };
        if !edge.perms.take.contains(crate::Perm::RESIZE) {
            return Box::pin(std::future::ready(Err(crate::Error::PermissionDenied {
                user: format!("node '{}' ({role} edge)", self.name()),
                perm: crate::Perm::RESIZE,
                node: edge.child.name.clone(),
                operation: "resize",
            })));
        }
        self.derive(&edge.child).resize_checked(size)
    }

    /// Resizes this node; the caller has checked that whoever asked took
    /// [`Perm::RESIZE`](crate::Perm::RESIZE) on it.
    pub(crate) fn resize_checked(&self, size: u64) -> IoFuture<'a, ()>
    where
        P: IoProof,
    {
        let node = self.io();
        let driver = self.enter();
        Box::pin(async move {
            let result = driver
                .truncate(node, size, crate::ResizePermit::checked())
                .await;
            // Also after a failure: a resize may stop half way (a format
            // that grew its file, then failed), and a length read again is
            // never wrong.
            node.notify_length_changed();
            result
        })
    }
}
