//! Behaviour of drained sections: waiting for requests in flight on other
//! threads, queueing new ones, nesting and overlap with exact callbacks,
//! nodes that join a drained section, and graph changes around drain
//! callbacks.

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use blockgraph::drivers::{MemoryDriver, NullDriver, PassthroughFilter};
use blockgraph::{BackendOptions, Bql, ChildRole, Error, MainLoop, NodeHandle, TaskHandle};
use common::{
    assert_consistent, child_names, graph_problems, join, parent_names, recv, settle, wait_until,
    watchdog, Events, Gate, Overlay, Probe,
};
use tokio::sync::oneshot;

fn count(bql: &Bql, h: &NodeHandle) -> u32 {
    h.gs(bql).drain_count()
}

/// Sorted, so that callbacks fired together compare regardless of order.
fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn ev(list: &[&str]) -> Vec<String> {
    sorted(list.iter().map(|s| s.to_string()).collect())
}

#[test]
fn drain_returns_only_after_requests_in_flight_on_io_threads_complete() {
    let _wd = watchdog("drain_waits_in_flight", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    let (slow, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let delay = Duration::from_millis(300);
                let n = w.add_node("slow", NullDriver::new(1 << 20).with_delay(delay), &[])?;
                let b = w.add_backend("vda", &n, BackendOptions::default())?;
                Ok::<_, Error>((n, b))
            })
        })
        .unwrap();

    let mut requests = Vec::new();
    for (i, io) in [&io0, &io1].into_iter().enumerate() {
        let b = blk.clone();
        requests.push(io.spawn(move |mut cx| async move {
            b.write(&mut cx, i as u64 * 4096, &[1u8; 4096]).await
        }));
    }
    wait_until("both requests are in flight", || blk.in_flight() == 2);

    // Synchronous drain on the main loop, while both sleep on I/O threads.
    let (completed, in_flight, drained, null_requests) = main.run({
        let (slow, blk) = (slow.clone(), blk.clone());
        move |bql| {
            let d = bql.drain(&slow);
            let gs = slow.gs(bql);
            let seen = (
                blk.completed_requests(),
                blk.in_flight(),
                gs.is_drained(),
                gs.driver_as::<NullDriver>().unwrap().requests(),
            );
            drop(d);
            seen
        }
    });
    assert_eq!(
        completed, 2,
        "drain returned before the requests in flight completed"
    );
    assert_eq!(in_flight, 0);
    assert!(drained);
    assert_eq!(null_requests, 2);
    for r in requests {
        join(r, "a request").unwrap();
    }
    drop((io0, io1));
    main.shutdown();
}

#[test]
fn async_drain_waits_for_a_gated_request_on_another_io_thread() {
    let _wd = watchdog("async_drain_gate", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let (gate, control) = Gate::new(1 << 20);
    let (g, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let n = w.add_node("gate", gate, &[])?;
                let b = w.add_backend("vda", &n, BackendOptions::default())?;
                Ok::<_, Error>((n, b))
            })
        })
        .unwrap();

    let b = blk.clone();
    let request = io0.spawn(move |mut cx| async move { b.write(&mut cx, 0, &[7u8; 512]).await });
    recv(&control.entered, "the request to reach the driver");

    // Two main-loop tasks drain the same node at once; neither may return
    // while the request is in flight, and neither may deadlock the other.
    let (drained_tx, drained_rx) = mpsc::channel::<u64>();
    let mut ends = Vec::new();
    let mut drains: Vec<TaskHandle<()>> = Vec::new();
    for _ in 0..2 {
        let (end_tx, end_rx) = oneshot::channel::<()>();
        ends.push(end_tx);
        let (g, blk, drained_tx) = (g.clone(), blk.clone(), drained_tx.clone());
        drains.push(main.spawn(move |cx| async move {
            let d = cx.drain(&g).await;
            drained_tx.send(blk.completed_requests()).unwrap();
            let _ = end_rx.await;
            drop(d);
        }));
    }
    let g2 = g.clone();
    let m2 = main.clone();
    wait_until("both drains have begun", move || {
        let g2 = g2.clone();
        m2.run(move |bql| count(bql, &g2)) == 2
    });
    settle(&main);
    assert!(
        drained_rx.try_recv().is_err(),
        "a drain returned while a request was in flight"
    );
    assert_eq!(blk.in_flight(), 1);
    assert!(blk.is_quiesced());

    control.release(1);
    for _ in 0..2 {
        let completed = recv(&drained_rx, "a drain to return");
        assert_eq!(
            completed, 1,
            "a drain returned before the request completed"
        );
    }
    join(request, "the gated request").unwrap();
    let g2 = g.clone();
    assert_eq!(main.run(move |bql| count(bql, &g2)), 2);

    for e in ends {
        e.send(()).unwrap();
    }
    for d in drains {
        join(d, "a drain task");
    }
    let g2 = g.clone();
    assert_eq!(main.run(move |bql| count(bql, &g2)), 0);
    assert!(!blk.is_quiesced());
    drop(io0);
    main.shutdown();
}

