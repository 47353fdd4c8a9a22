//! The NBD export with real clients: QEMU's `qemu-img` and `qemu-io`
//! (Debian `qemu-utils`) and libnbd's `nbdinfo` and `nbdcopy` (Debian
//! `libnbd-bin`), both installed by `.ci/run`; plus a raw client for what
//! the tools do not show (option replies, several connections, a drain
//! under streaming writes).
//!
//! Every test has a watchdog; sockets live in temporary directories that
//! are removed with the test.

mod common;
mod nbd_client;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockgraph::drivers::qcow2::{open_image_chain, ChainOptions};
use blockgraph::export::nbd::{ExportOptions, NbdServer};
use blockgraph::{BackendOptions, MainLoop, Permissions};
use common::{join_thread, watchdog};
use nbd_client::*;

/// Runs a tool, failing the test with its output if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (.ci/run installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn tool(name: &str, args: &[&str]) -> String {
    run(Command::new(name).args(args))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

#[test]
fn qemu_img_info_sees_the_export() {
    let _w = watchdog("qemu_img_info_sees_the_export", Duration::from_secs(120));
    let f = Fixture::new(4 << 20);
    let out = tool("qemu-img", &["info", "--output=json", &f.url("disk")]);
    let info: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(info["virtual-size"], 4 << 20);
    assert_eq!(info["format"], "raw");
}

#[test]
fn qemu_io_writes_and_reads_patterns() {
    let _w = watchdog(
        "qemu_io_writes_and_reads_patterns",
        Duration::from_secs(120),
    );
    let f = Fixture::new(4 << 20);
    let out = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &f.url("disk"),
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0xcd -f 1M 4k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 2M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0xcd 1M 4k",
        ],
    );
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert!(!out.contains("Pattern verification"), "{out}");
    // What the client wrote is what the node holds.
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    let r = c.request(CMD_READ, 0, 0, 64 << 10, &[]).unwrap();
    assert!(r.data.iter().all(|&b| b == 0xab));
    let r = c.request(CMD_READ, 0, 1 << 20, 4096, &[]).unwrap();
    assert!(r.data.iter().all(|&b| b == 0xcd));
    c.disconnect();
}

#[test]
fn tcp_export_serves_qemu_io() {
    let _w = watchdog("tcp_export_serves_qemu_io", Duration::from_secs(120));
    let f = Fixture::new(1 << 20);
    let tcp = f
        .server
        .as_ref()
        .unwrap()
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let port = tcp.tcp_addr().unwrap().port();
    let url = format!("nbd://127.0.0.1:{port}/disk");
    let out = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0x42 4k 4k",
            "-c",
            "read -P 0x42 4k 4k",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    tcp.shutdown();
    // The Unix listener is independent of the TCP one.
    let out = tool(
        "qemu-io",
        &["-f", "raw", &f.url("disk"), "-c", "read -P 0x42 4k 4k"],
    );
    assert!(!out.contains("fail"), "{out}");
}

