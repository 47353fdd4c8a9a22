//! The I/O path (QEMU's `raw_co_prw` and friends): reads and writes
//! bounced through buffers the host call owns, read-modify-write of partial
//! `O_DIRECT` blocks under a range lock, zeroing, discard and flush.
//!
//! Buffered reads are first served from the page cache into the caller's
//! buffer, without waiting (`read_cached`). Reads, aligned writes and
//! flushes go through the thread's io_uring when the node uses
//! `Aio::IoUring` and the request runs on an I/O thread (`uring.rs`), but a
//! buffered write alone in flight takes the pool; everything else, and
//! those when no ring can take them, runs each host call on the blocking
//! pool. Requests on owned buffers (`IoBuf`: `do_read_buf`,
//! `do_write_buf`) give the kernel the request's own buffer on both paths
//! where the range needs no alignment fix-up.

use std::io::IoSliceMut;
#[cfg(feature = "io-uring")]
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "io-uring")]
use std::sync::Arc;

use crate::driver::range_lock::RangeGuard;
use crate::types::{IoBuf, IoVec, IoVecMut, Result, IO_BUF_ALIGN};

use super::host::{
    blocking, fallocate, fill_partial_blocks, read_cached, read_or_zero, AlignedBuf, Cached,
};
#[cfg(feature = "io-uring")]
use super::options::Aio;
use super::state::FileDriver;
#[cfg(feature = "io-uring")]
use super::uring::{self, Kind, Ring, Transfer};

/// The length of `[start, end)` as a buffer size.
#[cfg(feature = "io-uring")]
fn span(start: u64, end: u64) -> Result<usize> {
    usize::try_from(end - start)
        .map_err(|_| crate::types::Error::InvalidArgument("request too large".into()))
}

/// Buffered reads from this size on are queued with `IOSQE_ASYNC`.
#[cfg(feature = "io-uring")]
const PUNT_AT: usize = 32 << 10;

/// Counts a write in flight for as long as it lives (also when the request
/// is dropped half-way).
struct WriteCount<'a>(&'a AtomicUsize);

impl<'a> WriteCount<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        WriteCount(count)
    }
}

impl Drop for WriteCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The largest buffered write that takes the pool when it is alone in
/// flight (`lone_buffered_write`).
#[cfg(feature = "io-uring")]
const LONE_WRITE_MAX: u64 = 256 << 10;

/// The most segments one `preadv2` takes (Linux's `IOV_MAX`).
const MAX_SEGMENTS: usize = 1024;

/// Largest zero buffer written at once when the host cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