/// A synchronous drain started while an async writer waits for the same
/// in-flight request: neither waits for the other, both finish once the
/// request does.
#[test]
fn sync_drain_while_a_writer_waits_for_the_same_request() {
    let _wd = watchdog("drain_with_waiting_writer", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let (gate, control) = Gate::new(1 << 20);
    let (g, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let n = w.add_node("gate", gate, &[])?;
                let b = w.add_backend("vda", &n, BackendOptions::default())?;
                Ok::<_, Error>((n, b))
            })
        })
        .unwrap();
    let b = blk.clone();
    let request = io0.spawn(move |mut cx| async move { b.read(&mut cx, 0, &mut [0u8; 512]).await });
    recv(&control.entered, "the request to reach the driver");
    assert_eq!(main.readers_inside(), 1);

    // The async writer waits for the request's read lock.
    let writer = main.spawn(|mut cx| async move { cx.write(|w| w.graph().nodes().count()).await });
    wait_until("the writer announces itself", || main.writer_active());

    // A synchronous drain (from a QMP-like command thread) waits for the
    // request too, blocking the main loop meanwhile.
    let drainer = std::thread::spawn({
        let (main, g, blk) = (main.clone(), g.clone(), blk.clone());
        move || {
            main.run(move |bql| {
                let d = bql.drain(&g);
                let seen = (blk.completed_requests(), blk.in_flight());
                drop(d);
                seen
            })
        }
    });
    wait_until("the synchronous drain begins", || blk.is_quiesced());
    assert!(
        !drainer.is_finished(),
        "the drain returned with a request in flight"
    );
    control.release(1);
    let (completed, in_flight) = common::join_thread(drainer, "the synchronous drain");
    assert_eq!((completed, in_flight), (1, 0));
    assert_eq!(join(writer, "the writer"), 1);
    join(request, "the request").unwrap();
    assert!(!main.writer_active() && !blk.is_quiesced());
    drop(io0);
    main.shutdown();
}

