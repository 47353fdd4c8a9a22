//! Misuses of the run-time API that no type can reject (BRIEF §3 rules 17
//! and 21): each fails fast with a message naming the rule, or is made
//! harmless, and never hangs. Every test runs under a watchdog, checks the
//! message, and checks that the graph still serves a normal request and
//! admits a write section afterwards.

mod common;

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use blockgraph::drivers::MemoryDriver;
use blockgraph::{BackendOptions, BlockBackend, Error, IoTask, MainLoop, NodeHandle};
use common::{join, recv, wait_until, watchdog};

const SIZE: u64 = 1 << 20;
const BUDGET: Duration = Duration::from_secs(60);

fn setup() -> (MainLoop, NodeHandle) {
    let main = MainLoop::new().unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(SIZE), &[])))
        .unwrap();
    (main, disk)
}

fn setup_backend() -> (MainLoop, NodeHandle, BlockBackend) {
    let (main, disk) = setup();
    let d = disk.clone();
    let blk = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &d, BackendOptions::default())))
        .unwrap();
    (main, disk, blk)
}

/// The text of a panic payload.
fn message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "<non-string panic payload>".to_owned()
    }
}

/// Runs `f`, which must panic, and returns the panic's message.
fn panic_of<R>(f: impl FnOnce() -> R) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(payload) => message(payload),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for part in parts {
        assert!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
}

/// The graph still works: no reader is left inside, a write section gets
/// in, and a normal request on a fresh I/O thread succeeds.
fn assert_usable(main: &MainLoop, disk: &NodeHandle) {
    wait_until("every reader has left", || main.readers_inside() == 0);
    main.run(|bql| bql.write(|_| ()));
    let io = main.new_io_thread("check").unwrap();
    let d = disk.clone();
    let len = join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            d.io(&guard).length().await
        }),
        "a normal request",
    )
    .unwrap();
    assert_eq!(len, SIZE);
}

/// A multi-thread runtime standing in for an embedder's.
fn embedder_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Class 4: an IoTask never leaves its task (rule 17)
// ---------------------------------------------------------------------------

const RULE_17: &str = "rule 17: an IoTask never leaves its task";

/// A task sends its `IoTask` to another task, which holds a guard of its own
/// and tries a second read lock through the smuggled handle: the nested read
/// that deadlocks behind a queued writer. It panics instead.
#[test]
fn read_through_an_iocx_from_another_task_panics() {
    let _wd = watchdog("read_through_smuggled_iocx", BUDGET);
    let (main, disk) = setup();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    let (tx, rx) = mpsc::channel::<IoTask>();
    join(
        io0.spawn(move |cx| async move { tx.send(cx).unwrap() }),
        "sender",
    );
    let smuggled = rx.recv().unwrap();
    let d = disk.clone();
    let thief = io1.spawn(move |mut cx| async move {
        let own = cx.read().await;
        let _ = d.io(&own).length().await;
        let mut smuggled = smuggled;
        let _second = smuggled.read().await; // panics
    });
    let msg = panic_of(|| join(thief, "the task with the smuggled IoTask"));
    assert_mentions(&msg, &[RULE_17, "outside the task it was made for"]);
    assert_usable(&main, &disk);
}

/// `try_read` through an `IoTask` sent to a plain thread panics too.
#[test]
fn try_read_on_a_plain_thread_panics() {
    let _wd = watchdog("try_read_plain_thread", BUDGET);
    let (main, disk) = setup();
    let io = main.new_io_thread("io0").unwrap();
    let cx = join(
        io.spawn(|cx| async move { cx }),
        "the task handing out its IoTask",
    );
    let msg = std::thread::spawn(move || {
        let mut cx = cx;
        panic_of(|| cx.try_read().is_some())
    })
    .join()
    .unwrap();
    assert_mentions(&msg, &[RULE_17]);
    assert_usable(&main, &disk);
}

/// An `IoTask` moved onto the main-loop thread cannot take the read lock
/// there (the main loop's own write section would wait for it).
#[test]
fn iocx_on_the_main_loop_thread_panics() {
    let _wd = watchdog("iocx_on_main_loop", BUDGET);
    let (main, disk) = setup();
    let io = main.new_io_thread("io0").unwrap();
    let cx = join(
        io.spawn(|cx| async move { cx }),
        "the task handing out its IoTask",
    );
    let msg = panic_of(|| {
        main.run(move |_bql| {
            let mut cx = cx;
            let _ = cx.try_read();
        })
    });
    assert_mentions(&msg, &[RULE_17, "main-loop thread"]);
    assert_usable(&main, &disk);
}

