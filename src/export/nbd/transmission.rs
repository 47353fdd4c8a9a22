//! The transmission phase: a reader that turns requests into tasks, one
//! task per request (each taking the graph read lock through the export's
//! backend), and one writer that sends the replies.

use std::future::Future;
use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::buffers::{pooled, Buf, BufPool};
use super::proto::*;
use super::{Attached, Export, Shared, Stop, Tokens, IN_FLIGHT_BYTES, MAX_IN_FLIGHT, MAX_PAYLOAD};
use crate::graph::runtime::IoTask;
use crate::types::{BlockStatus, Error, IoBuf};

/// Payload budget unit: a request holds one permit per started 4 KiB.
const UNIT: u64 = 4096;
/// Extents in one block-status reply (the client asks again for the rest).
const MAX_EXTENTS: usize = 1024;
/// Zeroes written per backend request for `WRITE_ZEROES` with `NO_HOLE`.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// What the handshake settled for one connection.
pub(crate) struct Session {
    pub(crate) export: Arc<Export>,
    /// Counts this connection as one of the export's until the session
    /// (held by the connection and its requests) is gone.
    pub(crate) _attached: Attached,
    /// The size announced to the client.
    pub(crate) size: u64,
    pub(crate) structured: bool,
    pub(crate) base_allocation: bool,
}

/// One reply, with the budget its request held until it is written.
struct Reply {
    bytes: ReplyBytes,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// What a reply sends: one buffer, or a read's header and its data in a
/// pooled buffer of their own.
///
/// A read's data gets a buffer of its own (page-aligned, as every
/// [`IoBuf`] is) when it is large enough to be pooled: the backend's
/// `read_buf` moves it down the stack, and on an `O_DIRECT` file the kernel
/// reads into it, where data read behind a header would be copied from
/// the file driver's own memory. The two parts go out in one vectored
/// write.
enum ReplyBytes {
    One(Buf),
    Split { head: Vec<u8>, data: IoBuf },
}

impl ReplyBytes {
    /// The bytes to send, in order (an empty slice is skipped).
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            ReplyBytes::One(buf) => [buf.as_slice(), &[]],
            ReplyBytes::Split { head, data } => [head, data],
        }
    }

    /// Hands the pooled buffer back to `pool`.
    fn give_back(self, pool: &BufPool) {
        match self {
            ReplyBytes::One(buf) => pool.give(buf),
            ReplyBytes::Split { data, .. } => pool.give(Buf::Pooled(data)),
        }
    }
}

impl From<Buf> for ReplyBytes {
    fn from(buf: Buf) -> ReplyBytes {
        ReplyBytes::One(buf)
    }
}

impl From<Vec<u8>> for ReplyBytes {
    fn from(bytes: Vec<u8>) -> ReplyBytes {
        ReplyBytes::One(Buf::Small(bytes))
    }
}

/// Replies the writer sends with one vectored write at most (`IOV_MAX` is
/// 1024; more than [`MAX_IN_FLIGHT`] are never queued anyway).
const MAX_BATCH: usize = MAX_IN_FLIGHT;

/// Capacity of a connection's read buffer: at queue depth 32, 4 KiB writes
/// (a 28-byte header and 4 KiB of payload each) arrive 15 to a system call.
/// A larger payload is read straight into its own buffer once the buffered
/// bytes are used up.
pub(crate) const READ_BUFFER: usize = 64 << 10;

/// Takes `n` permits of `sem` without waiting when it has them (no future,
/// no waker: the common case), else waits; `None` if the semaphore is
/// closed (never: the connection owns it) or the connection stops first.
async fn permits<F: Future<Output = ()>>(
    sem: &Arc<Semaphore>,
    n: u32,
    stopped: Pin<&mut F>,
) -> Option<OwnedSemaphorePermit> {
    match sem.clone().try_acquire_many_owned(n) {
        Ok(p) => return Some(p),
        Err(TryAcquireError::Closed) => return None,
        Err(TryAcquireError::NoPermits) => {}
    }
    tokio::select! {
        biased;
        _ = stopped => None,
        p = sem.clone().acquire_many_owned(n) => p.ok(),
    }
}

