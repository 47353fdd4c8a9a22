//! The `file` protocol driver: positional I/O on a host file or block
//! device (QEMU's `file` / `host_device`).
//!
//! See [`FileDriver`] for threads, buffers, `O_DIRECT`, locking and resizing.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::driver::range_lock::{RangeGuard, RangeLock};
use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::BlockStatus;
use crate::types::Perm;
use crate::types::{Error, Result};

/// Memory alignment of every buffer handed to an `O_DIRECT` file.
const MEM_ALIGN: usize = 4096;
/// Largest zero buffer written at once when the host cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// How to open a host file; see [`FileDriver::open`].
///
/// ```
/// use blockgraph::drivers::FileOptions;
/// let opts = FileOptions { read_only: true, ..FileOptions::default() };
/// assert!(opts.locking);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for reading only; writes fail with [`Error::ReadOnly`].
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`); requests are bounced as
    /// described on [`FileDriver`].
    pub direct: bool,
    /// Take QEMU-compatible image locks (default `true`).
    pub locking: bool,
    /// Let other users write the file while we have it open (QEMU's
    /// `force-share` for readers, `share-rw` for writers). Default `false`.
    pub share_writes: bool,
    /// With `direct`: report the real alignment and refuse misaligned
    /// requests instead of bouncing them. Default `false`.
    pub strict_alignment: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            read_only: false,
            direct: false,
            locking: true,
            share_writes: false,
            strict_alignment: false,
        }
    }
}

/// What every blocking closure shares with the driver.
#[derive(Debug)]
struct Host {
    file: File,
    /// The file's size as far as this driver knows (it is the one writer):
    /// set at open and by truncate, raised by writes past the end.
    size: AtomicU64,
    /// Offset/length alignment of host calls: 1 when buffered.
    align: u64,
    block_device: bool,
}

/// A node backed by a host file or block device.
///
/// # Threads and buffers
///
/// Host I/O blocks, so every system call runs on tokio's blocking pool
/// (`spawn_blocking`), never on the I/O thread's executor. The closure that
/// runs there owns everything it touches: the file (an `Arc`), and a buffer
/// of its own that reads are copied out of and writes are copied into. A
/// caller's buffer never crosses to the other thread, so a request future
/// that is dropped half way leaves the host call finishing into memory that
/// is still alive (the closure's), never into freed memory. Outside a tokio
/// runtime (an embedder driving futures some other way) the call runs on a
/// short-lived helper thread instead, with the same ownership rules.
///
/// # `O_DIRECT` and alignment
///
/// With [`FileOptions::direct`] the file is opened with `O_DIRECT`, which
/// needs the offset, the length and the memory address of every transfer
/// aligned to the device's logical block size. The driver probes that size
/// at open ([`FileDriver::direct_alignment`]). The owned buffer above is
/// always allocated aligned, so memory alignment is free. Offsets and
/// lengths are handled by *bouncing in this driver*:
///
/// * an unaligned read reads the enclosing aligned range into the owned
///   buffer and copies out the bytes asked for;
/// * an unaligned write is a read-modify-write of the enclosing aligned
///   range, done in one blocking closure while a *serialising* range lock
///   ((see `range_lock.rs`)) keeps every other write to those blocks out
///   (otherwise two RMWs of neighbouring bytes would lose one of them).
///   Aligned writes take a plain range lock, so they never wait for each
///   other, only for an RMW of the same blocks.
///
/// So the driver accepts any request and reports a request alignment of 1.
/// Users that never want bouncing set [`FileOptions::strict_alignment`]:
/// then the driver reports the probed alignment (a backend above rejects
/// misaligned requests before they get here) and refuses misaligned
/// requests itself with [`Error::Misaligned`].
///
/// A bounced write that ends past the end of the file extends the file to a
/// block boundary (the whole last block is written).
///
/// # Locking
///
/// With [`FileOptions::locking`] (the default) the driver takes open file
/// description locks (`F_OFD_SETLK`) the way QEMU's `locking=on` does: one
/// shared lock byte per permission it uses (offset 100 + bit) and one per
/// permission it does not let others use (offset 200 + bit), with the bits
/// of [`Perm`]: read 0, write 1, write-unchanged 2, resize 3. Then it checks
/// that nobody else holds the byte that would exclude it. The layout is
/// QEMU's, so the check works against `qemu-img`/`qemu-io`/QEMU too, and
/// because the locks belong to the open file description, two opens in one
/// process exclude each other as well. A writer takes read, write and
/// resize and shares read and write-unchanged; a reader takes read and
/// shares the same, unless [`FileOptions::share_writes`] (QEMU's
/// `force-share` / `share-rw`) lets others write. The locks go away when the
/// node leaves the graph (its `close`), or when the driver is dropped if it
/// never joined one. Filesystems without
/// OFD locks run unlocked ([`FileDriver::is_locked`] says which).
///
/// # Resizing
///
/// The driver implements [`BlockDriver::truncate`] (shrinking drops data,
/// growing adds a sparse tail; a block device cannot be resized). It is an
/// I/O operation (it runs on the blocking pool under the graph read lock,
/// as QEMU's `bdrv_co_truncate` does), reached only through the checked
/// paths: [`BlockBackend::truncate`](crate::BlockBackend::truncate) on a
/// backend that took [`Perm::RESIZE`], or a parent whose edge took it
/// ([`NodeRef::truncate_child`](crate::NodeRef::truncate_child)). A slow
/// `ftruncate` never stalls the main loop.
///
/// Writes past the end grow the file too. Parents that do that (qcow2
/// allocating clusters) take [`Perm::RESIZE`] on the file as well, as
/// QEMU's format drivers do; a backend cannot write past the end (its
/// requests are checked against the length).
///
/// # Example
///
/// ```
/// use blockgraph::{drivers::{FileDriver, FileOptions}, BackendOptions, MainLoop};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.img");
/// let file = FileDriver::create(&path, 1 << 20, FileOptions::default())?;
/// let main = MainLoop::new()?;
/// let blk = main.run(|bql| bql.write(|w| {
///     let node = w.add_node("file0", file, &[])?;
///     w.add_backend("vda", &node, BackendOptions::default())
/// }))?;
/// let io = main.new_io_thread("io0")?;
/// io.spawn(move |mut cx| async move {
///     blk.write(&mut cx, 512, b"hello").await?;
///     blk.flush(&mut cx).await
/// }).join()?;
/// assert_eq!(&std::fs::read(&path)?[512..517], b"hello");
/// # drop(io); main.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FileDriver {
    path: PathBuf,
    host: Arc<Host>,
    options: FileOptions,
    locked: bool,
    /// Serialises read-modify-writes against other writes (direct only).
    ranges: RangeLock,
}

