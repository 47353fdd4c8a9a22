//! The io_uring path's ownership rules, tested where the request futures
//! can be polled by hand: a request future dropped or leaked
//! (`mem::forget`) after its first poll, with its operation in the kernel,
//! never lets the kernel read or write the caller's buffer, and leaves the
//! ring usable; a ring dropped with operations in flight waits for them.

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::uring::{self, POOL_SLOTS, RETAIN_BYTES};
use super::{Aio, FileDriver, FileOptions};
use crate::thread::{set_local_set, set_thread_role, ThreadRole};

type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Runs `f`'s future on a fresh thread marked as an I/O thread, in a
/// current-thread runtime with the I/O driver (as `IoThread` builds them);
/// fails the test if it takes more than a minute.
fn on_io_thread<T: Send + 'static>(f: impl FnOnce() -> LocalFuture<T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        set_thread_role(ThreadRole::Io);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = runtime.block_on(f());
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("watchdog: the I/O thread did not finish within a minute");
    thread.join().unwrap();
    out
}

/// Counts one more write in flight on `driver`, for good: a buffered
/// write alone takes the thread pool (`lone_buffered_write`), and the
/// tests that call this need their writes on the ring.
fn as_if_another_write_were_in_flight(driver: &FileDriver) {
    driver
        .writes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A file of `len` bytes of `byte`.
fn image(dir: &std::path::Path, len: usize, byte: u8) -> std::path::PathBuf {
    let path = dir.join("img");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&vec![byte; len])
        .unwrap();
    path
}

/// Polls `fut` once with a waker that does nothing.
fn poll_once<F: Future + ?Sized>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// Yields until this thread's ring has nothing in the kernel.
async fn ring_idle() {
    let ring = uring::current().expect("an I/O thread has a ring");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ring.stats().1 > 0 {
        assert!(
            Instant::now() < deadline,
            "watchdog: operations stayed in the kernel"
        );
        tokio::task::yield_now().await;
    }
}

fn open(path: &std::path::Path, direct: bool) -> Option<FileDriver> {
    if !Aio::io_uring_available() {
        eprintln!("io_uring is not available here; skipping");
        return None;
    }
    let driver = FileDriver::open(
        path,
        FileOptions {
            direct,
            ..FileOptions::default()
        },
    )
    .ok()?;
    assert_eq!(driver.aio(), Aio::IoUring);
    // These tests are about the ring: buffered reads must not be served
    // from the page cache before it (`read_cached`, tested below).
    without_cached_reads(&driver);
    Some(driver)
}

/// Turns the page-cache fast path of buffered reads off for `driver`.
fn without_cached_reads(driver: &FileDriver) {
    driver
        .host
        .nowait_reads
        .store(false, std::sync::atomic::Ordering::Relaxed);
}

fn forgotten_reads_never_touch_the_callers_buffer(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 8 << 20, 0xAB);
    let Some(driver) = open(&path, direct) else {
        return;
    };
    on_io_thread(move || {
        Box::pin(async move {
            let mut lent = Vec::new();
            // More than the pool: leaked slots must not hold anyone up.
            for i in 0..(POOL_SLOTS as u64 + 40) {
                let len = if i % 3 == 0 { 256 << 10 } else { 4096 };
                let mut buf = vec![0u8; len];
                let mut fut = Box::pin(driver.do_read(i * 4096 * 7 % (7 << 20), &mut buf));
                assert!(
                    poll_once(fut.as_mut()).is_pending(),
                    "queued, not yet submitted"
                );
                // Safe code may do this: the borrow of `buf` ends here
                // while the read is queued.
                std::mem::forget(fut);
                buf.fill(0xEE);
                lent.push(buf);
            }
            let ring = uring::current().unwrap();
            assert!(ring.stats().1 > 0, "the reads went to the ring");
            ring_idle().await;
            for buf in &lent {
                assert!(
                    buf.iter().all(|&b| b == 0xEE),
                    "the kernel wrote a buffer whose loan had ended"
                );
            }
            // The ring still works (leaked slots are simply gone).
            let mut buf = vec![0u8; 4096];
            driver.do_read(4096, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0xAB));
        })
    });
}

#[test]
fn forgotten_reads_never_touch_the_callers_buffer_buffered() {
    forgotten_reads_never_touch_the_callers_buffer(false);
}

#[test]
fn forgotten_reads_never_touch_the_callers_buffer_direct() {
    forgotten_reads_never_touch_the_callers_buffer(true);
}

