//! The atomics, `Arc`, `Mutex`, `AtomicWaker` and thread identity the lock
//! is built from.
//!
//! Under `--cfg loom` these are loom's model-checked versions, so the lock
//! protocol in [`super::graph_lock`] is explored exhaustively by the loom
//! tests without changing a line of it.

use std::cell::Cell;

#[cfg(loom)]
pub(crate) use loom::{
    future::AtomicWaker,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

#[cfg(not(loom))]
pub(crate) use futures::task::AtomicWaker;
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Mutex,
};

#[cfg(not(loom))]
std::thread_local! {
    static THREAD_ID: Cell<u64> = const { Cell::new(0) };
}

#[cfg(loom)]
loom::thread_local! {
    static THREAD_ID: Cell<u64> = Cell::new(0);
}

/// The calling thread's id if it has one yet, else 0: a single
/// thread-local load, for the fast path's comparison with a shard's owner
/// (which is never 0).
#[inline(always)]
pub(crate) fn thread_id_if_assigned() -> u64 {
    THREAD_ID.with(Cell::get)
}

/// A number naming the calling thread: never 0, never reused within the
/// process (unlike thread-local addresses or OS thread ids), one
/// thread-local load after the first call on a thread.
#[inline]
pub(crate) fn thread_id() -> u64 {
    THREAD_ID.with(|id| match id.get() {
        0 => assign_thread_id(id),
        v => v,
    })
}

#[cold]
fn assign_thread_id(slot: &Cell<u64>) -> u64 {
    // Not a modelled atomic: ids only need to be unique, they carry no data.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    slot.set(id);
    id
}

/// Marks the point right after a `SeqCst` read-modify-write (or store) on
/// which a Dekker-style argument rests.
///
/// Compiles to nothing: in the C++/Rust model the single total order of
/// `SeqCst` operations already orders the RMW before the following `SeqCst`
/// load, and on x86 the locked instruction is a full barrier. Loom treats
/// `SeqCst` accesses as `AcqRel` (it does not model that total order and
/// would report the store-buffering outcome the real model forbids), so
/// under loom this is the `fence(SeqCst)` that restores the guarantee.
#[inline(always)]
pub(crate) fn seq_cst_point() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// `AtomicWaker::register` by reference (loom's takes the waker by value
/// under that name).
#[inline]
pub(crate) fn register_waker(slot: &AtomicWaker, waker: &std::task::Waker) {
    #[cfg(loom)]
    slot.register_by_ref(waker);
    #[cfg(not(loom))]
    slot.register(waker);
}
