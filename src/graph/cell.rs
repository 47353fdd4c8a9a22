//! Interior-mutability cells whose access rules are the graph's proofs, and
//! the access tokens that open them.
//!
//! Graph structure (child and parent lists, the node and backend lists, a
//! backend's root) lives in [`GraphCell`]s. A cell opens only with a token,
//! in the pattern of the Linux kernel's `LockedBy`:
//!
//! * [`ReadAccess<'a>`] gives `&'a T`: the graph cannot change during `'a`.
//!   The read guard, the `Bql` (borrowed shared) and the write section
//!   (borrowed shared) lend one.
//! * [`WriteAccess`] gives `&mut T` when borrowed mutably: only the write
//!   section owns one, and while any `&mut` it gave out is alive the
//!   borrow checker rejects every other use of the token, including the
//!   shared reborrow a user callback would need ([`WriteAccess::read`]).
//!
//! So the exclusivity of `&mut` into graph state is proved by the borrow
//! checker, and `unsafe` remains only where a token is minted (each mint
//! site argues its lock). Tokens are zero-sized: the graph they speak for is
//! fixed by where they are minted, and nodes of another graph are refused
//! at the boundaries (`NodeHandle::gs`/`io`, backend requests, mutations)
//! before any cell of theirs is opened with the wrong token.

use std::cell::{RefCell, UnsafeCell};
use std::marker::PhantomData;
use std::thread::{self, ThreadId};

/// Proof, for `'a`, that the graph it was minted for cannot change: no
/// `&mut` into any of its cells exists or will be made during `'a`.
///
/// Zero-sized and `Copy`; `Send` and `Sync` (an `IoRef` carries one across
/// threads of a multi-thread runtime).
#[derive(Clone, Copy)]
pub(crate) struct ReadAccess<'a> {
    _lifetime: PhantomData<&'a ()>,
}

impl<'a> ReadAccess<'a> {
    /// Mints a read token.
    ///
    /// # Safety
    ///
    /// For all of `'a`, the graph whose cells this token will open does not
    /// change: the caller holds that graph's read lock, or is on its
    /// main-loop thread with the `Bql` borrowed shared, or holds a shared
    /// borrow of the write section's [`WriteAccess`] — and no `&mut` from a
    /// `WriteAccess` of that graph is alive now.
    #[inline]
    pub(crate) unsafe fn assume() -> Self {
        ReadAccess {
            _lifetime: PhantomData,
        }
    }
}

/// Proof that the holder is the graph's writer: inside a write section (no
/// reader is inside the graph), on the main-loop thread.
///
/// Not `Copy`, not `Clone`, `!Send`. `&mut WriteAccess` opens cells for
/// writing; `&WriteAccess` lends a [`ReadAccess`].
pub(crate) struct WriteAccess<'w> {
    _lifetime: PhantomData<&'w mut ()>,
    _not_send: crate::thread::NotSend,
}

impl WriteAccess<'_> {
    /// Mints the write token.
    ///
    /// # Safety
    ///
    /// A write section is active on the graph (writer flag up, every reader
    /// gone), the caller is on the main-loop thread, no `ReadAccess` of the
    /// graph is alive other than ones derived from this token, and at most
    /// one `WriteAccess` for the graph exists at a time.
    #[inline]
    pub(crate) unsafe fn assume() -> Self {
        WriteAccess {
            _lifetime: PhantomData,
            _not_send: PhantomData,
        }
    }

    /// A read token borrowed from the writer: while it lives, the writer
    /// cannot open any cell for writing.
    #[inline]
    pub(crate) fn read(&self) -> ReadAccess<'_> {
        ReadAccess {
            _lifetime: PhantomData,
        }
    }
}

/// Graph structure shared between the main loop and the I/O threads.
///
/// Opens only with a token: [`GraphCell::get`] with a [`ReadAccess`],
/// [`GraphCell::get_mut`] with `&mut` [`WriteAccess`]. A cell must only be
/// opened with tokens minted for the graph it belongs to (see the module
/// docs).
pub(crate) struct GraphCell<T> {
    value: UnsafeCell<T>,
}

// SAFETY: a `&mut T` only comes from `get_mut`, which needs `&mut
// WriteAccess`: minted only inside a write section, so no reader on any
// thread is inside the graph, and no `&T` from this graph is alive (every
// `ReadAccess` alive is a reborrow of that same token, excluded by the
// `&mut` borrow). Shared `&T` across threads needs `T: Sync`; moving the cell
// (and dropping `T`) across threads needs `T: Send`.
unsafe impl<T: Send + Sync> Sync for GraphCell<T> {}

impl<T> GraphCell<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            value: UnsafeCell::new(value),
        }
    }

    /// Shared access for as long as the token lasts.
    #[inline]
    pub(crate) fn get<'a>(&'a self, _access: ReadAccess<'a>) -> &'a T {
        // SAFETY: by `ReadAccess`'s contract no `&mut T` exists or is made
        // during 'a.
        unsafe { &*self.value.get() }
    }

    /// Exclusive access, for as long as the writer's token stays borrowed.
    #[inline]
    pub(crate) fn get_mut<'a>(&'a self, _access: &'a mut WriteAccess<'_>) -> &'a mut T {
        // SAFETY: `WriteAccess` is minted only in a write section (no reader
        // inside, main-loop thread); the `&mut` borrow of the only token
        // excludes every other reference made from it for 'a, and no other
        // token is alive (its contract).
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

    /// Runs `f` with exclusive access. `f` must not call user code.
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
