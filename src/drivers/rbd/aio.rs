//! librbd's asynchronous requests as futures.
//!
//! # Why it is sound
//!
//! A request's state ([`Shared`]) lives in an `Arc`. One reference belongs
//! to the future ([`Aio`]); a second is turned into the raw pointer librbd
//! passes back to the completion callback ([`complete`]), which turns it
//! back into an `Arc` and drops it when it has finished. The buffer librbd
//! reads from (a write) or writes into (a read) is *owned by that state*,
//! never the caller's: a write copies the caller's bytes in before
//! submitting, a read copies out after the callback ran. So:
//!
//! * a future that is dropped half way (a cancelled request) drops only its
//!   own reference; the buffer stays alive until librbd's callback has run,
//!   and librbd never touches freed memory;
//! * a future that is leaked (`mem::forget`) leaks its reference and the
//!   state with it, which is memory, not unsoundness;
//! * the callback runs on one of librbd's threads, after librbd is done
//!   with the buffer (the data of a read is in place before it is called);
//!   it publishes the result with a release store that the future's
//!   acquire load pairs with, so the future reads the buffer only after
//!   librbd's last write to it, and librbd never touches it again.
//!
//! Buffers of 64 KiB and more come from, and go back to, a per-image pool
//! (`image.rs`'s `BufPool`) when the request completes normally; they are
//! always initialized memory, and a read zeroes what librbd did not place
//! (its return value is the count), so a reused buffer never shows an
//! earlier request's bytes. A dropped request's buffer is simply freed.
//!
//! The buffer sits in an `UnsafeCell` because librbd writes it through a
//! raw pointer while the state is shared; the only accesses are librbd's
//! (between submission and the callback) and the future's (after it saw the
//! result), which the release/acquire pair above orders.
//!
//! The image must outlive every completion that belongs to it (the
//! callback releases the completion with `rbd_aio_release`): each request
//! counts itself in the image's [`InFlight`] before it is submitted and the
//! callback uncounts it last; closing the image waits for the count to
//! reach zero.
//!
//! A panic must not unwind out of the `extern "C"` callback: it calls only
//! librbd, atomics and the requester's waker, whose panic is caught
//! (`sync::wake`) so that the completion is still counted out of the image's
//! [`InFlight`] and nothing unwinds into C.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::sync::wake::wake_catching;
use crate::types::{Error, Result};

use super::ffi::Handle;
use super::image::{ceph_error, Image, InFlight};

/// What a request does.
pub(super) enum Op<'a> {
    Read(usize),
    Write(&'a [u8]),
    Discard(u64),
    WriteZeroes(u64),
    Flush,
}

/// A request's state, shared by its future and librbd's callback.
struct Shared {
    /// Written by the callback (before `done`).
    ret: AtomicI64,
    done: AtomicBool,
    waker: AtomicWaker,
    /// The bytes librbd reads or writes.
    buf: UnsafeCell<Vec<u8>>,
    /// A read: librbd's return value is how many bytes it placed.
    read: bool,
    in_flight: Arc<InFlight>,
}

// SAFETY: `buf` is the only field that is not `Sync` on its own. librbd
// accesses it between submission and the callback, the future only after it
// observed `done` (acquire) which the callback set (release) after librbd's
// last access; submission itself happens before librbd's first access. So
// accesses never overlap (see the module docs).
unsafe impl Sync for Shared {}

/// A submitted request; resolves to librbd's return value (the number of
/// bytes for a read) and, for a read, the bytes.
pub(super) struct Aio {
    shared: Arc<Shared>,
}

/// librbd's completion callback. `arg` is the `Arc<Shared>` reference
/// `submit` gave up.
extern "C" fn complete(completion: Handle, arg: *mut c_void) {
    // SAFETY: `arg` is the pointer `Arc::into_raw` made in `submit`, whose
    // reference is given back here exactly once (librbd calls the callback
    // once per completion).
    let shared = unsafe { Arc::from_raw(arg as *const Shared) };
    // The libraries are loaded: this completion was made through them.
    if let Ok(lib) = super::ffi::lib() {
        // SAFETY: `completion` is the live completion this callback is for;
        // its return value is read before it is released, once.
        let r = unsafe { (lib.rbd_aio_get_return_value)(completion) };
        // SAFETY: as above; librbd allows releasing a completion from its
        // own callback (QEMU's rbd driver does the same).
        unsafe { (lib.rbd_aio_release)(completion) };
        shared.ret.store(r as i64, Ordering::Relaxed);
    } else {
        // Unreachable (the completion was made through the libraries);
        // fail the request rather than report success.
        shared.ret.store(-i64::from(libc::EIO), Ordering::Relaxed);
    }
    shared.done.store(true, Ordering::Release);
    // A panic must not unwind into librbd (module docs).
    wake_catching(|| shared.waker.wake(), "a Ceph completion");
    let in_flight = shared.in_flight.clone();
    drop(shared);
    in_flight.end();
}

