//! The proofs: values whose existence shows that a locking rule holds.
//!
//! | proof | shows | QEMU |
//! |---|---|---|
//! | [`Bql`] | this code runs on the main loop, and nothing else on it runs now | the BQL, `GLOBAL_STATE_CODE()` |
//! | [`GsRef`] | a node seen from main-loop code; the graph cannot change while it lives | `bdrv_graph_rdlock_main_loop()` |
//! | [`ReadGuard`] | the graph is read-locked by this task | `bdrv_graph_co_rdlock()` |
//! | [`IoRef`] | a node seen under a read guard; a request made through it enters the graph there | a `GRAPH_RDLOCK` function's `bs` |
//! | [`RequestRef`] | a node seen by its own driver inside a request | the `bs` a driver's I/O callback receives |
//! | [`CallbackRef`] | a node seen by its own driver in a main-loop callback | the `bs` of `.bdrv_open`, `.bdrv_drain_begin` |
//! | [`Drained`] | no request can reach this node | `bdrv_drained_begin()` … `end()` |
//! | [`GraphWriter`] | no reader is inside the graph; the graph may change | `bdrv_graph_wrlock()` |

mod bql;
mod drained;
mod graph_writer;
mod io_cx;
mod main_cx;
mod node_ref;

pub use bql::Bql;
pub use drained::Drained;
pub use graph_writer::GraphWriter;
pub use io_cx::{IoContext, IoCx, ReadFuture, ReadGuard};
pub use main_cx::MainCx;
pub use node_ref::{
    CallbackRef, ChildRef, GlobalState, GsRef, InCallback, InRequest, IoProof, IoRef,
    MainLoopProof, NodeRef, NodeRequest, OutsideRequest, ParentRef, Proof, ReadLocked, RequestRef,
    SeesParents,
};

pub(crate) use drained::DrainedState;

/// Makes a type `!Send` and `!Sync` with a name that says why: a field of
/// type `PhantomData<dyn MainLoopThreadOnly>` puts "`dyn MainLoopThreadOnly`
/// cannot be sent between threads safely" at the top of the compile error
/// when a main-loop proof is moved to another thread.
pub(crate) trait MainLoopThreadOnly {}

/// The marker field itself.
pub(crate) type NotSend = std::marker::PhantomData<dyn MainLoopThreadOnly>;
