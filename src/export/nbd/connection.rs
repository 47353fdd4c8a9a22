//! Accepting clients and running one connection: handshake, then
//! transmission.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};

use super::{handshake, transmission, Conn, Shared, Stop, Tokens, Tracker, HANDSHAKE_TIMEOUT};
use crate::graph::runtime::IoTask;

pub(crate) enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// An accepted client, out of the listener's reactor, to be registered
/// with the reactor of the server thread that serves it.
enum Accepted {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        // `into_std` leaves the socket non-blocking, as `from_std` needs.
        Ok(match self {
            Listener::Unix(l) => Accepted::Unix(l.accept().await?.0.into_std()?),
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // Replies are written whole; do not hold small ones back.
                stream.set_nodelay(true)?;
                Accepted::Tcp(stream.into_std()?)
            }
        })
    }
}

impl Accepted {
    /// A duplicate of the socket, for the export to ask whether the
    /// client has hung up (`None` when out of descriptors).
    fn duplicate(&self) -> Option<OwnedFd> {
        match self {
            Accepted::Unix(s) => s.as_fd().try_clone_to_owned().ok(),
            Accepted::Tcp(s) => s.as_fd().try_clone_to_owned().ok(),
        }
    }

    /// The stream, registered with the current thread's reactor.
    fn into_conn(self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Accepted::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
            Accepted::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
        })
    }
}

/// Accepts clients until the stop; each connection is a task of the
/// server's graph-lock context on one of the server's threads (round
/// robin), where its requests run too.
pub(crate) async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    mut stop: Stop,
    server_tracker: Arc<Tracker>,
    listener_tracker: Arc<Tracker>,
    _tokens: Tokens,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait() => return,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(_) => {
                // Out of file descriptors, a connection reset before
                // accept: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let tokens: Tokens = Arc::new((server_tracker.token(), listener_tracker.token()));
        let (shared, stop) = (shared.clone(), stop.clone());
        let ctx = shared.ctx.clone();
        let handle = shared.pick();
        ctx.spawn_on(&handle.clone(), move |mut cx| async move {
            let socket = stream.duplicate();
            let Ok(stream) = stream.into_conn() else {
                return;
            };
            run(&mut cx, stream, socket, handle, shared, stop, tokens).await
        });
    }
}

/// One connection, start to end.
async fn run(
    cx: &mut IoTask,
    stream: Box<dyn Conn>,
    socket: Option<OwnedFd>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
    mut stop: Stop,
    tokens: Tokens,
) {
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(transmission::READ_BUFFER, rd);
    let mut wr = BufWriter::new(wr);
    let negotiated = tokio::select! {
        n = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake::negotiate(cx, &mut rd, &mut wr, &shared, socket),
        ) => n,
        _ = stop.wait() => return,
    };
    // A timeout, an I/O error, a protocol violation or an abort: close.
    let Ok(Ok(Some(session))) = negotiated else {
        return;
    };
    transmission::serve(rd, wr, session, handle, shared, stop, tokens).await;
}
