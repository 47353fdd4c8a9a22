//! An NBD server that exports [`BlockBackend`]s (QEMU's `nbd-server-start`
//! and `block-export-add type=nbd`, as a library).
//!
//! [`NbdServer`] owns its threads (each a current-thread tokio runtime
//! with a reactor, an I/O thread in the crate's sense, with one
//! [`IoContext`] of the graph lock for all of them);
//! [`NbdServer::add_export`] publishes a backend under a name;
//! [`NbdServer::listen_unix`] and [`NbdServer::listen_tcp`] accept clients
//! until the returned [`NbdListener`] is dropped or shut down.
//!
//! What the server speaks: the fixed newstyle handshake (`NO_ZEROES`),
//! options `EXPORT_NAME`, `INFO`, `GO` (export size and flags, name,
//! description, block sizes from the backend's request alignment), `LIST`,
//! `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT`
//! (`base:allocation` only); every other option gets `NBD_REP_ERR_UNSUP`.
//! Commands `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES`
//! (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` and `DISC`; structured replies
//! for reads and block status once negotiated, simple replies otherwise.
//!
//! Each request is its own task, which takes the graph read lock once
//! through the export's [`BlockBackend`] (so a drain of the exported node
//! queues new requests and waits for those in flight, like any device);
//! replies go out through one writer per connection, batched into one
//! vectored write when several are ready; a connection, its requests and
//! its replies stay on one server thread, where the backend's driver does
//! its I/O too. Memory per connection
//! is bounded: at most [`MAX_IN_FLIGHT`] requests and
//! [`IN_FLIGHT_BYTES`] of payload are in flight, and the server stops
//! reading from a connection that has used them up until replies are
//! written, so a client that never reads its replies stalls only itself.
//!
//! `NBD_FLAG_CAN_MULTI_CONN` is advertised on every export: all
//! connections to an export go through the one backend, hence one driver
//! stack, and a `FLUSH` on any connection is a backend flush, which makes
//! durable every write that completed before it, whichever connection
//! wrote it (the property the flag promises).
//!
//! Not served: TLS, extended headers, `CACHE`, `RESIZE`, other metadata
//! contexts; `FAST_ZERO` is always refused with `ENOTSUP` (the backend
//! cannot tell whether zeroing will be fast), which the protocol allows.

mod buffers;
mod connection;
mod handshake;
use crate::nbd::proto;
mod transmission;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};

use crate::backend::BlockBackend;
use crate::graph::runtime::{IoContext, MainLoop};
use crate::thread::{set_thread_role, ThreadRole};
use crate::types::{Error, Result};

/// Largest read or write payload a client may ask for (32 MiB): advertised
/// as the maximum block size; a larger read is refused with an error, a
/// larger write ends the connection (its payload cannot be skipped
/// without reading it).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests in flight per connection before the server stops reading.
pub const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes (reads and writes) in flight per connection before the
/// server stops reading (64 MiB).
pub const IN_FLIGHT_BYTES: u64 = 64 << 20;
/// How long a client may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long replies still in flight may take to reach the client once its
/// listener or the server stops.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// One export: a backend published under a name.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The name clients ask for (`nbd+unix:///NAME?socket=...`); at most
    /// 4096 bytes, no NUL.
    pub name: String,
    /// Free text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The device the export reads and writes.
    pub backend: BlockBackend,
    /// Refuse writes, trims and zeroing with `EPERM` (and tell clients the
    /// export is read-only).
    pub read_only: bool,
}

pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) backend: BlockBackend,
    pub(crate) read_only: bool,
    /// Connections that picked this export (`GO` or `EXPORT_NAME`) and
    /// have not closed yet. Raised only under the server's export lock
    /// (see [`Shared::attach`]), so a removal that finds none under that
    /// lock knows no connection can pick the export any more.
    connections: AtomicUsize,
    /// Guards the drop of `connections` to zero, for waiters.
    idle: Mutex<()>,
    /// Notified when `connections` drops to zero.
    unused: Condvar,
    /// Set by a hard removal: the export's connections stop.
    pub(crate) closing: watch::Sender<bool>,
    /// A duplicate of each counted connection's socket, by connection, to
    /// ask the kernel whether its client has hung up (see
    /// [`Export::connections_in_use`]). `None` where duplicating failed.
    peers: Mutex<BTreeMap<u64, Option<OwnedFd>>>,
    /// Key of the next entry in `peers`.
    next_peer: AtomicU64,
}