/// A qcow2 image with data, zeroes and unallocated space, made by QEMU,
/// exported read-only through our qcow2 driver: QEMU's and libnbd's tools
/// read the same bytes and the same allocation map as from the image.
#[test]
fn qcow2_export_matches_the_image() {
    let _w = watchdog("qcow2_export_matches_the_image", Duration::from_secs(180));
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "8M"]);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            p(&img),
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 0x17 5M 64k",
        ],
    );
    let expected_raw = dir.path().join("expected.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(&img),
            p(&expected_raw),
        ],
    );

    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let path = img.clone();
    let chain = io
        .spawn(move |mut cx| async move {
            let mut opts = ChainOptions::new("img");
            opts.writable = false;
            open_image_chain(&mut cx, &path, opts).await
        })
        .join()
        .expect("open the image");
    let top = chain.top().clone();
    let blk = main
        .run(move |bql| {
            bql.write(|w| {
                w.add_backend(
                    "export",
                    &top,
                    BackendOptions::with_perms(Permissions::SHARED_READER),
                )
            })
        })
        .unwrap();
    let server = NbdServer::new(&main).unwrap();
    server
        .add_export(ExportOptions {
            name: "img".into(),
            description: "a qcow2 image".into(),
            backend: blk,
            read_only: true,
        })
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let listener = server.listen_unix(&sock).unwrap();
    let url = format!("nbd+unix:///img?socket={}", sock.display());

    let info: serde_json::Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", &url])).unwrap();
    assert_eq!(info["virtual-size"], 8 << 20);

    // -U: our driver holds the image's lock, as QEMU's would.
    let out = tool(
        "qemu-img",
        &["compare", "-U", "-f", "qcow2", "-F", "raw", p(&img), &url],
    );
    assert!(out.contains("identical"), "{out}");

    let converted = dir.path().join("converted.raw");
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, p(&converted)],
    );
    assert!(std::fs::read(&converted).unwrap() == std::fs::read(&expected_raw).unwrap());

    // Block status: data where QEMU wrote data, holes reading as zeroes
    // elsewhere (the zeroed range included).
    let map: serde_json::Value = serde_json::from_str(&tool(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &url],
    ))
    .unwrap();
    let at = |offset: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap();
                start <= offset && offset < start + e["length"].as_u64().unwrap()
            })
            .unwrap_or_else(|| panic!("no map entry at {offset}: {map}"))
            .clone()
    };
    for (offset, data) in [
        (0, true),
        (1 << 20, false),
        (2 << 20, false),
        (5 << 20, true),
        (7 << 20, false),
    ] {
        let e = at(offset);
        assert_eq!(e["data"], data, "data at {offset}: {map}");
        assert_eq!(e["zero"], !data, "zero at {offset}: {map}");
    }

    // libnbd's view: the same map and the same bytes.
    let nbdmap = tool("nbdinfo", &["--map", &url]);
    let kinds: Vec<(u64, String)> = nbdmap
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[3..].join(" "))
        })
        .collect();
    let kind_at = |offset: u64| {
        kinds
            .iter()
            .rev()
            .find(|(start, _)| *start <= offset)
            .map(|(_, k)| k.clone())
            .unwrap()
    };
    assert_eq!(kind_at(0), "data", "{nbdmap}");
    assert_eq!(kind_at(2 << 20), "hole,zero", "{nbdmap}");
    assert_eq!(kind_at(5 << 20), "data", "{nbdmap}");
    let copied = dir.path().join("nbdcopy.raw");
    tool("nbdcopy", &[&url, p(&copied)]);
    assert!(std::fs::read(&copied).unwrap() == std::fs::read(&expected_raw).unwrap());

    listener.shutdown();
    server.shutdown();
    drop(io);
    main.shutdown();
}

