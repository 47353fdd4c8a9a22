//! [`NodeRef`], the one way to look inside a node, and its three flavours
//! [`GsRef`], [`IoRef`] and [`RequestRef`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::graph::cell::ReadAccess;
use crate::graph::driver::{BlockDriver, IoFuture};
use crate::graph::edge::ParentLink;
use crate::graph::node::NodeInner;
use crate::graph::proof::NodeHandle;
use crate::types::BlockStatus;
use crate::types::{ChildRole, Permissions};
use crate::types::{Error, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

pub(crate) mod sealed {
    use super::*;

    pub trait Sealed {}

    /// The node a request is for, with its read token. Only the crate can
    /// make one.
    pub struct Target<'b> {
        pub(crate) node: &'b Arc<NodeInner>,
        pub(crate) access: ReadAccess<'b>,
        /// The range a write, zeroing or discard changes, when the node has
        /// enabled dirty bitmaps to mark once it succeeds (DESIGN §15).
        pub(crate) dirty: Option<(u64, u64)>,
    }

    /// How a request made through a node reference of this kind reaches
    /// the node's driver. Sealed: users can neither implement nor call it.
    pub trait Dispatch: Sealed {
        /// Hands the request to the node's driver, with the node's own
        /// [`RequestRef`].
        fn dispatch<'b, T: Send + 'b>(
            target: Target<'b>,
            call: impl FnOnce(&'b dyn BlockDriver, RequestRef<'b>) -> IoFuture<'b, T>,
        ) -> NodeRequest<'b, T>;
    }
}

/// Which lock a [`NodeRef`] was obtained under. Sealed: only
/// [`GlobalState`], [`ReadLocked`] and [`InRequest`] exist.
pub trait Proof: sealed::Sealed + 'static {}

/// Implemented only by [`GlobalState`]: operations bounded by it are
/// main-loop-only (QEMU's `GLOBAL_STATE_CODE()`).
#[diagnostic::on_unimplemented(
    message = "this is a main-loop-only operation, and an `IoRef` only proves that the graph is read-locked",
    label = "needs a `GsRef` (main-loop proof, from `Bql`), found a node reference of kind `{Self}`",
    note = "main-loop-only operations take a `GsRef`; I/O code reaches the main loop with `IoTask::run_on_main_loop` after dropping its read guard"
)]
pub trait MainLoopProof: Proof {}

/// Implemented by [`ReadLocked`] and [`InRequest`]: I/O needs the graph
/// read lock.
#[diagnostic::on_unimplemented(
    message = "I/O needs an `IoRef`: the proof that this task holds the graph read lock",
    label = "this node reference is of kind `{Self}`, not an `IoRef`",
    note = "take the read lock once at the top of the request (`IoTask::read().await`) and pass the `IoRef` down; main-loop code submits I/O to an `IoThread`"
)]
pub trait IoProof: Proof + sealed::Dispatch {}

/// Implemented by [`GlobalState`], [`ReadLocked`] and [`InCallback`], not
/// by [`InRequest`]: a driver's I/O callback sees its own node and what lies
/// below it, never its parents (a request only goes down the graph;
/// rule 18).
#[diagnostic::on_unimplemented(
    message = "a driver's I/O callback cannot look at its parents through a `RequestRef`",
    label = "this is a `RequestRef` (`{Self}`): it reaches the node's children only",
    note = "a request goes down the graph: every request that reaches a node is counted where it entered, above it (rule 18)"
)]
pub trait SeesParents: Proof {}

/// Implemented by [`GlobalState`] and [`ReadLocked`] only: code outside
/// driver callbacks may reach a node's driver; a callback (which gets a
/// [`RequestRef`] or a [`CallbackRef`]) may not reach any node's driver, so
/// it cannot call another driver's callbacks (rule 18: callbacks are called
/// only by the graph, always with their own node).
#[diagnostic::on_unimplemented(
    message = "a driver callback cannot reach drivers through its node reference",
    label = "this node reference (`{Self}`) was handed to a driver callback",
    note = "driver callbacks are called only by the graph, always with their own node (rule 18); a driver uses `self`"
)]
pub trait OutsideRequest: SeesParents {}

