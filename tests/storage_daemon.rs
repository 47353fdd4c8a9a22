//! The `storage_daemon` example as a user runs it: a real process started
//! with qemu-storage-daemon's command line, driven over QMP (a raw client
//! here, and QEMU's own Python library `qemu.qmp` in `tests/qmp/parity.py`,
//! run unchanged against `qemu-storage-daemon` in the same test), with
//! `qemu-img`, `qemu-io` and `nbdinfo` as NBD clients, stopped by SIGTERM
//! and by `quit` without losing a write.
//!
//! Every test has a watchdog; every daemon process is killed by a guard
//! if its test fails; sockets and images live in temporary directories.

mod common;
mod nbd_client;

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::process::{self, have, output_within, skip, tool};
use common::watchdog;
use nbd_client::{Client, CMD_READ, CMD_WRITE};
use serde_json::{json, Value};

/// How long a daemon may take to start, answer or stop (debug builds on
/// two busy cores).
const LIMIT: Duration = Duration::from_secs(60);

/// The `storage_daemon` binary: the one `cargo test` built with the
/// examples, or, when it is missing or older than its sources, built here
/// (as `tests/img_tool.rs` does for `img`).
fn daemon_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| process::example_binary("storage_daemon"))
}

/// A daemon process, killed when dropped (a failing test leaves no
/// process behind).
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `bin` with `args`; waits until `ready` (a socket) accepts a
    /// connection (its file exists from bind(), a moment before listen()).
    fn start(bin: &Path, args: &[String], dir: &Path, ready: &Path) -> Daemon {
        let log = dir.join(format!(
            "{}.log",
            bin.file_name().and_then(|n| n.to_str()).unwrap_or("daemon")
        ));
        let mut cmd = Command::new(bin);
        // If the test process dies without running destructors (the
        // watchdog exits it), the daemon dies with it.
        // SAFETY: prctl(2) between fork and exec touches no memory of ours.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut d = Daemon {
            child: Some(child),
            log,
        };
        let start = Instant::now();
        while !(ready.exists() && std::os::unix::net::UnixStream::connect(ready).is_ok()) {
            if let Some(status) = d.try_wait() {
                panic!(
                    "{} exited with {status} at start:\n{}",
                    bin.display(),
                    d.log()
                );
            }
            assert!(
                start.elapsed() < LIMIT,
                "{} did not create {} within {LIMIT:?}:\n{}",
                bin.display(),
                ready.display(),
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `signal` to the daemon.
    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for the daemon to exit.
    fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                self.child = None;
                return s;
            }
            assert!(
                start.elapsed() < LIMIT,
                "the daemon did not exit within {LIMIT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw QMP client: one JSON object a line each way.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Events read while waiting for replies.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects and reads the greeting.
    fn connect(path: &Path) -> (Qmp, Value) {
        let s = UnixStream::connect(path).expect("QMP socket");
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        let mut q = Qmp {
            w: s.try_clone().expect("clone"),
            r: BufReader::new(s),
            events: Vec::new(),
        };
        let greeting = q.recv();
        (q, greeting)
    }

    /// Connects and negotiates capabilities.
    fn ready(path: &Path) -> Qmp {
        let (mut q, _) = Qmp::connect(path);
        assert_eq!(
            q.execute("qmp_capabilities", json!({})),
            json!({"return": {}})
        );
        q
    }

    fn send_raw(&mut self, text: &str) {
        self.w.write_all(text.as_bytes()).expect("send");
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("QMP reply");
        assert!(n > 0, "the daemon closed the QMP connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The next reply that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let m = self.recv();
            if m.get("event").is_some() {
                self.events.push(m);
            } else {
                return m;
            }
        }
    }

    fn execute(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.send_raw(&format!("{msg}\n"));
        self.reply()
    }

    /// The next event named `name`.
    fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let m = self.recv();
            if m["event"] == name {
                return m;
            }
            self.events.push(m);
        }
    }
}

fn error_class(reply: &Value) -> &str {
    reply["error"]["class"].as_str().unwrap_or("(no error)")
}

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_owned()
}

/// The command line both daemons take: file node `f0` and qcow2 node `d0`
/// on `image`, an optional NBD server and writable export `disk`, and a
/// monitor on `dir/qmp.sock`.
fn args(dir: &Path, image: &Path, nbd: bool) -> Vec<String> {
    let mut a = vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", s(image)),
        "--blockdev".into(),
        "driver=qcow2,node-name=d0,file=f0".into(),
    ];
    if nbd {
        a.extend([
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", s(&dir.join("nbd.sock"))),
            "--export".into(),
            "type=nbd,id=e0,node-name=d0,name=disk,writable=on".into(),
        ]);
    }
    a.extend([
        "--chardev".into(),
        format!(
            "socket,id=m0,path={},server=on,wait=off",
            s(&dir.join("qmp.sock"))
        ),
        "--monitor".into(),
        "chardev=m0".into(),
    ]);
    a
}

/// A fresh directory with `disk.qcow2` of `size` in it.
fn with_disk(size: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    image(dir.path(), "disk.qcow2", None, size, &[]);
    let disk = dir.path().join("disk.qcow2");
    (dir, disk)
}

/// Our daemon on [`args`]'s command line, started in `dir`.
fn start_ours(dir: &Path, image: &Path, nbd: bool) -> Daemon {
    Daemon::start(
        daemon_binary(),
        &args(dir, image, nbd),
        dir,
        &dir.join("qmp.sock"),
    )
}

fn url(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", s(&dir.join("nbd.sock")))
}

/// Writes `len` bytes of `pattern` at `offset` through the export with a
/// raw NBD client, without any flush, and leaves the connection open.
fn write_unflushed(dir: &Path, writes: &[(u64, u32, u8)]) -> Client {
    let mut c = Client::connect(&dir.join("nbd.sock"));
    c.handshake("disk", false).expect("NBD handshake");
    for &(offset, len, pattern) in writes {
        let r = c
            .request(CMD_WRITE, 0, offset, len, &vec![pattern; len as usize])
            .expect("write reply");
        assert_eq!(r.error, 0, "write at {offset}");
    }
    let r = c.request(CMD_READ, 0, writes[0].0, 512, &[]).expect("read");
    assert_eq!(r.data, vec![writes[0].2; 512]);
    c
}

