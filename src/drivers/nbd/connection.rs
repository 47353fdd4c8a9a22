//! The connection task: one per node, on the client runtime thread. It
//! owns the socket, sends the requests the driver queues, matches replies
//! to them by handle, and reconnects when the connection is lost.
//!
//! A request is a [`Command`] sent over an unbounded channel with a
//! oneshot for its reply; the payload of a write is copied into the
//! command (and a read's data comes back in a buffer of its own), so
//! nothing the task touches borrows from the caller: a request the caller
//! drops (cancels) leaves no dangling buffer behind, and the task never
//! needs `unsafe`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::handshake::{connect, violation, ExportInfo, Stream};
use super::options::NbdOptions;
use crate::nbd::proto::*;

/// Largest block-status reply chunk read (4 KiB descriptors of 8 bytes,
/// plus the context id); a longer one breaks the protocol as far as we
/// are concerned (we ask for one descriptor).
const MAX_STATUS_CHUNK: u32 = 4 + 8 * 4096;
/// Largest error chunk read (the message is at most 4 KiB).
const MAX_ERROR_CHUNK: u32 = 6 + 4096 + 8;

/// What a request gets back.
#[derive(Debug)]
pub(super) enum Reply {
    /// Done (writes, flush, trim, zeroes).
    Done,
    /// A read's data, exactly as long as asked.
    Data(Vec<u8>),
    /// The first `base:allocation` extent: its length and flags.
    Status { len: u32, flags: u32 },
}

/// One request for the connection task.
pub(super) struct Command {
    pub(super) kind: u16,
    pub(super) flags: u16,
    pub(super) offset: u64,
    pub(super) len: u32,
    /// A write's data (shared, so a resend needs no copy).
    pub(super) payload: Option<Arc<[u8]>>,
    pub(super) reply: oneshot::Sender<io::Result<Reply>>,
}

/// What the driver can see of the connection.
#[derive(Debug, Default)]
pub(super) struct Status {
    pub(super) connected: AtomicBool,
    pub(super) reconnects: AtomicU64,
}

/// A request sent and not yet answered in full.
struct Pending {
    cmd: Command,
    sent: Instant,
    /// A read's data so far.
    buf: Vec<u8>,
    /// Bytes of a read covered by data or hole chunks.
    covered: u64,
    error: Option<io::Error>,
    status: Option<(u32, u32)>,
    /// The reader is reading a chunk for it (the reader's own timeout
    /// covers it then, not the watchdog's).
    reading: bool,
}

impl Pending {
    fn new(cmd: Command) -> Pending {
        let buf = if cmd.kind == CMD_READ {
            vec![0u8; cmd.len as usize]
        } else {
            Vec::new()
        };
        Pending {
            cmd,
            sent: Instant::now(),
            buf,
            covered: 0,
            error: None,
            status: None,
            reading: false,
        }
    }

    fn complete(self, result: io::Result<Reply>) {
        // The caller may have given up (dropped its request); nobody to tell.
        let _ = self.cmd.reply.send(result);
    }

    /// The final answer, once the server said `DONE`.
    fn finish(mut self) {
        let result = if let Some(e) = self.error.take() {
            Err(e)
        } else {
            match self.cmd.kind {
                CMD_READ if self.covered != u64::from(self.cmd.len) => Err(violation(format!(
                    "the server's reply to a {}-byte read covered {} bytes",
                    self.cmd.len, self.covered
                ))),
                CMD_READ => Ok(Reply::Data(std::mem::take(&mut self.buf))),
                CMD_BLOCK_STATUS => match self.status {
                    Some((len, flags)) => Ok(Reply::Status { len, flags }),
                    None => Err(violation("block status reply without an extent")),
                },
                _ => Ok(Reply::Done),
            }
        };
        self.complete(result);
    }
}

/// An error the server reported for a request (an errno of the protocol).
pub(super) fn server_error(errno: u32, message: &str) -> io::Error {
    let name = match errno {
        EPERM => "EPERM",
        EIO => "EIO",
        12 => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    };
    let kind = match errno {
        EPERM => io::ErrorKind::PermissionDenied,
        EINVAL | EOVERFLOW => io::ErrorKind::InvalidInput,
        ENOTSUP => io::ErrorKind::Unsupported,
        ENOSPC => io::ErrorKind::StorageFull,
        _ => io::ErrorKind::Other,
    };
    if message.is_empty() {
        io::Error::new(kind, format!("the server answered {name} ({errno})"))
    } else {
        io::Error::new(
            kind,
            format!("the server answered {name} ({errno}): {message}"),
        )
    }
}