/// Adds the path to an I/O error from opening or probing it.
fn path_error(path: &Path, what: &str, e: io::Error) -> Error {
    Error::Io(io::Error::new(
        e.kind(),
        format!("{what} '{}': {e}", path.display()),
    ))
}

impl FileDriver {
    /// Opens `path` (a regular file or a block device).
    ///
    /// Opening is synchronous: it is one `open`, one `fstat` and a few lock
    /// calls, done once on the main loop (or wherever the graph is built),
    /// like QEMU's `bdrv_open`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] (naming the path) when the file cannot be opened,
    /// [`Error::InvalidArgument`] when it is neither a regular file nor a
    /// block device or the filesystem refuses `O_DIRECT`, and
    /// [`Error::Locked`] when another user holds it in a conflicting way.
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<FileDriver> {
        Self::open_inner(path.as_ref(), options, false)
    }

    /// Creates (or empties) the file at `path`, sizes it to `size` bytes
    /// (sparse) and opens it writable with `options`.
    ///
    /// An existing file is locked before it is emptied, so a file in use by
    /// another writer is refused, not clobbered.
    pub fn create(path: impl AsRef<Path>, size: u64, options: FileOptions) -> Result<FileDriver> {
        let path = path.as_ref();
        if options.read_only {
            return Err(Error::InvalidArgument(format!(
                "cannot create '{}' read-only",
                path.display()
            )));
        }
        let driver = Self::open_inner(path, options, true)?;
        let host = &driver.host;
        if host.block_device {
            return Err(Error::InvalidArgument(format!(
                "'{}' is a block device; create images on regular files",
                path.display()
            )));
        }
        host.file
            .set_len(0)
            .and_then(|()| host.file.set_len(size))
            .map_err(|e| path_error(path, "cannot size", e))?;
        host.size.store(size, Ordering::SeqCst);
        Ok(driver)
    }