#[test]
fn list_and_info_describe_the_exports() {
    let _w = watchdog(
        "list_and_info_describe_the_exports",
        Duration::from_secs(60),
    );
    let f = Fixture::new(1 << 20);
    let mut c = f.connect();
    c.greet().unwrap();
    c.send_option(OPT_LIST, &[]).unwrap();
    let names: Vec<String> = c
        .option_replies()
        .unwrap()
        .into_iter()
        .filter(|(kind, _)| *kind == REP_SERVER)
        .map(|(_, d)| {
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            String::from_utf8(d[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["disk", "ro"]);
    // INFO with name, description and block sizes; the connection stays
    // in negotiation.
    c.send_option(OPT_INFO, &Client::info_data("disk", &[1, 2, 3]))
        .unwrap();
    let replies = c.option_replies().unwrap();
    let info = |t: u16| {
        replies
            .iter()
            .find(|(k, d)| *k == REP_INFO && d[..2] == t.to_be_bytes())
            .map(|(_, d)| d[2..].to_vec())
            .unwrap_or_else(|| panic!("no info {t}"))
    };
    assert_eq!(info(1), b"disk");
    assert_eq!(info(2), b"test disk");
    let sizes = info(3);
    let min = u32::from_be_bytes(sizes[..4].try_into().unwrap());
    let max = u32::from_be_bytes(sizes[8..12].try_into().unwrap());
    assert_eq!((min, max), (1, 32 << 20));
    // LIST_META_CONTEXT with no query lists base:allocation.
    c.send_option(OPT_LIST_META_CONTEXT, &Client::meta_data("disk", &[]))
        .unwrap();
    let replies = c.option_replies().unwrap();
    assert_eq!(replies[0].0, REP_META_CONTEXT);
    assert_eq!(&replies[0].1[4..], b"base:allocation");
    c.send_option(OPT_ABORT, &[]).unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ACK);
    assert!(c.closed_by_server());
    // EXPORT_NAME (the oldest way in) still works.
    let mut c = f.connect();
    c.greet().unwrap();
    c.send_option(OPT_EXPORT_NAME, b"disk").unwrap();
    assert_eq!(c.u64().unwrap(), 1 << 20);
    let flags = c.u16().unwrap();
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    let r = c.request(CMD_READ, 0, 0, 512, &[]).unwrap();
    assert_eq!(r.error, 0);
    c.disconnect();
}

#[test]
fn structured_reads_block_status_and_zeroing() {
    let _w = watchdog(
        "structured_reads_block_status_and_zeroing",
        Duration::from_secs(60),
    );
    let f = Fixture::new(1 << 20);
    let mut c = f.connect();
    c.handshake("disk", true).unwrap();
    let r = c
        .request(CMD_WRITE, FLAG_FUA, 4096, 4096, &[3; 4096])
        .unwrap();
    assert_eq!(r.error, 0);
    let r = c.request(CMD_READ, 0, 4096, 4096, &[]).unwrap();
    assert_eq!((r.chunk, r.data), (Some(1), vec![3; 4096]));
    let r = c.request(CMD_READ, 0, 0, 0, &[]).unwrap();
    assert_eq!((r.error, r.chunk), (0, Some(0)));
    // NO_HOLE zeroing writes zeroes as data.
    let r = c
        .request(CMD_WRITE_ZEROES, FLAG_NO_HOLE | FLAG_FUA, 4096, 2048, &[])
        .unwrap();
    assert_eq!(r.error, 0);
    let r = c.request(CMD_READ, 0, 4096, 4096, &[]).unwrap();
    assert_eq!(&r.data[..2048], &[0; 2048][..]);
    assert_eq!(&r.data[2048..], &[3; 2048][..]);
    // The memory driver stores everything: one data extent, or one
    // extent with REQ_ONE.
    let r = c.request(CMD_BLOCK_STATUS, 0, 0, 1 << 20, &[]).unwrap();
    assert_eq!(r.chunk, Some(5));
    assert_eq!(r.data.len(), 8);
    assert_eq!(u32::from_be_bytes(r.data[..4].try_into().unwrap()), 1 << 20);
    assert_eq!(u32::from_be_bytes(r.data[4..8].try_into().unwrap()), 0);
    let r = c
        .request(CMD_BLOCK_STATUS, FLAG_REQ_ONE, 512, 4096, &[])
        .unwrap();
    assert_eq!(r.data.len(), 8);
    // A structured read error is an error chunk.
    let r = c.request(CMD_READ, 0, 1 << 20, 512, &[]).unwrap();
    assert_eq!((r.error, r.chunk), (EINVAL, Some((1 << 15) | 1)));
    c.disconnect();
}

/// Two connections write to one export; a flush on either covers both
/// (what `NBD_FLAG_CAN_MULTI_CONN` promises), and each sees the other's
/// completed writes.
#[test]
fn several_connections_share_one_export() {
    let _w = watchdog(
        "several_connections_share_one_export",
        Duration::from_secs(60),
    );
    let f = Fixture::new(1 << 20);
    let mut a = f.connect();
    let mut b = f.connect();
    let (_, flags) = a.handshake("disk", false).unwrap();
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    b.handshake("disk", true).unwrap();
    assert_eq!(
        a.request(CMD_WRITE, 0, 0, 512, &[0xa; 512]).unwrap().error,
        0
    );
    assert_eq!(
        b.request(CMD_WRITE, 0, 512, 512, &[0xb; 512])
            .unwrap()
            .error,
        0
    );
    assert_eq!(a.request(CMD_FLUSH, 0, 0, 0, &[]).unwrap().error, 0);
    let r = b.request(CMD_READ, 0, 0, 1024, &[]).unwrap();
    assert_eq!(&r.data[..512], &[0xa; 512][..]);
    let r = a.request(CMD_READ, 0, 0, 1024, &[]).unwrap();
    assert_eq!(&r.data[512..], &[0xb; 512][..]);
    a.disconnect();
    b.disconnect();
}

/// The export is a graph user through its backend: draining the exported
/// node while a client streams pipelined writes makes new requests queue
/// and waits for those in flight; every drain completes, the client sees
/// no error, and every write lands.
#[test]
fn drain_while_a_client_streams_writes() {
    let _w = watchdog(
        "drain_while_a_client_streams_writes",
        Duration::from_secs(120),
    );
    let f = Fixture::new(8 << 20);
    const WRITES: u64 = 2048;
    const DEPTH: u64 = 16;
    let pattern = |i: u64| (i % 251 + 1) as u8;
    let done = Arc::new(AtomicBool::new(false));
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    let client_done = done.clone();
    let client = std::thread::spawn(move || {
        let mut sent = 0;
        let mut replied = 0;
        while replied < WRITES {
            while sent < WRITES && sent - replied < DEPTH {
                c.send(
                    CMD_WRITE,
                    0,
                    sent,
                    sent * 4096,
                    4096,
                    &[pattern(sent); 4096],
                )
                .unwrap();
                sent += 1;
            }
            let r = c.reply(0).expect("a reply");
            assert_eq!(r.error, 0, "write {} failed", r.cookie);
            replied += 1;
        }
        client_done.store(true, Ordering::SeqCst);
        c
    });
    let mut drains = 0;
    while !done.load(Ordering::SeqCst) {
        let node = f.node.clone();
        f.main.run(move |bql| {
            let drained = bql.drain(&node);
            // No request reaches the drained node: the client's next
            // requests queue at the backend. (`blk.in_flight()` is not the
            // measure: a request that meets the drain counts itself in for
            // an instant before it backs out and queues.)
            let disk = || {
                node.gs(bql)
                    .driver_as::<blockgraph::drivers::MemoryDriver>()
                    .expect("a memory node")
                    .requests()
            };
            let before = disk();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(disk(), before, "a request reached the drained node");
            drop(drained);
        });
        drains += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c = join_thread(client, "the streaming client");
    eprintln!(
        "{drains} drains, {} requests queued",
        f.blk.queued_requests()
    );
    assert!(drains > 0);
    assert!(
        f.blk.queued_requests() > 0,
        "no request met a drain in {drains} drains"
    );
    for i in (0..WRITES).step_by(97) {
        let r = c.request(CMD_READ, 0, i * 4096, 4096, &[]).unwrap();
        assert!(r.data.iter().all(|&b| b == pattern(i)), "write {i} lost");
    }
    c.disconnect();
}

/// A driver that panics on reads at offset 0.
struct PanicsOnRead;

impl blockgraph::driver::BlockDriver for PanicsOnRead {
    fn format_name(&self) -> &'static str {
        "panics-on-read"
    }
    fn length<'a>(
        &'a self,
        _node: blockgraph::RequestRef<'a>,
    ) -> blockgraph::driver::IoFuture<'a, u64> {
        Box::pin(async move { Ok(1 << 20) })
    }
    fn read<'a>(
        &'a self,
        _node: blockgraph::RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        Box::pin(async move {
            assert_ne!(offset, 0, "deliberate driver panic");
            buf.fill(1);
            Ok(())
        })
    }
    fn write<'a>(
        &'a self,
        _node: blockgraph::RequestRef<'a>,
        _offset: u64,
        _buf: &'a [u8],
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        Box::pin(async move { Ok(()) })
    }
}

