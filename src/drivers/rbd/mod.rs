//! The `rbd` protocol driver: images in a Ceph pool through librbd
//! (QEMU's `block/rbd.c`), behind the `rbd` cargo feature.
//!
//! See [`RbdDriver`] for the library, threads, buffers and credentials.
//!
//! # Where things are
//!
//! Bottom to top: `ffi.rs` (librados/librbd loaded at run time), `options.rs`
//! ([`RbdOptions`], QEMU's `rbd:` file names, [`RbdSecret`]), `image.rs`
//! (the connection and the image handle, synchronous calls), `aio.rs`
//! (librbd's asynchronous requests as futures, and why that is sound). This
//! file: the [`RbdDriver`] and its [`BlockDriver`] implementation.

mod aio;
mod ffi;
mod image;
mod options;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::{BlockStatus, DriverInfo, Error, Result};

use aio::{Aio, Op};
use image::Image;

pub use image::RbdSnapshot;
pub use options::{RbdOptions, RbdSecret};

/// Largest zero buffer written at once when librbd has no write-zeroes.
const ZERO_CHUNK: u64 = 1 << 20;

/// A node backed by an RBD image in a Ceph cluster (QEMU's `rbd` driver).
///
/// # The library
///
/// librbd and librados are loaded with `dlopen` when the first image is
/// opened (`librbd.so.1`, `librados.so.2`), not linked: the crate builds
/// with the `rbd` feature on machines without Ceph, and opening an image
/// there fails with an error that names the missing library. Debian's
/// package is `librbd1`.
///
/// # Threads and buffers
///
/// Reads, writes, discards, write-zeroes and flushes are librbd's
/// asynchronous calls (`rbd_aio_*`); librbd runs them on its own threads
/// and calls back on one of them, which completes the request's future and
/// wakes the I/O thread. The buffer librbd reads or writes is the request's
/// own, never the caller's: writes are copied into it, reads copied out of
/// it. A cancelled (dropped) request leaves that buffer alive until librbd
/// calls back, so librbd never writes into freed memory (see `aio.rs` for
/// the whole argument). Resizing (`rbd_resize`, synchronous) runs on
/// tokio's blocking pool. Closing waits for every submitted request's
/// callback.
///
/// # Configuration and credentials
///
/// From Ceph's usual places, then [`RbdOptions`]: the configuration file
/// (`conf`, else Ceph's default search: `$CEPH_CONF`,
/// `/etc/ceph/ceph.conf`, …), `CEPH_ARGS`, the keyring named there (or in
/// [`RbdOptions::keyring`]), or the key itself ([`RbdOptions::key`]). The
/// key is handed to librados once and appears nowhere else: not in
/// `Debug`, [`describe`](BlockDriver::describe), [`info`](BlockDriver::info)
/// or any error. A key that is not a well-formed cephx key is refused
/// before librados sees it, because librados writes a key it cannot
/// decode into its log ([`RbdSecret::is_well_formed`]).
///
/// # Size, block status, read-only
///
/// Writes past the end grow the image first (as QEMU's driver does, so
/// qcow2 can allocate on it); [`truncate`](BlockDriver::truncate) resizes
/// it. Block status comes from the object map (allocated objects are data,
/// the rest zero; everything is data without a valid fast-diff map).
/// Read-only ↔ read-write is a flag when the image was opened for writing;
/// an image opened read-only, or a snapshot, stays read-only.
///
/// # Snapshots
///
/// Opening at [`RbdOptions::snapshot`] reads that snapshot, read-only (QEMU
/// turns such a node read-only too). [`RbdDriver::snapshots`] lists the
/// image's snapshots, and node info reports them (`snapshots`: the count;
/// `snapshot[i]`: each name, oldest first).
///
/// # Example
///
/// ```no_run
/// use blockgraph::drivers::{RbdDriver, RbdOptions};
/// use blockgraph::{BackendOptions, MainLoop};
///
/// let opts = RbdOptions::parse_filename("rbd:rbd/disk0:conf=/etc/ceph/ceph.conf")?;
/// let rbd = RbdDriver::create(opts, 1 << 30)?;
/// let main = MainLoop::new()?;
/// let blk = main.run(|bql| bql.write(|w| {
///     let node = w.add_node("rbd0", rbd, &[])?;
///     w.add_backend("vda", &node, BackendOptions::default())
/// }))?;
/// let io = main.new_io_thread("io0")?;
/// io.spawn(move |mut cx| async move {
///     blk.write(&mut cx, 0, b"hello").await?;
///     blk.flush(&mut cx).await
/// }).join()?;
/// # drop(io); main.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RbdDriver {
    options: RbdOptions,
    image: Arc<Image>,
    /// The current mode (a reopen may switch it).
    read_only: AtomicBool,
    /// Whether the image handle was opened for writing (`rbd_open`, not
    /// `rbd_open_read_only`): only then can the node become read-write.
    writable_handle: bool,
    object_size: u64,
    /// The size as last seen (for growing on writes past the end).
    size: AtomicU64,
    /// Serialises growing the image.
    grow: tokio::sync::Mutex<()>,
}

