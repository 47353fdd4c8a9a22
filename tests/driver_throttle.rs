//! The `throttle` filter: rates (measured), bursts, shared groups, drain,
//! reconfiguration and bad configurations.
//!
//! The rate checks assert the configured limit, not our speed: 200 IOPS is
//! far below what the null driver does on any machine, and the measurement
//! window (about 2 s) makes one late timer tick irrelevant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgraph::drivers::{
    NullDriver, ThrottleConfig, ThrottleDriver, ThrottleGroup, ThrottleLimit,
};
use blockgraph::{BackendOptions, BlockBackend, ChildRole, Error, IoThread, MainLoop, NodeHandle};

mod common;
use common::{add_alone, Stack};

fn iops(n: u64) -> ThrottleConfig {
    ThrottleConfig {
        iops_total: Some(ThrottleLimit::new(n)),
        ..Default::default()
    }
}

/// backend `vdX` -> throttle `thrX` (in `group`) -> null `nullX`.
fn add_stack(main: &MainLoop, x: u32, group: Arc<ThrottleGroup>) -> (NodeHandle, BlockBackend) {
    let (mut nodes, blk) = Stack::new()
        .node(format!("null{x}"), NullDriver::new(1 << 30))
        .above(
            ChildRole::Filtered,
            format!("thr{x}"),
            ThrottleDriver::new(group),
        )
        .backend(format!("vd{x}"), BackendOptions::default())
        .add_to(main)
        .unwrap();
    (nodes.pop().unwrap(), blk)
}

/// Runs `depth` workers of 4 KiB requests (reads, or writes) until
/// `duration` has passed; returns each completion's time since the start.
fn run_load(
    io: &IoThread,
    blk: &BlockBackend,
    depth: usize,
    write: bool,
    size: usize,
    duration: Duration,
) -> Vec<Duration> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..depth)
        .map(|w| {
            let blk = blk.clone();
            io.spawn(move |mut cx| async move {
                let mut buf = vec![0u8; size];
                let mut done = Vec::new();
                let mut off = (w * size) as u64;
                while Instant::now() < deadline {
                    if write {
                        blk.write(&mut cx, off, &buf).await.unwrap();
                    } else {
                        blk.read(&mut cx, off, &mut buf).await.unwrap();
                    }
                    done.push(start.elapsed());
                    off = (off + (depth * size) as u64) % (1 << 30);
                }
                done
            })
        })
        .collect();
    let mut all: Vec<Duration> = workers.into_iter().flat_map(|w| w.join()).collect();
    all.sort();
    all
}

/// Completions per second after the first `warmup` (the initial burst).
fn steady_rate(done: &[Duration], warmup: usize) -> f64 {
    assert!(done.len() > warmup + 10, "only {} completions", done.len());
    let first = done[warmup];
    let last = *done.last().unwrap();
    (done.len() - 1 - warmup) as f64 / (last - first).as_secs_f64()
}

fn assert_within_10_percent(measured: f64, limit: f64) {
    eprintln!("measured {measured:.1}/s, limit {limit}/s");
    assert!(
        (measured - limit).abs() <= limit * 0.10,
        "measured {measured:.1}/s against a limit of {limit}/s"
    );
}

#[test]
fn an_iops_limit_is_measured_within_ten_percent() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let group = ThrottleGroup::new("g", iops(200)).unwrap();
    let (thr, blk) = add_stack(&main, 0, group);
    let done = run_load(&io, &blk, 8, false, 4096, Duration::from_millis(2200));
    // The burst is a tenth of a second's worth: 20 requests.
    assert_within_10_percent(steady_rate(&done, 20), 200.0);
    let throttled = main.run(move |bql| {
        thr.gs(bql)
            .driver_as::<ThrottleDriver>()
            .unwrap()
            .throttled_requests()
    });
    assert!(throttled > 300, "{throttled} requests waited");
    drop(io);
    main.shutdown();
}

#[test]
fn a_bps_limit_applies_to_reads_only_when_asked() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let cfg = ThrottleConfig {
        bps_read: Some(ThrottleLimit::new(1 << 20)),
        ..Default::default()
    };
    let (_thr, blk) = add_stack(&main, 0, ThrottleGroup::new("g", cfg).unwrap());
    // Writes are not limited: 200 x 64 KiB (12.5 s at the read rate).
    let t = Instant::now();
    let blk2 = blk.clone();
    io.spawn(move |mut cx| async move {
        for i in 0..200u64 {
            blk2.write(&mut cx, i << 16, &[1u8; 64 << 10])
                .await
                .unwrap();
        }
    })
    .join();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "writes were throttled"
    );
    // Reads are: 16 per second of 64 KiB.
    let done = run_load(&io, &blk, 4, false, 64 << 10, Duration::from_millis(2000));
    assert_within_10_percent(steady_rate(&done, 2) * 65536.0, 1048576.0);
    drop(io);
    main.shutdown();
}

