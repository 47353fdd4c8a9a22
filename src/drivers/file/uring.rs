//! The io_uring path (`aio=io_uring`, QEMU's `block/io_uring.c`): one ring
//! per I/O thread, a pool of buffers the ring owns, and a reaper task on
//! the thread's tokio reactor that submits and completes.
//!
//! # Who owns what
//!
//! The driver API lends request buffers (`&'a mut [u8]`, `&'a [u8]`) to a
//! boxed future, and safe code may drop that future, or `mem::forget` it,
//! after polling it once: the borrow ends while an operation could still
//! be in the kernel. So the kernel never sees a caller's memory. Every
//! operation runs in a *slot* of the [`Ring`]: the slot's buffer (one of
//! [`POOL_SLOTS`] page-aligned buffers carved from one allocation, registered
//! with the kernel when it lets us, or an aligned allocation of the
//! request's size for larger requests or when the pool is in use) and the
//! operation's state (what to do, how far it got, its result, the waker)
//! belong to the ring, not to the future. A write is copied into the slot
//! before it is queued; a read is copied out after its completion, on the
//! request's own thread. The future ([`Op`]) holds only the slot's number.
//!
//! A request whose buffer it *owns* ([`IoBuf`], [`Ring::start_owned`]) is
//! the exception: the buffer moves into the operation's state, the kernel
//! works on it directly, and [`Op::into_buf`] hands it back after the
//! final completion. Until then nobody else can reach it, so it is as safe
//! to give the kernel as a slot's buffer, and it is freed (or leaked) by
//! the same rules below.
//!
//! A slot is handed back by exactly one of:
//!
//! * the [`Op`], when it is dropped after its completion;
//! * the reaper, when it reaps the final completion of an operation whose
//!   [`Op`] was dropped before (the slot was marked *orphaned*);
//! * nobody, when an [`Op`] is leaked after its completion: the slot stays
//!   taken (its memory stays allocated, nothing else uses it). Later
//!   requests are not held up: when the pool is empty they get a slot with
//!   a buffer of their own.
//!
//! The buffers live until the ring is dropped, and [`Ring`]'s `Drop` waits
//! until the kernel has completed every operation it was given before any
//! buffer is freed; if it cannot wait (the kernel refuses `io_uring_enter`,
//! which it does not do for a ring it made) the buffers are leaked rather
//! than freed. Each operation also keeps the driver's [`Host`] (its file)
//! alive until its completion, so the descriptor number in the SQE always
//! names the file it was queued for.
//!
//! # Threads and wakeups
//!
//! Rings are made only on I/O threads ([`ThreadRole::Io`]), whose tokio
//! runtimes have the I/O driver enabled. The ring's descriptor is
//! registered with that reactor ([`AsyncFd`]); a reaper task, spawned when
//! the first operation is queued and ending when none is left in the
//! kernel, submits what the requests queued (one `io_uring_enter` for all
//! the requests that ran since it last did), waits for the descriptor to
//! become readable, reaps completions, resubmits short transfers and wakes
//! the requests. On an `IoThread` the reaper is a task of the thread's
//! `LocalSet`, like the requests, so that they wake one another without a
//! trip through the reactor; elsewhere it is a plain task (see [`Reaper`]
//! for one dropped early). Everything on that thread: no futex, no other
//! thread. A
//! request polled anywhere else (the main loop, a test's own runtime, an
//! embedder's executor, the blocking pool) uses the thread pool instead,
//! per request; an [`Op`] that moves to another thread after it was queued
//! is still completed by its ring's reaper, which wakes it wherever it is
//! (the state is behind a mutex that is uncontended on the ring's thread).
//!
//! When the I/O thread stops, its last tasks run to completion, and the
//! reaper with them (it ends when nothing is left in the kernel); the
//! thread-local reference to the ring goes at thread exit, and if it was the
//! last one the ring's `Drop` waits for whatever orphaned operation is still
//! in the kernel.

use std::alloc::{self, Layout};
use std::any::Any;
use std::cell::OnceCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::sync::wake::wake_each;
use crate::thread::{
    local_set_stopping, spawn_on_local_set, thread_role, wake_when_local_set_stops, ThreadRole,
};
use crate::types::IoBuf;

/// Buffers in a ring's pool (requests in flight before they get buffers of
/// their own).
pub(super) const POOL_SLOTS: usize = 64;
/// Size of each pool buffer: larger requests get a buffer of their own.
pub(super) const SLOT_SIZE: usize = 64 << 10;
/// Memory alignment of every buffer (enough for any `O_DIRECT` device).
const MEM_ALIGN: usize = 4096;
/// The reaper, as `sync::wake` names it when a requester's waker panics.
const REAPER: &str = "the file ring's reaper";
/// Submission queue entries; the completion queue has four times as many.
const SQ_ENTRIES: u32 = 256;
/// Largest transfer in one SQE (a longer request is resubmitted in parts).
const MAX_CHUNK: usize = 1 << 30;
/// Gathered writes ([`Transfer::gather`]): the most SQEs of them in the
/// kernel per file. The rest wait in the ring, where the ones that follow
/// each other in the file are joined into one `writev`.
const GATHER_IN_KERNEL: usize = 4;
/// The most writes joined into one SQE.
const GATHER_MAX_OPS: usize = 32;
/// The most bytes joined into one SQE.
const GATHER_MAX_BYTES: usize = 1 << 20;
/// The most memory that free slots outside the pool keep for the next large
/// request, per ring: a stream of requests larger than [`SLOT_SIZE`] (an
/// NBD client's 256 KiB copies, 2 MiB conversions) reuses its buffers
/// instead of allocating and faulting in fresh pages each time.
pub(super) const RETAIN_BYTES: usize = 32 << 20;
/// The environment variable that makes io_uring unavailable (tests, and
/// administrators who want the thread pool without changing options).
pub const DISABLE_ENV: &str = "BLOCKGRAPH_NO_IO_URING";

/// Whether this process may use io_uring: the kernel has it, lets us make a
/// ring (`io_uring_disabled`, seccomp, old kernels say no), and
/// [`DISABLE_ENV`] is not set. Probed once.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let disabled = std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        !disabled && IoUring::new(2).is_ok()
    })
}