/// Marker for node references obtained on the main loop (see [`GsRef`]).
///
/// `!Send` and `!Sync`: main-loop proofs never leave the main-loop thread.
#[derive(Debug, Clone, Copy)]
pub struct GlobalState {
    _not_send: crate::thread::NotSend,
}

/// Marker for node references obtained from a read guard (see [`IoRef`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadLocked {
    _private: (),
}

/// Marker for the node references a driver's I/O callback receives (see
/// [`RequestRef`]).
#[derive(Debug, Clone, Copy)]
pub struct InRequest {
    _private: (),
}

/// Marker for the node references a driver's main-loop callback receives
/// (see [`CallbackRef`]). `!Send` and `!Sync`, like [`GlobalState`].
#[derive(Debug, Clone, Copy)]
pub struct InCallback {
    _not_send: crate::thread::NotSend,
}

impl sealed::Sealed for GlobalState {}
impl sealed::Sealed for ReadLocked {}
impl sealed::Sealed for InRequest {}
impl sealed::Sealed for InCallback {}
impl Proof for GlobalState {}
impl Proof for ReadLocked {}
impl Proof for InRequest {}
impl Proof for InCallback {}
impl MainLoopProof for GlobalState {}
impl MainLoopProof for InCallback {}
impl IoProof for ReadLocked {}
impl IoProof for InRequest {}
impl SeesParents for GlobalState {}
impl SeesParents for ReadLocked {}
impl SeesParents for InCallback {}
impl OutsideRequest for GlobalState {}
impl OutsideRequest for ReadLocked {}

/// A node seen from main-loop code (QEMU: a `bs` in `GLOBAL_STATE_CODE()`).
///
/// Borrowed from [`Bql`](crate::Bql) (or from a [`GraphWriter`](crate::GraphWriter)),
/// so it cannot survive a graph mutation or the nested event loop, both of
/// which need the `Bql` exclusively. `!Send`. One pointer wide.
pub type GsRef<'b> = NodeRef<'b, GlobalState>;

/// A node seen under a read guard (QEMU: a `bs` in a `GRAPH_RDLOCK`
/// function that starts a request).
///
/// Borrowed from a [`ReadGuard`](crate::ReadGuard): it cannot outlive the
/// read lock. `Send`, so I/O futures may migrate between threads. One
/// pointer wide. A request made through it *enters* the graph at this node:
/// it is counted in the node's in-flight requests, which every drain
/// covering the node waits for, and it is refused with
/// [`Error::Drained`] while a drain section covers the node.
pub type IoRef<'r> = NodeRef<'r, ReadLocked>;

/// A node seen by its own driver in a main-loop callback (`open`, `close`,
/// `reopen`, `drained_begin`, `drained_end`; QEMU: the `bs` of a
/// `.bdrv_open`, `.bdrv_drain_begin`, …).
///
/// Everything a [`GsRef`] can do except reach drivers: only the graph makes
/// one, for the node whose driver it calls, so main-loop callbacks cannot be
/// called from outside the graph (a `GsRef` is not a `CallbackRef`), nor by
/// one driver on another node (rule 18). `!Send`. One pointer wide.
pub type CallbackRef<'b> = NodeRef<'b, InCallback>;

/// A node seen by its own driver inside a request (QEMU: the `bs` a
/// driver's `bdrv_co_preadv` receives).
///
/// Only the crate makes one: it hands the driver of a node a `RequestRef`
/// of that very node when a request reaches it, so driver callbacks cannot
/// be called from outside the request path, nor with another node
/// (rule 18). The driver reaches its children with [`NodeRef::child`] and
/// passes the request down with the same proof; those requests are part of
/// the one that entered above and are not counted again. It cannot look up
/// at parents or reach other nodes' drivers ([`OutsideRequest`]). `Send`,
/// `Copy`, one pointer wide.
pub type RequestRef<'r> = NodeRef<'r, InRequest>;

