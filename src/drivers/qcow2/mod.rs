//! The `qcow2` format driver: QEMU's copy-on-write image format, versions 2
//! and 3, interchangeable with `qemu-img`.
//!
//! The node's [`File`](ChildRole::File) child holds the image; its
//! [`Backing`](ChildRole::Backing) child, if any, supplies what the image
//! does not store. Opening reads the header, so it needs I/O and therefore
//! a read proof: [`Qcow2Driver::open`] is an `async` constructor that takes
//! the file node's [`IoRef`] (the whole open is one request entering
//! there); the node is then added to the graph on the
//! main loop. [`open_image_chain`] does all of that for an image file and
//! its backing files under a [`BackingPolicy`].
//!
//! ```
//! use blockgraph::{ChildRole, MainLoop};
//! use blockgraph::drivers::{qcow2::{Qcow2Driver, Qcow2Options}, MemoryDriver};
//! use blockgraph::drivers::qcow2::CreateOptions;
//!
//! let main = MainLoop::new()?;
//! let io = main.new_io_thread("io0")?;
//! let file = main.run(|bql| bql.write(|w| w.add_node("img", MemoryDriver::new(1 << 20), &[])))?;
//! let m = main.clone();
//! let f = file.clone();
//! let data = io.spawn(move |mut cx| async move {
//!     // Format the file and open it (I/O: under a read guard).
//!     let drv = {
//!         let g = cx.read().await;
//!         Qcow2Driver::create(f.io(&g), &CreateOptions::new(4 << 20)).await?;
//!         Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await?
//!     };
//!     // Add the node (main loop), then use it.
//!     let disk = cx
//!         .run_on_main_loop(move |bql| bql.write(|w| w.add_node("disk", drv, &[(ChildRole::File, &f)])))
//!         .await??;
//!     let g = cx.read().await;
//!     let node = disk.io(&g);
//!     node.write(65536, &[7; 512]).await?;
//!     node.flush().await?;
//!     let mut buf = [0u8; 512];
//!     node.read(65536, &mut buf).await?;
//!     Ok::<_, blockgraph::Error>(buf)
//! }).join()?;
//! assert_eq!(data, [7; 512]);
//! # drop(io); m.shutdown();
//! # Ok::<(), blockgraph::Error>(())
//! ```
//!
//! # Concurrency
//!
//! Requests from any number of I/O threads may run at once. Metadata lives
//! behind an async mutex (held only for lookups and table updates, never
//! while guest data moves); a guest cluster being allocated is marked in
//! flight so a second writer waits for it instead of allocating it twice;
//! freed clusters are reused only after every request that might still
//! read them has finished. No thread ever blocks waiting for another
//! request.
//!
//! # Resizing
//!
//! Through [`BlockBackend::truncate`](crate::BlockBackend::truncate) on a
//! backend that took [`Perm::RESIZE`] (QEMU's `block_resize`). Growing
//! moves the L1 table to larger fresh clusters when the new size needs
//! more entries, and makes the new area read as zeroes even over a longer
//! backing file; shrinking is allowed only over nothing the image stores
//! (discard first); images with internal snapshots refuse. The image stays
//! consistent at every instant (details in `resize.rs`).
//!
//! # Durability
//!
//! Metadata is cached and written back on [`flush`](BlockDriver::flush)
//! in an order that keeps the image consistent at every instant (see
//! `meta.rs`): a crash leaves at worst leaked clusters, and flushed writes
//! survive. Because main-loop callbacks cannot do I/O, **flush the node
//! before removing it from the graph**; unflushed metadata is otherwise
//! lost, like unflushed data.

mod bitmap;
mod cache;
mod chain;
mod check;
mod compressed;
mod create;
mod entry;
mod header;
mod meta;
mod resize;
mod snapshot;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;

use tokio::sync::{Mutex, Notify, RwLock};

use crate::driver::require_child;
use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, IoRef, RequestRef};
use crate::types::BlockStatus;
use crate::types::{ChildRole, Perm, Permissions};
use crate::types::{Error, Result};

use cache::TableCache;
use entry::{decode_l2, Entry, COMPRESSED, COPIED, ZERO};
use header::{
    invalid, unsupported, Header, AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
    OFF_INCOMPATIBLE,
};
use meta::{Geo, Meta};

pub use bitmap::BitmapInfo;
pub use chain::{
    open_image_chain, BackingPolicy, ChainImage, ChainOptions, FileOpener, ImageChain,
};
pub use check::CheckReport;
pub use create::CreateOptions;
pub use snapshot::SnapshotInfo;

/// Bounds on what an untrusted image may make us allocate or address.
///
/// Every table size in a header is checked against these before any memory
/// is allocated for it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Qcow2Limits {
    /// Largest virtual disk size accepted, in bytes.
    pub max_virtual_size: u64,
    /// Largest L1 table, in bytes (QEMU: 32 MiB).
    pub max_l1_bytes: u64,
    /// Largest refcount table, in bytes (QEMU: 8 MiB).
    pub max_refcount_table_bytes: u64,
    /// Host offsets (the image file's size) stay below this.
    pub max_file_size: u64,
    /// Most host clusters [`Qcow2Driver::check`] will account for.
    pub max_check_clusters: u64,
}