/// This thread's ring, made on first use: `None` off I/O threads, outside
/// a tokio runtime, or when the kernel refuses one (then requests use the
/// thread pool).
pub(super) fn current() -> Option<Arc<Ring>> {
    thread_local! {
        static RING: OnceCell<Option<Arc<Ring>>> = const { OnceCell::new() };
    }
    if thread_role() != ThreadRole::Io || !available() {
        return None;
    }
    RING.try_with(|cell| {
        cell.get_or_init(|| {
            // I/O threads always run inside their runtime, which has the
            // I/O driver with this feature; check anyway rather than let
            // `AsyncFd` panic.
            tokio::runtime::Handle::try_current().ok()?;
            Ring::new().ok().map(Arc::new)
        })
        .clone()
    })
    .ok()
    .flatten()
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Fill the slot's buffer from the file (past the end: zeroes).
    Read,
    /// Write the slot's buffer to the file.
    Write,
    /// `fdatasync`.
    Fsync,
}

/// What an operation is to do, for [`Ring::start`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Transfer {
    pub(super) kind: Kind,
    /// The descriptor (kept open by the operation's [`Keep`]).
    pub(super) fd: RawFd,
    pub(super) offset: u64,
    /// Bytes, from the start of the slot's buffer.
    pub(super) len: usize,
    /// Queue with `IOSQE_ASYNC` when other operations are in flight: the
    /// kernel's workers do the transfer instead of the submitting thread.
    pub(super) punt: bool,
    /// A buffered write that may wait in the ring while
    /// [`GATHER_IN_KERNEL`] writes to the same file are in the kernel, and
    /// be joined with the writes next to it into one `writev` (see
    /// "Gathered writes" in DESIGN §19). Only for files whose writes the
    /// kernel runs one at a time anyway.
    pub(super) gather: bool,
}

/// Memory the ring owns: `len` bytes aligned to [`MEM_ALIGN`], zeroed once
/// when allocated (so every byte is initialised), freed on drop.
struct Memory {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Memory {
    fn zeroed(len: usize) -> io::Result<Memory> {
        let layout = Layout::from_size_align(len.max(1), MEM_ALIGN)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "request too large"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Memory { ptr, layout })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: allocated by `alloc_zeroed` with this layout, freed once.
        // Only a `Ring` owns `Memory`, and it drops it only when no
        // operation on it is in the kernel (see `Ring`'s `Drop`).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// What is kept alive until an operation's final completion: the driver's
/// file (so its descriptor stays open) and, for writes to a direct file,
/// the range-lock guard.
pub(super) type Keep = Box<dyn Any + Send>;

/// An operation in a slot.
struct OpState {
    kind: Kind,
    /// Queued with `IOSQE_ASYNC` (see [`Ring::start`]).
    punt: bool,
    fd: RawFd,
    offset: u64,
    len: usize,
    /// Bytes transferred so far.
    done: usize,
    /// Set with the final completion.
    result: Option<io::Result<()>>,
    /// The requester, woken at the final completion.
    waker: Option<Waker>,
    /// The [`Op`] is gone: the reaper frees the slot at the final completion.
    orphaned: bool,
    keep: Option<Keep>,
    /// The caller's buffer, moved in for the operation
    /// ([`Ring::start_owned`]): the transfer uses it instead of the slot's
    /// buffer, and it stays here until [`Op::into_buf`] takes it back after
    /// the final completion (or the slot is released, which frees it).
    external: Option<IoBuf>,
    /// See [`Transfer::gather`].
    gather: bool,
    /// Its SQE counts in its [`GatherFile`] until its completion.
    gathered_sqe: bool,
    /// For the first write of a joined SQE: the other writes in it, in
    /// file order (each with its slot marked `in_kernel`).
    followers: Vec<usize>,
    /// For the first write of a joined SQE: the SQE's vector, one entry
    /// per write, kept until the completion.
    iov: Vec<libc::iovec>,
}

impl OpState {
    /// The memory the transfer uses: the moved-in buffer, else the slot's
    /// (with its registered index, if any).
    fn memory(&self, slot_ptr: NonNull<u8>, slot_fixed: Option<u16>) -> (NonNull<u8>, Option<u16>) {
        match &self.external {
            Some(buf) => (buf.as_non_null(), None),
            None => (slot_ptr, slot_fixed),
        }
    }
}

/// Gathered writes to one file ([`Transfer::gather`]).
struct GatherFile {
    fd: RawFd,
    /// SQEs of gathered writes in the kernel.
    in_kernel: usize,
    /// Gathered writes in [`Inner::pending`].
    pending: usize,
    /// Where the last gathered write queued ends: a write that starts
    /// there continues a sequential stream.
    last_end: u64,
}

/// A buffer and, while taken, its operation.
struct Slot {
    /// The buffer's first byte (in the pool, or in `own`).
    ptr: NonNull<u8>,
    cap: usize,
    /// The registered buffer's index, for `READ_FIXED`/`WRITE_FIXED`.
    fixed: Option<u16>,
    /// The buffer of a slot outside the pool.
    own: Option<Memory>,
    /// `None` when the slot is free.
    op: Option<OpState>,
    /// The operation has an SQE queued or in the kernel, rides on another
    /// write's joined SQE, or waits in [`Inner::pending`] for one: the
    /// kernel may use its memory, or will.
    in_kernel: bool,
}

/// Everything behind the ring's mutex. Field order is drop order: the
/// ring's descriptor closes before any buffer is freed.
struct Inner {
    uring: IoUring,
    /// Pool slots first (`0..POOL_SLOTS`), then slots with buffers of their
    /// own.
    slots: Vec<Slot>,
    free_pool: Vec<usize>,
    /// Free slots outside the pool: with a buffer kept for reuse (up to
    /// [`RETAIN_BYTES`] in all), or with none.
    free_own: Vec<usize>,
    /// Bytes of the buffers kept in free slots outside the pool.
    retained: usize,
    /// SQEs queued or submitted whose completion has not been reaped.
    in_kernel: usize,
    /// Gathered writes waiting for an SQE, in the order they came.
    pending: VecDeque<usize>,
    /// Per file with gathered writes in the kernel or pending: how many,
    /// and where the last one ends.
    gathered: Vec<GatherFile>,
    /// Joined SQEs (of two writes or more) submitted, and the writes they
    /// carried.
    joined_sqes: u64,
    joined_writes: u64,
    /// SQEs queued and not yet submitted.
    queued: usize,
    reaper_running: bool,
    reaper_waker: Option<Waker>,
    /// Completions copied out of the CQ (reused, so reaping allocates
    /// nothing).
    cqes: Vec<(u64, i32)>,
    /// The kernel would not let us wait for operations in flight: the
    /// buffers are leaked rather than freed.
    leak: bool,
    pool: Option<Memory>,
}

// SAFETY: the raw pointers in `Slot` point into memory owned by the same
// `Inner` (`pool`, `own`); nothing in it is tied to a thread. The ring may
// be used from any thread (`IoUring` is `Send + Sync`).
unsafe impl Send for Inner {}

/// The ring's descriptor, for the reactor.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One I/O thread's io_uring: see the module docs.
pub(super) struct Ring {
    /// Declared first: deregistered from the reactor while the descriptor
    /// (owned by `inner`) is still open.
    fd: AsyncFd<RingFd>,
    inner: Mutex<Inner>,
    /// Registered buffers are in use.
    registered: bool,
    /// Set up with `IORING_SETUP_COOP_TASKRUN`: the kernel posts
    /// completions when this thread next enters it, without interrupting
    /// it.
    coop_taskrun: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.fd.get_ref().0)
            .field("registered", &self.registered)
            .field("coop_taskrun", &self.coop_taskrun)
            .finish()
    }
}