/// A driver panicking under a request: the client gets an error reply
/// (not silence), and the connection and server go on.
#[test]
fn a_panicking_driver_gets_an_error_reply() {
    let _w = watchdog(
        "a_panicking_driver_gets_an_error_reply",
        Duration::from_secs(60),
    );
    let main = MainLoop::new().unwrap();
    let blk = main
        .run(|bql| {
            bql.write(|w| {
                let node = w.add_node("p", PanicsOnRead, &[])?;
                w.add_backend("p-blk", &node, BackendOptions::default())
            })
        })
        .unwrap();
    let server = NbdServer::new(&main).unwrap();
    server
        .add_export(ExportOptions {
            name: "p".into(),
            description: String::new(),
            backend: blk,
            read_only: false,
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listener = server.listen_unix(dir.path().join("s")).unwrap();
    for structured in [false, true] {
        let mut c = Client::connect(&dir.path().join("s"));
        c.handshake("p", structured).unwrap();
        let r = c.request(CMD_READ, 0, 0, 512, &[]).unwrap();
        assert_ne!(r.error, 0);
        let r = c.request(CMD_READ, 0, 512, 512, &[]).unwrap();
        assert_eq!((r.error, r.data), (0, vec![1; 512]));
        // The same for reads large enough to get a data buffer of their
        // own (the buffer goes down with the panicking request).
        let r = c.request(CMD_READ, 0, 0, 64 << 10, &[]).unwrap();
        assert_ne!(r.error, 0);
        let r = c.request(CMD_READ, 0, 64 << 10, 64 << 10, &[]).unwrap();
        assert_eq!((r.error, r.data), (0, vec![1; 64 << 10]));
        c.disconnect();
    }
    listener.shutdown();
    server.shutdown();
    main.shutdown();
}

/// Stopping a listener ends its idle connections; dropping the server
/// inside a drain section of the exported node does not wait for the
/// request queued there (that would deadlock), and the request still
/// completes and is answered once the section ends.
#[test]
fn stopping_ends_connections_without_losing_queued_requests() {
    let _w = watchdog(
        "stopping_ends_connections_without_losing_queued_requests",
        Duration::from_secs(60),
    );
    let mut f = Fixture::new(1 << 20);
    let mut idle = f.connect();
    idle.handshake("disk", false).unwrap();
    f.listener.take().unwrap().shutdown();
    assert!(idle.closed_by_server(), "the idle connection was closed");
    assert!(!f.socket().exists(), "the socket file was removed");

    let tcp = f
        .server
        .as_ref()
        .unwrap()
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let addr = tcp.tcp_addr().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    // A TCP client by hand (the raw test client speaks Unix sockets):
    // EXPORT_NAME, then one write while the node is drained.
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(&3u32.to_be_bytes());
    go.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    go.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    std::io::Write::write_all(&mut s, &go).unwrap();
    let mut export = [0u8; 10];
    std::io::Read::read_exact(&mut s, &mut export).unwrap();

    let server = f.server.take().unwrap();
    let node = f.node.clone();
    let blk = f.blk.clone();
    let request = request_bytes(CMD_WRITE, 0, 99, 0, 512, &[0xee; 512]);
    let mut writer = s.try_clone().unwrap();
    f.main.run(move |bql| {
        let drained = bql.drain(&node);
        std::io::Write::write_all(&mut writer, &request).unwrap();
        common::wait_until("the write queues at the drained backend", || {
            blk.queued_requests() > 0
        });
        drop(server); // must not wait for the queued write
        drop(drained);
    });
    let mut reply = [0u8; 16];
    std::io::Read::read_exact(&mut s, &mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        0,
        "no error"
    );
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 99);
    let mut rest = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut s, &mut rest).unwrap(),
        0,
        "then closed"
    );
    drop(tcp);
}

