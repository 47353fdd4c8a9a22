//! [`BlockBackend`], the device-facing root of a node tree (QEMU's
//! `BlockBackend`).

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use crate::graph::backend::{BackendInner, BackendOptions, LENGTH_MASK, NO_ALIGNMENT, NO_LENGTH};
use crate::graph::mutation::check_name;
use crate::graph::proof::{GraphWriter, NodeHandle};
use crate::graph::proof::{NodeRef, ReadGuard, RequestRef};
use crate::graph::runtime::IoTask;
use crate::types::BlockStatus;
use crate::types::{ChildRole, Perm};
use crate::types::{Error, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

/// The device-facing root of a node tree: byte-addressed async I/O.
///
/// A device model (virtio-blk, NVMe, an NBD export) holds one. Each request
/// takes the graph read lock once, from the calling task's [`IoTask`], and
/// passes the proof down the whole driver stack. Requests may come from
/// several I/O threads at once (multiqueue).
///
/// While a drain section covers the backend, new requests queue (without
/// holding the read lock) and resume when the last section ends; requests
/// already in flight complete, and the drain waits for them.
///
/// Requests are checked before they reach a driver: past the end of the
/// device is [`Error::OutOfRange`], not a multiple of the root's request
/// alignment is [`Error::Misaligned`], a write through a backend that did not
/// take [`Perm::WRITE`] is [`Error::ReadOnly`].
///
/// Cloning gives another handle to the same backend.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};
///
/// let main = MainLoop::new()?;
/// let blk = main.run(|bql| bql.write(|w| {
///     let disk = w.add_node("disk", MemoryDriver::new(1 << 16), &[])?;
///     w.add_backend("vda", &disk, BackendOptions::default())
/// }))?;
/// let io = main.new_io_thread("io0")?;
/// let data = io.spawn(move |mut cx| async move {
///     blk.write(&mut cx, 4096, &[7u8; 512]).await?;
///     let mut buf = vec![0u8; 512];
///     blk.read(&mut cx, 4096, &mut buf).await?;
///     Ok::<_, blockgraph::Error>(buf)
/// }).join()?;
/// assert!(data.iter().all(|&b| b == 7));
/// # drop(io); main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Clone)]
pub struct BlockBackend {
    pub(crate) inner: Arc<BackendInner>,
}

/// One request past the drain gate; leaving wakes a waiting drain.
struct InFlight<'a>(&'a BackendInner);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let before = self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.0.quiesced.load(Ordering::SeqCst) {
            self.0.idle.wake_all();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Other,
}

impl BlockBackend {
    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Requests currently past the drain gate.
    ///
    /// A request counts itself in *before* it looks at the gate (that
    /// order is what lets a drain never miss one), so while a drain section
    /// covers the backend this can briefly read 1 for a request that is
    /// about to back out and queue; no request reaches the drained node.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Whether a drain section covers the backend (new requests queue).
    pub fn is_quiesced(&self) -> bool {
        self.inner.quiesced.load(Ordering::SeqCst)
    }

    /// Requests completed (successfully or not) since the backend was made.
    pub fn completed_requests(&self) -> u64 {
        self.inner.completed.load(Ordering::Relaxed)
    }

