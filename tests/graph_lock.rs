//! Behaviour of the graph read/write lock across I/O contexts: the writer
//! waits for readers in every context, readers that arrive while a writer
//! waits queue and all resume after it, removed contexts keep counting their
//! readers, and a guard may be released on another thread.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use blockgraph::MainLoop;
use common::{join, join_thread, poll_once, recv, settle, wait_until, watchdog, Flag};
use tokio::sync::oneshot;

#[test]
fn writer_waits_for_readers_in_every_context_and_queued_readers_resume() {
    let _wd = watchdog("writer_waits_for_readers", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    // A third context, driven by a plain thread as an embedder's own
    // runtime would.
    let embedder = main.new_io_context("embedder");

    // Readers bump this just before dropping their guard, so the writer can
    // check from inside its section that all of them had left.
    let released = Arc::new(AtomicUsize::new(0));
    let (held_tx, held_rx) = mpsc::channel::<&'static str>();
    let (gone_tx, gone_rx) = mpsc::channel::<&'static str>();

    let mut releases = Vec::new();
    let mut holders = Vec::new();
    for (io, name) in [(&io0, "io0"), (&io1, "io1")] {
        let (rel_tx, rel_rx) = oneshot::channel::<()>();
        releases.push(rel_tx);
        let (held_tx, gone_tx, released) = (held_tx.clone(), gone_tx.clone(), released.clone());
        holders.push(io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            held_tx.send(name).unwrap();
            rel_rx.await.unwrap();
            released.fetch_add(1, Ordering::SeqCst);
            drop(guard);
            gone_tx.send(name).unwrap();
        }));
    }
    // The embedder's context runs its reader on a multi-thread runtime.
    let rt = embedder_runtime();
    let (emb_rel_tx, emb_rel_rx) = oneshot::channel::<()>();
    let emb_reader = {
        let released = released.clone();
        embedder.spawn_on(rt.handle(), move |mut cx| async move {
            let guard = cx.read().await;
            held_tx.send("embedder").unwrap();
            emb_rel_rx.await.unwrap();
            released.fetch_add(1, Ordering::SeqCst);
            drop(guard);
            gone_tx.send("embedder").unwrap();
        })
    };
    for _ in 0..3 {
        recv(&held_rx, "a reader to take the read lock");
    }
    assert_eq!(main.readers_inside(), 3);

    // An async main-loop writer.
    let entered = Flag::default();
    let left = Flag::default();
    let writer = main.spawn({
        let (entered, left, released, m) = (
            entered.clone(),
            left.clone(),
            released.clone(),
            main.clone(),
        );
        move |mut cx| async move {
            cx.write(|_w| {
                entered.set();
                let seen = (released.load(Ordering::SeqCst), m.readers_inside());
                left.set();
                seen
            })
            .await
        }
    });
    wait_until("the writer announces itself", || main.writer_active());

    // Readers arriving now queue: `try_read` fails and `read()` stays
    // pending, on both I/O threads.
    let (queued_tx, queued_rx) = mpsc::channel::<(bool, bool)>();
    let mut queued = Vec::new();
    for io in [&io0, &io1, &io0, &io1] {
        let (queued_tx, left) = (queued_tx.clone(), left.clone());
        queued.push(io.spawn(move |mut cx| async move {
            let try_failed = cx.try_read().is_none();
            let mut fut = cx.read();
            let first = poll_once(&mut fut).await;
            let pending = first.is_pending();
            drop(first);
            queued_tx.send((try_failed, pending)).unwrap();
            if !pending {
                return false;
            }
            let guard = fut.await;
            // The writer's section must be over before a queued reader runs.
            let writer_done = left.get();
            drop(guard);
            writer_done
        }));
    }
    for _ in 0..queued.len() {
        let (try_failed, pending) = recv(&queued_rx, "a late reader to try the lock");
        assert!(try_failed, "try_read succeeded while a writer was waiting");
        assert!(pending, "read() completed while a writer was waiting");
    }
    assert!(
        !entered.get(),
        "the writer entered while 3 readers were inside"
    );

    // Release the readers one by one; the writer stays out until the last.
    for (i, rel) in releases.into_iter().enumerate() {
        rel.send(()).unwrap();
        let who = recv(&gone_rx, "a reader to release the lock");
        settle(&main);
        assert!(
            !entered.get(),
            "the writer entered after only '{who}' left ({} readers still inside)",
            main.readers_inside()
        );
        assert_eq!(main.readers_inside(), 2 - i);
        assert!(main.writer_active());
    }
    emb_rel_tx.send(()).unwrap();
    assert_eq!(recv(&gone_rx, "the embedder reader to release"), "embedder");
    join_tokio(&rt, emb_reader, "the embedder reader");

    let (released_at_entry, inside_at_entry) = join(writer, "the writer");
    assert_eq!(
        released_at_entry, 3,
        "the writer entered before every reader left"
    );
    assert_eq!(inside_at_entry, 0);

    for q in queued {
        assert!(
            join(q, "a queued reader to resume"),
            "a queued reader resumed before the writer left"
        );
    }
    for h in holders {
        join(h, "a reader task");
    }
    assert!(!main.writer_active());
    assert_eq!(main.readers_inside(), 0);
    drop((io0, io1));
    main.shutdown();
}

