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
//! use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, BackendOptions, MainLoop};
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

// The layers, bottom to top. Each module imports only from the ones above
// it in this list (checked by `tests/module_layers.rs`; DESIGN.md §11).
mod backend;
pub mod driver;
pub mod drivers;
mod graph;
pub mod job;
#[cfg(all(any(feature = "nbd-export", feature = "nbd-client"), not(loom)))]
mod nbd;
mod sync;
mod thread;
mod types;
// tokio's sockets do not exist in loom builds (the lock's models), which
// need none of the export.
#[cfg(all(feature = "nbd-export", not(loom)))]
pub mod export;
pub mod snapshot;

pub use backend::BlockBackend;
pub use graph::backend::BackendOptions;
pub use graph::dirty_bitmap::{DirtyBitmapOptions, DirtyBitmapSnapshot};
pub use graph::permission::MAX_GRAPH_DEPTH;
pub use graph::proof::{
    BackendRef, Bql, CallbackRef, ChildRef, Drained, DrainedAll, GlobalState, GraphView,
    GraphWriter, GsRef, InCallback, InRequest, IoProof, IoRef, MainLoopProof, NodeHandle, NodeRef,
    NodeRequest, OutsideRequest, ParentRef, Proof, ReadFuture, ReadGuard, ReadLocked, RequestRef,
    SeesParents,
};
pub use graph::runtime::{
    IoContext, IoTask, IoThread, IoThreadHandle, MainLoop, MainTask, TaskHandle,
};
pub use types::{BackendInfo, ChildInfo, DirtyBitmapInfo, IoStats, NodeInfo};
pub use types::{ChildRole, Error, Perm, Permissions, Result};
pub use types::{IoBuf, IoVec, IoVecMut, IO_BUF_ALIGN};

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