/// A node seen under a proof `P` that the graph cannot change during `'a`.
///
/// Use the aliases [`GsRef`], [`IoRef`] and [`RequestRef`]. Everything
/// readable about a node (name, children, permissions) is here for all;
/// I/O needs `P:` [`IoProof`]; main-loop-only operations need
/// `P = GlobalState`. Calling one with the wrong proof is a compile error
/// that names the missing proof.
pub struct NodeRef<'a, P: Proof> {
    node: &'a Arc<NodeInner>,
    access: ReadAccess<'a>,
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
    /// `node` belongs to the graph `access` was minted for, and `P` is the
    /// rule that minted it: the main-loop lock borrowed for `'a`
    /// (`GlobalState`), a read guard borrowed for `'a` (`ReadLocked`), or a
    /// request the crate is dispatching to `node`'s own driver
    /// (`InRequest`).
    #[inline]
    pub(crate) unsafe fn new(node: &'a Arc<NodeInner>, access: ReadAccess<'a>) -> Self {
        NodeRef {
            node,
            access,
            _proof: PhantomData,
        }
    }

    /// Same proof, a node reached through the graph (so of the same graph).
    #[inline]
    fn derive(&self, node: &'a Arc<NodeInner>) -> NodeRef<'a, P> {
        NodeRef {
            node,
            access: self.access,
            _proof: PhantomData,
        }
    }

    #[inline]
    fn target(&self) -> sealed::Target<'a> {
        sealed::Target {
            node: self.node,
            access: self.access,
            dirty: None,
        }
    }

    /// The target of a request that changes `[offset, offset + len)`: its
    /// dirty bitmaps are marked when it succeeds. One relaxed load when the
    /// node records nothing.
    #[inline]
    fn target_changing(&self, offset: u64, len: u64) -> sealed::Target<'a> {
        sealed::Target {
            node: self.node,
            access: self.access,
            dirty: self.node.bitmaps.recording().then_some((offset, len)),
        }
    }

    /// The node itself (crate-internal).
    #[inline]
    pub(crate) fn inner(&self) -> &'a Arc<NodeInner> {
        self.node
    }

    /// The node's unique name.
    pub fn name(&self) -> &'a str {
        &self.node.name
    }

    /// The driver's format name (`"null"`, `"memory"`, `"filter"`, …).
    pub fn driver_name(&self) -> &'static str {
        self.node.driver.format_name()
    }

    /// A one-line description of the driver (see [`BlockDriver::describe`]).
    pub fn describe(&self) -> String {
        self.node.driver.describe()
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
        let access = self.access;
        let edges = self.node.children.get(access);
        edges.iter().map(move |e| ChildRef {
            role: e.role,
            node: NodeRef {
                node: &e.child,
                access,
                _proof: PhantomData,
            },
            perms: e.perms,
        })
    }

    /// The child with `role`, if any.
    #[inline]
    pub fn child(&self, role: ChildRole) -> Option<NodeRef<'a, P>> {
        let edges = self.node.children.get(self.access);
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
}

/// Looking up and sideways: not from inside a request.
impl<'a, P: Proof> NodeRef<'a, P> {
    /// The driver instance, for driver-specific queries.
    pub fn driver(&self) -> &'a dyn BlockDriver
    where
        P: OutsideRequest,
    {
        &*self.node.driver
    }

    /// The driver instance as its concrete type, if it is a `D`.
    pub fn driver_as<D: BlockDriver>(&self) -> Option<&'a D>
    where
        P: OutsideRequest,
    {
        let any: &'a dyn Any = &*self.node.driver;
        any.downcast_ref::<D>()
    }

    /// Everything that uses this node: parent nodes and backends.
    pub fn parents(&self) -> impl ExactSizeIterator<Item = ParentRef<'a, P>> + 'a
    where
        P: SeesParents,
    {
        let access = self.access;
        let links = self.node.parents.get(access);
        links.iter().map(move |l| match l {
            ParentLink::Node { parent, role } => ParentRef::Node {
                node: NodeRef {
                    node: parent,
                    access,
                    _proof: PhantomData,
                },
                role: *role,
            },
            ParentLink::Backend(b) => ParentRef::Backend { name: &b.name },
        })
    }

    /// What all parents together take on this node, and what all of them
    /// share.
    pub fn parent_permissions(&self) -> Permissions
    where
        P: SeesParents,
    {
        crate::graph::permission::incoming(self.node, self.access)
    }
}