#[test]
fn writer_is_not_starved_by_a_constant_reader_stream() {
    let _wd = watchdog("writer_not_starved", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    let stop = Flag::default();
    let reads = Arc::new(AtomicU64::new(0));

    // Two readers per thread that overlap: one always holds the lock while
    // the other takes it, so the per-context count never drops to zero on
    // its own.
    let mut readers = Vec::new();
    for io in [&io0, &io1, &io0, &io1] {
        let (stop, reads) = (stop.clone(), reads.clone());
        readers.push(io.spawn(move |mut cx| async move {
            while !stop.get() {
                let guard = cx.read().await;
                tokio::task::yield_now().await;
                drop(guard);
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    wait_until("readers to get going", || {
        reads.load(Ordering::Relaxed) > 100
    });

    for _ in 0..50 {
        let w =
            main.spawn(move |mut cx| async move { cx.write(|w| w.graph().mutation_count()).await });
        join(w, "a writer under a constant reader stream");
        // Readers make progress between writers too.
        let before = reads.load(Ordering::Relaxed);
        wait_until("readers to resume after a writer", || {
            reads.load(Ordering::Relaxed) > before
        });
    }
    stop.set();
    for r in readers {
        join(r, "a reader loop");
    }
    assert_eq!(main.readers_inside(), 0);
    drop((io0, io1));
    main.shutdown();
}

#[test]
fn removed_embedder_context_keeps_counting_its_reader() {
    let _wd = watchdog("removed_embedder_context", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let rt = embedder_runtime();
    let contexts_before = main.lock_contexts();
    let ctx = main.new_io_context("doomed");
    assert_eq!(main.lock_contexts(), contexts_before + 1);

    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (rel_tx, rel_rx) = oneshot::channel::<()>();
    let reader = ctx.spawn_on(rt.handle(), move |mut cx| async move {
        let guard = cx.read().await;
        held_tx.send(()).unwrap();
        rel_rx.await.unwrap();
        drop(guard);
    });
    recv(&held_rx, "the reader to take the lock");
    // The context goes away while its reader is inside.
    drop(ctx);
    assert_eq!(
        main.lock_contexts(),
        contexts_before + 1,
        "a removed context with a reader inside must still count"
    );
    assert_eq!(main.readers_inside(), 1);

    let entered = Flag::default();
    let writer = main.spawn({
        let (entered, m) = (entered.clone(), main.clone());
        move |mut cx| async move {
            cx.write(|_| {
                entered.set();
                m.readers_inside()
            })
            .await
        }
    });
    wait_until("the writer announces itself", || main.writer_active());
    settle(&main);
    assert!(
        !entered.get(),
        "the writer ignored a reader of a removed context"
    );

    rel_tx.send(()).unwrap();
    join_tokio(&rt, reader, "the reader task");
    assert_eq!(join(writer, "the writer"), 0);
    assert_eq!(
        main.lock_contexts(),
        contexts_before,
        "the removed context was not pruned once its last reader left"
    );
    main.shutdown();
}

#[test]
fn io_thread_removed_with_a_reader_inside_keeps_the_writer_waiting() {
    let _wd = watchdog("io_thread_removed", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("doomed").unwrap();
    let contexts_before = main.lock_contexts();

    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (rel_tx, rel_rx) = oneshot::channel::<()>();
    let reader = io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        held_tx.send(()).unwrap();
        rel_rx.await.unwrap();
        drop(guard);
    });
    recv(&held_rx, "the reader to take the lock");

    // Remove the I/O thread: dropping it stops new tasks and waits for the
    // running ones, so do it on a helper thread.
    let dropper = thread::spawn(move || drop(io));

    let entered = Flag::default();
    let writer = main.spawn({
        let (entered, m) = (entered.clone(), main.clone());
        move |mut cx| async move {
            cx.write(|_| {
                entered.set();
                m.readers_inside()
            })
            .await
        }
    });
    wait_until("the writer announces itself", || main.writer_active());

    // A context added while the writer waits queues its readers too.
    let late = main.new_io_context("late");
    let rt = embedder_runtime();
    let late_try = late.spawn_on(rt.handle(), |mut cx| async move { cx.try_read().is_none() });
    assert!(
        join_tokio(&rt, late_try, "a reader on a new context"),
        "a new context bypassed the waiting writer"
    );

    settle(&main);
    assert!(
        !entered.get(),
        "the writer ignored a reader of a removed I/O thread"
    );
    assert_eq!(main.readers_inside(), 1);
    assert!(
        !dropper.is_finished(),
        "removing the thread abandoned its running task"
    );

    rel_tx.send(()).unwrap();
    join_thread(dropper, "the I/O thread to shut down");
    assert_eq!(join(writer, "the writer"), 0);
    join(reader, "the reader task");
    // The late context is still alive; the removed one is gone.
    assert_eq!(main.lock_contexts(), contexts_before);
    drop(late);
    assert_eq!(main.lock_contexts(), contexts_before - 1);
    main.shutdown();
}

#[test]
fn guards_released_on_other_threads_release_their_own_context() {
    let _wd = watchdog("guard_migrates", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let rt = embedder_runtime();
    let ctx_a = main.new_io_context("a");
    let ctx_b = main.new_io_context("b");

    // The guard is dropped on a thread that is not the one it was taken on.
    let counts = {
        let (a, b) = (ctx_a.clone(), ctx_b.clone());
        ctx_a.spawn_on(rt.handle(), move |mut cx| async move {
            let guard = cx.try_read().expect("no writer");
            let held = (a.readers(), b.readers());
            let here = thread::current().id();
            let there = thread::scope(|s| {
                s.spawn(move || {
                    drop(guard);
                    thread::current().id()
                })
                .join()
                .unwrap()
            });
            assert_ne!(here, there);
            (held, (a.readers(), b.readers()))
        })
    };
    let (held, after) = join_tokio(&rt, counts, "the migrating guard");
    assert_eq!(held, (1, 0));
    assert_eq!(after, (0, 0));

    // Many tasks that may migrate between worker threads while they hold
    // the lock (each yields under it) leave no count behind.
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            ctx_b.spawn_on(rt.handle(), |mut cx| async move {
                let guard = cx.read().await;
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                drop(guard);
            })
        })
        .collect();
    for t in tasks {
        join_tokio(&rt, t, "a yielding reader");
    }
    assert_eq!((ctx_a.readers(), ctx_b.readers()), (0, 0));
    assert_eq!(main.readers_inside(), 0);

    // So a writer is not blocked by a count left behind.
    let w = main.spawn(|mut cx| async move { cx.write(|_| ()).await });
    join(w, "a writer after migrated guards");
    main.shutdown();
}

/// A multi-thread tokio runtime, as an embedder would run its own I/O on.
fn embedder_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

/// Waits for a task on an embedder runtime, failing after the timeout.
fn join_tokio<T>(rt: &tokio::runtime::Runtime, task: tokio::task::JoinHandle<T>, what: &str) -> T {
    match rt.block_on(async { tokio::time::timeout(common::TIMEOUT, task).await }) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{what}: {e}"),
        },
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A waker that panics when woken: an executor's or a hostile caller's.
struct PanickingWaker;

impl std::task::Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("a reader's waker panics when woken (expected by this test)");
    }
}

/// An I/O task queues for the read lock behind a writer under a waker that
/// panics, and a reader queues after it: when the writer leaves, the other
/// reader gets in, and the panic unwinds neither into the main loop's
/// writer nor anywhere else that is not at fault.
#[test]
fn a_readers_panicking_waker_costs_the_writer_and_other_readers_nothing() {
    let _wd = watchdog("panicking_reader_waker", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();

    // A reader keeps the writer waiting until it is released.
    let (release, released) = oneshot::channel::<()>();
    let (held_tx, held_rx) = mpsc::channel();
    let holder = io0.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        held_tx.send(()).unwrap();
        released.await.unwrap();
        drop(guard);
    });
    recv(&held_rx, "the first reader to take the read lock");
    let writer = main.spawn(|mut cx| async move { cx.write(|_| "left").await });
    wait_until("the writer waits", || main.writer_active());

    // Queued behind the writer: first the panicking waker, then a reader.
    let (queued_tx, queued_rx) = mpsc::channel();
    let reader = io1.spawn(move |mut cx| async move {
        let waker = std::task::Waker::from(Arc::new(PanickingWaker));
        let polled = {
            let read = std::pin::pin!(cx.read());
            std::future::Future::poll(read, &mut std::task::Context::from_waker(&waker)).map(drop)
        };
        assert!(polled.is_pending(), "the writer let a reader in");
        queued_tx.send(()).unwrap();
        let guard = cx.read().await;
        drop(guard);
        "read"
    });
    recv(&queued_rx, "the panicking waker to queue");
    // Time for the reader to queue behind it (nothing signals that; if it
    // queued later, it would find the writer gone and the test would prove
    // less, not fail).
    thread::sleep(Duration::from_millis(100));

    release.send(()).unwrap();
    join(holder, "the first reader");
    assert_eq!(join(writer, "the writer"), "left");
    assert_eq!(
        join(reader, "the reader queued after the panicking waker"),
        "read"
    );
    assert_eq!(main.readers_inside(), 0);
    let again = main.spawn(|mut cx| async move { cx.write(|_| ()).await });
    join(again, "a writer after the panic");
    main.shutdown();
}
