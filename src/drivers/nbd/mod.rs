//! The `nbd` protocol driver: a client of a remote NBD export (QEMU's
//! `nbd` block driver), so a node can be an image on another host or in
//! another process and everything above it (formats, filters, jobs,
//! exports) works as on a local file.
//!
//! # Where things are
//!
//! `options.rs` ([`NbdOptions`], [`NbdAddress`], QEMU's NBD URIs);
//! `handshake.rs` (connecting and the fixed newstyle negotiation);
//! `connection.rs` (the connection task: sending, matching replies to
//! requests, hostile replies, reconnecting); `runtime.rs` (the thread the
//! connections run on). This file: [`NbdDriver`] and its
//! [`BlockDriver`] implementation. The wire format itself is shared with
//! the NBD export (`crate::nbd::proto`).

mod connection;
mod handshake;
mod options;
mod runtime;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::future::try_join_all;
use tokio::sync::{mpsc, oneshot};

use crate::driver::range_lock::RangeLock;
use crate::graph::driver::{BlockDriver, IoFuture};
use crate::graph::proof::RequestRef;
use crate::nbd::proto::*;
use crate::types::{BlockStatus, DriverInfo, Error, Result};

use connection::{Command, Reply, Status};
use handshake::ExportInfo;

pub use options::{NbdAddress, NbdOptions};

/// Largest trim or write-zeroes request sent at once (they carry no
/// payload, but their length is a 32-bit field; 1 GiB keeps every server's
/// own limits happy).
const MAX_ZERO_REQUEST: u64 = 1 << 30;

/// A node backed by an export of an NBD server (QEMU's `nbd` driver).
///
/// [`NbdDriver::connect`] connects to the server (a Unix socket or TCP),
/// negotiates the fixed newstyle handshake with `NBD_OPT_GO` (or, on a
/// server too old for it, `NBD_OPT_EXPORT_NAME`), structured replies and
/// the `base:allocation` metadata context, and learns the export's size,
/// flags and block sizes.
///
/// - **Requests**: reads, writes (with `FUA` when
///   [`NbdOptions::write_through`] is set), flush, trim (`discard`),
///   write-zeroes (with `NO_HOLE`: the zeroed range stays allocated, as the
///   `file` driver's `write_zeroes` keeps it; a server without
///   write-zeroes gets zero-filled writes), and block status from
///   `base:allocation` (a range the server reports as reading zeroes is
///   [`BlockStatus::Zero`], so convert and jobs skip it). Requests larger
///   than the server's maximum payload are split, the parts sent at once.
///   Any alignment is accepted ([`request_alignment`](BlockDriver::request_alignment)
///   is 1, as for the `file` driver): below the server's minimum block
///   size, reads go through a bounce buffer and writes are a
///   read-modify-write of the blocks they touch, serialised against other
///   writes of those blocks.
/// - **Many requests in flight**: each request gets a handle; replies,
///   in any order, go to the request with their handle.
/// - **Read-only** when the server says so (or [`NbdOptions::read_only`]).
/// - **Threads**: every NBD connection runs on one runtime thread of the
///   driver's own (the I/O threads' runtimes have no reactor for
///   sockets); a request crosses over through a channel and its answer
///   comes back through a oneshot, which wakes the I/O thread's task.
///   Write data is copied into the request and read data out of the
///   reply, so a cancelled request leaves nothing pointing into its
///   buffer.
/// - **Reconnecting** and what requests do meanwhile: see
///   [`NbdOptions`].
/// - **Hostile servers**: a reply with a bad magic, for a handle nobody
///   waits for, longer than the request, with chunks outside the request,
///   an unknown chunk type, or no reply within
///   [`NbdOptions::request_timeout`] ends the connection with an error
///   that names the fault (the request concerned fails, the others are
///   treated as for a lost connection). Nothing the server sends makes the
///   client allocate more than the request's own length (at most 32 MiB)
///   or a few KiB of option and status data.
///
/// # Examples
///
/// ```no_run
/// use blockgraph::drivers::{NbdDriver, NbdOptions};
/// use blockgraph::{BackendOptions, MainLoop};
///
/// let main = MainLoop::new()?;
/// let opts = NbdOptions::parse_uri("nbd+unix:///disk?socket=/tmp/nbd.sock")?;
/// let driver = NbdDriver::connect(opts)?;
/// let node = main.run(move |bql| bql.write(|w| w.add_node("remote", driver, &[])))?;
/// let blk = main.run(move |bql| {
///     bql.write(|w| w.add_backend("vda", &node, BackendOptions::default()))
/// })?;
/// # Ok::<(), blockgraph::Error>(())
/// ```
///
/// # Errors
///
/// Requests fail with [`Error::Io`] carrying the server's errno
/// (`EIO`, `ENOSPC`, …) or the reason the connection was lost, and with
/// [`Error::ReadOnly`] for writes to a read-only export.
#[derive(Debug)]
pub struct NbdDriver {
    opts: NbdOptions,
    info: ExportInfo,
    read_only: bool,
    tx: mpsc::UnboundedSender<Command>,
    status: Arc<Status>,
    /// Serialises a read-modify-write of an unaligned write against other
    /// writes of the same blocks (only used when the server's minimum
    /// block size is above 1).
    ranges: RangeLock,
}

