//! Accepting clients and running one connection: handshake, then
//! transmission.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};

use super::{handshake, transmission, Conn, Shared, Stop, Tokens, Tracker, HANDSHAKE_TIMEOUT};
use crate::graph::runtime::IoTask;

pub(crate) enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // Replies are written whole; do not hold small ones back.
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }
}

/// Accepts clients until the stop; each connection is a task of the
/// server's graph-lock context.
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
        ctx.spawn_on(&shared.handle.clone(), move |mut cx| async move {
            run(&mut cx, stream, shared, stop, tokens).await
        });
    }
}

/// One connection, start to end.
async fn run(
    cx: &mut IoTask,
    stream: Box<dyn Conn>,
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
            handshake::negotiate(cx, &mut rd, &mut wr, &shared),
        ) => n,
        _ = stop.wait() => return,
    };
    // A timeout, an I/O error, a protocol violation or an abort: close.
    let Ok(Ok(Some(session))) = negotiated else {
        return;
    };
    transmission::serve(rd, wr, session, shared, stop, tokens).await;
}