impl RbdDriver {
    /// Connects to the cluster and opens the image (read-only with
    /// [`RbdOptions::read_only`] or a snapshot). Blocks until the cluster
    /// answers.
    ///
    /// # Errors
    ///
    /// [`Error::Driver`] when librbd cannot be loaded, the configuration
    /// cannot be read, the cluster refuses (a wrong key: permission
    /// denied; no monitor: timed out), or the pool or image does not exist;
    /// [`Error::InvalidArgument`] for a name with a NUL byte.
    pub fn open(options: RbdOptions) -> Result<RbdDriver> {
        let read_only = options.read_only || options.snapshot.is_some();
        let image = Image::open(&options, read_only)?;
        let object_size = image.object_size()?;
        let size = image.size()?;
        Ok(RbdDriver {
            options,
            image: Arc::new(image),
            read_only: AtomicBool::new(read_only),
            writable_handle: !read_only,
            object_size,
            size: AtomicU64::new(size),
            grow: tokio::sync::Mutex::new(()),
        })
    }

    /// Creates the image `options.image` of `size` bytes (librbd's
    /// defaults: format 2, 4 MiB objects) and opens it.
    ///
    /// # Errors
    ///
    /// As [`RbdDriver::open`]; [`Error::Driver`] wrapping `EEXIST` when the
    /// image exists.
    pub fn create(options: RbdOptions, size: u64) -> Result<RbdDriver> {
        Image::create(&options, size)?;
        RbdDriver::open(options)
    }

    /// The options it was opened with.
    pub fn options(&self) -> &RbdOptions {
        &self.options
    }

    /// The image's snapshots, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::Driver`] when librbd cannot list them.
    pub fn snapshots(&self) -> Result<Vec<RbdSnapshot>> {
        self.image.snapshots()
    }

    /// The image's object size (what QEMU reports as its cluster size).
    pub fn object_size(&self) -> u64 {
        self.object_size
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only.load(Ordering::Acquire) {
            Err(Error::ReadOnly(self.options.display_name()))
        } else {
            Ok(())
        }
    }

    /// Grows the image to cover `end` if it is smaller (QEMU's rbd driver
    /// does the same: a format above, such as qcow2, allocates by writing
    /// past the end, as it does on a file).
    async fn cover(&self, end: u64) -> Result<()> {
        if end <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.grow.lock().await;
        let now = self.image.size()?;
        if end > now {
            let image = self.image.clone();
            blocking(move || image.resize(end)).await?;
        }
        self.size.fetch_max(end.max(now), Ordering::AcqRel);
        Ok(())
    }

    fn end(offset: u64, len: u64) -> Result<u64> {
        offset.checked_add(len).ok_or(Error::OutOfRange {
            offset,
            len,
            size: u64::MAX,
        })
    }

    async fn submit(&self, offset: u64, op: Op<'_>) -> Result<(i64, Vec<u8>)> {
        Aio::submit(&self.image, offset, op)?.await
    }

    async fn do_write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        self.cover(Self::end(offset, len)?).await?;
        if Aio::has_write_zeroes(&self.image) && usize::try_from(len).is_ok() {
            return self.submit(offset, Op::WriteZeroes(len)).await.map(drop);
        }
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.submit(offset + done, Op::Write(&zeroes[..n as usize]))
                .await?;
            done += n;
        }
        Ok(())
    }
}