/// I/O: needs an [`IoRef`] (a request entering here) or a [`RequestRef`]
/// (a driver passing its request down).
///
/// The `P: IoProof` bound sits on each method, not on the `impl`: a bound on
/// a method fails with E0277 and shows `IoProof`'s `on_unimplemented`
/// message, while a bound on the `impl` only gives E0599 ("method exists but
/// its trait bounds were not satisfied"), which never names the proof.
impl<'a, P: Proof> NodeRef<'a, P> {
    /// Reads `buf.len()` bytes at `offset`.
    pub fn read<'b>(&self, offset: u64, buf: &'b mut [u8]) -> NodeRequest<'b, ()>
    where
        P: IoProof,
        'a: 'b,
    {
        P::dispatch(self.target(), move |d, n| d.read(n, offset, buf))
    }

    /// Writes `buf` at `offset`.
    pub fn write<'b>(&self, offset: u64, buf: &'b [u8]) -> NodeRequest<'b, ()>
    where
        P: IoProof,
        'a: 'b,
    {
        P::dispatch(
            self.target_changing(offset, buf.len() as u64),
            move |d, n| d.write(n, offset, buf),
        )
    }

    /// Reads `iov.len()` bytes at `offset` into the regions of `iov`, in
    /// order, without an intermediate buffer where the drivers below can
    /// pass the regions on ([`BlockDriver::readv`]).
    ///
    /// Needs the same proof as [`read`](Self::read): the vector is lent
    /// for `'b`, no longer than the read lock (`'a: 'b`).
    pub fn readv<'b>(&self, offset: u64, iov: IoVecMut<'b>) -> NodeRequest<'b, ()>
    where
        P: IoProof,
        'a: 'b,
    {
        P::dispatch(self.target(), move |d, n| d.readv(n, offset, iov))
    }

    /// Writes the regions of `iov`, in order, at `offset`
    /// ([`BlockDriver::writev`]); marks dirty bitmaps as
    /// [`write`](Self::write) does.
    pub fn writev<'b>(&self, offset: u64, iov: IoVec<'b>) -> NodeRequest<'b, ()>
    where
        P: IoProof,
        'a: 'b,
    {
        P::dispatch(
            self.target_changing(offset, iov.len() as u64),
            move |d, n| d.writev(n, offset, iov),
        )
    }

    /// Reads `buf.len()` bytes at `offset` into a buffer the request owns
    /// and hands it back ([`BlockDriver::read_buf`]): where the drivers
    /// below can, the buffer goes to the kernel as it is.
    ///
    /// Needs the same proof as [`read`](Self::read); the buffer is not
    /// borrowed, so the request lives as long as the proof (`'a`).
    pub fn read_buf(&self, offset: u64, buf: IoBuf) -> NodeRequest<'a, IoBuf>
    where
        P: IoProof,
    {
        P::dispatch(self.target(), move |d, n| d.read_buf(n, offset, buf))
    }

    /// Writes a buffer the request owns at `offset` and hands it back
    /// ([`BlockDriver::write_buf`]); marks dirty bitmaps as
    /// [`write`](Self::write) does.
    pub fn write_buf(&self, offset: u64, buf: IoBuf) -> NodeRequest<'a, IoBuf>
    where
        P: IoProof,
    {
        let len = buf.len() as u64;
        P::dispatch(self.target_changing(offset, len), move |d, n| {
            d.write_buf(n, offset, buf)
        })
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> NodeRequest<'a, ()>
    where
        P: IoProof,
    {
        P::dispatch(self.target_changing(offset, len), move |d, n| {
            d.write_zeroes(n, offset, len)
        })
    }

    /// Tells the node that `len` bytes at `offset` are no longer needed.
    pub fn discard(&self, offset: u64, len: u64) -> NodeRequest<'a, ()>
    where
        P: IoProof,
    {
        P::dispatch(self.target_changing(offset, len), move |d, n| {
            d.discard(n, offset, len)
        })
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> NodeRequest<'a, ()>
    where
        P: IoProof,
    {
        P::dispatch(self.target(), |d, n| d.flush(n))
    }

    /// Flushes as for closing the node ([`BlockDriver::flush_to_close`]:
    /// qcow2 also stores its persistent dirty bitmaps). The node stays
    /// usable.
    pub fn flush_to_close(&self) -> NodeRequest<'a, ()>
    where
        P: IoProof,
    {
        P::dispatch(self.target(), |d, n| d.flush_to_close(n))
    }

    /// What is stored at `offset`, and for how many bytes the answer holds.
    pub fn block_status(&self, offset: u64, len: u64) -> NodeRequest<'a, (BlockStatus, u64)>
    where
        P: IoProof,
    {
        P::dispatch(self.target(), move |d, n| d.block_status(n, offset, len))
    }

    /// The node's size in bytes.
    pub fn length(&self) -> NodeRequest<'a, u64>
    where
        P: IoProof,
    {
        P::dispatch(self.target(), |d, n| d.length(n))
    }

    /// Tells the graph that this node's length changed (a driver that
    /// resizes calls it after the resize): backends stop using the length
    /// (and request alignment) they cached.
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
        self.node.driver.request_alignment(self.as_request())
    }

    /// The same node as its driver sees it (crate-internal: only the
    /// request path hands out `RequestRef`s).
    #[inline]
    pub(crate) fn as_request(&self) -> RequestRef<'a>
    where
        P: IoProof,
    {
        NodeRef {
            node: self.node,
            access: self.access,
            _proof: PhantomData,
        }
    }
}

