//! The file driver's I/O paths (`aio=io_uring`, the default where the
//! kernel allows it, and `aio=threads`): which one a node uses and reports,
//! data integrity under many requests in flight on each, and the fallback
//! when io_uring is refused.
//!
//! The ownership rules of the io_uring path (requests dropped or leaked
//! half way) are tested in the crate (`drivers::file::tests`), where a
//! request future can be polled by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockgraph::driver::BlockDriver;
use blockgraph::drivers::{Aio, FileDriver, FileOptions};
use blockgraph::{Error, IoBuf};

mod common;
use common::{Rig, Stack};

fn image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn setup(driver: FileDriver) -> Rig {
    Stack::new().node("file0", driver).build()
}

/// The bytes a writer puts at `offset` (distinct per offset and round).
fn pattern(offset: u64, len: usize, round: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) as u8).wrapping_mul(13) ^ round.wrapping_mul(101))
        .collect()
}

#[test]
fn the_default_is_io_uring_where_available_and_it_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20);
    let driver = FileDriver::open(&path, FileOptions::default()).unwrap();
    let expect = if Aio::io_uring_available() {
        Aio::IoUring
    } else {
        Aio::Threads
    };
    assert_eq!(driver.aio(), expect);
    assert!(
        driver
            .describe()
            .contains(&format!("aio={}", expect.name())),
        "{}",
        driver.describe()
    );
    let info = driver.info();
    assert!(
        info.format_specific
            .contains(&("aio".to_owned(), expect.name().to_owned())),
        "{:?}",
        info.format_specific
    );
    drop(driver);
    let threads = FileDriver::open(
        &path,
        FileOptions {
            aio: Some(Aio::Threads),
            ..FileOptions::default()
        },
    )
    .unwrap();
    assert_eq!(threads.aio(), Aio::Threads);
    assert!(threads.describe().contains("aio=threads"));
}