impl NbdDriver {
    /// Connects to the server and negotiates the export (blocking for at
    /// most [`NbdOptions::connect_timeout`]). For async code,
    /// [`NbdDriver::connect_async`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the server cannot be reached within the timeout,
    /// does not speak fixed newstyle NBD, has no such export, or breaks
    /// the protocol during the handshake.
    pub fn connect(opts: NbdOptions) -> Result<NbdDriver> {
        futures::executor::block_on(Self::connect_async(opts))
    }

    /// [`NbdDriver::connect`], without blocking the calling thread (the
    /// future can be awaited on any runtime, or none).
    ///
    /// # Errors
    ///
    /// As [`NbdDriver::connect`].
    pub async fn connect_async(opts: NbdOptions) -> Result<NbdDriver> {
        let rt = runtime::handle().map_err(Error::Io)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let status = Arc::new(Status::default());
        rt.spawn(connection::run(opts.clone(), rx, status.clone(), ready_tx));
        let info = ready_rx
            .await
            .map_err(|_| io::Error::other("the NBD client runtime stopped"))
            .and_then(|r| r)
            .map_err(|e| Self::context(&opts, e))?;
        let read_only = opts.read_only || info.has(FLAG_READ_ONLY);
        Ok(NbdDriver {
            opts,
            info,
            read_only,
            tx,
            status,
            ranges: RangeLock::default(),
        })
    }

    /// The options the node was opened with.
    pub fn options(&self) -> &NbdOptions {
        &self.opts
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.status.connected.load(Ordering::SeqCst)
    }

    /// How many times the connection was lost and made again.
    pub fn reconnects(&self) -> u64 {
        self.status.reconnects.load(Ordering::SeqCst)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The server's largest read or write payload (requests above it are
    /// split), and its minimum block size.
    pub fn block_limits(&self) -> (u32, u32) {
        (self.info.max_payload, self.info.min_block)
    }

    /// Whether the server agreed to `base:allocation`, so that
    /// [`BlockDriver::block_status`] reports holes and zeroes.
    pub fn has_block_status(&self) -> bool {
        self.info.base_allocation.is_some()
    }

    fn context(opts: &NbdOptions, e: io::Error) -> Error {
        Error::Io(io::Error::new(
            e.kind(),
            format!("NBD server {} export '{}': {e}", opts.address, opts.export),
        ))
    }

    /// Sends one request and waits for its answer.
    async fn call(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Arc<[u8]>>,
    ) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command {
            kind,
            flags,
            offset,
            len,
            payload,
            reply,
        };
        let gone = || io::Error::other("the connection task has stopped");
        self.tx
            .send(cmd)
            .map_err(|_| Self::context(&self.opts, gone()))?;
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(Self::context(&self.opts, e)),
            Err(_) => Err(Self::context(&self.opts, gone())),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.describe()));
        }
        Ok(())
    }

    /// Splits `[offset, offset + len)` into pieces of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = max.max(1);
        (0..len.div_ceil(max)).map(move |i| {
            let at = i * max;
            (offset + at, (len - at).min(max) as u32)
        })
    }

    /// Zeroes or trims a range, in pieces.
    async fn no_payload(&self, kind: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let max =
            MAX_ZERO_REQUEST / u64::from(self.info.min_block) * u64::from(self.info.min_block);
        try_join_all(
            Self::pieces(offset, len, max).map(|(at, n)| self.call(kind, flags, at, n, None)),
        )
        .await?;
        Ok(())
    }
}