/// The future of `run_on_main_loop`, made in one task (with a leaked
/// `IoTask`) and awaited in another that holds a guard, would let that task
/// wait for main-loop work under the read lock. Polling it there panics.
#[test]
fn run_on_main_loop_awaited_in_another_task_panics() {
    let _wd = watchdog("run_on_main_loop_elsewhere", BUDGET);
    let (main, disk) = setup();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    type Call =
        std::pin::Pin<Box<dyn std::future::Future<Output = blockgraph::Result<u32>> + Send>>;
    let (tx, rx) = mpsc::channel::<Call>();
    join(
        io0.spawn(move |cx| async move {
            let cx: &'static mut IoTask = Box::leak(Box::new(cx));
            tx.send(Box::pin(cx.run_on_main_loop(|_bql| 7u32))).unwrap();
        }),
        "the task making the call",
    );
    let call = rx.recv().unwrap();
    let thief = io1.spawn(move |mut cx| async move {
        let _guard = cx.read().await;
        let _ = call.await; // panics
    });
    let msg = panic_of(|| join(thief, "the task awaiting another task's call"));
    assert_mentions(&msg, &[RULE_17]);
    assert_usable(&main, &disk);
}

/// `run_on_main_loop` called on a smuggled `IoTask` panics before it submits
/// anything.
#[test]
fn run_on_main_loop_through_another_tasks_iocx_panics() {
    let _wd = watchdog("run_on_main_loop_smuggled", BUDGET);
    let (main, disk) = setup();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    let smuggled = join(
        io0.spawn(|cx| async move { cx }),
        "the task handing out its IoTask",
    );
    let d = disk.clone();
    let thief = io1.spawn(move |mut cx| async move {
        let _guard = cx.read().await;
        let mut smuggled = smuggled;
        // Would drain `disk` while this task holds the read lock.
        let _ = smuggled
            .run_on_main_loop(move |bql| drop(bql.drain(&d)))
            .await;
    });
    let msg = panic_of(|| join(thief, "the task with the smuggled IoTask"));
    assert_mentions(&msg, &[RULE_17]);
    assert_usable(&main, &disk);
}

/// A task of an embedder's multi-thread runtime may hop between worker
/// threads while it holds a guard: the check follows the task, not the
/// thread, so nothing panics.
#[test]
fn a_migrating_task_keeps_its_iocx() {
    let _wd = watchdog("migrating_task", BUDGET);
    let (main, disk) = setup();
    let rt = embedder_runtime();
    let ctx = main.new_io_context("embedder");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let d = disk.clone();
            ctx.spawn_on(rt.handle(), move |mut cx| async move {
                let mut total = 0;
                for _ in 0..50 {
                    let guard = cx.read().await;
                    tokio::task::yield_now().await;
                    total += d.io(&guard).length().await.unwrap();
                    drop(guard);
                    tokio::task::yield_now().await;
                    let _ = cx.try_read();
                }
                total
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(rt.block_on(t).unwrap(), 50 * SIZE);
    }
    assert_usable(&main, &disk);
}

/// A task of `IoContext::task` awaited inline by a task that holds a guard
/// would take a nested read lock: polling it there panics.
#[test]
// Guards are counted per task only in debug builds and with
// `lock-diagnostics` (DESIGN §2.14, cost).
#[cfg_attr(
    not(any(debug_assertions, feature = "lock-diagnostics")),
    ignore = "needs per-task guard counts"
)]
fn task_polled_inside_a_guard_holding_task_panics() {
    let _wd = watchdog("nested_task_poll", BUDGET);
    let (main, disk) = setup();
    let io = main.new_io_thread("io0").unwrap();
    let ctx = io.context().clone();
    let outer = io.spawn(move |mut cx| async move {
        let _guard = cx.read().await;
        ctx.task(|mut inner| async move {
            let _nested = inner.read().await;
        })
        .await; // panics
    });
    let msg = panic_of(|| join(outer, "the task awaiting a task inline"));
    assert_mentions(&msg, &["rule 11", "holds a read guard"]);
    assert_usable(&main, &disk);
}