    fn open_inner(path: &Path, options: FileOptions, create: bool) -> Result<FileDriver> {
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only).create(create);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(|e| {
            if options.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::InvalidArgument(format!(
                    "the filesystem of '{}' does not support O_DIRECT (open it without direct)",
                    path.display()
                ))
            } else {
                path_error(path, "cannot open", e)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| path_error(path, "cannot stat", e))?;
        let kind = meta.file_type();
        let block_device = kind.is_block_device();
        if !kind.is_file() && !block_device {
            return Err(Error::InvalidArgument(format!(
                "'{}' is not a regular file or a block device",
                path.display()
            )));
        }
        let size = if block_device {
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| path_error(path, "cannot size", e))?
        } else {
            meta.len()
        };
        let align = if options.direct {
            u64::from(probe_alignment(&file, size))
        } else {
            1
        };
        let locked = if options.locking {
            lock_image(&file, path, &options)?
        } else {
            false
        };
        Ok(FileDriver {
            path: path.to_owned(),
            host: Arc::new(Host {
                file,
                size: AtomicU64::new(size),
                align,
                block_device,
            }),
            options,
            locked,
            ranges: RangeLock::default(),
        })
    }

    /// The path this driver opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> FileOptions {
        self.options
    }

    /// The `O_DIRECT` alignment (the device's logical block size, probed at
    /// open), or `None` for a buffered file.
    pub fn direct_alignment(&self) -> Option<u32> {
        // The alignment is at most 4096, from the probe.
        self.options
            .direct
            .then(|| u32::try_from(self.host.align).unwrap_or(u32::MAX))
    }

    /// Whether image locks are held (locking was asked for and the
    /// filesystem supports OFD locks).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether the file is a block device.
    pub fn is_block_device(&self) -> bool {
        self.host.block_device
    }

    fn check_writable(&self) -> Result<()> {
        if self.options.read_only {
            Err(Error::ReadOnly(self.path.display().to_string()))
        } else {
            Ok(())
        }
    }

    fn check_strict(&self, offset: u64, len: u64) -> Result<()> {
        let a = self.host.align;
        if self.options.strict_alignment && (offset % a != 0 || len % a != 0) {
            return Err(Error::Misaligned {
                offset,
                len,
                alignment: u32::try_from(a).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }

    /// The aligned range enclosing `[offset, offset + len)`.
    fn aligned(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let a = self.host.align;
        let end = offset
            .checked_add(len)
            .and_then(|end| end.checked_next_multiple_of(a))
            .ok_or(Error::OutOfRange {
                offset,
                len,
                size: u64::MAX,
            })?;
        Ok((offset - offset % a, end))
    }

    /// Locks the blocks a write touches when `O_DIRECT` bouncing could
    /// read-modify-write them; buffered files need no lock (the page cache
    /// merges byte ranges).
    async fn lock_blocks(&self, start: u64, end: u64, rmw: bool) -> Option<RangeGuard> {
        if self.host.align > 1 {
            Some(self.ranges.lock(start, end, rmw).await)
        } else {
            None
        }
    }

    async fn zero_by_writing(&self, node: RequestRef<'_>, offset: u64, len: u64) -> Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.write(node, offset + done, &zeroes[..n as usize])
                .await?;
            done += n;
        }
        Ok(())
    }
}

impl BlockDriver for FileDriver {
    /// Releases the image locks as the node leaves the graph (QEMU drops
    /// them in `raw_close`), so the image can be opened again at once even
    /// if a handle, a drain section or a finishing host call keeps the
    /// driver (and its descriptor) alive a little longer.
    fn close(&self, _node: CallbackRef<'_>) {
        if !self.locked {
            return;
        }
        let fd = self.host.file.as_raw_fd();
        let bits = LOCK_PERMS.len() as i64;
        for byte in
            (LOCK_PERM_BASE..LOCK_PERM_BASE + bits).chain(LOCK_SHARED_BASE..LOCK_SHARED_BASE + bits)
        {
            // Unlocking a byte we do not hold is a no-op; an error here
            // (none is expected for F_UNLCK) leaves the lock to the close of
            // the descriptor, as before.
            let _ = ofd_lock(fd, byte, libc::F_UNLCK as libc::c_short, libc::F_OFD_SETLK);
        }
    }

    fn format_name(&self) -> &'static str {
        if self.host.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn describe(&self) -> String {
        let mut s = format!("{} {}", self.format_name(), self.path.display());
        if self.options.read_only {
            s.push_str(", read-only");
        }
        if let Some(a) = self.direct_alignment() {
            s.push_str(&format!(", direct ({a}-byte blocks)"));
        }
        if self.locked {
            s.push_str(", locked");
        }
        s
    }

    fn request_alignment(&self, _node: RequestRef<'_>) -> u32 {
        if self.options.strict_alignment {
            u32::try_from(self.host.align).unwrap_or(u32::MAX)
        } else {
            1
        }
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.host.size.load(Ordering::SeqCst)) })
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            if len == 0 {
                return Ok(());
            }
            self.check_strict(offset, len)?;
            let (start, end) = self.aligned(offset, len)?;
            let host = self.host.clone();
            let bounce = blocking(move || {
                let mut bounce = AlignedBuf::new(end - start, host.align)?;
                read_or_zero(&host.file, bounce.as_mut_slice(), start)?;
                Ok(bounce)
            })
            .await?;
            let head = (offset - start) as usize;
            buf.copy_from_slice(&bounce.as_slice()[head..head + buf.len()]);
            Ok(())
        })
    }

    fn write<'a>(&'a self, _node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            let len = buf.len() as u64;
            if len == 0 {
                return Ok(());
            }
            self.check_strict(offset, len)?;
            let (start, end) = self.aligned(offset, len)?;
            let head = (offset - start) as usize;
            let rmw = start != offset || end != offset + len;
            // Copy first: the caller's buffer never leaves this thread.
            let mut bounce = AlignedBuf::new(end - start, self.host.align)?;
            bounce.as_mut_slice()[head..head + buf.len()].copy_from_slice(buf);
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
        })
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
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
                self.zero_by_writing(node, offset, len).await
            }
        })
    }

    fn discard<'a>(&'a self, _node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
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
        })
    }

    fn flush<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.options.read_only {
                return Ok(());
            }
            let host = self.host.clone();
            blocking(move || host.file.sync_data()).await
        })
    }

    /// Resizes the file (see [`FileDriver`]'s section on resizing).
    /// [`Error::ReadOnly`] on a read-only file, [`Error::Unsupported`] on a
    /// block device, [`Error::Io`] when the host refuses.
    fn truncate<'a>(
        &'a self,
        _node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            if self.host.block_device {
                return Err(Error::Unsupported {
                    driver: "host_device",
                    operation: "resizing a block device",
                });
            }
            let host = self.host.clone();
            // Serialised against read-modify-writes of the blocks from the
            // smaller end on (direct files only), so none of them puts old
            // bytes back past a shrink or reads half a resize.
            let from = size.min(self.host.size.load(Ordering::SeqCst));
            let from = from - from % self.host.align;
            let guard = self.lock_blocks(from, u64::MAX, true).await;
            blocking(move || {
                let _guard = guard;
                host.file.set_len(size)?;
                host.size.store(size, Ordering::SeqCst);
                Ok(())
            })
            .await
        })
    }

    fn block_status<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(async move {
            let size = self.host.size.load(Ordering::SeqCst);
            if offset >= size || len == 0 {
                return Ok((BlockStatus::Zero, len));
            }
            if self.host.block_device {
                return Ok((BlockStatus::Data, len));
            }
            let host = self.host.clone();
            blocking(move || Ok(seek_status(&host.file, offset, len, size))).await
        })
    }
}