/// Requests that enter the graph here.
impl<'a> IoRef<'a> {
    /// Runs a driver-specific operation of this node's own driver `driver`
    /// as one request entering here (counted like any other, refused while
    /// the node is drained): `op` receives the node as its driver sees it.
    ///
    /// This is how a driver's own public operations (qcow2's `check`, say)
    /// reach their node from code holding a read guard. Fails with
    /// [`Error::InvalidArgument`] if `driver` is not this node's driver, so
    /// the [`RequestRef`] handed to `op` is always that of the driver's own
    /// node.
    pub fn enter_own<D: BlockDriver, T: Send + 'a>(
        &self,
        driver: &D,
        op: impl FnOnce(RequestRef<'a>) -> IoFuture<'a, T>,
    ) -> NodeRequest<'a, T> {
        let own: &dyn BlockDriver = &*self.node.driver;
        if !std::ptr::eq(
            own as *const dyn BlockDriver as *const (),
            driver as *const D as *const (),
        ) {
            return NodeRequest::refused(Error::InvalidArgument(format!(
                "this {} driver is not the driver of node '{}'",
                driver.format_name(),
                self.node.name
            )));
        }
        <ReadLocked as sealed::Dispatch>::dispatch(self.target(), move |_, n| op(n))
    }

    /// A flush to close ([`BlockDriver::flush_to_close`]) entering here
    /// for the owner of a drain section of this node
    /// ([`Drained::flush`](crate::Drained::flush)): counted like any
    /// request (other drains wait for it), but not refused because the
    /// node is drained — the drain keeps the node's *users* out, not the
    /// section's owner (QEMU's `bdrv_flush` inside `bdrv_drained_begin`).
    pub(crate) fn flush_for_drain_owner(&self) -> NodeRequest<'a, ()> {
        let admission = Admission::enter_unchecked(self.node);
        let request = self.as_request();
        NodeRequest {
            state: RequestState::Entered {
                future: self.node.driver.flush_to_close(request),
                admission,
                dirty: None,
            },
        }
    }

    /// Enters a request here for crate code that passes it down itself
    /// (a format driver probing or creating an image on a protocol node).
    pub(crate) fn admit(&self) -> Result<(Admission<'a>, RequestRef<'a>)> {
        let admission = Admission::enter(self.node)?;
        Ok((admission, self.as_request()))
    }
}

/// One request counted in a node's in-flight requests; leaving wakes a
/// waiting drain.
pub(crate) struct Admission<'a> {
    node: &'a NodeInner,
}