/// The same writes, applied by qemu-io to a reference copy.
fn reference(dir: &Path, writes: &[(u64, u32, u8)]) -> PathBuf {
    let reference = dir.join("reference.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &s(&reference), "64M"],
    );
    let mut a = vec!["-f".to_string(), "qcow2".into(), s(&reference)];
    for (offset, len, pattern) in writes {
        a.push("-c".into());
        a.push(format!("write -P {pattern} {offset} {len}"));
    }
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    tool("qemu-io", &a);
    reference
}

const WRITES: &[(u64, u32, u8)] = &[
    (0, 65536, 0x11),
    (1 << 20, 4096, 0x22),
    (32 << 20, 1 << 20, 0x33),
    (63 << 20, 512, 0x44),
];

#[test]
fn sigterm_after_unflushed_writes_through_the_export_loses_nothing() {
    let _w = watchdog(
        "sigterm_after_unflushed_writes_through_the_export_loses_nothing",
        Duration::from_secs(180),
    );
    let (dir, image) = with_disk("64M");
    let mut d = start_ours(dir.path(), &image, true);
    // qemu-img and nbdinfo see the export the command line made.
    let info: Value = serde_json::from_str(&tool(
        "qemu-img",
        &["info", "--output=json", &url(dir.path())],
    ))
    .expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 64 << 20);
    let nbd: Value =
        serde_json::from_str(&tool("nbdinfo", &["--json", &url(dir.path())])).expect("JSON");
    assert_eq!(nbd["exports"][0]["export-size"], 64 << 20);
    assert_eq!(nbd["exports"][0]["is_read_only"], false);

    let client = write_unflushed(dir.path(), WRITES);
    d.signal(libc::SIGTERM);
    let status = d.wait();
    assert!(status.success(), "exit status {status}:\n{}", d.log());
    drop(client);
    assert!(
        !dir.path().join("qmp.sock").exists(),
        "monitor socket left behind"
    );
    assert!(
        !dir.path().join("nbd.sock").exists(),
        "NBD socket left behind"
    );
    let reference = reference(dir.path(), WRITES);
    tool("qemu-img", &["check", &s(&image)]);
    tool("qemu-img", &["compare", &s(&image), &s(&reference)]);
}

#[test]
fn quit_over_qmp_flushes_every_node_and_exits_zero() {
    let _w = watchdog(
        "quit_over_qmp_flushes_every_node_and_exits_zero",
        Duration::from_secs(180),
    );
    let (dir, image) = with_disk("64M");
    let mut d = start_ours(dir.path(), &image, true);
    let client = write_unflushed(dir.path(), WRITES);
    let mut q = Qmp::ready(&dir.path().join("qmp.sock"));
    // Another connection sees the export's deletion at shutdown.
    let mut watcher = Qmp::ready(&dir.path().join("qmp.sock"));
    assert_eq!(q.execute("quit", json!({})), json!({"return": {}}));
    let ev = watcher.event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert!(ev["timestamp"]["seconds"].as_u64().is_some());
    let status = d.wait();
    assert!(status.success(), "exit status {status}:\n{}", d.log());
    drop(client);
    let reference = reference(dir.path(), WRITES);
    tool("qemu-img", &["compare", &s(&image), &s(&reference)]);
}

#[test]
fn qmp_wire_protocol_errors_and_pending_commands() {
    let _w = watchdog(
        "qmp_wire_protocol_errors_and_pending_commands",
        Duration::from_secs(120),
    );
    let (dir, image) = with_disk("16M");
    let qmp = dir.path().join("qmp.sock");
    let mut d = start_ours(dir.path(), &image, false);

    let (mut q, greeting) = Qmp::connect(&qmp);
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
        "{greeting}"
    );
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    // Negotiation mode.
    let r = q.execute("query-version", json!({}));
    assert_eq!(error_class(&r), "CommandNotFound", "{r}");
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("qmp_capabilities"));
    assert_eq!(
        error_class(&q.execute("qmp_capabilities", json!({"enable": ["oob"]}))),
        "GenericError"
    );
    assert_eq!(
        q.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    assert_eq!(
        error_class(&q.execute("qmp_capabilities", json!({}))),
        "CommandNotFound"
    );
    // Malformed input: an error each, and the connection goes on. Several
    // objects in one write, one object over several lines, ids echoed.
    q.send_raw("{\"execute\": \"query-version\", \"id\": [1, {\"x\": null}]}{\"execute\":\n\"quit\", \"bogus\": 1, \"id\": 2}\n");
    let r = q.reply();
    assert_eq!(r["id"], json!([1, {"x": null}]));
    assert_eq!(
        r["return"]["package"]
            .as_str()
            .map(|p| p.contains("blockgraph")),
        Some(true)
    );
    let r = q.reply();
    assert_eq!(
        (error_class(&r), &r["id"]),
        ("GenericError", &json!(2)),
        "{r}"
    );
    for bad in [
        &b"nonsense\n"[..],
        b"[1, 2]\n",
        b"\"s\"\n",
        b"{\"id\": 1}\n",
        b"}\n",
        b"{\"execute\": 5}\n",
        b"{\"execute\": \"query-version\", \"arguments\": 5}\n",
        b"{\"execute\": \"x\xff\"}\n",
    ] {
        q.w.write_all(bad).expect("send");
        let r = q.reply();
        assert_eq!(error_class(&r), "GenericError", "{bad:?}: {r}");
    }
    // Deep nesting and a huge message: errors, not a crash.
    q.send_raw(&format!("{}\n", "[".repeat(5000)));
    assert_eq!(error_class(&q.reply()), "GenericError");
    q.send_raw(&format!("{}\n", "]".repeat(5000)));
    q.send_raw(&format!(
        "{{\"execute\": \"query-version\", \"id\": \"{}\"}}\n",
        "x".repeat(2 << 20)
    ));
    let mut saw = 0;
    let mut errors = 0;
    q.send_raw("{\"execute\": \"query-version\", \"id\": \"after\"}\n");
    loop {
        let r = q.reply();
        if r["id"] == "after" {
            assert!(r.get("return").is_some());
            break;
        }
        errors += usize::from(r.get("error").is_some());
        saw += 1;
        assert!(saw < 10_000, "runaway replies");
    }
    assert!(errors >= 1);

    // Arguments are checked like QAPI's.
    let r = q.execute("blockdev-del", json!({}));
    assert_eq!(error_class(&r), "GenericError");
    assert_eq!(r["error"]["desc"], "Parameter 'node-name' is missing");
    let r = q.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n", "size": "big"}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Invalid parameter type for 'size', expected: integer"
    );
    assert_eq!(
        error_class(&q.execute("no-such-command", json!({}))),
        "CommandNotFound"
    );

    // No command is pending at the moment (blockdev-mirror and
    // blockdev-backup were the last): both are listed, below.
    let listed: Vec<String> = q.execute("query-commands", json!({}))["return"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    for name in [
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "blockdev-snapshot",
        "blockdev-snapshot-sync",
        "transaction",
        "block-stream",
        "block-commit",
        "blockdev-mirror",
        "blockdev-backup",
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-merge",
        "query-jobs",
        "query-block-jobs",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
        "block-job-set-speed",
        "nbd-server-start",
        "block-export-add",
        "quit",
        "qmp_capabilities",
    ] {
        assert!(listed.contains(&name.to_owned()), "{name} not listed");
    }

    // Several connections at once; events reach every negotiated one.
    let mut other = Qmp::ready(&qmp);
    let (mut unnegotiated, _) = Qmp::connect(&qmp);
    let nbd = dir.path().join("nbd.sock");
    let r = other.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s(&nbd)}}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "d0"}),
    );
    assert_eq!(r, json!({"return": {}}));
    let info = tool(
        "qemu-img",
        &[
            "info",
            "--output=json",
            &format!("nbd+unix:///d0?socket={}", s(&nbd)),
        ],
    );
    assert!(info.contains("16777216"), "{info}");
    // qemu-img has hung up, but the daemon sees the connection end a
    // moment later (in QEMU too): until then a safe deletion is refused as
    // still in use.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut r = q.execute("block-export-del", json!({"id": "e1"}));
    while r["error"]["desc"] == "export 'e1' still in use" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        r = q.execute("block-export-del", json!({"id": "e1"}));
    }
    assert_eq!(r, json!({"return": {}}));
    for c in [&mut q, &mut other] {
        assert_eq!(c.event("BLOCK_EXPORT_DELETED")["data"], json!({"id": "e1"}));
    }
    // No events before negotiation: the next line is the reply.
    let r = unnegotiated.execute("qmp_capabilities", json!({}));
    assert_eq!(r, json!({"return": {}}));
    assert!(unnegotiated.events.is_empty());
    assert_eq!(
        other.execute("nbd-server-stop", json!({})),
        json!({"return": {}})
    );

    assert_eq!(q.execute("quit", json!({})), json!({"return": {}}));
    let status = d.wait();
    assert!(status.success(), "exit status {status}:\n{}", d.log());
}

