//! NBD wire constants and message encoders and decoders (the numbers are
//! the protocol's; the names follow the specification's, without the
//! `NBD_` prefix). Shared by the export (the server side) and the `nbd`
//! driver (the client side).

/// `NBDMAGIC`, the first word the server sends.
pub(crate) const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting and the prefix of every option.
pub(crate) const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub(crate) const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(crate) const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub(crate) const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub(crate) const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types (`NBD_OPT_INFO`/`GO`).
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(crate) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// The bit every error chunk type has.
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

// Errors (Linux errno values, as the protocol fixes them).
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;
pub(crate) const EOVERFLOW: u32 = 75;
pub(crate) const ENOTSUP: u32 = 95;
pub(crate) const ESHUTDOWN: u32 = 108;

// `base:allocation` flags.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on every connection.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Size of a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub(crate) const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub(crate) const CHUNK_LEN: usize = 20;

/// An option reply header followed by `data`.
pub(crate) fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes a simple reply header into `out[..16]`.
pub(crate) fn simple_reply_header(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured chunk header into `out[..20]`.
pub(crate) fn chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// A simple reply with no payload.
pub(crate) fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut out = vec![0; SIMPLE_REPLY_LEN];
    simple_reply_header(&mut out, error, cookie);
    out
}

/// A final structured chunk carrying `payload`.
pub(crate) fn chunk(kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0; CHUNK_LEN];
    chunk_header(
        &mut out,
        REPLY_FLAG_DONE,
        kind,
        cookie,
        payload.len() as u32,
    );
    out.extend_from_slice(payload);
    out
}

/// A final structured error chunk (no message).
pub(crate) fn error_chunk(error: u32, cookie: u64) -> Vec<u8> {
    let mut payload = [0u8; 6];
    payload[0..4].copy_from_slice(&error.to_be_bytes());
    chunk(REPLY_TYPE_ERROR, cookie, &payload)
}

/// A request header, decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Request {
    /// Decodes a header; `None` on a wrong magic.
    pub(crate) fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        let magic = u32::from_be_bytes(b[0..4].try_into().ok()?);
        (magic == REQUEST_MAGIC).then(|| Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }
}

/// Size of an option reply header (`REP_MAGIC`, option, type, length).
pub(crate) const OPTION_REPLY_LEN: usize = 20;

/// An option request (client to server): `IHAVEOPT`, the option and its
/// data.
pub(crate) fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An option reply header, decoded (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionReply {
    pub(crate) option: u32,
    pub(crate) kind: u32,
    pub(crate) len: u32,
}

impl OptionReply {
    /// Decodes a header; `None` on a wrong magic.
    pub(crate) fn parse(b: &[u8; OPTION_REPLY_LEN]) -> Option<OptionReply> {
        let magic = u64::from_be_bytes(b[0..8].try_into().ok()?);
        (magic == REP_MAGIC).then(|| OptionReply {
            option: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            kind: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            len: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
        })
    }

    /// Whether the reply is an error (`NBD_REP_ERR_*`).
    pub(crate) fn is_error(&self) -> bool {
        self.kind & REP_ERR != 0
    }
}

impl Request {
    /// Encodes the header (client side).
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A structured reply chunk header after its magic, decoded (client side):
/// the 16 bytes that follow `STRUCTURED_REPLY_MAGIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) cookie: u64,
    pub(crate) len: u32,
}

impl ChunkHeader {
    /// Decodes the 16 bytes after the magic.
    pub(crate) fn parse(b: &[u8; 16]) -> ChunkHeader {
        ChunkHeader {
            flags: u16::from_be_bytes([b[0], b[1]]),
            kind: u16::from_be_bytes([b[2], b[3]]),
            cookie: u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]),
            len: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// `INFO`/`GO` option data: the export name and the information requests.
pub(crate) fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// Meta-context option data: the export name and the queries.
pub(crate) fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let back = Request::parse(&r.encode()).expect("magic");
        assert_eq!(
            (back.flags, back.kind, back.cookie, back.offset, back.len),
            (r.flags, r.kind, r.cookie, r.offset, r.len)
        );
    }

    #[test]
    fn option_reply_header_round_trips() {
        let bytes = option_reply(OPT_GO, REP_ERR_UNSUP, b"xy");
        let head: [u8; OPTION_REPLY_LEN] = bytes[..OPTION_REPLY_LEN].try_into().unwrap();
        let r = OptionReply::parse(&head).expect("magic");
        assert_eq!((r.option, r.kind, r.len), (OPT_GO, REP_ERR_UNSUP, 2));
        assert!(r.is_error());
        let mut bad = head;
        bad[0] ^= 1;
        assert!(OptionReply::parse(&bad).is_none());
    }

    #[test]
    fn chunk_header_round_trips() {
        let mut b = [0u8; CHUNK_LEN];
        chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 99);
        let h = ChunkHeader::parse(b[4..].try_into().unwrap());
        assert_eq!(
            h,
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_OFFSET_DATA,
                cookie: 7,
                len: 99
            }
        );
    }
}