/// Connections are counted per export (only those that picked it), a safe
/// removal is refused while one is there and succeeds once it is gone, and
/// a removed export cannot be picked any more.
#[test]
fn exports_count_their_connections_and_safe_removal_waits_for_none() {
    use blockgraph::export::nbd::{RemoveExportError, RemoveMode};
    let _w = watchdog(
        "exports_count_their_connections_and_safe_removal_waits_for_none",
        Duration::from_secs(60),
    );
    let f = Fixture::new(1 << 20);
    let server = f.server.as_ref().unwrap();
    assert_eq!(server.export_connections("disk"), Some(0));
    assert_eq!(server.export_connections("nope"), None);
    // Still negotiating (INFO only asks): nobody's.
    let mut asking = f.connect();
    asking.greet().unwrap();
    asking
        .send_option(OPT_INFO, &Client::info_data("disk", &[]))
        .unwrap();
    assert_eq!(asking.option_replies().unwrap().last().unwrap().0, REP_ACK);
    assert_eq!(server.export_connections("disk"), Some(0));
    let mut a = f.connect();
    a.handshake("disk", false).unwrap();
    let mut b = f.connect();
    b.handshake("disk", true).unwrap();
    let mut r = f.connect();
    r.handshake("ro", false).unwrap();
    assert_eq!(server.export_connections("disk"), Some(2));
    assert_eq!(server.export_connections("ro"), Some(1));

    assert_eq!(
        server
            .remove_export_with("disk", RemoveMode::Safe)
            .unwrap_err(),
        RemoveExportError::InUse {
            name: "disk".into(),
            connections: 2
        }
    );
    // Refused: the export and its clients are untouched.
    assert_eq!(a.request(CMD_WRITE, 0, 0, 512, &[7; 512]).unwrap().error, 0);
    a.disconnect();
    b.disconnect();
    common::wait_until("both clients of disk are uncounted", || {
        server.export_connections("disk") == Some(0)
    });
    let removal = server.remove_export_with("disk", RemoveMode::Safe).unwrap();
    assert_eq!(removal.connections(), 0);
    assert!(removal.wait_timeout(Duration::ZERO));
    assert_eq!(server.export_connections("disk"), None);
    assert_eq!(
        server
            .remove_export_with("disk", RemoveMode::Hard)
            .unwrap_err(),
        RemoveExportError::NotFound("disk".into())
    );
    // Nobody can pick it now; the client that only asked finds it gone.
    asking
        .send_option(OPT_GO, &Client::info_data("disk", &[]))
        .unwrap();
    assert_eq!(asking.option_replies().unwrap()[0].0, REP_ERR_UNKNOWN);
    // The other export still serves its client.
    let read = r.request(CMD_READ, 0, 0, 512, &[]).unwrap();
    assert_eq!((read.error, read.data), (0, vec![7; 512]));
    assert_eq!(server.export_connections("ro"), Some(1));
}

