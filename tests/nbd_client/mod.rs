//! A raw NBD client for the export tests: speaks the protocol byte by byte
//! (so tests can also break it on purpose), with read timeouts so that no
//! test can hang on a server that stops answering.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockgraph::export::nbd::{ExportOptions, NbdListener, NbdServer};
use blockgraph::{BackendOptions, BlockBackend, MainLoop, NodeHandle, Perm, Permissions};

pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
pub const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// Transmission flag: several connections may be used at once.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_READ_ONLY: u16 = 1 << 1;

/// How long a test client waits for any byte from the server.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A main loop, an NBD server on a Unix socket in a temporary directory,
/// and an export `disk` of a memory node.
pub struct Fixture {
    pub main: MainLoop,
    pub server: Option<NbdServer>,
    pub listener: Option<NbdListener>,
    pub dir: tempfile::TempDir,
    pub node: NodeHandle,
    pub blk: BlockBackend,
}

impl Fixture {
    /// A writable export `disk` of `size` bytes (a memory node), and a
    /// read-only one `ro` of the same node.
    pub fn new(size: usize) -> Fixture {
        let main = MainLoop::new().expect("main loop");
        let (node, blk, ro) = main
            .run(move |bql| {
                bql.write(|w| {
                    let node = w.add_node(
                        "disk",
                        blockgraph::drivers::MemoryDriver::new(size as u64),
                        &[],
                    )?;
                    let blk = w.add_backend(
                        "export",
                        &node,
                        BackendOptions::with_perms(Permissions {
                            take: Perm::CONSISTENT_READ | Perm::WRITE,
                            share: Perm::ALL,
                        }),
                    )?;
                    let ro = w.add_backend(
                        "export-ro",
                        &node,
                        BackendOptions::with_perms(Permissions::SHARED_READER),
                    )?;
                    Ok::<_, blockgraph::Error>((node, blk, ro))
                })
            })
            .expect("graph");
        let server = NbdServer::with_threads(&main, 2).expect("server");
        server
            .add_export(ExportOptions {
                name: "disk".into(),
                description: "test disk".into(),
                backend: blk.clone(),
                read_only: false,
            })
            .unwrap();
        server
            .add_export(ExportOptions {
                name: "ro".into(),
                description: String::new(),
                backend: ro,
                read_only: true,
            })
            .unwrap();
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = server
            .listen_unix(dir.path().join("nbd.sock"))
            .expect("listen");
        Fixture {
            main,
            server: Some(server),
            listener: Some(listener),
            dir,
            node,
            blk,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// `nbd+unix:///EXPORT?socket=PATH`, for QEMU's tools.
    pub fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket())
    }

    /// Stops the server and waits for its connections to end.
    pub fn stop(&mut self) {
        if let Some(l) = self.listener.take() {
            l.shutdown();
        }
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop();
        self.main.shutdown();
    }
}

/// A reply to a transmission request.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    /// Read data (simple: what the caller said to expect; structured: the
    /// OFFSET_DATA payload after its offset) or block-status descriptors.
    pub data: Vec<u8>,
    /// Structured chunk type (None for a simple reply).
    pub chunk: Option<u16>,
}

