//! Interior-mutability cells whose access rules are the graph's proofs.

use std::cell::{RefCell, UnsafeCell};
use std::thread::{self, ThreadId};

/// Graph structure (children, parents, node lists) shared between the main
/// loop and the I/O threads.
///
/// # Access contract
///
/// * Shared access ([`GraphCell::get`]) is allowed while the graph cannot
///   change: with the read lock held (an `IoRef` / `ReadGuard` is alive), or
///   on the main-loop thread outside a mutation (a `GsRef` is alive).
/// * Exclusive access ([`GraphCell::get_mut`]) is allowed only inside a write
///   section (no reader is inside the graph) on the main-loop thread, and only
///   while no shared reference into the same cell is alive.
///
/// Every public entry point that reaches a cell carries one of the proofs
/// that establishes this, so the `unsafe` is confined to the crate's graph
/// code.
pub(crate) struct GraphCell<T> {
    value: UnsafeCell<T>,
}

// SAFETY: the cell is shared across threads, but by the access contract a
// `&mut T` only exists while no reader on any thread is inside the graph (the
// graph lock's writer side excludes them) and no `&T` on the main thread is
// alive (the borrow on `Bql` / `GraphWriter` excludes it). Shared `&T` across
// threads needs `T: Sync`; moving the cell (and dropping `T`) across threads
// needs `T: Send`.
unsafe impl<T: Send + Sync> Sync for GraphCell<T> {}

impl<T> GraphCell<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            value: UnsafeCell::new(value),
        }
    }

    /// Shared access.
    ///
    /// # Safety
    ///
    /// The caller holds a read proof for the lifetime of the returned
    /// reference (see the type's access contract).
    pub(crate) unsafe fn get(&self) -> &T {
        // SAFETY: by the caller's contract no `&mut T` exists now.
        unsafe { &*self.value.get() }
    }

    /// Exclusive access.
    ///
    /// # Safety
    ///
    /// The caller is inside a write section on the main-loop thread, and no
    /// other reference into this cell is alive while the result is.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get_mut(&self) -> &mut T {
        // SAFETY: by the caller's contract this is the only reference.
        unsafe { &mut *self.value.get() }
    }
}

/// State that only the main-loop thread ever touches (drain sections, writer
/// bookkeeping), stored inside structures that are otherwise shared.
///
/// Every access checks the calling thread, so the `Sync` impl below cannot be
/// abused from an I/O thread even by a bug in this crate.
pub(crate) struct MainCell<T> {
    owner: ThreadId,
    value: RefCell<T>,
}

// SAFETY: the `RefCell` is only reached through `MainCell::with`, which
// panics unless called on the `owner` thread, so it is never touched from
// two threads. `T: Send` makes dropping it on another thread (whoever drops
// the last `Arc` of the graph) sound.
unsafe impl<T: Send> Sync for MainCell<T> {}

impl<T> MainCell<T> {
    pub(crate) fn new(owner: ThreadId, value: T) -> Self {
        Self {
            owner,
            value: RefCell::new(value),
        }
    }

    /// Runs `f` with exclusive access.
    ///
    /// # Panics
    ///
    /// Off the main-loop thread, or if called re-entrantly from within `f`.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        assert_eq!(
            thread::current().id(),
            self.owner,
            "blockgraph: main-loop state touched off the main-loop thread"
        );
        f(&mut self.value.borrow_mut())
    }
}
