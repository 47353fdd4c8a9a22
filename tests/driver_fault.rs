//! The fault-injection filter: injected errors reach the backend's caller,
//! delays keep requests in flight across drains, and nothing is lost.

use std::time::{Duration, Instant};

use blockgraph::drivers::{
    FaultAction, FaultController, FaultInjector, FaultOp, FaultRule, MemoryDriver, RawDriver,
    ThrottleDriver, ThrottleGroup,
};
use blockgraph::{ChildRole, Error};

mod common;
use common::{add_alone, Rig, Stack};

const SIZE: u64 = 1 << 20;

/// backend -> fault -> memory `disk`, and the fault filter's controller.
fn stack() -> (Rig, FaultController) {
    let injector = FaultInjector::new();
    let ctl = injector.controller();
    let rig = Stack::new()
        .node("disk", MemoryDriver::new(SIZE))
        .above(ChildRole::Filtered, "fault", injector)
        .build();
    (rig, ctl)
}

fn disk(s: &Rig) -> Vec<u8> {
    s.driver("disk", MemoryDriver::contents)
}

fn errno(err: &Error) -> Option<i32> {
    match err {
        Error::Io(e) => e.raw_os_error(),
        _ => None,
    }
}

#[test]
fn the_nth_write_fails_with_eio_and_never_reaches_the_disk() {
    let (s, ctl) = stack();
    let rule = ctl
        .add_rule(FaultRule::new(FaultOp::Write, FaultAction::EIO).nth(3))
        .unwrap();
    let results: Vec<_> = (0..5u64)
        .map(|i| s.write(i * 4096, &[i as u8 + 1; 4096]))
        .collect();
    for (i, r) in results.iter().enumerate() {
        if i == 2 {
            let err = r.as_ref().unwrap_err();
            assert_eq!(errno(err), Some(libc::EIO), "{err}");
        } else {
            r.as_ref().unwrap();
        }
    }
    assert_eq!(ctl.fired(rule), 1);
    assert_eq!(ctl.failed(), 1);
    let disk = disk(&s);
    for i in 0..5usize {
        let expect = if i == 2 { 0 } else { i as u8 + 1 };
        assert!(
            disk[i * 4096..(i + 1) * 4096].iter().all(|&b| b == expect),
            "block {i}"
        );
    }
    // Reads were never matched.
    assert_eq!(s.read(0, 4096).unwrap(), vec![1; 4096]);
    s.finish();
}

#[test]
fn a_range_rule_fails_only_requests_that_touch_the_range() {
    let (s, ctl) = stack();
    ctl.add_rule(FaultRule::new(FaultOp::Write, FaultAction::ENOSPC).in_range(65536, 65536))
        .unwrap();
    s.write(0, &[1; 65536]).unwrap();
    s.write(131072, &[1; 4096]).unwrap();
    let err = s.write(61440, &[1; 8192]).unwrap_err();
    assert_eq!(errno(&err), Some(libc::ENOSPC));
    assert!(matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::StorageFull));
    assert!(s.write(131071, &[1]).is_err(), "the last byte is inside");
    // Reads of the range are fine.
    s.read(65536, 4096).unwrap();
    s.finish();
}

#[test]
fn rules_change_at_run_time_from_any_thread() {
    let (s, ctl) = stack();
    s.write(0, &[1; 512]).unwrap();
    let ctl2 = ctl.clone();
    let id = std::thread::spawn(move || {
        ctl2.add_rule(FaultRule::new(FaultOp::Any, FaultAction::EIO))
            .unwrap()
    })
    .join()
    .unwrap();
    assert!(s.write(0, &[2; 512]).is_err());
    assert!(s.read(0, 512).is_err());
    let blk = s.blk.clone();
    let flush =
        s.io.spawn(move |mut cx| async move { blk.flush(&mut cx).await })
            .join();
    assert_eq!(errno(&flush.unwrap_err()), Some(libc::EIO));
    assert_eq!(ctl.fired(id), 3);
    // Through the driver on the main loop, too.
    let fault = s.node("fault");
    let removed = s.main.run(move |bql| {
        fault
            .gs(bql)
            .driver_as::<FaultInjector>()
            .unwrap()
            .remove_rule(id)
    });
    assert!(removed);
    assert_eq!(
        s.read(0, 512).unwrap(),
        vec![1; 512],
        "the failed write left no trace"
    );
    s.finish();
}