fn dropped_requests_return_their_slots(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 << 20, 0x22);
    let Some(driver) = open(&path, direct) else {
        return;
    };
    let path2 = path.clone();
    on_io_thread(move || {
        Box::pin(async move {
            as_if_another_write_were_in_flight(&driver);
            for round in 0..3u64 {
                for i in 0..(POOL_SLOTS as u64 * 2) {
                    let offset = (i * 4096 + round * (1 << 20)) % (4 << 20);
                    let mut data = vec![0x33u8; 4096];
                    let mut fut = Box::pin(driver.do_write(offset, &data));
                    assert!(poll_once(fut.as_mut()).is_pending());
                    drop(fut);
                    assert!(uring::current().unwrap().stats().1 > 0);
                    // The write was copied when it was queued: changing
                    // the caller's buffer now must not reach the file.
                    data.fill(0x11);
                    let mut buf = vec![0u8; 8192];
                    let mut fut = Box::pin(driver.do_read(offset, &mut buf));
                    assert!(poll_once(fut.as_mut()).is_pending());
                    drop(fut);
                    buf.fill(0x44);
                    assert!(buf.iter().all(|&b| b == 0x44));
                }
                ring_idle().await;
                let ring = uring::current().unwrap();
                assert_eq!(
                    ring.stats(),
                    (POOL_SLOTS, 0),
                    "every orphaned slot came back"
                );
            }
            driver.do_flush().await.unwrap();
        })
    });
    let on_disk = std::fs::read(&path2).unwrap();
    assert!(
        on_disk.iter().all(|&b| b == 0x22 || b == 0x33),
        "only the old bytes or the bytes lent at the time reach the file"
    );
}

#[test]
fn dropped_requests_return_their_slots_buffered() {
    dropped_requests_return_their_slots(false);
}

#[test]
fn dropped_requests_return_their_slots_direct() {
    dropped_requests_return_their_slots(true);
}

#[test]
fn a_ring_dropped_with_operations_in_flight_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 16 << 20, 0x5A);
    let Some(driver) = open(&path, true).or_else(|| open(&path, false)) else {
        return;
    };
    let driver = std::sync::Arc::new(driver);
    let d = driver.clone();
    // The runtime (and the reaper with it) goes away while the reads are
    // queued and in flight; the ring itself goes at thread exit, and its
    // `Drop` waits for the kernel before freeing the buffers.
    on_io_thread(move || {
        Box::pin(async move {
            let mut buf = vec![0u8; 1 << 20];
            for i in 0..16u64 {
                let mut fut = Box::pin(d.do_read(i << 20, &mut buf));
                assert!(poll_once(fut.as_mut()).is_pending());
                drop(fut);
            }
            // Let the reaper submit them, then leave with them in flight.
            tokio::task::yield_now().await;
            let ring = uring::current().unwrap();
            assert!(ring.stats().1 > 0 || ring.stats().0 == POOL_SLOTS);
        })
    });
    // The driver still works from another I/O thread.
    let d = driver.clone();
    on_io_thread(move || {
        Box::pin(async move {
            let mut buf = vec![0u8; 4096];
            d.do_read(0, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0x5A));
        })
    });
}

#[test]
fn requests_off_io_threads_use_the_thread_pool() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20, 0x77);
    let Some(driver) = open(&path, false) else {
        return;
    };
    // A plain runtime on a plain thread: no ring is made there.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert!(uring::current().is_none());
        let mut buf = vec![0u8; 4096];
        driver.do_read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0x77));
        driver.do_write(0, &[1; 4096]).await.unwrap();
        driver.do_flush().await.unwrap();
    });
    assert_eq!(&std::fs::read(&path).unwrap()[..4096], &[1; 4096]);
}

