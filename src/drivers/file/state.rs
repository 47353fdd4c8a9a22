//! The driver's state (QEMU's `BDRVRawState` in `file-posix.c`): the
//! [`FileDriver`] struct, its accessors, and the checks requests make.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::driver::range_lock::RangeLock;
use crate::types::{Error, Result};

use super::host::Host;
use super::options::{Aio, FileOptions};

/// A node backed by a host file or block device.
///
/// # Threads and buffers
///
/// With [`Aio::IoUring`] (the default where the kernel allows it; see
/// [`FileOptions::aio`]) reads, writes and flushes made on an I/O thread go
/// through that thread's io_uring: the request is copied into (or out of)
/// a buffer the ring owns, and the completion wakes the request on the
/// same thread, without other threads or locks. The caller's buffer never
/// reaches the kernel, so dropping or leaking a request future half way is
/// harmless. Everything else (zeroing, discard, resize, reads and writes
/// polled off I/O threads, read-modify-writes of partial `O_DIRECT` blocks)
/// takes the thread-pool path below.
///
/// Before either, a buffered read first asks the page cache, without ever
/// waiting for the device (`preadv2` with `RWF_NOWAIT`): what is cached is
/// copied straight into the caller's buffer during the call, which is over
/// before the request's first poll returns, and only the rest (pages that
/// need I/O) takes the ring or the pool. Nothing outlives the call, so
/// this lends the caller's memory to the kernel no longer than a borrow
/// lasts. A buffered write that is the file's only write in flight takes
/// the pool rather than the ring (ext4 hands buffered writes on a ring to
/// a kernel worker anyway, a dearer hop when nothing else is queued).
///
/// With [`Aio::Threads`], host I/O blocks, so every system call runs on tokio's blocking pool
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
///
/// [`Perm`]: crate::types::Perm
/// [`Perm::RESIZE`]: crate::types::Perm::RESIZE
/// [`BlockDriver::truncate`]: crate::graph::driver::BlockDriver::truncate
#[derive(Debug)]
pub struct FileDriver {
    pub(super) path: PathBuf,
    pub(super) host: Arc<Host>,
    pub(super) options: FileOptions,
    /// Image locks held (changes on a reopen that cannot take them).
    pub(super) locked: AtomicBool,
    /// The current mode (changes on a reopen; `options.read_only` is the
    /// mode it was opened in).
    pub(super) read_only: AtomicBool,
    /// Serialises read-modify-writes against other writes (direct only).
    pub(super) ranges: RangeLock,
    /// The I/O path chosen at open.
    pub(super) aio: Aio,
    /// Writes in flight on this file (see `FileDriver::lone_buffered_write`).
    pub(super) writes: std::sync::atomic::AtomicUsize,
}

impl FileDriver {
    /// The path this driver opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with, `read_only` as it is now (a reopen
    /// may have switched it).
    pub fn options(&self) -> FileOptions {
        FileOptions {
            read_only: self.is_read_only(),
            ..self.options
        }
    }

    /// Whether the file is open read-only now.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
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
        self.locked.load(Ordering::Acquire)
    }

    /// How host I/O is done: chosen at open from [`FileOptions::aio`] and
    /// what the kernel allows (see [`Aio::io_uring_available`]).
    pub fn aio(&self) -> Aio {
        self.aio
    }

    /// Whether the file is a block device.
    pub fn is_block_device(&self) -> bool {
        self.host.block_device
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            Err(Error::ReadOnly(self.path.display().to_string()))
        } else {
            Ok(())
        }
    }

    pub(super) fn check_strict(&self, offset: u64, len: u64) -> Result<()> {
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
    pub(super) fn aligned(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
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
}