// ---------------------------------------------------------------------------
// Class 7.1: blocking main-loop calls from a thread that is not an I/O thread
// ---------------------------------------------------------------------------

/// `block_in_place` inside an embedder task that holds a guard, then
/// `MainLoop::run` with a write section: the section would wait for this
/// task's guard forever.
#[test]
fn main_loop_run_in_block_in_place_under_a_guard_panics() {
    let _wd = watchdog("run_block_in_place_guard", BUDGET);
    let (main, disk) = setup();
    let rt = embedder_runtime();
    let ctx = main.new_io_context("embedder");
    let m = main.clone();
    let task = ctx.spawn_on(rt.handle(), move |mut cx| async move {
        let _guard = cx.read().await;
        tokio::task::block_in_place(|| m.run(|bql| bql.write(|_| ())));
    });
    let msg = message(rt.block_on(task).unwrap_err().into_panic());
    assert_mentions(
        &msg,
        &[
            "MainLoop::run called while this task holds a read guard",
            "rules 9/10/11",
            "IoTask::run_on_main_loop",
        ],
    );
    assert_usable(&main, &disk);
}

/// Without a guard, `MainLoop::run` inside an I/O task still refuses: it
/// would block an executor thread whose other tasks may hold guards.
#[test]
fn main_loop_run_in_block_in_place_without_a_guard_panics() {
    let _wd = watchdog("run_block_in_place", BUDGET);
    let (main, disk) = setup();
    let rt = embedder_runtime();
    let ctx = main.new_io_context("embedder");
    let m = main.clone();
    let task = ctx.spawn_on(rt.handle(), move |_cx| async move {
        tokio::task::block_in_place(|| m.run(|_| ()));
    });
    let msg = message(rt.block_on(task).unwrap_err().into_panic());
    assert_mentions(
        &msg,
        &["MainLoop::run called inside an I/O task", "rules 9/10"],
    );
    assert_usable(&main, &disk);
}

/// `TaskHandle::join` from `block_in_place` while holding a guard: the
/// joined task may need the lock behind a queued writer.
#[test]
// Guards are counted per task only in debug builds and with
// `lock-diagnostics` (DESIGN §2.14, cost).
#[cfg_attr(
    not(any(debug_assertions, feature = "lock-diagnostics")),
    ignore = "needs per-task guard counts"
)]
fn join_in_block_in_place_under_a_guard_panics() {
    let _wd = watchdog("join_block_in_place_guard", BUDGET);
    let (main, disk) = setup();
    let rt = embedder_runtime();
    let ctx = main.new_io_context("embedder");
    let io = main.new_io_thread("io0").unwrap();
    let other = io.spawn(|_cx| async { 1 });
    let task = ctx.spawn_on(rt.handle(), move |mut cx| async move {
        let _guard = cx.read().await;
        tokio::task::block_in_place(|| other.join());
    });
    let msg = message(rt.block_on(task).unwrap_err().into_panic());
    assert_mentions(
        &msg,
        &["TaskHandle::join called while this task holds a read guard"],
    );
    assert_usable(&main, &disk);
}

/// `spawn_blocking` from an I/O thread's task that holds a guard, then
/// `MainLoop::run` on the blocking thread: refused, pointing at
/// `run_on_main_loop`.
#[test]
fn main_loop_run_from_spawn_blocking_of_an_io_task_panics() {
    let _wd = watchdog("run_spawn_blocking", BUDGET);
    let (main, disk) = setup();
    let io = main.new_io_thread("io0").unwrap();
    let m = main.clone();
    let msg = join(
        io.spawn(move |mut cx| async move {
            let _guard = cx.read().await;
            tokio::task::spawn_blocking(move || panic_of(|| m.run(|bql| bql.write(|_| ()))))
                .await
                .unwrap()
        }),
        "the task waiting for its blocking work",
    );
    assert_mentions(
        &msg,
        &["blocking pool", "rules 9/10", "IoTask::run_on_main_loop"],
    );
    assert_usable(&main, &disk);
}

// ---------------------------------------------------------------------------
// Class 7.2: removing an I/O thread inside a drain or write section
// ---------------------------------------------------------------------------