#[test]
fn nodes_sharing_a_group_share_its_limit() {
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    let group = ThrottleGroup::new("shared", iops(200)).unwrap();
    let (_a, blk0) = add_stack(&main, 0, group.clone());
    let (_b, blk1) = add_stack(&main, 1, group);
    let other = std::thread::spawn(move || {
        let d = run_load(&io1, &blk1, 4, true, 4096, Duration::from_millis(2200));
        drop(io1);
        d
    });
    let mut done = run_load(&io0, &blk0, 4, false, 4096, Duration::from_millis(2200));
    let theirs = other.join().unwrap();
    assert!(
        theirs.len() > 100 && done.len() > 100,
        "both nodes made progress"
    );
    done.extend(theirs);
    done.sort();
    assert_within_10_percent(steady_rate(&done, 20), 200.0);
    drop(io0);
    main.shutdown();
}

#[test]
fn bursts_go_faster_than_the_average_then_settle() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let cfg = ThrottleConfig {
        iops_total: Some(ThrottleLimit::new(50).with_burst(500, 1)),
        ..Default::default()
    };
    let (_thr, blk) = add_stack(&main, 0, ThrottleGroup::new("g", cfg).unwrap());
    let t = Instant::now();
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let b = blk.clone();
            io.spawn(move |mut cx| async move {
                let mut buf = [0u8; 512];
                b.read(&mut cx, i * 512, &mut buf).await
            })
        })
        .collect();
    for task in tasks {
        task.join().unwrap();
    }
    let burst = t.elapsed();
    // 200 requests at the average would take about 4 s; the burst runs at
    // 500/s after its first 50 (capacity of the burst-rate bucket).
    assert!(burst < Duration::from_millis(1500), "{burst:?}");
    assert!(
        burst >= Duration::from_millis(250),
        "the burst rate applies: {burst:?}"
    );
    drop(io);
    main.shutdown();
}

/// A drain of a throttled node completes at once: the sleeping requests
/// are let through (QEMU disables throttling while drained), then
/// throttling resumes.
#[test]
fn draining_a_throttled_node_completes_promptly() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (thr, blk) = add_stack(&main, 0, ThrottleGroup::new("slow", iops(2)).unwrap());
    // Ten requests at 2 IOPS: about 4.5 s if left alone.
    let tasks: Vec<_> = (0..10u64)
        .map(|i| {
            let blk = blk.clone();
            io.spawn(move |mut cx| async move { blk.write(&mut cx, i * 4096, &[1; 4096]).await })
        })
        .collect();
    let t = Instant::now();
    while blk.in_flight() < 9 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "requests never queued"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (thr2, blk2) = (thr.clone(), blk.clone());
    let drain_time = main.run(move |bql| {
        let t = Instant::now();
        let drained = bql.drain(&thr2);
        let took = t.elapsed();
        assert_eq!(blk2.in_flight(), 0, "nothing in flight once drained");
        drop(drained);
        took
    });
    assert!(
        drain_time < Duration::from_secs(1),
        "drain took {drain_time:?}"
    );
    for task in tasks {
        task.join().unwrap();
    }
    // Throttling is back: a new request waits (the group still carries the
    // requests it let through), until another drain releases it.
    let b = blk.clone();
    let late = io.spawn(move |mut cx| async move { b.write(&mut cx, 0, &[2; 4096]).await });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(blk.in_flight(), 1, "the new request is throttled again");
    main.run(move |bql| drop(bql.drain(&thr)));
    late.join().unwrap();
    drop(io);
    main.shutdown();
}

/// The limits of the throttle node `node`'s group.
fn limits(main: &MainLoop, node: &NodeHandle) -> ThrottleConfig {
    let node = node.clone();
    main.run(move |bql| {
        node.gs(bql)
            .driver_as::<ThrottleDriver>()
            .unwrap()
            .group()
            .config()
    })
}