impl Ring {
    fn new() -> io::Result<Ring> {
        // Cooperative task running where the kernel has it (5.19 and
        // later): see "Completions without interrupts" in DESIGN §19.
        let (uring, coop_taskrun) = match IoUring::builder()
            .setup_cqsize(SQ_ENTRIES * 4)
            .setup_clamp()
            .setup_coop_taskrun()
            .build(SQ_ENTRIES)
        {
            Ok(uring) => (uring, true),
            Err(_) => (
                IoUring::builder()
                    .setup_cqsize(SQ_ENTRIES * 4)
                    .setup_clamp()
                    .build(SQ_ENTRIES)?,
                false,
            ),
        };
        let pool = Memory::zeroed(POOL_SLOTS * SLOT_SIZE)?;
        let base = pool.ptr;
        let slot_ptr = |i: usize| {
            // SAFETY: `i < POOL_SLOTS`, so the offset is inside the pool.
            unsafe { NonNull::new_unchecked(base.as_ptr().add(i * SLOT_SIZE)) }
        };
        let iovecs: Vec<libc::iovec> = (0..POOL_SLOTS)
            .map(|i| libc::iovec {
                iov_base: slot_ptr(i).as_ptr().cast(),
                iov_len: SLOT_SIZE,
            })
            .collect();
        // SAFETY: the iovecs cover the pool, which stays allocated until
        // after the ring's descriptor is closed (`Inner`'s field order), and
        // is never freed while the kernel may use it (`Drop` below). The
        // kernel pins the pages; a refusal (RLIMIT_MEMLOCK) only means plain
        // READ/WRITE instead of the fixed variants.
        let registered = unsafe { uring.submitter().register_buffers(&iovecs) }.is_ok();
        let slots = (0..POOL_SLOTS)
            .map(|i| Slot {
                ptr: slot_ptr(i),
                cap: SLOT_SIZE,
                fixed: registered.then_some(i as u16),
                own: None,
                op: None,
                in_kernel: false,
            })
            .collect();
        // SAFETY: the ring's descriptor stays open, naming the same ring,
        // for as long as the `AsyncFd` lives: `Ring` declares `fd` before
        // `inner` (which owns the `IoUring`), so it is dropped (and
        // deregistered) before the ring is closed.
        let fd = unsafe {
            AsyncFd::register_with_interest(RingFd(uring.as_raw_fd()), Interest::READABLE)
        }?;
        Ok(Ring {
            fd,
            inner: Mutex::new(Inner {
                uring,
                slots,
                free_pool: (0..POOL_SLOTS).rev().collect(),
                free_own: Vec::new(),
                retained: 0,
                in_kernel: 0,
                pending: VecDeque::new(),
                gathered: Vec::new(),
                joined_sqes: 0,
                joined_writes: 0,
                queued: 0,
                reaper_running: false,
                reaper_waker: None,
                cqes: Vec::with_capacity(SQ_ENTRIES as usize * 4),
                leak: false,
                pool: Some(pool),
            }),
            registered,
            coop_taskrun,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; if something did, the
        // state is still consistent enough to wait for the kernel.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the ring was set up with `IORING_SETUP_COOP_TASKRUN`, for
    /// the unit tests.
    #[cfg(test)]
    pub(super) fn coop_taskrun(&self) -> bool {
        self.coop_taskrun
    }

    /// Free pool slots and SQEs in the kernel, for the unit tests.
    #[cfg(test)]
    pub(super) fn stats(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.free_pool.len(), inner.in_kernel + inner.pending.len())
    }

    /// Joined SQEs submitted so far and the writes they carried, for the
    /// unit tests.
    #[cfg(test)]
    pub(super) fn joined(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.joined_sqes, inner.joined_writes)
    }

    /// Slots outside the pool, and the bytes their free buffers keep, for
    /// the unit tests.
    #[cfg(test)]
    pub(super) fn own_slots(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.slots.len() - POOL_SLOTS, inner.retained)
    }

