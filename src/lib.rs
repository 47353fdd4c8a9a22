//! `blockgraph`: a live graph of block devices (QEMU's block layer) whose
//! locking rules are checked by the compiler.
//!
//! A node is reached only through a proof:
//!
//! * [`GsRef`] — on the main loop, borrowed from the [`Bql`]
//!   (QEMU's `GLOBAL_STATE_CODE()`),
//! * [`IoRef`] — under the graph read lock, borrowed from a [`ReadGuard`]
//!   (QEMU's `GRAPH_RDLOCK`),
//! * [`Drained`] — the node's users are quiesced (QEMU's drained section),
//!
//! and the graph changes only inside a write section ([`GraphWriter`]) on
//! drained nodes. Misuse does not compile; see `ui-tests/` for every rule
//! and `examples/tour.rs` for a walk through them.
//!
//! # Example
//!
//! ```
//! use blockgraph::{BackendOptions, MainLoop, drivers::{MemoryDriver, PassthroughFilter}};
//!
//! let main = MainLoop::new()?;
//! let io = main.new_io_thread("io0")?;
//!
//! // Main loop: build disk <- backend.
//! let (disk, blk) = main.run(|bql| bql.write(|w| {
//!     let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
//!     let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
//!     Ok::<_, blockgraph::Error>((disk, blk))
//! }))?;
//!
//! // I/O thread: write through the backend.
//! let b = blk.clone();
//! io.spawn(move |mut cx| async move { b.write(&mut cx, 0, &[1; 512]).await }).join()?;
//!
//! // Main loop: drain the disk and insert a filter above it, live.
//! main.run(move |bql| {
//!     let drained = bql.drain(&disk);
//!     bql.write(|w| w.insert_filter(&drained, "filter0", PassthroughFilter::new()))
//! })?;
//!
//! // The same backend now goes through the filter.
//! let data = io.spawn(move |mut cx| async move {
//!     let mut buf = [0u8; 512];
//!     blk.read(&mut cx, 0, &mut buf).await.map(|_| buf)
//! }).join()?;
//! assert_eq!(data, [1; 512]);
//! # drop(io); main.shutdown();
//! # Ok::<(), blockgraph::Error>(())
//! ```

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
mod drain;
pub mod driver;
mod error;
// tokio's sockets do not exist in loom builds (the lock's models), which
// need none of the export.
#[cfg(all(feature = "nbd-export", not(loom)))]
pub mod export;
mod graph;
mod proof;
mod runtime;
mod sync;

pub use backend::{BackendOptions, BlockBackend};
pub use driver::{BlockDriver, BlockStatus, IoFuture, ResizePermit};
pub use error::{Error, Result};
pub use graph::edge::{ChildRole, Perm, Permissions};
pub use graph::node::NodeHandle;
pub use graph::{BackendRef, GraphView};
pub use proof::{
    Bql, CallbackRef, ChildRef, Drained, GlobalState, GraphWriter, GsRef, InCallback, InRequest,
    IoContext, IoCx, IoProof, IoRef, MainCx, MainLoopProof, NodeRef, NodeRequest, OutsideRequest,
    ParentRef, Proof, ReadFuture, ReadGuard, ReadLocked, RequestRef, SeesParents,
};
pub use runtime::{IoThread, MainLoop, TaskHandle};

/// The built-in drivers.
pub mod drivers {
    pub use crate::driver::qcow2::{self, Qcow2Driver, Qcow2Options};
    pub use crate::driver::CopyOnRead;
    pub use crate::driver::{
        FaultAction, FaultController, FaultInjector, FaultOp, FaultRule, RuleId,
    };
    pub use crate::driver::{FileDriver, FileOptions, RawDriver};
    pub use crate::driver::{MemoryDriver, NullDriver, PassthroughFilter};
    pub use crate::driver::{ThrottleConfig, ThrottleDriver, ThrottleGroup, ThrottleLimit};
}

/// Zero cost: proofs are at most one pointer wide.
mod size_checks {
    use super::*;
    use static_assertions::{assert_eq_size, assert_not_impl_any};

    assert_eq_size!(GsRef<'static>, usize);
    assert_eq_size!(IoRef<'static>, usize);
    assert_eq_size!(RequestRef<'static>, usize);
    assert_eq_size!(Drained<'static>, usize);
    assert_eq_size!(ReadGuard<'static>, usize);
    assert_eq_size!(GraphWriter<'static>, usize);
    assert_not_impl_any!(GsRef<'static>: Send, Sync);
    assert_not_impl_any!(CallbackRef<'static>: Send, Sync);
    assert_eq_size!(CallbackRef<'static>, usize);
    static_assertions::assert_impl_all!(IoRef<'static>: Send, Sync, Copy);
    static_assertions::assert_impl_all!(RequestRef<'static>: Send, Sync, Copy);
}