#[test]
fn times_and_after_bound_when_a_rule_fires() {
    let (s, ctl) = stack();
    let id = ctl
        .add_rule(
            FaultRule::new(FaultOp::Read, FaultAction::EIO)
                .after(2)
                .times(2),
        )
        .unwrap();
    let outcomes: Vec<bool> = (0..6).map(|_| s.read(0, 512).is_ok()).collect();
    assert_eq!(outcomes, [true, true, false, false, true, true]);
    assert_eq!(ctl.fired(id), 2);
    s.finish();
}

/// A delayed request is in flight: the drain waits for it (it completes),
/// requests issued during the drain queue and resume after, and every
/// write that reported success is on the disk.
#[test]
fn drains_wait_for_delayed_requests_and_nothing_is_lost() {
    let (s, ctl) = stack();
    ctl.add_rule(
        FaultRule::new(
            FaultOp::Write,
            FaultAction::Delay(Duration::from_millis(300)),
        )
        .in_range(0, 4096),
    )
    .unwrap();
    let blk = s.blk.clone();
    let slow =
        s.io.spawn(move |mut cx| async move { blk.write(&mut cx, 0, &[7; 4096]).await });
    while s.blk.in_flight() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    // The write issued during the drain is a task of the I/O thread's
    // context polled on a plain thread (an IoTask never leaves its task).
    let ctx = s.io.context().clone();
    let (fault, blk) = (s.node("fault"), s.blk.clone());
    let (waited, queued) = s.main.run(move |bql| {
        let drained = bql.drain(&fault);
        let waited = started.elapsed();
        assert_eq!(
            blk.in_flight(),
            0,
            "the delayed write finished before the drain"
        );
        // A request issued now queues at the backend until the drain ends.
        let b = blk.clone();
        let t = std::thread::spawn(move || {
            futures::executor::block_on(
                ctx.task(move |mut cx| async move { b.write(&mut cx, 8192, &[8; 4096]).await }),
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        let queued = blk.queued_requests();
        drop(drained);
        t.join().unwrap().unwrap();
        (waited, queued)
    });
    slow.join().unwrap();
    assert!(
        waited >= Duration::from_millis(200),
        "drain returned early: {waited:?}"
    );
    assert!(queued >= 1, "the request during the drain queued");
    let disk = disk(&s);
    assert!(disk[..4096].iter().all(|&b| b == 7));
    assert!(disk[8192..12288].iter().all(|&b| b == 8));
    s.finish();
}

/// Many writers on two threads while every fifth write fails and a drain
/// happens in the middle: each write's outcome is exactly what the disk
/// shows (succeeded: its data; failed: untouched), and the caller saw every
/// failure.
#[test]
fn under_random_failures_callers_see_every_error_and_the_disk_every_success() {
    let (s, ctl) = stack();
    // Fails the 5th, 10th, 15th... write: one rule per hit.
    for n in (5..=200).step_by(5) {
        ctl.add_rule(FaultRule::new(FaultOp::Write, FaultAction::EIO).nth(n))
            .unwrap();
    }
    let io1 = s.main.new_io_thread("io1").unwrap();
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let blk = s.blk.clone();
            let io = if i % 2 == 0 { &s.io } else { &io1 };
            io.spawn(move |mut cx| async move {
                tokio::time::sleep(Duration::from_micros(i * 50)).await;
                blk.write(&mut cx, i * 4096, &[(i % 250) as u8 + 1; 4096])
                    .await
                    .is_ok()
            })
        })
        .collect();
    let fault = s.node("fault");
    s.main.run(move |bql| drop(bql.drain(&fault)));
    let ok: Vec<bool> = tasks.into_iter().map(|t| t.join()).collect();
    assert_eq!(
        ok.iter().filter(|&&o| !o).count(),
        40,
        "every rule fired once"
    );
    assert_eq!(ctl.failed(), 40);
    let disk = disk(&s);
    for (i, succeeded) in ok.iter().enumerate() {
        let block = &disk[i * 4096..(i + 1) * 4096];
        let expect = if *succeeded { (i % 250) as u8 + 1 } else { 0 };
        assert!(
            block.iter().all(|&b| b == expect),
            "write {i} (ok: {succeeded})"
        );
    }
    drop(io1);
    s.finish();
}

/// Errors pass unchanged through a deeper stack: backend -> throttle ->
/// raw (window) -> fault -> memory; the rule's range is in the fault
/// node's own offsets (the raw window shifts them).
#[test]
fn errors_propagate_through_a_whole_stack() {
    let injector = FaultInjector::new();
    injector
        .add_rule(FaultRule::new(FaultOp::Read, FaultAction::ENOSPC).in_range(65536 + 4096, 512))
        .unwrap();
    let raw = RawDriver::with_window(65536, Some(65536)).unwrap();
    let group = ThrottleGroup::new("g", Default::default()).unwrap();
    let s = Stack::new()
        .node("disk", MemoryDriver::new(SIZE))
        .above(ChildRole::Filtered, "fault", injector)
        .above(ChildRole::File, "raw", raw)
        .above(ChildRole::Filtered, "thr", ThrottleDriver::new(group))
        .build();
    let blk = s.blk.clone();
    let (hit, miss) =
        s.io.spawn(move |mut cx| async move {
            let mut buf = vec![0; 512];
            let hit = blk.read(&mut cx, 4096, &mut buf).await;
            let miss = blk.read(&mut cx, 8192, &mut buf).await;
            (hit, miss)
        })
        .join();
    assert_eq!(errno(&hit.unwrap_err()), Some(libc::ENOSPC));
    miss.unwrap();
    s.finish();
}

#[test]
fn bad_rules_are_refused_with_clear_errors() {
    let ctl = FaultInjector::new().controller();
    let cases = [
        (
            FaultRule::new(FaultOp::Write, FaultAction::EIO).nth(0),
            "never fires",
        ),
        (
            FaultRule::new(FaultOp::Write, FaultAction::EIO).times(0),
            "never fires",
        ),
        (
            FaultRule::new(FaultOp::Write, FaultAction::EIO).in_range(4096, 0),
            "empty",
        ),
        (
            FaultRule::new(FaultOp::Write, FaultAction::EIO).in_range(u64::MAX, 2),
            "overflows",
        ),
        (FaultRule::new(FaultOp::Read, FaultAction::Fail(0)), "errno"),
    ];
    for (rule, expect) in cases {
        let err = ctl.add_rule(rule).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{rule:?}: {err}");
        assert!(err.to_string().contains(expect), "{rule:?}: {err}");
    }
    let parsed = FaultRule::from_options(&[
        ("op", "write"),
        ("error", "enospc"),
        ("offset", "1M"),
        ("len", "4k"),
        ("nth", "2"),
    ])
    .unwrap();
    assert_eq!(
        parsed,
        FaultRule::new(FaultOp::Write, FaultAction::ENOSPC)
            .in_range(1 << 20, 4096)
            .nth(2)
    );
    for (bad, expect) in [
        (&[("op", "write")][..], "needs error= or delay-ms="),
        (&[("op", "scribble"), ("error", "eio")], "unknown op"),
        (&[("error", "oops")], "not eio, enospc"),
        (&[("error", "eio"), ("offset", "5")], "go together"),
        (
            &[("error", "eio"), ("nth", "2"), ("times", "3")],
            "cannot be combined",
        ),
        (&[("error", "eio"), ("colour", "red")], "unknown option"),
        (&[("delay-ms", "soon")], "not a size"),
    ] {
        let err = FaultRule::from_options(bad).unwrap_err();
        assert!(err.to_string().contains(expect), "{bad:?}: {err}");
    }
    let err = add_alone("fault", FaultInjector::new());
    assert!(matches!(err, Error::NoSuchChild { .. }), "{err}");
}