#[test]
fn requests_issued_during_a_drain_queue_and_never_reach_the_drained_node() {
    let _wd = watchdog("requests_queue_during_drain", Duration::from_secs(120));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let io1 = main.new_io_thread("io1").unwrap();
    let (disk, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let n = w.add_node("disk", MemoryDriver::new(1 << 16), &[])?;
                let b = w.add_backend("vda", &n, BackendOptions::default())?;
                Ok::<_, Error>((n, b))
            })
        })
        .unwrap();
    let disk_requests = {
        let disk = disk.clone();
        move |main: &MainLoop| {
            let disk = disk.clone();
            main.run(move |bql| {
                let gs = disk.gs(bql);
                (
                    gs.driver_as::<MemoryDriver>().unwrap().requests(),
                    gs.is_drained(),
                )
            })
        }
    };

    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let (end_tx, end_rx) = oneshot::channel::<()>();
    let holder = main.spawn({
        let disk = disk.clone();
        move |cx| async move {
            let d = cx.drain(&disk).await;
            drained_tx.send(()).unwrap();
            let _ = end_rx.await;
            drop(d);
        }
    });
    recv(&drained_rx, "the drain to begin");
    let (before, drained) = disk_requests(&main);
    assert!(drained);
    let queued_before = blk.queued_requests();

    let mut writes = Vec::new();
    for (i, io) in [&io0, &io1, &io0, &io1].into_iter().enumerate() {
        let b = blk.clone();
        writes.push(io.spawn(move |mut cx| async move {
            b.write(&mut cx, i as u64 * 512, &[i as u8 + 1; 512]).await
        }));
    }
    wait_until("all four requests queue at the backend", || {
        blk.queued_requests() >= queued_before + 4
    });
    settle(&main);
    let (during, still_drained) = disk_requests(&main);
    assert!(still_drained);
    assert_eq!(during, before, "a request reached the drained node");
    assert_eq!(blk.in_flight(), 0);
    assert!(blk.is_quiesced());

    end_tx.send(()).unwrap();
    join(holder, "the drain holder");
    for w in writes {
        join(w, "a queued write").unwrap();
    }
    let (after, drained) = disk_requests(&main);
    assert!(!drained);
    assert_eq!(after, before + 4, "the queued requests did not all run");
    let contents =
        main.run(move |bql| disk.gs(bql).driver_as::<MemoryDriver>().unwrap().contents());
    for i in 0..4 {
        assert!(contents[i * 512..(i + 1) * 512]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    drop((io0, io1));
    main.shutdown();
}

/// backend vda -> filter f -> memory base, both probed.
fn probed_stack(
    main: &MainLoop,
    events: &Arc<Events>,
) -> (NodeHandle, NodeHandle, blockgraph::BlockBackend) {
    let events = events.clone();
    main.run(move |bql| {
        bql.write(|w| {
            let base = w.add_node("base", Probe::new(MemoryDriver::new(1 << 16), &events), &[])?;
            let f = w.add_node(
                "f",
                Probe::new(PassthroughFilter::new(), &events),
                &[(ChildRole::Filtered, &base)],
            )?;
            let blk = w.add_backend("vda", &f, BackendOptions::default())?;
            Ok::<_, Error>((base, f, blk))
        })
    })
    .unwrap()
}

#[test]
fn nested_and_overlapping_drains_count_and_fire_callbacks_on_transitions_only() {
    let _wd = watchdog("nested_overlapping", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let events = Events::new();
    let (base, f, blk) = probed_stack(&main, &events);
    assert_eq!(sorted(events.take()), ev(&["open base", "open f"]));

    main.run({
        let events = events.clone();
        move |bql| {
            let counts = |bql: &Bql| (count(bql, &f), count(bql, &base));

            // Nested sections on one node.
            let d1 = bql.drain(&f);
            assert_eq!(counts(bql), (1, 0), "draining f must not drain its child");
            assert!(f.gs(bql).is_drained() && !base.gs(bql).is_drained());
            assert!(blk.is_quiesced());
            assert_eq!(events.take(), ev(&["begin f"]));
            let d2 = bql.drain(&f);
            assert_eq!(counts(bql), (2, 0));
            assert!(events.take().is_empty(), "begin fired on a 1->2 transition");
            drop(d2);
            assert_eq!(counts(bql), (1, 0));
            assert!(events.take().is_empty(), "end fired on a 2->1 transition");
            assert!(f.gs(bql).is_drained() && blk.is_quiesced());

            // Overlapping: a section on the child also covers its parent.
            let d3 = bql.drain(&base);
            assert_eq!(counts(bql), (2, 1));
            assert_eq!(events.take(), ev(&["begin base"]));
            // End the first section before the overlapping one.
            drop(d1);
            assert_eq!(counts(bql), (1, 1));
            assert!(
                events.take().is_empty(),
                "end fired while another section covers f"
            );
            assert!(f.gs(bql).is_drained() && base.gs(bql).is_drained());
            assert!(
                blk.is_quiesced(),
                "backend resumed while its node is still drained"
            );

            // Overlap the other way round, and a third level.
            let d4 = bql.drain(&f);
            let d5 = bql.drain(&base);
            assert_eq!(counts(bql), (3, 2));
            assert!(events.take().is_empty());
            drop(d3);
            drop(d5);
            assert_eq!(counts(bql), (1, 0));
            assert_eq!(events.take(), ev(&["end base"]));
            assert!(blk.is_quiesced());
            drop(d4);
            assert_eq!(counts(bql), (0, 0));
            assert_eq!(events.take(), ev(&["end f"]));
            assert!(!blk.is_quiesced());
            assert!(!f.gs(bql).is_drained() && !base.gs(bql).is_drained());
        }
    });
    main.shutdown();
}

#[test]
fn nodes_joining_a_drained_section_start_drained() {
    let _wd = watchdog("join_drained", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io0 = main.new_io_thread("io0").unwrap();
    let events = Events::new();
    let (p, c, blk) = main
        .run({
            let events = events.clone();
            move |bql| {
                bql.write(|w| {
                    let p = w.add_node("p", Probe::new(PassthroughFilter::new(), &events), &[])?;
                    let c =
                        w.add_node("c", Probe::new(MemoryDriver::new(1 << 16), &events), &[])?;
                    let blk = w.add_backend("vda", &p, BackendOptions::default())?;
                    Ok::<_, Error>((p, c, blk))
                })
            }
        })
        .unwrap();
    events.take();

    main.run({
        let (events, c, blk) = (events.clone(), c.clone(), blk.clone());
        move |bql| {
            // attach_child under a drained parent.
            let dp = bql.drain(&p);
            assert_eq!(events.take(), ev(&["begin p"]));
            bql.write(|w| w.attach_child(&dp, ChildRole::Filtered, &c))
                .unwrap();
            let gs = c.gs(bql);
            assert_eq!(gs.drain_count(), 1, "child attached under a drained parent");
            assert!(gs.is_drained());
            assert_eq!(events.take(), ev(&["begin c"]));
            drop(dp);
            assert_eq!((count(bql, &p), count(bql, &c)), (0, 0));
            assert!(!c.gs(bql).is_drained());
            assert_eq!(sorted(events.take()), ev(&["end p", "end c"]));

            // New nodes above a drained node: insert_filter, append_overlay
            // and add_node with the drained node as a child.
            let dc = bql.drain(&c);
            assert_eq!(sorted(events.take()), ev(&["begin c", "begin p"]));
            let f = bql
                .write(|w| w.insert_filter(&dc, "f", Probe::new(PassthroughFilter::new(), &events)))
                .unwrap();
            assert_eq!((count(bql, &f), f.gs(bql).is_drained()), (1, true));
            assert_eq!(events.take(), vec!["open f", "begin f"]);
            let o = bql
                .write(|w| w.append_overlay(&dc, "o", Probe::new(Overlay::new(), &events), &[]))
                .unwrap();
            assert_eq!((count(bql, &o), o.gs(bql).is_drained()), (1, true));
            assert_eq!(events.take(), vec!["open o", "begin o"]);
            let n = bql
                .write(|w| {
                    w.add_node(
                        "n",
                        Probe::new(Overlay::new(), &events),
                        &[(ChildRole::Backing, &c)],
                    )
                })
                .unwrap();
            assert_eq!((count(bql, &n), n.gs(bql).is_drained()), (1, true));
            assert_eq!(events.take(), vec!["open n", "begin n"]);
            assert_eq!(child_names(f.gs(bql)), ["filtered:o"]);
            assert_eq!(sorted(parent_names(c.gs(bql))), ["n:backing", "o:backing"]);
            assert!(blk.is_quiesced());
            assert_consistent(bql.graph());

            drop(dc);
            for h in [&p, &c, &f, &o, &n] {
                assert_eq!(count(bql, h), 0, "{} still drained", h.name());
            }
            assert_eq!(
                sorted(events.take()),
                ev(&["end c", "end p", "end f", "end o", "end n"])
            );
            assert!(!blk.is_quiesced());
        }
    });

    // I/O goes through p -> f -> o -> c.
    let b = blk.clone();
    let data = join(
        io0.spawn(move |mut cx| async move {
            b.write(&mut cx, 512, &[9u8; 512]).await?;
            let mut buf = vec![0u8; 512];
            b.read(&mut cx, 512, &mut buf).await?;
            Ok::<_, Error>(buf)
        }),
        "I/O through the new nodes",
    )
    .unwrap();
    assert!(data.iter().all(|&b| b == 9));
    let stored = main.run(move |bql| {
        c.gs(bql)
            .driver_as::<Probe<MemoryDriver>>()
            .unwrap()
            .inner()
            .contents()[512..1024]
            .to_vec()
    });
    assert!(stored.iter().all(|&b| b == 9));
    drop(io0);
    main.shutdown();
}

#[test]
fn node_removed_during_a_drain_is_fine() {
    let _wd = watchdog("removed_during_drain", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let events = Events::new();
    main.run({
        let events = events.clone();
        move |bql| {
            let (c, x) = bql
                .write(|w| {
                    let c = w.add_node("c", Probe::new(MemoryDriver::new(4096), &events), &[])?;
                    let x = w.add_node(
                        "x",
                        Probe::new(Overlay::new(), &events),
                        &[(ChildRole::Backing, &c)],
                    )?;
                    Ok::<_, Error>((c, x))
                })
                .unwrap();
            events.take();
            let dc = bql.drain(&c); // covers c and its parent x
            let dx = bql.drain(&x);
            assert_eq!((count(bql, &c), count(bql, &x)), (1, 2));
            bql.write(|w| w.remove_node(&dx)).unwrap();
            assert!(!x.gs(bql).is_in_graph());
            assert!(parent_names(c.gs(bql)).is_empty());
            drop(dx);
            drop(dc);
            assert_eq!(count(bql, &c), 0);
            assert!(!c.gs(bql).is_drained());
            let got = events.take();
            assert_eq!(got.iter().filter(|e| *e == "close x").count(), 1);
            assert!(got.contains(&"end c".to_owned()));
            assert!(
                !got.contains(&"end x".to_owned()),
                "callback on a removed node: {got:?}"
            );
            assert_consistent(bql.graph());
        }
    });
    main.shutdown();
}

/// Drain callbacks only get a `GsRef`, so they cannot change the graph
/// themselves (the compile-time side is in `ui-tests/`). They see a
/// consistent graph even when they fire in the middle of a mutation
/// (a node joining a drained section), and a change they defer to a
/// main-loop task leaves no dangling edge.
#[test]
fn drain_callbacks_see_a_consistent_graph_during_mutations() {
    let _wd = watchdog("callbacks_consistent", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let events = Events::new();
    let problems = Events::new();
    let calls = common::Counter::default();
    let probe = {
        let (events, problems, calls) = (events.clone(), problems.clone(), calls.clone());
        move |driver: Box<dyn blockgraph::driver::BlockDriver>| {
            let check = {
                let (problems, calls) = (problems.clone(), calls.clone());
                move |node: blockgraph::CallbackRef<'_>| {
                    calls.incr();
                    for p in local_problems(node) {
                        problems.push(format!("in a callback of '{}': {p}", node.name()));
                    }
                }
            };
            let check2 = check.clone();
            Probe::new(BoxedDriver(driver), &events)
                .on_drained_begin(check)
                .on_drained_end(check2)
        }
    };

    main.run(move |bql| {
        let base = bql
            .write(|w| w.add_node("base", probe(Box::new(MemoryDriver::new(1 << 16))), &[]))
            .unwrap();
        let blk = bql
            .write(|w| w.add_backend("vda", &base, BackendOptions::default()))
            .unwrap();
        let db = bql.drain(&base);
        let f = bql
            .write(|w| w.insert_filter(&db, "f", probe(Box::new(PassthroughFilter::new()))))
            .unwrap();
        let o = bql
            .write(|w| w.append_overlay(&db, "o", probe(Box::new(Overlay::new())), &[]))
            .unwrap();
        let df = bql.drain(&f);
        let g = bql
            .write(|w| w.insert_filter(&df, "g", probe(Box::new(PassthroughFilter::new()))))
            .unwrap();
        bql.write(|w| w.remove_filter(&df)).unwrap();
        drop(df);
        let dg = bql.drain(&g);
        let dox = bql.drain(&o);
        bql.write(|w| {
            w.replace_node(&dox, &db)?;
            w.remove_node(&dox)
        })
        .unwrap();
        drop(dox);
        assert_consistent(bql.graph());
        drop(dg);
        drop(db);
        assert_eq!(child_names(g.gs(bql)), ["filtered:base"]);
        assert_eq!(parent_names(base.gs(bql)), ["g:filtered"]);
        assert_eq!(blk.name(), "vda");
        assert!(!blk.is_quiesced());
        assert_consistent(bql.graph());
    });
    // Exactly the 0<->1 transitions: base, f, o and g begin (f and o as
    // they join the section on base, g as it joins the one on f); f and o
    // are removed inside the sections, so only base and g end.
    let got: Vec<String> = events
        .take()
        .into_iter()
        .filter(|e| e.starts_with("begin") || e.starts_with("end"))
        .collect();
    let (begins, ends): (Vec<_>, Vec<_>) = got.into_iter().partition(|e| e.starts_with("begin"));
    assert_eq!(begins, ["begin base", "begin f", "begin o", "begin g"]);
    assert_eq!(sorted(ends), ["end base", "end g"]);
    assert_eq!(calls.get(), 6);
    let found = problems.take();
    assert!(found.is_empty(), "{found:#?}");
    main.shutdown();
}

/// QEMU's "detach-by-parent-callback" and "delete-by-drain": a callback
/// that wants to change the graph can only schedule the change as a
/// main-loop task (it has no `Bql`), which then drains and mutates like any
/// other; afterwards no edge dangles.
#[test]
fn graph_changes_scheduled_from_drain_callbacks_leave_no_dangling_edges() {
    let _wd = watchdog("callback_changes", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let events = Events::new();

    type Slot = Arc<Mutex<Option<TaskHandle<Result<String, Error>>>>>;
    let detach_task: Slot = Arc::default();
    let delete_task: Slot = Arc::default();

    // p's drained_end detaches p's child (once).
    let on_p_end = {
        let (main, slot) = (main.clone(), detach_task.clone());
        move |node: blockgraph::CallbackRef<'_>| {
            let mut slot = slot.lock().unwrap();
            if slot.is_some() {
                return;
            }
            let h = node.to_handle();
            *slot = Some(main.spawn(move |mut cx| async move {
                let d = cx.drain(&h).await;
                let child = cx
                    .write(|w| w.detach_child(&d, ChildRole::Filtered))
                    .await?;
                Ok(child.name().to_owned())
            }));
        }
    };
    // x's drained_begin deletes x itself (once), after the drain that
    // triggered it has ended.
    let on_x_begin = {
        let (main, slot) = (main.clone(), delete_task.clone());
        move |node: blockgraph::CallbackRef<'_>| {
            let mut slot = slot.lock().unwrap();
            if slot.is_some() {
                return;
            }
            let h = node.to_handle();
            *slot = Some(main.spawn(move |mut cx| async move {
                let d = cx.drain(&h).await;
                cx.write(|w| w.remove_node(&d)).await?;
                Ok(h.name().to_owned())
            }));
        }
    };

    let (c, p, x) = main
        .run({
            let events = events.clone();
            move |bql| {
                bql.write(|w| {
                    let c = w.add_node("c", Probe::new(MemoryDriver::new(4096), &events), &[])?;
                    let p = w.add_node(
                        "p",
                        Probe::new(PassthroughFilter::new(), &events).on_drained_end(on_p_end),
                        &[(ChildRole::Filtered, &c)],
                    )?;
                    let x = w.add_node(
                        "x",
                        Probe::new(Overlay::new(), &events).on_drained_begin(on_x_begin),
                        &[(ChildRole::Backing, &c)],
                    )?;
                    Ok::<_, Error>((c, p, x))
                })
            }
        })
        .unwrap();

    // Draining c drains its parents p and x: x schedules its own deletion
    // at begin, p schedules the detach at end.
    main.run({
        let c = c.clone();
        move |bql| drop(bql.drain(&c))
    });
    let detach = detach_task
        .lock()
        .unwrap()
        .take()
        .expect("p's drained_end ran");
    let delete = delete_task
        .lock()
        .unwrap()
        .take()
        .expect("x's drained_begin ran");
    assert_eq!(join(detach, "the detach task").unwrap(), "c");
    assert_eq!(join(delete, "the delete task").unwrap(), "x");

    main.run(move |bql| {
        assert!(child_names(p.gs(bql)).is_empty());
        assert!(parent_names(c.gs(bql)).is_empty());
        assert!(!x.gs(bql).is_in_graph());
        assert!(
            child_names(x.gs(bql)).is_empty(),
            "a removed node kept its edges"
        );
        let names: Vec<_> = bql.graph().nodes().map(|n| n.name().to_owned()).collect();
        assert_eq!(names, ["c", "p"]);
        for h in [&c, &p] {
            assert_eq!(count(bql, h), 0);
        }
        assert_consistent(bql.graph());
        let problems = graph_problems(bql.graph());
        assert!(problems.is_empty());
    });
    main.shutdown();
}

/// Checks edge symmetry around `node` and its neighbours, as far as a
/// callback (with only a `GsRef`) can see.
fn local_problems(node: blockgraph::CallbackRef<'_>) -> Vec<String> {
    use blockgraph::ParentRef;
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![node];
    while let Some(n) = todo.pop() {
        if !seen.insert(n.name()) {
            continue;
        }
        if !n.is_in_graph() {
            problems.push(format!("reached '{}', which is not in the graph", n.name()));
        }
        for e in n.children() {
            let back = e
                .node
                .parents()
                .filter(|p| matches!(p, ParentRef::Node { node: q, role } if q.name() == n.name() && *role == e.role))
                .count();
            if back != 1 {
                problems.push(format!(
                    "'{}' -> '{}' recorded {back} times",
                    n.name(),
                    e.node.name()
                ));
            }
            todo.push(e.node);
        }
        for p in n.parents() {
            if let ParentRef::Node { node: q, role } = p {
                let fwd = q
                    .children()
                    .filter(|e| e.role == role && e.node.name() == n.name())
                    .count();
                if fwd != 1 {
                    problems.push(format!(
                        "'{}' <- '{}' recorded {fwd} times",
                        n.name(),
                        q.name()
                    ));
                }
                todo.push(q);
            }
        }
    }
    problems
}

/// Lets a boxed driver be wrapped by a generic probe.
struct BoxedDriver(Box<dyn blockgraph::driver::BlockDriver>);

impl blockgraph::driver::BlockDriver for BoxedDriver {
    fn format_name(&self) -> &'static str {
        self.0.format_name()
    }
    fn child_permissions(
        &self,
        role: ChildRole,
        users: blockgraph::Permissions,
    ) -> blockgraph::Permissions {
        self.0.child_permissions(role, users)
    }
    fn request_alignment(&self, node: blockgraph::RequestRef<'_>) -> u32 {
        self.0.request_alignment(node)
    }
    fn length<'a>(
        &'a self,
        node: blockgraph::RequestRef<'a>,
    ) -> blockgraph::driver::IoFuture<'a, u64> {
        self.0.length(node)
    }
    fn read<'a>(
        &'a self,
        node: blockgraph::RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        self.0.read(node, offset, buf)
    }
    fn write<'a>(
        &'a self,
        node: blockgraph::RequestRef<'a>,
        offset: u64,
        buf: &'a [u8],
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        self.0.write(node, offset, buf)
    }
}
