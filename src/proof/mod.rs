//! The proofs: values whose existence shows that a locking rule holds.
//!
//! | proof | shows | QEMU |
//! |---|---|---|
//! | [`Bql`] | this code runs on the main loop, and nothing else on it runs now | the BQL, `GLOBAL_STATE_CODE()` |
//! | [`GsRef`] | a node seen from main-loop code; the graph cannot change while it lives | `bdrv_graph_rdlock_main_loop()` |
//! | [`ReadGuard`] | the graph is read-locked by this task | `bdrv_graph_co_rdlock()` |
//! | [`IoRef`] | a node seen under a read guard | a `GRAPH_RDLOCK` function's `bs` |
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
    ChildRef, GlobalState, GsRef, IoProof, IoRef, MainLoopProof, NodeRef, ParentRef, Proof,
    ReadLocked,
};

pub(crate) use drained::DrainedState;
