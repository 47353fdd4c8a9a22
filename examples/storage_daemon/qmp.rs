//! QMP's wire protocol: the greeting, capabilities negotiation, the
//! framing of JSON objects on a byte stream, `execute`/`arguments`/`id`,
//! `{"return": ...}` and `{"error": {"class", "desc"}}` replies, and events
//! with their `timestamp`, over a Unix socket (QEMU's `--chardev socket` +
//! `--monitor`).
//!
//! A connection starts in capabilities negotiation mode: the greeting is
//! sent, and every command but `qmp_capabilities` is answered
//! `CommandNotFound` ("Expecting capabilities negotiation with
//! 'qmp_capabilities'"). After it, commands go to the executor (one at a
//! time, in arrival order, for all connections) and events are delivered.
//! Malformed input gets QMP's error and the connection goes on; nothing a
//! client sends can make the daemon panic. Several connections may be
//! open at once on one socket (QEMU's monitor takes one at a time).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::opts::{QResult, QmpError};

/// The largest JSON text accepted (QEMU's `MAX_TOKEN_SIZE` is 64 MiB; no
/// command here needs more than a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The deepest nesting accepted (QEMU's `MAX_NESTING`).
pub const MAX_NESTING: usize = 1024;

/// Where events go: every connection in command mode.
#[derive(Clone)]
pub struct Events(broadcast::Sender<Arc<String>>);

impl Events {
    /// A sink no one listens to yet.
    pub fn new() -> Events {
        Events(broadcast::channel(1024).0)
    }

    /// Sends event `name` with `data` to every negotiated connection.
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        // No receiver is not an error: nobody is listening.
        let _ = self.0.send(Arc::new(event.to_string()));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<String>> {
        self.0.subscribe()
    }
}

/// A command for the executor, with where its answer goes.
pub struct Call {
    /// The command's name.
    pub name: String,
    /// Its `arguments` (an object, or `Value::Null` when absent).
    pub args: Value,
    /// Arguments are command-line strings (keyval), not typed JSON.
    pub keyval: bool,
    /// Where the result goes.
    pub reply: oneshot::Sender<QResult<Value>>,
}

/// What the executor receives.
pub enum Msg {
    /// A command.
    Call(Call),
    /// Shut the daemon down (exports, flush, graph); answered when done.
    /// Later calls are refused.
    Shutdown(oneshot::Sender<()>),
    /// Work the daemon queued for itself (an export whose connections
    /// have ended is deleted); dropped once the daemon shuts down.
    Later(Box<dyn FnOnce(&mut crate::daemon::Daemon) + Send>),
}

/// What a connection needs from the daemon.
#[derive(Clone)]
pub struct Monitor {
    /// The executor's queue.
    pub calls: mpsc::UnboundedSender<Msg>,
    /// Events for negotiated connections.
    pub events: Events,
    /// Set to `true` to ask for the daemon's shutdown (`quit`); the
    /// connections stay open until it is done, so that they see its
    /// events.
    pub quit: Arc<watch::Sender<bool>>,
    /// The greeting's `version` member.
    pub version: Value,
}

impl Monitor {
    async fn call(&self, name: &str, args: Value) -> QResult<Value> {
        let (reply, rx) = oneshot::channel();
        let call = Call {
            name: name.to_owned(),
            args,
            keyval: false,
            reply,
        };
        if self.calls.send(Msg::Call(call)).is_err() {
            return Err(QmpError::generic("the daemon is shutting down"));
        }
        rx.await
            .unwrap_or_else(|_| Err(QmpError::generic("the daemon is shutting down")))
    }
}

/// Splits a byte stream into top-level JSON texts the way QEMU's JSON
/// streamer does: objects and arrays by bracket depth (outside strings),
/// scalars up to the next delimiter. Each item is the bytes of one text,
/// or a framing error.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// A scalar (number, keyword) is being read at depth 0.
    scalar: bool,
    /// Skipping the rest of an oversized text, up to its depth-0 end.
    skipping: bool,
}

/// One framing result.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete JSON text.
    Text(Vec<u8>),
    /// Input that cannot be a JSON text.
    Error(String),
}

