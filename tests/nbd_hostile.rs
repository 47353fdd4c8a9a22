//! The NBD export against hostile clients: malformed handshakes, options
//! out of order or too long, requests past the end or too large, unknown
//! commands and flags, a wrong magic, a client that never reads its
//! replies. Each gets the protocol's error reply or a disconnect; the
//! server never panics (a panic hook counts them), never allocates what a
//! client merely asks for, and keeps serving other clients.

mod common;
mod nbd_client;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::watchdog;
use nbd_client::*;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics anywhere in the process (server tasks included), then
/// reports them as usual.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// A fixture plus the checks every test ends with: a fresh client is still
/// served, and nothing panicked.
fn fixture() -> Fixture {
    count_panics();
    Fixture::new(1 << 20)
}

fn still_serves(f: &Fixture) {
    let mut c = f.connect();
    let (size, _) = c.handshake("disk", true).expect("handshake");
    assert_eq!(size, 1 << 20);
    let r = c.request(CMD_READ, 0, 0, 512, &[]).unwrap();
    assert_eq!((r.error, r.data.len()), (0, 512));
    c.disconnect();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic happened");
}

#[test]
fn unknown_client_flags_disconnect() {
    let _w = watchdog("unknown_client_flags_disconnect", Duration::from_secs(60));
    let f = fixture();
    let mut c = f.connect();
    assert_eq!(c.u64().unwrap(), INIT_MAGIC);
    c.bytes(10).unwrap();
    c.s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(c.closed_by_server());
    still_serves(&f);
}

#[test]
fn wrong_option_magic_disconnects() {
    let _w = watchdog("wrong_option_magic_disconnects", Duration::from_secs(60));
    let f = fixture();
    let mut c = f.connect();
    c.greet().unwrap();
    c.s.write_all(&[0xde; 16]).unwrap();
    assert!(c.closed_by_server());
    still_serves(&f);
}

#[test]
fn unknown_and_out_of_order_options_get_errors() {
    let _w = watchdog(
        "unknown_and_out_of_order_options_get_errors",
        Duration::from_secs(60),
    );
    let f = fixture();
    let mut c = f.connect();
    c.greet().unwrap();
    // STARTTLS and a made-up option: not supported.
    for option in [5, 0x1234] {
        c.send_option(option, b"xyz").unwrap();
        assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_UNSUP);
    }
    // Meta contexts before structured replies.
    c.send_option(
        OPT_SET_META_CONTEXT,
        &Client::meta_data("disk", &["base:allocation"]),
    )
    .unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_INVALID);
    // Structured replies with data, then twice.
    c.send_option(OPT_STRUCTURED_REPLY, b"x").unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_INVALID);
    c.send_option(OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ACK);
    c.send_option(OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_INVALID);
    // LIST with data; INFO/GO malformed or for an unknown export.
    c.send_option(OPT_LIST, b"junk").unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_INVALID);
    c.send_option(OPT_GO, &[0, 0, 0, 200, b'd']).unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_INVALID);
    c.send_option(OPT_INFO, &Client::info_data("nope", &[]))
        .unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_UNKNOWN);
    // A meta-context query count that does not fit the data.
    c.send_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_INVALID);
    // After all that, the connection still works.
    c.send_option(OPT_GO, &Client::info_data("disk", &[]))
        .unwrap();
    let replies = c.option_replies().unwrap();
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    c.disconnect();
    still_serves(&f);
}

#[test]
fn too_long_option_is_skipped_and_refused() {
    let _w = watchdog(
        "too_long_option_is_skipped_and_refused",
        Duration::from_secs(60),
    );
    let f = fixture();
    let mut c = f.connect();
    c.greet().unwrap();
    c.send_option(0x4242, &vec![0x55; 1 << 20]).unwrap();
    assert_eq!(c.option_replies().unwrap()[0].0, REP_ERR_TOO_BIG);
    // A too-long export name cannot be refused: hang up.
    let mut m = Vec::new();
    m.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert!(c.closed_by_server());
    still_serves(&f);
}

#[test]
fn unknown_export_name_disconnects() {
    let _w = watchdog("unknown_export_name_disconnects", Duration::from_secs(60));
    let f = fixture();
    let mut c = f.connect();
    c.greet().unwrap();
    c.send_option(OPT_EXPORT_NAME, b"nope").unwrap();
    assert!(c.closed_by_server());
    still_serves(&f);
}

