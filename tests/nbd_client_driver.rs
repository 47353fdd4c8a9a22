//! The `nbd` driver (`drivers::NbdDriver`) against NBD servers nobody here
//! wrote: `qemu-nbd` and `qemu-storage-daemon` (Debian `qemu-utils`,
//! `qemu-system-*`) and `nbdkit` (Debian `nbdkit`), all installed by
//! `.ci/run`, serving raw and qcow2 images; and against small fake servers
//! (std sockets, in this file) that break the protocol in one way each.
//!
//! (Not to be confused with `tests/nbd_client/`, a raw test-side client
//! the export's tests use.)
//!
//! Every test has a watchdog; servers are killed when their guard drops
//! and die with the test process (`PR_SET_PDEATHSIG`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::driver::BlockStatus;
use blockgraph::drivers::qcow2::{Qcow2Driver, Qcow2Options};
use blockgraph::drivers::{NbdAddress, NbdDriver, NbdOptions};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, Permissions};
use common::process::tool;
use common::{watchdog, Rig, Stack};

const MIB: u64 = 1 << 20;
const BUDGET: Duration = Duration::from_secs(180);
/// Longest a server may take to start accepting.
const START: Duration = Duration::from_secs(30);

/// `qemu-img compare` of the `format` image at `image` against `expect`
/// (written to a raw file in `dir` first): fails the test if they differ.
fn compare_with_bytes(dir: &Path, format: &str, image: &Path, expect: &[u8]) {
    let want = dir.join("want.raw");
    std::fs::write(&want, expect).unwrap();
    tool(
        "qemu-img",
        &["compare", "-f", format, "-F", "raw", p(image), p(&want)],
    );
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    name: String,
}

impl Server {
    /// Starts `cmd`; waits until `sock` accepts a connection (the file
    /// exists from bind(), a moment before listen()).
    fn start(cmd: Command, sock: &Path) -> Server {
        let sock = sock.to_owned();
        Server::start_with(cmd, &sock.display().to_string(), move || {
            UnixStream::connect(&sock).is_ok()
        })
    }

    /// Starts `cmd`; waits until `ready` (it accepts on `what`).
    fn start_with(mut cmd: Command, what: &str, ready: impl Fn() -> bool) -> Server {
        // If the test process dies without running destructors (the
        // watchdog exits it), the server dies with it.
        // SAFETY: prctl(2) between fork and exec touches no memory of ours.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let name = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e} (.ci/run installs it)"));
        let mut s = Server { child, name };
        let start = Instant::now();
        while !ready() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("{} exited with {status} at start", s.name);
            }
            assert!(
                start.elapsed() < START,
                "{} did not accept on {what} within {START:?}",
                s.name,
            );
            thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// `qemu-nbd` serving `image` as `format` on `sock`, export `disk`,
    /// staying up across clients.
    fn qemu_nbd(image: &Path, format: &str, sock: &Path) -> Server {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "-t",
            "-e",
            "8",
            "-x",
            "disk",
            "-f",
            format,
            "-k",
            p(sock),
            p(image),
        ]);
        Server::start(cmd, sock)
    }

    /// `nbdkit`'s file plugin serving `image` on `sock`.
    fn nbdkit(image: &Path, sock: &Path) -> Server {
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-U", p(sock), "file", &format!("file={}", p(image))]);
        Server::start(cmd, sock)
    }

    /// `qemu-storage-daemon` serving `image` (qcow2) as export `disk`.
    fn storage_daemon(image: &Path, sock: &Path) -> Server {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", p(image)),
            "--blockdev",
            "driver=qcow2,node-name=d0,file=f0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", p(sock)),
            "--export",
            "type=nbd,id=e0,node-name=d0,name=disk,writable=on",
        ]);
        Server::start(cmd, sock)
    }

    /// Kills the server at once (SIGKILL) and waits for it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unix_opts(sock: &Path, export: &str) -> NbdOptions {
    NbdOptions::new(NbdAddress::Unix(sock.to_owned()), export)
}

/// A rig with the nbd node `nbd` and a backend on it.
fn rig(opts: NbdOptions) -> Rig {
    let drv = NbdDriver::connect(opts).expect("connect");
    Stack::new().node("nbd", drv).build()
}

/// The whole device, read through the backend in 1 MiB requests.
fn read_all(rig: &Rig) -> Vec<u8> {
    let len = rig.length().unwrap();
    let mut out = Vec::with_capacity(len as usize);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        out.extend(rig.read(at, n).unwrap());
        at += n as u64;
    }
    out
}

/// `qemu-img convert -O raw` of `image`: what a faithful reader returns.
fn converted(image: &Path, format: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("ref.raw");
    tool(
        "qemu-img",
        &["convert", "-f", format, "-O", "raw", p(image), p(&out)],
    );
    std::fs::read(&out).unwrap()
}