/// Requests larger than a pool slot reuse the buffers earlier ones left
/// (no allocation and page faults per request), and what free slots keep
/// stays bounded however many large requests were in flight at once.
#[test]
fn large_requests_reuse_kept_buffers_within_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 64 << 20, 0x5a);
    let Some(driver) = open(&path, false) else {
        return;
    };
    on_io_thread(move || {
        Box::pin(async move {
            let ring = uring::current().unwrap();
            let mut buf = vec![0u8; 256 << 10];
            for i in 0..32u64 {
                driver.do_read(i * (256 << 10), &mut buf).await.unwrap();
                assert!(buf.iter().all(|&b| b == 0x5a));
                assert_eq!(
                    ring.own_slots(),
                    (1, 256 << 10),
                    "one buffer, kept and reused"
                );
            }
            // 64 large reads at once: 64 buffers in flight, at most
            // RETAIN_BYTES of them kept afterwards.
            let mut bufs = vec![vec![0u8; 1 << 20]; 64];
            let reads = bufs
                .iter_mut()
                .enumerate()
                .map(|(i, b)| driver.do_read(i as u64 * (1 << 20), b));
            for r in futures::future::join_all(reads).await {
                r.unwrap();
            }
            assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0x5a)));
            let (slots, kept) = ring.own_slots();
            assert!(slots >= 2, "the reads were in flight together");
            assert!(kept <= RETAIN_BYTES, "{kept} bytes kept");
            // And a later large read still fits in a kept buffer.
            driver.do_read(0, &mut bufs[0]).await.unwrap();
            assert_eq!(ring.own_slots().0, slots, "no new slot");
        })
    });
}

/// A file whose 4 KiB block `i` is filled with byte `i % 251 + 1`.
fn striped(dir: &std::path::Path, blocks: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..blocks)
        .flat_map(|i| std::iter::repeat_n((i % 251 + 1) as u8, 4096))
        .collect();
    let path = dir.join("striped");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Drops `[offset, offset + len)` of `path` from the page cache (written
/// back first, so the kernel may drop it). False where the kernel kept
/// pages anyway (the test then has nothing to check).
fn evict(path: &std::path::Path, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: the descriptor belongs to `file`, open for the call; the call
    // takes only integers.
    let r = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0, "posix_fadvise");
    // Whether the first byte is gone: mincore needs a mapping, so ask the
    // kernel the way the driver does.
    let mut probe = [0u8; 1];
    let mut slices = [std::io::IoSliceMut::new(&mut probe)];
    matches!(
        rustix::io::preadv2(
            &file,
            &mut slices,
            offset,
            rustix::io::ReadWriteFlags::NOWAIT
        ),
        Err(rustix::io::Errno::AGAIN)
    )
}

fn open_buffered(path: &std::path::Path, aio: Aio) -> FileDriver {
    FileDriver::open(
        path,
        FileOptions {
            aio: Some(aio),
            ..FileOptions::default()
        },
    )
    .unwrap()
}

/// A buffered read of cached data completes in its first poll, straight
/// into the caller's buffer (nothing reaches the ring), on both `aio`
/// modes and off I/O threads too; past the end of the file it reads
/// zeroes.
#[test]
fn cached_buffered_reads_complete_at_once_in_the_callers_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = striped(dir.path(), 128);
    for aio in [Aio::Threads, Aio::IoUring] {
        if aio == Aio::IoUring && !Aio::io_uring_available() {
            continue;
        }
        let driver = open_buffered(&path, aio);
        let expect = data.clone();
        on_io_thread(move || {
            Box::pin(async move {
                for (offset, len) in [(0u64, 4096usize), (4000, 9000), (65536, 200 << 10)] {
                    let mut buf = vec![0u8; len];
                    let mut fut = Box::pin(driver.do_read(offset, &mut buf));
                    assert!(
                        poll_once(fut.as_mut()).is_ready(),
                        "a cached read is done in its first poll ({aio:?})"
                    );
                    drop(fut);
                    assert!(buf[..] == expect[offset as usize..offset as usize + len]);
                }
                if let Some(ring) = uring::current() {
                    assert_eq!(ring.own_slots().0, 0, "nothing went to the ring");
                }
                // Across the end: the rest reads as zeroes.
                let end = expect.len() as u64;
                let mut buf = vec![0xffu8; 8192];
                driver.do_read(end - 4096, &mut buf).await.unwrap();
                assert!(buf[..4096] == expect[expect.len() - 4096..]);
                assert!(buf[4096..].iter().all(|&b| b == 0), "zeroes past the end");
                // Vectored, in uneven segments.
                let mut parts = [vec![0u8; 100], vec![0u8; 5000], vec![0u8; 3092]];
                let mut slices: Vec<_> = parts
                    .iter_mut()
                    .map(|p| std::io::IoSliceMut::new(p))
                    .collect();
                driver
                    .do_readv(8192, crate::types::IoVecMut::new(&mut slices))
                    .await
                    .unwrap();
                assert!(parts.concat()[..] == expect[8192..8192 + 8192]);
            })
        });
    }
}

