//! The driver interface: the trait a node's driver implements, with the
//! proof each callback receives. Public as `blockgraph::driver`, whose
//! module docs explain it.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;

use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::BlockStatus;
use crate::types::DriverInfo;
#[cfg(doc)]
use crate::types::Perm;
use crate::types::{ChildRole, Permissions};
use crate::types::{Error, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

/// The future an I/O callback returns. `Send`, so requests can run on
/// multi-thread runtimes too.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Shows that the resize permission was checked for the resize a
/// [`BlockDriver::truncate`] call carries out.
///
/// Only the crate makes one, in the two operations that check the
/// permission first: [`BlockBackend::truncate`](crate::BlockBackend::truncate)
/// (the backend took [`Perm::RESIZE`]) and
/// [`NodeRef::truncate_child`](crate::NodeRef::truncate_child) (the edge to
/// the child took it). So code that holds an [`IoRef`](crate::IoRef) cannot call
/// `node.driver().truncate(..)` itself and skip the check: it has no permit
/// to pass. Zero-sized, neither `Clone` nor `Copy`, and tied to the request's
/// lifetime.
///
/// A driver that resizes a child asks for it with `truncate_child`, which
/// checks its own edge and makes the child's permit.
#[derive(Debug)]
pub struct ResizePermit<'a> {
    _request: std::marker::PhantomData<&'a ()>,
}

impl ResizePermit<'_> {
    /// Made only after the caller checked [`Perm::RESIZE`] for the call.
    pub(crate) fn checked() -> Self {
        ResizePermit {
            _request: std::marker::PhantomData,
        }
    }
}

/// A block driver: what a node *is* (QEMU's `BlockDriver`).
///
/// Implement the three required I/O callbacks; everything else has a
/// default. The proof each callback receives says what it may do; see the
/// [module docs](crate::driver).
///
/// # Examples
///
/// A filter that counts reads and passes everything down:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use blockgraph::{driver::{BlockDriver, IoFuture}, ChildRole, Error, RequestRef, Result};
///
/// #[derive(Default)]
/// struct CountingFilter { reads: AtomicU64 }
///
/// fn filtered<'a>(node: RequestRef<'a>) -> Result<RequestRef<'a>> {
///     node.child(ChildRole::Filtered)
///         .ok_or_else(|| Error::NoSuchChild { node: node.name().into(), role: ChildRole::Filtered })
/// }
///
/// impl BlockDriver for CountingFilter {
///     fn format_name(&self) -> &'static str { "counting" }
///     fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
///         Box::pin(async move { filtered(node)?.length().await })
///     }
///     fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
///         self.reads.fetch_add(1, Ordering::Relaxed);
///         Box::pin(async move { filtered(node)?.read(offset, buf).await })
///     }
///     fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
///         Box::pin(async move { filtered(node)?.write(offset, buf).await })
///     }
/// }
/// ```
pub trait BlockDriver: Any + Send + Sync {
    /// The format name (`"qcow2"`, `"raw"`, …), shown in dumps and errors.
    fn format_name(&self) -> &'static str;

    /// A one-line description for graph dumps (default: the format name).
    fn describe(&self) -> String {
        self.format_name().to_owned()
    }

    // ---- main-loop callbacks -------------------------------------------

