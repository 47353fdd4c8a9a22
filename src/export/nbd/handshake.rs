//! The fixed newstyle handshake: greeting, client flags, option haggling.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;
use super::transmission::Session;
use super::{Attached, Export, Shared, MAX_PAYLOAD};
use crate::graph::runtime::IoTask;

/// Option data we read whole; larger options are skipped and refused with
/// `NBD_REP_ERR_TOO_BIG` (the largest valid one, `SET_META_CONTEXT` with a
/// long name and a few queries, fits easily).
const MAX_OPTION_LEN: u32 = 16 << 10;
/// Options per connection before the server hangs up (a client looping on
/// options would hold the connection forever otherwise).
const MAX_OPTIONS: u32 = 1024;
/// Queries per meta-context option.
const MAX_QUERIES: u32 = 128;

/// A protocol violation that ends the connection.
fn violation(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Meta contexts the client selected, and for which export.
#[derive(Default)]
struct Meta {
    export: Option<String>,
    base_allocation: bool,
}

/// Runs the handshake. `Ok(None)` when the client aborted; `Err` ends the
/// connection.
pub(crate) async fn negotiate<R, W>(
    cx: &mut IoTask,
    rd: &mut R,
    wr: &mut W,
    shared: &Shared,
    mut socket: Option<OwnedFd>,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&greeting).await?;
    wr.flush().await?;

    let client_flags = rd.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The protocol: a server MUST close on flags it does not know.
        return Err(violation("unknown client flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta = Meta::default();

    for _ in 0..MAX_OPTIONS {
        if rd.read_u64().await? != OPT_MAGIC {
            return Err(violation("bad option magic"));
        }
        let option = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                return Err(violation("export name too long"));
            }
            // Skip the data without keeping it.
            let skipped =
                tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink())
                    .await?;
            if skipped != u64::from(len) {
                return Err(violation("truncated option"));
            }
            reply(wr, option, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;

        match option {
            OPT_EXPORT_NAME => {
                let name =
                    String::from_utf8(data).map_err(|_| violation("export name not UTF-8"))?;
                // No way to refuse here but hanging up.
                let (export, attached) = shared
                    .attach(&name, &mut socket)
                    .ok_or_else(|| violation("unknown export"))?;
                let size = export
                    .backend
                    .length(cx)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let flags = transmission_flags(&export);
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(Some(session(
                    export, attached, size, structured, &meta, &name,
                )));
            }
            OPT_ABORT => {
                // Best effort: the client may already be gone.
                let _ = reply(wr, option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    reply(wr, option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for export in shared.exports() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    d.extend_from_slice(export.description.as_bytes());
                    reply(wr, option, REP_SERVER, &d).await?;
                }
                reply(wr, option, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    reply(
                        wr,
                        option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if structured {
                    reply(wr, option, REP_ERR_INVALID, b"already negotiated").await?;
                } else {
                    structured = true;
                    reply(wr, option, REP_ACK, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    reply(wr, option, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                // `GO` picks the export: from here on the connection
                // counts as one of its users (`INFO` only asks).
                let picked = if option == OPT_GO {
                    shared.attach(&name, &mut socket).map(|(e, a)| (e, Some(a)))
                } else {
                    shared.export(&name).map(|e| (e, None))
                };
                let Some((export, attached)) = picked else {
                    reply(wr, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                let blk = &export.backend;
                let (size, alignment) =
                    match (blk.length(cx).await, blk.request_alignment(cx).await) {
                        (Ok(size), Ok(alignment)) => (size, alignment),
                        _ => {
                            reply(wr, option, REP_ERR_SHUTDOWN, b"export unavailable").await?;
                            continue;
                        }
                    };
                let flags = transmission_flags(&export);
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                reply(wr, option, REP_INFO, &d).await?;
                if requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(wr, option, REP_INFO, &d).await?;
                }
                if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(wr, option, REP_INFO, &d).await?;
                }
                // Always sent: clients that did not ask may still use it.
                let (min, preferred) = block_sizes(alignment);
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&preferred.to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(wr, option, REP_INFO, &d).await?;
                reply(wr, option, REP_ACK, &[]).await?;
                if let Some(attached) = attached {
                    return Ok(Some(session(
                        export, attached, size, structured, &meta, &name,
                    )));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set && !structured {
                    reply(wr, option, REP_ERR_INVALID, b"structured replies first").await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    reply(wr, option, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                if shared.export(&name).is_none() {
                    reply(wr, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                // LIST with no query lists everything; `base:` names the
                // whole namespace there.
                let matched = if set {
                    queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                if matched {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(wr, option, REP_META_CONTEXT, &d).await?;
                }
                if set {
                    meta = Meta {
                        export: Some(name),
                        base_allocation: matched,
                    };
                }
                reply(wr, option, REP_ACK, &[]).await?;
            }
            _ => reply(wr, option, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
    Err(violation("too many options"))
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    wr.write_all(&option_reply(option, kind, data)).await?;
    wr.flush().await
}

fn session(
    export: Arc<Export>,
    attached: Attached,
    size: u64,
    structured: bool,
    meta: &Meta,
    name: &str,
) -> Session {
    Session {
        export,
        _attached: attached,
        size,
        structured,
        // Contexts selected for another export do not apply.
        base_allocation: meta.base_allocation && meta.export.as_deref() == Some(name),
    }
}

pub(crate) fn transmission_flags(export: &Export) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    if export.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    flags
}

/// Minimum and preferred block sizes for a backend alignment: powers of
/// two, the minimum at most 64 KiB, the preferred at least 4 KiB.
fn block_sizes(alignment: u32) -> (u32, u32) {
    let min = alignment
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1)
        .min(64 << 10);
    (min, min.max(4096))
}

/// Reads a big-endian u32 at `*at`, advancing it.
fn take_u32(data: &[u8], at: &mut usize) -> Option<u32> {
    let b = data.get(*at..*at + 4)?;
    *at += 4;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// Reads `len` bytes at `*at` as a string of at most 4096 bytes.
fn take_str(data: &[u8], at: &mut usize, len: u32) -> Option<String> {
    if len > 4096 {
        return None;
    }
    let b = data.get(*at..*at + len as usize)?;
    *at += len as usize;
    String::from_utf8(b.to_vec()).ok()
}

/// `INFO`/`GO` data: the export name and the information requested.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut at = 0;
    let name_len = take_u32(data, &mut at)?;
    let name = take_str(data, &mut at, name_len)?;
    let count = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?);
    at += 2;
    let rest = data.get(at..)?;
    if rest.len() != usize::from(count) * 2 {
        return None;
    }
    Some((
        name,
        rest.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Meta-context data: the export name and the queries.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut at = 0;
    let name_len = take_u32(data, &mut at)?;
    let name = take_str(data, &mut at, name_len)?;
    let count = take_u32(data, &mut at)?;
    if count > MAX_QUERIES {
        return None;
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = take_u32(data, &mut at)?;
        queries.push(take_str(data, &mut at, len)?);
    }
    (at == data.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_powers_of_two() {
        assert_eq!(block_sizes(1), (1, 4096));
        assert_eq!(block_sizes(512), (512, 4096));
        assert_eq!(block_sizes(3), (4, 4096));
        assert_eq!(block_sizes(1 << 20), (64 << 10, 64 << 10));
    }

    #[test]
    fn malformed_option_data_is_refused() {
        assert!(parse_info(&[0, 0, 0, 5, b'a']).is_none());
        assert!(parse_info(&[0, 0, 0, 0, 0, 1]).is_none());
        assert_eq!(
            parse_info(&[0, 0, 0, 1, b'a', 0, 1, 0, 3]),
            Some(("a".into(), vec![3]))
        );
        assert!(parse_meta(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'x']).is_none());
        assert!(parse_meta(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