    /// How many times a request had to queue because the backend was
    /// quiesced.
    pub fn queued_requests(&self) -> u64 {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Whether two handles are the same backend.
    pub fn ptr_eq(&self, other: &BlockBackend) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Enters the drain gate under `guard`: counts the request in flight
    /// unless the backend is quiesced.
    fn try_start(&self, _guard: &ReadGuard<'_>) -> Option<InFlight<'_>> {
        let b = &*self.inner;
        b.in_flight.fetch_add(1, Ordering::SeqCst);
        let started = InFlight(b);
        if b.quiesced.load(Ordering::SeqCst) {
            drop(started);
            b.queued.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(started)
    }

    async fn wait_until_resumed(&self) {
        let b = &*self.inner;
        poll_fn(|cx| {
            b.resume.register(cx.waker());
            if b.quiesced.load(Ordering::SeqCst) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// The root as its driver sees it: the request entered at this backend
    /// (counted in `in_flight`, which every drain covering the root waits
    /// for) and goes down from here.
    fn root<'r>(&'r self, guard: &'r ReadGuard<'_>) -> Result<RequestRef<'r>> {
        let access = guard.access();
        match self.inner.root.get(access) {
            // SAFETY: the backend belongs to the guard's graph (checked at
            // the request's entry, `same_graph`), so its root does too.
            Some(node) => Ok(unsafe { NodeRef::new(node, access) }),
            None => Err(Error::NoMedium(self.inner.name.clone())),
        }
    }

    /// Whether `cx` belongs to this backend's graph: another graph's read
    /// lock does not keep this one from changing (rule 16). Checked before
    /// any graph state is touched.
    #[inline]
    fn same_graph(&self, cx: &IoTask) -> Result<()> {
        if std::ptr::eq(self.inner.graph.as_ptr(), cx.graph_ptr()) {
            Ok(())
        } else {
            Err(Error::WrongGraph {
                what: format!("backend '{}'", self.inner.name),
            })
        }
    }

    async fn check(
        &self,
        root: RequestRef<'_>,
        access: Access,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if access == Access::Write && !self.inner.perms.take.contains(Perm::WRITE) {
            return Err(Error::ReadOnly(self.inner.name.clone()));
        }
        if access != Access::Other {
            let alignment = self.root_alignment(root);
            if offset % u64::from(alignment) != 0 || len % u64::from(alignment) != 0 {
                return Err(Error::Misaligned {
                    offset,
                    len,
                    alignment,
                });
            }
            let size = self.root_length(root).await?;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::OutOfRange { offset, len, size });
            }
        }
        Ok(())
    }
}

/// Runs one request: read lock, drain gate, checks, then `$body` with the
/// root node bound to `$root`.
impl BlockBackend {
    /// The root's length, cached per size epoch (QEMU caches it in
    /// `bs->total_sectors`): asking the whole stack on every request would
    /// cost a boxed future per layer.
    ///
    /// Called under the read lock, so no mutation can bump the epoch
    /// meanwhile; only `notify_length_changed` can, from a concurrent
    /// resize. Tag and length are one atomic word, so a stale length can only
    /// be taken for current if 65,536 resizes happened while this request
    /// was between reading the epoch and storing its result.
    async fn root_length(&self, root: RequestRef<'_>) -> Result<u64> {
        let tag = self.inner.size_epoch.load(Ordering::Acquire) & 0xffff;
        let cached = self.inner.length_cache.load(Ordering::Acquire);
        if cached != NO_LENGTH && cached >> 48 == tag {
            return Ok(cached & LENGTH_MASK);
        }
        let length = root.length().await?;
        if length < LENGTH_MASK {
            self.inner
                .length_cache
                .store(tag << 48 | length, Ordering::Release);
        }
        Ok(length)
    }
}

impl BlockBackend {
    /// The root's request alignment, cached per size epoch as the length
    /// is (QEMU keeps it in `bs->bl.request_alignment`, refreshed when the
    /// graph changes): asking on every request walks every layer of the
    /// stack with a virtual call and a child lookup each.
    ///
    /// Called under the read lock, like `root_length`: only a wrap of the
    /// 32-bit tag while this request runs could pass a stale value for a
    /// current one.
    fn root_alignment(&self, root: RequestRef<'_>) -> u32 {
        let tag = self.inner.size_epoch.load(Ordering::Acquire) & 0xffff_ffff;
        let cached = self.inner.alignment_cache.load(Ordering::Acquire);
        if cached != NO_ALIGNMENT && cached >> 32 == tag {
            return cached as u32;
        }
        let alignment = root.request_alignment().max(1);
        self.inner
            .alignment_cache
            .store(tag << 32 | u64::from(alignment), Ordering::Release);
        alignment
    }
}

/// The buffer an owned-buffer request on `root` hands back, checked to be
/// as long as the request (`len` bytes): a driver must return the buffer
/// it was given ([`BlockDriver::read_buf`](crate::driver::BlockDriver::read_buf)),
/// and a caller indexes it by the length it asked for, so a driver that
/// breaks the rule fails the request with a message naming it instead.
async fn handed_back(
    root: RequestRef<'_>,
    request: impl std::future::Future<Output = Result<IoBuf>>,
    len: u64,
) -> Result<IoBuf> {
    let buf = request.await?;
    if buf.len() as u64 != len {
        return Err(Error::Io(std::io::Error::other(format!(
            "node '{}' handed back a buffer of {} bytes for a request of {len} \
             (BlockDriver::read_buf and write_buf must return the buffer they were given)",
            root.name(),
            buf.len()
        ))));
    }
    Ok(buf)
}

/// What a finished request counts as in the backend's statistics.
#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
    Discard,
    Flush,
}

impl BlockBackend {
    /// Counts a finished request in the backend's statistics.
    #[inline]
    fn account<T>(&self, kind: Kind, bytes: u64, result: &Result<T>) {
        let s = &self.inner.stats;
        if result.is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (count, total) = match kind {
            Kind::Read => (&s.reads, Some(&s.read_bytes)),
            Kind::Write => (&s.writes, Some(&s.write_bytes)),
            Kind::Discard => (&s.discards, None),
            Kind::Flush => (&s.flushes, None),
        };
        count.fetch_add(1, Ordering::Relaxed);
        if let Some(total) = total {
            total.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The backend's I/O statistics so far (also in
    /// [`Bql::query_backends`](crate::Bql::query_backends)).
    pub fn stats(&self) -> crate::types::IoStats {
        self.inner.stats.snapshot()
    }
}

macro_rules! request {
    ($self:ident, $cx:ident, $access:expr, $offset:expr, $len:expr, |$root:ident| $body:expr) => {{
        $self.same_graph($cx)?;
        loop {
            let guard = $cx.read().await;
            let Some(_in_flight) = $self.try_start(&guard) else {
                drop(guard);
                $self.wait_until_resumed().await;
                continue;
            };
            let result = async {
                let $root = $self.root(&guard)?;
                $self.check($root, $access, $offset, $len).await?;
                $body.await
            }
            .await;
            $self.inner.completed.fetch_add(1, Ordering::Relaxed);
            break result;
        }
    }};
}

impl BlockBackend {
    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// `cx` is borrowed mutably: the caller cannot already hold a read guard
    /// (the request takes it itself, after the drain gate, so a queued
    /// request never holds the lock a writer waits for).
    pub async fn read(&self, cx: &mut IoTask, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let result = request!(self, cx, Access::Read, offset, len, |root| root
            .read(offset, buf));
        self.account(Kind::Read, len, &result);
        result
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, cx: &mut IoTask, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        let result = request!(self, cx, Access::Write, offset, len, |root| root
            .write(offset, buf));
        self.account(Kind::Write, len, &result);
        result
    }

    /// Reads `iov.len()` bytes at `offset` into the regions of `iov`, in
    /// order: a scatter read (QEMU's `blk_co_preadv` with a
    /// `QEMUIOVector`), with the checks, drain gate and statistics of
    /// [`read`](Self::read) (one request of `iov.len()` bytes).
    ///
    /// The regions go down the graph as they are: filters pass them on,
    /// qcow2 cuts them at cluster boundaries, so a VMM can read straight
    /// into guest memory. Drivers that cannot take a vector read through a
    /// bounce buffer ([`BlockDriver::readv`](crate::driver::BlockDriver::readv)).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::IoSliceMut;
    /// use blockgraph::{drivers::MemoryDriver, BackendOptions, IoVecMut, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let blk = main.run(|bql| bql.write(|w| {
    ///     let disk = w.add_node("disk", MemoryDriver::new(1 << 16), &[])?;
    ///     w.add_backend("vda", &disk, BackendOptions::default())
    /// }))?;
    /// let io = main.new_io_thread("io0")?;
    /// let (head, tail) = io.spawn(move |mut cx| async move {
    ///     blk.write(&mut cx, 512, b"header|payload").await?;
    ///     let (mut head, mut tail) = ([0u8; 7], [0u8; 7]);
    ///     let mut segs = [IoSliceMut::new(&mut head), IoSliceMut::new(&mut tail)];
    ///     blk.readv(&mut cx, 512, IoVecMut::new(&mut segs)).await?;
    ///     Ok::<_, blockgraph::Error>((head, tail))
    /// }).join()?;
    /// assert_eq!((&head, &tail), (b"header|", b"payload"));
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub async fn readv(&self, cx: &mut IoTask, offset: u64, mut iov: IoVecMut<'_>) -> Result<()> {
        let len = iov.len() as u64;
        let result = request!(self, cx, Access::Read, offset, len, |root| root
            .readv(offset, iov.reborrow()));
        self.account(Kind::Read, len, &result);
        result
    }

    /// Writes the regions of `iov`, in order, at `offset`: a gather write
    /// (QEMU's `blk_co_pwritev`), with the checks, drain gate, statistics
    /// and dirty-bitmap marking of [`write`](Self::write).
    pub async fn writev(&self, cx: &mut IoTask, offset: u64, iov: IoVec<'_>) -> Result<()> {
        let len = iov.len() as u64;
        let result = request!(self, cx, Access::Write, offset, len, |root| root
            .writev(offset, iov));
        self.account(Kind::Write, len, &result);
        result
    }

    /// Reads `buf.len()` bytes at `offset` into a buffer this request owns
    /// and hands it back, with the checks, drain gate and statistics of
    /// [`read`](Self::read).
    ///
    /// Unlike a borrowed buffer, an [`IoBuf`] can go to the kernel as it
    /// is: filters pass it down and the file driver's io_uring path reads
    /// into it with no copy (where the request fits the file's
    /// alignment); other drivers get it as a slice. If this future is
    /// dropped while the read is in the kernel, the buffer goes with the
    /// operation and is freed at its completion. On an error the buffer
    /// is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::MemoryDriver, BackendOptions, IoBuf, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let blk = main.run(|bql| bql.write(|w| {
    ///     let disk = w.add_node("disk", MemoryDriver::new(1 << 16), &[])?;
    ///     w.add_backend("vda", &disk, BackendOptions::default())
    /// }))?;
    /// let io = main.new_io_thread("io0")?;
    /// let back = io.spawn(move |mut cx| async move {
    ///     blk.write_buf(&mut cx, 512, IoBuf::copy_from(b"owned")).await?;
    ///     blk.read_buf(&mut cx, 512, IoBuf::zeroed(5)).await
    /// }).join()?;
    /// assert_eq!(&*back, b"owned");
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub async fn read_buf(&self, cx: &mut IoTask, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let result = request!(self, cx, Access::Read, offset, len, |root| handed_back(
            root,
            root.read_buf(offset, buf),
            len
        ));
        self.account(Kind::Read, len, &result);
        result
    }

    /// Writes a buffer this request owns at `offset` and hands it back,
    /// with the checks, drain gate, statistics and dirty-bitmap marking of
    /// [`write`](Self::write); see [`read_buf`](Self::read_buf).
    pub async fn write_buf(&self, cx: &mut IoTask, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let result = request!(self, cx, Access::Write, offset, len, |root| handed_back(
            root,
            root.write_buf(offset, buf),
            len
        ));
        self.account(Kind::Write, len, &result);
        result
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub async fn write_zeroes(&self, cx: &mut IoTask, offset: u64, len: u64) -> Result<()> {
        let result = request!(self, cx, Access::Write, offset, len, |root| root
            .write_zeroes(offset, len));
        self.account(Kind::Write, len, &result);
        result
    }

    /// Discards `len` bytes at `offset`.
    pub async fn discard(&self, cx: &mut IoTask, offset: u64, len: u64) -> Result<()> {
        let result = request!(self, cx, Access::Write, offset, len, |root| root
            .discard(offset, len));
        self.account(Kind::Discard, len, &result);
        result
    }

    /// Makes completed writes durable.
    pub async fn flush(&self, cx: &mut IoTask) -> Result<()> {
        let result = request!(self, cx, Access::Other, 0, 0, |root| root.flush());
        self.account(Kind::Flush, 0, &result);
        result
    }

    /// The size of the device in bytes.
    pub async fn length(&self, cx: &mut IoTask) -> Result<u64> {
        request!(self, cx, Access::Other, 0, 0, |root| self.root_length(root))
    }
}

/// What the device stores, for exports and copy tools (QEMU's
/// `blk_co_block_status_above` with no base).
impl BlockBackend {
    /// What is stored at `offset`, looking through filters and the whole backing chain,
    /// and for how many bytes (at least 1, at most `len`) the answer holds.
    ///
    /// [`BlockStatus::Data`]: some layer stores data there;
    /// [`BlockStatus::Zero`]: the first layer that says anything says it
    /// reads as zeroes; [`BlockStatus::Unallocated`]: no layer stores
    /// anything there, so it reads as zeroes too (a hole). Unlike reads,
    /// the range needs no alignment; it must lie inside the device and
    /// `len` must not be zero ([`Error::OutOfRange`],
    /// [`Error::InvalidArgument`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{driver::BlockStatus, drivers::NullDriver, BackendOptions, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let blk = main.run(|bql| bql.write(|w| {
    ///     let disk = w.add_node("null0", NullDriver::new(1 << 20), &[])?;
    ///     w.add_backend("vda", &disk, BackendOptions::default())
    /// }))?;
    /// let io = main.new_io_thread("io0")?;
    /// let status = io.spawn(move |mut cx| async move {
    ///     blk.block_status(&mut cx, 0, 4096).await
    /// }).join()?;
    /// assert_eq!(status, (BlockStatus::Zero, 4096));
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub async fn block_status(
        &self,
        cx: &mut IoTask,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        self.status_above(cx, None, offset, len).await
    }

    /// What the part of the chain *above* `base` stores at `offset`, and
    /// for how many bytes (at least 1, at most `len`) the answer holds
    /// (QEMU's `bdrv_block_status_above(bs, base, …)`): like
    /// [`block_status`](Self::block_status), but the walk down the chain
    /// stops before `base`, so [`BlockStatus::Unallocated`] means "no node
    /// between the root and `base` stores anything there" (whatever `base`
    /// and the nodes below it hold). A `base` that is not in the chain, or
    /// `None`, walks the whole chain. Block jobs use it to find what a
    /// stream or commit must copy.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{driver::BlockStatus, drivers::MemoryDriver, BackendOptions, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let (base, blk) = main.run(|bql| bql.write(|w| {
    ///     let base = w.add_node("base", MemoryDriver::new(1 << 16), &[])?;
    ///     let blk = w.add_backend("vda", &base, BackendOptions::default())?;
    ///     Ok::<_, blockgraph::Error>((base, blk))
    /// }))?;
    /// let io = main.new_io_thread("io0")?;
    /// let (all, above) = io.spawn(move |mut cx| async move {
    ///     let all = blk.block_status(&mut cx, 0, 4096).await?;
    ///     let above = blk.block_status_above(&mut cx, Some(&base), 0, 4096).await?;
    ///     Ok::<_, blockgraph::Error>((all, above))
    /// }).join()?;
    /// assert_eq!(all, (BlockStatus::Data, 4096));
    /// assert_eq!(above, (BlockStatus::Unallocated, 4096)); // the root *is* the base
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub async fn block_status_above(
        &self,
        cx: &mut IoTask,
        base: Option<&NodeHandle>,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        self.status_above(cx, base.map(NodeHandle::name), offset, len)
            .await
    }

    /// The walk of [`block_status_above`](Self::block_status_above): from
    /// the root down the backing chain, through filters (their
    /// [`Filtered`](ChildRole::Filtered) child: a filter's answer is its
    /// child's, and what its child's backing chain stores is still data),
    /// stopping before the node named `base` (names are unique in a graph).
    async fn status_above(
        &self,
        cx: &mut IoTask,
        base: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        request!(self, cx, Access::Other, offset, len, |root| async move {
            if len == 0 {
                return Err(Error::InvalidArgument(
                    "block status of an empty range".into(),
                ));
            }
            let size = self.root_length(root).await?;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::OutOfRange { offset, len, size });
            }
            let mut node = root;
            let mut len = len;
            loop {
                if Some(node.name()) == base {
                    return Ok((BlockStatus::Unallocated, len));
                }
                let (status, n) = node.block_status(offset, len).await?;
                // A driver that answers for no bytes would stall callers
                // that walk the device; count it as one byte.
                let n = n.clamp(1, len);
                if status != BlockStatus::Unallocated {
                    return Ok((status, n));
                }
                let Some(below) = node
                    .child(ChildRole::Backing)
                    .or_else(|| node.child(ChildRole::Filtered))
                else {
                    return Ok((BlockStatus::Unallocated, n));
                };
                // A backing node shorter than its overlay reads as zeroes
                // past its end.
                let below_len = below.length().await?;
                if offset >= below_len {
                    return Ok((BlockStatus::Unallocated, n));
                }
                len = n.min(below_len - offset);
                node = below;
            }
        })
    }

    /// The alignment, in bytes, that reads and writes through this backend
    /// must have (the root's request alignment; 1 when anything goes).
    pub async fn request_alignment(&self, cx: &mut IoTask) -> Result<u32> {
        request!(self, cx, Access::Other, 0, 0, |root| async move {
            Ok(root.request_alignment().max(1))
        })
    }
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// Resizing through a backend (QEMU's `blk_truncate`).
impl BlockBackend {
    /// Resizes the device to `size` bytes. A grown area reads as zeroes;
    /// the new length is visible to every request that starts afterwards.
    ///
    /// Needs [`Perm::RESIZE`] in the backend's permissions
    /// ([`BackendOptions::perms`]; the default exclusive writer does not
    /// take it, see [`BackendOptions::resizable`]). The request passes the
    /// drain gate like any other and is counted in flight; the root's
    /// driver does the rest, resizing its own children only through edges
    /// that took the permission too ([`NodeRef::truncate_child`]).
    ///
    /// # Errors
    ///
    /// [`Error::PermissionDenied`] (nothing changed) when the backend did
    /// not take [`Perm::RESIZE`], [`Error::NoMedium`], and whatever the
    /// drivers report: [`Error::Unsupported`] where a driver cannot resize,
    /// [`Error::ReadOnly`] on a read-only image or file.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::MemoryDriver, BackendOptions, Error, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let (fixed, resizable) = main.run(|bql| bql.write(|w| {
    ///     let a = w.add_node("a", MemoryDriver::new(4096), &[])?;
    ///     let b = w.add_node("b", MemoryDriver::new(4096), &[])?;
    ///     let fixed = w.add_backend("vda", &a, BackendOptions::default())?;
    ///     let resizable = w.add_backend("vdb", &b, BackendOptions::resizable())?;
    ///     Ok::<_, Error>((fixed, resizable))
    /// }))?;
    /// let io = main.new_io_thread("io0")?;
    /// let (refused, len) = io.spawn(move |mut cx| async move {
    ///     let refused = fixed.truncate(&mut cx, 8192).await;
    ///     resizable.truncate(&mut cx, 8192).await?;
    ///     Ok::<_, Error>((refused, resizable.length(&mut cx).await?))
    /// }).join()?;
    /// assert!(matches!(refused, Err(Error::PermissionDenied { .. })));
    /// assert_eq!(len, 8192);
    /// # drop(io); main.shutdown();
    /// # Ok::<(), Error>(())
    /// ```
    pub async fn truncate(&self, cx: &mut IoTask, size: u64) -> Result<()> {
        request!(self, cx, Access::Other, 0, 0, |root| async {
            if !self.inner.perms.take.contains(Perm::RESIZE) {
                return Err(Error::PermissionDenied {
                    user: format!("backend '{}'", self.inner.name),
                    perm: Perm::RESIZE,
                    node: root.name().to_owned(),
                    operation: "resize",
                });
            }
            root.resize_checked(size).await
        })
    }
}

/// Backends join and leave the graph in a write section.
impl GraphWriter<'_> {
    /// Adds a backend named `name` on `root`: the device-facing user of the
    /// graph. Fails if its permissions conflict with `root`'s other users.
    pub fn add_backend(
        &mut self,
        name: &str,
        root: &NodeHandle,
        options: BackendOptions,
    ) -> Result<BlockBackend> {
        let root = self.own_handle(root)?.clone();
        check_name(name)?;
        let backend = BackendInner::new(name, self.graph, options, root.clone());
        self.mutate(|tx| tx.add_backend(&backend, &root))?;
        Ok(BlockBackend { inner: backend })
    }

    /// Removes `backend` from the graph. Requests it still receives fail with
    /// [`Error::NoMedium`].
    pub fn remove_backend(&mut self, backend: &BlockBackend) -> Result<()> {
        let b = backend.inner.clone();
        if !std::ptr::eq(b.graph.as_ptr(), Arc::as_ptr(self.graph)) {
            return Err(Error::WrongGraph {
                what: format!("backend '{}'", b.name),
            });
        }
        if !b.in_graph.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument(format!(
                "backend '{}' is not part of this graph",
                b.name
            )));
        }
        self.mutate(|tx| {
            tx.remove_backend(&b);
            Ok(())
        })
    }
}