impl Aio {
    /// Submits `op` on `image`.
    ///
    /// # Errors
    ///
    /// The error librbd answers at submission (the request never started).
    pub(super) fn submit(image: &Image, offset: u64, op: Op<'_>) -> Result<Aio> {
        let lib = image.lib;
        let buf = match op {
            // Initialized memory (zeroed, or an earlier request's bytes);
            // what librbd does not fill is zeroed on completion.
            Op::Read(len) => image.buffers.get(len),
            Op::Write(data) => {
                let mut b = image.buffers.get(data.len());
                b.copy_from_slice(data);
                b
            }
            _ => Vec::new(),
        };
        let read = matches!(op, Op::Read(_));
        let shared = Arc::new(Shared {
            ret: AtomicI64::new(0),
            done: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            buf: UnsafeCell::new(buf),
            read,
            in_flight: image.in_flight.clone(),
        });
        let arg = Arc::into_raw(shared.clone()) as *mut c_void;
        let mut c: Handle = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback takes it back (or
        // we do, below, when the request is not submitted); `complete` has
        // librbd's callback signature; `c` is a valid out-pointer.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, complete, &mut c) };
        if r < 0 {
            // SAFETY: the completion was not made, so no callback will take
            // the reference back: take it here, once.
            drop(unsafe { Arc::from_raw(arg as *const Shared) });
            return Err(ceph_error("cannot create a completion", r.into()));
        }
        image.in_flight.begin();
        // The state's buffer: its heap block does not move while `shared`
        // lives (nothing resizes it), and nothing else touches it until the
        // callback has run.
        // SAFETY: no access to `buf` overlaps this one (librbd has not
        // started; the future does not exist yet).
        let (ptr, len) = unsafe {
            let b = &mut *shared.buf.get();
            (b.as_mut_ptr(), b.len())
        };
        // SAFETY (all arms): a live image handle and the completion just
        // made; buffers are the state's own (above), alive until the
        // callback returns; lengths are the buffer's.
        let r = unsafe {
            match op {
                Op::Read(_) => (lib.rbd_aio_read)(image.image, offset, len, ptr.cast(), c),
                Op::Write(_) => (lib.rbd_aio_write)(image.image, offset, len, ptr.cast(), c),
                Op::Discard(n) => (lib.rbd_aio_discard)(image.image, offset, n, c),
                Op::WriteZeroes(n) => match (lib.rbd_aio_write_zeroes, usize::try_from(n)) {
                    (Some(f), Ok(n)) => f(image.image, offset, n, c, 0, 0),
                    _ => -libc::ENOTSUP,
                },
                Op::Flush => (lib.rbd_aio_flush)(image.image, c),
            }
        };
        if r < 0 {
            // librbd refused before queueing: the callback will not run.
            // SAFETY: the completion is ours to release, once, and the
            // reference `arg` is ours to take back, once.
            unsafe {
                (lib.rbd_aio_release)(c);
                drop(Arc::from_raw(arg as *const Shared));
            }
            image.in_flight.end();
            return Err(ceph_error("librbd refused the request", r.into()));
        }
        Ok(Aio { shared })
    }

    /// Whether `rbd_aio_write_zeroes` is there.
    pub(super) fn has_write_zeroes(image: &Image) -> bool {
        image.lib.rbd_aio_write_zeroes.is_some()
    }
}

impl Future for Aio {
    /// librbd's return value, and the state's buffer.
    type Output = Result<(i64, Vec<u8>)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let s = &self.shared;
        if !s.done.load(Ordering::Acquire) {
            s.waker.register(cx.waker());
            if !s.done.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        let r = s.ret.load(Ordering::Relaxed);
        if r < 0 {
            let errno = i32::try_from(-r).unwrap_or(libc::EIO);
            return Poll::Ready(Err(Error::Io(std::io::Error::from_raw_os_error(errno))));
        }
        // SAFETY: `done` was observed with acquire ordering, after the
        // callback's release store that follows librbd's last access to the
        // buffer; librbd does not touch it again and the callback has
        // dropped its reference's use of it. Only this future reads it now.
        let mut buf = std::mem::take(unsafe { &mut *s.buf.get() });
        if s.read {
            // librbd placed `r` bytes (fewer only at the end of the image);
            // the rest of a reused buffer holds an earlier request's bytes.
            let placed = usize::try_from(r).unwrap_or(usize::MAX).min(buf.len());
            buf[placed..].fill(0);
        }
        Poll::Ready(Ok((r, buf)))
    }
}

#[cfg(test)]
mod tests {
    use crate::drivers::rbd::aio::{Aio, Op};
    use crate::drivers::rbd::image::Image;
    use crate::drivers::rbd::options::RbdOptions;

    /// A leaked request (its future forgotten while librbd works) keeps its
    /// buffer alive for librbd, and closing the image waits for its
    /// callback. Needs the test cluster (`BLOCKGRAPH_CEPH_CONF`, set by
    /// `.ci/run`, or `tests/ceph/cluster.sh start`).
    #[test]
    fn a_leaked_request_completes_into_its_own_buffer_and_close_waits() {
        let Some(conf) = std::env::var_os("BLOCKGRAPH_CEPH_CONF") else {
            eprintln!("\n*** SKIP: BLOCKGRAPH_CEPH_CONF is not set: no Ceph cluster ***\n");
            return;
        };
        let name = format!("bg{}-leak", std::process::id());
        let mut o = RbdOptions::new("rbd", &name);
        o.conf = Some(conf.into());
        Image::create(&o, 8 << 20).unwrap();
        let image = Image::open(&o, false).unwrap();
        for i in 0..20u64 {
            let w = Aio::submit(&image, i << 18, Op::Write(&[i as u8; 1 << 18])).unwrap();
            std::mem::forget(w);
            let r = Aio::submit(&image, i << 18, Op::Read(1 << 18)).unwrap();
            std::mem::forget(r);
        }
        // Waits for all 40 callbacks, then closes.
        drop(image);
        let image = Image::open(&o, true).unwrap();
        let (_, data) =
            futures::executor::block_on(Aio::submit(&image, 19 << 18, Op::Read(1 << 18)).unwrap())
                .unwrap();
        assert!(data.iter().all(|b| *b == 19));
        drop(image);
        let _ = std::process::Command::new("rbd")
            .args([
                "-c",
                o.conf.as_ref().unwrap().to_str().unwrap(),
                "rm",
                &format!("rbd/{name}"),
            ])
            .output();
    }
}