#[test]
fn endless_options_disconnect() {
    let _w = watchdog("endless_options_disconnect", Duration::from_secs(60));
    let f = fixture();
    let mut c = f.connect();
    c.greet().unwrap();
    let mut closed = false;
    for _ in 0..1100 {
        if c.send_option(0x4242, &[]).is_err() {
            closed = true;
            break;
        }
        match c.option_reply() {
            Ok((_, kind, _)) => assert_eq!(kind, REP_ERR_UNSUP),
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed || c.closed_by_server(), "the server hung up");
    still_serves(&f);
}

#[test]
fn requests_past_the_end_get_einval_or_enospc() {
    let _w = watchdog(
        "requests_past_the_end_get_einval_or_enospc",
        Duration::from_secs(60),
    );
    let f = fixture();
    for structured in [false, true] {
        let mut c = f.connect();
        c.handshake("disk", structured).unwrap();
        let end = 1u64 << 20;
        assert_eq!(
            c.request(CMD_READ, 0, end - 512, 1024, &[]).unwrap().error,
            EINVAL
        );
        assert_eq!(
            c.request(CMD_READ, 0, u64::MAX - 10, 512, &[])
                .unwrap()
                .error,
            EINVAL
        );
        assert_eq!(
            c.request(CMD_WRITE, 0, end, 512, &[1; 512]).unwrap().error,
            ENOSPC
        );
        assert_eq!(
            c.request(CMD_WRITE_ZEROES, 0, end - 4096, 8192, &[])
                .unwrap()
                .error,
            ENOSPC
        );
        assert_eq!(
            c.request(CMD_TRIM, 0, end, 4096, &[]).unwrap().error,
            EINVAL
        );
        if structured {
            assert_eq!(
                c.request(CMD_BLOCK_STATUS, 0, end, 4096, &[])
                    .unwrap()
                    .error,
                EINVAL
            );
        }
        // The write's payload was consumed: the stream is still in step.
        let r = c.request(CMD_READ, 0, 0, 4096, &[]).unwrap();
        assert_eq!((r.error, r.data.len()), (0, 4096));
        c.disconnect();
    }
    still_serves(&f);
}

#[test]
fn huge_reads_are_refused_without_allocating() {
    let _w = watchdog(
        "huge_reads_are_refused_without_allocating",
        Duration::from_secs(60),
    );
    let f = Fixture::new(64 << 20);
    count_panics();
    for structured in [false, true] {
        let mut c = f.connect();
        c.handshake("disk", structured).unwrap();
        let started = Instant::now();
        // 4 GiB minus one, and 48 MiB (inside the export): both above the
        // 32 MiB maximum.
        for len in [u32::MAX, 48 << 20] {
            let r = c.request(CMD_READ, 0, 0, len, &[]).unwrap();
            let expected = if structured { EOVERFLOW } else { EINVAL };
            assert_eq!(r.error, expected, "read of {len} bytes");
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        c.disconnect();
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn oversized_write_disconnects() {
    let _w = watchdog("oversized_write_disconnects", Duration::from_secs(60));
    let f = fixture();
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    // A 4 GiB write header; the payload never comes.
    c.send(CMD_WRITE, 0, 1, 0, u32::MAX, &[]).unwrap();
    assert!(c.closed_by_server());
    still_serves(&f);
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let _w = watchdog(
        "unknown_commands_and_flags_get_einval",
        Duration::from_secs(60),
    );
    let f = fixture();
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    for kind in [5, 8, 99, 0xffff] {
        assert_eq!(
            c.request(kind, 0, 0, 512, &[]).unwrap().error,
            EINVAL,
            "command {kind}"
        );
    }
    assert_eq!(
        c.request(CMD_FLUSH, 0x8000, 0, 0, &[]).unwrap().error,
        EINVAL
    );
    // Block status without a negotiated context.
    assert_eq!(
        c.request(CMD_BLOCK_STATUS, 0, 0, 512, &[]).unwrap().error,
        EINVAL
    );
    // FAST_ZERO cannot be promised.
    assert_eq!(
        c.request(CMD_WRITE_ZEROES, FLAG_FAST_ZERO, 0, 4096, &[])
            .unwrap()
            .error,
        ENOTSUP
    );
    c.disconnect();
    still_serves(&f);
}

#[test]
fn wrong_request_magic_disconnects() {
    let _w = watchdog("wrong_request_magic_disconnects", Duration::from_secs(60));
    let f = fixture();
    let mut c = f.connect();
    c.handshake("disk", true).unwrap();
    c.s.write_all(&[0x11; 28]).unwrap();
    assert!(c.closed_by_server());
    still_serves(&f);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let _w = watchdog(
        "read_only_export_refuses_writes_with_eperm",
        Duration::from_secs(60),
    );
    let f = fixture();
    let mut c = f.connect();
    let (_, flags) = c.handshake("ro", false).unwrap();
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        c.request(CMD_WRITE, 0, 0, 512, &[9; 512]).unwrap().error,
        EPERM
    );
    assert_eq!(
        c.request(CMD_WRITE_ZEROES, 0, 0, 512, &[]).unwrap().error,
        EPERM
    );
    assert_eq!(c.request(CMD_TRIM, 0, 0, 512, &[]).unwrap().error, EPERM);
    let r = c.request(CMD_READ, 0, 0, 512, &[]).unwrap();
    assert_eq!(r.data, vec![0; 512], "nothing was written");
    assert_eq!(c.request(CMD_FLUSH, 0, 0, 0, &[]).unwrap().error, 0);
    c.disconnect();
    still_serves(&f);
}

#[test]
fn truncated_requests_and_vanishing_clients_are_harmless() {
    let _w = watchdog(
        "truncated_requests_and_vanishing_clients_are_harmless",
        Duration::from_secs(60),
    );
    let f = fixture();
    // Half a greeting answer, half an option, half a request, half a
    // write payload: each client just goes away.
    let mut c = f.connect();
    c.s.write_all(&[0, 0]).unwrap();
    drop(c);
    let mut c = f.connect();
    c.greet().unwrap();
    c.s.write_all(&OPT_MAGIC.to_be_bytes()).unwrap();
    drop(c);
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    c.send(CMD_WRITE, 0, 1, 0, 4096, &[1; 100]).unwrap();
    drop(c);
    still_serves(&f);
}

#[test]
fn a_client_that_never_reads_replies_is_bounded() {
    let _w = watchdog(
        "a_client_that_never_reads_replies_is_bounded",
        Duration::from_secs(120),
    );
    let f = fixture();
    let mut c = f.connect();
    c.handshake("disk", false).unwrap();
    // 400 reads of 1 MiB: 400 MiB of replies if the server answered them
    // all without waiting. The requests themselves are small enough to sit
    // in the socket buffer.
    const N: u64 = 400;
    let mut requests = Vec::new();
    for cookie in 0..N {
        requests.extend(request_bytes(CMD_READ, 0, cookie, 0, 1 << 20, &[]));
    }
    c.s.write_all(&requests).unwrap();
    // Let the server work until it stalls on the unread replies.
    let before = f.blk.completed_requests();
    let mut last = before;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = f.blk.completed_requests();
        if now == last {
            break;
        }
        last = now;
    }
    let done = last - before;
    eprintln!("{done} of {N} requests served while the client read nothing");
    // The 64 MiB payload budget (64 replies of 1 MiB), the reply being
    // written, and what the socket buffers hold.
    assert!(
        done <= 72,
        "{done} requests served while the client read nothing"
    );
    // Reading the replies lets the server finish every request.
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let r = c.reply(1 << 20).unwrap();
        assert_eq!(r.error, 0);
        assert!(!std::mem::replace(&mut seen[r.cookie as usize], true));
    }
    c.disconnect();
    still_serves(&f);
}

/// A hard removal of the export a client uses while that client reads
/// none of its replies: the connection gives up after `STOP_GRACE` and
/// closes; the removal does not wait longer than that, and other clients
/// are served throughout.
#[test]
fn hard_removal_gives_up_on_a_client_that_never_reads() {
    use blockgraph::export::nbd::{RemoveMode, STOP_GRACE};
    let _w = watchdog(
        "hard_removal_gives_up_on_a_client_that_never_reads",
        Duration::from_secs(120),
    );
    let f = fixture();
    let mut c = f.connect();
    c.handshake("ro", false).unwrap();
    let mut requests = Vec::new();
    for cookie in 0..200u64 {
        requests.extend(request_bytes(CMD_READ, 0, cookie, 0, 1 << 20, &[]));
    }
    c.s.write_all(&requests).unwrap();
    // Served until the budget stops it (the replies fill the socket).
    let mut last = f.blk.completed_requests();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = f.blk.completed_requests();
        if now == last {
            break;
        }
        last = now;
    }
    let server = f.server.as_ref().unwrap();
    let start = Instant::now();
    let removal = server.remove_export_with("ro", RemoveMode::Hard).unwrap();
    assert_eq!(removal.connections(), 1);
    // Another export is served while that one waits out its grace.
    let mut other = f.connect();
    other.handshake("disk", false).unwrap();
    assert_eq!(other.request(CMD_READ, 0, 0, 512, &[]).unwrap().error, 0);
    other.disconnect();
    assert!(
        removal.wait_timeout(STOP_GRACE + Duration::from_secs(20)),
        "the connection ended after the grace"
    );
    let took = start.elapsed();
    assert!(
        took >= STOP_GRACE,
        "gave up after {took:?}, before the grace"
    );
    // What the client reads now ends in EOF, short of the 200 replies.
    c.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match std::io::Read::read(&mut c.s, &mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading after the removal: {e}"),
        }
    }
    assert!(
        got < 200 * ((1 << 20) + 16),
        "{got} bytes: every reply came"
    );
    still_serves(&f);
}