/// Sends a 512-byte write of `byte` at `offset` (cookie 99) on `client`'s
/// connection while the export's node is drained, waits until it queues at
/// the backend, runs `then` with the writing socket inside the drained
/// section, then ends the section.
fn write_queued_at_drained_node<R: Send + 'static>(
    f: &Fixture,
    client: &Client,
    offset: u64,
    byte: u8,
    then: impl FnOnce(&mut std::os::unix::net::UnixStream) -> R + Send + 'static,
) -> R {
    let (node, blk) = (f.node.clone(), f.blk.clone());
    let mut writer = client.s.try_clone().unwrap();
    let before = blk.queued_requests();
    f.main.run(move |bql| {
        let drained = bql.drain(&node);
        writer
            .write_all(&request_bytes(CMD_WRITE, 0, 99, offset, 512, &[byte; 512]))
            .unwrap();
        common::wait_until("the write queues at the drained backend", || {
            blk.queued_requests() > before
        });
        let out = then(&mut writer);
        drop(drained);
        out
    })
}

/// QEMU's `block-export-del mode=hard`: the removed export's connections
/// stop reading, the write in flight (queued at a drained node) completes
/// and is answered, then the socket closes; the other export's connection
/// keeps working and reads what the answered write wrote.
#[test]
fn hard_removal_answers_in_flight_requests_then_closes_only_that_export() {
    use blockgraph::export::nbd::RemoveMode;
    let _w = watchdog(
        "hard_removal_answers_in_flight_requests_then_closes_only_that_export",
        Duration::from_secs(60),
    );
    let mut f = Fixture::new(1 << 20);
    let server = Arc::new(f.server.take().unwrap());
    let mut rw = f.connect();
    rw.handshake("disk", false).unwrap();
    let mut ro = f.connect();
    ro.handshake("ro", true).unwrap();

    let s = server.clone();
    let removal = write_queued_at_drained_node(&f, &rw, 4096, 0xee, move |_| {
        let removal = s.remove_export_with("disk", RemoveMode::Hard).unwrap();
        // The write is in flight: the connection cannot end before it.
        assert!(!removal.wait_timeout(Duration::from_millis(100)));
        assert_eq!(removal.connections(), 1);
        removal
    });
    assert!(
        removal.wait_timeout(Duration::from_secs(20)),
        "the connection ended"
    );
    assert_eq!(removal.connections(), 0);
    let reply = rw.reply(0).unwrap();
    assert_eq!(
        (reply.cookie, reply.error),
        (99, 0),
        "the write was answered"
    );
    // A request sent after the removal is not read: the socket closes.
    let _ = rw.send(CMD_READ, 0, 100, 0, 512, &[]);
    assert!(rw.closed_by_server(), "then the connection closed");
    assert_eq!(server.export_connections("disk"), None);
    // The other export: untouched, and the answered write is there.
    assert_eq!(server.export_connections("ro"), Some(1));
    let read = ro.request(CMD_READ, 0, 4096, 512, &[]).unwrap();
    assert_eq!((read.error, read.data), (0, vec![0xee; 512]));
    ro.disconnect();
    Arc::try_unwrap(server).unwrap().shutdown();
}

