//! [`Bql`], the main-loop token (QEMU's Big QEMU Lock).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::graph::cell::ReadAccess;
use crate::graph::drain;
use crate::graph::node::NodeInner;
use crate::graph::proof::GraphView;
use crate::graph::proof::NodeHandle;
use crate::graph::proof::{Drained, DrainedAll, GlobalState, GraphWriter, GsRef};
use crate::graph::runtime::MainLoop;
use crate::graph::GraphInner;

/// Proof that the code holding it runs on the main loop and that nothing
/// else on the main loop runs at the same time (QEMU's BQL).
///
/// A `Bql` is never owned by user code: the main loop lends `&mut Bql` to a
/// synchronous closure ([`MainLoop::run`], [`MainTask::bql`](crate::MainTask::bql)).
/// Because the closure is synchronous, nothing borrowed from the `Bql` can be
/// held across an `.await`, where other main-loop code could change the
/// graph.
///
/// * `&Bql` gives read access to the graph ([`Bql::graph`], [`NodeHandle::gs`]):
///   [`GsRef`]s.
/// * `&mut Bql` is needed for everything that may change the graph or wait:
///   [`Bql::write`], [`Bql::drain`], [`Bql::block_on`]. So no `GsRef` can be
///   alive across a mutation or a nested wait (a compile error, not a bug).
///
/// `!Send` and `!Sync`; it cannot be created in safe code.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::MemoryDriver, MainLoop};
///
/// let main = MainLoop::new()?;
/// main.run(|bql| -> blockgraph::Result<()> {
///     bql.write(|w| w.add_node("disk0", MemoryDriver::new(4096), &[]))?;
///     let node = bql.graph().node("disk0").expect("just added");
///     assert_eq!(node.driver_name(), "memory");
///     Ok(())
/// })?;
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
pub struct Bql {
    pub(crate) graph: Arc<GraphInner>,
    pub(crate) main: MainLoop,
    _not_send: crate::thread::NotSend,
}

static_assertions::assert_not_impl_any!(Bql: Send, Sync);

impl Bql {
    /// # Safety
    ///
    /// Called on the main-loop thread of `main`, and the result is only lent
    /// out as `&mut Bql` to synchronous code, one borrow at a time (checked by
    /// [`crate::thread::BqlScope`]).
    pub(crate) unsafe fn new(graph: Arc<GraphInner>, main: MainLoop) -> Self {
        Bql {
            graph,
            main,
            _not_send: PhantomData,
        }
    }