impl Default for Qcow2Limits {
    fn default() -> Self {
        Qcow2Limits {
            max_virtual_size: 1 << 56,
            max_l1_bytes: 32 << 20,
            max_refcount_table_bytes: 8 << 20,
            max_file_size: 1 << 56,
            max_check_clusters: 1 << 28,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Qcow2Options {
    /// Refuse writes and never touch the file.
    pub read_only: bool,
    /// Bounds for untrusted images.
    pub limits: Qcow2Limits,
    /// Memory for cached L2 tables (at least two tables are kept).
    pub l2_cache_bytes: u64,
    /// Memory for cached refcount blocks (at least two are kept).
    pub refcount_cache_bytes: u64,
    /// Whether [`BlockDriver::open`] insists on a backing child when the
    /// image names a backing file (default `true`: without it, unallocated
    /// clusters would silently read as zeroes).
    pub require_backing: bool,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            read_only: false,
            limits: Qcow2Limits::default(),
            l2_cache_bytes: 1 << 20,
            refcount_cache_bytes: 256 << 10,
            require_backing: true,
        }
    }
}

impl Qcow2Options {
    /// Default options, read-only.
    pub fn read_only() -> Self {
        Qcow2Options {
            read_only: true,
            ..Self::default()
        }
    }
}

/// Where a guest range is stored (the first `n` bytes of a lookup).
#[derive(Debug, Clone, Copy)]
enum Mapping {
    Unallocated,
    Zero,
    /// Host offset of the first byte.
    Data(u64),
    Compressed {
        offset: u64,
        bytes: u64,
    },
}

/// What a write stores.
#[derive(Clone, Copy)]
enum Src<'a> {
    Buf(&'a [u8]),
    Zeroes,
}

impl Src<'_> {
    fn copy_to(&self, from: usize, dst: &mut [u8]) {
        match self {
            Src::Buf(b) => dst.copy_from_slice(&b[from..from + dst.len()]),
            Src::Zeroes => dst.fill(0),
        }
    }
}

/// A qcow2 image: a [`BlockDriver`] for the node whose `File` child holds
/// it.
pub struct Qcow2Driver {
    geo: Geo,
    /// The virtual size in bytes. Changed only by a resize, which holds
    /// `io_lock` exclusively; requests check against it after taking
    /// `io_lock` shared, so none sees it change half way.
    size: AtomicU64,
    read_only: bool,
    nb_snapshots: u32,
    snapshots_offset: u64,
    backing_file: Option<String>,
    backing_format: Option<String>,
    file_node: String,
    require_backing: bool,
    limits: Qcow2Limits,
    meta: Mutex<Meta>,
    /// Shared by every request while it may touch host clusters; exclusive
    /// while freed clusters become reusable.
    io_lock: RwLock<()>,
    /// Guest clusters being allocated right now.
    inflight: StdMutex<HashSet<u64, cache::OffsetHash>>,
    /// Signalled whenever an allocation finishes.
    alloc_done: Notify,
    /// The last cluster decompressed: (its L2 entry offset, data).
    last_inflated: StdMutex<Option<(u64, std::sync::Arc<Vec<u8>>)>>,
    /// The persistent dirty bitmaps, as last written to the directory.
    bitmap_infos: StdMutex<Vec<BitmapInfo>>,
    /// Some bitmap is still marked consistent: the first change to the
    /// image must mark them in use first.
    bitmaps_to_mark: AtomicBool,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("version", &self.geo.version)
            .field("cluster_size", &self.geo.cs)
            .field("size", &self.size())
            .field("backing_file", &self.backing_file)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Removes guest clusters from the in-flight set when an allocation ends,
/// however it ends (also when the request is cancelled).
struct InflightGuard<'a> {
    drv: &'a Qcow2Driver,
    first: u64,
    count: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.drv.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for c in self.first..self.first + self.count {
            set.remove(&c);
        }
        drop(set);
        self.drv.alloc_done.notify_waiters();
    }
}

/// Reads `len` bytes at `off` from the file, rounding the request out to
/// the file's alignment and reading zeroes past its end.
async fn read_file(
    file: RequestRef<'_>,
    align: u64,
    file_len: u64,
    off: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let start = off / align * align;
    let end = (off + len as u64).div_ceil(align) * align;
    let avail_end = end.min(file_len.max(start));
    let mut buf = vec![0u8; (end - start) as usize];
    if avail_end > start {
        file.read(start, &mut buf[..(avail_end - start) as usize])
            .await?;
    }
    let skip = (off - start) as usize;
    buf.drain(..skip);
    buf.truncate(len);
    Ok(buf)
}

/// Reads guest data stored at `host`, zeroes past the end of the file.
async fn read_data(file: RequestRef<'_>, file_len: u64, host: u64, buf: &mut [u8]) -> Result<()> {
    let avail = file_len.saturating_sub(host).min(buf.len() as u64) as usize;
    if avail > 0 {
        file.read(host, &mut buf[..avail]).await?;
    }
    buf[avail..].fill(0);
    Ok(())
}

impl Qcow2Driver {
    /// Opens the image held by `file` (a node already in the graph),
    /// validating the whole header and loading the L1 and refcount tables.
    ///
    /// Add the returned driver to the graph with `file` as its
    /// [`ChildRole::File`] child (and the backing node, if the image names
    /// one, as [`ChildRole::Backing`]). A writable open of an image whose
    /// dirty bit is set repairs its refcounts first; unknown auto-clear
    /// feature bits are cleared.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidImage`] for anything malformed or out of bounds,
    /// [`Error::UnsupportedImage`] for features we cannot honour
    /// (encryption, external data files, extended L2 entries, compression
    /// other than deflate, unknown incompatible features), and the file's
    /// own I/O errors. Images with internal snapshots are writable: what a write
    /// changes is copied first, so the snapshots keep their data.
    ///
    /// The whole open is one request entering the graph at `file` (counted
    /// by drains of it; refused with [`Error::Drained`] while it is drained).
    pub async fn open(file: IoRef<'_>, options: Qcow2Options) -> Result<Qcow2Driver> {
        let (_request, file) = file.admit()?;
        Self::open_in_request(file, options).await
    }