/// A buffered read whose data is partly out of the page cache takes what
/// is cached straight away and the rest through the regular path, each
/// byte landing where it belongs (contiguous and vectored).
#[test]
fn partly_cached_buffered_reads_finish_on_the_regular_path() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = striped(dir.path(), 256);
    for aio in [Aio::Threads, Aio::IoUring] {
        if aio == Aio::IoUring && !Aio::io_uring_available() {
            continue;
        }
        // Blocks 64.. leave the cache; reads start in cached blocks.
        if !evict(&path, 64 * 4096, 192 * 4096) {
            eprintln!("the kernel kept the pages; nothing to check");
            return;
        }
        let driver = open_buffered(&path, aio);
        let expect = data.clone();
        let p = path.clone();
        on_io_thread(move || {
            Box::pin(async move {
                let mut buf = vec![0u8; 64 << 10];
                let offset = 48 * 4096 + 123;
                driver.do_read(offset, &mut buf).await.unwrap();
                assert!(buf[..] == expect[offset as usize..offset as usize + buf.len()]);
                assert!(evict(&p, 64 * 4096, 192 * 4096));
                let mut parts: Vec<Vec<u8>> = (0..40).map(|i| vec![0u8; 1000 + i * 37]).collect();
                let total: usize = parts.iter().map(Vec::len).sum();
                let mut slices: Vec<_> = parts
                    .iter_mut()
                    .map(|p| std::io::IoSliceMut::new(p))
                    .collect();
                let offset = 60 * 4096 + 7;
                driver
                    .do_readv(offset, crate::types::IoVecMut::new(&mut slices))
                    .await
                    .unwrap();
                assert!(parts.concat()[..] == expect[offset as usize..offset as usize + total]);
            })
        });
    }
}

/// Requests on buffers they own ([`IoBuf`](crate::IoBuf)) go to the kernel
/// as they are: the ring's pool slots stay free while they are in flight,
/// and a request dropped after its first poll leaves the buffer to the
/// operation (the kernel writes the whole buffer or nothing of it; the
/// reaper frees it). The ring is left with every slot back.
fn owned_buffers_go_to_the_kernel_as_they_are(direct: bool) {
    use crate::IoBuf;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 << 20, 0x22);
    let Some(driver) = open(&path, direct) else {
        return;
    };
    let path2 = path.clone();
    on_io_thread(move || {
        Box::pin(async move {
            let ring = uring::current().unwrap();
            as_if_another_write_were_in_flight(&driver);
            // Completed: written and read back through the ring, in the
            // buffer that was moved in.
            let mut buf = IoBuf::zeroed(64 << 10);
            buf.fill(0x33);
            let addr = buf.as_non_null();
            let mut fut = Box::pin(driver.do_write_buf(1 << 20, buf));
            assert!(poll_once(fut.as_mut()).is_pending());
            assert_eq!(
                ring.stats().0,
                POOL_SLOTS,
                "no pool slot (no copy) for an owned write"
            );
            assert!(ring.stats().1 > 0, "the write went to the ring");
            let back = fut.await.unwrap();
            assert_eq!(back.as_non_null(), addr, "the same buffer came back");
            let mut fut = Box::pin(driver.do_read_buf(1 << 20, IoBuf::zeroed(128 << 10)));
            assert!(poll_once(fut.as_mut()).is_pending());
            assert_eq!(ring.stats().0, POOL_SLOTS, "no pool slot for an owned read");
            let read = fut.await.unwrap();
            assert!(read[..64 << 10].iter().all(|&b| b == 0x33));
            assert!(read[64 << 10..].iter().all(|&b| b == 0x22));

            // Dropped after the first poll, with the operation queued or
            // in the kernel: more requests than the pool has slots.
            for round in 0..3u64 {
                for i in 0..(POOL_SLOTS as u64 * 2) {
                    let offset = (i * 8192 + round * (1 << 20)) % (4 << 20);
                    let mut data = IoBuf::zeroed(8192);
                    data.fill(0x44);
                    let mut fut = Box::pin(driver.do_write_buf(offset, data));
                    assert!(poll_once(fut.as_mut()).is_pending());
                    drop(fut);
                    let mut fut = Box::pin(driver.do_read_buf(offset, IoBuf::zeroed(4096)));
                    assert!(poll_once(fut.as_mut()).is_pending());
                    if i % 2 == 0 {
                        drop(fut);
                    } else {
                        // Leaked: its buffer stays with the operation.
                        std::mem::forget(fut);
                    }
                }
                ring_idle().await;
                assert_eq!(ring.stats(), (POOL_SLOTS, 0), "the pool was not used");
            }
            // The ring still works.
            let back = driver.do_read_buf(0, IoBuf::zeroed(4096)).await.unwrap();
            assert!(back.iter().all(|&b| b == 0x22 || b == 0x44));
            driver.do_flush().await.unwrap();
        })
    });
    let on_disk = std::fs::read(&path2).unwrap();
    for block in on_disk.chunks(8192) {
        assert!(
            block.iter().all(|&b| b == block[0]) && [0x22, 0x33, 0x44].contains(&block[0]),
            "a dropped owned write lands whole or not at all"
        );
    }
}