impl NbdDriver {
    /// The server's minimum block size.
    fn min_block(&self) -> u64 {
        u64::from(self.info.min_block)
    }

    /// Whether `[offset, offset + len)` is aligned to the minimum block.
    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let min = self.min_block();
        min == 1 || (offset % min == 0 && len % min == 0)
    }

    /// `[offset, offset + len)` widened to whole blocks (the end clipped to
    /// the export's size).
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let min = self.min_block();
        let start = offset / min * min;
        let end = (offset + len).div_ceil(min).saturating_mul(min);
        (start, end.min(self.info.size.max(offset + len)))
    }

    /// Reads `buf` at `offset` as it is (split at the payload limit).
    async fn read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let max = self.info.max_payload as usize;
        try_join_all(buf.chunks_mut(max).enumerate().map(|(i, part)| async move {
            let at = offset + (i * max) as u64;
            match self.call(CMD_READ, 0, at, part.len() as u32, None).await? {
                Reply::Data(data) if data.len() == part.len() => {
                    part.copy_from_slice(&data);
                    Ok(())
                }
                other => Err(Error::Io(io::Error::other(format!(
                    "NBD read answered with {other:?}"
                )))),
            }
        }))
        .await?;
        Ok(())
    }

    /// Writes `buf` at `offset` as it is (split at the payload limit).
    async fn write_raw(&self, offset: u64, buf: &[u8], flags: u16) -> Result<()> {
        let max = self.info.max_payload as usize;
        try_join_all(buf.chunks(max).enumerate().map(|(i, part)| {
            let at = offset + (i * max) as u64;
            self.call(CMD_WRITE, flags, at, part.len() as u32, Some(part.into()))
        }))
        .await?;
        Ok(())
    }

    /// A write below the minimum block size: the blocks it touches are
    /// read, patched and written whole, with every other write to them
    /// kept out meanwhile (a serialising range; aligned writes take a
    /// plain one).
    async fn write_unaligned(&self, offset: u64, buf: &[u8], flags: u16) -> Result<()> {
        let min = self.min_block();
        let end = offset + buf.len() as u64;
        let (start, wide_end) = self.widen(offset, buf.len() as u64);
        let _range = self.ranges.lock(start, wide_end, true).await;
        let mut whole = vec![0u8; (wide_end - start) as usize];
        let head_end = (start + min).min(wide_end);
        if offset != start {
            self.read_raw(start, &mut whole[..(head_end - start) as usize])
                .await?;
        }
        let tail = end / min * min;
        if end != wide_end && !(offset != start && tail < head_end) {
            let at = (tail.max(start) - start) as usize;
            self.read_raw(tail.max(start), &mut whole[at..]).await?;
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.write_raw(start, &whole, flags).await
    }
}