    async fn open_in_request(file: RequestRef<'_>, options: Qcow2Options) -> Result<Qcow2Driver> {
        let file_len = file.length().await?;
        let align = u64::from(file.request_alignment().max(1));
        let limits = options.limits.clone();
        // The cluster size is at bytes 20..24; read enough to see it.
        let peek = read_file(file, align, file_len, 0, 104.min(file_len as usize)).await?;
        let cs = if peek.len() >= 24 {
            let bits = header::be32(&peek, 20);
            if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
                1u64 << bits
            } else {
                512
            }
        } else {
            512
        };
        let first_len = cs.min(file_len) as usize;
        let first = read_file(file, align, file_len, 0, first_len).await?;
        let h = Header::parse(&first, file_len, &limits)?;
        let cs = h.cluster_size();
        if align > cs {
            return Err(unsupported(format!(
                "{cs}-byte clusters on a file that needs {align}-byte alignment"
            )));
        }
        let read_only = options.read_only;
        if !read_only && h.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(invalid(
                "the image is marked corrupt; open it read-only or repair it with qemu-img check -r all",
            ));
        }

        let geo = Geo {
            cluster_bits: h.cluster_bits,
            cs,
            l2_entries: header::l2_entries(h.cluster_bits),
            version: h.version,
            refcount_order: h.refcount_order,
            rb_entries: (cs * 8) >> h.refcount_order,
            align,
            max_host: limits.max_file_size.min(1 << 56),
            max_rt_bytes: limits.max_refcount_table_bytes,
        };

        let l1_bytes = read_file(
            file,
            align,
            file_len,
            h.l1_table_offset,
            h.l1_size as usize * 8,
        )
        .await?;
        let l1: Vec<u64> = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let rt_len = (u64::from(h.refcount_table_clusters) * cs) as usize;
        let rt_bytes = read_file(file, align, file_len, h.refcount_table_offset, rt_len).await?;
        let rt: Vec<u64> = rt_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut hdr = first;
        hdr.resize(cs as usize, 0);
        let bitmaps = match h.bitmaps {
            None => None,
            Some(ext) => {
                let len = ext.directory_size.div_ceil(cs) * cs;
                let raw =
                    read_file(file, align, file_len, ext.directory_offset, len as usize).await?;
                Some(bitmap::BitmapDir::parse(ext, raw, cs, h.size)?)
            }
        };

        let l2_cap = (options.l2_cache_bytes / cs).max(2) as usize;
        let rb_cap = (options.refcount_cache_bytes / cs).max(2) as usize;
        let mut meta = Meta {
            geo,
            hdr,
            l1_offset: h.l1_table_offset,
            l1,
            l1_dirty: None,
            l2: TableCache::new(l2_cap),
            rt_offset: h.refcount_table_offset,
            rt,
            rb: TableCache::new(rb_cap),
            free_hint: 0,
            file_len,
            pending_frees: Vec::new(),
            bitmaps,
            broken: None,
        };

        if !read_only {
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                let report = check::check_meta(
                    &mut meta,
                    file,
                    true,
                    &limits,
                    (h.nb_snapshots > 0).then_some((h.snapshots_offset, h.nb_snapshots)),
                )
                .await?;
                if report.corruptions > report.repaired_corruptions {
                    return Err(invalid(format!(
                        "the image is dirty and its refcounts could not be repaired: {}",
                        report.messages.join("; ")
                    )));
                }
                meta.write_back(file).await?;
                file.flush().await?;
                let inc = h.incompatible & !INCOMPAT_DIRTY;
                meta.hdr[OFF_INCOMPATIBLE..OFF_INCOMPATIBLE + 8]
                    .copy_from_slice(&inc.to_be_bytes());
                meta.write_header(file, OFF_INCOMPATIBLE, OFF_INCOMPATIBLE + 8)
                    .await?;
                file.flush().await?;
            }
            // Auto-clear bits we do not maintain are cleared before the
            // first write, as the spec requires. Bit 0 (bitmaps consistent)
            // we keep where there are bitmaps: they stay valid until guest
            // data changes, and then we mark them in use (see
            // `bitmap.rs`). Clearing it would make QEMU drop them.
            let keep = if meta.bitmaps.is_some() {
                AUTOCLEAR_BITMAPS
            } else {
                0
            };
            if h.autoclear & !keep != 0 {
                meta.set_autoclear(file, h.autoclear & keep).await?;
                file.flush().await?;
            }
        }

        let bitmap_infos = meta
            .bitmaps
            .as_ref()
            .map(bitmap::BitmapDir::infos)
            .unwrap_or_default();
        let bitmaps_to_mark = meta
            .bitmaps
            .as_ref()
            .is_some_and(bitmap::BitmapDir::any_consistent);
        Ok(Qcow2Driver {
            geo,
            size: AtomicU64::new(h.size),
            read_only,
            nb_snapshots: h.nb_snapshots,
            snapshots_offset: h.snapshots_offset,
            backing_file: h.backing_file,
            backing_format: h.backing_format,
            file_node: file.name().to_owned(),
            require_backing: options.require_backing,
            limits,
            meta: Mutex::new(meta),
            io_lock: RwLock::new(()),
            inflight: StdMutex::new(HashSet::default()),
            alloc_done: Notify::new(),
            last_inflated: StdMutex::new(None),
            bitmap_infos: StdMutex::new(bitmap_infos),
            bitmaps_to_mark: AtomicBool::new(bitmaps_to_mark),
        })
    }

    /// Formats the node `file` as an empty qcow2 image (see
    /// [`CreateOptions`]). Whatever the file held is overwritten where the
    /// new metadata goes and is otherwise unreachable.
    /// Like [`Qcow2Driver::open`], one request entering at `file`.
    pub async fn create(file: IoRef<'_>, options: &CreateOptions) -> Result<()> {
        let (_request, file) = file.admit()?;
        create::create(file, options).await
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size()
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cs
    }

    /// The image's format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.geo.version
    }

    /// The backing file name stored in the image, unresolved.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The backing file's format stored in the image, if any.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// The persistent dirty bitmaps stored in the image (name, granularity,
    /// flags), in directory order; empty when it has none.
    ///
    /// Only a consistent bitmaps extension (auto-clear bit 0 set) is
    /// listed: without the bit, a program that does not know bitmaps wrote
    /// the image and QEMU ignores them too. We keep the bitmaps (their
    /// clusters are never freed) but do not track writes: the first change
    /// we make to the image's data marks every bitmap in use (QEMU then
    /// treats it as inconsistent; `qemu-img bitmap --remove` deletes it).
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.bitmap_infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Called before anything changes guest data or the virtual size:
    /// marks the persistent bitmaps in use, durably, the first time.
    pub(super) async fn before_change(&self, file: RequestRef<'_>) -> Result<()> {
        if !self.bitmaps_to_mark.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        if !self.bitmaps_to_mark.load(Ordering::Acquire) {
            return Ok(());
        }
        m.mark_bitmaps_in_use(file).await?;
        let infos = m
            .bitmaps
            .as_ref()
            .map(bitmap::BitmapDir::infos)
            .unwrap_or_default();
        *self.bitmap_infos.lock().unwrap_or_else(|e| e.into_inner()) = infos;
        self.bitmaps_to_mark.store(false, Ordering::Release);
        Ok(())
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Writes one whole cluster compressed (what `qemu-img convert -c`
    /// produces). `offset` must be cluster aligned and `buf` one cluster
    /// long, or reach exactly the end of the disk. Data that deflate cannot
    /// shrink by at least a sector is stored uncompressed. `node` is this
    /// driver's node.
    ///
    /// One request entering the graph at `node` (see [`IoRef`]).
    pub async fn write_compressed(&self, node: IoRef<'_>, offset: u64, buf: &[u8]) -> Result<()> {
        self.own_node(node)?;
        let (_request, node) = node.admit()?;
        self.check_writable(node)?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        let g = self.geo;
        if offset % g.cs != 0 || (len != g.cs && offset + len != self.size()) || len > g.cs {
            return Err(Error::InvalidArgument(format!(
                "compressed writes cover one whole {}-byte cluster (got {len} bytes at {offset})",
                g.cs
            )));
        }
        self.before_change(require_child(node, ChildRole::File)?)
            .await?;
        let mut data = buf.to_vec();
        data.resize(g.cs as usize, 0);
        let Some(z) = compressed::deflate_cluster(&data) else {
            return self.write(node, offset, buf).await;
        };
        let file = require_child(node, ChildRole::File)?;
        let _io = self.io_lock.read().await;
        // Again under the lock: a resize may have run meanwhile.
        self.check_request(offset, len)?;
        let gc = offset >> g.cluster_bits;
        loop {
            let m = self.meta.lock().await;
            let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
                continue;
            };
            if let Some(why) = &m.broken {
                return Err(invalid(format!("image found corrupt earlier: {why}")));
            }
            let old = decode_l2(&g, m.l2_entry(file, gc).await?)?;
            m.ensure_l2(file, gc).await?;
            let host = m.alloc(file, 1).await?;
            let x = 62 - (g.cluster_bits - 8);
            if host >= 1 << x {
                m.decref(file, host / g.cs, 1).await?;
                return Err(invalid(format!(
                    "host offset {host:#x} is too large for a compressed cluster"
                )));
            }
            let guard = {
                let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                set.insert(gc);
                InflightGuard {
                    drv: self,
                    first: gc,
                    count: 1,
                }
            };
            drop(m);
            let mut out = z.clone();
            out.resize(g.cs as usize, 0);
            let res = file.write(host, &out).await;
            let mut m = self.meta.lock().await;
            if let Err(e) = res {
                let _ = m.decref(file, host / g.cs, 1).await;
                return Err(e);
            }
            let nsec = (z.len() as u64).div_ceil(512);
            m.set_l2_entry(file, gc, COMPRESSED | ((nsec - 1) << x) | host)
                .await?;
            if let Some((c, n)) = old.host_clusters(&g) {
                m.free_later(c, n);
            }
            drop(m);
            drop(guard);
            return Ok(());
        }
    }

    /// Whether metadata changes are waiting for a flush (flush before
    /// removing the node: its `close` callback cannot do I/O).
    pub async fn has_unflushed_metadata(&self) -> bool {
        self.meta.lock().await.is_dirty()
    }

    /// Checks the image's metadata: every cluster's refcount against the
    /// references found by walking the tables, and the copied flags.
    /// `node` is this driver's node. With `repair`, leaks and refcounts
    /// that are too low are corrected (where a refcount block exists).
    ///
    /// A writable image is flushed first, so that what is checked is what
    /// is on disk. Requests wait while the check runs.
    ///
    /// One request entering the graph at `node` (see [`IoRef`]).
    pub async fn check(&self, node: IoRef<'_>, repair: bool) -> Result<CheckReport> {
        self.own_node(node)?;
        let (_request, node) = node.admit()?;
        if repair && self.read_only {
            return Err(Error::ReadOnly(node.name().to_owned()));
        }
        let file = require_child(node, ChildRole::File)?;
        if !self.read_only {
            self.do_flush(node).await?;
        }
        let _excl = self.io_lock.write().await;
        let mut m = self.meta.lock().await;
        let snapshots =
            (self.nb_snapshots > 0).then_some((self.snapshots_offset, self.nb_snapshots));
        let report = check::check_meta(&mut m, file, repair, &self.limits, snapshots).await?;
        if repair {
            *self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) = None;
            m.write_back(file).await?;
            file.flush().await?;
        }
        Ok(report)
    }

    /// Checks, and with `repair` fixes, the image held by `file` without
    /// opening it as a node: what `qemu-img check [-r all]` does. Works on
    /// every image that opens read-only, including those with internal
    /// snapshots (which a writable open refuses): every snapshot's tables
    /// are counted as references, so a repair never frees a cluster a
    /// snapshot uses. Only refcounts are repaired (leaks, and refcounts
    /// lower than the references where a refcount block exists); when a
    /// repair leaves no corruption, the dirty and corrupt header bits are
    /// cleared, as QEMU does. Guest data is never touched (persistent
    /// bitmaps stay consistent).
    ///
    /// Nothing else may use the image meanwhile. `options.read_only` is
    /// ignored: a repair writes, a plain check does not. One request
    /// entering the graph at `file`.
    pub async fn check_image(
        file: IoRef<'_>,
        options: Qcow2Options,
        repair: bool,
    ) -> Result<CheckReport> {
        let (_request, file) = file.admit()?;
        let limits = options.limits.clone();
        let drv = Self::open_in_request(
            file,
            Qcow2Options {
                read_only: true,
                ..options
            },
        )
        .await?;
        let snapshots = (drv.nb_snapshots > 0).then_some((drv.snapshots_offset, drv.nb_snapshots));
        let mut m = drv.meta.lock().await;
        let report = check::check_meta(&mut m, file, repair, &limits, snapshots).await?;
        if repair {
            m.write_back(file).await?;
            file.flush().await?;
        }
        // Version 2 headers have no feature bits.
        if repair && drv.geo.version >= 3 {
            let inc = header::be64(&m.hdr, OFF_INCOMPATIBLE);
            let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
            if report.corruptions == report.repaired_corruptions && inc & bits != 0 {
                m.hdr[OFF_INCOMPATIBLE..OFF_INCOMPATIBLE + 8]
                    .copy_from_slice(&(inc & !bits).to_be_bytes());
                m.write_header(file, OFF_INCOMPATIBLE, OFF_INCOMPATIBLE + 8)
                    .await?;
                file.flush().await?;
            }
        }
        Ok(report)
    }

    fn own_node(&self, node: IoRef<'_>) -> Result<()> {
        match node.driver_as::<Qcow2Driver>() {
            Some(d) if std::ptr::eq(d, self) => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "node '{}' is not this qcow2 image",
                node.name()
            ))),
        }
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn check_writable(&self, node: RequestRef<'_>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(node.name().to_owned()));
        }
        Ok(())
    }

    /// Where guest byte `pos` is stored, and for how many bytes (at most
    /// `max`) the answer holds.
    async fn lookup(
        &self,
        m: &mut Meta,
        file: RequestRef<'_>,
        pos: u64,
        max: u64,
    ) -> Result<(Mapping, u64)> {
        let g = &self.geo;
        let gc = pos >> g.cluster_bits;
        let in_cl = pos & (g.cs - 1);
        let l1i = gc / g.l2_entries;
        let Some(l2off) = m.l2_offset(l1i)? else {
            let table_end = (l1i + 1) * g.l2_entries * g.cs;
            return Ok((Mapping::Unallocated, max.min(table_end - pos)));
        };
        let s = m.l2_slot(file, l2off).await?;
        let table = &m.l2.get(s).table;
        let idx = (gc % g.l2_entries) as usize;
        let first = decode_l2(g, table[idx])?;
        let mut n = (g.cs - in_cl).min(max);
        let map = match first {
            Entry::Compressed { offset, bytes } => {
                return Ok((Mapping::Compressed { offset, bytes }, n))
            }
            Entry::Unallocated => Mapping::Unallocated,
            Entry::Zero { .. } => Mapping::Zero,
            Entry::Data { host, .. } => Mapping::Data(host + in_cl),
        };
        let mut k = 1usize;
        while n < max && idx + k < table.len() {
            let next = decode_l2(g, table[idx + k])?;
            let same = match (first, next) {
                (Entry::Unallocated, Entry::Unallocated) => true,
                (Entry::Zero { .. }, Entry::Zero { .. }) => true,
                (Entry::Data { host: h0, .. }, Entry::Data { host: h, .. }) => {
                    h == h0 + k as u64 * g.cs
                }
                _ => false,
            };
            if !same {
                break;
            }
            n += g.cs.min(max - n);
            k += 1;
        }
        Ok((map, n))
    }

    /// Reads guest range `pos..pos+buf.len()` from the backing node
    /// (zeroes where there is none, or past its end).
    async fn read_backing(backing: Option<RequestRef<'_>>, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = backing else {
            buf.fill(0);
            return Ok(());
        };
        let blen = b.length().await?;
        let avail = blen.saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read(pos, &mut buf[..avail]).await?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    async fn inflate(
        &self,
        file: RequestRef<'_>,
        file_len: u64,
        offset: u64,
        bytes: u64,
    ) -> Result<std::sync::Arc<Vec<u8>>> {
        if let Some((o, data)) = &*self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) {
            if *o == offset {
                return Ok(data.clone());
            }
        }
        if offset >= file_len {
            return Err(invalid(format!(
                "compressed cluster at {offset:#x} lies outside the {file_len}-byte file"
            )));
        }
        // The last sector may reach past the end of the file.
        let len = bytes.min(file_len - offset) as usize;
        let raw = read_file(file, self.geo.align, file_len, offset, len).await?;
        let data = std::sync::Arc::new(compressed::inflate_cluster(
            &raw,
            self.geo.cs as usize,
            offset,
        )?);
        *self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((offset, data.clone()));
        Ok(data)
    }

    /// Fills `buf` (one cluster) with what guest cluster `gc` holds
    /// according to `old`.
    async fn old_content(
        &self,
        file: RequestRef<'_>,
        backing: Option<RequestRef<'_>>,
        file_len: u64,
        gc: u64,
        old: Entry,
        buf: &mut [u8],
    ) -> Result<()> {
        match old {
            Entry::Unallocated => Self::read_backing(backing, gc * self.geo.cs, buf).await,
            Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Entry::Data { host, .. } => read_data(file, file_len, host, buf).await,
            Entry::Compressed { offset, bytes } => {
                let data = self.inflate(file, file_len, offset, bytes).await?;
                buf.copy_from_slice(&data);
                Ok(())
            }
        }
    }

    async fn do_read(&self, node: RequestRef<'_>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let backing = node.child(ChildRole::Backing);
        let _io = self.io_lock.read().await;
        // Under the lock, so no resize runs between the check and the read.
        self.check_request(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (map, n, file_len) = {
                let mut m = self.meta.lock().await;
                let (map, n) = self
                    .lookup(&mut m, file, pos, (buf.len() - done) as u64)
                    .await?;
                (map, n as usize, m.file_len)
            };
            let chunk = &mut buf[done..done + n];
            match map {
                Mapping::Unallocated => Self::read_backing(backing, pos, chunk).await?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Data(host) => read_data(file, file_len, host, chunk).await?,
                Mapping::Compressed { offset, bytes } => {
                    let data = self.inflate(file, file_len, offset, bytes).await?;
                    let at = (pos & (self.geo.cs - 1)) as usize;
                    chunk.copy_from_slice(&data[at..at + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Waits until guest cluster `gc` is not being allocated. Call with the
    /// metadata lock held; returns `true` if it had to wait (the lock was
    /// dropped: look again).
    async fn wait_inflight<'s>(
        &'s self,
        m: tokio::sync::MutexGuard<'s, Meta>,
        gc: u64,
        count: u64,
    ) -> Option<tokio::sync::MutexGuard<'s, Meta>> {
        let notified = {
            let set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if !(gc..gc + count).any(|c| set.contains(&c)) {
                return Some(m);
            }
            // Registered before the set's lock is released: the finishing
            // allocation's notify_waiters() cannot be missed.
            self.alloc_done.notified()
        };
        drop(m);
        notified.await;
        None
    }

    /// Writes `len` bytes from `src` at guest offset `offset`. The caller
    /// holds `io_lock` shared.
    async fn write_range(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        src: Src<'_>,
    ) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let backing = node.child(ChildRole::Backing);
        let g = self.geo;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let gc = pos >> g.cluster_bits;
            let in_cl = pos & (g.cs - 1);
            let m = self.meta.lock().await;
            let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
                continue;
            };
            if let Some(why) = &m.broken {
                return Err(invalid(format!("image found corrupt earlier: {why}")));
            }
            let first = decode_l2(&g, m.l2_entry(file, gc).await?)?;
            if let Entry::Data { host, copied: true } = first {
                // Rewrite in place, extending over the following clusters
                // that are stored right after this one (and also ours alone).
                let mut n = (g.cs - in_cl).min(len - done);
                let mut c = gc + 1;
                while done + n < len && c % g.l2_entries != 0 {
                    match decode_l2(&g, m.l2_entry(file, c).await?)? {
                        Entry::Data {
                            host: h,
                            copied: true,
                        } if h == host + (c - gc) * g.cs => {
                            n += g.cs.min(len - done - n);
                            c += 1;
                        }
                        _ => break,
                    }
                }
                drop(m);
                self.write_in_place(file, host + in_cl, done as usize, n as usize, src)
                    .await?;
                done += n;
                continue;
            }

            // Allocating write (the slow path, boxed so that the common
            // path's future stays small).
            let n = Box::pin(
                self.write_allocating(file, backing, m, gc, first, offset, len, done, src),
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Writes a run of clusters that all need a new host cluster, none of
    /// them in flight, within one L2 table, starting at guest cluster `gc`
    /// (entry `first`) at request byte `done`. Returns the bytes written.
    #[allow(clippy::too_many_arguments)]
    async fn write_allocating(
        &self,
        file: RequestRef<'_>,
        backing: Option<RequestRef<'_>>,
        mut m: tokio::sync::MutexGuard<'_, Meta>,
        gc: u64,
        first: Entry,
        offset: u64,
        len: u64,
        done: u64,
        src: Src<'_>,
    ) -> Result<u64> {
        let g = self.geo;
        let pos = offset + done;
        m.ensure_l2(file, gc).await?;
        let end = offset + len;
        let last_gc = (end - 1) >> g.cluster_bits;
        let table_last = (gc / g.l2_entries + 1) * g.l2_entries - 1;
        let mut olds = vec![first];
        let mut c = gc + 1;
        while c <= last_gc.min(table_last) && olds.len() < 1024 {
            if self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&c)
            {
                break;
            }
            let e = decode_l2(&g, m.l2_entry(file, c).await?)?;
            if matches!(e, Entry::Data { copied: true, .. }) {
                break;
            }
            olds.push(e);
            c += 1;
        }
        let k = olds.len() as u64;
        let reuse = match first {
            Entry::Zero {
                host: Some(h),
                copied: true,
            } if k == 1 => Some(h),
            _ => None,
        };
        let host = match reuse {
            Some(h) => h,
            None => m.alloc(file, k).await?,
        };
        let guard = {
            let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for c in gc..gc + k {
                set.insert(c);
            }
            InflightGuard {
                drv: self,
                first: gc,
                count: k,
            }
        };
        let file_len = m.file_len;
        drop(m);

        let run_end = ((gc + k) * g.cs).min(end);
        let n = run_end - pos;
        let res = self
            .write_new_clusters(
                file,
                backing,
                file_len,
                gc,
                host,
                &olds,
                pos,
                n,
                done as usize,
                src,
            )
            .await;
        let mut m = self.meta.lock().await;
        if let Err(e) = res {
            if reuse.is_none() {
                // Nothing references the new clusters: free them now.
                let _ = m.decref(file, host / g.cs, k).await;
            }
            drop(guard);
            return Err(e);
        }
        for (j, old) in olds.iter().enumerate() {
            let j = j as u64;
            m.set_l2_entry(file, gc + j, (host + j * g.cs) | COPIED)
                .await?;
            if reuse.is_none() {
                if let Some((c, cnt)) = old.host_clusters(&g) {
                    m.free_later(c, cnt);
                }
            }
        }
        drop(m);
        drop(guard);
        Ok(n)
    }

    async fn write_in_place(
        &self,
        file: RequestRef<'_>,
        host: u64,
        from: usize,
        n: usize,
        src: Src<'_>,
    ) -> Result<()> {
        match src {
            Src::Buf(b) => file.write(host, &b[from..from + n]).await,
            Src::Zeroes => {
                let chunk = n.min(1 << 20);
                let zeroes = vec![0u8; chunk];
                let mut off = 0;
                while off < n {
                    let m = chunk.min(n - off);
                    file.write(host + off as u64, &zeroes[..m]).await?;
                    off += m;
                }
                Ok(())
            }
        }
    }

    /// Writes guest bytes `pos..pos+n` into the fresh host clusters at
    /// `host` (one per entry of `olds`), filling the rest of partially
    /// written clusters with their old content.
    #[allow(clippy::too_many_arguments)]
    async fn write_new_clusters(
        &self,
        file: RequestRef<'_>,
        backing: Option<RequestRef<'_>>,
        file_len: u64,
        gc: u64,
        host: u64,
        olds: &[Entry],
        pos: u64,
        n: u64,
        src_from: usize,
        src: Src<'_>,
    ) -> Result<()> {
        let cs = self.geo.cs;
        let end = pos + n;
        let mut j = 0usize;
        while j < olds.len() {
            let c_start = (gc + j as u64) * cs;
            let a = pos.max(c_start);
            let b = end.min(c_start + cs);
            if a == c_start && b == c_start + cs {
                // A run of whole clusters: straight from the source.
                let mut k = j;
                while k < olds.len() && (gc + k as u64 + 1) * cs <= end {
                    k += 1;
                }
                let from = src_from + (c_start - pos) as usize;
                let len = (k - j) as u64 * cs;
                self.write_in_place(file, host + j as u64 * cs, from, len as usize, src)
                    .await?;
                j = k;
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            self.old_content(file, backing, file_len, gc + j as u64, olds[j], &mut buf)
                .await?;
            let from = src_from + (a - pos) as usize;
            src.copy_to(
                from,
                &mut buf[(a - c_start) as usize..(b - c_start) as usize],
            );
            file.write(host + j as u64 * cs, &buf).await?;
            j += 1;
        }
        Ok(())
    }

    /// Makes whole clusters read as zeroes (`discard == false`) or drops
    /// them (`discard == true`); partial clusters are written with zeroes,
    /// or left alone for a discard.
    async fn zero_or_discard(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<()> {
        self.check_writable(node)?;
        self.before_change(require_child(node, ChildRole::File)?)
            .await?;
        let _io = self.io_lock.read().await;
        self.check_request(offset, len)?;
        self.zero_or_discard_locked(node, offset, len, discard)
            .await
    }

    /// [`Self::zero_or_discard`] for a caller that holds `io_lock` (shared
    /// or exclusive) and checked the request.
    async fn zero_or_discard_locked(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let has_backing = node.child(ChildRole::Backing).is_some();
        let g = self.geo;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            let c_start = gc * g.cs;
            let c_end = (c_start + g.cs).min(self.size());
            let piece_end = end.min(c_start + g.cs);
            let whole = pos == c_start && piece_end >= c_end;
            if !whole {
                if !discard {
                    self.write_range(node, pos, piece_end - pos, Src::Zeroes)
                        .await?;
                }
                pos = piece_end;
                continue;
            }
            let m = self.meta.lock().await;
            let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
                continue;
            };
            let raw = m.l2_entry(file, gc).await?;
            let old = decode_l2(&g, raw)?;
            let new = if discard {
                if g.version >= 3 && has_backing {
                    Some(ZERO)
                } else {
                    Some(0)
                }
            } else if g.version >= 3 {
                if old == Entry::Unallocated && !has_backing {
                    None
                } else {
                    Some(ZERO)
                }
            } else if !has_backing {
                Some(0)
            } else {
                // Version 2 over a backing file: zeroes must be stored.
                drop(m);
                self.write_range(node, pos, piece_end - pos, Src::Zeroes)
                    .await?;
                pos = piece_end;
                continue;
            };
            if let Some(new) = new {
                if new != raw {
                    let has_table = m.l2_offset(gc / g.l2_entries)?.is_some();
                    if new != 0 || has_table {
                        m.ensure_l2(file, gc).await?;
                        m.set_l2_entry(file, gc, new).await?;
                        if let Some((c, n)) = old.host_clusters(&g) {
                            m.free_later(c, n);
                        }
                    }
                }
            }
            drop(m);
            pos = piece_end;
        }
        Ok(())
    }

    async fn do_flush(&self, node: RequestRef<'_>) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        if self.read_only {
            return Ok(());
        }
        let frees = {
            let mut m = self.meta.lock().await;
            let frees = std::mem::take(&mut m.pending_frees);
            if let Err(e) = m.write_back(file).await {
                m.pending_frees.extend(frees);
                return Err(e);
            }
            file.flush().await?;
            frees
        };
        if !frees.is_empty() {
            // The tables no longer reference these clusters on disk; wait
            // until no request can still be reading them, then let them go.
            let _excl = self.io_lock.write().await;
            let mut m = self.meta.lock().await;
            // A freed compressed cluster's place may be reused.
            *self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) = None;
            for (c, n) in frees {
                m.decref(file, c, n).await?;
            }
            // Decrements may go out at any time; writing them now leaves a
            // flushed image without leaks.
            m.write_refblocks(file).await?;
            file.flush().await?;
        }
        Ok(())
    }
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "qcow2 v{}, {} bytes, {}-byte clusters",
            self.geo.version,
            self.size(),
            self.geo.cs
        );
        if let Some(b) = &self.backing_file {
            s.push_str(&format!(", backing '{b}'"));
        }
        if self.read_only {
            s.push_str(", read-only");
        }
        s
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        let file = node
            .child(ChildRole::File)
            .ok_or_else(|| Error::NoSuchChild {
                node: node.name().to_owned(),
                role: ChildRole::File,
            })?;
        if file.name() != self.file_node {
            return Err(Error::InvalidArgument(format!(
                "qcow2 node '{}' was opened from file node '{}' but is attached to '{}'",
                node.name(),
                self.file_node,
                file.name()
            )));
        }
        if self.require_backing
            && self.backing_file.is_some()
            && node.child(ChildRole::Backing).is_none()
        {
            return Err(Error::InvalidArgument(format!(
                "qcow2 node '{}' names backing file '{}' but has no backing child",
                node.name(),
                self.backing_file.as_deref().unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// On the file: a consistent read always; write *and* resize when the
    /// image is writable and its users write or resize (allocating
    /// clusters writes past the end of the file, which grows it, and a
    /// resize writes metadata: QEMU's `bdrv_default_perms_for_storage`
    /// takes both for the same reasons). Nobody else may write or resize
    /// the file under the image.
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        match role {
            ChildRole::File => {
                let mut take = Perm::CONSISTENT_READ;
                if !self.read_only
                    && (users.take.contains(Perm::WRITE) || users.take.contains(Perm::RESIZE))
                {
                    take = take | Perm::WRITE | Perm::RESIZE;
                }
                Permissions {
                    take,
                    // Nobody else may change the image under us.
                    share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
                }
            }
            ChildRole::Backing => Permissions {
                take: Perm::CONSISTENT_READ,
                share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            },
            _ => users,
        }
    }

    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        let file = node
            .child(ChildRole::File)
            .map_or(1, |f| f.request_alignment());
        let backing = node
            .child(ChildRole::Backing)
            .map_or(1, |b| b.request_alignment());
        file.max(backing).max(1)
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.size()) })
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_read(node, offset, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable(node)?;
            self.before_change(require_child(node, ChildRole::File)?)
                .await?;
            let _io = self.io_lock.read().await;
            self.check_request(offset, buf.len() as u64)?;
            self.write_range(node, offset, buf.len() as u64, Src::Buf(buf))
                .await
        })
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(self.zero_or_discard(node, offset, len, false))
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(self.zero_or_discard(node, offset, len, true))
    }

    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(self.do_flush(node))
    }

    /// Grows (a larger L1 table when needed; the new area reads as zeroes)
    /// or shrinks (only over nothing stored); see `resize.rs` for the
    /// algorithm and what is refused.
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_truncate(node, size))
    }

    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(async move {
            let file = require_child(node, ChildRole::File)?;
            let _io = self.io_lock.read().await;
            self.check_request(offset, len)?;
            let mut m = self.meta.lock().await;
            let (map, n) = self.lookup(&mut m, file, offset, len).await?;
            Ok((
                match map {
                    Mapping::Unallocated => BlockStatus::Unallocated,
                    Mapping::Zero => BlockStatus::Zero,
                    Mapping::Data(_) | Mapping::Compressed { .. } => BlockStatus::Data,
                },
                n,
            ))
        })
    }
}