#[test]
fn owned_buffers_go_to_the_kernel_as_they_are_buffered() {
    owned_buffers_go_to_the_kernel_as_they_are(false);
}

#[test]
fn owned_buffers_go_to_the_kernel_as_they_are_direct() {
    owned_buffers_go_to_the_kernel_as_they_are(true);
}

/// An owned request that needs an alignment fix-up (an `O_DIRECT` file,
/// an unaligned range) takes the copying path and still reads and writes
/// the right bytes; a buffered read past the end reads zeroes.
#[test]
fn owned_buffers_fall_back_where_the_range_needs_fixing_up() {
    use crate::IoBuf;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 64 << 10, 0x10);
    let Some(direct) = open(&path, true) else {
        return;
    };
    on_io_thread(move || {
        Box::pin(async move {
            let mut data = IoBuf::zeroed(1000);
            data.fill(0x77);
            direct.do_write_buf(4096 + 100, data).await.unwrap();
            let got = direct.do_read_buf(4096, IoBuf::zeroed(4096)).await.unwrap();
            assert!(got[..100].iter().all(|&b| b == 0x10));
            assert!(got[100..1100].iter().all(|&b| b == 0x77));
            assert!(got[1100..].iter().all(|&b| b == 0x10));
            let odd = direct
                .do_read_buf(4096 + 99, IoBuf::zeroed(3))
                .await
                .unwrap();
            assert_eq!(&*odd, &[0x10, 0x77, 0x77]);
        })
    });
    let buffered = open(&path, false).unwrap();
    on_io_thread(move || {
        Box::pin(async move {
            let mut tail = IoBuf::zeroed(8192);
            tail.fill(0xAA);
            let tail = buffered.do_read_buf((64 << 10) - 4096, tail).await.unwrap();
            assert!(tail[..4096].iter().all(|&b| b == 0x10));
            assert!(tail[4096..].iter().all(|&b| b == 0), "past the end: zeroes");
        })
    });
}

/// A buffered file of `blocks` blocks of `block` bytes of 0x11 and the
/// driver on it (`None` where io_uring is unavailable), with the directory
/// that holds it.
fn buffered_image(
    blocks: usize,
    block: usize,
) -> Option<(tempfile::TempDir, std::path::PathBuf, FileDriver)> {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), blocks * block, 0x11);
    let driver = open(&path, false)?;
    Some((dir, path, driver))
}

/// The ring is set up with `IORING_SETUP_COOP_TASKRUN` where the kernel has
/// it: the kernel then posts completions when the I/O thread next enters
/// it instead of interrupting it. Requests must still complete while
/// another task on the same thread never lets it sleep (it yields in a
/// loop: the executor polls its reactor, a system call, in between), and
/// what they wrote must be on disk.
#[test]
fn completions_arrive_while_the_io_thread_never_sleeps() {
    use crate::IoBuf;
    use std::cell::Cell;
    const BLOCK: usize = 64 << 10;
    let Some((_dir, path, driver)) = buffered_image(32, BLOCK) else {
        return;
    };
    let path2 = path.clone();
    let (spins, coop) = on_io_thread(move || {
        Box::pin(async move {
            let done = Cell::new(false);
            let spins = Cell::new(0u64);
            let writes = async {
                let writes = (0..32u8).map(|i| {
                    let mut buf = IoBuf::zeroed(BLOCK);
                    buf.fill(0x40 + i);
                    driver.do_write_buf(u64::from(i) * BLOCK as u64, buf)
                });
                let results = futures::future::join_all(writes).await;
                done.set(true);
                results
            };
            // The spinner is polled first and yields before it looks at
            // `done`, so it is running before any write is issued. Buffered
            // writes may still complete inline, at submission; then there
            // is nothing to wait for, which is allowed.
            let spinner = async {
                loop {
                    spins.set(spins.get() + 1);
                    tokio::task::yield_now().await;
                    if done.get() {
                        break;
                    }
                }
            };
            let ((), results) = futures::future::join(spinner, writes).await;
            for r in results {
                r.unwrap();
            }
            driver.do_flush().await.unwrap();
            let coop = uring::current().unwrap().coop_taskrun();
            (spins.get(), coop)
        })
    });
    eprintln!("ring with COOP_TASKRUN: {coop}; spinner yielded {spins} times");
    let on_disk = std::fs::read(&path2).unwrap();
    for (i, block) in on_disk.chunks(BLOCK).enumerate() {
        assert!(
            block.iter().all(|&b| b == 0x40 + i as u8),
            "block {i} holds what was written"
        );
    }
}