/// A `size` image of `format` with patterns at a few places and holes in
/// between.
fn patterned(dir: &Path, name: &str, format: &str, size: u64) -> PathBuf {
    let img = dir.join(name);
    tool(
        "qemu-img",
        &["create", "-q", "-f", format, p(&img), &size.to_string()],
    );
    for (pat, off, len) in [
        (0x11, 0, 4096),
        (0x22, MIB + 512, 70_000),
        (0x33, 5 * MIB, MIB),
    ] {
        tool(
            "qemu-io",
            &[
                "-f",
                format,
                "-c",
                &format!("write -P {pat} {off} {len}"),
                p(&img),
            ],
        );
    }
    img
}

/// Starts a server on the given socket.
type StartServer<'a> = Box<dyn Fn(&Path) -> Server + 'a>;

#[test]
fn reads_match_qemu_img_convert_on_every_server() {
    let _w = watchdog("reads_match_qemu_img_convert_on_every_server", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let raw = patterned(dir.path(), "a.raw", "raw", 8 * MIB);
    let qcow2 = patterned(dir.path(), "b.qcow2", "qcow2", 8 * MIB);
    let want_raw = converted(&raw, "raw", dir.path());
    let want_qcow2 = converted(&qcow2, "qcow2", dir.path());
    let cases: Vec<(&str, StartServer, &str, &Vec<u8>)> = vec![
        (
            "qemu-nbd raw",
            Box::new(|s| Server::qemu_nbd(&raw, "raw", s)),
            "disk",
            &want_raw,
        ),
        (
            "qemu-nbd qcow2",
            Box::new(|s| Server::qemu_nbd(&qcow2, "qcow2", s)),
            "disk",
            &want_qcow2,
        ),
        (
            "nbdkit file",
            Box::new(|s| Server::nbdkit(&raw, s)),
            "",
            &want_raw,
        ),
        (
            "qemu-storage-daemon qcow2",
            Box::new(|s| Server::storage_daemon(&qcow2, s)),
            "disk",
            &want_qcow2,
        ),
    ];
    for (i, (what, start, export, want)) in cases.into_iter().enumerate() {
        let sock = dir.path().join(format!("s{i}.sock"));
        let _server = start(&sock);
        let rig = rig(unix_opts(&sock, export));
        assert_eq!(rig.length().unwrap(), want.len() as u64, "{what}: length");
        let got = read_all(&rig);
        assert!(
            got == *want,
            "{what}: the data differs from qemu-img convert's"
        );
        // An unaligned read across a pattern boundary.
        let odd = rig.read(MIB + 500, 100).unwrap();
        assert_eq!(
            odd[..],
            want[(MIB + 500) as usize..(MIB + 600) as usize],
            "{what}"
        );
        rig.finish();
    }
}

#[test]
fn writes_are_what_qemu_img_compare_sees() {
    let _w = watchdog("writes_are_what_qemu_img_compare_sees", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    for (i, format) in ["raw", "qcow2"].into_iter().enumerate() {
        let img = patterned(dir.path(), &format!("w{i}.{format}"), format, 8 * MIB);
        let mut expect = converted(&img, format, dir.path());
        let sock = dir.path().join(format!("w{i}.sock"));
        let mut server = if format == "raw" {
            Server::qemu_nbd(&img, format, &sock)
        } else {
            Server::storage_daemon(&img, &sock)
        };
        let rig = rig(unix_opts(&sock, "disk"));
        let mut put = |rig: &Rig, off: u64, data: Vec<u8>| {
            rig.write(off, &data).unwrap();
            expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
        };
        put(&rig, 3, vec![0xa5; 10_000]);
        // Larger than a server's payload limit would be; split if needed.
        put(
            &rig,
            2 * MIB,
            (0..3 * MIB).map(|i| (i % 251) as u8).collect(),
        );
        let (blk, io) = (rig.blk.clone(), &rig.io);
        io.spawn(move |mut cx| async move {
            blk.write_zeroes(&mut cx, 5 * MIB + 4096, 8192).await?;
            blk.discard(&mut cx, 0, 4096).await?;
            blk.flush(&mut cx).await
        })
        .join()
        .unwrap();
        expect[(5 * MIB + 4096) as usize..(5 * MIB + 4096 + 8192) as usize].fill(0);
        // The discard may or may not zero; read back what the server keeps.
        let head = rig.read(0, 4096).unwrap();
        expect[..4096].copy_from_slice(&head);
        assert_eq!(read_all(&rig), expect, "{format}: read back through nbd");
        rig.finish();
        server.kill();
        let want = dir.path().join(format!("want{i}.raw"));
        std::fs::write(&want, &expect).unwrap();
        tool(
            "qemu-img",
            &["compare", "-f", format, "-F", "raw", p(&img), p(&want)],
        );
    }
}

#[test]
fn block_status_reports_the_holes_of_a_sparse_remote_image() {
    let _w = watchdog(
        "block_status_reports_the_holes_of_a_sparse_remote_image",
        BUDGET,
    );
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", p(&img), "64M"]);
    tool("qemu-io", &["-f", "raw", "-c", "write -P 7 8M 1M", p(&img)]);
    // What QEMU itself sees locally (qemu-img create allocates the first
    // block of a raw file), merged by zero / data.
    let local = tool("qemu-img", &["map", "--output=json", "-f", "raw", p(&img)]);
    let mut want: Vec<(BlockStatus, u64, u64)> = Vec::new();
    for e in serde_json::from_str::<serde_json::Value>(&local)
        .unwrap()
        .as_array()
        .unwrap()
    {
        let s = if e["zero"].as_bool().unwrap() {
            BlockStatus::Zero
        } else {
            BlockStatus::Data
        };
        let (at, n) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match want.last_mut() {
            Some((last, _, len)) if *last == s => *len += n,
            _ => want.push((s, at, n)),
        }
    }
    for (i, nbdkit) in [false, true].into_iter().enumerate() {
        let sock = dir.path().join(format!("b{i}.sock"));
        let _server = if nbdkit {
            Server::nbdkit(&img, &sock)
        } else {
            Server::qemu_nbd(&img, "raw", &sock)
        };
        let rig = rig(unix_opts(&sock, if nbdkit { "" } else { "disk" }));
        assert!(rig.driver::<NbdDriver, _>("nbd", |d| d.has_block_status()));
        let status = |off: u64, len: u64| {
            rig.on_node("nbd", move |n| {
                Box::pin(async move { n.block_status(off, len).await })
            })
            .unwrap()
        };
        // Walk the whole image: a hole, the data, a hole.
        let mut map = Vec::new();
        let mut at = 0;
        while at < 64 * MIB {
            let (s, n) = status(at, 64 * MIB - at);
            assert!(n > 0);
            match map.last_mut() {
                Some((last, _, len)) if *last == s => *len += n,
                _ => map.push((s, at, n)),
            }
            at += n;
        }
        assert_eq!(map, want, "nbdkit: {nbdkit}");
        assert!(map
            .iter()
            .any(|(s, at, n)| *s == BlockStatus::Zero && *at <= MIB && *n >= 6 * MIB));
        rig.finish();
    }
}

#[test]
fn our_qcow2_driver_over_a_remote_file() {
    let _w = watchdog("our_qcow2_driver_over_a_remote_file", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = patterned(dir.path(), "q.qcow2", "qcow2", 8 * MIB);
    let mut expect = converted(&img, "qcow2", dir.path());
    let sock = dir.path().join("q.sock");
    // An NBD export cannot grow (neither can QEMU's nbd node): room at
    // the end of the file for the clusters our writes allocate.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    // The qcow2 file's bytes, served raw: our qcow2 driver reads the
    // format over NBD.
    let mut server = Server::qemu_nbd(&img, "raw", &sock);
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let nbd = NbdDriver::connect(unix_opts(&sock, "disk")).unwrap();
    let file = main
        .run(move |bql| bql.write(|w| w.add_node("remote", nbd, &[])))
        .unwrap();
    let fh = file.clone();
    let q = io
        .spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::open(fh.io(&g), Qcow2Options::default()).await
        })
        .join()
        .unwrap();
    let blk = main
        .run(move |bql| {
            bql.write(|w| {
                let top = w.add_node("top", q, &[(ChildRole::File, &file)])?;
                w.add_backend("vda", &top, BackendOptions::default())
            })
        })
        .unwrap();
    let rig = Rig {
        main,
        io,
        nodes: Vec::new(),
        blk,
    };
    assert_eq!(
        read_all(&rig),
        expect,
        "qcow2 over nbd differs from qemu-img convert"
    );
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    rig.write(3 * MIB + 100, &data).unwrap();
    rig.flush().unwrap();
    expect[(3 * MIB + 100) as usize..(3 * MIB + 100) as usize + data.len()].copy_from_slice(&data);
    rig.finish();
    server.kill();
    tool("qemu-img", &["check", "-f", "qcow2", p(&img)]);
    compare_with_bytes(dir.path(), "qcow2", &img, &expect);
}

#[test]
fn a_restarted_server_gets_every_acknowledged_write() {
    let _w = watchdog("a_restarted_server_gets_every_acknowledged_write", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", p(&img), "16M"]);
    let sock = dir.path().join("r.sock");
    let mut server = Server::qemu_nbd(&img, "raw", &sock);
    let opts = unix_opts(&sock, "disk")
        .reconnect_delay(Duration::from_secs(20))
        .reconnect_interval(Duration::from_millis(50));
    let rig = rig(opts);
    // Eight writers on the I/O thread (so several requests are in flight
    // when the server dies): 4 KiB blocks, each with its index, writer w
    // taking blocks w, w + 8, …; each acknowledged block is reported.
    let (tx, rx) = mpsc::channel::<u64>();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let (blk, tx) = (rig.blk.clone(), tx.clone());
            rig.io.spawn(move |mut cx| async move {
                for i in (w..512).step_by(8) {
                    blk.write(&mut cx, i * 4096 * 8, &block(i)).await?;
                    let _ = tx.send(i);
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    drop(tx);
    // Kill the server once some writes were acknowledged, restart it.
    for _ in 0..40 {
        rx.recv_timeout(common::TIMEOUT).expect("writes progress");
    }
    server.kill();
    thread::sleep(Duration::from_millis(300));
    let _server = Server::qemu_nbd(&img, "raw", &sock);
    for w in writers {
        common::join(w, "a writer").expect("writes succeed across the restart");
    }
    let acked: Vec<u64> = rx.try_iter().collect();
    assert_eq!(acked.len() + 40, 512, "every write is acknowledged once");
    assert!(rig.driver::<NbdDriver, _>("nbd", |d| d.reconnects()) >= 1);
    rig.flush().unwrap();
    rig.finish();
    let file = std::fs::read(&img).unwrap();
    for i in 0..512u64 {
        let at = (i * 4096 * 8) as usize;
        assert!(file[at..at + 4096] == block(i)[..], "block {i} lost");
    }
}

fn block(i: u64) -> Vec<u8> {
    let mut b = vec![(i % 200) as u8 + 1; 4096];
    b[..8].copy_from_slice(&i.to_be_bytes());
    b
}

#[test]
fn requests_fail_clearly_when_the_server_stays_away() {
    let _w = watchdog("requests_fail_clearly_when_the_server_stays_away", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", p(&img), "1M"]);
    let sock = dir.path().join("g.sock");
    let mut server = Server::qemu_nbd(&img, "raw", &sock);
    let opts = unix_opts(&sock, "disk")
        .reconnect_delay(Duration::from_millis(500))
        .reconnect_interval(Duration::from_millis(50));
    let rig = rig(opts);
    rig.write(0, &[1; 512]).unwrap();
    server.kill();
    let t = Instant::now();
    let err = rig.read(0, 512).unwrap_err().to_string();
    assert!(err.contains("connection lost"), "{err}");
    assert!(err.contains("reconnect delay"), "{err}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "failed before the delay"
    );
    // And back once the server is.
    let _server = Server::qemu_nbd(&img, "raw", &sock);
    common::wait_until("the client reconnects", || {
        rig.driver::<NbdDriver, _>("nbd", |d| d.is_connected())
    });
    assert_eq!(rig.read(0, 512).unwrap(), vec![1; 512]);
    rig.finish();
}

#[test]
fn tcp_and_the_nbd_uri() {
    let _w = watchdog("tcp_and_the_nbd_uri", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = patterned(dir.path(), "t.raw", "raw", 8 * MIB);
    let want = converted(&img, "raw", dir.path());
    // A port nobody uses now (the kernel's choice), for qemu-nbd.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-t", "-x", "disk", "-f", "raw", "-b", "127.0.0.1"])
        .args(["-p", &port.to_string(), p(&img)]);
    let _server = Server::start_with(cmd, &format!("port {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let opts = NbdOptions::parse_uri(&format!("nbd://127.0.0.1:{port}/disk")).unwrap();
    let rig = rig(opts);
    assert!(
        read_all(&rig) == want,
        "TCP read differs from qemu-img convert"
    );
    rig.write(MIB, &[9; 4096]).unwrap();
    assert_eq!(rig.read(MIB, 4096).unwrap(), vec![9; 4096]);
    rig.finish();
}

#[test]
fn our_qcow2_overlay_over_a_remote_backing_image() {
    let _w = watchdog("our_qcow2_overlay_over_a_remote_backing_image", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let base = patterned(dir.path(), "base.raw", "raw", 8 * MIB);
    let sock = dir.path().join("base.sock");
    let _server = Server::qemu_nbd(&base, "raw", &sock);
    let uri = format!("nbd+unix:///disk?socket={}", p(&sock));
    // QEMU makes the overlay and, for the reference, reads it with its
    // own nbd client under it.
    let overlay = dir.path().join("top.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &uri,
            "-F",
            "raw",
            p(&overlay),
        ],
    );
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 2M 64k", p(&overlay)],
    );
    let mut expect = converted(&overlay, "qcow2", dir.path());

    // Ours: file node for the overlay, nbd node as its backing.
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let nbd = NbdDriver::connect(unix_opts(&sock, "disk").read_only(true)).unwrap();
    let file = blockgraph::drivers::FileDriver::open(&overlay, Default::default()).unwrap();
    let (file, base_node) = main
        .run(move |bql| {
            bql.write(|w| {
                let f = w.add_node("file", file, &[])?;
                let b = w.add_node("base", nbd, &[])?;
                Ok::<_, Error>((f, b))
            })
        })
        .unwrap();
    let fh = file.clone();
    let q = io
        .spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::open(fh.io(&g), Qcow2Options::default()).await
        })
        .join()
        .unwrap();
    let blk = main
        .run(move |bql| {
            bql.write(|w| {
                let kids = [(ChildRole::File, &file), (ChildRole::Backing, &base_node)];
                let top = w.add_node("top", q, &kids)?;
                w.add_backend("vda", &top, BackendOptions::default())
            })
        })
        .unwrap();
    let rig = Rig {
        main,
        io,
        nodes: Vec::new(),
        blk,
    };
    assert!(
        read_all(&rig) == expect,
        "overlay over nbd differs from qemu-img convert"
    );
    // A write into the overlay (partly over base data: copy-on-write of
    // the cluster from the remote base).
    rig.write(5 * MIB + 1000, &[0x66; 3000]).unwrap();
    rig.flush().unwrap();
    expect[(5 * MIB + 1000) as usize..(5 * MIB + 4000) as usize].fill(0x66);
    rig.finish();
    compare_with_bytes(dir.path(), "qcow2", &overlay, &expect);
}

#[test]
fn a_read_only_export_refuses_writes() {
    let _w = watchdog("a_read_only_export_refuses_writes", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", p(&img), "1M"]);
    let sock = dir.path().join("ro.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-r",
        "-t",
        "-x",
        "disk",
        "-f",
        "raw",
        "-k",
        p(&sock),
        p(&img),
    ]);
    let _server = Server::start(cmd, &sock);
    let drv = NbdDriver::connect(unix_opts(&sock, "disk")).unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let node = main
        .run(move |bql| bql.write(|w| w.add_node("nbd", drv, &[])))
        .unwrap();
    let n = node.clone();
    let err = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &n, BackendOptions::default())))
        .unwrap_err();
    assert!(matches!(err, Error::PermissionConflict { .. }), "{err}");
    let blk = main
        .run(move |bql| {
            bql.write(|w| {
                w.add_backend(
                    "vda",
                    &node,
                    BackendOptions::with_perms(Permissions::SHARED_READER),
                )
            })
        })
        .unwrap();
    let b = blk.clone();
    let got = io
        .spawn(move |mut cx| async move {
            let mut buf = vec![1u8; 512];
            b.read(&mut cx, 0, &mut buf).await.map(|_| buf)
        })
        .join()
        .unwrap();
    assert_eq!(got, vec![0; 512]);
    let rig = Rig {
        main,
        io,
        nodes: Vec::new(),
        blk,
    };
    rig.finish();
}

#[test]
fn unreachable_or_unknown_exports_fail_to_open() {
    let _w = watchdog("unreachable_or_unknown_exports_fail_to_open", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let err = NbdDriver::connect(unix_opts(&dir.path().join("none.sock"), "x")).unwrap_err();
    assert!(err.to_string().contains("none.sock"), "{err}");
    let img = dir.path().join("u.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", p(&img), "1M"]);
    let sock = dir.path().join("u.sock");
    let _server = Server::qemu_nbd(&img, "raw", &sock);
    let err = NbdDriver::connect(unix_opts(&sock, "nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("'nope'"), "{err}");
}

// ---- hostile servers --------------------------------------------------

/// What a fake server does after the handshake.
type Behaviour = fn(&mut UnixStream);

/// A fake NBD server on `sock`: a correct fixed-newstyle handshake (with
/// `GO`, or without it when `go` is false), structured replies and
/// `base:allocation` (id 1), a 1 MiB writable export with a 512-byte
/// maximum payload when `small` is set; then `behaviour` per connection.
fn fake_server(sock: &Path, go: bool, behaviour: Behaviour) -> thread::JoinHandle<()> {
    let listener = UnixListener::bind(sock).unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            s.set_read_timeout(Some(common::TIMEOUT)).unwrap();
            if handshake(&mut s, go).is_ok() {
                behaviour(&mut s);
            }
        }
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn opt_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut out = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    out.extend(option.to_be_bytes());
    out.extend(kind.to_be_bytes());
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(data);
    s.write_all(&out)
}

fn handshake(s: &mut UnixStream, go: bool) -> std::io::Result<()> {
    let mut g = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    g.extend(0x4948_4156_454f_5054u64.to_be_bytes());
    g.extend(3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&g)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let option = u32_at(&h, 8);
        let mut data = vec![0u8; u32_at(&h, 12) as usize];
        s.read_exact(&mut data)?;
        let flags: u16 = 1 | 4 | 8 | 32 | 64; // HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES
        match option {
            8 => opt_reply(s, option, 1, &[])?, // STRUCTURED_REPLY: ACK
            10 => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend(b"base:allocation");
                opt_reply(s, option, 4, &d)?;
                opt_reply(s, option, 1, &[])?;
            }
            7 if go => {
                let mut d = 0u16.to_be_bytes().to_vec();
                d.extend(MIB.to_be_bytes());
                d.extend(flags.to_be_bytes());
                opt_reply(s, option, 3, &d)?;
                let mut d = 3u16.to_be_bytes().to_vec();
                for v in [1u32, 512, 512] {
                    d.extend(v.to_be_bytes());
                }
                opt_reply(s, option, 3, &d)?;
                opt_reply(s, option, 1, &[])?;
                return Ok(());
            }
            7 => opt_reply(s, option, (1 << 31) | 1, &[])?, // ERR_UNSUP
            1 => {
                let mut d = MIB.to_be_bytes().to_vec();
                d.extend(flags.to_be_bytes());
                s.write_all(&d)?;
                return Ok(());
            }
            _ => opt_reply(s, option, (1 << 31) | 1, &[])?,
        }
    }
}

/// Reads one request header: (type, handle, offset, length); skips a
/// write's payload.
fn request(s: &mut UnixStream) -> Option<(u16, u64, u64, u32)> {
    let mut h = [0u8; 28];
    s.read_exact(&mut h).ok()?;
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
    let len = u32_at(&h, 24);
    if kind == 1 {
        let mut skip = vec![0u8; len as usize];
        s.read_exact(&mut skip).ok()?;
    }
    Some((kind, cookie, offset, len))
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = 0x668e_33efu32.to_be_bytes().to_vec();
    out.extend(flags.to_be_bytes());
    out.extend(kind.to_be_bytes());
    out.extend(cookie.to_be_bytes());
    out.extend((payload.len() as u32).to_be_bytes());
    out.extend(payload);
    out
}

fn data_chunk(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(data);
    chunk(1, 1, cookie, &p)
}

/// Serves reads correctly (data 0x5a); everything else gets a simple OK.
fn honest(s: &mut UnixStream) {
    while let Some((kind, cookie, offset, len)) = request(s) {
        let out = if kind == 0 {
            data_chunk(cookie, offset, &vec![0x5a; len as usize])
        } else if kind == 2 {
            return;
        } else {
            let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
            r.extend(0u32.to_be_bytes());
            r.extend(cookie.to_be_bytes());
            r
        };
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// Connects to a fake server with `behaviour` and reads 4 KiB (split in
/// 512-byte requests, several in flight); returns the error.
fn hostile_read(name: &str, behaviour: Behaviour, timeout: Duration) -> String {
    hostile_read_len(name, behaviour, timeout, 4096)
}

/// [`hostile_read`] of `len` bytes.
fn hostile_read_len(name: &str, behaviour: Behaviour, timeout: Duration, len: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join(format!("{name}.sock"));
    let _server = fake_server(&sock, true, behaviour);
    let opts = unix_opts(&sock, "").request_timeout(timeout);
    let rig = rig(opts);
    let t = Instant::now();
    let err = rig
        .read(0, len)
        .expect_err("the read must fail")
        .to_string();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "{name}: took {:?}",
        t.elapsed()
    );
    rig.finish();
    err
}

#[test]
fn hostile_bad_reply_magic() {
    let _w = watchdog("hostile_bad_reply_magic", BUDGET);
    let err = hostile_read(
        "magic",
        |s| {
            if request(s).is_some() {
                let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                thread::sleep(Duration::from_secs(1));
            }
        },
        Duration::from_secs(60),
    );
    assert!(err.contains("bad reply magic 0xdeadbeef"), "{err}");
}

#[test]
fn hostile_reply_for_an_unknown_handle() {
    let _w = watchdog("hostile_reply_for_an_unknown_handle", BUDGET);
    let err = hostile_read(
        "handle",
        |s| {
            if let Some((_, cookie, offset, len)) = request(s) {
                let _ = s.write_all(&data_chunk(cookie ^ 0x5555, offset, &vec![0; len as usize]));
                thread::sleep(Duration::from_secs(1));
            }
        },
        Duration::from_secs(60),
    );
    assert!(err.contains("no request in flight"), "{err}");
}

#[test]
fn hostile_reply_longer_than_asked() {
    let _w = watchdog("hostile_reply_longer_than_asked", BUDGET);
    let err = hostile_read(
        "long",
        |s| {
            if let Some((_, cookie, offset, len)) = request(s) {
                let _ = s.write_all(&data_chunk(cookie, offset, &vec![0; len as usize + 1]));
                thread::sleep(Duration::from_secs(1));
            }
        },
        Duration::from_secs(60),
    );
    assert!(err.contains("longer than asked"), "{err}");
}

#[test]
fn hostile_chunk_out_of_range() {
    let _w = watchdog("hostile_chunk_out_of_range", BUDGET);
    let err = hostile_read(
        "range",
        |s| {
            if let Some((_, cookie, offset, _)) = request(s) {
                let _ = s.write_all(&data_chunk(cookie, offset + 511, &[1, 2]));
                thread::sleep(Duration::from_secs(1));
            }
        },
        Duration::from_secs(60),
    );
    assert!(err.contains("outside the read"), "{err}");
}

#[test]
fn hostile_huge_lengths_allocate_nothing() {
    let _w = watchdog("hostile_huge_lengths_allocate_nothing", BUDGET);
    // A chunk header that announces 4 GiB - 1: refused before reading.
    let err = hostile_read(
        "huge",
        |s| {
            if let Some((_, cookie, _, _)) = request(s) {
                let mut h = chunk(1, 1, cookie, &[]);
                h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                let _ = s.write_all(&h);
                thread::sleep(Duration::from_secs(1));
            }
        },
        Duration::from_secs(60),
    );
    assert!(err.contains("4294967295 bytes"), "{err}");
    // An error chunk as long.
    let err = hostile_read(
        "huge-error",
        |s| {
            if let Some((_, cookie, _, _)) = request(s) {
                let mut h = chunk(1, 0x8001, cookie, &[]);
                h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                let _ = s.write_all(&h);
                thread::sleep(Duration::from_secs(1));
            }
        },
        Duration::from_secs(60),
    );
    assert!(err.contains("an error chunk of 4294967295 bytes"), "{err}");
}

#[test]
fn hostile_huge_option_reply_in_the_handshake() {
    let _w = watchdog("hostile_huge_option_reply_in_the_handshake", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("opt.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut g = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
            g.extend(0x4948_4156_454f_5054u64.to_be_bytes());
            g.extend(3u16.to_be_bytes());
            let _ = s.write_all(&g);
            let mut b = [0u8; 20];
            let _ = s.read_exact(&mut b); // flags + STRUCTURED_REPLY header
            let mut out = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            out.extend(8u32.to_be_bytes());
            out.extend(1u32.to_be_bytes());
            out.extend(u32::MAX.to_be_bytes());
            let _ = s.write_all(&out);
            thread::sleep(Duration::from_secs(2));
        }
    });
    let err = NbdDriver::connect(unix_opts(&sock, ""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("option reply of 4294967295 bytes"), "{err}");
}

#[test]
fn hostile_server_that_stops_answering_times_out() {
    let _w = watchdog("hostile_server_that_stops_answering_times_out", BUDGET);
    let err = hostile_read(
        "silent",
        |s| {
            while request(s).is_some() {}
        },
        Duration::from_millis(300),
    );
    assert!(
        err.contains("did not answer a request within 300ms"),
        "{err}"
    );
}

#[test]
fn hostile_server_that_stops_in_the_middle_of_a_reply_times_out() {
    let _w = watchdog("hostile_server_that_stops_in_the_middle_of_a_reply", BUDGET);
    // One request, whose reply stops half way.
    let err = hostile_read_len(
        "stall",
        |s| {
            if let Some((_, cookie, offset, len)) = request(s) {
                let c = data_chunk(cookie, offset, &vec![0; len as usize]);
                let _ = s.write_all(&c[..c.len() - 10]);
                while request(s).is_some() {}
            }
        },
        Duration::from_millis(300),
        512,
    );
    assert!(err.contains("stopped in the middle of a reply"), "{err}");
}

#[test]
fn export_name_fallback_and_split_requests_against_a_fake_server() {
    let _w = watchdog("export_name_fallback_and_split_requests", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    for go in [true, false] {
        let sock = dir.path().join(format!("h{go}.sock"));
        let _server = fake_server(&sock, go, honest);
        let rig = rig(unix_opts(&sock, ""));
        // 4 KiB over a 512-byte payload limit (GO) or the default (no GO).
        assert_eq!(rig.read(0, 4096).unwrap(), vec![0x5a; 4096]);
        rig.write(512, &[1; 3000]).unwrap();
        rig.flush().unwrap();
        let limits = rig.driver::<NbdDriver, _>("nbd", |d| d.block_limits());
        assert_eq!(limits.0, if go { 512 } else { 32 << 20 });
        rig.finish();
    }
}

#[test]
fn the_img_tool_reads_an_nbd_unix_uri() {
    let _w = watchdog(
        "the_img_tool_reads_an_nbd_unix_uri",
        Duration::from_secs(600),
    );
    let img_tool = common::process::example_binary("img");
    let dir = tempfile::tempdir().unwrap();
    let img = patterned(dir.path(), "i.qcow2", "qcow2", 8 * MIB);
    let want = converted(&img, "qcow2", dir.path());
    let sock = dir.path().join("i.sock");
    let _server = Server::qemu_nbd(&img, "qcow2", &sock);
    let uri = format!("nbd+unix:///disk?socket={}", p(&sock));
    let info = common::process::run(Command::new(&img_tool).args(["info", &uri]));
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
    let out = dir.path().join("out.raw");
    let limit = Duration::from_secs(120);
    let o = common::process::output_within(
        Command::new(&img_tool).args(["convert", "-O", "raw", &uri, p(&out)]),
        limit,
    );
    assert!(o.status.success(), "{}", common::process::text(&o));
    assert!(
        std::fs::read(&out).unwrap() == want,
        "img convert of the URI differs"
    );
    // The legacy syntax names the same export.
    let legacy = format!("nbd:unix:{}:exportname=disk", p(&sock));
    let info = common::process::run(Command::new(&img_tool).args(["info", &legacy]));
    assert!(info.contains("virtual size: 8 MiB"), "{info}");
}

#[test]
fn the_storage_daemon_adds_an_nbd_node_and_exports_it_again() {
    let _w = watchdog(
        "the_storage_daemon_adds_an_nbd_node",
        Duration::from_secs(600),
    );
    let daemon = common::process::example_binary("storage_daemon");
    let dir = tempfile::tempdir().unwrap();
    let img = patterned(dir.path(), "d.raw", "raw", 8 * MIB);
    let want = converted(&img, "raw", dir.path());
    let upstream = dir.path().join("up.sock");
    let _server = Server::qemu_nbd(&img, "raw", &upstream);
    // qemu-nbd -> our nbd node (blockdev-add's options, on the command
    // line) -> our export -> qemu-img.
    let ours = dir.path().join("ours.sock");
    let mut cmd = Command::new(&daemon);
    cmd.args([
        "--blockdev",
        &format!(
            "driver=nbd,node-name=n0,server.type=unix,server.path={},export=disk,reconnect-delay=5",
            p(&upstream)
        ),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", p(&ours)),
        "--export",
        "type=nbd,id=e0,node-name=n0,name=re,writable=on",
    ]);
    let _daemon = Server::start(cmd, &ours);
    let uri = format!("nbd+unix:///re?socket={}", p(&ours));
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 4M 64k", &uri],
    );
    let out = dir.path().join("out.raw");
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, p(&out)],
    );
    let mut want = want;
    want[4 * MIB as usize..4 * MIB as usize + 65536].fill(0x77);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the re-exported image differs"
    );
    // The write reached the upstream image.
    tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&img), p(&out)],
    );
}