/// 32 tasks on one I/O thread, each writing and reading back its own
/// blocks (4 KiB, unaligned, and larger than a ring buffer), several rounds;
/// then the file is checked against what was written. With `owned`, the
/// requests move their buffers in (`write_buf`/`read_buf`), which the file
/// driver hands to the kernel as they are where the range allows.
fn many_requests_in_flight(aio: Aio, direct: bool, owned: bool) {
    if aio == Aio::IoUring && !Aio::io_uring_available() {
        eprintln!("io_uring is not available here; skipping");
        return;
    }
    const TASKS: u64 = 32;
    const REGION: u64 = 512 << 10;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), TASKS * REGION);
    let opened = FileDriver::open(
        &path,
        FileOptions {
            direct,
            aio: Some(aio),
            ..FileOptions::default()
        },
    );
    let Ok(driver) = opened else {
        eprintln!("no O_DIRECT on this filesystem; skipping");
        return;
    };
    assert_eq!(driver.aio(), aio);
    let s = setup(driver);
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let blk = s.blk.clone();
            s.io.spawn(move |mut cx| async move {
                let base = t * REGION;
                // (offset in the region, length): aligned 4 KiB, an
                // unaligned piece (a read-modify-write with O_DIRECT), and
                // 256 KiB (more than a ring buffer).
                let pieces = [(0u64, 4096usize), (8192 + 100, 1000), (65536, 256 << 10)];
                for round in 0..4u8 {
                    for &(off, len) in &pieces {
                        let data = pattern(base + off, len, round + t as u8);
                        if owned {
                            let buf = IoBuf::copy_from(&data);
                            let buf = blk.write_buf(&mut cx, base + off, buf).await?;
                            assert_eq!(&*buf, &data[..], "handed back unchanged");
                            let mut back = IoBuf::zeroed(len);
                            back.fill(0xEE);
                            let back = blk.read_buf(&mut cx, base + off, back).await?;
                            assert_eq!(&*back, &data[..], "task {t} round {round} at {off}");
                            continue;
                        }
                        blk.write(&mut cx, base + off, &data).await?;
                        let mut back = vec![0u8; len];
                        blk.read(&mut cx, base + off, &mut back).await?;
                        assert_eq!(back, data, "task {t} round {round} at {off}");
                    }
                }
                blk.flush(&mut cx).await
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let on_disk = std::fs::read(&path).unwrap();
    for t in 0..TASKS {
        let base = t * REGION;
        for (off, len) in [(0u64, 4096usize), (8192 + 100, 1000), (65536, 256 << 10)] {
            let at = (base + off) as usize;
            assert_eq!(
                &on_disk[at..at + len],
                &pattern(base + off, len, 3 + t as u8)[..],
                "task {t} at {off}"
            );
        }
        // The bytes around the unaligned piece are untouched.
        let at = (base + 8192) as usize;
        assert!(on_disk[at..at + 100].iter().all(|&b| b == 0));
    }
    s.finish();
}

#[test]
fn many_requests_in_flight_io_uring_buffered() {
    many_requests_in_flight(Aio::IoUring, false, false);
}

#[test]
fn many_owned_requests_in_flight_io_uring_buffered() {
    many_requests_in_flight(Aio::IoUring, false, true);
}

#[test]
fn many_requests_in_flight_io_uring_direct() {
    many_requests_in_flight(Aio::IoUring, true, false);
}

#[test]
fn many_owned_requests_in_flight_io_uring_direct() {
    many_requests_in_flight(Aio::IoUring, true, true);
}

#[test]
fn many_requests_in_flight_threads_buffered() {
    many_requests_in_flight(Aio::Threads, false, false);
}

#[test]
fn many_owned_requests_in_flight_threads_buffered() {
    many_requests_in_flight(Aio::Threads, false, true);
}

#[test]
fn many_requests_in_flight_threads_direct() {
    many_requests_in_flight(Aio::Threads, true, false);
}

#[test]
fn many_owned_requests_in_flight_threads_direct() {
    many_requests_in_flight(Aio::Threads, true, true);
}

#[test]
fn reads_past_the_end_are_zeroes_on_io_uring() {
    if !Aio::io_uring_available() {
        eprintln!("io_uring is not available here; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.img");
    std::fs::write(&path, vec![0x42u8; 3000]).unwrap();
    let driver = FileDriver::open(&path, FileOptions::default()).unwrap();
    assert_eq!(driver.aio(), Aio::IoUring);
    let s = setup(driver);
    let tail = s
        .on_node("file0", |n| {
            Box::pin(async move {
                let mut buf = vec![0xAAu8; 2000];
                n.read(2000, &mut buf).await.map(|_| buf)
            })
        })
        .unwrap();
    assert!(tail[..1000].iter().all(|&b| b == 0x42));
    assert!(tail[1000..].iter().all(|&b| b == 0), "past the end: zeroes");
    s.finish();
}

/// Run by `io_uring_refused_falls_back_to_threads` in a child process
/// with `BLOCKGRAPH_NO_IO_URING=1`; ignored otherwise.
#[test]
#[ignore = "run by io_uring_refused_falls_back_to_threads in a child process"]
fn child_without_io_uring() {
    assert_eq!(
        std::env::var("BLOCKGRAPH_NO_IO_URING").as_deref(),
        Ok("1"),
        "run through io_uring_refused_falls_back_to_threads"
    );
    assert!(!Aio::io_uring_available());
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20);
    let err = FileDriver::open(
        &path,
        FileOptions {
            aio: Some(Aio::IoUring),
            ..FileOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("io_uring")),
        "{err}"
    );
    let driver = FileDriver::open(&path, FileOptions::default()).unwrap();
    assert_eq!(driver.aio(), Aio::Threads, "the default falls back");
    let s = setup(driver);
    s.write(4096, &[7u8; 8192]).unwrap();
    assert_eq!(s.read(4096, 8192).unwrap(), vec![7u8; 8192]);
    s.flush().unwrap();
    s.finish();
    assert_eq!(&std::fs::read(&path).unwrap()[4096..12288], &[7u8; 8192]);
}

#[test]
fn io_uring_refused_falls_back_to_threads() {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "child_without_io_uring",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("BLOCKGRAPH_NO_IO_URING", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Watchdog: the child has a minute.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("watchdog: the child test did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child test ran:\n{text}");
}