/// Buffered writes are gathered (DESIGN §19, "Gathered writes"): a write
/// that continues a sequential stream waits in the ring while
/// `GATHER_IN_KERNEL` SQEs of its file are in the kernel, and writes that
/// follow each other in the file share one `writev`. Checked: writes that
/// cannot be joined (every other block) complete; a long stream is joined,
/// and its waiting writes complete even when the last SQEs in the kernel
/// complete together; every byte lands where it was written.
#[test]
fn gathered_writes_wait_their_turn_and_join_their_neighbours() {
    use crate::IoBuf;
    const BLOCK: usize = 16 << 10;
    let Some((_dir, path, driver)) = buffered_image(256, BLOCK) else {
        return;
    };
    let path2 = path.clone();
    let joined = on_io_thread(move || {
        Box::pin(async move {
            let ring = uring::current().unwrap();
            let driver = &driver;
            for round in 0..4u8 {
                // Every other block: nothing to join, so most wait.
                let scattered = (0..48u64).map(|i| {
                    let mut buf = IoBuf::zeroed(BLOCK);
                    buf.fill(0x20 + round);
                    driver.do_write_buf(2 * i * BLOCK as u64, buf)
                });
                for r in futures::future::join_all(scattered).await {
                    r.unwrap();
                }
                // The blocks in between, in order: joined.
                let adjacent = (0..48u64).map(|i| {
                    let mut buf = IoBuf::zeroed(BLOCK);
                    buf.fill(0x40 + round);
                    driver.do_write_buf((2 * i + 1) * BLOCK as u64, buf)
                });
                // A sequential stream of 256 small writes: joined in runs
                // of at most GATHER_MAX_OPS, more runs than may be in the
                // kernel at once, so some wait for others to complete.
                let adjacent2 = (0..256u64).map(|i| {
                    let data = vec![0x60 + round; 4096];
                    async move { driver.do_write(128 * BLOCK as u64 + i * 4096, &data).await }
                });
                for r in futures::future::join_all(adjacent).await {
                    r.unwrap();
                }
                for r in futures::future::join_all(adjacent2).await {
                    r.unwrap();
                }
            }
            ring_idle().await;
            assert_eq!(ring.stats(), (POOL_SLOTS, 0), "every slot is back");
            driver.do_flush().await.unwrap();
            ring.joined()
        })
    });
    let (sqes, writes) = joined;
    eprintln!("joined SQEs: {sqes}, carrying {writes} writes");
    assert!(sqes > 0, "adjacent writes were joined");
    assert!(
        writes >= 2 * sqes,
        "each joined SQE carries two writes or more"
    );
    let on_disk = std::fs::read(&path2).unwrap();
    for (i, block) in on_disk.chunks(BLOCK).enumerate() {
        let want = if (128..192).contains(&i) {
            0x63
        } else if i % 2 == 0 && i < 96 {
            0x23
        } else if i < 96 {
            0x43
        } else {
            0x11
        };
        assert!(
            block.iter().all(|&b| b == want),
            "block {i}: {:#x}, not {want:#x}",
            block[0]
        );
    }
}