#[test]
fn a_command_line_that_cannot_be_applied_exits_one_with_the_reason() {
    let _w = watchdog(
        "a_command_line_that_cannot_be_applied_exits_one_with_the_reason",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |a: &[&str]| {
        output_within(
            Command::new(daemon_binary())
                .args(a)
                .current_dir(dir.path()),
            LIMIT,
        )
    };
    for (a, expect) in [
        (&["--bogus"][..], "unrecognized option"),
        (
            &[
                "--blockdev",
                "driver=file,node-name=f0,filename=missing.img",
            ][..],
            "Could not open 'missing.img'",
        ),
        (
            &["--blockdev", "driver=qcow2,node-name=d0,file=nope"][..],
            "Cannot find device='nope'",
        ),
        (
            &["--export", "type=nbd,id=e0,node-name=x"][..],
            "Cannot find device=''",
        ),
        (
            &[
                "--blockdev",
                "driver=null-co,node-name=n0",
                "--export",
                "type=nbd,id=e0,node-name=n0",
            ][..],
            "NBD server not running",
        ),
        (
            &["--monitor", "chardev=nope"][..],
            "chardev 'nope' not found",
        ),
        (
            &["--blockdev", "driver=null-co,node-name=n0,size=lots"][..],
            "size",
        ),
    ] {
        let out = run(a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{a:?}: {err}");
        assert!(err.contains(expect), "{a:?}: {err}");
    }
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--blockdev"));
}

#[test]
fn tcp_nbd_server_and_throttle_group_from_the_command_line() {
    let _w = watchdog(
        "tcp_nbd_server_and_throttle_group_from_the_command_line",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // A free port: bind, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let qmp = dir.path().join("qmp.sock");
    let a: Vec<String> = [
        "--object",
        "throttle-group,id=tg0,limits.iops-total=100000",
        "--blockdev",
        "driver=null-co,node-name=n0,size=8M,read-zeroes=on",
        "--blockdev",
        "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
        "--nbd-server",
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export",
        "type=nbd,id=e0,node-name=t0,name=t",
        "--chardev",
        &format!("socket,id=m0,path={},server=on,wait=off", s(&qmp)),
        "--monitor",
        "m0",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let mut d = Daemon::start(daemon_binary(), &a, dir.path(), &qmp);
    let info = tool(
        "qemu-img",
        &[
            "info",
            "--output=json",
            &format!("nbd://127.0.0.1:{port}/t"),
        ],
    );
    assert!(info.contains("8388608"), "{info}");
    tool(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{port}/t"),
            "-c",
            "read -P 0 0 64k",
        ],
    );
    let mut q = Qmp::ready(&qmp);
    let nodes = q.execute("query-named-block-nodes", json!({}))["return"].clone();
    let t0 = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node-name"] == "t0"))
        .expect("t0 listed")
        .clone();
    assert_eq!(t0["drv"], "throttle");
    assert_eq!(t0["image"]["virtual-size"], 8 << 20);
    // The group is in use; the node is exported.
    assert_eq!(
        error_class(&q.execute("object-del", json!({"id": "tg0"}))),
        "GenericError"
    );
    assert_eq!(
        error_class(&q.execute("blockdev-del", json!({"node-name": "t0"}))),
        "GenericError"
    );
    d.signal(libc::SIGINT);
    assert!(d.wait().success(), "{}", d.log());
}

/// Whether QEMU's Python QMP library is importable.
fn have_qemu_qmp() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The images `parity.py` expects: raw.img, and the chain base <- top.
fn parity_images(w: &Path) {
    raw(w, "raw.img", "1M");
    build_images(
        w,
        &[
            ("base.qcow2", None, "16M", &[]),
            ("top.qcow2", Some("base.qcow2"), "16M", &[]),
        ],
        &[],
    );
}

/// Runs `tests/qmp/<script>` against `bin` (started with [`args`]'s command
/// line) in a fresh directory that `setup` fills; returns what the script
/// observed. The daemon must exit 0 after the script's `quit`.
fn script_run(bin: &Path, script: &str, setup: fn(&Path)) -> Value {
    let (dir, _) = with_disk("64M");
    setup(dir.path());
    script_run_in(bin, script, dir.path(), &[])
}

/// Runs `tests/qmp/<script> QMP_SOCKET W NBD_SOCKET extra...` against
/// `bin` started on `w/disk.qcow2` (which must exist), as
/// [`script_run`] does, in `w` as it is (a second run sees what the
/// first left).
fn script_run_in(bin: &Path, script: &str, w: &Path, extra: &[&str]) -> Value {
    let image = w.join("disk.qcow2");
    let qmp = w.join("qmp.sock");
    // A socket file an earlier daemon left would look ready at once.
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(w.join("nbd.sock"));
    let mut d = Daemon::start(bin, &args(w, &image, false), w, &qmp);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp")
        .join(script);
    let out = output_within(
        Command::new("python3")
            .arg(&path)
            .arg(&qmp)
            .arg(w)
            .arg(w.join("nbd.sock"))
            .args(extra),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{script} against {} failed:\n{}\n--- daemon log ---\n{}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let status = d.wait();
    assert!(
        status.success(),
        "{} exited with {status}:\n{}",
        bin.display(),
        d.log()
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

#[test]
fn qemu_qmp_script_observes_the_same_as_with_qemu_storage_daemon() {
    parity(
        "qemu_qmp_script_observes_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "parity.py", parity_images),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            assert_eq!(
                ours["qemu-img-info"],
                json!([0, 67108864, "raw"]),
                "{ours:#}"
            );
            assert_eq!(ours["qemu-io"], 0);
            assert_eq!(ours["raw"]["quit"], json!(["return", "q"]));
        },
    );
}

/// A parity test, under a watchdog and skipped without `qemu.qmp`: `run`
/// (a script run, given the daemon binary) against ours, `check` what
/// must hold with ours whatever QEMU does, then, where
/// qemu-storage-daemon is installed, `run` against it and compare the
/// two documents.
fn parity(name: &'static str, run: impl Fn(&Path) -> Value, check: impl FnOnce(&Value)) {
    let _w = watchdog(name, Duration::from_secs(300));
    if !have_qemu_qmp() {
        skip(&format!(
            "{name}: the Python package `qemu.qmp` is missing (pip install qemu.qmp; \
             .ci/run installs it)"
        ));
        return;
    }
    let ours = run(daemon_binary());
    check(&ours);
    if !have("qemu-storage-daemon") {
        skip(
            "the comparison with qemu-storage-daemon: it is not installed (Debian qemu-utils \
             ships it; .ci/run installs that)",
        );
        return;
    }
    let qemu = run(Path::new("qemu-storage-daemon"));
    assert_same(&ours, &qemu);
}

/// Fails with the differing lines when two scripts' documents differ.
/// What a jobs parity script reports for ours: every named guest write
/// (qemu-io's rc) succeeded, and every `compare` and `qemu-img check` it
/// ran exited 0.
fn assert_writes_compares_checks(ours: &Value, writes: &[&str]) {
    for w in writes {
        assert_eq!(ours[*w], 0, "{w}: {ours:#}");
    }
    for (what, rc) in ours["compare"].as_object().expect("compares") {
        assert_eq!(rc, 0, "{what}: {ours:#}");
    }
    for (image, rc) in ours["check"].as_object().expect("checks") {
        assert_eq!(rc, 0, "qemu-img check {image}: {ours:#}");
    }
}

fn assert_same(ours: &Value, qemu: &Value) {
    if ours != qemu {
        let a = serde_json::to_string_pretty(ours).unwrap_or_default();
        let b = serde_json::to_string_pretty(qemu).unwrap_or_default();
        let diff: Vec<String> = a
            .lines()
            .zip(b.lines())
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, (x, y))| format!("line {i}: ours {x} | qemu {y}"))
            .take(40)
            .collect();
        panic!(
            "the same QMP script observed different results:\n{}\n--- ours ---\n{a}\n--- qemu-storage-daemon ---\n{b}",
            diff.join("\n")
        );
    }
}

/// `qemu-img create -f qcow2 [-b backing -F qcow2] name size`, then
/// `qemu-io` writes `(pattern, offset, len)` into it.
fn image(w: &Path, name: &str, backing: Option<&str>, size: &str, writes: &[(u8, &str, &str)]) {
    let path = s(&w.join(name));
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        a.extend(["-b", b, "-F", "qcow2"]);
    }
    a.extend([path.as_str(), size]);
    tool("qemu-img", &a);
    for (pattern, offset, len) in writes {
        let cmd = format!("write -P {pattern} {offset} {len}");
        tool("qemu-io", &["-f", "qcow2", &path, "-c", &cmd]);
    }
}

/// A qcow2 image for [`build_images`]: name, backing file, size, and
/// `qemu-io` writes `(pattern, offset, len)`.
type Qcow2Image<'a> = (
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a [(u8, &'a str, &'a str)],
);