    /// Called when the node joins the graph, inside the write section, with
    /// its children attached. An error aborts the whole mutation.
    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        let _ = node;
        Ok(())
    }

    /// Called when the node leaves the graph.
    fn close(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// Applies new options to a drained node (QEMU's `bdrv_reopen`,
    /// through [`GraphWriter::reopen`](crate::GraphWriter::reopen)).
    ///
    /// Runs after every check of its mutation passed. On an error the
    /// driver must be as it was before the call. After an `Ok`, the driver
    /// must keep what it needs to undo the call: the graph then calls
    /// exactly one of [`reopen_commit`](Self::reopen_commit) (the mutation
    /// or the transaction it belongs to committed) or
    /// [`reopen_abort`](Self::reopen_abort) (it rolled back: a later check,
    /// a later reopen or a later step of the transaction failed). A node
    /// may be reopened more than once before that; the aborts then come
    /// newest first, each undoing one call.
    fn reopen(&self, node: CallbackRef<'_>, options: &[(&str, &str)]) -> Result<()> {
        let _ = (node, options);
        Err(Error::Unsupported {
            driver: self.format_name(),
            operation: "reopen",
        })
    }

    /// The mutation of a successful [`reopen`](Self::reopen) committed:
    /// what the driver kept to undo it can go (QEMU's
    /// `bdrv_reopen_commit`). Default: nothing.
    fn reopen_commit(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// The mutation of a successful [`reopen`](Self::reopen) rolled back:
    /// put the options back as they were before that call (QEMU's
    /// `bdrv_reopen_abort`). Cannot fail. Default: nothing, which leaves
    /// the new options in place after the rollback: a driver with options
    /// to reopen should implement it.
    fn reopen_abort(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// Whether the node refuses writes (QEMU's `bdrv_is_read_only`).
    ///
    /// The graph enforces it: no user of a read-only node may take
    /// [`Perm::WRITE`] or [`Perm::WRITE_UNCHANGED`] on it (QEMU's rule), and
    /// a mutation or reopen that would give one is refused with
    /// [`Error::PermissionConflict`] and rolled back. (A resize of a
    /// read-only node is refused by its driver.) Default: `false`.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Switches the drained node between read-only and read-write (QEMU's
    /// reopen with `read-only=on|off`), called by
    /// [`GraphWriter::reopen`](crate::GraphWriter::reopen) and
    /// [`GraphWriter::set_read_only`](crate::GraphWriter::set_read_only)
    /// inside the write section. No request is in flight anywhere in the
    /// graph meanwhile (requests hold the read lock).
    ///
    /// The graph calls it on the node and, as QEMU's children inherit
    /// `read-only`, on the `File`, `Data` and `Filtered` children below it
    /// (top down when going read-only, bottom up when going read-write).
    /// If any of those, or the permission check that follows, fails, the
    /// nodes already switched are switched back with the old value, newest
    /// first; a driver should do everything that can fail on the way
    /// forward, so that switching back succeeds. After it returns,
    /// [`BlockDriver::is_read_only`] must report the new mode.
    ///
    /// Default: [`Error::Unsupported`], unless `read_only` is already the
    /// current mode.
    fn set_read_only(&self, node: CallbackRef<'_>, read_only: bool) -> Result<()> {
        let _ = node;
        if read_only == self.is_read_only() {
            return Ok(());
        }
        Err(Error::Unsupported {
            driver: self.format_name(),
            operation: "switching read-only mode",
        })
    }

    /// What the node reports about itself to
    /// [`Bql::query_nodes`](crate::Bql::query_nodes) (QEMU's
    /// `bdrv_get_info` and `bdrv_get_specific_info`): its file name, format
    /// details. Default: nothing beyond the format name.
    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }

    /// Whether the driver can store a persistent dirty bitmap `name` of
    /// `granularity` bytes in its image when the node is closed (QEMU's
    /// `bdrv_can_store_new_dirty_bitmap`), asked when one is added with
    /// [`DirtyBitmapOptions::persistent`](crate::DirtyBitmapOptions::persistent).
    /// The driver stores its node's persistent bitmaps in
    /// [`flush_to_close`](Self::flush_to_close). Default: refused.
    fn can_store_dirty_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        let _ = (name, granularity);
        Err(Error::Unsupported {
            driver: self.format_name(),
            operation: "persistent dirty bitmaps",
        })
    }

    /// What this node takes and shares on its `role` child, given what its
    /// own users take and share (QEMU's `bdrv_child_perm`).
    ///
    /// The default passes the users' needs through to `File`, `Data` and
    /// `Filtered` children, and on a `Backing` child takes a consistent read
    /// and lets nobody else write or resize it unless the node's own users
    /// share `WRITE` ([`Permissions::for_backing`], QEMU's rule).
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        match role {
            ChildRole::Backing => Permissions::for_backing(users),
            _ => users,
        }
    }

    /// The first drain section covering the node began.
    fn drained_begin(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// The last drain section covering the node ended.
    fn drained_end(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    // ---- I/O callbacks ---------------------------------------------------

    /// Alignment in bytes that every request's offset and length must have.
    /// Filters and formats whose requests go to a child should report
    /// at least the child's alignment.
    ///
    /// A backend asks once and keeps the answer until the graph next
    /// changes (a mutation, a reopen, or
    /// [`NodeRef::notify_length_changed`](crate::NodeRef::notify_length_changed)),
    /// as QEMU refreshes `bl.request_alignment` only when the graph
    /// changes: the answer must not change in between.
    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        let _ = node;
        1
    }

    /// The node's size in bytes.
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64>;

    /// Reads `buf.len()` bytes at `offset`.
    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8])
        -> IoFuture<'a, ()>;

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()>;

    /// Reads `iov.len()` bytes at `offset` into the regions of `iov`, in
    /// order (QEMU's `bdrv_co_preadv` with a `QEMUIOVector`).
    ///
    /// The default keeps simple drivers simple: a vector of one segment
    /// (every request that came in through [`read`](Self::read)) goes to
    /// [`read`](Self::read) as it is; a vector of several is read through
    /// one bounce buffer of at most [`BOUNCE_CHUNK`] bytes at a time. A
    /// driver that can pass the regions on overrides it: a filter hands
    /// `iov` to its child, a format driver cuts it at its mapping's
    /// boundaries ([`IoVecMut::slice_mut`]) and a protocol driver gives the
    /// segments to `preadv(2)`.
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        readv_via_read(self, node, offset, iov)
    }

    /// Writes the regions of `iov`, in order, at `offset` (QEMU's
    /// `bdrv_co_pwritev` with a `QEMUIOVector`).
    ///
    /// The default is [`readv`](Self::readv)'s: one segment goes to
    /// [`write`](Self::write) as it is, several are gathered into a bounce
    /// buffer of at most [`BOUNCE_CHUNK`] bytes at a time.
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        writev_via_write(self, node, offset, iov)
    }

    /// Reads `buf.len()` bytes at `offset` into a buffer the request owns,
    /// and hands it back ([`IoBuf`]; QEMU passes guest memory down the
    /// same way).
    ///
    /// The default lends the buffer to [`read`](Self::read)
    /// ([`read_buf_via_read`]), which is all a driver that copies anyway
    /// needs. A filter passes the buffer to its child; a protocol driver
    /// that gives memory to the kernel past one poll (io_uring) reads into
    /// it directly: the buffer cannot be freed or reused while it is in
    /// the kernel, because the operation owns it until its completion.
    ///
    /// An override must hand back the buffer it was given (or one of the
    /// same length): [`BlockBackend::read_buf`](crate::BlockBackend::read_buf)
    /// fails a request whose buffer comes back with another length.
    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        read_buf_via_read(self, node, offset, buf)
    }

    /// Writes a buffer the request owns at `offset`, and hands it back
    /// unchanged. The default lends it to [`write`](Self::write)
    /// ([`write_buf_via_write`]); see [`read_buf`](Self::read_buf).
    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        write_buf_via_write(self, node, offset, buf)
    }

    /// Makes `len` bytes at `offset` read as zeroes (default: writes zero
    /// buffers).
    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            const CHUNK: u64 = 64 * 1024;
            let zeroes = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                self.write(node, offset + done, &zeroes[..n as usize])
                    .await?;
                done += n;
            }
            Ok(())
        })
    }

    /// Drops `len` bytes at `offset` (default: does nothing, which is
    /// always allowed).
    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        let _ = (node, offset, len);
        Box::pin(async { Ok(()) })
    }

    /// Makes completed writes durable (default: nothing to do).
    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        let _ = node;
        Box::pin(async { Ok(()) })
    }

    /// Makes the node's state durable as for closing it: a flush, plus
    /// whatever the driver keeps in memory until the image is closed
    /// (qcow2 writes its persistent dirty bitmaps back and marks them
    /// consistent; QEMU's `bdrv_inactivate`/close). Called where QEMU
    /// would close or inactivate the node: by
    /// [`Drained::flush`](crate::Drained::flush) (before a node is removed
    /// or made read-only) and by [`MainLoop::shutdown`](crate::MainLoop::shutdown).
    /// The node stays usable afterwards. Default: [`flush`](Self::flush).
    fn flush_to_close<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        self.flush(node)
    }

    /// Resizes the node to `size` bytes (QEMU's `bdrv_co_truncate`). A
    /// grown area reads as zeroes.
    ///
    /// Only the crate calls it, through the two operations that check the
    /// resize permission and hand over the [`ResizePermit`]:
    /// [`BlockBackend::truncate`](crate::BlockBackend::truncate) and, for a
    /// parent resizing its child,
    /// [`NodeRef::truncate_child`](crate::NodeRef::truncate_child). They
    /// tell the graph the length changed afterwards, so the driver need
    /// not. A filter forwards it with
    /// `node.truncate_child(ChildRole::Filtered, size)`
    /// ([`forward::truncate`](crate::driver::forward::truncate)).
    ///
    /// The default refuses with [`Error::Unsupported`].
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        let _ = (node, size, permit);
        Box::pin(std::future::ready(Err(Error::Unsupported {
            driver: self.format_name(),
            operation: "resizing",
        })))
    }

    /// What is stored at `offset` and for how many bytes (at most `len`)
    /// the answer holds (default: data, for the whole range).
    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        let _ = (node, offset);
        Box::pin(async move { Ok((BlockStatus::Data, len)) })
    }
}