/// Gathered writes dropped (or, on moved-in buffers, leaked) while they
/// wait in the ring, or ride on another write's SQE, keep their memory
/// until the kernel is done and give every pool slot back; each lands
/// whole or not at all.
#[test]
fn gathered_writes_dropped_while_waiting_give_their_slots_back() {
    use crate::IoBuf;
    const BLOCK: usize = 8192;
    let Some((_dir, path, driver)) = buffered_image(512, BLOCK) else {
        return;
    };
    let path2 = path.clone();
    on_io_thread(move || {
        Box::pin(async move {
            let ring = uring::current().unwrap();
            as_if_another_write_were_in_flight(&driver);
            let driver = &driver;
            for round in 0..3u64 {
                for i in 0..(POOL_SLOTS as u64 * 2) {
                    // Runs of four adjacent blocks, then a gap.
                    let block = round * 160 + i / 4 * 5 + i % 4;
                    let offset = block * BLOCK as u64;
                    let mut fut: Pin<Box<dyn Future<Output = crate::Result<()>> + '_>> = if i % 3
                        == 0
                    {
                        let mut buf = IoBuf::zeroed(BLOCK);
                        buf.fill(0x44);
                        Box::pin(async move { driver.do_write_buf(offset, buf).await.map(drop) })
                    } else {
                        let data = vec![0x44; BLOCK];
                        Box::pin(async move { driver.do_write(offset, &data).await })
                    };
                    assert!(poll_once(fut.as_mut()).is_pending());
                    if i % 3 == 0 && i % 2 == 0 {
                        // Leaked: its moved-in buffer stays with the
                        // operation (a leaked lent write would keep its
                        // pool slot, as any leaked request does).
                        std::mem::forget(fut);
                    } else {
                        drop(fut);
                    }
                }
                ring_idle().await;
                assert_eq!(ring.stats(), (POOL_SLOTS, 0), "every slot is back");
            }
            driver.do_flush().await.unwrap();
        })
    });
    let on_disk = std::fs::read(&path2).unwrap();
    for block in on_disk.chunks(BLOCK) {
        assert!(
            block.iter().all(|&b| b == block[0]) && [0x11, 0x44].contains(&block[0]),
            "a dropped write lands whole or not at all"
        );
    }
}

/// Runs `f`'s future on an I/O thread (`on_io_thread`) with an `O_DIRECT`
/// driver on a 1 MiB file of `0xC3` bytes and a `LocalSet` registered as
/// the thread's, as an `IoThread` registers the set that runs its tasks.
/// Skips where io_uring is not available.
fn with_a_registered_set(
    f: impl FnOnce(FileDriver, Rc<tokio::task::LocalSet>) -> LocalFuture<()> + Send + 'static,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20, 0xC3);
    let Some(driver) = open(&path, true) else {
        return;
    };
    on_io_thread(move || {
        let ours = Rc::new(tokio::task::LocalSet::new());
        set_local_set(Rc::downgrade(&ours));
        f(driver, ours)
    });
}

/// Awaits `read` under a watchdog that says what waited (`what`).
///
/// The watchdog is polled first: a read whose wake-up was lost, although
/// its operation completed, fails here when the watchdog's timer wakes the
/// task, rather than finish late (as under `tokio::time::timeout`, which
/// polls the read first).
async fn finishes(read: impl Future<Output = crate::types::Result<()>>, what: &str) {
    let mut read = std::pin::pin!(read);
    let mut watchdog = std::pin::pin!(tokio::time::sleep(Duration::from_secs(30)));
    std::future::poll_fn(|cx| {
        if watchdog.as_mut().poll(cx).is_ready() {
            panic!("watchdog: {what}");
        }
        read.as_mut().poll(cx)
    })
    .await
    .unwrap();
}

/// A request polled first inside a `LocalSet` of the request's own, which
/// is then dropped (`keep == false`) or kept and never driven again: its
/// reaper runs on the thread's registered set all the same.
fn a_request_polled_in_a_set_of_its_own_is_reaped_on_the_threads_set(keep: bool) {
    with_a_registered_set(move |driver, ours| {
        Box::pin(async move {
            ours.run_until(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut read = Box::pin(driver.do_read(4096, &mut buf));
                let mut theirs = Some(tokio::task::LocalSet::new());
                if let Some(set) = &theirs {
                    set.run_until(async { assert!(poll_once(read.as_mut()).is_pending()) })
                        .await;
                }
                if !keep {
                    theirs = None;
                }
                finishes(read, "the read's reaper never ran").await;
                assert!(buf.iter().all(|&b| b == 0xC3));
                drop(theirs);
                ring_idle().await;
            })
            .await;
        })
    });
}