/// The qcow2 `images` in `w`, in order (backing files first), then raw
/// copies `(from, to)` of what some of them read.
fn build_images(w: &Path, images: &[Qcow2Image], raw_copies: &[(&str, &str)]) {
    for &(name, backing, size, writes) in images {
        image(w, name, backing, size, writes);
    }
    for (from, to) in raw_copies {
        tool(
            "qemu-img",
            &["convert", "-O", "raw", &s(&w.join(from)), &s(&w.join(to))],
        );
    }
}

/// `qemu-img create -f raw name size` in `w`.
fn raw(w: &Path, name: &str, size: &str) {
    tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", &s(&w.join(name)), size],
    );
}

/// The images `jobs.py` expects: the chain base <- mid <- top (what top
/// reads also in ref.raw), the chain cbase <- ctop for the cancelled job,
/// disks a and b for the transaction (what a reads also in a0.raw), solo
/// and its overlay ov (for blockdev-snapshot).
fn jobs_images(w: &Path) {
    build_images(
        w,
        &[
            ("base.qcow2", None, "32M", &[(0x11, "0", "16M")]),
            (
                "mid.qcow2",
                Some("base.qcow2"),
                "32M",
                &[(0x22, "4M", "8M")],
            ),
            (
                "top.qcow2",
                Some("mid.qcow2"),
                "32M",
                &[(0x33, "10M", "1M")],
            ),
            ("cbase.qcow2", None, "32M", &[(0x44, "0", "32M")]),
            ("ctop.qcow2", Some("cbase.qcow2"), "32M", &[]),
            ("a.qcow2", None, "16M", &[(0x55, "0", "8M")]),
            ("b.qcow2", None, "16M", &[(0x66, "8M", "8M")]),
            ("solo.qcow2", None, "16M", &[]),
            ("ov.qcow2", Some("solo.qcow2"), "16M", &[]),
        ],
        &[("top.qcow2", "ref.raw"), ("a.qcow2", "a0.raw")],
    );
}