/// A connection counted as one of an export's users; dropping it
/// uncounts it.
pub(crate) struct Attached {
    export: Arc<Export>,
    peer: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.export
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.peer);
        // (Under the lock, so that a waiter between its check and its wait
        // cannot miss the notification; held only for that instant.)
        let _idle = self.export.idle.lock().unwrap_or_else(|e| e.into_inner());
        if self.export.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.export.unused.notify_all();
        }
    }
}

/// Whether the client at the other end of `socket` has hung up (closed
/// its socket or shut down its sending side): the kernel reports it at
/// once, before the connection's task on its server thread has read the
/// end of the stream.
fn peer_hung_up(socket: BorrowedFd<'_>) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let events = libc::POLLRDHUP;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let events = 0;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `fd` is one valid `pollfd` for the duration of the call (the
    // count passed is 1), and `socket` is an open descriptor borrowed for
    // that time; a zero timeout makes the call non-blocking.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready == 1 && fd.revents & (events | libc::POLLHUP | libc::POLLERR) != 0
}

impl Export {
    /// Connections whose client is still there: counted connections less
    /// those whose client has hung up (they only finish their requests in
    /// flight and end). What a safe removal refuses on; without this, a
    /// client that has just disconnected (`qemu-img info` returning) would
    /// still count until its server thread got round to reading the end of
    /// its stream.
    fn connections_in_use(&self) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let gone = peers
            .values()
            .filter(|p| p.as_ref().is_some_and(|fd| peer_hung_up(fd.as_fd())))
            .count();
        self.connections.load(Ordering::SeqCst).saturating_sub(gone)
    }

    /// Waits until no connection uses the export, at most until
    /// `deadline`; returns whether none does.
    fn wait_unused(&self, deadline: Option<std::time::Instant>) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while self.connections.load(Ordering::SeqCst) > 0 {
            match deadline {
                None => idle = self.unused.wait(idle).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    idle = self
                        .unused
                        .wait_timeout(idle, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        true
    }
}

/// State every task of a server shares.
pub(crate) struct Shared {
    pub(crate) exports: Mutex<BTreeMap<String, Arc<Export>>>,
    pub(crate) ctx: IoContext,
    /// One runtime per server thread.
    handles: Vec<tokio::runtime::Handle>,
    /// Round robin over `handles` for new connections and listeners.
    next: AtomicUsize,
}

impl Shared {
    /// The server thread the next connection (or listener) runs on.
    pub(crate) fn pick(&self) -> tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].clone()
    }

    pub(crate) fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The export `name`, with the calling connection counted as one of
    /// its users; counted under the export lock, so that a removal either
    /// sees this connection or keeps it from picking the export.
    ///
    /// `socket` is a duplicate of the connection's socket, taken (when the
    /// export is there) to tell whether its client has hung up.
    pub(crate) fn attach(
        &self,
        name: &str,
        socket: &mut Option<OwnedFd>,
    ) -> Option<(Arc<Export>, Attached)> {
        let exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        let export = exports.get(name)?.clone();
        let peer = export.next_peer.fetch_add(1, Ordering::Relaxed);
        export
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, socket.take());
        export.connections.fetch_add(1, Ordering::SeqCst);
        Some((export.clone(), Attached { export, peer }))
    }

    pub(crate) fn exports(&self) -> Vec<Arc<Export>> {
        self.exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Counts live tasks (connections, their requests, accept loops) so that a
/// shutdown can wait for them.
#[derive(Default, Debug)]
pub(crate) struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

/// One live task of a [`Tracker`].
pub(crate) struct Token(Arc<Tracker>);

impl Tracker {
    /// Live tasks.
    fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub(crate) fn token(self: &Arc<Self>) -> Token {
        self.live.fetch_add(1, Ordering::SeqCst);
        Token(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Tokens a connection and each of its requests hold: the server's and
/// the listener's.
pub(crate) type Tokens = Arc<(Token, Token)>;

/// The stop signals a task watches: its server's and its listener's.
#[derive(Clone)]
pub(crate) struct Stop {
    server: watch::Receiver<bool>,
    listener: watch::Receiver<bool>,
    /// The export's hard removal, once the connection has picked one.
    export: Option<watch::Receiver<bool>>,
}

impl Stop {
    /// Also stops when the export `closing` belongs to is removed hard.
    pub(crate) fn with_export(mut self, closing: watch::Receiver<bool>) -> Stop {
        self.export = Some(closing);
        self
    }

    /// Resolves once the server or the listener stops (or is gone), or the
    /// export is removed hard.
    pub(crate) async fn wait(&mut self) {
        let export = async {
            match &mut self.export {
                // (The export's sender lives as long as the connection
                // holds the export, so only a removal resolves this.)
                Some(closing) => {
                    let _ = closing.wait_for(|s| *s).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.server.wait_for(|s| *s) => {}
            _ = self.listener.wait_for(|s| *s) => {}
            _ = export => {}
        }
    }

    /// Resolves [`STOP_GRACE`] after the stop.
    pub(crate) async fn wait_then_grace(&mut self) {
        self.wait().await;
        tokio::time::sleep(STOP_GRACE).await;
    }
}

/// A byte stream a client is connected through.
pub(crate) trait Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn for T {}

/// An NBD server: exports [`BlockBackend`]s to NBD clients (`qemu-img`,
/// `qemu-io`, `nbdcopy`, the Linux kernel's `nbd-client`) over Unix and TCP
/// sockets.
///
/// The server runs its own threads (`threads` of them, named
/// `blockgraph-nbd`, each a current-thread tokio runtime) with one
/// graph-lock context; connections are spread over the threads, and every
/// request is a task on its connection's thread that takes the read lock
/// through the export's backend. Dropping
/// the server stops every listener and connection: connections stop
/// reading requests, those in flight finish (a request is never cancelled
/// half way) and their replies are sent, then the sockets close; the
/// threads go away on their own once that is done.
/// [`NbdServer::shutdown`] does the same and waits for it.
///
/// See the [module docs](self) for the protocol subset.
///
/// # Examples
///
/// Export a 1 MiB memory disk on a Unix socket and greet a client:
///
/// ```
/// use std::io::Read;
/// use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};
/// use blockgraph::export::nbd::{ExportOptions, NbdServer};
///
/// let main = MainLoop::new()?;
/// let blk = main.run(|bql| bql.write(|w| {
///     let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
///     w.add_backend("vda", &disk, BackendOptions::default())
/// }))?;
/// let server = NbdServer::new(&main)?;
/// server.add_export(ExportOptions {
///     name: "disk".into(),
///     description: "a memory disk".into(),
///     backend: blk,
///     read_only: false,
/// })?;
/// let dir = std::env::temp_dir().join(format!("nbd-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let listener = server.listen_unix(dir.join("nbd.sock"))?;
/// // Any NBD client can now use nbd+unix:///disk?socket=<dir>/nbd.sock;
/// // here, a raw client reads the server's greeting.
/// let mut client = std::os::unix::net::UnixStream::connect(dir.join("nbd.sock"))?;
/// let mut greeting = [0u8; 18];
/// client.read_exact(&mut greeting)?;
/// assert_eq!(&greeting[..8], b"NBDMAGIC");
/// assert_eq!(&greeting[8..16], b"IHAVEOPT");
/// drop(client);
/// listener.shutdown(); // stops accepting, removes the socket file
/// server.shutdown();
/// # std::fs::remove_dir_all(&dir)?;
/// # main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
pub struct NbdServer {
    shared: Arc<Shared>,
    tracker: Arc<Tracker>,
    stop: Arc<watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NbdServer {
    /// A server with one worker thread.
    pub fn new(main: &MainLoop) -> Result<NbdServer> {
        NbdServer::with_threads(main, 1)
    }

    /// A server with `threads` threads (at least one); connections are
    /// spread over them, each connection and its requests staying on one.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when a thread or its runtime cannot be made.
    pub fn with_threads(main: &MainLoop, threads: usize) -> Result<NbdServer> {
        let tracker: Arc<Tracker> = Arc::default();
        let stop = Arc::new(watch::channel(false).0);
        let mut handles = Vec::new();
        let mut joins = Vec::new();
        for _ in 0..threads.max(1) {
            match server_thread(tracker.clone(), stop.subscribe()) {
                Ok((handle, join)) => {
                    handles.push(handle);
                    joins.push(join);
                }
                Err(e) => {
                    // The threads made so far see the stop, find nothing
                    // to wait for and exit.
                    stop.send_replace(true);
                    return Err(e);
                }
            }
        }
        let shared = Arc::new(Shared {
            exports: Mutex::new(BTreeMap::new()),
            ctx: main.new_io_context("nbd"),
            handles,
            next: AtomicUsize::new(0),
        });
        Ok(NbdServer {
            shared,
            tracker,
            stop,
            threads: joins,
        })
    }

    /// Publishes `options.backend` as `options.name`. New connections see
    /// it at once.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] when an export of that name exists,
    /// [`Error::InvalidName`] for a name longer than 4096 bytes or with a
    /// NUL, [`Error::InvalidArgument`] for such a description.
    pub fn add_export(&self, options: ExportOptions) -> Result<()> {
        let bad = |s: &str| s.len() > 4096 || s.contains('\0');
        if bad(&options.name) {
            return Err(Error::InvalidName(options.name));
        }
        if bad(&options.description) {
            return Err(Error::InvalidArgument(
                "an export description must be at most 4096 bytes, without NUL".into(),
            ));
        }
        let mut exports = self
            .shared
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(&options.name) {
            return Err(Error::DuplicateName(options.name));
        }
        let export = Export {
            name: options.name.clone(),
            description: options.description,
            backend: options.backend,
            read_only: options.read_only,
            connections: AtomicUsize::new(0),
            idle: Mutex::new(()),
            unused: Condvar::new(),
            closing: watch::channel(false).0,
            peers: Mutex::new(BTreeMap::new()),
            next_peer: AtomicU64::new(0),
        };
        exports.insert(options.name, Arc::new(export));
        Ok(())
    }

    /// Unpublishes the export `name`: new clients cannot pick it any more,
    /// connections already using it keep it. Returns whether it existed.
    ///
    /// [`NbdServer::remove_export_with`] refuses while clients use the
    /// export or ends their connections instead.
    pub fn remove_export(&self, name: &str) -> bool {
        self.shared
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    }

    /// How many connections use the export `name` (picked it with
    /// `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` and have not closed yet);
    /// `None` when there is no such export. Clients still in the handshake
    /// that have not picked an export are not counted.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};
    /// use blockgraph::export::nbd::{ExportOptions, NbdServer};
    ///
    /// let main = MainLoop::new()?;
    /// let blk = main.run(|bql| bql.write(|w| {
    ///     let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
    ///     w.add_backend("vda", &disk, BackendOptions::default())
    /// }))?;
    /// let server = NbdServer::new(&main)?;
    /// server.add_export(ExportOptions {
    ///     name: "disk".into(),
    ///     description: String::new(),
    ///     backend: blk,
    ///     read_only: false,
    /// })?;
    /// assert_eq!(server.export_connections("disk"), Some(0));
    /// assert_eq!(server.export_connections("other"), None);
    /// server.shutdown();
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn export_connections(&self, name: &str) -> Option<usize> {
        self.shared
            .export(name)
            .map(|e| e.connections.load(Ordering::SeqCst))
    }

    /// Removes the export `name`, with QEMU's `block-export-del` modes:
    ///
    /// - [`RemoveMode::Safe`] refuses ([`RemoveExportError::InUse`]) while
    ///   a connection whose client is still there uses the export, and
    ///   otherwise unpublishes it; no client can pick it after that. A
    ///   connection whose client has hung up (asked the kernel, so even
    ///   before its server thread has read the end of the stream) does
    ///   not count: it only answers what it had read and ends.
    /// - [`RemoveMode::Hard`] unpublishes it and ends the connections that
    ///   use it: they stop reading requests, the requests in flight finish
    ///   and their replies are sent (a client that does not read them gets
    ///   [`STOP_GRACE`]), then the sockets close. Other exports'
    ///   connections are untouched.
    ///
    /// Either way the returned [`ExportRemoval`] tells when the last
    /// connection is gone ([`ExportRemoval::wait`]); only then is the
    /// export's backend unused by the server. This call does not wait, so
    /// it may be made anywhere, also inside a drain section of the
    /// exported node.
    ///
    /// # Errors
    ///
    /// [`RemoveExportError::NotFound`] when there is no such export,
    /// [`RemoveExportError::InUse`] for a safe removal of an export in
    /// use (the export stays).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};
    /// use blockgraph::export::nbd::{ExportOptions, NbdServer, RemoveExportError, RemoveMode};
    ///
    /// let main = MainLoop::new()?;
    /// let blk = main.run(|bql| bql.write(|w| {
    ///     let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
    ///     w.add_backend("vda", &disk, BackendOptions::default())
    /// }))?;
    /// let server = NbdServer::new(&main)?;
    /// server.add_export(ExportOptions {
    ///     name: "disk".into(),
    ///     description: String::new(),
    ///     backend: blk,
    ///     read_only: false,
    /// })?;
    /// let dir = std::env::temp_dir().join(format!("nbd-rm-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let listener = server.listen_unix(dir.join("nbd.sock"))?;
    ///
    /// // A raw client picks "disk" with NBD_OPT_EXPORT_NAME.
    /// let mut client = std::os::unix::net::UnixStream::connect(dir.join("nbd.sock"))?;
    /// let mut greeting = [0u8; 18];
    /// client.read_exact(&mut greeting)?;
    /// client.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    /// client.write_all(b"IHAVEOPT")?;
    /// client.write_all(&1u32.to_be_bytes())?; // NBD_OPT_EXPORT_NAME
    /// client.write_all(&4u32.to_be_bytes())?;
    /// client.write_all(b"disk")?;
    /// let mut info = [0u8; 10]; // size and transmission flags
    /// client.read_exact(&mut info)?;
    /// assert_eq!(server.export_connections("disk"), Some(1));
    ///
    /// // A safe removal is refused while the client is there...
    /// assert!(matches!(
    ///     server.remove_export_with("disk", RemoveMode::Safe),
    ///     Err(RemoveExportError::InUse { connections: 1, .. })
    /// ));
    /// // ...a hard one ends its connection.
    /// let removal = server.remove_export_with("disk", RemoveMode::Hard).unwrap();
    /// removal.wait();
    /// assert_eq!(removal.connections(), 0);
    /// assert_eq!(client.read(&mut [0u8; 1])?, 0); // EOF
    /// assert_eq!(server.export_connections("disk"), None);
    /// drop(listener);
    /// server.shutdown();
    /// # std::fs::remove_dir_all(&dir)?;
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn remove_export_with(
        &self,
        name: &str,
        mode: RemoveMode,
    ) -> std::result::Result<ExportRemoval, RemoveExportError> {
        let mut exports = self
            .shared
            .exports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(export) = exports.get(name) else {
            return Err(RemoveExportError::NotFound(name.to_owned()));
        };
        // Connections are counted under this lock: none can pick the
        // export between this check and the removal. Those whose client
        // has hung up do not count: they end by themselves.
        let connections = export.connections_in_use();
        if mode == RemoveMode::Safe && connections > 0 {
            return Err(RemoveExportError::InUse {
                name: name.to_owned(),
                connections,
            });
        }
        let export = exports.remove(name).expect("looked up under the lock");
        drop(exports);
        if mode == RemoveMode::Hard {
            export.closing.send_replace(true);
        }
        Ok(ExportRemoval { export })
    }

    /// The names of the exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.shared
            .exports()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Accepts clients on a new Unix socket at `path` (which must not
    /// exist). The socket file is removed when the listener stops.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> Result<NbdListener> {
        let path = path.as_ref().to_path_buf();
        let std_listener = std::os::unix::net::UnixListener::bind(&path)?;
        std_listener.set_nonblocking(true)?;
        let handle = self.shared.pick();
        let listener = {
            let _enter = handle.enter();
            tokio::net::UnixListener::from_std(std_listener)?
        };
        Ok(self.start(
            &handle,
            connection::Listener::Unix(listener),
            ListenAddr::Unix(path),
        ))
    }

    /// Accepts clients on a new TCP socket bound to `addr` (port 0 picks a
    /// free port: see [`NbdListener::tcp_addr`]).
    pub fn listen_tcp(&self, addr: SocketAddr) -> Result<NbdListener> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let handle = self.shared.pick();
        let listener = {
            let _enter = handle.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        Ok(self.start(
            &handle,
            connection::Listener::Tcp(listener),
            ListenAddr::Tcp(local),
        ))
    }

    fn start(
        &self,
        handle: &tokio::runtime::Handle,
        listener: connection::Listener,
        addr: ListenAddr,
    ) -> NbdListener {
        let (stop_tx, stop_rx) = watch::channel(false);
        let own = Arc::new(Tracker::default());
        let stop = Stop {
            server: self.stop.subscribe(),
            listener: stop_rx,
            export: None,
        };
        let tokens: Tokens = Arc::new((self.tracker.token(), own.token()));
        let shared = self.shared.clone();
        let (server_tracker, listener_tracker) = (self.tracker.clone(), own.clone());
        handle.spawn(connection::accept_loop(
            listener,
            shared,
            stop,
            server_tracker,
            listener_tracker,
            tokens,
        ));
        NbdListener {
            addr,
            stop: stop_tx,
            tracker: own,
        }
    }

    /// Stops every listener and connection and waits until the requests in
    /// flight are done and their replies sent (or [`STOP_GRACE`] passed for
    /// a client that does not read them).
    ///
    /// Call it where the requests can finish: not from inside a drain
    /// section of an exported node (its queued requests wait for the
    /// section to end); drop the server there instead.
    pub fn shutdown(mut self) {
        self.stop.send_replace(true);
        let me = std::thread::current().id();
        for thread in std::mem::take(&mut self.threads) {
            // On one of its own threads (a task that owned the server)
            // waiting would wait for itself: that thread exits on its own.
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

/// Starts one server thread: a current-thread tokio runtime with a reactor
/// and a timer, driven by its own thread until the server stops and every
/// task of the server is done (connections stop reading at the stop, finish
/// their requests and send the replies first; see [`NbdServer::shutdown`]).
///
/// The thread is an I/O thread in the crate's sense (`ThreadRole::Io`):
/// its tasks hold read guards, so the calls that would block it on the
/// main loop or a writer refuse to run there, exactly as on an
/// [`IoThread`](crate::graph::runtime::IoThread); the threads of its
/// blocking pool are marked like an I/O thread's. Drivers that keep
/// per-I/O-thread state (the file driver's ring) use it here too, so a
/// request is served on the thread that read it from the socket.
fn server_thread(
    tracker: Arc<Tracker>,
    mut stop: watch::Receiver<bool>,
) -> Result<(tokio::runtime::Handle, std::thread::JoinHandle<()>)> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    // (The name is the blocking pool's: the runtime's own thread is ours.)
    builder.enable_all().thread_name("blockgraph-nbd-pool");
    // (tokio built for loom models has no such hook; the models never run
    // a server.)
    #[cfg(not(loom))]
    builder.on_thread_start(|| set_thread_role(ThreadRole::IoBlocking));
    let runtime = builder.build()?;
    let handle = runtime.handle().clone();
    let join = std::thread::Builder::new()
        .name("blockgraph-nbd".into())
        .stack_size(crate::graph::runtime::THREAD_STACK_SIZE)
        .spawn(move || {
            set_thread_role(ThreadRole::Io);
            runtime.block_on(async {
                let _ = stop.wait_for(|s| *s).await;
                tracker.wait_idle().await;
            });
            // Every connection and request has ended; what is left (a
            // driver's helper task) is dropped with the runtime.
        })?;
    Ok((handle, join))
}

impl Drop for NbdServer {
    /// Signals the stop without waiting: the threads exit on their own once
    /// the requests in flight are answered.
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.export_names())
            .finish()
    }
}

/// How [`NbdServer::remove_export_with`] treats connections that use the
/// export (QEMU's `block-export-del` `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemoveMode {
    /// Refuse while a connection uses the export (QEMU's default).
    #[default]
    Safe,
    /// End the connections that use the export: the requests in flight
    /// finish and are answered, then the sockets close.
    Hard,
}

/// Why [`NbdServer::remove_export_with`] did not remove an export.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoveExportError {
    /// There is no export of that name.
    #[error("export '{0}' not found")]
    NotFound(String),
    /// A safe removal found connections using the export whose clients
    /// are still there.
    #[error("export '{name}' still in use by {connections} connection(s)")]
    InUse {
        /// The export.
        name: String,
        /// The connections that use it.
        connections: usize,
    },
}

/// An export that [`NbdServer::remove_export_with`] removed: no new client
/// can pick it; the connections that used it (ending, after a hard
/// removal) may still be running. Dropping this does not wait for them.
pub struct ExportRemoval {
    export: Arc<Export>,
}

impl ExportRemoval {
    /// Connections that still use the removed export.
    pub fn connections(&self) -> usize {
        self.export.connections.load(Ordering::SeqCst)
    }

    /// Waits until no connection uses the export: each has sent the
    /// replies of its requests in flight (or given up on a client that did
    /// not read them for [`STOP_GRACE`]) and closed its socket. After a
    /// safe removal only connections whose client had already hung up
    /// are left, and they end without waiting for anyone.
    ///
    /// Blocks the calling thread: call it where the requests in flight can
    /// finish (not inside a drain section of the exported node, nor on a
    /// server thread).
    pub fn wait(&self) {
        self.export.wait_unused(None);
    }

    /// As [`ExportRemoval::wait`], for at most `timeout`; returns whether
    /// no connection is left.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.export
            .wait_unused(Some(std::time::Instant::now() + timeout))
    }
}

impl std::fmt::Debug for ExportRemoval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportRemoval")
            .field("name", &self.export.name)
            .field("connections", &self.connections())
            .finish()
    }
}

/// Where a listener accepts clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP socket bound to this address.
    Tcp(SocketAddr),
}

/// A socket an [`NbdServer`] accepts clients on. Dropping it (or
/// [`NbdListener::shutdown`]) stops accepting and ends the connections that
/// came through it, after their requests in flight are answered; a Unix
/// socket's file is removed.
#[derive(Debug)]
pub struct NbdListener {
    addr: ListenAddr,
    stop: watch::Sender<bool>,
    tracker: Arc<Tracker>,
}

impl NbdListener {
    /// Where this listener accepts clients.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The bound TCP address (with the port picked for port 0), for a TCP
    /// listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.addr {
            ListenAddr::Tcp(a) => Some(a),
            ListenAddr::Unix(_) => None,
        }
    }

    /// Connections (and requests of theirs) still running, plus one while
    /// the listener accepts.
    pub fn live_tasks(&self) -> usize {
        self.tracker.live()
    }

    /// Stops accepting, ends this listener's connections and waits for them
    /// (see [`NbdServer::shutdown`] for where not to call it).
    pub fn shutdown(self) {
        self.stop.send_replace(true);
        self.remove_socket_file();
        let tracker = self.tracker.clone();
        futures::executor::block_on(tracker.wait_idle());
    }

    fn remove_socket_file(&self) {
        if let ListenAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.remove_socket_file();
    }
}
