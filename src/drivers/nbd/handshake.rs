//! Connecting and the client's side of the fixed newstyle handshake:
//! `STRUCTURED_REPLY`, `SET_META_CONTEXT base:allocation`, then `GO` (or
//! `EXPORT_NAME` when the server does not know `GO`).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::options::{NbdAddress, NbdOptions};
use crate::nbd::proto::*;

/// Largest option reply payload read whole; larger ones end the handshake
/// (the largest reply we ask for, an `INFO` of the name or description,
/// is limited to 4 KiB by the protocol).
const MAX_REPLY_DATA: u32 = 64 << 10;
/// Option replies accepted for one option (a server that keeps sending
/// `NBD_REP_INFO` forever is cut off).
const MAX_REPLIES: u32 = 1024;
/// The protocol's default maximum payload when the server sends no
/// `NBD_INFO_BLOCK_SIZE` (32 MiB).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExportInfo {
    pub(super) size: u64,
    pub(super) flags: u16,
    /// Minimum block size (power of two, at least 1).
    pub(super) min_block: u32,
    /// Largest read or write payload (a multiple of `min_block`).
    pub(super) max_payload: u32,
    pub(super) structured: bool,
    /// The id the server gave `base:allocation`, if it agreed to it.
    pub(super) base_allocation: Option<u32>,
}

impl ExportInfo {
    pub(super) fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A connected socket, either kind.
pub(super) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

pub(super) type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
pub(super) type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

impl Stream {
    pub(super) fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// A handshake failure: what went wrong, for the error the caller sees.
pub(super) fn violation(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Connects and negotiates, within `opts.connect_timeout`.
pub(super) async fn connect(opts: &NbdOptions) -> io::Result<(Stream, ExportInfo)> {
    match tokio::time::timeout(opts.connect_timeout, connect_inner(opts)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no connection and handshake within {:?}",
                opts.connect_timeout
            ),
        )),
    }
}

async fn connect_inner(opts: &NbdOptions) -> io::Result<(Stream, ExportInfo)> {
    match &opts.address {
        NbdAddress::Unix(path) => {
            let mut s = UnixStream::connect(path).await?;
            let info = negotiate(&mut s, &opts.export).await?;
            Ok((Stream::Unix(s), info))
        }
        NbdAddress::Tcp { host, port } => {
            let mut s = TcpStream::connect((host.as_str(), *port)).await?;
            let info = negotiate(&mut s, &opts.export).await?;
            Ok((Stream::Tcp(s), info))
        }
    }
}

/// Runs the handshake on a connected socket.
pub(super) async fn negotiate<S>(s: &mut S, export: &str) -> io::Result<ExportInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if export.len() > 4096 {
        return Err(violation("export name longer than 4096 bytes"));
    }
    let magic = s.read_u64().await?;
    if magic != INIT_MAGIC {
        return Err(violation(format!(
            "not an NBD server (greeting {magic:#018x})"
        )));
    }
    let second = s.read_u64().await?;
    if second != OPT_MAGIC {
        return Err(violation(
            "the server speaks only the oldstyle handshake, which is not supported",
        ));
    }
    let server_flags = s.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(violation("the server does not speak fixed newstyle"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_u32(client_flags).await?;

    // Structured replies, then base:allocation.
    let structured = simple_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let mut base_allocation = None;
    if structured {
        send_option(
            s,
            OPT_SET_META_CONTEXT,
            &meta_request(export, &[BASE_ALLOCATION]),
        )
        .await?;
        for _ in 0..MAX_REPLIES {
            let (reply, data) = read_reply(s, OPT_SET_META_CONTEXT).await?;
            match reply.kind {
                REP_META_CONTEXT => {
                    if data.len() >= 4 && &data[4..] == BASE_ALLOCATION.as_bytes() {
                        base_allocation =
                            Some(u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")));
                    }
                }
                REP_ACK => break,
                _ if reply.is_error() => break,
                k => return Err(violation(format!("unexpected meta context reply {k}"))),
            }
        }
    }

    // GO, asking for block sizes.
    send_option(s, OPT_GO, &info_request(export, &[INFO_BLOCK_SIZE])).await?;
    let mut size_flags = None;
    let mut sizes = None;
    for _ in 0..MAX_REPLIES {
        let (reply, data) = read_reply(s, OPT_GO).await?;
        match reply.kind {
            REP_INFO => {
                if data.len() < 2 {
                    return Err(violation("short NBD_REP_INFO"));
                }
                match u16::from_be_bytes([data[0], data[1]]) {
                    INFO_EXPORT if data.len() == 12 => {
                        size_flags = Some((
                            u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
                            u16::from_be_bytes([data[10], data[11]]),
                        ));
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        let word = |i: usize| {
                            u32::from_be_bytes(data[i..i + 4].try_into().expect("4 bytes"))
                        };
                        sizes = Some((word(2), word(10)));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(violation("NBD_REP_INFO of the wrong length"))
                    }
                    _ => {} // Information we did not ask for: ignored.
                }
            }
            REP_ACK => {
                let (size, flags) = size_flags
                    .ok_or_else(|| violation("GO acknowledged without NBD_INFO_EXPORT"))?;
                let (min_block, max_payload) = block_sizes(sizes)?;
                return Ok(ExportInfo {
                    size,
                    flags,
                    min_block,
                    max_payload,
                    structured,
                    base_allocation,
                });
            }
            REP_ERR_UNSUP => {
                // An old server: EXPORT_NAME, which cannot say no but by
                // hanging up.
                send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
                let size = s.read_u64().await?;
                let flags = s.read_u16().await?;
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    s.read_exact(&mut zeroes).await?;
                }
                let (min_block, max_payload) = block_sizes(None)?;
                return Ok(ExportInfo {
                    size,
                    flags,
                    min_block,
                    max_payload,
                    structured,
                    base_allocation,
                });
            }
            kind if reply.is_error() => {
                let msg = String::from_utf8_lossy(&data);
                let what = match kind {
                    REP_ERR_UNKNOWN => "no such export",
                    REP_ERR_SHUTDOWN => "the server is shutting down",
                    _ => "export refused",
                };
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{what} '{export}' (server said: {msg})"),
                ));
            }
            k => return Err(violation(format!("unexpected GO reply {k}"))),
        }
    }
    Err(violation("too many option replies"))
}