/// `tests/qmp/jobs.py` against both daemons: a transaction snapshotting
/// two disks at once (and refused ones that change nothing),
/// blockdev-snapshot, block-stream to completion while qemu-io writes
/// through the NBD export, query-jobs of a paused job, the verbs, cancel,
/// manual finalize, argument errors with QEMU's words, events in QEMU's
/// order; after exit, the images' chains, checks and data.
#[test]
fn jobs_snapshots_and_transactions_observe_the_same_as_with_qemu_storage_daemon() {
    parity(
        "jobs_snapshots_and_transactions_observe_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "jobs.py", jobs_images),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            assert_eq!(ours["transaction"], json!({"return": {}}), "{ours:#}");
            assert_eq!(
                ours["transaction-refused-changes-nothing"], true,
                "{ours:#}"
            );
            assert_eq!(ours["guest-writes-during-stream"], 0, "{ours:#}");
            assert_eq!(
                ours["stream-events"]["sequence"],
                json!([
                    "created",
                    "running",
                    "waiting",
                    "pending",
                    {"BLOCK_JOB_COMPLETED": {"device": "j1", "len": 33554432, "offset": "len",
                                             "speed": 0, "type": "stream"}},
                    "concluded",
                    "null"
                ]),
                "{ours:#}"
            );
            assert_eq!(ours["stream-events"]["paused-on-the-way"], true);
            assert_eq!(ours["compare"]["top-vs-reference"], 0, "{ours:#}");
            assert_eq!(ours["compare"]["a-vs-before"], 0, "{ours:#}");
            assert_eq!(ours["compare"]["sa-has-write"], 0, "{ours:#}");
            for (image, rc) in ours["check"].as_object().expect("checks") {
                assert_eq!(rc, 0, "qemu-img check {image}: {ours:#}");
            }
            // We remove what a refused transaction created; QEMU leaves it.
            assert_eq!(ours["leftover-files"], json!([]));
        },
    );
}