impl Splitter {
    /// Feeds `data`, appending what completes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.scalar {
            if b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'}' | b']' | b'"' | b',') {
                self.scalar = false;
                out.push(Frame::Text(std::mem::take(&mut self.buf)));
            } else {
                self.push(b, out);
                return;
            }
        }
        if self.in_string {
            self.push(b, out);
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.end(out);
                }
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.push(b, out);
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_NESTING && !self.skipping {
                    self.skipping = true;
                    self.buf.clear();
                    out.push(Frame::Error("JSON parse error, nesting too deep".into()));
                }
                self.push(b, out);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    out.push(Frame::Error(format!(
                        "JSON parse error, stray '{}'",
                        b as char
                    )));
                    return;
                }
                self.depth -= 1;
                self.push(b, out);
                if self.depth == 0 {
                    self.end(out);
                }
            }
            _ if self.depth == 0 && b.is_ascii_whitespace() => {}
            _ if self.depth == 0 => {
                self.scalar = true;
                self.push(b, out);
            }
            _ => self.push(b, out),
        }
    }

    fn push(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.skipping {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE {
            self.skipping = true;
            self.buf = Vec::new();
            out.push(Frame::Error(format!(
                "JSON parse error, input longer than {MAX_MESSAGE} bytes"
            )));
            return;
        }
        self.buf.push(b);
    }

    fn end(&mut self, out: &mut Vec<Frame>) {
        if self.skipping {
            self.skipping = false;
            self.buf.clear();
        } else {
            out.push(Frame::Text(std::mem::take(&mut self.buf)));
        }
    }
}

/// A parsed request: the command, its arguments and the `id` to echo.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// `execute`.
    pub name: String,
    /// `arguments`, or `Value::Null`.
    pub args: Value,
    /// `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// Checks one JSON text the way QEMU's dispatcher does. The error carries
/// the `id` when the text had one.
pub fn parse_request(text: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut map) = value else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = map.remove("id");
    let fail = |msg: String| Err((QmpError::generic(msg), id.clone()));
    if map.contains_key("exec-oob") {
        return fail(
            "QMP input member 'exec-oob' is unexpected: out-of-band execution is not enabled"
                .into(),
        );
    }
    let name = match map.remove("execute") {
        None => return fail("QMP input lacks member 'execute'".into()),
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
    };
    let args = match map.remove("arguments") {
        None => Value::Null,
        Some(v @ Value::Object(_)) => v,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    if let Some(key) = map.keys().next() {
        return fail(format!("QMP input member '{key}' is unexpected"));
    }
    Ok(Request { name, args, id })
}

fn reply(result: QResult<Value>, id: Option<Value>) -> String {
    let mut obj = Map::new();
    match result {
        Ok(v) => obj.insert("return".into(), v),
        Err(e) => obj.insert("error".into(), e.to_json()),
    };
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    Value::Object(obj).to_string()
}