pub struct Client {
    pub s: UnixStream,
    pub structured: bool,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        Client {
            s,
            structured: false,
        }
    }

    pub fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0; 2];
        self.s.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0; 4];
        self.s.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        self.s.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    pub fn bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// Reads the greeting and sends client flags (fixed newstyle, no
    /// zeroes).
    pub fn greet(&mut self) -> io::Result<()> {
        assert_eq!(self.u64()?, INIT_MAGIC);
        assert_eq!(self.u64()?, OPT_MAGIC);
        let flags = self.u16()?;
        assert_eq!(flags & 3, 3, "fixed newstyle and no zeroes");
        self.s.write_all(&3u32.to_be_bytes())
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::new();
        m.extend_from_slice(&OPT_MAGIC.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)
    }

    /// One option reply: (option, type, data).
    pub fn option_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        assert_eq!(self.u64()?, REP_MAGIC);
        let option = self.u32()?;
        let kind = self.u32()?;
        let len = self.u32()?;
        assert!(len < 1 << 20, "option reply of {len} bytes");
        Ok((option, kind, self.bytes(len as usize)?))
    }

    /// Option replies up to and including the final one (ACK or error).
    pub fn option_replies(&mut self) -> io::Result<Vec<(u32, Vec<u8>)>> {
        let mut all = Vec::new();
        loop {
            let (_, kind, data) = self.option_reply()?;
            let last = kind == REP_ACK || kind & (1 << 31) != 0;
            all.push((kind, data));
            if last {
                return Ok(all);
            }
        }
    }

    /// `GO`/`INFO` data for `name` asking for `infos`.
    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Meta-context option data.
    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Greets, optionally negotiates structured replies and
    /// `base:allocation`, and enters transmission with `GO`. Returns the
    /// export size and transmission flags.
    pub fn handshake(&mut self, export: &str, structured: bool) -> io::Result<(u64, u16)> {
        self.greet()?;
        if structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[])?;
            assert_eq!(self.option_replies()?[0].0, REP_ACK);
            self.send_option(
                OPT_SET_META_CONTEXT,
                &Client::meta_data(export, &["base:allocation"]),
            )?;
            let replies = self.option_replies()?;
            assert_eq!(replies.len(), 2, "one context and the ACK");
            assert_eq!(replies[0].0, REP_META_CONTEXT);
            self.structured = true;
        }
        self.send_option(OPT_GO, &Client::info_data(export, &[]))?;
        let mut size_flags = None;
        for (kind, data) in self.option_replies()? {
            assert!(kind == REP_INFO || kind == REP_ACK, "GO refused: {kind:#x}");
            if kind == REP_INFO && data[..2] == [0, 0] {
                let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                size_flags = Some((size, flags));
            }
        }
        Ok(size_flags.expect("INFO_EXPORT in the GO reply"))
    }

    /// Sends one request header (and payload).
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.s
            .write_all(&request_bytes(kind, flags, cookie, offset, len, payload))
    }

    /// Reads one reply. `read_len` is the data a successful simple reply
    /// to a read carries (the caller knows it from its request).
    pub fn reply(&mut self, read_len: usize) -> io::Result<Reply> {
        let magic = self.u32()?;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = self.u32()?;
            let cookie = self.u64()?;
            let data = if error == 0 {
                self.bytes(read_len)?
            } else {
                Vec::new()
            };
            return Ok(Reply {
                cookie,
                error,
                data,
                chunk: None,
            });
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
        let flags = self.u16()?;
        assert_eq!(flags & 1, 1, "the server sends one chunk per reply");
        let kind = self.u16()?;
        let cookie = self.u64()?;
        let len = self.u32()?;
        assert!(len <= (32 << 20) + 8, "chunk of {len} bytes");
        let payload = self.bytes(len as usize)?;
        let (error, data) = match kind {
            1 => (0, payload[8..].to_vec()),
            0 => (0, Vec::new()),
            5 => (0, payload[4..].to_vec()),
            k if k & (1 << 15) != 0 => (
                u32::from_be_bytes(payload[..4].try_into().unwrap()),
                Vec::new(),
            ),
            k => panic!("unexpected chunk type {k}"),
        };
        Ok(Reply {
            cookie,
            error,
            data,
            chunk: Some(kind),
        })
    }

    /// One request and its reply.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        self.send(kind, flags, 7, offset, len, payload)?;
        let read_len = if kind == CMD_READ { len as usize } else { 0 };
        let r = self.reply(read_len)?;
        assert_eq!(r.cookie, 7);
        Ok(r)
    }

    /// Whether the server closed the connection (EOF, or a reset) before
    /// sending anything more.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }

    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, 0, &[]);
    }
}

/// One transmission request (header, then `payload`) as bytes, for tests
/// that send many at once or write them from another thread.
pub fn request_bytes(
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(28 + payload.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(payload);
    m
}