/// What only this daemon is asked (QEMU would do or answer otherwise, see
/// DESIGN.md §14): malformed job and snapshot arguments get QAPI errors and
/// nothing panics; transaction actions that are not here yet are refused
/// as an unknown type; a transaction whose second overlay cannot be
/// created leaves nothing behind (QEMU keeps the first file); `quit`
/// while a job runs cancels it (BLOCK_JOB_CANCELLED reaches the client)
/// and exits 0 with the chain intact.
#[test]
fn job_and_snapshot_commands_refuse_bad_input_and_quit_cancels_running_jobs() {
    let _w = watchdog(
        "job_and_snapshot_commands_refuse_bad_input_and_quit_cancels_running_jobs",
        Duration::from_secs(120),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let w = dir.path();
    image(w, "base.qcow2", None, "16M", &[(0x11, "0", "16M")]);
    image(w, "top.qcow2", Some("base.qcow2"), "16M", &[]);
    image(w, "b.qcow2", None, "16M", &[]);
    image(w, "disk.qcow2", None, "16M", &[]);
    let qmp = w.join("qmp.sock");
    let mut d = start_ours(w, &w.join("disk.qcow2"), false);
    let mut q = Qmp::ready(&qmp);
    for (name, file) in [("top", "top.qcow2"), ("b", "b.qcow2")] {
        let r = q.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name,
                   "file": {"driver": "file", "filename": s(&w.join(file))}}),
        );
        assert_eq!(r, json!({"return": {}}), "{r}");
    }
    let nodes = |q: &mut Qmp| q.execute("query-named-block-nodes", json!({"flat": true}));
    let before = nodes(&mut q);

    let desc = |r: &Value| r["error"]["desc"].as_str().unwrap_or("").to_owned();
    for (cmd, args, want) in [
        (
            "block-stream",
            json!({"device": 5}),
            "Invalid parameter type for 'device', expected: string",
        ),
        (
            "block-stream",
            json!({"job-id": "j", "device": "top", "speed": "fast"}),
            "expected: integer",
        ),
        (
            "block-stream",
            json!({"job-id": "j", "device": "top", "auto-dismiss": 1}),
            "expected: boolean",
        ),
        (
            "block-commit",
            json!({"device": 5}),
            "Invalid parameter type for 'device', expected: string",
        ),
        (
            "block-commit",
            json!({"job-id": "j", "device": "top", "top-node": ["x"]}),
            "Invalid parameter type for 'top-node', expected: string",
        ),
        (
            "block-commit",
            json!({"job-id": "j", "device": "top", "backing-mask-protocol": "yes"}),
            "expected: boolean",
        ),
        // Active commit takes no backing file name (no header to rewrite).
        (
            "block-commit",
            json!({"job-id": "j", "device": "top", "backing-file": "x"}),
            "'backing-file' specified, but 'top' is the active layer",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "b", "target": "x", "bitmaps": [5]}),
            "Invalid parameter type for 'bitmaps[0]', expected: BlockDirtyBitmapOrStr",
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "b", "target": "x", "bitmaps": "y"}),
            "Invalid parameter type for 'bitmaps', expected: array",
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "b", "name": 5}),
            "Invalid parameter type for 'name', expected: string",
        ),
        ("job-pause", json!({}), "Parameter 'id' is missing"),
        ("job-cancel", json!({"id": ["x"]}), "expected: string"),
        (
            "block-job-set-speed",
            json!({"device": "x"}),
            "Parameter 'speed' is missing",
        ),
        ("query-jobs", json!({"x": 1}), "Parameter 'x' is unexpected"),
        ("transaction", json!({}), "Parameter 'actions' is missing"),
        ("transaction", json!({"actions": {}}), "expected: array"),
        (
            "transaction",
            json!({"actions": [5]}),
            "'actions[0]', expected: object",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "abort"}]}),
            "Parameter 'actions[0].data' is missing",
        ),
        (
            "transaction",
            json!({"actions": [{"data": {}}]}),
            "Parameter 'actions[0].type' is missing",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "drive-backup", "data": {}}]}),
            "Parameter 'type' does not accept value 'drive-backup'",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {}}]}),
            "Parameter 'actions[0].data.node' is missing",
        ),
        (
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "sometimes"}}),
            "does not accept value 'sometimes'",
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "b", "snapshot-node-name": "s"}),
            "Parameter 'snapshot-file' is missing",
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "b", "snapshot-node-name": "s",
                                          "snapshot-file": "x", "mode": "later"}),
            "does not accept value 'later'",
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "b", "snapshot-node-name": "s",
                                          "snapshot-file": "x", "format": "vmdk"}),
            "qcow2 overlays only",
        ),
        (
            "blockdev-snapshot",
            json!({"node": "b"}),
            "Parameter 'overlay' is missing",
        ),
    ] {
        let r = q.execute(cmd, args.clone());
        assert_eq!(error_class(&r), "GenericError", "{cmd} {args}: {r}");
        assert!(desc(&r).contains(want), "{cmd} {args}: {r}");
    }

    // An empty merge list merges nothing (qemu-storage-daemon 10.0.2
    // crashes on it).
    let r = q.execute("block-dirty-bitmap-add", json!({"node": "b", "name": "m"}));
    assert_eq!(r, json!({"return": {}}), "{r}");
    let r = q.execute(
        "block-dirty-bitmap-merge",
        json!({"node": "b", "target": "m", "bitmaps": []}),
    );
    assert_eq!(r, json!({"return": {}}), "{r}");
    let r = q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "b", "name": "m"}),
    );
    assert_eq!(r, json!({"return": {}}), "{r}");

    // The second overlay cannot be created: the first one's node and file
    // go again, and the graph is as before.
    let r = q.execute(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-snapshot-sync",
             "data": {"node-name": "b", "snapshot-node-name": "sb",
                      "snapshot-file": s(&w.join("sb.qcow2"))}},
            {"type": "blockdev-snapshot-sync",
             "data": {"node-name": "d0", "snapshot-node-name": "sd",
                      "snapshot-file": s(&w.join("no-such-dir/sd.qcow2"))}}]}),
    );
    assert!(desc(&r).starts_with("Could not create"), "{r}");
    assert!(
        !w.join("sb.qcow2").exists(),
        "the first overlay's file is removed"
    );
    let strip = |v: Value| -> Value {
        // Only host-side sizes may move.
        let mut v = v;
        for n in v["return"].as_array_mut().into_iter().flatten() {
            n["image"]["actual-size"] = Value::Null;
        }
        v
    };
    assert_eq!(strip(nodes(&mut q)), strip(before));

    // quit while a stream runs: cancelled, the chain stays, exit 0.
    let r = q.execute(
        "block-stream",
        json!({"job-id": "slow", "device": "top", "speed": 65536}),
    );
    assert_eq!(r, json!({"return": {}}), "{r}");
    // created and running came before the answer, as QEMU sends them.
    let before_answer: Vec<&Value> = q
        .events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE")
        .map(|e| &e["data"]["status"])
        .collect();
    assert_eq!(before_answer, [&json!("created"), &json!("running")]);
    let jobs = q.execute("query-jobs", json!({}));
    assert_eq!(jobs["return"][0]["status"], "running", "{jobs}");
    assert_eq!(q.execute("quit", json!({})), json!({"return": {}}));
    let cancelled = q.event("BLOCK_JOB_CANCELLED");
    assert_eq!(cancelled["data"]["device"], "slow", "{cancelled}");
    assert!(d.wait().success(), "{}", d.log());
    let info = tool(
        "qemu-img",
        &["info", "--backing-chain", &s(&w.join("top.qcow2"))],
    );
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    tool("qemu-img", &["check", "-q", &s(&w.join("top.qcow2"))]);
}

/// The images `commit.py` expects: the chain base <- mid <- top (ref.raw
/// = what top reads, base-after.raw = what mid reads), the chain cbase <-
/// cmid <- ctop (cref.raw = what ctop reads), and solo.
fn commit_images(w: &Path) {
    build_images(
        w,
        &[
            ("base.qcow2", None, "32M", &[(0x11, "0", "16M")]),
            (
                "mid.qcow2",
                Some("base.qcow2"),
                "32M",
                &[(0x22, "4M", "8M"), (0x23, "24M", "1M")],
            ),
            (
                "top.qcow2",
                Some("mid.qcow2"),
                "32M",
                &[(0x33, "10M", "1M")],
            ),
            ("cbase.qcow2", None, "32M", &[(0x44, "0", "32M")]),
            (
                "cmid.qcow2",
                Some("cbase.qcow2"),
                "32M",
                &[(0x45, "0", "8M")],
            ),
            ("ctop.qcow2", Some("cmid.qcow2"), "32M", &[]),
            ("solo.qcow2", None, "16M", &[]),
        ],
        &[
            ("top.qcow2", "ref.raw"),
            ("mid.qcow2", "base-after.raw"),
            ("ctop.qcow2", "cref.raw"),
        ],
    );
}

