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
//! [`IoRef`]: crate::graph::proof::IoRef
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
//!
//! # Where things are
//!
//! Bottom to top; each file uses only files listed before it (its imports
//! are checked by `tests/module_layers.rs`; the method calls between the
//! `impl Qcow2Driver` blocks keep the same order):
//!
//! - `options.rs`: [`Qcow2Options`] and [`Qcow2Limits`]; `file_io.rs`:
//!   aligned reads of the image file.
//! - Codecs, which do no I/O of their own and know nothing of the cache:
//!   `header.rs` (parse and validate the header and its extensions),
//!   `geometry.rs` (cluster and table sizes), `entry.rs` (L1/L2/refcount
//!   entries), `compressed.rs` (deflate), `bitmap.rs` (the bitmap
//!   directory), `cache.rs` (a table cache).
//! - `meta.rs`: the metadata in memory (L1, cached L2 tables and refcount
//!   blocks), allocation, and write-back in a crash-safe order (QEMU's
//!   `qcow2-cache.c`, `qcow2-refcount.c`, `qcow2-cluster.c`'s table side).
//! - `check.rs`: the consistency check's walk over the tables (QEMU's
//!   `qcow2_check_refcounts`).
//! - `state.rs`: the [`Qcow2Driver`] struct (QEMU's `BDRVQcow2State`).
//! - The driver's operations, each an `impl Qcow2Driver` block:
//!   `create.rs` (formatting a new image), `open.rs`, `read.rs`,
//!   `write.rs` (allocation, copy-on-write, zeroes, discard, compressed
//!   writes), `flush.rs`, `bitmap_store.rs` (persistent dirty bitmaps
//!   loaded into the node's live bitmaps at open, stored on flush to
//!   close), `check_image.rs` (`qemu-img check`),
//!   `resize.rs`, `reopen.rs` (read-only ↔ read-write), `snapshot.rs` (internal snapshots), `info.rs` (what
//!   `qemu-img info` reports), `chain.rs` (opening an image with its
//!   backing files).
//! - This file: the [`BlockDriver`] implementation, which dispatches to
//!   those.

mod backing_file;
mod bitmap;
mod bitmap_store;
mod cache;
mod chain;
mod check;
mod check_image;
mod compressed;
mod create;
mod entry;
mod file_io;
mod flush;
mod geometry;
mod header;
mod info;
mod meta;
mod open;
mod options;
mod read;
mod reopen;
mod resize;
mod snapshot;
mod state;
mod write;

use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::{BlockStatus, DriverInfo};
use crate::types::{ChildRole, Error, Perm, Permissions, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

pub use crate::drivers::Preallocation;
pub use bitmap::BitmapInfo;
pub use chain::{
    open_image_chain, BackingPolicy, ChainImage, ChainOptions, FileOpener, ImageChain,
};
pub use check::CheckReport;
pub use create::CreateOptions;
pub use options::{Qcow2Limits, Qcow2Options};
pub use snapshot::SnapshotInfo;
pub use state::Qcow2Driver;

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
        if let Some(b) = self.backing_file() {
            s.push_str(&format!(", backing '{b}'"));
        }
        if self.is_read_only() {
            s.push_str(", read-only");
        }
        s
    }

    fn is_read_only(&self) -> bool {
        Qcow2Driver::is_read_only(self)
    }

    /// See `reopen.rs`: going read-only needs the metadata flushed first;
    /// going read-write refuses images that a writable open would repair.
    fn set_read_only(&self, node: CallbackRef<'_>, read_only: bool) -> Result<()> {
        self.switch_read_only(node.name(), read_only)
    }

    fn info(&self) -> DriverInfo {
        DriverInfo::new()
            .size(self.size())
            .backing(self.backing_file(), self.backing_format())
            .cluster_size(self.geo.cs)
            .specific("compat", if self.geo.version >= 3 { "1.1" } else { "0.10" })
            .specific("refcount-bits", 1u32 << self.geo.refcount_order)
            .specific("snapshots", self.nb_snapshots)
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
            && self.backing_file().is_some()
            && node.child(ChildRole::Backing).is_none()
        {
            return Err(Error::InvalidArgument(format!(
                "qcow2 node '{}' names backing file '{}' but has no backing child",
                node.name(),
                self.backing_file().unwrap_or_default()
            )));
        }
        // The persistent bitmaps read at open become the node's.
        self.install_bitmaps(node)
    }

    /// Version 3, writable, and a bitmap small enough for the format.
    fn can_store_dirty_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        self.can_store(name, granularity)
    }

    /// A flush, then the node's persistent dirty bitmaps stored in the
    /// image and marked consistent (`bitmap_store.rs`).
    fn flush_to_close<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(self.do_flush_to_close(node))
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
                if !self.is_read_only()
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
            ChildRole::Backing => Permissions::for_backing(users),
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
        Box::pin(self.do_read(node, offset, IoVecMut::from(buf)))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(self.do_write(node, offset, IoVec::from(buf)))
    }

    /// Cuts `iov` at the image's mapping (cluster runs stored alike) and
    /// hands each run to the file or the backing node as a view of the
    /// same regions: no copy, except for compressed clusters.
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_read(node, offset, iov))
    }

    /// Cuts `iov` at the image's mapping: runs of clusters rewritten in
    /// place or allocated whole go to the file as views of the same
    /// regions; only a partially written new cluster is assembled (old
    /// content plus the new bytes) in a buffer of its own.
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        Box::pin(self.do_write(node, offset, iov))
    }

    /// One run of data clusters: the buffer goes to the file as it is;
    /// otherwise read as `readv` does, into the buffer.
    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.do_read_buf(node, offset, buf))
    }

    /// One run of clusters rewritten in place: the buffer goes to the file
    /// as it is; otherwise written as `writev` does, from the buffer.
    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.do_write_buf(node, offset, buf))
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
        Box::pin(self.do_block_status(node, offset, len))
    }
}
