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
//! | [`DrainedAll`] | no request can reach any node | `bdrv_drain_all_begin()` … `end()` |
//! | [`GraphWriter`] | no reader is inside the graph; the graph may change | `bdrv_graph_wrlock()` |

mod bitmaps;
mod bql;
mod drained;
mod graph_writer;
mod node_handle;
mod node_ref;
mod read_guard;
mod view;

pub use bql::Bql;
pub use drained::{Drained, DrainedAll};
pub use graph_writer::GraphWriter;
pub use node_handle::NodeHandle;
pub use node_ref::{
    CallbackRef, ChildRef, GlobalState, GsRef, InCallback, InRequest, IoProof, IoRef,
    MainLoopProof, NodeRef, NodeRequest, OutsideRequest, ParentRef, Proof, ReadLocked, RequestRef,
    SeesParents,
};
pub use read_guard::{ReadFuture, ReadGuard};
pub use view::{BackendRef, GraphView};

pub(crate) use drained::DrainedState;
pub(crate) use graph_writer::WriteLockHeld;