/// A safe removal does not count a connection whose client has hung up,
/// even before the server has read the end of its stream (here it cannot:
/// the connection waits on a write queued at a drained node). That write
/// still completes and is answered; then the connection ends by itself.
#[test]
fn safe_removal_skips_clients_that_hung_up_and_keeps_their_writes() {
    use blockgraph::export::nbd::{RemoveExportError, RemoveMode};
    let _w = watchdog(
        "safe_removal_skips_clients_that_hung_up_and_keeps_their_writes",
        Duration::from_secs(60),
    );
    let mut f = Fixture::new(1 << 20);
    let server = Arc::new(f.server.take().unwrap());
    let mut rw = f.connect();
    rw.handshake("disk", false).unwrap();
    let mut ro = f.connect();
    ro.handshake("ro", true).unwrap();

    let s = server.clone();
    let removal = write_queued_at_drained_node(&f, &rw, 8192, 0x5a, move |writer| {
        // The client is still there: refused.
        assert_eq!(
            s.remove_export_with("disk", RemoveMode::Safe).unwrap_err(),
            RemoveExportError::InUse {
                name: "disk".into(),
                connections: 1
            }
        );
        // It hangs up (sends nothing more, still reads its reply); its
        // connection cannot end before the queued write, yet no longer
        // counts as a user.
        writer.shutdown(std::net::Shutdown::Write).unwrap();
        let removal = s.remove_export_with("disk", RemoveMode::Safe).unwrap();
        assert_eq!(removal.connections(), 1);
        assert!(!removal.wait_timeout(Duration::from_millis(50)));
        removal
    });
    assert!(
        removal.wait_timeout(Duration::from_secs(20)),
        "the connection ended"
    );
    let reply = rw.reply(0).unwrap();
    assert_eq!(
        (reply.cookie, reply.error),
        (99, 0),
        "the write was answered"
    );
    assert!(rw.closed_by_server(), "then the connection closed");
    assert_eq!(server.export_connections("disk"), None);
    let read = ro.request(CMD_READ, 0, 8192, 512, &[]).unwrap();
    assert_eq!((read.error, read.data), (0, vec![0x5a; 512]));
    ro.disconnect();
    Arc::try_unwrap(server).unwrap().shutdown();
}

