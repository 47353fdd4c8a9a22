//! The transmission phase: a reader that turns requests into tasks, one
//! task per request (each taking the graph read lock through the export's
//! backend), and one writer that sends the replies.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::proto::*;
use super::{Export, Shared, Stop, Tokens, IN_FLIGHT_BYTES, MAX_IN_FLIGHT, MAX_PAYLOAD};
use crate::graph::runtime::IoTask;
use crate::types::{BlockStatus, Error};

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
    /// The size announced to the client.
    pub(crate) size: u64,
    pub(crate) structured: bool,
    pub(crate) base_allocation: bool,
}

/// One reply, with the budget its request held until it is written.
struct Reply {
    bytes: Vec<u8>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Serves requests until the client disconnects, breaks the protocol or
/// the server stops; then waits for the requests in flight and their
/// replies.
pub(crate) async fn serve<R, W>(
    mut rd: BufReader<R>,
    wr: BufWriter<W>,
    session: Session,
    shared: Arc<Shared>,
    mut stop: Stop,
    tokens: Tokens,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new((IN_FLIGHT_BYTES / UNIT) as usize));
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(wr, rx, stop.clone()));

    loop {
        let mut header = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut header) => r,
            _ = stop.wait() => break,
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
        let permits = tokio::select! {
            p = async {
                let r = requests.clone().acquire_owned().await;
                let b = bytes.clone().acquire_many_owned(cost as u32).await;
                (r, b)
            } => p,
            _ = stop.wait() => break,
        };
        let (Ok(r), Ok(b)) = permits else { break };
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            payload = vec![0u8; req.len as usize];
            let read = tokio::select! {
                r = rd.read_exact(&mut payload) => r,
                _ = stop.wait() => break,
            };
            if read.is_err() {
                break;
            }
        }
        let (session, tx, tokens) = (session.clone(), tx.clone(), tokens.clone());
        shared
            .ctx
            .spawn_on(&shared.handle, move |mut cx| async move {
                // A panicking driver must not leave the client waiting for a
                // reply that never comes: it gets EIO, the server goes on.
                let handled = AssertUnwindSafe(handle(&mut cx, &session, req, payload))
                    .catch_unwind()
                    .await;
                let bytes = handled.unwrap_or_else(|_| {
                    if session.structured && req.kind == CMD_READ {
                        error_chunk(EIO, req.cookie)
                    } else {
                        simple_reply(EIO, req.cookie)
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
}

/// Writes replies in the order they complete; flushes when none is
/// waiting. Gives up on a client that reads nothing for [`STOP_GRACE`]
/// after a stop.
///
/// [`STOP_GRACE`]: super::STOP_GRACE
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    mut stop: Stop,
) {
    while let Some(reply) = rx.recv().await {
        let done = tokio::select! {
            r = async {
                wr.write_all(&reply.bytes).await?;
                if rx.is_empty() {
                    wr.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            } => r.is_ok(),
            _ = stop.wait_then_grace() => false,
        };
        drop(reply);
        if !done {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
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
async fn handle(cx: &mut IoTask, s: &Session, req: Request, payload: Vec<u8>) -> Vec<u8> {
    let fail = |error: u32| {
        if s.structured && req.kind == CMD_READ {
            error_chunk(error, req.cookie)
        } else {
            simple_reply(error, req.cookie)
        }
    };
    let known =
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return fail(EINVAL);
    }
    let blk = &s.export.backend;
    let (offset, len) = (req.offset, u64::from(req.len));
    let in_range = offset.checked_add(len).is_some_and(|end| end <= s.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.export.read_only {
        return fail(EPERM);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result: Result<(), u32> = match req.kind {
        CMD_READ => return read(cx, s, req).await,
        CMD_WRITE if !in_range => Err(ENOSPC),
        CMD_WRITE => blk
            .write(cx, offset, &payload)
            .await
            .map_err(|e| errno(&e, true)),
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
        CMD_BLOCK_STATUS => return block_status(cx, s, req, in_range).await,
        _ => Err(EINVAL),
    };
    let result = match result {
        Ok(()) if fua && writes && len > 0 => blk.flush(cx).await.map_err(|e| errno(&e, true)),
        other => other,
    };
    simple_reply(result.err().unwrap_or(0), req.cookie)
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

async fn read(cx: &mut IoTask, s: &Session, req: Request) -> Vec<u8> {
    let (offset, len) = (req.offset, u64::from(req.len));
    let fail = |error: u32| {
        if s.structured {
            error_chunk(error, req.cookie)
        } else {
            simple_reply(error, req.cookie)
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
            chunk(REPLY_TYPE_NONE, req.cookie, &[])
        } else {
            simple_reply(0, req.cookie)
        };
    }
    // Header and data in one buffer: the reply is written as it is.
    let head = if s.structured {
        CHUNK_LEN + 8
    } else {
        SIMPLE_REPLY_LEN
    };
    let mut out = vec![0u8; head + req.len as usize];
    if let Err(e) = s.export.backend.read(cx, offset, &mut out[head..]).await {
        return fail(errno(&e, false));
    }
    if s.structured {
        chunk_header(
            &mut out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            req.len + 8,
        );
        out[CHUNK_LEN..head].copy_from_slice(&offset.to_be_bytes());
    } else {
        simple_reply_header(&mut out, 0, req.cookie);
    }
    out
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