/// Completes the partial first and last blocks of a bounced write from the
/// file: `bounce` holds the new bytes at `[head, tail)` of the aligned range
/// starting at `start`.
fn fill_partial_blocks(
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
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
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

/// Data or hole at `offset`, from `SEEK_DATA`/`SEEK_HOLE` (which read no
/// data and do not move anything we rely on: all I/O is positional).
fn seek_status(file: &File, offset: u64, len: u64, size: u64) -> (BlockStatus, u64) {
    let end = offset.saturating_add(len).min(size);
    let seek = |whence| -> Result<u64, Option<i32>> {
        let off = libc::off_t::try_from(offset).map_err(|_| None)?;
        // SAFETY: the descriptor belongs to `file`, alive for the call; the
        // call takes only integers.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        u64::try_from(r).map_err(|_| io::Error::last_os_error().raw_os_error())
    };
    match seek(libc::SEEK_DATA) {
        Ok(data) if data == offset => {
            let hole = seek(libc::SEEK_HOLE).unwrap_or(end).clamp(offset + 1, end);
            (BlockStatus::Data, hole - offset)
        }
        Ok(data) => (BlockStatus::Zero, (data.min(end) - offset).clamp(1, len)),
        // ENXIO: nothing but a hole up to the end of the file.
        Err(Some(libc::ENXIO)) => (BlockStatus::Zero, len),
        // No SEEK_DATA here: say data.
        Err(_) => (BlockStatus::Data, len),
    }
}

/// The enclosing range's memory, aligned for `O_DIRECT`, owned by whoever
/// runs the host call.
#[derive(Debug)]
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose address is a multiple of
    /// [`MEM_ALIGN`] when `align > 1` (a direct file).
    fn new(len: u64, align: u64) -> io::Result<AlignedBuf> {
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

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Runs a host call off the executor thread and waits for it.
async fn blocking<T, F>(f: F) -> Result<T>
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

/// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
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

/// The smallest power of two from 512 to 4096 that an `O_DIRECT` read at
/// offset 0 accepts; 4096 when the file is empty (nothing to probe with) or
/// the probe is inconclusive.
fn probe_alignment(file: &File, size: u64) -> u32 {
    if size == 0 {
        return 4096;
    }
    for align in [512u32, 1024, 2048, 4096] {
        let Ok(mut buf) = AlignedBuf::new(u64::from(align), 2) else {
            break;
        };
        match file.read_at(buf.as_mut_slice(), 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => break,
        }
    }
    4096
}

/// Offsets of QEMU's lock bytes.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
/// The permissions with lock bytes, in bit order.
const LOCK_PERMS: [(Perm, &str); 4] = [
    (Perm::CONSISTENT_READ, "consistent read"),
    (Perm::WRITE, "write"),
    (Perm::WRITE_UNCHANGED, "write unchanged"),
    (Perm::RESIZE, "resize"),
];

/// Takes the image locks for `options`; `Ok(false)` when the filesystem has
/// no OFD locks.
fn lock_image(file: &File, path: &Path, options: &FileOptions) -> Result<bool> {
    let take = if options.read_only {
        Perm::CONSISTENT_READ
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
    };
    let share = if options.share_writes {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    let fd = file.as_raw_fd();
    for (bit, (perm, _)) in LOCK_PERMS.iter().enumerate() {
        let bit = bit as i64;
        for (wanted, byte) in [
            (take.contains(*perm), LOCK_PERM_BASE + bit),
            (!share.contains(*perm), LOCK_SHARED_BASE + bit),
        ] {
            if !wanted {
                continue;
            }
            match ofd_lock(fd, byte, libc::F_RDLCK as libc::c_short, libc::F_OFD_SETLK) {
                Ok(_) => {}
                Err(e) if unsupported_lock(&e) => return Ok(false),
                Err(e) => return Err(locked(path, *perm, e)),
            }
        }
    }
    for (bit, (perm, name)) in LOCK_PERMS.iter().enumerate() {
        let bit = bit as i64;
        let who = |byte| -> Result<bool> {
            ofd_lock(fd, byte, libc::F_WRLCK as libc::c_short, libc::F_OFD_GETLK)
                .map_err(|e| path_error(path, "cannot test locks on", e))
        };
        if take.contains(*perm) && who(LOCK_SHARED_BASE + bit)? {
            return Err(Error::Locked {
                path: path.display().to_string(),
                detail: format!(
                    "another user does not share the \"{name}\" permission this open needs; \
                     is the image in use by another process or node?"
                ),
            });
        }
        if !share.contains(*perm) && who(LOCK_PERM_BASE + bit)? {
            return Err(Error::Locked {
                path: path.display().to_string(),
                detail: format!(
                    "another user holds the \"{name}\" permission this open does not share; \
                     is the image in use by another process or node? (open read-only with \
                     share_writes to look at it anyway)"
                ),
            });
        }
    }
    Ok(true)
}

fn unsupported_lock(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn locked(path: &Path, perm: Perm, e: io::Error) -> Error {
    Error::Locked {
        path: path.display().to_string(),
        detail: format!("cannot take the lock for {perm}: {e}"),
    }
}

/// One `fcntl` OFD lock call on the single byte at `byte`. For
/// `F_OFD_GETLK`, returns whether another open file description holds a
/// lock that conflicts with the `kind` lock described.
fn ofd_lock(fd: libc::c_int, byte: i64, kind: libc::c_short, cmd: libc::c_int) -> io::Result<bool> {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a
    // valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_pid = 0; // required by OFD locks
    loop {
        // SAFETY: `fd` is an open descriptor owned by a `File` the caller
        // keeps alive for the call, and `fl` is a valid, exclusively
        // borrowed `flock` that the kernel reads (and for GETLK writes)
        // only during the call.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
}
