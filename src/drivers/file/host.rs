//! The host side of every request: the [`Host`] that blocking-pool
//! closures share, the buffers they own (aligned for `O_DIRECT`), how they
//! are run off the executor ([`blocking`]), and the system calls they make.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::types::{Error, Result};

/// Memory alignment of every buffer handed to an `O_DIRECT` file.
const MEM_ALIGN: usize = 4096;

/// What every blocking closure shares with the driver.
#[derive(Debug)]
pub(super) struct Host {
    pub(super) file: File,
    /// The file's size as far as this driver knows (it is the one writer):
    /// set at open and by truncate, raised by writes past the end.
    pub(super) size: AtomicU64,
    /// Offset/length alignment of host calls: 1 when buffered.
    pub(super) align: u64,
    pub(super) block_device: bool,
    /// Whether buffered reads may try the page cache first, in the
    /// caller's memory (`preadv2` with `RWF_NOWAIT`): cleared the first
    /// time the host refuses the flag.
    pub(super) nowait_reads: AtomicBool,
}

/// Adds the path to an I/O error from opening or probing it.
pub(super) fn path_error(path: &Path, what: &str, e: io::Error) -> Error {
    Error::Io(io::Error::new(
        e.kind(),
        format!("{what} '{}': {e}", path.display()),
    ))
}

/// Runs a host call off the executor thread and waits for it.
pub(super) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let outcome = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(f)
            .await
            .map_err(|_| io::Error::other("file I/O worker panicked or was cancelled"))?,
        Err(_) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("blockgraph-file".into())
                .spawn(move || {
                    let _ = tx.send(f());
                })?;
            rx.await
                .map_err(|_| io::Error::other("file I/O worker panicked"))?
        }
    };
    outcome.map_err(Error::Io)
}

/// The enclosing range's memory, aligned for `O_DIRECT`, owned by whoever
/// runs the host call.
#[derive(Debug)]
pub(super) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose address is a multiple of
    /// [`MEM_ALIGN`] when `align > 1` (a direct file).
    pub(super) fn new(len: u64, align: u64) -> io::Result<AlignedBuf> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "request too large"))?;
        let slack = if align > 1 { MEM_ALIGN } else { 0 };
        let storage = vec![0u8; len + slack];
        let addr = storage.as_ptr() as usize;
        let start = if slack == 0 {
            0
        } else {
            addr.next_multiple_of(MEM_ALIGN) - addr
        };
        Ok(AlignedBuf {
            storage,
            start,
            len,
        })
    }

    /// A buffer like [`AlignedBuf::new`] whose `data_len` bytes at `head`
    /// `fill` writes (a contiguous payload or a gathered vector), zeroes
    /// around them.
    pub(super) fn with_fill(
        len: u64,
        align: u64,
        head: usize,
        data_len: u64,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<AlignedBuf> {
        let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "request too large");
        let len = usize::try_from(len).map_err(|_| too_large())?;
        let data_len = usize::try_from(data_len).map_err(|_| too_large())?;
        debug_assert!(head + data_len <= len);
        let slack = if align > 1 { MEM_ALIGN } else { 0 };
        let mut storage = Vec::with_capacity(len + slack);
        let addr = storage.as_ptr() as usize;
        let start = if slack == 0 {
            0
        } else {
            addr.next_multiple_of(MEM_ALIGN) - addr
        };
        // Within the capacity, so the storage never moves and `start`
        // stays aligned. Every byte is initialised before `fill` sees it.
        storage.resize(len + slack, 0);
        fill(&mut storage[start + head..start + head + data_len]);
        Ok(AlignedBuf {
            storage,
            start,
            len,
        })
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
pub(super) fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Completes the partial first and last blocks of a bounced write from the
/// file: `bounce` holds the new bytes at `[head, tail)` of the aligned range
/// starting at `start`.
pub(super) fn fill_partial_blocks(
    host: &Host,
    bounce: &mut AlignedBuf,
    start: u64,
    head: usize,
    tail: usize,
) -> io::Result<()> {
    let a = host.align as usize;
    let total = bounce.len;
    let mut block = AlignedBuf::new(a as u64, host.align)?;
    let data = bounce.as_mut_slice();
    if head != 0 {
        read_or_zero(&host.file, block.as_mut_slice(), start)?;
        data[..head].copy_from_slice(&block.as_slice()[..head]);
        if tail <= a {
            // Same block: its end is in there too.
            data[tail..a].copy_from_slice(&block.as_slice()[tail..a]);
            return Ok(());
        }
    }
    if tail != total {
        let last = total - a;
        read_or_zero(&host.file, block.as_mut_slice(), start + last as u64)?;
        data[tail..].copy_from_slice(&block.as_slice()[tail - last..]);
    }
    Ok(())
}

/// `fallocate`; `Ok(false)` when the host does not support this mode here.
pub(super) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range beyond the host's file offsets",
        ));
    };
    loop {
        // SAFETY: the descriptor belongs to `file`, alive for the call; the
        // call takes only integers.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// What [`read_cached`] got done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cached {
    /// Every byte: read from the page cache, or zeroes past the end.
    All,
    /// This many bytes from the start (fewer than asked); the rest is not
    /// in the page cache, or the host refused the flag.
    Part(usize),
}

/// Reads `[offset, offset + len(bufs))` of a buffered file straight into
/// `bufs` as far as the page cache holds it, without ever waiting for the
/// device: `preadv2` with `RWF_NOWAIT`, which copies what is cached and
/// stops (`EAGAIN`, or a short count) where a page would need I/O. Past
/// the end of the file the rest reads as zeroes, as in [`read_or_zero`].
///
/// The call finishes before this function returns, so the caller's memory
/// is lent to the kernel for the call's duration only: nothing can reach
/// it once the request's future is dropped or forgotten. This is the
/// page-cache hit that io_uring would serve inline during submission too,
/// minus the ring's buffer and its copy.
pub(super) fn read_cached(host: &Host, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> Cached {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut bufs = bufs;
    let mut done = 0;
    while done < total {
        match rustix::io::preadv2(
            &host.file,
            bufs,
            offset + done as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => {
                for b in bufs.iter_mut() {
                    b.fill(0);
                }
                return Cached::All;
            }
            Ok(n) => {
                done += n;
                io::IoSliceMut::advance_slices(&mut bufs, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return Cached::Part(done),
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS,
            ) => {
                // Not supported here (a kernel before 4.14, a filesystem
                // without non-blocking reads): the regular path from now on.
                host.nowait_reads.store(false, Ordering::Relaxed);
                return Cached::Part(done);
            }
            // A real error: the regular path retries and reports it.
            Err(_) => return Cached::Part(done),
        }
    }
    Cached::All
}