/// Serves one QMP connection until the client hangs up or `stop` is set
/// (after the daemon's shutdown).
pub async fn serve(stream: UnixStream, monitor: Monitor, mut stop: watch::Receiver<bool>) {
    let (mut rd, mut wr) = stream.into_split();
    let greeting = json!({"QMP": {"version": monitor.version, "capabilities": []}});
    if write_line(&mut wr, &greeting.to_string()).await.is_err() {
        return;
    }
    let mut splitter = Splitter::default();
    let mut events: Option<broadcast::Receiver<Arc<String>>> = None;
    let mut buf = vec![0u8; 64 << 10];
    let mut frames = Vec::new();
    loop {
        let event = async {
            match events.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            ev = event => match ev {
                Ok(line) => {
                    if write_line(&mut wr, &line).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events = None,
            },
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                splitter.feed(&buf[..n], &mut frames);
                for frame in std::mem::take(&mut frames) {
                    let (line, quit) = match frame {
                        Frame::Error(msg) => (reply(Err(QmpError::generic(msg)), None), false),
                        Frame::Text(text) => handle(&text, &monitor, &mut events).await,
                    };
                    // Events the command caused go out before its answer,
                    // as QEMU sends them (a job's `created`, `running`).
                    while let Some(rx) = events.as_mut() {
                        match rx.try_recv() {
                            Ok(ev) => {
                                if write_line(&mut wr, &ev).await.is_err() {
                                    return;
                                }
                            }
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                    if write_line(&mut wr, &line).await.is_err() {
                        return;
                    }
                    if quit {
                        // The reply is out; now stop the daemon. This
                        // connection, like the others, is closed when
                        // the shutdown is done.
                        monitor.quit.send_replace(true);
                    }
                }
            }
        }
    }
}

/// Answers one request; the flag says it was a successful `quit`.
async fn handle(
    text: &[u8],
    monitor: &Monitor,
    events: &mut Option<broadcast::Receiver<Arc<String>>>,
) -> (String, bool) {
    let req = match parse_request(text) {
        Ok(r) => r,
        Err((e, id)) => return (reply(Err(e), id), false),
    };
    let negotiated = events.is_some();
    let result = match (req.name.as_str(), negotiated) {
        ("qmp_capabilities", false) => match capabilities(req.args) {
            Ok(()) => {
                *events = Some(monitor.events.subscribe());
                Ok(json!({}))
            }
            Err(e) => Err(e),
        },
        ("qmp_capabilities", true) => Err(QmpError {
            class: "CommandNotFound",
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        (_, false) => Err(QmpError {
            class: "CommandNotFound",
            desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
        }),
        ("quit", true) => match crate::opts::Opts::new(req.args, false).and_then(|o| o.finish()) {
            Ok(()) => return (reply(Ok(json!({})), req.id), true),
            Err(e) => Err(e),
        },
        (name, true) => monitor.call(name, req.args).await,
    };
    (reply(result, req.id), false)
}

/// `qmp_capabilities`' arguments: `enable` may only list capabilities the
/// greeting offered, and it offered none.
fn capabilities(args: Value) -> QResult<()> {
    let mut o = crate::opts::Opts::new(args, false)?;
    if let Some(enable) = o.take("enable") {
        let Value::Array(list) = enable else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        if let Some(cap) = list.first() {
            return Err(QmpError::generic(format!(
                "Capability '{}' not available",
                cap.as_str().unwrap_or("?")
            )));
        }
    }
    o.finish()
}

async fn write_line(wr: &mut tokio::net::unix::OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    let mut data = Vec::with_capacity(line.len() + 2);
    data.extend_from_slice(line.as_bytes());
    data.extend_from_slice(b"\r\n");
    wr.write_all(&data).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &str) -> Vec<Frame> {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        // Byte by byte: framing must not depend on read boundaries.
        for b in input.as_bytes() {
            s.feed(&[*b], &mut out);
        }
        out
    }

    #[test]
    fn the_splitter_frames_like_qemus_streamer() {
        let f = split("{\"execute\": \"a\"}{\"x\": \"}{\\\"\"}\n [1, [2]] 42 \"s\" }");
        assert_eq!(f.len(), 6, "{f:?}");
        assert_eq!(f[1], Frame::Text(b"{\"x\": \"}{\\\"\"}".to_vec()));
        assert_eq!(f[3], Frame::Text(b"42".to_vec()));
        assert!(matches!(f[5], Frame::Error(_)));
        let deep = "[".repeat(MAX_NESTING + 1) + &"]".repeat(MAX_NESTING + 1) + "{}";
        let f = split(&deep);
        assert!(matches!(f[0], Frame::Error(_)));
        assert_eq!(f[1], Frame::Text(b"{}".to_vec()));
    }

    #[test]
    fn requests_are_checked_like_qemus_dispatcher() {
        let r = parse_request(br#"{"execute": "x", "id": 7}"#).unwrap();
        assert_eq!((r.name.as_str(), r.id), ("x", Some(json!(7))));
        let e = |t: &str| parse_request(t.as_bytes()).unwrap_err();
        assert_eq!(e("[]").0.desc, "QMP input must be a JSON object");
        assert_eq!(e(r#"{"id": 1}"#).1, Some(json!(1)));
        assert!(e(r#"{"execute": 1}"#).0.desc.contains("must be a string"));
        assert!(e(r#"{"execute": "x", "foo": 1}"#).0.desc.contains("'foo'"));
        assert!(e("{bad").0.desc.starts_with("JSON parse error"));
    }
}
