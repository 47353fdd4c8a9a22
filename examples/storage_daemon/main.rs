//! `storage_daemon`: a QMP storage daemon over blockgraph, with
//! `qemu-storage-daemon`'s command line, QMP wire format and NBD exports.
//!
//! ```text
//! cargo run --release --example storage_daemon -- \
//!     --blockdev driver=file,node-name=f0,filename=disk.qcow2 \
//!     --blockdev driver=qcow2,node-name=d0,file=f0 \
//!     --nbd-server addr.type=unix,addr.path=/tmp/nbd.sock \
//!     --export type=nbd,id=e0,node-name=d0,name=disk,writable=on \
//!     --chardev socket,id=m0,path=/tmp/qmp.sock,server=on,wait=off \
//!     --monitor chardev=m0
//! qemu-img info nbd+unix:///disk?socket=/tmp/nbd.sock
//! ```
//!
//! The modules:
//!
//! | module | what it holds |
//! | --- | --- |
//! | `cli` | the command line and QEMU's keyval syntax |
//! | `qmp` | QMP's wire protocol: greeting, negotiation, framing, replies, events |
//! | `commands` | the dispatch table and each command's arguments |
//! | `blockdev` | `blockdev-add`'s options for each driver |
//! | `job_commands` | `block-stream`, `query-jobs`, the job verbs |
//! | `snapshot_commands` | `blockdev-snapshot(-sync)`, `transaction` and its action table |
//! | `daemon` | the graph, nodes, throttle groups, NBD exports, jobs, snapshots, shutdown |
//! | `opts` | QMP errors and QAPI-style argument checking |
//!
//! Threads: the command line and every QMP command run on one executor
//! thread that owns the `daemon::Daemon`, one command at a time; QMP
//! sockets and signals are served by a small tokio runtime; the graph has
//! its main loop and one I/O thread (for opening images); the NBD server
//! has its own runtime. SIGTERM, SIGINT and `quit` stop the daemon
//! gracefully: exports closed after their requests in flight, every node
//! flushed (users first), the graph shut down; exit status 0. A command
//! line that cannot be applied exits 1 after the same clean-up.

mod bitmap_commands;
mod blockdev;
mod cli;
mod commands;
mod daemon;
mod job_commands;
mod opts;
mod qmp;
mod snapshot_commands;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use cli::{Cli, CliOption};
use opts::{Opts, QResult, QmpError};
use qmp::{Call, Events, Monitor, Msg};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match cli::parse(&args) {
        Ok(Cli::Help) => {
            println!("{}", cli::HELP);
            0
        }
        Ok(Cli::Version) => {
            println!("storage_daemon (blockgraph {})", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Cli::Run(options)) => match run(options) {
            Ok(()) => 0,
            Err(msg) => {
                eprintln!("storage_daemon: {msg}");
                1
            }
        },
        Err(msg) => {
            eprintln!("storage_daemon: {msg}");
            1
        }
    };
    std::process::exit(code);
}

/// The executor: owns the daemon and runs calls one at a time, until asked
/// to shut down or until the queue closes (then it shuts down too); returns
/// what the shutdown could not do cleanly.
fn executor(mut daemon: daemon::Daemon, mut msgs: mpsc::UnboundedReceiver<Msg>) -> Vec<String> {
    let mut problems = None;
    while let Some(msg) = msgs.blocking_recv() {
        let call = match msg {
            Msg::Call(call) => call,
            Msg::Later(work) => {
                if problems.is_none() {
                    work(&mut daemon);
                }
                continue;
            }
            Msg::Shutdown(done) => {
                if problems.is_none() {
                    problems = Some(daemon.shutdown());
                }
                let _ = done.send(());
                continue;
            }
        };
        if problems.is_some() {
            let _ = call
                .reply
                .send(Err(QmpError::generic("the daemon is shutting down")));
            continue;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            commands::dispatch(&mut daemon, &call.name, call.args, call.keyval)
        }))
        .unwrap_or_else(|_| {
            Err(QmpError::generic(format!(
                "internal error in '{}' (this is a bug)",
                call.name
            )))
        });
        let _ = call.reply.send(result);
    }
    problems.unwrap_or_else(|| daemon.shutdown())
}

/// Sends one call from the command line and waits for it.
fn call_blocking(
    calls: &mpsc::UnboundedSender<Msg>,
    name: &str,
    args: Value,
    keyval: bool,
) -> QResult<Value> {
    let (reply, rx) = oneshot::channel();
    calls
        .send(Msg::Call(Call {
            name: name.to_owned(),
            args,
            keyval,
            reply,
        }))
        .map_err(|_| QmpError::generic("the executor stopped"))?;
    rx.blocking_recv()
        .unwrap_or_else(|_| Err(QmpError::generic("the executor stopped")))
}

/// A monitor socket to listen on.
struct MonitorSocket {
    path: PathBuf,
}