/// `tests/qmp/commit.py` against both daemons: block-commit's argument
/// errors in QEMU's words, a commit of the middle of a three-image chain
/// while qemu-io writes through the NBD export of the active layer (paused,
/// queried, resumed, completed: events, query-jobs, the nodes during and
/// after), a cancelled commit; after exit, the chains, checks, and the
/// data compared with references.
#[test]
fn block_commit_observes_the_same_as_with_qemu_storage_daemon() {
    parity(
        "block_commit_observes_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "commit.py", commit_images),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            assert_eq!(ours["commit"], json!({"return": {}}), "{ours:#}");
            assert_eq!(ours["errors-change-nothing"], true, "{ours:#}");
            assert_eq!(ours["guest-writes-during-commit"], 0, "{ours:#}");
            assert_eq!(
                ours["commit-events"]["sequence"],
                json!([
                    "created",
                    "running",
                    "waiting",
                    "pending",
                    {"BLOCK_JOB_COMPLETED": {"device": "k1", "len": 33554432, "offset": "len",
                                             "speed": 0, "type": "commit"}},
                    "concluded",
                    "null"
                ]),
                "{ours:#}"
            );
            assert_eq!(ours["commit-events"]["paused-on-the-way"], true);
            assert_eq!(ours["chain-after"], json!([1, ["base.qcow2"]]), "{ours:#}");
            assert_eq!(
                ours["cancel-chain-kept"],
                json!([2, ["cmid.qcow2", "cbase.qcow2"]]),
                "{ours:#}"
            );
            let left: Vec<&Value> = ours["nodes-at-end"]
                .as_array()
                .expect("nodes")
                .iter()
                .map(|n| &n["file"])
                .filter(|f| *f == "top.qcow2" || *f == "base.qcow2")
                .collect();
            assert!(left.is_empty(), "blockdev-del top left {left:?}");
            assert_writes_compares_checks(ours, &[]);
        },
    );
}

/// The images `bitmaps.py` expects: bm.qcow2 and r.raw (16 MiB), s.raw
/// (4 MiB), inc.qcow2 with a persistent bitmap `bx` flagged in use (what
/// a writer that crashed leaves: inconsistent).
fn bitmap_images(w: &Path) {
    image(w, "bm.qcow2", None, "16M", &[]);
    let inc = s(&w.join("inc.qcow2"));
    image(w, "inc.qcow2", None, "16M", &[]);
    tool("qemu-img", &["bitmap", "--add", &inc, "bx"]);
    tool("qemu-io", &["-f", "qcow2", &inc, "-c", "write 0 64k"]);
    set_bitmap_in_use(&w.join("inc.qcow2"));
    raw(w, "r.raw", "16M");
    raw(w, "s.raw", "4M");
}

/// Sets the `in_use` flag of the first bitmap of a qcow2 image's bitmap
/// directory (qcow2 spec: the bitmaps header extension, 0x23852875,
/// holds the directory's offset at +16; a directory entry's flags are at
/// +12).
fn set_bitmap_in_use(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let mut h = vec![0u8; 4096];
    f.read_exact(&mut h).expect("header");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let mut at = be32(&h, 100) as usize; // header_length: extensions follow
    let dir = loop {
        let (ty, len) = (be32(&h, at), be32(&h, at + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension in {}", path.display());
        if ty == 0x2385_2875 {
            break be64(&h, at + 8 + 16);
        }
        at += 8 + len.div_ceil(8) * 8;
    };
    let mut flags = [0u8; 4];
    f.seek(SeekFrom::Start(dir + 12)).expect("seek");
    f.read_exact(&mut flags).expect("flags");
    let flags = u32::from_be_bytes(flags) | 1;
    f.seek(SeekFrom::Start(dir + 12)).expect("seek");
    f.write_all(&flags.to_be_bytes()).expect("write flags");
}

/// `bitmaps.py`'s two phases against `bin` on the same fresh files: the
/// first session, then (after the daemon exited) the second.
fn bitmap_run(bin: &Path) -> Value {
    let (dir, _) = with_disk("64M");
    let w = dir.path();
    bitmap_images(w);
    let first = script_run_in(bin, "bitmaps.py", w, &["first"]);
    let second = script_run_in(bin, "bitmaps.py", w, &["second"]);
    json!({"first": first, "second": second})
}

/// `tests/qmp/bitmaps.py` against both daemons: the six
/// block-dirty-bitmap commands and their errors in QEMU's words, what
/// query-named-block-nodes reports after guest writes through the export
/// and each verb, merges across nodes and granularities; then, after a
/// restart on the same image, the persistent bitmaps back with their bits
/// and modes, as qemu-img info sees them after each exit.
#[test]
fn dirty_bitmap_commands_observe_the_same_as_with_qemu_storage_daemon() {
    parity(
        "dirty_bitmap_commands_observe_the_same_as_with_qemu_storage_daemon",
        bitmap_run,
        |ours| {
            // What must hold with ours, whatever QEMU does.
            let (first, second) = (&ours["first"], &ours["second"]);
            assert_eq!(first["guest-1"], 0, "{ours:#}");
            assert_eq!(first["refused-merges-change-nothing"], true, "{ours:#}");
            let b1 = |doc: &Value| -> Value {
                doc["bm"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|b| b["name"] == "b1")
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            // 100k+8k and 1M+1M in 128 KiB granules: 1 + 8 of them.
            assert_eq!(
                b1(&first["after-writes"]),
                json!({"name": "b1", "granularity": 131072, "count": 9 * 131072,
                   "recording": true, "persistent": true, "busy": false}),
                "{ours:#}"
            );
            // The restart kept b1's bits (4M+64k was written too: 10 granules)
            // and mode, and it records on.
            assert_eq!(b1(&first["at-end"])["count"], 10 * 131072, "{ours:#}");
            assert_eq!(b1(&second["at-open"]), b1(&first["at-end"]), "{ours:#}");
            assert_eq!(
                b1(&second["after-writes"])["count"],
                11 * 131072,
                "{ours:#}"
            );
            let names = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b["name"].as_str().map(str::to_owned))
                    .collect()
            };
            assert_eq!(names(&first["image-bitmaps"]), ["b1", "b2"], "{ours:#}");
            assert_eq!(
                second["image-bitmaps-after-delete"],
                json!([{"flags": [], "granularity": 131072, "name": "b1"},
                   {"flags": [], "granularity": 65536, "name": "b2"}]),
                "{ours:#}"
            );
            assert_eq!(first["check"], 0, "{ours:#}");
            assert_eq!(second["check"], 0, "{ours:#}");
        },
    );
}

/// `tests/qmp/mirror.py` against both daemons: blockdev-mirror and
/// blockdev-backup's argument errors in QEMU's words; a mirror while
/// qemu-io writes through the NBD export, READY, job-complete and the
/// export on the target; cancels after READY (forced and not); a full
/// backup while the guest writes and an incremental one; after exit, every
/// image checked and compared with point-in-time references.
#[test]
fn mirror_and_backup_observe_the_same_as_with_qemu_storage_daemon() {
    // The script makes its own images.
    parity(
        "mirror_and_backup_observe_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "mirror.py", |_| {}),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            assert_eq!(ours["mirror"], json!({"return": {}}), "{ours:#}");
            assert_eq!(ours["complete"], json!({"return": {}}), "{ours:#}");
            assert_eq!(ours["export-after-pivot"], "tgt", "{ours:#}");
            assert_eq!(ours["mc1-export"], "c", "{ours:#}");
            assert_eq!(ours["mc2-export"], "c", "{ours:#}");
            assert_eq!(ours["mc1-synced"], json!([true]), "{ours:#}");
            assert_eq!(ours["no-jobs-after-errors"], json!({"return": []}));
            assert_writes_compares_checks(
                ours,
                &[
                    "guest-writes-1",
                    "guest-writes-2",
                    "guest-writes-3",
                    "guest-writes-c",
                    "guest-writes-b1",
                    "guest-writes-b2",
                ],
            );
        },
    );
}

/// `tests/qmp/exports.py` against both daemons: `block-export-del`'s
/// modes with raw NBD clients connected: `safe` refused in QEMU's words,
/// `hard` disconnecting only that export's clients (a write answered
/// before it kept), `BLOCK_EXPORT_DELETED` once the connections are gone,
/// and an export whose client does not read its replies `shutting-down`
/// until it does.
#[test]
fn block_export_del_modes_observe_the_same_as_with_qemu_storage_daemon() {
    parity(
        "block_export_del_modes_observe_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "exports.py", |_| {}),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            let refused = json!({"error": "GenericError", "desc": "export 'e0' still in use"});
            assert_eq!(ours["safe-refused"][0], refused, "{ours:#}");
            assert_eq!(ours["safe-refused"][1], refused, "{ours:#}");
            assert_eq!(ours["write"], json!([0, 1]), "{ours:#}");
            assert_eq!(ours["hard"], json!({"return": {}}), "{ours:#}");
            assert_eq!(ours["c0-after"], "eof", "{ours:#}");
            assert_eq!(ours["c1-after"], json!([0, 2, true]), "{ours:#}");
            assert_eq!(ours["write-kept"], 0, "{ours:#}");
            assert_eq!(
                ours["shutting-down"][0],
                json!([["e0", "d0", false], ["e1", "n1", true]]),
                "{ours:#}"
            );
            assert_eq!(ours["no-event-yet"], json!([]), "{ours:#}");
            assert_eq!(ours["c1-eof"], "eof", "{ours:#}");
            assert_eq!(ours["events"], json!(["e0", "e0", "e1", "e2"]), "{ours:#}");
        },
    );
}

