//! The writer's report when it waits too long for readers (DESIGN §2.9):
//! a task that holds a read guard while it awaits another task that needs
//! the lock (a cross-task nested read) keeps a queued writer out forever, and
//! no type can see it. The writer says, through `tracing`, which context
//! holds readers and where the guard was taken, and keeps waiting.
//!
//! A drain that waits too long for requests in flight reports the same way.
//!
//! A hand-written `tracing` subscriber captures the events. It is the
//! process's global default (the report is emitted on the main-loop
//! thread); the tests look for their own events by text.

mod common;

use std::fmt::Write as _;
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;
use std::time::Duration;

use blockgraph::drivers::MemoryDriver;
use blockgraph::MainLoop;
use common::{join, join_thread, recv, wait_until, watchdog};
use futures::future::{select, Either};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const SIZE: u64 = 1 << 20;

static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records every event as "LEVEL target: message field=value ...".
struct Capture;

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut text = Text(format!("{} {}: ", meta.level(), meta.target()));
        event.record(&mut text);
        EVENTS.lock().unwrap().push(text.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn install_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| tracing::subscriber::set_global_default(Capture).unwrap());
}

fn find_event(needle: &str) -> Option<String> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.contains(needle))
        .cloned()
}

#[test]
fn a_writer_behind_a_cross_task_nested_read_reports_the_guard_and_keeps_waiting() {
    let _wd = watchdog("writer_report", Duration::from_secs(60));
    install_capture();
    let main = MainLoop::new().unwrap();
    main.set_lock_report_after(Some(Duration::from_millis(100)));
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(SIZE), &[])))
        .unwrap();
    let holder = main.new_io_thread("holder").unwrap();
    let helper = Arc::new(main.new_io_thread("helper").unwrap());

    let (line_tx, line_rx) = mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let (d, h) = (disk.clone(), helper.clone());
    let task_a = holder.spawn(move |mut cx| async move {
        #[rustfmt::skip]
        let (guard, line) = (cx.read().await, line!());
        line_tx.send(line).unwrap();
        go_rx.await.unwrap();
        // Task B needs the lock; a writer is queued ahead of it.
        let task_b = h.spawn(move |mut cx| async move {
            let g = cx.read().await;
            d.io(&g).length().await
        });
        // Awaiting B while holding the guard: the cross-task nested read.
        // Only the test's release breaks the cycle.
        match select(task_b, release_rx).await {
            Either::Left((len, _)) => {
                drop(guard);
                len
            }
            Either::Right((_, task_b)) => {
                drop(guard);
                task_b.await
            }
        }
    });
    let line = recv(&line_rx, "task A to take its guard");

    // The writer: a write section, which waits for A's guard.
    let writer = {
        let m = main.clone();
        thread::spawn(move || m.run(|bql| bql.write(|_| ())))
    };
    wait_until("the writer is queued", || main.writer_active());
    go_tx.send(()).unwrap();

    wait_until("the writer reports", || {
        find_event("blockgraph: a writer").is_some()
    });
    let report = find_event("blockgraph: a writer").unwrap();
    for part in [
        "WARN blockgraph::graph_lock",
        "keeps waiting",
        "context 'holder': 1 reader(s) inside",
        &format!("guard taken at tests/lock_report.rs:{line}:"),
        "on thread 'blockgraph-io-holder'",
        "rules 9-11 hold per task, not across tasks",
    ] {
        assert!(report.contains(part), "report lacks {part:?}:\n{report}");
    }
    // Nothing else holds readers: B is queued, not inside.
    assert!(
        !report.contains("context 'helper'"),
        "B never got in:\n{report}"
    );
    assert!(
        !writer.is_finished(),
        "the writer keeps waiting after the report"
    );

    // Break the cycle: A drops its guard, the writer gets in, then B.
    release_tx.send(()).unwrap();
    join_thread(writer, "the writer");
    assert_eq!(join(task_a, "task A").unwrap(), SIZE);
    wait_until("the writer says it got in", || {
        find_event("got the write section").is_some()
    });

    // Usable afterwards: no reader left, a request and a write section work.
    wait_until("every reader has left", || main.readers_inside() == 0);
    main.run(|bql| bql.write(|_| ()));
    let d = disk.clone();
    let len = join(
        holder.spawn(move |mut cx| async move {
            let g = cx.read().await;
            d.io(&g).length().await
        }),
        "a normal request",
    );
    assert_eq!(len.unwrap(), SIZE);
    drop(holder);
    drop(helper);
    main.shutdown();
}

#[test]
fn a_drain_that_waits_too_long_reports_what_it_waits_for_and_keeps_waiting() {
    let _wd = watchdog("drain_report", Duration::from_secs(60));
    install_capture();
    let main = MainLoop::new().unwrap();
    main.set_lock_report_after(Some(Duration::from_millis(100)));
    let (gate, control) = common::Gate::new(SIZE);
    let (node, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let n = w.add_node("stuck", gate, &[])?;
                let b = w.add_backend("vdr", &n, blockgraph::BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((n, b))
            })
        })
        .unwrap();
    let io = main.new_io_thread("requests").unwrap();
    let b = blk.clone();
    let request = io.spawn(move |mut cx| async move {
        let mut buf = [0u8; 512];
        b.read(&mut cx, 0, &mut buf).await
    });
    recv(&control.entered, "the request to reach the gate");

    let (done_tx, done_rx) = mpsc::channel();
    let n = node.clone();
    let drain = main.spawn(move |cx| async move {
        let drained = cx.drain(&n).await;
        done_tx.send(()).unwrap();
        drop(drained);
    });
    wait_until("the drain reports", || {
        find_event("a drain of node 'stuck'").is_some()
    });
    let report = find_event("a drain of node 'stuck'").unwrap();
    for part in [
        "WARN blockgraph::drain",
        "keeps waiting",
        "backend 'vdr' (1 request(s))",
        "context 'requests': 1 reader(s) inside",
    ] {
        assert!(report.contains(part), "report lacks {part:?}:\n{report}");
    }
    assert!(
        done_rx.try_recv().is_err(),
        "the drain returned while a request was in flight"
    );

    control.release(1);
    join(request, "the request").unwrap();
    recv(&done_rx, "the drain after the request finished");
    join(drain, "the drain task");
    wait_until("the drain says it completed", || {
        find_event("the drain of node 'stuck' reported above completed").is_some()
    });
    drop(io);
    main.shutdown();
}