fn run(options: Vec<CliOption>) -> Result<(), String> {
    let events = Events::new();
    let mut daemon = daemon::Daemon::new(events.clone())?;
    let (calls, rx) = mpsc::unbounded_channel();
    daemon.set_executor(calls.downgrade());
    let exec = std::thread::Builder::new()
        .name("qmp-executor".into())
        .spawn(move || executor(daemon, rx))
        .map_err(|e| e.to_string())?;
    // From here on, every way out goes through the executor's shutdown.
    let result = serve(options, calls.clone(), events);
    drop(calls);
    let problems = exec
        .join()
        .unwrap_or_else(|_| vec!["the executor panicked".into()]);
    for p in &problems {
        eprintln!("storage_daemon: {p}");
    }
    result?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err("shutdown was not clean (see above)".into())
    }
}

/// Applies the command line, then serves the monitors until a signal or
/// `quit`.
fn serve(
    options: Vec<CliOption>,
    calls: mpsc::UnboundedSender<Msg>,
    events: Events,
) -> Result<(), String> {
    let mut chardevs: Vec<(String, PathBuf)> = Vec::new();
    let mut monitors: Vec<MonitorSocket> = Vec::new();
    let mut pidfile: Option<PathBuf> = None;
    for opt in options {
        let applied = match opt {
            CliOption::Blockdev(v, keyval) => {
                call_blocking(&calls, "blockdev-add", v, keyval).map(drop)
            }
            CliOption::Object(v) => call_blocking(&calls, "object-add", v, true).map(drop),
            CliOption::NbdServer(v, keyval) => {
                call_blocking(&calls, "nbd-server-start", v, keyval).map(drop)
            }
            CliOption::Export(v, keyval) => {
                call_blocking(&calls, "block-export-add", v, keyval).map(drop)
            }
            CliOption::Chardev(v) => chardev(v).map(|c| chardevs.push(c)),
            CliOption::Monitor(v) => monitor(v, &chardevs).map(|m| monitors.push(m)),
            CliOption::Pidfile(p) => {
                pidfile = Some(PathBuf::from(p));
                Ok(())
            }
        };
        applied.map_err(|e| e.desc)?;
    }
    if let Some(p) = &pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", p.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qmp")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (quit_tx, quit_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let monitor = Monitor {
        calls,
        events,
        quit: Arc::new(quit_tx),
        version: commands::version(),
    };
    let sockets: Vec<PathBuf> = monitors.iter().map(|m| m.path.clone()).collect();
    let result = runtime.block_on(async move {
        let mut listeners = Vec::new();
        for m in &monitors {
            // QEMU replaces a stale socket file.
            if std::fs::symlink_metadata(&m.path)
                .map(|md| std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()))
                .unwrap_or(false)
            {
                let _ = std::fs::remove_file(&m.path);
            }
            let l = tokio::net::UnixListener::bind(&m.path)
                .map_err(|e| format!("cannot listen on {}: {e}", m.path.display()))?;
            listeners.push(l);
        }
        for l in listeners {
            let (monitor, stop) = (monitor.clone(), stop_rx.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = async { let _ = stop.clone().wait_for(|s| *s).await; } => return,
                        conn = l.accept() => match conn {
                            Ok((stream, _)) => {
                                tokio::spawn(qmp::serve(stream, monitor.clone(), stop.clone()));
                            }
                            Err(e) => eprintln!("storage_daemon: accept: {e}"),
                        }
                    }
                }
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| e.to_string())?;
        let mut quit = quit_rx.clone();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.wait_for(|q| *q) => {}
        }
        // Shut down while the connections are still open (they see the
        // events), then close them and the accept loops.
        let (done, finished) = oneshot::channel();
        if monitor.calls.send(Msg::Shutdown(done)).is_ok() {
            let _ = finished.await;
        }
        stop_tx.send_replace(true);
        Ok::<(), String>(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    if let Some(p) = &pidfile {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// `--chardev socket,id=...,path=...,server=on,wait=off`.
fn chardev(v: Value) -> QResult<(String, PathBuf)> {
    let mut o = Opts::new(v, true)?;
    let backend = o.req_str("backend")?;
    if backend != "socket" {
        return Err(QmpError::generic(format!(
            "chardev backend '{backend}' is not supported (only 'socket')"
        )));
    }
    let id = o.req_str("id")?;
    let Some(path) = o.str("path")? else {
        return Err(QmpError::generic(
            "chardev: only Unix sockets ('path=') are supported",
        ));
    };
    if !o.bool("server")?.unwrap_or(false) {
        return Err(QmpError::generic(
            "chardev: only listening sockets (server=on) are supported",
        ));
    }
    // wait=on would block start-up until a client connects; the daemon
    // never waits (as with wait=off).
    let _wait = o.bool("wait")?;
    o.finish()?;
    Ok((id, PathBuf::from(path)))
}

/// `--monitor [chardev=]ID[,mode=control]`.
fn monitor(v: Value, chardevs: &[(String, PathBuf)]) -> QResult<MonitorSocket> {
    let mut o = Opts::new(v, true)?;
    let id = o.req_str("chardev")?;
    if let Some(mode) = o.str("mode")? {
        if mode != "control" {
            return Err(QmpError::generic("only QMP monitors (mode=control)"));
        }
    }
    let _pretty = o.bool("pretty")?;
    o.finish()?;
    let path = chardevs
        .iter()
        .find(|(c, _)| *c == id)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| QmpError::generic(format!("chardev '{id}' not found")))?;
    Ok(MonitorSocket { path })
}