    /// The graph, for reading.
    pub fn graph(&self) -> GraphView<'_, GlobalState> {
        // SAFETY: the token is this graph's.
        unsafe { GraphView::new(&self.graph, self.access()) }
    }

    /// A read token for this graph, valid while `self` stays borrowed.
    pub(crate) fn access(&self) -> ReadAccess<'_> {
        // SAFETY: `&self` is a `&Bql` borrow on the main-loop thread:
        // mutations need `&mut Bql` (the write section mints its token
        // inside `Bql::write(&mut self)`), so the graph cannot change while
        // this borrow lives, and no `&mut` from a write token is alive now
        // (the one write section of this thread would hold `&mut Bql`).
        unsafe { ReadAccess::assume() }
    }

    /// Shortcut for `self.graph().node(name)`.
    pub fn node(&self, name: &str) -> Option<GsRef<'_>> {
        self.graph().node(name)
    }

    /// A handle to the main loop, to create I/O threads or spawn tasks.
    pub fn main_loop(&self) -> &MainLoop {
        &self.main
    }

    /// Drains `node`: stops new requests reaching it, waits for the ones in
    /// flight and returns the proof. The section ends when the [`Drained`] is
    /// dropped.
    ///
    /// This is a synchronous wait on the main-loop thread, so it needs the
    /// `Bql` exclusively: no `GsRef` may be alive across it. Other main-loop
    /// tasks do not run during the wait; the requests it waits for run on
    /// I/O threads and never need the main loop. Async main-loop code should
    /// use [`MainTask::drain`](crate::MainTask::drain) instead.
    ///
    /// # Panics
    ///
    /// If `node` belongs to another main loop's graph.
    pub fn drain<'g>(&mut self, node: &'g NodeHandle) -> Drained<'g> {
        self.check_graph(&node.0);
        let drained = drain::begin(&self.graph, &node.0);
        futures::executor::block_on(drain::wait(drained.state()));
        drain::finish_wait(drained.state());
        drained
    }

    /// Every node of the graph as a plain value (QEMU's
    /// `query-named-block-nodes`): driver, file, size, read-only, backing
    /// chain, children with roles and permissions, users, requests in
    /// flight, drain count and what the driver reports. Serialisable with
    /// the `serde` cargo feature.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let nodes = main.run(|bql| -> blockgraph::Result<_> {
    ///     let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))?;
    ///     bql.write(|w| w.add_backend("vda", &disk, BackendOptions::default()))?;
    ///     Ok(bql.query_nodes())
    /// })?;
    /// assert_eq!(nodes[0].name, "disk");
    /// assert_eq!(nodes[0].parents, ["backend 'vda'"]);
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn query_nodes(&self) -> Vec<crate::NodeInfo> {
        crate::graph::query::nodes(&self.graph, self.access())
    }

    /// Every backend as a plain value (QEMU's `query-block` with
    /// `query-blockstats`' counters): root, permissions, drain state,
    /// requests in flight and I/O statistics.
    pub fn query_backends(&self) -> Vec<crate::BackendInfo> {
        crate::graph::query::backends(&self.graph, self.access())
    }

    /// Drains every node of the graph (QEMU's `bdrv_drain_all_begin`):
    /// every backend queues new requests, the ones in flight finish, and
    /// nodes added while the section lives start drained. The section ends
    /// when the [`DrainedAll`] is dropped; [`DrainedAll::drained`] lends the
    /// [`Drained`](crate::Drained) a mutation wants for any node.
    ///
    /// A synchronous wait, like [`Bql::drain`]; async main-loop code uses
    /// [`MainTask::drain_all`](crate::MainTask::drain_all).
    pub fn drain_all(&mut self) -> DrainedAll {
        let drained = drain::begin_all(&self.graph);
        futures::executor::block_on(drain::wait(drained.state()));
        drain::finish_wait(drained.state());
        drained
    }

    /// Runs `f` inside a write section: waits until no reader is inside the
    /// graph, then lets `f` change it. Readers that arrive meanwhile queue and
    /// resume when the section ends.
    ///
    /// Synchronous wait, hence `&mut self`: no `GsRef` survives a mutation.
    /// Async main-loop code should use [`MainTask::write`](crate::MainTask::write).
    pub fn write<R>(&mut self, f: impl FnOnce(&mut GraphWriter<'_>) -> R) -> R {
        let held = crate::graph::proof::graph_writer::WriteLockHeld::announce(&self.graph);
        futures::executor::block_on(held.readers_gone());
        let _section = held.enter();
        // SAFETY: the writer flag is up and every reader has left; we are on
        // the main-loop thread and `&mut self` excludes every `GsRef`.
        let mut writer = unsafe { GraphWriter::new(&self.graph) };
        f(&mut writer)
    }

    /// The nested event loop: runs `future` to completion on the main-loop
    /// thread (QEMU's `AIO_WAIT_WHILE`, `bdrv_poll_co`).
    ///
    /// It needs the `Bql` exclusively, so no proof or guard borrowed from it
    /// can be alive while it runs. Other main-loop tasks are *not* polled
    /// meanwhile, so `future` must not wait for one of them (it may wait for
    /// I/O threads; that is what it is for).
    pub fn block_on<F: Future>(&mut self, future: F) -> F::Output {
        futures::executor::block_on(future)
    }

    pub(crate) fn check_graph(&self, node: &NodeInner) {
        if !node.belongs_to(&self.graph) {
            panic!(
                "blockgraph: {}",
                crate::Error::WrongGraph {
                    what: format!("node '{}'", node.name)
                }
            );
        }
    }
}

impl std::fmt::Debug for Bql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bql").finish_non_exhaustive()
    }
}