impl FileDriver {
    pub(super) async fn do_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let done = match self.read_cached_first(offset, &mut [IoSliceMut::new(&mut *buf)]) {
            Cached::All => return Ok(()),
            Cached::Part(n) => n,
        };
        let (offset, buf) = (offset + done as u64, &mut buf[done..]);
        let len = buf.len() as u64;
        self.read_into(offset, len, |data| buf.copy_from_slice(data))
            .await
    }

    /// A vectored read: the host call's buffer is scattered into `iov`'s
    /// regions, with no other copy than a contiguous read's.
    pub(super) async fn do_readv(&self, offset: u64, mut iov: IoVecMut<'_>) -> Result<()> {
        let mut done = 0;
        if self.may_read_cached(iov.len()) {
            let mut slices: Vec<IoSliceMut<'_>> = iov.segments_mut().map(IoSliceMut::new).collect();
            // More segments than one host call takes: the regular path.
            if slices.len() <= MAX_SEGMENTS {
                match read_cached(&self.host, &mut slices, offset) {
                    Cached::All => return Ok(()),
                    Cached::Part(n) => done = n,
                }
            }
        }
        let rest = iov.len() - done;
        let mut iov = iov.into_slice(done, rest);
        self.read_into(offset + done as u64, rest as u64, |data| {
            iov.copy_from_slice(data)
        })
        .await
    }

    /// Whether a buffered read of `len` bytes tries the page cache first,
    /// in the caller's memory ([`read_cached`]).
    fn may_read_cached(&self, len: usize) -> bool {
        len != 0 && self.host.align == 1 && self.host.nowait_reads.load(Ordering::Relaxed)
    }

    /// [`read_cached`] when [`FileDriver::may_read_cached`], else nothing
    /// done.
    fn read_cached_first(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Cached {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.may_read_cached(len) {
            read_cached(&self.host, bufs, offset)
        } else {
            Cached::Part(0)
        }
    }

    pub(super) async fn do_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.write_from(offset, len, |dst| dst.copy_from_slice(buf))
            .await
    }

    /// A vectored write: `iov`'s regions are gathered straight into the
    /// host call's buffer, with no other copy than a contiguous write's.
    pub(super) async fn do_writev(&self, offset: u64, iov: IoVec<'_>) -> Result<()> {
        let len = iov.len() as u64;
        self.write_from(offset, len, |dst| iov.copy_to_slice(dst))
            .await
    }

    /// Whether a request over `[offset, offset + len)` in an [`IoBuf`] can
    /// go to the host as it is: no alignment fix-up of the range (the
    /// buffer's address is aligned for any device up to a page).
    fn owned_fits(&self, offset: u64, len: u64) -> Result<bool> {
        let (start, end) = self.aligned(offset, len)?;
        Ok(start == offset && end == offset + len && self.host.align as usize <= IO_BUF_ALIGN)
    }

    /// A read into a buffer the request owns: from the page cache straight
    /// into it first (buffered files, [`read_cached`]), then by the ring
    /// or the pool straight into it; only a read that needs an alignment
    /// fix-up (or whose start was cached) copies, as [`do_read`] does.
    ///
    /// [`do_read`]: FileDriver::do_read
    pub(super) async fn do_read_buf(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(buf);
        }
        match self.read_cached_first(offset, &mut [IoSliceMut::new(&mut buf)]) {
            Cached::All => return Ok(buf),
            Cached::Part(0) => {}
            Cached::Part(n) => {
                let rest = &mut buf[n..];
                self.read_into(offset + n as u64, rest.len() as u64, |data| {
                    rest.copy_from_slice(data)
                })
                .await?;
                return Ok(buf);
            }
        }
        self.check_strict(offset, len)?;
        if !self.owned_fits(offset, len)? {
            self.read_into(offset, len, |data| buf.copy_from_slice(data))
                .await?;
            return Ok(buf);
        }
        #[cfg(feature = "io-uring")]
        if let Some(ring) = self.ring() {
            let t = Transfer {
                kind: Kind::Read,
                fd: self.host.file.as_raw_fd(),
                offset,
                len: buf.len(),
                punt: self.punt(buf.len()),
                gather: false,
            };
            match ring.start_owned(t, buf, Box::new(self.host.clone())) {
                Ok(mut op) => {
                    (&mut op).await.map_err(crate::types::Error::Io)?;
                    return Ok(op.into_buf());
                }
                Err((_, back)) => buf = back,
            }
        }
        let host = self.host.clone();
        blocking(move || {
            read_or_zero(&host.file, &mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    /// A write from a buffer the request owns: the ring or the pool writes
    /// it as it is; only a write that needs a read-modify-write of partial
    /// blocks copies, as [`do_write`](FileDriver::do_write) does.
    pub(super) async fn do_write_buf(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        if len == 0 || !self.owned_fits(offset, len).unwrap_or(false) {
            // (Also the checks and their errors.)
            self.do_write(offset, &buf).await?;
            return Ok(buf);
        }
        self.check_writable()?;
        self.check_strict(offset, len)?;
        let _counted = WriteCount::new(&self.writes);
        let end = offset + len;
        #[cfg(feature = "io-uring")]
        let mut buf = buf;
        #[cfg(feature = "io-uring")]
        if let Some(ring) = self.ring().filter(|_| !self.lone_buffered_write(len)) {
            // Held until the write's final completion (see `write_from`).
            let guard = self.lock_blocks(offset, end, false).await;
            if let Some(ring) = self.ring().filter(|r| Arc::ptr_eq(r, &ring)) {
                let t = Transfer {
                    kind: Kind::Write,
                    fd: self.host.file.as_raw_fd(),
                    offset,
                    len: buf.len(),
                    punt: false,
                    gather: self.gather_writes(),
                };
                match ring.start_owned(t, buf, Box::new((self.host.clone(), guard))) {
                    Ok(mut op) => {
                        (&mut op).await.map_err(crate::types::Error::Io)?;
                        self.host.size.fetch_max(end, Ordering::SeqCst);
                        return Ok(op.into_buf());
                    }
                    Err((_, back)) => buf = back,
                }
            }
        }
        let guard = self.lock_blocks(offset, end, false).await;
        let host = self.host.clone();
        blocking(move || {
            // Held until the host call is over, even if the request's
            // future is gone by then.
            let _guard = guard;
            host.file.write_all_at(&buf, offset)?;
            host.size.fetch_max(end, Ordering::SeqCst);
            Ok(buf)
        })
        .await
    }

    /// Reads `len` bytes at `offset` into a buffer the host call owns,
    /// then hands them to `sink` (exactly `len` bytes).
    async fn read_into(&self, offset: u64, len: u64, sink: impl FnOnce(&[u8])) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_strict(offset, len)?;
        let (start, end) = self.aligned(offset, len)?;
        let head = (offset - start) as usize;
        #[cfg(feature = "io-uring")]
        if let Some(ring) = self.ring() {
            let keep = Box::new(self.host.clone());
            let fd = self.host.file.as_raw_fd();
            let whole = span(start, end)?;
            let t = Transfer {
                kind: Kind::Read,
                fd,
                offset: start,
                len: whole,
                punt: self.punt(whole),
                gather: false,
            };
            if let Ok(mut op) = ring.start(t, |_| {}, keep) {
                (&mut op).await.map_err(crate::types::Error::Io)?;
                sink(&op.data()[head..head + len as usize]);
                return Ok(());
            }
        }
        let host = self.host.clone();
        let bounce = blocking(move || {
            let mut bounce = AlignedBuf::new(end - start, host.align)?;
            read_or_zero(&host.file, bounce.as_mut_slice(), start)?;
            Ok(bounce)
        })
        .await?;
        sink(&bounce.as_slice()[head..head + len as usize]);
        Ok(())
    }

    /// Writes `len` bytes at `offset` from a buffer the host call owns,
    /// which `fill` fills first (exactly `len` bytes).
    async fn write_from(&self, offset: u64, len: u64, fill: impl Fn(&mut [u8])) -> Result<()> {
        self.check_writable()?;
        let _counted = WriteCount::new(&self.writes);
        if len == 0 {
            return Ok(());
        }
        self.check_strict(offset, len)?;
        let (start, end) = self.aligned(offset, len)?;
        let head = (offset - start) as usize;
        let rmw = start != offset || end != offset + len;
        #[cfg(feature = "io-uring")]
        if !rmw {
            if let Some(ring) = self.ring().filter(|_| !self.lone_buffered_write(len)) {
                // Held until the write's final completion, even if this
                // future is gone by then (the ring keeps it).
                let guard = self.lock_blocks(start, end, false).await;
                // Asked again: the range lock may have moved this future.
                if let Some(ring) = self.ring().filter(|r| Arc::ptr_eq(r, &ring)) {
                    let keep = Box::new((self.host.clone(), guard));
                    let fd = self.host.file.as_raw_fd();
                    let t = Transfer {
                        kind: Kind::Write,
                        fd,
                        offset: start,
                        len: len as usize,
                        // Never `IOSQE_ASYNC`: where the filesystem cannot
                        // write to the page cache without blocking (ext4)
                        // the kernel hands the write to a worker anyway,
                        // and forcing it cost 4-7% of 64 KiB writes at
                        // depth 32 (37-38k against 39-41k IOPS).
                        punt: false,
                        gather: self.gather_writes(),
                    };
                    if let Ok(op) = ring.start(t, &fill, keep) {
                        op.await.map_err(crate::types::Error::Io)?;
                        self.host.size.fetch_max(end, Ordering::SeqCst);
                        return Ok(());
                    }
                }
            }
        }
        // Copy first: the caller's buffer never leaves this thread.
        let mut bounce = AlignedBuf::with_fill(end - start, self.host.align, head, len, &fill)?;
        let guard = self.lock_blocks(start, end, rmw).await;
        let host = self.host.clone();
        let tail = (offset + len - start) as usize;
        blocking(move || {
            // Held until the host call is over, even if the request's
            // future is gone by then.
            let _guard = guard;
            if rmw {
                fill_partial_blocks(&host, &mut bounce, start, head, tail)?;
            }
            host.file.write_all_at(bounce.as_slice(), start)?;
            host.size.fetch_max(end, Ordering::SeqCst);
            Ok(())
        })
        .await
    }

    pub(super) async fn do_write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        self.check_strict(offset, len)?;
        let (start, end) = self.aligned(offset, len)?;
        let guard = self.lock_blocks(start, end, false).await;
        let host = self.host.clone();
        let zeroed = blocking(move || {
            let _guard = guard;
            let block = host.block_device;
            let keep = if block { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
            if fallocate(&host.file, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len)? {
                if !block {
                    host.size.fetch_max(offset + len, Ordering::SeqCst);
                }
                return Ok(true);
            }
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if fallocate(&host.file, punch, offset, len)? {
                let size = host.size.load(Ordering::SeqCst);
                if !block && offset + len > size {
                    host.file.set_len(offset + len)?;
                    host.size.fetch_max(offset + len, Ordering::SeqCst);
                }
                return Ok(true);
            }
            Ok(false)
        })
        .await?;
        if zeroed {
            Ok(())
        } else {
            self.zero_by_writing(offset, len).await
        }
    }

    pub(super) async fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.host.size.load(Ordering::SeqCst);
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        // Not in the middle of a read-modify-write of the same blocks,
        // which would write the old bytes back over the hole.
        let (start, end) = self.aligned(offset, len)?;
        let guard = self.lock_blocks(start, end, false).await;
        let host = self.host.clone();
        // Discard is advisory: a host that cannot punch holes keeps the
        // data, which is allowed.
        blocking(move || {
            let _guard = guard;
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            fallocate(&host.file, punch, offset, len).map(drop)
        })
        .await
    }

    pub(super) async fn do_flush(&self) -> Result<()> {
        if self.is_read_only() || self.options.no_flush {
            return Ok(());
        }
        #[cfg(feature = "io-uring")]
        if let Some(ring) = self.ring() {
            let keep = Box::new(self.host.clone());
            let fd = self.host.file.as_raw_fd();
            let t = Transfer {
                kind: Kind::Fsync,
                fd,
                offset: 0,
                len: 0,
                punt: false,
                gather: false,
            };
            if let Ok(op) = ring.start(t, |_| {}, keep) {
                return op.await.map_err(crate::types::Error::Io);
            }
        }
        let host = self.host.clone();
        blocking(move || host.file.sync_data()).await
    }

    /// Locks the blocks a write touches when `O_DIRECT` bouncing could
    /// read-modify-write them; buffered files need no lock (the page cache
    /// merges byte ranges).
    pub(super) async fn lock_blocks(&self, start: u64, end: u64, rmw: bool) -> Option<RangeGuard> {
        if self.host.align > 1 {
            Some(self.ranges.lock(start, end, rmw).await)
        } else {
            None
        }
    }

    /// This thread's ring, when the node uses io_uring and the request is
    /// on an I/O thread that has one.
    #[cfg(feature = "io-uring")]
    fn ring(&self) -> Option<Arc<Ring>> {
        if self.aio == Aio::IoUring {
            uring::current()
        } else {
            None
        }
    }

    /// Whether a write is buffered and the file's only write in flight:
    /// ext4 cannot do a buffered write without blocking, so io_uring hands
    /// it to a kernel worker, a hop that costs more than the thread pool's
    /// when nothing else is in flight (`benches/file_io.rs`: page-cache 4 KiB
    /// writes at depth 1, 0.7x QEMU on the ring, 1.3-1.6x on the pool);
    /// with others in flight the ring batches and wins.
    /// Only up to [`LONE_WRITE_MAX`] bytes: the pool allocates a fresh
    /// buffer per write where the ring reuses its own, which costs more
    /// than the hop saves for large writes (a 64 MiB `img convert`, whose
    /// ordered 2 MiB writes are each alone in flight, took 2.6x qemu-img's
    /// time on the pool against 1.6x on the ring).
    #[cfg(feature = "io-uring")]
    fn lone_buffered_write(&self, len: u64) -> bool {
        self.host.align == 1 && len <= LONE_WRITE_MAX && self.writes.load(Ordering::Relaxed) <= 1
    }

    /// Whether writes to this file may wait in the ring and be joined with
    /// their neighbours ([`Transfer::gather`](super::uring::Transfer)):
    /// buffered ones, which the kernel's workers run one at a time per file
    /// anyway (DESIGN §19, "Gathered writes"). `O_DIRECT` writes go to the
    /// device in parallel and are merged by the block layer.
    #[cfg(feature = "io-uring")]
    fn gather_writes(&self) -> bool {
        self.host.align == 1
    }

    /// Whether to queue a read of `len` bytes with `IOSQE_ASYNC`: large
    /// buffered ones, whose page-cache copy the kernel would otherwise do
    /// inline on this thread during submission (a kernel worker copies
    /// beside the I/O thread instead). Cached reads rarely get here now
    /// (`read_cached` serves them first). `O_DIRECT` transfers are
    /// asynchronous in the kernel already.
    #[cfg(feature = "io-uring")]
    fn punt(&self, len: usize) -> bool {
        self.host.align == 1 && len >= PUNT_AT
    }

    async fn zero_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.do_write(offset + done, &zeroes[..n as usize]).await?;
            done += n;
        }
        Ok(())
    }
}