/// Serves requests until the client disconnects, breaks the protocol or
/// the server stops; then waits for the requests in flight and their
/// replies.
pub(crate) async fn serve<R, W>(
    mut rd: BufReader<R>,
    mut wr: BufWriter<W>,
    session: Session,
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    stop: Stop,
    tokens: Tokens,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // The handshake flushed its last reply; replies are written straight to
    // the socket from here on (vectored, several per system call), so the
    // writer's buffer has nothing to hold.
    if wr.flush().await.is_err() {
        return;
    }
    let wr = wr.into_inner();
    // A hard removal of the export ends this connection as a stop of its
    // listener would.
    let stop = stop.with_export(session.export.closing.subscribe());
    let session = Arc::new(session);
    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new((IN_FLIGHT_BYTES / UNIT) as usize));
    let pool = BufPool::new();
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(wr, rx, requests.clone(), pool, stop.clone()));
    let mut stop = stop;
    // Pinned once and polled by every `select!` below, rather than a new
    // pair of watch waiters per request.
    let stopped = async move { stop.wait().await };
    tokio::pin!(stopped);

    loop {
        let mut header = [0u8; REQUEST_LEN];
        // The stop first: a client that keeps the socket full must not
        // keep the connection from stopping.
        let read = tokio::select! {
            biased;
            _ = stopped.as_mut() => break,
            r = rd.read_exact(&mut header) => r,
        };
        if read.is_err() {
            break;
        }
        // A wrong magic: the stream is out of step, nothing can be trusted.
        let Some(req) = Request::parse(&header) else {
            break;
        };
        if req.kind == CMD_DISC {
            break;
        }
        if req.kind == CMD_WRITE && req.len > MAX_PAYLOAD {
            // Its payload would have to be read to find the next request.
            break;
        }
        let cost = if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len <= MAX_PAYLOAD {
            u64::from(req.len).div_ceil(UNIT).max(1)
        } else {
            1
        };
        // The bound on memory: wait for replies to go out before reading on.
        let Some(r) = permits(&requests, 1, stopped.as_mut()).await else {
            break;
        };
        let Some(b) = permits(&bytes, cost as u32, stopped.as_mut()).await else {
            break;
        };
        let mut payload = Buf::from(Vec::new());
        if req.kind == CMD_WRITE {
            payload = pool.take(req.len as usize);
            let read = tokio::select! {
                biased;
                _ = stopped.as_mut() => break,
                r = rd.read_exact(payload.as_mut_slice()) => r,
            };
            if read.is_err() {
                break;
            }
        }
        let (session, tx, tokens) = (session.clone(), tx.clone(), tokens.clone());
        shared.ctx.spawn_on(&runtime, move |mut cx| async move {
            // A panicking driver must not leave the client waiting for a
            // reply that never comes: it gets EIO, the server goes on.
            // (The payload goes back to the pool from `handle`, after the
            // write that may have taken it.)
            let handled = AssertUnwindSafe(handle(&mut cx, &session, &pool, req, payload))
                .catch_unwind()
                .await;
            let bytes = handled.unwrap_or_else(|_| {
                if session.structured && req.kind == CMD_READ {
                    error_chunk(EIO, req.cookie).into()
                } else {
                    simple_reply(EIO, req.cookie).into()
                }
            });
            let _ = tx.send(Reply {
                bytes,
                _permits: (r, b),
            });
            drop(tokens);
        });
    }
    // The writer ends once every request task has sent its reply.
    drop(tx);
    let _ = writer.await;
    // The socket closes (the writer dropped its half) before the
    // connection stops counting as the export's.
    drop(rd);
    drop(session);
}