/// `tests/qmp/active_commit.py` against both daemons: block-commit of the
/// active layer while qemu-io writes through its NBD export: READY,
/// query-block-jobs, job-complete, the export then on the base; a second
/// one cancelled after READY (nothing pivots); after exit, the base and
/// the cancelled top compared with references that got every write.
#[test]
fn active_commit_observes_the_same_as_with_qemu_storage_daemon() {
    parity(
        "active_commit_observes_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "active_commit.py", |_| {}),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            assert_eq!(ours["commit"], json!({"return": {}}), "{ours:#}");
            assert_eq!(ours["complete"], json!({"return": {}}), "{ours:#}");
            assert_eq!(
                ours["commit-events"],
                json!([
                    "created",
                    "running",
                    "ready",
                    {"BLOCK_JOB_READY": {"device": "ac", "len": "n", "offset": "n",
                                         "speed": 0, "type": "commit"}},
                    "waiting",
                    "pending",
                    {"BLOCK_JOB_COMPLETED": {"device": "ac", "len": "n", "offset": "n",
                                             "speed": 0, "type": "commit"}},
                    "concluded",
                    "null"
                ]),
                "{ours:#}"
            );
            assert_eq!(ours["export-after-pivot"], json!(["a-base.qcow2", false]));
            assert_eq!(ours["export-after-cancel"], json!(["c-top.qcow2", false]));
            assert_writes_compares_checks(
                ours,
                &[
                    "guest-writes-1",
                    "guest-writes-2",
                    "guest-writes-3",
                    "guest-writes-c",
                ],
            );
        },
    );
}

/// `tests/qmp/transaction.py` against both daemons: `transaction` with
/// `blockdev-backup` and the dirty bitmap actions. Refused transactions
/// (an abort last, a duplicate or missing bitmap, a bitmap removed earlier
/// in the same transaction) leave the bitmaps as they were; one
/// transaction starts a full backup and adds a bitmap while qemu-io
/// writes through the export, and the bitmap then counts exactly the
/// later writes (QEMU's count) while the backup holds the image at the
/// transaction (compared after exit); clear, disable, enable, merge and
/// remove in transactions.
#[test]
fn transaction_backup_and_bitmap_actions_observe_the_same_as_with_qemu_storage_daemon() {
    parity(
        "transaction_backup_and_bitmap_actions_observe_the_same_as_with_qemu_storage_daemon",
        |bin| script_run(bin, "transaction.py", |_| {}),
        |ours| {
            // What must hold with ours, whatever QEMU does.
            assert_eq!(ours["unchanged-after-refusals"], true, "{ours:#}");
            assert_eq!(ours["no-jobs-after-refusals"], json!({"return": []}));
            assert_eq!(ours["bootstrap"], json!({"return": {}}), "{ours:#}");
            assert_eq!(
                ours["bitmaps-at-bootstrap"],
                json!([["bm", 0, true, 65536], ["bx", 0, true, 65536]]),
                "{ours:#}"
            );
            // 64 KiB + one 64 KiB granule for 4 KiB + 192 KiB.
            assert_eq!(
                ours["bitmaps-after-writes"],
                json!([["bm", 327680, true, 65536], ["bx", 327680, true, 65536]]),
                "{ours:#}"
            );
            assert_writes_compares_checks(
                ours,
                &[
                    "guest-writes-0",
                    "guest-writes-1",
                    "guest-writes-2",
                    "guest-writes-3",
                ],
            );
        },
    );
}