#[test]
fn reopen_replaces_the_groups_limits_and_keeps_them_on_error() {
    let main = MainLoop::new().unwrap();
    let (thr, _blk) = add_stack(&main, 0, ThrottleGroup::new("g", iops(100)).unwrap());
    let (t2, t3) = (thr.clone(), thr.clone());
    let err = main
        .run(move |bql| {
            let d = bql.drain(&thr);
            bql.write(|w| w.reopen(&d, &[("iops-total", "0")]))
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("iops-total must be positive"),
        "{err}"
    );
    assert_eq!(limits(&main, &t2), iops(100), "unchanged after the error");
    main.run(move |bql| {
        let d = bql.drain(&t2);
        bql.write(|w| w.reopen(&d, &[("bps-write", "2M"), ("bps-write-max", "4M")]))
    })
    .unwrap();
    let expect = ThrottleConfig {
        bps_write: Some(ThrottleLimit::new(2 << 20).with_burst(4 << 20, 1)),
        ..Default::default()
    };
    assert_eq!(limits(&main, &t3), expect);
    main.shutdown();
}

/// A reopen is part of its transaction: when a later step of the
/// transaction fails (another reopen, or a graph change), the limits it
/// set go back to what they were, for every node of the transaction and in
/// the right order when one group is reopened twice; a committed reopen
/// stays and is what the next rollback returns to.
#[test]
fn a_reopen_rolls_back_with_its_transaction() {
    let main = MainLoop::new().unwrap();
    let shared = ThrottleGroup::new("shared", iops(100)).unwrap();
    let (a, _va) = add_stack(&main, 0, shared.clone());
    let (b, _vb) = add_stack(&main, 1, shared.clone());
    let (c, _vc) = add_stack(&main, 2, ThrottleGroup::new("own", iops(7)).unwrap());
    let limits = |h: &NodeHandle| limits(&main, h);

    // Both nodes of the shared group and a node of its own reopened, then
    // a reopen that fails: everything is as before.
    let (ha, hb, hc) = (a.clone(), b.clone(), c.clone());
    let err = main
        .run(move |bql| {
            let (da, db, dc) = (bql.drain(&ha), bql.drain(&hb), bql.drain(&hc));
            bql.write(|w| {
                w.transaction(|w| {
                    w.reopen(&da, &[("iops-total", "200")])?;
                    w.reopen(&db, &[("iops-total", "300")])?;
                    w.reopen(&dc, &[("iops-total", "8")])?;
                    w.reopen(&dc, &[("iops-total", "0")])
                })
            })
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("iops-total must be positive"),
        "{err}"
    );
    assert_eq!(limits(&a), iops(100), "the shared group after the rollback");
    assert_eq!(limits(&c), iops(7), "the other group after the rollback");

    // A reopen, then a graph change that fails (a name already taken).
    let hc = c.clone();
    let err = main
        .run(move |bql| {
            let dc = bql.drain(&hc);
            bql.write(|w| {
                w.transaction(|w| {
                    w.reopen(&dc, &[("iops-total", "9")])?;
                    w.add_node("thr0", NullDriver::new(1 << 20), &[])
                })
            })
        })
        .unwrap_err();
    assert!(err.to_string().contains("thr0"), "{err}");
    assert_eq!(limits(&c), iops(7), "after a failed graph change");

    // Committed, then rolled back again: back to the committed limits.
    let hc = c.clone();
    main.run(move |bql| {
        let dc = bql.drain(&hc);
        bql.write(|w| w.reopen(&dc, &[("iops-total", "11")]))
    })
    .unwrap();
    assert_eq!(limits(&c), iops(11));
    let hc = c.clone();
    main.run(move |bql| {
        let dc = bql.drain(&hc);
        bql.write(|w| {
            w.transaction(|w| {
                w.reopen(&dc, &[("iops-total", "12")])?;
                w.reopen(&dc, &[("bps-read", "0")])
            })
        })
    })
    .unwrap_err();
    assert_eq!(limits(&c), iops(11), "the committed reopen stays");
    main.shutdown();
}

/// A waker that panics when woken: a hostile or broken caller's.
struct PanickingWaker;

impl std::task::Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("a throttled request's waker panics (expected by this test)");
    }
}