impl<'a> Admission<'a> {
    /// Counts a request in, unless a drain section covers the node.
    ///
    /// One RMW on the word whose top bit the drain raises with its own RMW
    /// before it reads the count: in that word's modification order either
    /// this increment comes first (the drain sees it and waits for it) or
    /// the bit does (this request sees it and backs out).
    #[inline]
    fn enter(node: &'a NodeInner) -> Result<Self> {
        let before = node.in_flight.fetch_add(1, Ordering::SeqCst);
        let admission = Admission { node };
        if before & NodeInner::QUIESCED != 0 {
            drop(admission);
            return Err(drained(node));
        }
        Ok(admission)
    }
}

impl<'a> Admission<'a> {
    /// Counts a request in even while a drain section covers the node.
    fn enter_unchecked(node: &'a NodeInner) -> Self {
        node.in_flight.fetch_add(1, Ordering::SeqCst);
        Admission { node }
    }
}

/// The error of a request refused because `node` is drained, out of line:
/// the check is on every request's path, the refusal is not.
#[cold]
#[inline(never)]
fn drained(node: &NodeInner) -> Error {
    Error::Drained {
        node: node.name.clone(),
    }
}

impl Drop for Admission<'_> {
    #[inline]
    fn drop(&mut self) {
        let before = self.node.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == NodeInner::QUIESCED + 1 {
            // The last request out of a node a drain waits for.
            self.node.idle.wake_all();
        }
    }
}

/// The future of a request made through a node reference: the driver's
/// future, and, for a request that entered the graph here through an
/// [`IoRef`], its place in the node's in-flight requests until it completes
/// or is dropped.
///
/// A driver returns it as its own [`IoFuture`] with `.into()`, which costs
/// nothing for a request passed down through a [`RequestRef`] (the driver's
/// boxed future is handed over as it is).
///
/// # Cancel safety
///
/// Dropping it drops the driver's future (as dropping any request does) and
/// stops counting it.
#[must_use = "futures do nothing unless awaited"]
pub struct NodeRequest<'b, T> {
    state: RequestState<'b, T>,
}

enum RequestState<'b, T> {
    /// Passed down inside a request: nothing to count.
    Forwarded(IoFuture<'b, T>),
    /// Passed down to a node with enabled dirty bitmaps: marks them with
    /// `dirty` when it succeeds (QEMU's `bdrv_co_write_req_finish`).
    Marking {
        future: IoFuture<'b, T>,
        node: &'b NodeInner,
        dirty: (u64, u64),
    },
    /// Entered here: counted until done (and marks the node's dirty
    /// bitmaps with `dirty`, if any, when it succeeds).
    Entered {
        future: IoFuture<'b, T>,
        admission: Admission<'b>,
        dirty: Option<(u64, u64)>,
    },
    Refused(Error),
    Done,
}

impl<'b, T> NodeRequest<'b, T> {
    fn refused(error: Error) -> Self {
        NodeRequest {
            state: RequestState::Refused(error),
        }
    }
}

impl<'b, T: Send + 'b> From<NodeRequest<'b, T>> for IoFuture<'b, T> {
    #[inline]
    fn from(request: NodeRequest<'b, T>) -> IoFuture<'b, T> {
        match request.state {
            RequestState::Forwarded(future) => future,
            state => Box::pin(NodeRequest { state }),
        }
    }
}

impl<T> Future for NodeRequest<'_, T> {
    type Output = Result<T>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        // Every field is `Unpin` (the driver's future is boxed). The inner
        // poll's result is returned as it is (no copy of the `Result` into
        // a local first: that copy was measurable per request).
        let this = &mut *self;
        match &mut this.state {
            RequestState::Forwarded(future) => future.as_mut().poll(cx),
            RequestState::Entered {
                future,
                admission,
                dirty,
            } => {
                let poll = future.as_mut().poll(cx);
                if let Poll::Ready(result) = &poll {
                    // Marked before the request stops counting, so a drain
                    // that waits for it sees its bits.
                    if let (Ok(_), Some((offset, len))) = (result, *dirty) {
                        admission.node.bitmaps.mark(offset, len);
                    }
                    // Finished: stop counting before handing out the result.
                    this.state = RequestState::Done;
                }
                poll
            }
            RequestState::Marking {
                future,
                node,
                dirty,
            } => {
                let poll = future.as_mut().poll(cx);
                if let Poll::Ready(Ok(_)) = &poll {
                    node.bitmaps.mark(dirty.0, dirty.1);
                }
                poll
            }
            RequestState::Refused(_) => {
                match std::mem::replace(&mut this.state, RequestState::Done) {
                    RequestState::Refused(e) => Poll::Ready(Err(e)),
                    _ => unreachable!("matched Refused above"),
                }
            }
            RequestState::Done => panic!("NodeRequest polled after completion"),
        }
    }
}