/// The largest bounce buffer the default [`BlockDriver::readv`] and
/// [`BlockDriver::writev`] allocate: a vector longer than this is read or
/// written in pieces of this size (a multiple of every request alignment a
/// driver reports in practice), so a vector whose segments repeat one
/// buffer many times cannot make the default allocate its whole length.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// [`BlockDriver::readv`]'s default, for `driver`: [`BlockDriver::read`]
/// on a single segment, through a bounce buffer otherwise. Public in the
/// driver kit for drivers that override `readv` and fall back to it on
/// some paths.
pub fn readv_via_read<'a, D: BlockDriver + ?Sized>(
    driver: &'a D,
    node: RequestRef<'a>,
    offset: u64,
    iov: IoVecMut<'a>,
) -> IoFuture<'a, ()> {
    match iov.into_contiguous() {
        Ok(buf) => driver.read(node, offset, buf),
        Err(mut iov) => Box::pin(async move {
            let mut bounce = vec![0u8; iov.len().min(BOUNCE_CHUNK)];
            let mut done = 0;
            while done < iov.len() {
                let n = (iov.len() - done).min(BOUNCE_CHUNK);
                driver
                    .read(node, offset + done as u64, &mut bounce[..n])
                    .await?;
                iov.slice_mut(done, n).copy_from_slice(&bounce[..n]);
                done += n;
            }
            Ok(())
        }),
    }
}