/// Two requests wait for their turn, one of them polled under a waker that
/// panics: a drain beginning wakes them (the throttle is lifted while
/// drained) without the panic unwinding into the drain, the other request
/// is woken and completes, and the drain ends.
#[test]
fn a_panicking_waker_of_a_throttled_request_costs_the_drain_nothing() {
    let _wd = common::watchdog("throttle_panicking_waker", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io").unwrap();
    let io2 = main.new_io_thread("io2").unwrap();
    let (thr, blk) = add_stack(&main, 0, ThrottleGroup::new("g", iops(1)).unwrap());
    // Use up the budget: the next requests wait about a second each.
    let b = blk.clone();
    common::join(
        io.spawn(move |mut cx| async move { b.read(&mut cx, 0, &mut [0u8; 512]).await }),
        "the first request",
    )
    .unwrap();

    // The hostile request: polled under the panicking waker each time, and
    // polled again on its own, so that it finishes without a wake-up.
    let (queued_tx, queued_rx) = std::sync::mpsc::channel();
    let b = blk.clone();
    let hostile = io.spawn(move |mut cx| async move {
        let waker = std::task::Waker::from(Arc::new(PanickingWaker));
        let mut buf = [0u8; 512];
        let mut read = std::pin::pin!(b.read(&mut cx, 512, &mut buf));
        let mut queued = Some(queued_tx);
        loop {
            let polled = std::future::Future::poll(
                read.as_mut(),
                &mut std::task::Context::from_waker(&waker),
            );
            if let std::task::Poll::Ready(r) = polled {
                return r;
            }
            if let Some(tx) = queued.take() {
                tx.send(()).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    common::recv(&queued_rx, "the hostile request to wait");
    let b = blk.clone();
    let waiting = io2.spawn(move |mut cx| async move {
        let started = Instant::now();
        b.read(&mut cx, 1024, &mut [0u8; 512]).await?;
        Ok::<_, Error>(started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));

    // The drain lifts the throttle and wakes both: no panic reaches it.
    let t = thr.clone();
    main.run(move |bql| drop(bql.drain(&t)));
    common::join(hostile, "the hostile request").unwrap();
    let waited = common::join(waiting, "the request woken by the drain").unwrap();
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    drop((io, io2));
    main.shutdown();
}

#[test]
fn invalid_configurations_are_refused_with_clear_messages() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("iops-total", "0")], "iops-total must be positive"),
        (&[("bps-read", "0")], "bps-read must be positive"),
        (
            &[("iops-total", "10"), ("iops-read", "5")],
            "iops-total cannot be combined",
        ),
        (
            &[("bps-total", "1M"), ("bps-write", "1M")],
            "bps-total cannot be combined",
        ),
        (
            &[("iops-total", "100"), ("iops-total-max", "50")],
            "iops-total-max (50) must be at least iops-total (100)",
        ),
        (
            &[("iops-total", "100"), ("iops-total-max-length", "5")],
            "iops-total-max-length needs iops-total-max",
        ),
        (
            &[
                ("iops-total", "100"),
                ("iops-total-max", "200"),
                ("iops-total-max-length", "0"),
            ],
            "iops-total-max-length must be 1",
        ),
        (&[("iops-total-max", "200")], "need iops-total"),
        (&[("iops-total", "2000000000000000")], "at most"),
        (&[("iops-total", "many")], "not a size"),
        (
            &[("iops-size", "0"), ("iops-total", "5")],
            "iops-size must be positive",
        ),
        (&[("iops-totl", "5")], "unknown option 'iops-totl'"),
    ];
    for (options, expect) in cases {
        let err = ThrottleConfig::from_options(options).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{options:?}: {err}"
        );
        assert!(err.to_string().contains(expect), "{options:?}: {err}");
    }
    // The same rules hold for configurations built in code.
    assert!(ThrottleGroup::new("g", iops(0)).is_err());
    let g = ThrottleGroup::new("g", iops(10)).unwrap();
    assert!(g.set_config(iops(0)).is_err());
    assert_eq!(g.config(), iops(10));
    assert!(ThrottleDriver::with_config(
        "x",
        ThrottleConfig {
            iops_read: Some(ThrottleLimit::new(10).with_burst(5, 1)),
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn a_throttle_node_needs_a_filtered_child() {
    let err = add_alone("thr", ThrottleDriver::with_config("g", iops(10)).unwrap());
    assert!(
        matches!(
            err,
            Error::NoSuchChild {
                role: ChildRole::Filtered,
                ..
            }
        ),
        "{err}"
    );
}

/// Flushes and length queries pass unthrottled, and an unlimited group
/// lets everything straight through.
#[test]
fn unthrottled_operations_do_not_wait() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (_t, blk) = add_stack(&main, 0, ThrottleGroup::new("g", iops(1)).unwrap());
    let (_u, free) = add_stack(
        &main,
        1,
        ThrottleGroup::new("free", ThrottleConfig::default()).unwrap(),
    );
    let t = Instant::now();
    io.spawn(move |mut cx| async move {
        for _ in 0..50 {
            blk.flush(&mut cx).await.unwrap();
            blk.length(&mut cx).await.unwrap();
            free.write(&mut cx, 0, &[0; 512]).await.unwrap();
        }
    })
    .join();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(io);
    main.shutdown();
}