/// What `qemu-img info` reports about a qcow2 image beyond its geometry
/// (its "format-specific" data and dirty flag), read from the header as
/// it is now.
impl Qcow2Driver {
    /// Bits per refcount entry (QEMU's `refcount_bits`: 1 to 64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.geo.refcount_order
    }

    /// The header's feature words: (incompatible, compatible), zero for
    /// version 2 images, which have none.
    async fn feature_words(&self) -> (u64, u64) {
        if self.geo.version < 3 {
            return (0, 0);
        }
        let m = self.meta.lock().await;
        (header::be64(&m.hdr, 72), header::be64(&m.hdr, 80))
    }

    /// Whether the image uses lazy refcounts (compatible feature bit 0).
    pub async fn lazy_refcounts(&self) -> bool {
        self.feature_words().await.1 & 1 != 0
    }

    /// Whether the image was not closed cleanly (the dirty bit).
    pub async fn is_dirty(&self) -> bool {
        self.feature_words().await.0 & INCOMPAT_DIRTY != 0
    }

    /// Whether the image is marked corrupt (the corrupt bit).
    pub async fn is_corrupt(&self) -> bool {
        self.feature_words().await.0 & INCOMPAT_CORRUPT != 0
    }

    /// Whether the image uses extended L2 entries (subclusters).
    pub async fn extended_l2(&self) -> bool {
        self.feature_words().await.0 & header::INCOMPAT_EXTL2 != 0
    }

    /// The compression type's name, as QEMU spells it (`zlib`: images
    /// using another are refused at open).
    pub fn compression_type(&self) -> &'static str {
        "zlib"
    }

    /// How many internal snapshots the image has.
    pub fn snapshot_count(&self) -> u32 {
        self.nb_snapshots
    }
}