    /// Queues the transfer `t` over `t.len` bytes of a slot's buffer;
    /// `fill` writes the bytes of a write into it first. `keep` is held
    /// until the final completion, and must keep `t.fd` open until then.
    ///
    /// Call only on the thread whose ring this is ([`current`]), in a tokio
    /// runtime: the reaper is spawned there.
    ///
    /// # Errors
    ///
    /// When no buffer can be allocated or the SQ stays full: the caller
    /// uses the thread pool instead (`keep` is dropped).
    pub(super) fn start(
        self: &Arc<Self>,
        t: Transfer,
        fill: impl FnOnce(&mut [u8]),
        keep: Keep,
    ) -> io::Result<Op> {
        let Transfer {
            kind,
            fd,
            offset,
            len,
            punt,
            gather,
        } = t;
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let mut inner = self.lock();
        let idx = inner.take_slot(len)?;
        let slot = &mut inner.slots[idx];
        let ptr = slot.ptr;
        // SAFETY: the slot was free, so no operation on its buffer is in
        // the kernel and nobody else refers to it; its buffer has `cap >=
        // len` initialised bytes.
        fill(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) });
        slot.op = Some(OpState {
            kind,
            punt,
            fd,
            offset,
            len,
            done: 0,
            result: None,
            waker: None,
            orphaned: false,
            keep: Some(keep),
            external: None,
            gather: gather && kind == Kind::Write,
            gathered_sqe: false,
            followers: Vec::new(),
            iov: Vec::new(),
        });
        self.queue(inner, idx, ptr, len, runtime)
            .map_err(|(e, _)| e)
    }

    /// Queues the transfer `t` straight over `buf`'s memory, which the
    /// operation owns until [`Op::into_buf`] hands it back after the final
    /// completion (a dropped [`Op`] leaves it to the operation, freed when
    /// the kernel is done). `t.len` must be `buf.len()`. No copy: what a
    /// borrowed buffer cannot have (module docs).
    ///
    /// Same calling rules as [`start`](Self::start).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start), with the buffer handed back.
    pub(super) fn start_owned(
        self: &Arc<Self>,
        t: Transfer,
        buf: IoBuf,
        keep: Keep,
    ) -> Result<Op, (io::Error, IoBuf)> {
        assert_eq!(t.len, buf.len(), "an owned transfer covers its buffer");
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(r) => r,
            Err(e) => return Err((io::Error::other(e), buf)),
        };
        let mut inner = self.lock();
        let idx = inner.take_bare_slot();
        inner.slots[idx].op = Some(OpState {
            kind: t.kind,
            punt: t.punt,
            fd: t.fd,
            offset: t.offset,
            len: t.len,
            done: 0,
            result: None,
            waker: None,
            orphaned: false,
            keep: Some(keep),
            external: Some(buf),
            gather: t.gather && t.kind == Kind::Write,
            gathered_sqe: false,
            followers: Vec::new(),
            iov: Vec::new(),
        });
        let ptr = inner.slots[idx].ptr;
        self.queue(inner, idx, ptr, t.len, runtime)
            .map_err(|(e, buf)| (e, buf.expect("the buffer was moved in")))
    }

    /// Pushes the operation just set up in slot `idx` and makes its [`Op`];
    /// on failure frees the slot and hands back a moved-in buffer (nothing
    /// reached the kernel).
    fn queue(
        self: &Arc<Self>,
        mut inner: MutexGuard<'_, Inner>,
        idx: usize,
        ptr: NonNull<u8>,
        len: usize,
        runtime: tokio::runtime::Handle,
    ) -> Result<Op, (io::Error, Option<IoBuf>)> {
        let owned = inner.slots[idx]
            .op
            .as_ref()
            .is_some_and(|op| op.external.is_some());
        if let Err(e) = inner.push(idx) {
            let buf = inner.slots[idx]
                .op
                .as_mut()
                .and_then(|op| op.external.take());
            let keep = inner.release(idx);
            drop(inner);
            drop(keep);
            return Err((e, buf));
        }
        let spawn = !inner.reaper_running;
        inner.reaper_running = true;
        let waker = inner.reaper_waker.take();
        drop(inner);
        if spawn {
            // On an `IoThread`, beside the requests (its tasks are its
            // `LocalSet`'s): the reaper, the requests it wakes and the
            // reaper they wake in turn then run in one turn of the set,
            // with no trip through the reactor between them (a plain task
            // would wait for one: its wakes of the set's tasks go through
            // the set's remote queue). Elsewhere, a plain task.
            let reaper = Reaper {
                ring: self.clone(),
                successor_on: Some(runtime.clone()),
                done: false,
            };
            if let Err(mut reaper) = spawn_on_local_set(reaper) {
                reaper.successor_on = None;
                runtime.spawn(reaper);
            }
        } else if let Some(w) = waker {
            w.wake();
        }
        Ok(Op {
            ring: self.clone(),
            idx,
            ptr: ptr.as_ptr() as usize,
            len,
            finished: false,
            owned,
        })
    }

    /// The reaper's body (see the module docs): submits, waits for the
    /// descriptor, reaps; ends when nothing is in the kernel, unless it
    /// `linger`s: then it waits, idle, for the next request, and ends only
    /// when nothing is in the kernel and the thread's set is stopping.
    fn poll_reaper(&self, cx: &mut Context<'_>, linger: bool) -> Poll<()> {
        let mut wake = Vec::new();
        let mut drops = Vec::new();
        loop {
            let mut inner = self.lock();
            inner.submit();
            inner.reap(&mut wake, &mut drops);
            // Continuations of short transfers, queued by the reaping, and
            // gathered writes that waited for the ones just reaped.
            inner.submit();
            // Pending writes got SQEs if none of their file's were left in
            // the kernel, so an idle ring has none.
            debug_assert!(inner.in_kernel > 0 || inner.pending.is_empty());
            let idle = inner.in_kernel == 0;
            let end = idle && (!linger || local_set_stopping());
            if end {
                inner.reaper_running = false;
                inner.reaper_waker = None;
            } else {
                match &mut inner.reaper_waker {
                    Some(w) => w.clone_from(cx.waker()),
                    none => *none = Some(cx.waker().clone()),
                }
            }
            drop(inner);
            // A requester's waker may panic: the others are woken all
            // the same, and the reaper goes on (`sync::wake`).
            wake_each(wake.drain(..), REAPER);
            drops.clear();
            if end {
                return Poll::Ready(());
            }
            if idle {
                // Lingering: the next request wakes us (`reaper_waker`), or
                // the set's stop does.
                wake_when_local_set_stops(cx.waker());
                return Poll::Pending;
            }
            match self.fd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                // Cleared before the next reaping: a completion posted after
                // this is either reaped below or makes the reactor report
                // the descriptor again.
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(_)) => {
                    // The reactor is gone (the runtime is shutting down):
                    // wait in the kernel instead.
                    let mut inner = self.lock();
                    inner.wait_all(&mut wake, &mut drops);
                    inner.reaper_running = false;
                    inner.reaper_waker = None;
                    drop(inner);
                    wake_each(wake.drain(..), REAPER);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The reaper task (module docs): [`Ring::poll_reaper`] until it ends.
///
/// A reaper on the thread's `LocalSet` is dropped before it ends if the
/// set is dropped first (the I/O thread unwinding from a panic, say) while
/// operations are still in the kernel or not yet submitted. Nothing would
/// submit or reap them again, and their requests would wait forever; so a
/// dropped reaper with work left hands it to a successor, spawned as a
/// plain task on the thread's runtime. A plain task is dropped unfinished
/// only when that runtime shuts down; it then leaves the ring without a
/// reaper, and [`Ring`]'s `Drop` waits for the kernel.
///
/// The reaper goes on the thread's own set ([`spawn_on_local_set`]), not on
/// whichever set is running: a request's code may run it inside a set of
/// its own (`LocalSet::run_until` in an I/O task), which it may then keep
/// without driving it.
struct Reaper {
    ring: Arc<Ring>,
    /// Where a successor runs, for a reaper spawned on a `LocalSet`.
    successor_on: Option<tokio::runtime::Handle>,
    /// [`Ring::poll_reaper`] returned `Ready` (and marked the ring as
    /// having no reaper).
    done: bool,
}

impl Future for Reaper {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // On the thread's set, the reaper stays for the next request
        // rather than be spawned again for it (a spawn on the set from
        // outside it wakes the set's own future: one more turn of the
        // runtime, with an `epoll_wait`, per request at depth 1).
        let linger = self.successor_on.is_some();
        let poll = self.ring.poll_reaper(cx, linger);
        self.done = poll.is_ready();
        poll
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.ring.lock();
        // The waker is this task's, which is gone.
        inner.reaper_waker = None;
        match self.successor_on.take() {
            Some(runtime) if inner.in_kernel > 0 => {
                // `reaper_running` stays set: the successor is the reaper
                // now. If the runtime is shutting down, `spawn` drops it at
                // once, and as a plain task it clears the flag.
                drop(inner);
                runtime.spawn(Reaper {
                    ring: self.ring.clone(),
                    successor_on: None,
                    done: false,
                });
            }
            _ => inner.reaper_running = false,
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        let (mut wake, mut drops) = (Vec::new(), Vec::new());
        inner.wait_all(&mut wake, &mut drops);
        if inner.leak {
            // Operations may still be in the kernel: their buffers must
            // never be freed.
            std::mem::forget(inner.pool.take());
            for slot in &mut inner.slots {
                std::mem::forget(slot.own.take());
                if let Some(op) = slot.op.as_mut() {
                    std::mem::forget(op.external.take());
                    std::mem::forget(std::mem::take(&mut op.iov));
                }
            }
        }
        // The fields drop now: `fd` (deregistered), then the ring (closed),
        // then the buffers.
    }
}

impl Inner {
    /// A free slot outside the pool for an operation on a moved-in buffer:
    /// one without a buffer of its own if there is one (so the kept
    /// buffers stay for the requests that need them), else a new one.
    fn take_bare_slot(&mut self) -> usize {
        if let Some(at) = self
            .free_own
            .iter()
            .position(|&idx| self.slots[idx].own.is_none())
        {
            return self.free_own.swap_remove(at);
        }
        self.slots.push(Slot {
            ptr: NonNull::dangling(),
            cap: 0,
            fixed: None,
            own: None,
            op: None,
            in_kernel: false,
        });
        self.slots.len() - 1
    }

    /// A free slot whose buffer holds `len` bytes: a pool slot, else the
    /// smallest kept buffer that is large enough, else a new buffer.
    fn take_slot(&mut self, len: usize) -> io::Result<usize> {
        if len <= SLOT_SIZE {
            if let Some(idx) = self.free_pool.pop() {
                return Ok(idx);
            }
        }
        let fits = self
            .free_own
            .iter()
            .enumerate()
            .filter(|&(_, &idx)| self.slots[idx].own.is_some() && self.slots[idx].cap >= len)
            .min_by_key(|&(_, &idx)| self.slots[idx].cap)
            .map(|(at, _)| at);
        if let Some(at) = fits {
            let idx = self.free_own.swap_remove(at);
            self.retained -= self.slots[idx].cap;
            return Ok(idx);
        }
        let own = Memory::zeroed(len)?;
        let slot = Slot {
            ptr: own.ptr,
            cap: len,
            fixed: None,
            own: Some(own),
            op: None,
            in_kernel: false,
        };
        // A slot without a buffer, else the smallest kept one (too small
        // for this request): its buffer is freed.
        let reuse = self
            .free_own
            .iter()
            .enumerate()
            .min_by_key(|&(_, &idx)| {
                self.slots[idx]
                    .own
                    .as_ref()
                    .map_or(0, |_| self.slots[idx].cap)
            })
            .map(|(at, _)| at);
        Ok(match reuse {
            Some(at) => {
                let idx = self.free_own.swap_remove(at);
                if self.slots[idx].own.is_some() {
                    self.retained -= self.slots[idx].cap;
                }
                // The old buffer (if any) is dropped here: its slot is free,
                // so no operation is in the kernel on it.
                self.slots[idx] = slot;
                idx
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        })
    }

    /// Frees a slot with no operation in the kernel; returns what the
    /// operation kept alive, to be dropped after the lock is released.
    fn release(&mut self, idx: usize) -> Option<Keep> {
        let slot = &mut self.slots[idx];
        debug_assert!(!slot.in_kernel);
        let keep = slot.op.take().and_then(|op| op.keep);
        if idx < POOL_SLOTS {
            self.free_pool.push(idx);
        } else {
            if self.retained + slot.cap <= RETAIN_BYTES {
                // Kept for the next large request.
                self.retained += slot.cap;
            } else {
                slot.own = None;
                slot.cap = 0;
            }
            self.free_own.push(idx);
        }
        keep
    }

    /// Queues the next SQE of the operation in slot `idx` (the rest of its
    /// transfer, up to [`MAX_CHUNK`]). A gathered write that has not
    /// started and continues its file's sequential stream waits in
    /// [`Inner::pending`] instead, for [`flush_pending`](Self::flush_pending);
    /// any other gathered write gets its SQE at once (random writes have
    /// nothing to join, and holding them back only leaves the kernel's
    /// worker idle between them).
    fn push(&mut self, idx: usize) -> io::Result<()> {
        let op = self.slots[idx].op.as_ref().expect("pushing a free slot");
        if !(op.gather && op.done == 0) {
            return self.push_sqe(idx);
        }
        let (fd, offset, end) = (op.fd, op.offset, op.offset + op.len as u64);
        let at = self.gather_file(fd);
        let file = &mut self.gathered[at];
        let sequential = file.last_end == offset && (file.in_kernel > 0 || file.pending > 0);
        file.last_end = end;
        if sequential {
            file.pending += 1;
            // INVARIANT: a pending write's slot is marked `in_kernel`, so
            // it is not released and its memory not handed back before
            // its completion.
            self.slots[idx].in_kernel = true;
            self.pending.push_back(idx);
            return Ok(());
        }
        let pushed = self.push_sqe(idx);
        if pushed.is_ok() {
            self.gathered[at].in_kernel += 1;
            self.slots[idx].op.as_mut().expect("taken").gathered_sqe = true;
        } else {
            self.forget_gather_file(at);
        }
        pushed
    }

    /// The index in [`Inner::gathered`] of `fd`'s entry, made if needed.
    fn gather_file(&mut self, fd: RawFd) -> usize {
        match self.gathered.iter().position(|f| f.fd == fd) {
            Some(at) => at,
            None => {
                self.gathered.push(GatherFile {
                    fd,
                    in_kernel: 0,
                    pending: 0,
                    last_end: u64::MAX,
                });
                self.gathered.len() - 1
            }
        }
    }

    /// Drops the entry at `at` if nothing of its file is in the kernel or
    /// pending any more.
    fn forget_gather_file(&mut self, at: usize) {
        let file = &self.gathered[at];
        if file.in_kernel == 0 && file.pending == 0 {
            self.gathered.swap_remove(at);
        }
    }

    /// One SQE of a gathered write to `fd` has completed.
    fn gathered_sqe_done(&mut self, fd: RawFd) {
        let Some(at) = self.gathered.iter().position(|f| f.fd == fd) else {
            debug_assert!(false, "a gathered SQE completed that was not counted");
            return;
        };
        self.gathered[at].in_kernel -= 1;
        self.forget_gather_file(at);
    }

    /// Gives SQEs to the pending gathered writes whose file has fewer than
    /// [`GATHER_IN_KERNEL`] in the kernel: runs of writes that follow each
    /// other in the file (in the order they came) are joined into one
    /// `writev`, up to [`GATHER_MAX_OPS`] writes and [`GATHER_MAX_BYTES`].
    /// The others keep waiting, in order. Stops when the SQ is full.
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut held = VecDeque::new();
        let mut run: Vec<usize> = Vec::new();
        let (mut run_fd, mut run_end, mut run_bytes) = (0, 0u64, 0usize);
        while let Some(idx) = self.pending.pop_front() {
            let op = self.slots[idx]
                .op
                .as_ref()
                .expect("a pending slot is taken");
            let (fd, offset, len) = (op.fd, op.offset, op.len);
            if !run.is_empty()
                && fd == run_fd
                && offset == run_end
                && run.len() < GATHER_MAX_OPS
                && run_bytes + len <= GATHER_MAX_BYTES
            {
                run.push(idx);
                run_end += len as u64;
                run_bytes += len;
                continue;
            }
            let run_len = run.len();
            if run_len > 0 && !self.push_run(&mut run) {
                // The run went back to the front; `idx` came after it.
                self.pending.insert(run_len, idx);
                break;
            }
            let at = self.gather_file(fd);
            if self.gathered[at].in_kernel >= GATHER_IN_KERNEL {
                held.push_back(idx);
                continue;
            }
            run.push(idx);
            (run_fd, run_end, run_bytes) = (fd, offset + len as u64, len);
        }
        if !run.is_empty() {
            self.push_run(&mut run);
        }
        // What was held comes first: it came before what is left.
        held.append(&mut self.pending);
        self.pending = held;
    }

    /// Counts an SQE of `writes` pending writes to `fd` as queued.
    fn run_queued(&mut self, fd: RawFd, writes: usize) {
        let at = self.gather_file(fd);
        let file = &mut self.gathered[at];
        file.in_kernel += 1;
        file.pending -= writes;
    }

    /// Queues one SQE for `run`, gathered writes that follow each other in
    /// one file, and empties it; with the SQ full, puts the run back at the
    /// front of `pending` and returns `false`.
    fn push_run(&mut self, run: &mut Vec<usize>) -> bool {
        let leader = run[0];
        let fd = self.slots[leader].op.as_ref().expect("taken").fd;
        if run.len() == 1 {
            return match self.push_sqe(leader) {
                Ok(()) => {
                    self.run_queued(fd, 1);
                    self.slots[leader].op.as_mut().expect("taken").gathered_sqe = true;
                    run.clear();
                    true
                }
                Err(_) => {
                    self.pending.push_front(leader);
                    run.clear();
                    false
                }
            };
        }
        if self.uring.submission().is_full() {
            self.submit_queued();
            if self.uring.submission().is_full() {
                for &idx in run.iter().rev() {
                    self.pending.push_front(idx);
                }
                run.clear();
                return false;
            }
        }
        let iov: Vec<libc::iovec> = run
            .iter()
            .map(|&idx| {
                let slot = &self.slots[idx];
                let op = slot.op.as_ref().expect("taken");
                let (base, _) = op.memory(slot.ptr, slot.fixed);
                libc::iovec {
                    iov_base: base.as_ptr().cast(),
                    iov_len: op.len,
                }
            })
            .collect();
        let op = self.slots[leader].op.as_mut().expect("taken");
        op.iov = iov;
        op.followers = run[1..].to_vec();
        op.gathered_sqe = true;
        let entry = opcode::Writev::new(types::Fd(fd), op.iov.as_ptr(), op.iov.len() as u32)
            .offset(op.offset)
            .build()
            .user_data(leader as u64);
        // SAFETY: each iovec covers one write's memory (its slot's buffer or
        // its moved-in buffer, `len` bytes), and every write of the run has
        // its slot marked `in_kernel` (they were pending): none is released,
        // and no moved-in buffer handed back, before the completion of this
        // SQE is reaped and handed to each of them (`complete_run`). The
        // vector itself is the leader's `iov`, whose heap memory stays put
        // until then (the leader's slot is not released either). The kernel
        // only reads these buffers, and nothing writes them meanwhile. The
        // descriptor is kept open by each operation's `keep`.
        let pushed = unsafe { self.uring.submission().push(&entry) }.is_ok();
        debug_assert!(pushed, "the SQ had room");
        if !pushed {
            let op = self.slots[leader].op.as_mut().expect("taken");
            op.iov = Vec::new();
            op.followers = Vec::new();
            op.gathered_sqe = false;
            for &idx in run.iter().rev() {
                self.pending.push_front(idx);
            }
            run.clear();
            return false;
        }
        self.in_kernel += 1;
        self.queued += 1;
        self.run_queued(fd, run.len());
        self.joined_sqes += 1;
        self.joined_writes += run.len() as u64;
        run.clear();
        true
    }

    /// Queues the next SQE of the operation in slot `idx` as it is (see
    /// [`push`](Self::push)).
    fn push_sqe(&mut self, idx: usize) -> io::Result<()> {
        let slot = &self.slots[idx];
        let op = slot.op.as_ref().expect("pushing a free slot");
        let fd = types::Fd(op.fd);
        let chunk = (op.len - op.done).min(MAX_CHUNK) as u32;
        let (base, fixed) = op.memory(slot.ptr, slot.fixed);
        // SAFETY: `done <= len`, and `len` is at most the slot's `cap` or
        // the moved-in buffer's length: the pointer stays inside the
        // operation's memory.
        let ptr = unsafe { base.as_ptr().add(op.done) };
        let offset = op.offset + op.done as u64;
        let entry: squeue::Entry = match (op.kind, fixed) {
            (Kind::Read, Some(i)) => opcode::ReadFixed::new(fd, ptr, chunk, i)
                .offset(offset)
                .build(),
            (Kind::Read, None) => opcode::Read::new(fd, ptr, chunk).offset(offset).build(),
            (Kind::Write, Some(i)) => opcode::WriteFixed::new(fd, ptr, chunk, i)
                .offset(offset)
                .build(),
            (Kind::Write, None) => opcode::Write::new(fd, ptr, chunk).offset(offset).build(),
            (Kind::Fsync, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        let mut entry = entry.user_data(idx as u64);
        // Alone in the ring, the transfer is quickest inline (no worker to
        // wake); with others in flight, a worker copies beside this thread.
        if op.punt && self.in_kernel > 0 {
            entry = entry.flags(squeue::Flags::ASYNC);
        }
        for attempt in 0..2 {
            // SAFETY: the SQE's buffer, `[ptr, ptr + chunk)`, is ring-owned
            // memory of this slot, or the buffer moved into its operation
            // state, which is not freed or handed to anyone else until the
            // CQE for this SQE is reaped: a slot with `in_kernel` set is
            // never released, `Op::into_buf` takes a moved-in buffer back
            // only after the final completion, and the ring's `Drop` waits
            // for every SQE before freeing (or else leaks) any of them.
            // Nothing else reads or writes it meanwhile (the `Op` copies
            // only after the final completion, and nobody else can reach a
            // moved-in buffer). The descriptor is kept open by the
            // operation's `keep` until then.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                self.slots[idx].in_kernel = true;
                self.in_kernel += 1;
                self.queued += 1;
                return Ok(());
            }
            if attempt == 0 {
                self.submit_queued();
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring submission queue full",
        ))
    }

    /// Gives pending gathered writes their SQEs where they may have them
    /// ([`flush_pending`](Self::flush_pending)), then hands the queued SQEs
    /// to the kernel. A transient refusal (EAGAIN, EBUSY, EINTR) leaves
    /// them queued for the next try.
    fn submit(&mut self) {
        self.flush_pending();
        self.submit_queued();
    }

    /// [`submit`](Self::submit) without giving pending writes their SQEs
    /// (what [`push_sqe`](Self::push_sqe) does with a full SQ, also from
    /// inside [`flush_pending`](Self::flush_pending)).
    fn submit_queued(&mut self) {
        if self.queued == 0 {
            return;
        }
        // Errors are transient here (EAGAIN, EBUSY, EINTR): what the kernel
        // has not taken is still in the SQ, counted from the ring itself.
        let _ = self.uring.submit();
        self.queued = self.uring.submission().len();
    }

    /// Takes the completions off the CQ: finishes operations, queues the
    /// rest of short transfers, collects the wakers to wake and what
    /// orphaned operations kept alive.
    fn reap(&mut self, wake: &mut Vec<Waker>, drops: &mut Vec<Keep>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            self.in_kernel -= 1;
            self.complete(user_data as usize, res, wake, drops, true);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// One completion for slot `idx`. With `go_on`, a short transfer is
    /// queued again; without (the ring is being dropped), it ends there.
    fn complete(
        &mut self,
        idx: usize,
        res: i32,
        wake: &mut Vec<Waker>,
        drops: &mut Vec<Keep>,
        go_on: bool,
    ) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        slot.in_kernel = false;
        let (slot_ptr, slot_fixed) = (slot.ptr, slot.fixed);
        let Some(op) = slot.op.as_mut() else {
            return;
        };
        if std::mem::take(&mut op.gathered_sqe) {
            let fd = op.fd;
            self.gathered_sqe_done(fd);
        }
        let op = self.slots[idx].op.as_mut().expect("checked above");
        if !op.followers.is_empty() {
            self.complete_run(idx, res, wake, drops, go_on);
            return;
        }
        let (ptr, _) = op.memory(slot_ptr, slot_fixed);
        let outcome: Option<io::Result<()>> = if res < 0 {
            let e = -res;
            if (e == libc::EINTR || e == libc::EAGAIN) && op.kind != Kind::Fsync {
                None
            } else {
                Some(Err(io::Error::from_raw_os_error(e)))
            }
        } else {
            match op.kind {
                Kind::Fsync => Some(Ok(())),
                Kind::Read if res == 0 => {
                    // End of file: the rest reads as zeroes.
                    // SAFETY: this operation's memory (the slot's buffer or
                    // the moved-in one), `done..len` inside it; the only SQE
                    // of this slot was the one just completed.
                    unsafe {
                        std::ptr::write_bytes(ptr.as_ptr().add(op.done), 0, op.len - op.done)
                    };
                    op.done = op.len;
                    Some(Ok(()))
                }
                Kind::Write if res == 0 => Some(Err(io::ErrorKind::WriteZero.into())),
                Kind::Read | Kind::Write => {
                    op.done = (op.done + res as usize).min(op.len);
                    (op.done == op.len).then_some(Ok(()))
                }
            }
        };
        match outcome {
            Some(r) => self.finish(idx, r, wake, drops),
            None => self.go_on(idx, go_on, wake, drops),
        }
    }

    /// Queues the rest of slot `idx`'s transfer after a short or retryable
    /// completion, or, without `go_on` (the ring is being dropped) or when
    /// it cannot be queued, finishes it with an error.
    fn go_on(&mut self, idx: usize, go_on: bool, wake: &mut Vec<Waker>, drops: &mut Vec<Keep>) {
        let outcome = if !go_on {
            Err(io::Error::other("the io_uring ring was closed"))
        } else {
            match self.push(idx) {
                Ok(()) => return,
                Err(e) => Err(e),
            }
        };
        self.finish(idx, outcome, wake, drops);
    }

    /// Ends the operation in slot `idx` (no SQE of it left) with
    /// `outcome`: wakes its requester, or frees an orphaned slot.
    fn finish(
        &mut self,
        idx: usize,
        outcome: io::Result<()>,
        wake: &mut Vec<Waker>,
        drops: &mut Vec<Keep>,
    ) {
        let op = self.slots[idx].op.as_mut().expect("finishing a taken slot");
        op.result = Some(outcome);
        if op.orphaned {
            drops.extend(self.release(idx));
        } else if let Some(w) = op.waker.take() {
            wake.push(w);
        }
    }

    /// The completion of a joined SQE (`leader` and its followers, in file
    /// order): the bytes written are counted to the writes in order; each
    /// write they cover finishes, the rest are queued again (a short
    /// transfer's continuation, or a pending write that has not started).
    /// An error ends them all; a retryable one queues them all again.
    fn complete_run(
        &mut self,
        leader: usize,
        res: i32,
        wake: &mut Vec<Waker>,
        drops: &mut Vec<Keep>,
        go_on: bool,
    ) {
        let op = self.slots[leader].op.as_mut().expect("taken");
        let followers = std::mem::take(&mut op.followers);
        // The kernel is done with the vector.
        op.iov = Vec::new();
        let mut left = if res < 0 { 0 } else { res as usize };
        for idx in std::iter::once(leader).chain(followers) {
            self.slots[idx].in_kernel = false;
            if res < 0 {
                let e = -res;
                if e == libc::EINTR || e == libc::EAGAIN {
                    self.go_on(idx, go_on, wake, drops);
                } else {
                    self.finish(idx, Err(io::Error::from_raw_os_error(e)), wake, drops);
                }
                continue;
            }
            let op = self.slots[idx]
                .op
                .as_mut()
                .expect("a joined write's slot is taken");
            let n = left.min(op.len - op.done);
            op.done += n;
            left -= n;
            if op.done == op.len {
                self.finish(idx, Ok(()), wake, drops);
            } else if res == 0 {
                self.finish(idx, Err(io::ErrorKind::WriteZero.into()), wake, drops);
            } else {
                self.go_on(idx, go_on, wake, drops);
            }
        }
    }

    /// Submits what is queued and waits in the kernel until nothing is in
    /// flight, without queueing continuations. On a refusal to wait, marks
    /// the buffers to be leaked.
    fn wait_all(&mut self, wake: &mut Vec<Waker>, drops: &mut Vec<Keep>) {
        // Pending writes have no SQE: nothing of theirs is in the kernel.
        while let Some(idx) = self.pending.pop_front() {
            self.slots[idx].in_kernel = false;
            let fd = self.slots[idx]
                .op
                .as_ref()
                .expect("a pending slot is taken")
                .fd;
            if let Some(at) = self.gathered.iter().position(|f| f.fd == fd) {
                self.gathered[at].pending -= 1;
                self.forget_gather_file(at);
            }
            self.finish(
                idx,
                Err(io::Error::other("the io_uring ring was closed")),
                wake,
                drops,
            );
        }
        while self.in_kernel > 0 {
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(_) => {
                    self.leak = true;
                    return;
                }
            }
            self.queued = self.uring.submission().len();
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, res) in &cqes {
                self.in_kernel -= 1;
                self.complete(user_data as usize, res, wake, drops, false);
            }
            cqes.clear();
            self.cqes = cqes;
        }
    }
}

/// A queued operation: a future of its completion, then (for reads) the
/// bytes read ([`Op::data`]). Holds only the slot's number; dropping it
/// before the completion hands the slot to the reaper (see the module
/// docs).
pub(super) struct Op {
    ring: Arc<Ring>,
    idx: usize,
    /// The slot buffer's address (as an integer, so `Op` is `Send`).
    ptr: usize,
    len: usize,
    finished: bool,
    /// On a moved-in buffer ([`Ring::start_owned`]): `ptr` is not the
    /// data, [`Op::into_buf`] is.
    owned: bool,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("slot", &self.idx)
            .field("len", &self.len)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Op {
    /// The slot's buffer after a successful completion.
    ///
    /// # Panics
    ///
    /// Before the completion, or for an operation on a moved-in buffer
    /// (bugs in the caller).
    pub(super) fn data(&self) -> &[u8] {
        assert!(self.finished, "Op::data before completion");
        assert!(!self.owned, "Op::data on a moved-in buffer");
        // SAFETY: the final completion was reaped (`finished`), so the
        // kernel has no SQE on this slot, and the slot stays this `Op`'s
        // until it is dropped, which the borrow of `self` prevents; the
        // buffer holds `len` initialised bytes (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// The buffer moved in with [`Ring::start_owned`], after a successful
    /// completion (for a read, holding the bytes read).
    ///
    /// # Panics
    ///
    /// Before the completion, or for an operation on a slot's buffer (bugs
    /// in the caller).
    pub(super) fn into_buf(self) -> IoBuf {
        assert!(self.finished, "Op::into_buf before completion");
        let mut inner = self.ring.lock();
        // The final completion was reaped: the kernel has no SQE on this
        // slot, so the buffer may leave the operation. The slot itself is
        // released when `self` drops, below.
        let buf = inner.slots[self.idx]
            .op
            .as_mut()
            .and_then(|op| op.external.take())
            .expect("an owned operation");
        drop(inner);
        buf
    }
}

impl Future for Op {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        let mut inner = self.ring.lock();
        let op = inner.slots[self.idx]
            .op
            .as_mut()
            .expect("an Op's slot is taken");
        match op.result.take() {
            Some(result) => {
                drop(inner);
                self.finished = true;
                Poll::Ready(result)
            }
            None => {
                match &mut op.waker {
                    Some(w) => w.clone_from(cx.waker()),
                    none => *none = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let mut inner = self.ring.lock();
        let slot = &mut inner.slots[self.idx];
        let keep = if slot.in_kernel {
            // Still in the kernel: the reaper frees the slot when the final
            // completion comes.
            if let Some(op) = slot.op.as_mut() {
                op.orphaned = true;
                op.waker = None;
            }
            None
        } else {
            inner.release(self.idx)
        };
        drop(inner);
        drop(keep);
    }
}