/// Checks the server's block sizes: minimum a power of two up to 64 KiB,
/// maximum payload a multiple of it (rounded down), at least 1 block and
/// at most 32 MiB... or what the server says above that, capped at 32 MiB
/// so one request never makes us allocate more.
fn block_sizes(sizes: Option<(u32, u32)>) -> io::Result<(u32, u32)> {
    let (min, max) = sizes.unwrap_or((1, DEFAULT_MAX_PAYLOAD));
    if !min.is_power_of_two() || min > 64 << 10 {
        return Err(violation(format!("bad minimum block size {min}")));
    }
    let max = max.min(DEFAULT_MAX_PAYLOAD) / min * min;
    if max == 0 {
        return Err(violation("maximum block size below the minimum"));
    }
    Ok((min, max))
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&option_request(option, data)).await?;
    s.flush().await
}

/// Sends an option without data and reads its one reply: `true` on ACK,
/// `false` on an error reply.
async fn simple_option<S>(s: &mut S, option: u32, data: &[u8]) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, option, data).await?;
    let (reply, _) = read_reply(s, option).await?;
    match reply.kind {
        REP_ACK => Ok(true),
        _ if reply.is_error() => Ok(false),
        k => Err(violation(format!(
            "unexpected reply {k} to option {option}"
        ))),
    }
}

/// Reads one option reply (header and bounded data) for `option`.
async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> io::Result<(OptionReply, Vec<u8>)> {
    let mut head = [0u8; OPTION_REPLY_LEN];
    s.read_exact(&mut head).await?;
    let reply = OptionReply::parse(&head).ok_or_else(|| violation("bad option reply magic"))?;
    if reply.option != option {
        return Err(violation(format!(
            "reply for option {} while waiting for {option}",
            reply.option
        )));
    }
    if reply.len > MAX_REPLY_DATA {
        return Err(violation(format!(
            "option reply of {} bytes (at most {MAX_REPLY_DATA})",
            reply.len
        )));
    }
    let mut data = vec![0u8; reply.len as usize];
    s.read_exact(&mut data).await?;
    Ok((reply, data))
}

#[cfg(test)]
mod tests {
    use crate::drivers::nbd::handshake::block_sizes;

    #[test]
    fn block_sizes_are_checked() {
        assert_eq!(block_sizes(None).unwrap(), (1, 32 << 20));
        assert_eq!(block_sizes(Some((512, 1 << 30))).unwrap(), (512, 32 << 20));
        assert_eq!(block_sizes(Some((4096, 10000))).unwrap(), (4096, 8192));
        assert!(block_sizes(Some((3, 4096))).is_err());
        assert!(block_sizes(Some((0, 4096))).is_err());
        assert!(block_sizes(Some((4096, 100))).is_err());
        assert!(block_sizes(Some((1 << 20, 1 << 20))).is_err());
    }
}