/// Connects, then hands `info` (or the error) to `ready` and, if it
/// connected, serves the node's requests until the driver is dropped.
pub(super) async fn run(
    opts: NbdOptions,
    rx: mpsc::UnboundedReceiver<Command>,
    status: Arc<Status>,
    ready: oneshot::Sender<io::Result<ExportInfo>>,
) {
    match connect(&opts).await {
        Ok((stream, info)) => {
            if ready.send(Ok(info)).is_ok() {
                supervise(opts, stream, info, rx, status).await;
            }
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// Why a session ended.
enum End {
    /// The driver is gone.
    Closed,
    /// The connection is lost, for this reason.
    Lost(io::Error),
}

async fn supervise(
    opts: NbdOptions,
    first: Stream,
    first_info: ExportInfo,
    mut rx: mpsc::UnboundedReceiver<Command>,
    status: Arc<Status>,
) {
    let mut queue: VecDeque<Command> = VecDeque::new();
    let mut next_cookie = 1u64;
    let mut stream = first;
    let mut info = first_info;
    loop {
        status.connected.store(true, Ordering::SeqCst);
        let end = session(stream, &info, &opts, &mut rx, &mut queue, &mut next_cookie).await;
        status.connected.store(false, Ordering::SeqCst);
        let reason = match end {
            End::Closed => return,
            End::Lost(e) => e,
        };
        let lost = |extra: &str| {
            io::Error::new(reason.kind(), format!("connection lost ({reason}){extra}"))
        };
        let delay = opts.reconnect_delay;
        // A delay too long for the clock is as good as forever.
        let deadline = Instant::now()
            .checked_add(delay)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86400));
        let mut attempt = pin!(reconnect(&opts, &first_info));
        loop {
            if Instant::now() >= deadline {
                let why = if delay.is_zero() {
                    String::new()
                } else {
                    format!("; not back within the reconnect delay of {delay:?}")
                };
                for cmd in queue.drain(..) {
                    let _ = cmd.reply.send(Err(lost(&why)));
                }
            }
            let waiting = !queue.is_empty();
            tokio::select! {
                r = &mut attempt => match r {
                    Ok((s, i)) => {
                        stream = s;
                        info = i;
                        break;
                    }
                    Err(e) => {
                        // Given up for good: everything fails from now on.
                        let msg = format!(
                            "connection lost ({reason}); gave up reconnecting after {} attempts: {e}",
                            opts.reconnect_attempts.unwrap_or(0)
                        );
                        for cmd in queue.drain(..) {
                            let _ = cmd.reply.send(Err(io::Error::new(e.kind(), msg.clone())));
                        }
                        while let Some(cmd) = rx.recv().await {
                            let _ = cmd.reply.send(Err(io::Error::new(e.kind(), msg.clone())));
                        }
                        return;
                    }
                },
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(cmd) if Instant::now() >= deadline => {
                        let _ = cmd.reply.send(Err(lost("; not reconnected yet")));
                    }
                    Some(cmd) => queue.push_back(cmd),
                },
                _ = tokio::time::sleep_until(deadline), if waiting => {}
            }
        }
        status.reconnects.fetch_add(1, Ordering::SeqCst);
    }
}

/// Connects again, every `reconnect_interval`, until it succeeds or the
/// attempts run out. The export must look the same as before (size,
/// block sizes, writability), or the attempt counts as failed.
async fn reconnect(opts: &NbdOptions, old: &ExportInfo) -> io::Result<(Stream, ExportInfo)> {
    let mut attempts = 0u32;
    loop {
        let err = match connect(opts).await {
            Ok((s, new)) => {
                let writable = |i: &ExportInfo| !i.has(FLAG_READ_ONLY);
                if new.size != old.size
                    || new.min_block > old.min_block
                    || new.max_payload < old.max_payload
                    || (writable(old) && !writable(&new))
                    || new.structured != old.structured
                {
                    violation(format!(
                        "the export changed across the reconnect ({} bytes, flags {:#x} -> {} bytes, flags {:#x})",
                        old.size, old.flags, new.size, new.flags
                    ))
                } else {
                    return Ok((s, new));
                }
            }
            Err(e) => e,
        };
        attempts += 1;
        if opts.reconnect_attempts.is_some_and(|max| attempts >= max) {
            return Err(err);
        }
        tokio::time::sleep(opts.reconnect_interval).await;
    }
}

