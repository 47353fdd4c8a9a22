//! [`Filter`]: a driver that sits on one child and passes down whatever it
//! does not change (QEMU's `is_filter` drivers).

use std::any::Any;

use crate::driver::{forward, require_child};
use crate::graph::driver::{
    read_buf_via_read, readv_via_read, write_buf_via_write, writev_via_write, BlockDriver,
    IoFuture, ResizePermit,
};
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::BlockStatus;
use crate::types::{ChildRole, Error, Permissions, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

/// A driver with one child that it filters: every callback it does not
/// override goes to that child unchanged.
///
/// Declare the child's role once ([`Filter::CHILD`], `Filtered` unless
/// said otherwise), name the format, and override only what the filter
/// changes. Every type that implements `Filter` is a [`BlockDriver`]
/// (a blanket implementation forwards each `BlockDriver` callback to the
/// `Filter` callback of the same name), so it is added to the graph like
/// any driver and found again with `driver_as::<YourFilter>()`.
///
/// The defaults:
///
/// | callback | default |
/// |---|---|
/// | `open` | fails with [`Error::NoSuchChild`] unless the child is attached |
/// | `close`, `drained_begin`, `drained_end` | nothing |
/// | `reopen` | [`Error::Unsupported`] |
/// | `child_permissions` | on the child, what the node's users take and share; on any other child, nothing taken and everything shared |
/// | `request_alignment`, `length` | the child's |
/// | `read`, `write`, `write_zeroes`, `discard`, `flush`, `block_status` | the child's, at the same offsets |
/// | `readv`, `writev` | the filter's own `read`/`write` (one segment: as it is; several: through a bounce buffer) |
/// | `read_buf`, `write_buf` | the filter's own `read`/`write`, with the buffer lent |
/// | `truncate` | resizes the child through the checked edge ([`forward::truncate`]) |
///
/// A default costs what writing it out by hand costs: the blanket
/// implementation is generic (no extra virtual call), and a forwarded
/// request hands back the child's own future (no allocation of its own). An
/// override that does something before passing the request on ends with
/// the matching [`forward`] helper, which is what the default calls.
///
/// The vectored and owned-buffer callbacks are the exception: their
/// defaults go through the filter's own [`read`](Filter::read) and
/// [`write`](Filter::write), so a filter that overrides `write` to count,
/// throttle or refuse also sees every vectored or owned-buffer write
/// (forwarding them to the child by default would let them slip past). A
/// filter that treats them as it treats buffers says so with
/// [`forward::readv`], [`forward::writev`], [`forward::read_buf`] and
/// [`forward::write_buf`] (after doing what its `read`/`write` do first),
/// and then passes the regions or the buffer down without a copy.
///
/// # Examples
///
/// A filter that counts the writes going through it, between a backend and
/// a memory node:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use blockgraph::driver::{forward, Filter, IoFuture};
/// use blockgraph::drivers::MemoryDriver;
/// use blockgraph::{BackendOptions, ChildRole, MainLoop, RequestRef};
///
/// #[derive(Default)]
/// struct CountWrites(AtomicU64);
///
/// impl Filter for CountWrites {
///     fn format_name(&self) -> &'static str { "count-writes" }
///
///     fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
///         self.0.fetch_add(1, Ordering::Relaxed);
///         forward::write(node, Self::CHILD, offset, buf)
///     }
/// }
///
/// let main = MainLoop::new()?;
/// let io = main.new_io_thread("io0")?;
/// let (counter, blk) = main.run(|bql| {
///     bql.write(|w| {
///         let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
///         let counter = w.add_node("count", CountWrites::default(), &[(ChildRole::Filtered, &disk)])?;
///         let blk = w.add_backend("vda", &counter, BackendOptions::default())?;
///         Ok::<_, blockgraph::Error>((counter, blk))
///     })
/// })?;
/// let read_back = io
///     .spawn(move |mut cx| async move {
///         blk.write(&mut cx, 4096, b"hello").await?;
///         let mut buf = [0; 5];
///         blk.read(&mut cx, 4096, &mut buf).await?; // not overridden: passes down
///         Ok::<_, blockgraph::Error>(buf)
///     })
///     .join()?;
/// assert_eq!(&read_back, b"hello");
/// let writes = main.run(move |bql| counter.gs(bql).driver_as::<CountWrites>().unwrap().0.load(Ordering::Relaxed));
/// assert_eq!(writes, 1);
/// drop(io);
/// main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
///
/// Each callback receives the proof of its context, as
/// [`BlockDriver`]'s do: see the [module docs](crate::driver).
pub trait Filter: Any + Send + Sync {
    /// The role of the filtered child: [`ChildRole::Filtered`] for filters
    /// proper (`raw` says [`ChildRole::File`]).
    const CHILD: ChildRole = ChildRole::Filtered;

    /// The format name (`"throttle"`, …), shown in dumps and errors.
    fn format_name(&self) -> &'static str;

    /// A one-line description for graph dumps (default: the format name).
    fn describe(&self) -> String {
        self.format_name().to_owned()
    }

    // ---- main-loop callbacks -------------------------------------------

    /// See [`BlockDriver::open`]. Default: refuses to join the graph
    /// without the child ([`Error::NoSuchChild`]).
    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        require_child(node, Self::CHILD).map(drop)
    }

    /// See [`BlockDriver::close`]. Default: nothing.
    fn close(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// See [`BlockDriver::reopen`]. Default: [`Error::Unsupported`].
    fn reopen(&self, node: CallbackRef<'_>, options: &[(&str, &str)]) -> Result<()> {
        let _ = (node, options);
        Err(Error::Unsupported {
            driver: self.format_name(),
            operation: "reopen",
        })
    }

    /// See [`BlockDriver::reopen_commit`]. Default: nothing.
    fn reopen_commit(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// See [`BlockDriver::reopen_abort`]. Default: nothing.
    fn reopen_abort(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// See [`BlockDriver::set_read_only`]. Default: accepts either mode (a
    /// filter stores nothing of its own; the graph switches its child too,
    /// and the child's mode limits what users may take through it).
    fn set_read_only(&self, node: CallbackRef<'_>, read_only: bool) -> Result<()> {
        let _ = (node, read_only);
        Ok(())
    }

    /// See [`BlockDriver::info`]. Default: nothing beyond the format name.
    fn info(&self) -> crate::types::DriverInfo {
        crate::types::DriverInfo::default()
    }

    /// See [`BlockDriver::child_permissions`]. Default: on the child, what
    /// the node's users take and share (a filter neither adds nor hides a
    /// need); any other child is not used, so nothing is taken on it and
    /// everything shared.
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        if role == Self::CHILD {
            users
        } else {
            Permissions::UNRESTRICTED
        }
    }

    /// See [`BlockDriver::drained_begin`]. Default: nothing.
    fn drained_begin(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    /// See [`BlockDriver::drained_end`]. Default: nothing.
    fn drained_end(&self, node: CallbackRef<'_>) {
        let _ = node;
    }

    // ---- I/O callbacks ---------------------------------------------------

    /// See [`BlockDriver::request_alignment`]. Default: the child's.
    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        forward::request_alignment(node, Self::CHILD)
    }

    /// See [`BlockDriver::length`]. Default: the child's.
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        forward::length(node, Self::CHILD)
    }

    /// See [`BlockDriver::read`]. Default: reads the child.
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        forward::read(node, Self::CHILD, offset, buf)
    }

    /// See [`BlockDriver::write`]. Default: writes the child.
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        forward::write(node, Self::CHILD, offset, buf)
    }

    /// See [`BlockDriver::readv`]. Default: this filter's
    /// [`read`](Filter::read), directly for one segment, through a bounce
    /// buffer for several ([`readv_via_read`]); override it with
    /// [`forward::readv`] to pass the vector down.
    fn readv<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVecMut<'a>) -> IoFuture<'a, ()>
    where
        Self: Sized,
    {
        readv_via_read(self, node, offset, iov)
    }

    /// See [`BlockDriver::writev`]. Default: this filter's
    /// [`write`](Filter::write), as [`readv`](Filter::readv) does
    /// ([`writev_via_write`]).
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()>
    where
        Self: Sized,
    {
        writev_via_write(self, node, offset, iov)
    }

    /// See [`BlockDriver::read_buf`]. Default: this filter's
    /// [`read`](Filter::read), with the buffer lent ([`read_buf_via_read`]);
    /// override it with [`forward::read_buf`] to pass the buffer down.
    fn read_buf<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf>
    where
        Self: Sized,
    {
        read_buf_via_read(self, node, offset, buf)
    }

    /// See [`BlockDriver::write_buf`]. Default: this filter's
    /// [`write`](Filter::write), with the buffer lent
    /// ([`write_buf_via_write`]).
    fn write_buf<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf>
    where
        Self: Sized,
    {
        write_buf_via_write(self, node, offset, buf)
    }

    /// See [`BlockDriver::write_zeroes`]. Default: zeroes the child's range.
    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        forward::write_zeroes(node, Self::CHILD, offset, len)
    }

    /// See [`BlockDriver::discard`]. Default: discards the child's range.
    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        forward::discard(node, Self::CHILD, offset, len)
    }

    /// See [`BlockDriver::flush`]. Default: flushes the child.
    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        forward::flush(node, Self::CHILD)
    }

    /// See [`BlockDriver::flush_to_close`]. Default: this filter's
    /// [`flush`](Filter::flush), then the child's `flush_to_close` (so a
    /// qcow2 node below stores its bitmaps when its filter is closed).
    fn flush_to_close<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            Filter::flush(self, node).await?;
            forward::flush_to_close(node, Self::CHILD).await
        })
    }

    /// See [`BlockDriver::truncate`]. Default: resizes the child to the same
    /// size, through the check that this node's edge took
    /// [`Perm::RESIZE`](crate::Perm::RESIZE).
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        let _ = permit;
        forward::truncate(node, Self::CHILD, size)
    }

    /// See [`BlockDriver::block_status`]. Default: the child's.
    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        forward::block_status(node, Self::CHILD, offset, len)
    }
}

