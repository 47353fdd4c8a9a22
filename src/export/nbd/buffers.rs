//! Payload buffers the server reuses: read replies' data (and for short
//! reads the whole reply, header and data in one buffer) and write
//! payloads. They are [`IoBuf`]s, so a write payload can be moved into the
//! backend's `write_buf`, and a read's data buffer into its `read_buf`, and
//! reach the kernel without another copy.
//!
//! A fresh buffer for every request costs a zeroing `calloc` and, for the
//! large requests of a copy (`nbdcopy` reads and writes 256 KiB at a time),
//! page faults on memory the allocator has just handed back to the kernel:
//! on a null node a 256 KiB read cost about three times QEMU's CPU time,
//! most of it zeroing and faulting (DESIGN §10). Each server thread keeps
//! the buffers replies were written from and hands them to later requests
//! of its connections.
//!
//! Bounded: a buffer larger than [`MAX_POOLED`] is never kept, and a thread
//! keeps at most [`POOL_BYTES`] of idle buffers (on top of the in-flight
//! budget, which counts buffers in use).
//!
//! No bytes cross connections: a buffer is tagged with the connection that
//! last used it, and one taken by another connection is zeroed first (a
//! `memset`, still far cheaper than fresh pages). Within a connection a
//! reused buffer holds only bytes its client already read or wrote, and
//! every driver fills a read's whole buffer anyway (the `null` driver with
//! `read-zeroes=off` leaves it as it is, like QEMU's, and the client sees
//! its own earlier bytes).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::IoBuf;

/// Largest buffer the server keeps (2 MiB of payload plus a header:
/// `qemu-img convert` copies in 2 MiB requests).
pub(crate) const MAX_POOLED: usize = (2 << 20) + 4096;
/// Bytes of idle buffers a server thread keeps: a copy's 64 requests of
/// 256 KiB in flight (`nbdcopy`'s defaults) and more.
pub(crate) const POOL_BYTES: usize = 32 << 20;
/// Smallest buffer worth keeping (smaller ones are cheap to allocate).
const MIN_POOLED: usize = 4096;
/// Fresh buffers are rounded up to this, so that requests of nearly the
/// same size share them.
const ROUND: usize = 512;

/// A reply or a write payload: a small one made for the occasion, or a
/// pooled [`IoBuf`] whose length is the bytes in use (the rest of its
/// allocation is initialised: zeroes or an earlier request's bytes, never
/// sent). A pooled payload can be moved into the backend's `write_buf`,
/// which hands it to the kernel without a copy.
#[derive(Debug)]
pub(crate) enum Buf {
    Small(Vec<u8>),
    Pooled(IoBuf),
}

impl Buf {
    /// The bytes in use.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Small(v) => v,
            Buf::Pooled(b) => b,
        }
    }

    /// The bytes in use, to fill.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buf::Small(v) => v,
            Buf::Pooled(b) => b,
        }
    }
}

impl From<Vec<u8>> for Buf {
    fn from(bytes: Vec<u8>) -> Buf {
        Buf::Small(bytes)
    }
}

/// Whether [`BufPool::take`] hands out a pooled [`IoBuf`] for `len` bytes
/// (else a small `Vec`).
pub(crate) fn pooled(len: usize) -> bool {
    len >= MIN_POOLED / 2
}

/// A connection's access to its thread's idle buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BufPool {
    conn: u64,
}

/// One thread's idle buffers, each with the connection that last used it.
#[derive(Debug, Default)]
struct Idle {
    bufs: Vec<(u64, IoBuf)>,
    bytes: usize,
}

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::default();
}