/// A failed read of a reply: the error and, if the server broke the
/// protocol over one request, that request's handle (it fails with the
/// error instead of being resent).
struct Failure {
    error: io::Error,
    blame: Option<u64>,
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Failure {
        Failure { error, blame: None }
    }
}

/// One connection's life: sends queued and new requests, reads replies,
/// watches for a server that stopped answering. On the way out, requests
/// still unanswered go back to the front of `queue`, in order.
///
/// A request stays in the map of requests in flight until its reply is
/// complete (the reader only borrows its read buffer while a chunk's data
/// comes in), so whichever of the three loops ends the session, every
/// unanswered request is found in the map and resent or failed, never
/// dropped.
async fn session(
    stream: Stream,
    info: &ExportInfo,
    opts: &NbdOptions,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    queue: &mut VecDeque<Command>,
    next_cookie: &mut u64,
) -> End {
    let (rd, wr) = stream.split();
    // Buffered: a reply's header, offset and data are three reads, which
    // should not be three system calls each.
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let inflight: Mutex<HashMap<u64, Pending>> = Mutex::new(HashMap::new());
    let timeout = opts.request_timeout;

    let writer = async {
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        loop {
            let cmd = match queue.pop_front() {
                Some(cmd) => cmd,
                None => match rx.recv().await {
                    Some(cmd) => cmd,
                    None => {
                        // The driver is gone: say goodbye (best effort).
                        let disc = Request {
                            flags: 0,
                            kind: CMD_DISC,
                            cookie: 0,
                            offset: 0,
                            len: 0,
                        };
                        let _ = wr.write_all(&disc.encode()).await;
                        let _ = wr.flush().await;
                        return End::Closed;
                    }
                },
            };
            if cmd.reply.is_closed() {
                continue; // Cancelled before it was sent.
            }
            let cookie = *next_cookie;
            *next_cookie += 1;
            let header = Request {
                flags: cmd.flags,
                kind: cmd.kind,
                cookie,
                offset: cmd.offset,
                len: cmd.len,
            }
            .encode();
            let payload = cmd.payload.clone();
            lock(&inflight).insert(cookie, Pending::new(cmd));
            let sent = async {
                wr.write_all(&header).await?;
                if let Some(p) = &payload {
                    wr.write_all(p).await?;
                }
                if queue.is_empty() {
                    match rx.try_recv() {
                        Ok(next) => queue.push_back(next),
                        Err(_) => wr.flush().await?,
                    }
                }
                io::Result::Ok(())
            };
            if let Err(e) = sent.await {
                return End::Lost(e);
            }
        }
    };

    let mut blame = None;
    let reader = async {
        loop {
            if let Err(f) = read_reply(&mut rd, info, &inflight, timeout).await {
                blame = f.blame;
                return End::Lost(f.error);
            }
        }
    };

    let watchdog = async {
        if timeout.is_zero() {
            return std::future::pending().await; // No timeout.
        }
        let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            let oldest = lock(&inflight)
                .values()
                .filter(|p| !p.reading)
                .map(|p| p.sent)
                .min();
            if oldest.is_some_and(|t| t.elapsed() > timeout) {
                return End::Lost(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the server did not answer a request within {timeout:?}"),
                ));
            }
        }
    };

    let end = tokio::select! {
        end = writer => end,
        end = reader => end,
        end = watchdog => end,
    };

    let mut left: Vec<(u64, Pending)> = lock(&inflight).drain().collect();
    if let Some(cookie) = blame {
        if let Some(i) = left.iter().position(|(c, _)| *c == cookie) {
            let (_, p) = left.swap_remove(i);
            let msg = match &end {
                End::Lost(e) => e.to_string(),
                End::Closed => "connection closed".to_owned(),
            };
            p.complete(Err(violation(msg)));
        }
    }
    left.sort_by_key(|(cookie, p)| (p.sent, *cookie));
    for (_, p) in left.into_iter().rev() {
        queue.push_front(p.cmd);
    }
    end
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned map is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` within `timeout` (a stalled server in the middle of a reply).
/// A read the buffer already holds completes on its first poll, without
/// arming a timer.
async fn timed<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let mut f = pin!(f);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(r) = first {
        return r;
    }
    if timeout.is_zero() {
        return f.await; // No timeout.
    }
    tokio::time::timeout(timeout, f).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the server stopped in the middle of a reply for {timeout:?}"),
        ))
    })
}

/// What the reader needs of a request while its reply comes in.
struct Target {
    kind: u16,
    offset: u64,
    len: u32,
    /// A read's buffer, borrowed from the request until the chunk is in.
    buf: Vec<u8>,
}

/// What one chunk adds to its request.
#[derive(Default)]
struct Update {
    covered: u64,
    error: Option<io::Error>,
    status: Option<(u32, u32)>,
}

/// Reads one reply (a simple reply or one structured chunk) and hands it
/// to its request.
async fn read_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    info: &ExportInfo,
    inflight: &Mutex<HashMap<u64, Pending>>,
    timeout: Duration,
) -> Result<(), Failure> {
    let magic = rd.read_u32().await?;
    // Looks the request up and borrows its read buffer.
    let target = |cookie: u64, want_buf: bool| -> Result<Target, Failure> {
        let mut map = lock(inflight);
        let p = map.get_mut(&cookie).ok_or_else(|| {
            violation(format!(
                "the server replied to handle {cookie:#x}, which has no request in flight"
            ))
        })?;
        p.reading = true;
        Ok(Target {
            kind: p.cmd.kind,
            offset: p.cmd.offset,
            len: p.cmd.len,
            buf: if want_buf {
                std::mem::take(&mut p.buf)
            } else {
                Vec::new()
            },
        })
    };
    // Gives the buffer back, applies the update, finishes when `done`.
    let update = |cookie: u64, t: Target, u: Update, done: bool| {
        let mut map = lock(inflight);
        let Some(p) = map.get_mut(&cookie) else {
            return;
        };
        if p.kind_is_read() && p.buf.is_empty() {
            p.buf = t.buf;
        }
        p.reading = false;
        p.covered += u.covered;
        if p.error.is_none() {
            p.error = u.error;
        }
        if p.status.is_none() {
            p.status = u.status;
        }
        if done {
            if let Some(p) = map.remove(&cookie) {
                drop(map);
                p.finish();
            }
        }
    };
    let blame = |cookie: u64, error: io::Error| Failure {
        error,
        blame: Some(cookie),
    };
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let mut b = [0u8; 12];
            timed(timeout, rd.read_exact(&mut b)).await?;
            let error = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
            let cookie = u64::from_be_bytes(b[4..12].try_into().expect("8 bytes"));
            let mut t = target(cookie, error == 0 && !info.structured)?;
            if error != 0 {
                let u = Update {
                    error: Some(server_error(error, "")),
                    ..Update::default()
                };
                update(cookie, t, u, true);
                return Ok(());
            }
            match t.kind {
                CMD_READ if info.structured => Err(blame(
                    cookie,
                    violation(
                        "a simple reply with data to a read, after structured replies were agreed",
                    ),
                )),
                CMD_READ => {
                    timed(timeout, rd.read_exact(&mut t.buf)).await?;
                    let u = Update {
                        covered: u64::from(t.len),
                        ..Update::default()
                    };
                    update(cookie, t, u, true);
                    Ok(())
                }
                CMD_BLOCK_STATUS => Err(blame(
                    cookie,
                    violation("a simple reply to a block status request"),
                )),
                _ => {
                    update(cookie, t, Update::default(), true);
                    Ok(())
                }
            }
        }
        STRUCTURED_REPLY_MAGIC if info.structured => {
            let mut b = [0u8; 16];
            timed(timeout, rd.read_exact(&mut b)).await?;
            let h = ChunkHeader::parse(&b);
            let is_data = matches!(h.kind, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE);
            let mut t = target(h.cookie, is_data)?;
            match chunk(rd, info, &mut t, &h, timeout).await {
                Ok(u) => {
                    update(h.cookie, t, u, h.flags & REPLY_FLAG_DONE != 0);
                    Ok(())
                }
                Err((error, true)) => {
                    update(h.cookie, t, Update::default(), false);
                    Err(blame(h.cookie, error))
                }
                Err((error, false)) => Err(error.into()),
            }
        }
        STRUCTURED_REPLY_MAGIC => Err(violation("a structured reply, which was not agreed").into()),
        m => Err(violation(format!("bad reply magic {m:#010x}")).into()),
    }
}

impl Pending {
    fn kind_is_read(&self) -> bool {
        self.cmd.kind == CMD_READ
    }
}

/// Reads one structured chunk's payload for its request. `Err((e,
/// true))`: the server broke the protocol (the request fails); `Err((e,
/// false))`: the socket failed (the request is resent).
async fn chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    info: &ExportInfo,
    t: &mut Target,
    h: &ChunkHeader,
    timeout: Duration,
) -> Result<Update, (io::Error, bool)> {
    let bad = |what: String| Err((violation(what), true));
    let io = |e: io::Error| (e, false);
    let (start, len) = (t.offset, u64::from(t.len));
    let is_read = t.kind == CMD_READ;
    let mut u = Update::default();
    match h.kind {
        REPLY_TYPE_NONE => {
            if h.len != 0 || h.flags & REPLY_FLAG_DONE == 0 {
                return bad("a NONE chunk with a payload or without DONE".into());
            }
        }
        REPLY_TYPE_OFFSET_DATA if is_read => {
            if h.len < 8 || u64::from(h.len - 8) > len {
                return bad(format!(
                    "a data chunk of {} bytes for a {len}-byte read (longer than asked)",
                    h.len
                ));
            }
            let offset = timed(timeout, rd.read_u64()).await.map_err(io)?;
            let n = u64::from(h.len - 8);
            let Some(at) = offset
                .checked_sub(start)
                .filter(|at| at.checked_add(n).is_some_and(|end| end <= len))
            else {
                return bad(format!(
                    "a data chunk at {offset}+{n} outside the read at {start}+{len}"
                ));
            };
            let (at, n) = (at as usize, n as usize);
            if t.buf.len() != len as usize {
                return bad("a second reply to a read still being answered".into());
            }
            timed(timeout, rd.read_exact(&mut t.buf[at..at + n]))
                .await
                .map_err(io)?;
            u.covered = n as u64;
        }
        REPLY_TYPE_OFFSET_HOLE if is_read => {
            if h.len != 12 {
                return bad(format!("a hole chunk of {} bytes (12 expected)", h.len));
            }
            let mut b = [0u8; 12];
            timed(timeout, rd.read_exact(&mut b)).await.map_err(io)?;
            let offset = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
            let n = u64::from(u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")));
            let Some(at) = offset
                .checked_sub(start)
                .filter(|at| n > 0 && at.checked_add(n).is_some_and(|end| end <= len))
            else {
                return bad(format!(
                    "a hole chunk at {offset}+{n} outside the read at {start}+{len}"
                ));
            };
            if t.buf.len() != len as usize {
                return bad("a second reply to a read still being answered".into());
            }
            t.buf[at as usize..(at + n) as usize].fill(0);
            u.covered = n;
        }
        REPLY_TYPE_BLOCK_STATUS if t.kind == CMD_BLOCK_STATUS => {
            if h.len < 12 || (h.len - 4) % 8 != 0 || h.len > MAX_STATUS_CHUNK {
                return bad(format!("a block status chunk of {} bytes", h.len));
            }
            let mut b = vec![0u8; h.len as usize];
            timed(timeout, rd.read_exact(&mut b)).await.map_err(io)?;
            let id = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
            if Some(id) != info.base_allocation {
                return bad(format!(
                    "block status for context {id}, which was not agreed"
                ));
            }
            let ext_len = u32::from_be_bytes(b[4..8].try_into().expect("4 bytes"));
            let flags = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
            if ext_len == 0 {
                return bad("a block status extent of length 0".into());
            }
            u.status = Some((ext_len, flags));
        }
        kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
            if h.len < 6 || h.len > MAX_ERROR_CHUNK {
                return bad(format!("an error chunk of {} bytes", h.len));
            }
            let mut b = vec![0u8; h.len as usize];
            timed(timeout, rd.read_exact(&mut b)).await.map_err(io)?;
            let errno = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
            let msg_len = usize::from(u16::from_be_bytes([b[4], b[5]]));
            let msg = b
                .get(6..6 + msg_len)
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            if errno == 0 {
                return bad("an error chunk with error 0".into());
            }
            u.error = Some(server_error(errno, &msg));
        }
        kind => {
            return bad(format!(
                "a reply chunk of type {kind} for a request of type {}",
                t.kind
            ))
        }
    }
    Ok(u)
}