/// Writes replies in the order they complete: whatever has queued up by
/// the time the socket takes more goes out in one vectored write, and each
/// reply's budget is returned once it is written. Gives up on a client
/// that reads nothing for [`STOP_GRACE`] after a stop.
///
/// [`STOP_GRACE`]: super::STOP_GRACE
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    requests: Arc<Semaphore>,
    pool: BufPool,
    mut stop: Stop,
) {
    let grace = async move { stop.wait_then_grace().await };
    tokio::pin!(grace);
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Other requests still in flight (each holds a request permit
        // until its reply is written) may be about to answer: let the
        // tasks that are ready run first and send their replies with
        // these. At queue depth 1 nothing else is in flight and the reply
        // goes out at once.
        let in_flight = MAX_IN_FLIGHT - requests.available_permits();
        if in_flight > batch.len() && batch.len() < MAX_BATCH {
            tokio::task::yield_now().await;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(reply) => batch.push(reply),
                    Err(_) => break,
                }
            }
        }
        let done = tokio::select! {
            biased;
            r = write_batch(&mut wr, &batch) => r.is_ok(),
            _ = grace.as_mut() => false,
        };
        // Written (or given up on): the budget goes back to the reader,
        // the buffers to the pool.
        for reply in batch.drain(..) {
            reply.bytes.give_back(&pool);
        }
        if !done {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// Writes every reply of `batch`, in order, with as few system calls as
/// the socket allows.
async fn write_batch<W: AsyncWrite + Unpin>(wr: &mut W, batch: &[Reply]) -> std::io::Result<()> {
    if let [one] = batch {
        if let [bytes, []] = one.bytes.parts() {
            return wr.write_all(bytes).await;
        }
    }
    // At most two parts per reply: within `IOV_MAX` (1024) for a batch of
    // `MAX_BATCH`.
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(|r| r.bytes.parts())
        .filter(|part| !part.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The protocol's error number for a backend error.
fn errno(e: &Error, write: bool) -> u32 {
    match e {
        Error::OutOfRange { .. } if write => ENOSPC,
        Error::OutOfRange { .. } | Error::Misaligned { .. } | Error::InvalidArgument(_) => EINVAL,
        Error::ReadOnly(_) | Error::PermissionDenied { .. } => EPERM,
        Error::Unsupported { .. } => ENOTSUP,
        Error::ShutDown(_) => ESHUTDOWN,
        Error::Io(io) => match io.raw_os_error() {
            Some(28) => ENOSPC,
            Some(1) | Some(13) | Some(30) => EPERM,
            _ => EIO,
        },
        _ => EIO,
    }
}

/// Runs one request and encodes its reply.
async fn handle(
    cx: &mut IoTask,
    s: &Session,
    pool: &BufPool,
    req: Request,
    payload: Buf,
) -> ReplyBytes {
    let (payload, reply) = handle_request(cx, s, pool, req, payload).await;
    if let Some(payload) = payload {
        pool.give(payload);
    }
    reply
}

/// [`handle`]'s body: the reply, and the payload buffer back when the
/// request did not keep it (a write that failed drops it).
async fn handle_request(
    cx: &mut IoTask,
    s: &Session,
    pool: &BufPool,
    req: Request,
    payload: Buf,
) -> (Option<Buf>, ReplyBytes) {
    let fail = |error: u32| -> ReplyBytes {
        if s.structured && req.kind == CMD_READ {
            error_chunk(error, req.cookie).into()
        } else {
            simple_reply(error, req.cookie).into()
        }
    };
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return (Some(payload), fail(EINVAL));
    }
    let blk = &s.export.backend;
    let (offset, len) = (req.offset, u64::from(req.len));
    let in_range = offset.checked_add(len).is_some_and(|end| end <= s.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.export.read_only {
        return (Some(payload), fail(EPERM));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let mut payload = Some(payload);
    let result: Result<(), u32> = match req.kind {
        CMD_READ => return (payload, read(cx, s, pool, req).await),
        CMD_WRITE if !in_range => Err(ENOSPC),
        // A pooled payload is moved into the write (the file driver hands
        // it to the kernel as it is) and comes back with the result.
        CMD_WRITE => match payload.take() {
            Some(Buf::Pooled(buf)) => match blk.write_buf(cx, offset, buf).await {
                Ok(back) => {
                    payload = Some(Buf::Pooled(back));
                    Ok(())
                }
                Err(e) => Err(errno(&e, true)),
            },
            Some(small) => {
                let written = blk.write(cx, offset, small.as_slice()).await;
                payload = Some(small);
                written.map_err(|e| errno(&e, true))
            }
            None => Err(EINVAL),
        },
        CMD_FLUSH => blk.flush(cx).await.map_err(|e| errno(&e, false)),
        CMD_TRIM if !in_range => Err(EINVAL),
        // Trimming is advisory: a device that cannot discard just keeps
        // the data.
        CMD_TRIM => match blk.discard(cx, offset, len).await {
            Ok(()) | Err(Error::Unsupported { .. }) => Ok(()),
            Err(e) => Err(errno(&e, true)),
        },
        CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
        // The backend cannot promise that zeroing is fast: refuse, as the
        // protocol allows, and the client writes zeroes itself if it wants.
        CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 => Err(ENOTSUP),
        CMD_WRITE_ZEROES if req.flags & CMD_FLAG_NO_HOLE != 0 => {
            write_zero_buffers(cx, s, offset, len).await
        }
        CMD_WRITE_ZEROES => blk
            .write_zeroes(cx, offset, len)
            .await
            .map_err(|e| errno(&e, true)),
        CMD_BLOCK_STATUS => return (payload, block_status(cx, s, req, in_range).await.into()),
        _ => Err(EINVAL),
    };
    let result = match result {
        Ok(()) if fua && writes && len > 0 => blk.flush(cx).await.map_err(|e| errno(&e, true)),
        other => other,
    };
    (
        payload,
        simple_reply(result.err().unwrap_or(0), req.cookie).into(),
    )
}

/// `WRITE_ZEROES` with `NO_HOLE`: zeroes written as data, so the range
/// stays allocated.
async fn write_zero_buffers(
    cx: &mut IoTask,
    s: &Session,
    offset: u64,
    len: u64,
) -> Result<(), u32> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64);
        s.export
            .backend
            .write(cx, offset + done, &ZEROES[..n as usize])
            .await
            .map_err(|e| errno(&e, true))?;
        done += n;
    }
    Ok(())
}

async fn read(cx: &mut IoTask, s: &Session, pool: &BufPool, req: Request) -> ReplyBytes {
    let (offset, len) = (req.offset, u64::from(req.len));
    let fail = |error: u32| -> ReplyBytes {
        if s.structured {
            error_chunk(error, req.cookie).into()
        } else {
            simple_reply(error, req.cookie).into()
        }
    };
    if req.len > MAX_PAYLOAD {
        return fail(if s.structured { EOVERFLOW } else { EINVAL });
    }
    if offset.checked_add(len).is_none_or(|end| end > s.size) {
        return fail(EINVAL);
    }
    if len == 0 {
        return if s.structured {
            chunk(REPLY_TYPE_NONE, req.cookie, &[]).into()
        } else {
            simple_reply(0, req.cookie).into()
        };
    }
    let head = if s.structured {
        CHUNK_LEN + 8
    } else {
        SIMPLE_REPLY_LEN
    };
    // The header in front of the data it announces.
    let write_header = |out: &mut [u8]| {
        if s.structured {
            chunk_header(
                out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                req.len + 8,
            );
            out[CHUNK_LEN..head].copy_from_slice(&offset.to_be_bytes());
        } else {
            simple_reply_header(out, 0, req.cookie);
        }
    };
    // The data in a pooled buffer of its own, moved down the stack (see
    // `ReplyBytes`); the header apart.
    if pooled(req.len as usize) {
        if let Buf::Pooled(data) = pool.take(req.len as usize) {
            return match s.export.backend.read_buf(cx, offset, data).await {
                Ok(data) => {
                    let mut header = vec![0; head];
                    write_header(&mut header);
                    ReplyBytes::Split { head: header, data }
                }
                // The buffer went with the failed request.
                Err(e) => fail(errno(&e, false)),
            };
        }
    }
    // Small: header and data in one buffer, written as it is.
    let mut buf = pool.take(head + req.len as usize);
    let out = buf.as_mut_slice();
    if let Err(e) = s.export.backend.read(cx, offset, &mut out[head..]).await {
        pool.give(buf);
        return fail(errno(&e, false));
    }
    write_header(out);
    buf.into()
}

/// `base:allocation` extents: [`BlockStatus::Data`] is allocated data,
/// [`BlockStatus::Zero`] and [`BlockStatus::Unallocated`] read as zeroes
/// and are reported as holes (`HOLE | ZERO`), as QEMU does for zero
/// clusters.
async fn block_status(cx: &mut IoTask, s: &Session, req: Request, in_range: bool) -> Vec<u8> {
    let fail = |error| simple_reply(error, req.cookie);
    if !s.base_allocation || req.len == 0 || !in_range {
        return fail(EINVAL);
    }
    let end = req.offset + u64::from(req.len);
    let mut at = req.offset;
    let mut extents: Vec<(u32, u32)> = Vec::new();
    while at < end && extents.len() < MAX_EXTENTS {
        let (status, n) = match s.export.backend.block_status(cx, at, end - at).await {
            Ok(answer) => answer,
            Err(e) => return fail(errno(&e, false)),
        };
        let flags = match status {
            BlockStatus::Data => 0,
            _ => STATE_HOLE | STATE_ZERO,
        };
        let n = n.min(end - at);
        match extents.last_mut() {
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ => extents.push((n as u32, flags)),
        }
        at += n;
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            break;
        }
    }
    let mut payload = Vec::with_capacity(4 + extents.len() * 8);
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, flags) in extents {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    chunk(REPLY_TYPE_BLOCK_STATUS, req.cookie, &payload)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::task::{Context, Poll};

    use super::*;

    /// A socket that takes at most 7 bytes per write, vectored or not, so
    /// that every write of a batch ends inside a reply's part.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(7 - n);
                self.0.extend_from_slice(&buf[..take]);
                n += take;
                if n == 7 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Replies with a header and a data buffer of their own go out whole
    /// and in order, beside one-buffer replies, however little the socket
    /// takes per call; so does a split reply alone.
    #[test]
    fn split_and_whole_replies_go_out_in_order_whatever_the_socket_takes() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let budget = Arc::new(Semaphore::new(16));
        let reply = |bytes: ReplyBytes| Reply {
            bytes,
            _permits: (
                budget.clone().try_acquire_owned().unwrap(),
                budget.clone().try_acquire_owned().unwrap(),
            ),
        };
        let split = |head: &[u8], data: &[u8]| ReplyBytes::Split {
            head: head.to_vec(),
            data: IoBuf::copy_from(data),
        };
        let big: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let batch = [
            reply(split(b"head one", b"the first data")),
            reply(vec![1, 2, 3].into()),
            reply(split(b"h2", &big)),
            reply(split(b"third header", b"x")),
        ];
        let mut want = b"head onethe first data".to_vec();
        want.extend_from_slice(&[1, 2, 3]);
        want.extend_from_slice(b"h2");
        want.extend_from_slice(&big);
        want.extend_from_slice(b"third headerx");
        let mut socket = Trickle(Vec::new());
        runtime.block_on(write_batch(&mut socket, &batch)).unwrap();
        assert!(socket.0 == want, "the batch arrives whole and in order");

        let alone = [reply(split(b"alone", &big))];
        let mut socket = Trickle(Vec::new());
        runtime.block_on(write_batch(&mut socket, &alone)).unwrap();
        assert!(socket.0[..5] == *b"alone" && socket.0[5..] == big[..]);
    }
}