impl BufPool {
    /// A new connection's.
    pub(crate) fn new() -> BufPool {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        BufPool {
            conn: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A buffer with `len` bytes in use: an idle one of at least `len` (and
    /// at most twice `len`) bytes, this connection's if there is one, else
    /// another's zeroed, else a new zeroed one.
    pub(crate) fn take(&self, len: usize) -> Buf {
        if pooled(len) {
            let found = IDLE
                .try_with(|idle| {
                    let mut idle = idle.borrow_mut();
                    let fits = |b: &IoBuf| b.capacity() >= len && b.capacity() / 2 <= len;
                    let i = idle
                        .bufs
                        .iter()
                        .position(|(c, b)| *c == self.conn && fits(b))
                        .or_else(|| idle.bufs.iter().position(|(_, b)| fits(b)))?;
                    let (owner, buf) = idle.bufs.swap_remove(i);
                    idle.bytes -= buf.capacity();
                    Some((owner, buf))
                })
                .ok()
                .flatten();
            if let Some((owner, mut buf)) = found {
                buf.set_len(buf.capacity());
                if owner != self.conn {
                    buf.fill(0);
                }
                buf.set_len(len);
                return Buf::Pooled(buf);
            }
            let mut buf = IoBuf::zeroed(len.next_multiple_of(ROUND));
            buf.set_len(len);
            return Buf::Pooled(buf);
        }
        Buf::Small(vec![0; len])
    }

    /// Keeps `buf` for a later request if it is worth keeping and fits.
    pub(crate) fn give(&self, buf: Buf) {
        let Buf::Pooled(buf) = buf else {
            return;
        };
        let n = buf.capacity();
        if !(MIN_POOLED..=MAX_POOLED).contains(&n) {
            return;
        }
        // At thread exit the buffer is simply freed.
        let _ = IDLE.try_with(|idle| {
            let mut idle = idle.borrow_mut();
            if idle.bytes + n <= POOL_BYTES {
                idle.bytes += n;
                idle.bufs.push((self.conn, buf));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle() -> (usize, Vec<usize>) {
        IDLE.with(|i| {
            let i = i.borrow();
            (i.bytes, i.bufs.iter().map(|(_, b)| b.capacity()).collect())
        })
    }

    #[test]
    fn buffers_are_reused_within_bounds() {
        let pool = BufPool::new();
        let mut a = pool.take(4096 + 28);
        assert_eq!(a.as_slice().len(), 4096 + 28);
        a.as_mut_slice().fill(7);
        pool.give(a);
        // Reused as it is (not zeroed again) by the same connection, with
        // the length asked for.
        let b = pool.take(4096 + 16);
        assert_eq!(b.as_slice().len(), 4096 + 16);
        assert!(b.as_slice().iter().all(|&x| x == 7));
        // Too large a buffer for a small request is not used.
        pool.give(b);
        let c = pool.take(2048);
        assert!(c.as_slice().iter().all(|&x| x == 0));
        // Bounded: huge and tiny buffers are not kept, nor more than
        // POOL_BYTES.
        pool.give(Buf::Pooled(IoBuf::zeroed(MAX_POOLED + 1)));
        pool.give(Buf::Pooled(IoBuf::zeroed(16)));
        pool.give(Buf::from(vec![1; 1 << 20])); // not a pooled kind
        for _ in 0..POOL_BYTES / (1 << 20) + 4 {
            pool.give(Buf::Pooled(IoBuf::zeroed(1 << 20)));
        }
        let (bytes, bufs) = idle();
        assert!(bytes <= POOL_BYTES);
        assert!(bufs.iter().all(|&n| (MIN_POOLED..=MAX_POOLED).contains(&n)));
        assert_eq!(bytes, bufs.iter().sum::<usize>());
    }

    #[test]
    fn another_connections_buffer_is_zeroed() {
        let (a, b) = (BufPool::new(), BufPool::new());
        let mut buf = a.take(64 << 10);
        buf.as_mut_slice().fill(0xa5);
        a.give(buf);
        let buf = b.take(64 << 10);
        assert!(buf.as_slice().iter().all(|&x| x == 0));
        b.give(buf);
        // And back: b's buffer (now zeroes) is a's to take, zeroed again.
        let buf = a.take(64 << 10);
        assert!(buf.as_slice().iter().all(|&x| x == 0));
    }
}