/// An I/O thread dropped inside a write section while one of its tasks is
/// queued for the read lock: dropping does not wait (the task needs the
/// section to end); the thread finishes the task and exits on its own.
#[test]
fn dropping_an_io_thread_inside_a_write_section_does_not_wait() {
    let _wd = watchdog("drop_io_thread_in_write", BUDGET);
    let (main, disk) = setup();
    let io = main.new_io_thread("doomed").unwrap();
    let d = disk.clone();
    let request = main.run(move |bql| {
        bql.write(move |_w| {
            let (started_tx, started_rx) = mpsc::channel();
            let request = io.spawn(move |mut cx| async move {
                started_tx.send(()).unwrap();
                let guard = cx.read().await; // queued: the writer is inside
                d.io(&guard).length().await
            });
            recv(&started_rx, "the request to start");
            std::thread::sleep(Duration::from_millis(20)); // let it queue
            drop(io); // would join the thread, which waits for this section
            request
        })
    });
    assert_eq!(
        join(request, "the detached thread's request").unwrap(),
        SIZE
    );
    assert_usable(&main, &disk);
}

/// The same inside a drain: the thread's request is queued at the drained
/// backend until the drain ends.
#[test]
fn dropping_an_io_thread_inside_a_drain_does_not_wait() {
    let _wd = watchdog("drop_io_thread_in_drain", BUDGET);
    let (main, disk, blk) = setup_backend();
    let io = main.new_io_thread("doomed").unwrap();
    let (d, b) = (disk.clone(), blk.clone());
    let request = main.run(move |bql| {
        let drained = bql.drain(&d);
        let before = b.queued_requests();
        let blk = b.clone();
        let request =
            io.spawn(move |mut cx| async move { blk.write(&mut cx, 0, &[7u8; 512]).await });
        wait_until("the request queues at the drained backend", || {
            b.queued_requests() > before
        });
        drop(io); // would join the thread, which waits for this drain
        drop(drained);
        request
    });
    join(request, "the detached thread's request").unwrap();
    assert_usable(&main, &disk);
}

// ---------------------------------------------------------------------------
// Class 7.3: MainLoop::shutdown from an I/O task that holds a guard
// ---------------------------------------------------------------------------

/// Shutdown from an I/O thread's task holding a guard: it starts the
/// shutdown and returns (the teardown waits for this guard); the task goes
/// on, and a later shutdown from a plain thread waits for the end.
#[test]
fn shutdown_from_an_io_task_holding_a_guard_does_not_wait() {
    let _wd = watchdog("shutdown_io_task_guard", BUDGET);
    let (main, disk) = setup();
    let io = main.new_io_thread("io0").unwrap();
    let (m, d) = (main.clone(), disk.clone());
    let len = join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            m.shutdown(); // returns at once
                          // The graph is still there: the teardown waits for this guard.
            d.io(&guard).length().await
        }),
        "the task that shut the main loop down",
    );
    assert_eq!(len.unwrap(), SIZE);
    main.shutdown(); // from a plain thread: waits for the main loop to end
    let msg = panic_of(|| main.run(|_| ()));
    assert_mentions(&msg, &["the main loop has shut down"]);
    // The I/O thread is still usable; its main-loop calls report the end.
    let outcome = join(
        io.spawn(|mut cx| async move { cx.run_on_main_loop(|_| ()).await }),
        "a main-loop call after shutdown",
    );
    assert!(matches!(outcome, Err(Error::ShutDown(_))), "{outcome:?}");
}

/// The same from `block_in_place` in an embedder task holding a guard.
#[test]
fn shutdown_in_block_in_place_under_a_guard_does_not_wait() {
    let _wd = watchdog("shutdown_block_in_place", BUDGET);
    let (main, disk) = setup();
    let rt = embedder_runtime();
    let ctx = main.new_io_context("embedder");
    let (m, d) = (main.clone(), disk.clone());
    let task = ctx.spawn_on(rt.handle(), move |mut cx| async move {
        let guard = cx.read().await;
        tokio::task::block_in_place(|| m.shutdown());
        d.io(&guard).length().await
    });
    assert_eq!(rt.block_on(task).unwrap().unwrap(), SIZE);
    main.shutdown();
    let msg = panic_of(|| main.run(|_| ()));
    assert_mentions(&msg, &["the main loop has shut down"]);
}