/// Every filter is a driver: each callback is the filter's own.
impl<F: Filter> BlockDriver for F {
    #[inline]
    fn format_name(&self) -> &'static str {
        Filter::format_name(self)
    }

    fn describe(&self) -> String {
        Filter::describe(self)
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        Filter::open(self, node)
    }

    fn close(&self, node: CallbackRef<'_>) {
        Filter::close(self, node)
    }

    fn reopen(&self, node: CallbackRef<'_>, options: &[(&str, &str)]) -> Result<()> {
        Filter::reopen(self, node, options)
    }

    fn reopen_commit(&self, node: CallbackRef<'_>) {
        Filter::reopen_commit(self, node)
    }

    fn reopen_abort(&self, node: CallbackRef<'_>) {
        Filter::reopen_abort(self, node)
    }

    fn set_read_only(&self, node: CallbackRef<'_>, read_only: bool) -> Result<()> {
        Filter::set_read_only(self, node, read_only)
    }

    fn info(&self) -> crate::types::DriverInfo {
        Filter::info(self)
    }

    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        Filter::child_permissions(self, role, users)
    }

    fn drained_begin(&self, node: CallbackRef<'_>) {
        Filter::drained_begin(self, node)
    }

    fn drained_end(&self, node: CallbackRef<'_>) {
        Filter::drained_end(self, node)
    }

    #[inline]
    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        Filter::request_alignment(self, node)
    }

    #[inline]
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Filter::length(self, node)
    }

    #[inline]
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Filter::read(self, node, offset, buf)
    }

    #[inline]
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Filter::write(self, node, offset, buf)
    }

    #[inline]
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Filter::readv(self, node, offset, iov)
    }

    #[inline]
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        Filter::writev(self, node, offset, iov)
    }

    #[inline]
    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Filter::read_buf(self, node, offset, buf)
    }

    #[inline]
    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Filter::write_buf(self, node, offset, buf)
    }

    fn flush_to_close<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Filter::flush_to_close(self, node)
    }

    #[inline]
    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Filter::write_zeroes(self, node, offset, len)
    }

    #[inline]
    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Filter::discard(self, node, offset, len)
    }

    #[inline]
    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Filter::flush(self, node)
    }

    #[inline]
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Filter::truncate(self, node, size, permit)
    }

    #[inline]
    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Filter::block_status(self, node, offset, len)
    }
}