impl BlockDriver for RbdDriver {
    fn format_name(&self) -> &'static str {
        "rbd"
    }

    fn describe(&self) -> String {
        let mut s = format!("rbd {}", self.options.display_name());
        if BlockDriver::is_read_only(self) {
            s.push_str(", read-only");
        }
        s
    }

    fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Read-only is a flag on a handle opened for writing (a live snapshot
    /// makes the old top read-only; commit and mirror make their target
    /// writable again). An image opened read-only, or a snapshot, stays
    /// read-only: [`Error::ReadOnly`] for a snapshot,
    /// [`Error::Unsupported`] otherwise.
    fn set_read_only(&self, _node: CallbackRef<'_>, read_only: bool) -> Result<()> {
        if !read_only && !self.writable_handle {
            if self.options.snapshot.is_some() {
                return Err(Error::ReadOnly(self.options.display_name()));
            }
            return Err(Error::Unsupported {
                driver: "rbd",
                operation: "switching an image opened read-only to read-write",
            });
        }
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }

    /// The image name (`rbd:pool/image[@snapshot][:conf=…]`, no
    /// credentials), its size, the object size as the cluster size, and
    /// `pool`, `namespace`, `image`, `snapshot` (the one opened), and the
    /// image's snapshots (`snapshots`: the count, `snapshot[i]`: each name,
    /// oldest first). Asks librbd for the size and the snapshots, which it
    /// answers from its cached header (refreshed when another client
    /// changed it).
    fn info(&self) -> DriverInfo {
        let o = &self.options;
        let mut info = DriverInfo::new()
            .filename(o.display_name())
            .cluster_size(self.object_size)
            .specific("pool", &o.pool);
        if let Ok(size) = self.image.size() {
            info = info.size(size);
        }
        if let Some(ns) = &o.namespace {
            info = info.specific("namespace", ns);
        }
        info = info.specific("image", &o.image);
        if let Some(snap) = &o.snapshot {
            info = info.specific("snapshot", snap);
        }
        if let Ok(snaps) = self.image.snapshots() {
            info = info.specific("snapshots", snaps.len());
            for (i, s) in snaps.iter().enumerate() {
                info = info.specific(format!("snapshot[{i}]"), &s.name);
            }
        }
        info
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(std::future::ready(self.image.size().inspect(|s| {
            self.size.store(*s, Ordering::Release);
        })))
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if buf.is_empty() {
                return Ok(());
            }
            // The state's buffer: what librbd did not place is zeroed.
            let (_, data) = self.submit(offset, Op::Read(buf.len())).await?;
            buf.copy_from_slice(&data[..buf.len()]);
            self.image.buffers.put(data);
            Ok(())
        })
    }

    fn write<'a>(&'a self, _node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            if buf.is_empty() {
                return Ok(());
            }
            self.cover(Self::end(offset, buf.len() as u64)?).await?;
            let (_, data) = self.submit(offset, Op::Write(buf)).await?;
            self.image.buffers.put(data);
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_write_zeroes(offset, len))
    }

    fn discard<'a>(&'a self, _node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            if len == 0 {
                return Ok(());
            }
            self.submit(offset, Op::Discard(len)).await.map(drop)
        })
    }

    fn flush<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.read_only.load(Ordering::Acquire) {
                return Ok(());
            }
            self.submit(0, Op::Flush).await.map(drop)
        })
    }

    /// Allocated objects are data, the rest zero, from the image's
    /// object map (`rbd_diff_iterate2` over whole objects, on the blocking
    /// pool: QEMU's rbd driver does the same); everything is data for an
    /// image without a valid fast-diff map.
    fn block_status<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(async move {
            let size = self.image.size()?;
            let len = len.min(size.saturating_sub(offset));
            if len == 0 {
                return Ok((BlockStatus::Data, 0));
            }
            let image = self.image.clone();
            Ok(
                match blocking(move || image.allocation(offset, len)).await? {
                    None => (BlockStatus::Data, len),
                    Some((true, n)) => (BlockStatus::Data, n.min(len)),
                    Some((false, n)) => (BlockStatus::Zero, n.min(len)),
                },
            )
        })
    }

    /// Resizes the image (`rbd_resize`, on tokio's blocking pool: it waits
    /// for the cluster). [`Error::ReadOnly`] on a read-only image or
    /// snapshot.
    fn truncate<'a>(
        &'a self,
        _node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            let _g = self.grow.lock().await;
            let image = self.image.clone();
            blocking(move || image.resize(size)).await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }
}

/// Runs a blocking librbd call off the executor thread and waits for it.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let lost = || Error::driver("rbd", "the thread running a librbd call panicked");
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime.spawn_blocking(f).await.map_err(|_| lost())?,
        Err(_) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("blockgraph-rbd".into())
                .spawn(move || {
                    let _ = tx.send(f());
                })?;
            rx.await.map_err(|_| lost())?
        }
    }
}