/// [`BlockDriver::writev`]'s default, for `driver`:
/// [`BlockDriver::write`] on a single segment, through a bounce buffer
/// otherwise.
pub fn writev_via_write<'a, D: BlockDriver + ?Sized>(
    driver: &'a D,
    node: RequestRef<'a>,
    offset: u64,
    iov: IoVec<'a>,
) -> IoFuture<'a, ()> {
    match iov.as_contiguous() {
        Some(buf) => driver.write(node, offset, buf),
        None => Box::pin(async move {
            let mut bounce = vec![0u8; iov.len().min(BOUNCE_CHUNK)];
            let mut done = 0;
            while done < iov.len() {
                let n = (iov.len() - done).min(BOUNCE_CHUNK);
                iov.slice(done, n).copy_to_slice(&mut bounce[..n]);
                driver
                    .write(node, offset + done as u64, &bounce[..n])
                    .await?;
                done += n;
            }
            Ok(())
        }),
    }
}

/// [`BlockDriver::read_buf`]'s default, for `driver`: lends the buffer to
/// [`BlockDriver::read`], then hands it back.
pub fn read_buf_via_read<'a, D: BlockDriver + ?Sized>(
    driver: &'a D,
    node: RequestRef<'a>,
    offset: u64,
    mut buf: IoBuf,
) -> IoFuture<'a, IoBuf> {
    Box::pin(async move {
        driver.read(node, offset, &mut buf).await?;
        Ok(buf)
    })
}

/// [`BlockDriver::write_buf`]'s default, for `driver`: lends the buffer to
/// [`BlockDriver::write`], then hands it back.
pub fn write_buf_via_write<'a, D: BlockDriver + ?Sized>(
    driver: &'a D,
    node: RequestRef<'a>,
    offset: u64,
    buf: IoBuf,
) -> IoFuture<'a, IoBuf> {
    Box::pin(async move {
        driver.write(node, offset, &buf).await?;
        Ok(buf)
    })
}