/// Reads of an `O_DIRECT` file through the export return the file's bytes
/// whatever their size and alignment, with simple and structured replies,
/// one at a time and many in flight: short reads (header and data in one
/// buffer), aligned ones (the kernel reads into a pooled buffer of the
/// reply's own, sent beside its header) and misaligned ones (the same
/// buffer, filled through the file driver's bounce).
#[test]
fn reads_of_a_direct_file_return_its_bytes_at_every_size() {
    use blockgraph::drivers::{FileDriver, FileOptions};
    let _w = watchdog(
        "reads_of_a_direct_file_return_its_bytes_at_every_size",
        Duration::from_secs(120),
    );
    const SIZE: usize = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    // No byte equals its neighbour a page away, so a misplaced page shows.
    let bytes: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let opened = FileDriver::open(
        &path,
        FileOptions {
            direct: true,
            ..FileOptions::default()
        },
    );
    let Ok(driver) = opened else {
        eprintln!("no O_DIRECT on this filesystem; skipping");
        return;
    };
    let main = MainLoop::new().unwrap();
    let blk = main
        .run(move |bql| {
            bql.write(|w| {
                let node = w.add_node("disk", driver, &[])?;
                w.add_backend(
                    "export",
                    &node,
                    BackendOptions::with_perms(Permissions::SHARED_READER),
                )
            })
        })
        .unwrap();
    let server = NbdServer::new(&main).unwrap();
    server
        .add_export(ExportOptions {
            name: "disk".into(),
            description: String::new(),
            backend: blk,
            read_only: true,
        })
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let listener = server.listen_unix(&sock).unwrap();

    // (offset, length): short, aligned pages, a misaligned start, a
    // misaligned end, both, and large ones.
    let reads: [(u64, u32); 10] = [
        (0, 512),
        (4096, 1000),
        (8192, 4096),
        (512, 4096),
        (65536, 65536 - 512),
        (100, 10000),
        (1 << 20, 1 << 20),
        (3 << 20, 2048),
        (SIZE as u64 - 4096, 4096),
        (12345, 256 << 10),
    ];
    let want = |off: u64, len: u32| &bytes[off as usize..off as usize + len as usize];
    for structured in [false, true] {
        let mut c = Client::connect(&sock);
        c.handshake("disk", structured).unwrap();
        for &(off, len) in &reads {
            let r = c.request(CMD_READ, 0, off, len, &[]).unwrap();
            assert_eq!(r.error, 0, "read {len} at {off}");
            assert!(r.data == want(off, len), "read {len} at {off}");
        }
        // Many in flight: the replies of a batch go out in one vectored
        // write, split ones beside whole ones. One length per batch, so
        // that simple replies can be told apart by their cookie alone.
        for len in [512u32, 4096, 20000] {
            for (i, &(off, _)) in reads.iter().enumerate() {
                let off = off.min(SIZE as u64 - u64::from(len));
                c.send(CMD_READ, 0, i as u64, off, len, &[]).unwrap();
            }
            for _ in 0..reads.len() {
                let r = c.reply(len as usize).unwrap();
                let off = reads[r.cookie as usize].0.min(SIZE as u64 - u64::from(len));
                assert_eq!(r.error, 0, "read {len} at {off}");
                assert!(r.data == want(off, len), "pipelined read {len} at {off}");
            }
        }
        c.disconnect();
    }
    listener.shutdown();
    server.shutdown();
    main.shutdown();
}