impl<T> fmt::Debug for NodeRequest<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeRequest").finish_non_exhaustive()
    }
}

impl sealed::Dispatch for ReadLocked {
    #[inline]
    fn dispatch<'b, T: Send + 'b>(
        sealed::Target {
            node,
            access,
            dirty,
        }: sealed::Target<'b>,
        call: impl FnOnce(&'b dyn BlockDriver, RequestRef<'b>) -> IoFuture<'b, T>,
    ) -> NodeRequest<'b, T> {
        match Admission::enter(node) {
            Ok(admission) => {
                // SAFETY: the same node under the same read lock; the request
                // is being dispatched to the node's own driver.
                let request = unsafe { NodeRef::new(node, access) };
                NodeRequest {
                    state: RequestState::Entered {
                        future: call(&*node.driver, request),
                        admission,
                        dirty,
                    },
                }
            }
            Err(e) => NodeRequest::refused(e),
        }
    }
}

impl sealed::Dispatch for InRequest {
    #[inline]
    fn dispatch<'b, T: Send + 'b>(
        sealed::Target {
            node,
            access,
            dirty,
        }: sealed::Target<'b>,
        call: impl FnOnce(&'b dyn BlockDriver, RequestRef<'b>) -> IoFuture<'b, T>,
    ) -> NodeRequest<'b, T> {
        // A request passed down from the node above. Every drain covering
        // this node covers the node where the request entered (drains cover
        // every user above), and waited for it before marking anything
        // drained; so a drained node here means a request that went around
        // the entry accounting, and it fails instead of reaching the node.
        if node.drained.load(Ordering::Relaxed) != 0 {
            return NodeRequest::refused(drained(node));
        }
        // SAFETY: same node, same proof; dispatched to its own driver.
        let future = call(&*node.driver, unsafe { NodeRef::new(node, access) });
        NodeRequest {
            state: match dirty {
                None => RequestState::Forwarded(future),
                Some(dirty) => RequestState::Marking {
                    future,
                    node,
                    dirty,
                },
            },
        }
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

    /// Requests that entered the graph directly at this node (through an
    /// [`IoRef`], not a backend) and have not finished.
    pub fn in_flight(&self) -> usize
    where
        P: MainLoopProof,
    {
        self.node.requests_in_flight()
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
/// [`ResizePermit`](crate::driver::ResizePermit), which nothing else can make.
impl<'a> RequestRef<'a> {
    /// Resizes this node's `role` child to `size` bytes: for a driver whose
    /// callback resizes its child (`raw` passing a resize down, a filter,
    /// a format growing its file). Only a driver has a `RequestRef`, so only
    /// the parent itself can use its edge's permission.
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
    pub fn truncate_child(&self, role: ChildRole, size: u64) -> IoFuture<'a, ()> {
        let edges = self.node.children.get(self.access);
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
    pub(crate) fn resize_checked(&self, size: u64) -> IoFuture<'a, ()> {
        let node = *self;
        let request = <InRequest as sealed::Dispatch>::dispatch(self.target(), move |d, n| {
            d.truncate(n, size, crate::graph::driver::ResizePermit::checked())
        });
        Box::pin(async move {
            // Bitmaps follow the new size (QEMU's
            // `bdrv_dirty_bitmap_truncate`), and mark a grown area: for
            // that they need the old size, which only a driver knows.
            let old = if node.node.bitmaps.any() {
                node.length().await.ok()
            } else {
                None
            };
            let result = request.await;
            if result.is_ok() && node.node.bitmaps.any() {
                node.node.bitmaps.truncate(old, size);
            }
            // Also after a failure: a resize may stop half way (a format
            // that grew its file, then failed), and a length read again is
            // never wrong.
            node.notify_length_changed();
            result
        })
    }
}