#[test]
fn a_request_polled_in_a_dropped_set_of_its_own_completes() {
    a_request_polled_in_a_set_of_its_own_is_reaped_on_the_threads_set(false);
}

#[test]
fn a_request_polled_in_an_undriven_set_of_its_own_completes() {
    a_request_polled_in_a_set_of_its_own_is_reaped_on_the_threads_set(true);
}

/// The thread's registered set dropped with the reaper in it, before the
/// reaper ran (`submitted == false`) or after it submitted: the reaper's
/// successor on the runtime finishes the request (`Reaper`'s `Drop`), and
/// the next request gets a reaper again.
fn a_reaper_dropped_with_the_threads_set_hands_its_work_on(submitted: bool) {
    with_a_registered_set(move |driver, ours| {
        Box::pin(async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut read = Box::pin(driver.do_read(4096, &mut buf));
            ours.run_until(async {
                assert!(poll_once(read.as_mut()).is_pending());
                if submitted {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            drop(ours);
            finishes(read, "the read waited for a reaper that was dropped").await;
            assert!(buf.iter().all(|&b| b == 0xC3));
            let mut again = vec![0u8; 4096];
            finishes(
                driver.do_read(0, &mut again),
                "the next read found no reaper",
            )
            .await;
            assert!(again.iter().all(|&b| b == 0xC3));
            ring_idle().await;
        })
    });
}

#[test]
fn a_reaper_dropped_before_it_submitted_hands_its_work_on() {
    a_reaper_dropped_with_the_threads_set_hands_its_work_on(false);
}

#[test]
fn a_reaper_dropped_after_it_submitted_hands_its_work_on() {
    a_reaper_dropped_with_the_threads_set_hands_its_work_on(true);
}

/// On the thread's registered set the reaper stays after its last request
/// (it is not spawned again for every request at depth 1), and ends when
/// the set is told to stop, so that the set can finish.
#[test]
fn an_idle_reaper_on_the_threads_set_lingers_until_the_set_stops() {
    with_a_registered_set(|driver, ours| {
        Box::pin(async move {
            ours.run_until(async {
                for i in 0..3u64 {
                    let mut buf = vec![0u8; 4096];
                    driver.do_read(i * 4096, &mut buf).await.unwrap();
                    assert!(buf.iter().all(|&b| b == 0xC3));
                }
            })
            .await;
            let ours = Rc::into_inner(ours).expect("the test holds the only reference");
            let mut ours = std::pin::pin!(ours);
            // The idle reaper is still a task of the set: it does not finish.
            assert!(
                tokio::time::timeout(Duration::from_millis(100), ours.as_mut())
                    .await
                    .is_err(),
                "the reaper ended when idle instead of waiting for the next request"
            );
            crate::thread::stop_local_set();
            tokio::time::timeout(Duration::from_secs(30), ours)
                .await
                .expect("watchdog: the idle reaper did not end when the set stopped");
        })
    });
}

/// Reads reaped in one pass, the first ones polled by a task whose waker
/// panics: the reaper wakes the read after them all the same, and it goes
/// on reaping for the next request (`sync::wake`).
#[test]
fn a_panicking_waker_costs_no_other_request_its_wake_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20, 0x5A);
    // Buffered reads of cached pages complete while they are submitted,
    // so the reaper reaps them together, in the order they were queued.
    let Some(driver) = open(&path, false) else {
        return;
    };
    on_io_thread(move || {
        Box::pin(async move {
            let panicking = crate::sync::wake::panicking_waker();
            let mut bufs = vec![vec![0u8; 4096]; 4];
            let mut reads: Vec<_> = bufs
                .iter_mut()
                .enumerate()
                .map(|(i, buf)| Box::pin(driver.do_read(i as u64 * 4096, buf)))
                .collect();
            for read in &mut reads {
                let polled = read.as_mut().poll(&mut Context::from_waker(&panicking));
                assert!(polled.is_pending());
            }
            let mut last = vec![0u8; 4096];
            finishes(
                driver.do_read(8 * 4096, &mut last),
                "the read reaped after the panicking wakers was never woken",
            )
            .await;
            assert!(last.iter().all(|&b| b == 0x5A));
            for read in reads {
                finishes(read, "a read whose waker panicked").await;
            }
            let mut next = vec![0u8; 4096];
            finishes(
                driver.do_read(0, &mut next),
                "the next read found no reaper",
            )
            .await;
            ring_idle().await;
            drop(bufs);
        })
    });
}