impl BlockDriver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn describe(&self) -> String {
        let mut s = format!("nbd {} export '{}'", self.opts.address, self.opts.export);
        if self.read_only {
            s.push_str(", read-only");
        }
        if !self.is_connected() {
            s.push_str(", disconnected");
        }
        s
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn info(&self) -> DriverInfo {
        let uri = match &self.opts.address {
            NbdAddress::Unix(path) => {
                format!("nbd+unix:///{}?socket={}", self.opts.export, path.display())
            }
            addr @ NbdAddress::Tcp { .. } => format!("nbd://{addr}/{}", self.opts.export),
        };
        DriverInfo::new().filename(uri).size(self.info.size)
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.info.size) })
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            if self.is_aligned(offset, len) {
                return self.read_raw(offset, buf).await;
            }
            // Below the minimum block size: whole blocks, through a bounce
            // buffer.
            let (start, end) = self.widen(offset, len);
            let mut whole = vec![0u8; (end - start) as usize];
            self.read_raw(start, &mut whole).await?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&whole[at..at + buf.len()]);
            Ok(())
        })
    }

    fn write<'a>(&'a self, _node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            let fua = self.opts.write_through && self.info.has(FLAG_SEND_FUA);
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            let len = buf.len() as u64;
            if self.min_block() == 1 {
                self.write_raw(offset, buf, flags).await?;
            } else if self.is_aligned(offset, len) {
                let _range = self.ranges.lock(offset, offset + len, false).await;
                self.write_raw(offset, buf, flags).await?;
            } else {
                self.write_unaligned(offset, buf, flags).await?;
            }
            if self.opts.write_through && !fua && self.info.has(FLAG_SEND_FLUSH) {
                self.call(CMD_FLUSH, 0, 0, 0, None).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            if !self.info.has(FLAG_SEND_WRITE_ZEROES) {
                // Zero-filled writes, in pieces of at most the payload limit.
                let zeroes =
                    vec![0u8; len.min(u64::from(self.info.max_payload).min(1 << 20)) as usize];
                for (at, n) in Self::pieces(offset, len, zeroes.len() as u64) {
                    self.write(node, at, &zeroes[..n as usize]).await?;
                }
                return Ok(());
            }
            let mut flags = CMD_FLAG_NO_HOLE;
            if self.opts.write_through && self.info.has(FLAG_SEND_FUA) {
                flags |= CMD_FLAG_FUA;
            }
            let min = self.min_block();
            if min == 1 {
                return self.no_payload(CMD_WRITE_ZEROES, flags, offset, len).await;
            }
            // Partial blocks at either end are written (read-modify-write);
            // whole blocks are zeroed.
            let end = offset + len;
            let mid_start = offset.div_ceil(min).saturating_mul(min).min(end);
            let mid_end = (end / min * min).max(mid_start);
            for (at, n) in [(offset, mid_start - offset), (mid_end, end - mid_end)] {
                if n > 0 {
                    self.write(node, at, &vec![0u8; n as usize]).await?;
                }
            }
            if mid_end > mid_start {
                let _range = self.ranges.lock(mid_start, mid_end, false).await;
                self.no_payload(CMD_WRITE_ZEROES, flags, mid_start, mid_end - mid_start)
                    .await?;
            }
            Ok(())
        })
    }

    fn discard<'a>(&'a self, _node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_writable()?;
            if !self.info.has(FLAG_SEND_TRIM) {
                return Ok(()); // Discarding nothing is always allowed.
            }
            // Only whole blocks (discarding less is always allowed).
            let min = self.min_block();
            let start = offset.div_ceil(min).saturating_mul(min);
            let end = (offset + len) / min * min;
            if end <= start {
                return Ok(());
            }
            self.no_payload(CMD_TRIM, 0, start, end - start).await
        })
    }

    fn flush<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.read_only || !self.info.has(FLAG_SEND_FLUSH) {
                return Ok(());
            }
            self.call(CMD_FLUSH, 0, 0, 0, None).await?;
            Ok(())
        })
    }

    fn block_status<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(async move {
            let size = self.info.size;
            if offset >= size || len == 0 {
                return Ok((BlockStatus::Zero, len));
            }
            if self.info.base_allocation.is_none() {
                return Ok((BlockStatus::Data, len));
            }
            let min = u64::from(self.info.min_block);
            let ask = len.min(size - offset).min(u64::from(u32::MAX) / min * min);
            match self
                .call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, ask as u32, None)
                .await?
            {
                Reply::Status { len: n, flags } => {
                    let n = u64::from(n).min(ask);
                    if flags & STATE_ZERO != 0 {
                        Ok((BlockStatus::Zero, n))
                    } else {
                        Ok((BlockStatus::Data, n))
                    }
                }
                other => Err(Error::Io(io::Error::other(format!(
                    "NBD block status answered with {other:?}"
                )))),
            }
        })
    }
}