#[test]
fn a_server_error_fails_only_its_request() {
    let _w = watchdog("a_server_error_fails_only_its_request", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("err.sock");
    // The first read gets an EIO error chunk with a message; the rest are
    // served.
    let _server = fake_server(&sock, true, |s| {
        if let Some((_, cookie, _, _)) = request(s) {
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend(12u16.to_be_bytes());
            p.extend(b"disk on fire");
            let _ = s.write_all(&chunk(1, 0x8001, cookie, &p));
        }
        honest(s);
    });
    let rig = rig(unix_opts(&sock, ""));
    let err = rig.read(0, 512).unwrap_err().to_string();
    assert!(err.contains("EIO") && err.contains("disk on fire"), "{err}");
    assert_eq!(rig.read(0, 512).unwrap(), vec![0x5a; 512]);
    assert_eq!(rig.driver::<NbdDriver, _>("nbd", |d| d.reconnects()), 0);
    rig.finish();
}

#[test]
fn the_client_gives_up_after_its_attempts() {
    let _w = watchdog("the_client_gives_up_after_its_attempts", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", p(&img), "1M"]);
    let sock = dir.path().join("a.sock");
    let mut server = Server::qemu_nbd(&img, "raw", &sock);
    // A delay far longer than the test, and longer than the clock can
    // add: the attempts end the wait, not the delay.
    let opts = unix_opts(&sock, "disk")
        .reconnect_delay(Duration::MAX)
        .reconnect_interval(Duration::from_millis(20))
        .reconnect_attempts(Some(3));
    let rig = rig(opts);
    rig.write(0, &[3; 512]).unwrap();
    server.kill();
    let err = rig.read(0, 512).unwrap_err().to_string();
    assert!(
        err.contains("gave up reconnecting after 3 attempts"),
        "{err}"
    );
    // For good: a server coming back is not looked for any more.
    let _server = Server::qemu_nbd(&img, "raw", &sock);
    let err = rig.read(0, 512).unwrap_err().to_string();
    assert!(err.contains("gave up"), "{err}");
    rig.finish();
}

#[test]
fn a_strict_minimum_block_size_is_honoured() {
    let _w = watchdog("a_strict_minimum_block_size_is_honoured", BUDGET);
    let dir = tempfile::tempdir().unwrap();
    let img = patterned(dir.path(), "s.raw", "raw", 8 * MIB);
    let mut expect = converted(&img, "raw", dir.path());
    let sock = dir.path().join("s.sock");
    // nbdkit refusing (EINVAL) anything not aligned to 4 KiB or above
    // 64 KiB.
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U", p(&sock), "--filter=blocksize-policy", "file"])
        .arg(format!("file={}", p(&img)))
        .args(["blocksize-minimum=4096", "blocksize-preferred=4096"])
        .args(["blocksize-maximum=65536", "blocksize-error-policy=error"]);
    let mut server = Server::start(cmd, &sock);
    let rig = rig(unix_opts(&sock, ""));
    assert_eq!(
        rig.driver::<NbdDriver, _>("nbd", |d| d.block_limits()),
        (65536, 4096)
    );
    // Unaligned reads and writes, and a large one (split).
    assert_eq!(
        rig.read(MIB + 500, 100).unwrap()[..],
        expect[(MIB + 500) as usize..(MIB + 600) as usize]
    );
    let mut put = |off: u64, data: Vec<u8>| {
        rig.write(off, &data).unwrap();
        expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
    };
    put(3, vec![0xc3; 10_000]);
    put(4096 * 10 + 4000, vec![0xc4; 200]);
    put(
        2 * MIB + 7,
        (0..300_000u32).map(|i| (i % 253) as u8).collect(),
    );
    // Eight writers patching disjoint 100-byte pieces of the same blocks at
    // once: a read-modify-write that is not serialised loses pieces.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let blk = rig.blk.clone();
            rig.io.spawn(move |mut cx| async move {
                for round in 0..16u64 {
                    let off = 6 * MIB + round * 4096 + w * 100 + 7;
                    blk.write(&mut cx, off, &[w as u8 + 1; 100]).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for w in writers {
        common::join(w, "a writer").unwrap();
    }
    for w in 0..8u64 {
        for round in 0..16u64 {
            let off = (6 * MIB + round * 4096 + w * 100 + 7) as usize;
            expect[off..off + 100].fill(w as u8 + 1);
        }
    }
    let (blk, io) = (rig.blk.clone(), &rig.io);
    io.spawn(move |mut cx| async move {
        blk.write_zeroes(&mut cx, 5 * MIB + 100, 9000).await?;
        blk.flush(&mut cx).await
    })
    .join()
    .unwrap();
    expect[(5 * MIB + 100) as usize..(5 * MIB + 9100) as usize].fill(0);
    assert!(
        read_all(&rig) == expect,
        "read back through the strict server"
    );
    rig.finish();
    server.kill();
    compare_with_bytes(dir.path(), "raw", &img, &expect);
}
