//! Issue 7's classes 1, 2, 5 and 6, attacked as a hostile user would with
//! safe code and the public API: two graphs in one process, driver
//! callbacks that reach back into the graph through a thread-local, requests
//! that enter the graph directly at a node, and a driver that panics in
//! every callback. Each test asserts the error or panic message and that the
//! graph is unchanged and usable afterwards; each has a watchdog.

mod common;

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use blockgraph::drivers::{MemoryDriver, PassthroughFilter};
use blockgraph::{
    driver::{BlockDriver, BlockStatus, IoFuture},
    BackendOptions, CallbackRef, ChildRole, Drained, Error, MainLoop, NodeHandle, Permissions,
    RequestRef, Result,
};
use common::{assert_consistent, join, recv, snapshot, wait_until, watchdog, Gate};

const BUDGET: Duration = Duration::from_secs(120);

/// The message of a caught panic.
fn message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "<non-string panic>".to_owned()
    }
}

/// Runs `f`, expecting it to panic, and returns the panic's message.
fn panics(f: impl FnOnce()) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => panic!("expected a panic"),
        Err(p) => message(p),
    }
}

// ---------------------------------------------------------------------------
// Class 1: two graphs in one process (rule 16)
// ---------------------------------------------------------------------------

#[test]
fn a_backend_driven_from_another_graphs_task_is_refused_before_anything_is_touched() {
    let _wd = watchdog("cross_graph_backend", BUDGET);
    let main_a = MainLoop::new().unwrap();
    let main_b = MainLoop::new().unwrap();
    let (gate, control) = Gate::new(1 << 20);
    let gate = Arc::new(gate);
    let blk_a = main_a
        .run({
            let gate = gate.clone();
            move |bql| {
                bql.write(|w| {
                    let n = w.add_node("slow", SharedGate(gate), &[])?;
                    w.add_backend("vda", &n, BackendOptions::default())
                })
            }
        })
        .unwrap();
    let io_b = main_b.new_io_thread("io-b").unwrap();

    let b = blk_a.clone();
    let results = join(
        io_b.spawn(move |mut cx| async move {
            let mut buf = [0u8; 512];
            (
                b.read(&mut cx, 0, &mut buf).await,
                b.write(&mut cx, 0, &buf).await,
                b.flush(&mut cx).await,
                b.length(&mut cx).await.map(|_| ()),
            )
        }),
        "requests from graph B's task",
    );
    for r in [results.0, results.1, results.2, results.3] {
        let e = r.expect_err("another graph's task must be refused");
        assert!(matches!(e, Error::WrongGraph { .. }), "{e}");
        assert!(e.to_string().contains("rule 16"), "{e}");
        assert!(e.to_string().contains("backend 'vda'"), "{e}");
    }
    // Nothing reached graph A: no request at the driver, none in flight, and
    // A can remove the backend at once (it would wait for a reader of B).
    assert_eq!(gate.requests.load(Ordering::SeqCst), 0);
    assert_eq!(blk_a.in_flight(), 0);
    let b = blk_a.clone();
    main_a
        .run(move |bql| bql.write(|w| w.remove_backend(&b)))
        .unwrap();
    drop(control);
    drop(io_b);
    main_a.shutdown();
    main_b.shutdown();
}

#[test]
fn handles_and_proofs_of_another_graph_are_refused_with_the_rule() {
    let _wd = watchdog("cross_graph_handles", BUDGET);
    let main_a = MainLoop::new().unwrap();
    let main_b = MainLoop::new().unwrap();
    let (disk_b, blk_b) = main_b
        .run(|bql| {
            bql.write(|w| {
                let n = w.add_node("disk-b", MemoryDriver::new(4096), &[])?;
                let b = w.add_backend("vdb", &n, BackendOptions::default())?;
                Ok::<_, Error>((n, b))
            })
        })
        .unwrap();
    let disk_a = main_a
        .run(|bql| bql.write(|w| w.add_node("disk-a", MemoryDriver::new(4096), &[])))
        .unwrap();

    // Under graph A's read guard, graph B's node.
    let io_a = main_a.new_io_thread("io-a").unwrap();
    let d = disk_b.clone();
    let (try_io, io_panic) = join(
        io_a.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let try_io = d.try_io(&guard).map(|_| ()).unwrap_err().to_string();
            let io_panic = catch_unwind(AssertUnwindSafe(|| {
                let _ = d.io(&guard);
            }))
            .map_err(message)
            .unwrap_err();
            (try_io, io_panic)
        }),
        "graph A's task with graph B's node",
    );
    assert!(
        try_io.contains("node 'disk-b'") && try_io.contains("rule 16"),
        "{try_io}"
    );
    assert!(io_panic.contains("rule 16"), "{io_panic}");

    // On graph A's main loop: `gs`, `drain` panic; mutations return errors.
    let (d, a, b) = (disk_b.clone(), disk_a.clone(), blk_b.clone());
    let (gs, drain, attach, add_backend, remove_backend) = main_a.run(move |bql| {
        let gs = panics(|| {
            let _ = d.gs(bql).name();
        });
        let drain = panics(|| drop(bql.drain(&d)));
        let drained = bql.drain(&a);
        let attach = bql
            .write(|w| w.attach_child(&drained, ChildRole::File, &d))
            .unwrap_err()
            .to_string();
        drop(drained);
        let add_backend = bql
            .write(|w| {
                w.add_backend("x", &d, BackendOptions::default())
                    .map(|_| ())
            })
            .unwrap_err()
            .to_string();
        let remove_backend = bql.write(|w| w.remove_backend(&b)).unwrap_err().to_string();
        (gs, drain, attach, add_backend, remove_backend)
    });
    for m in [&gs, &drain, &attach, &add_backend, &remove_backend] {
        assert!(m.contains("rule 16"), "{m}");
    }
    // Both graphs are intact and usable.
    main_a.run(|bql| assert_consistent(bql.graph()));
    main_b.run(|bql| {
        assert_consistent(bql.graph());
        assert_eq!(bql.graph().backends().count(), 1);
    });
    let io_b = main_b.new_io_thread("io-b").unwrap();
    join(
        io_b.spawn(move |mut cx| async move { blk_b.write(&mut cx, 0, &[5u8; 512]).await }),
        "a request in graph B",
    )
    .unwrap();
    drop((io_a, io_b));
    main_a.shutdown();
    main_b.shutdown();
}

/// A [`Gate`] shared with the test, so it can count requests.
struct SharedGate(Arc<Gate>);

impl BlockDriver for SharedGate {
    fn format_name(&self) -> &'static str {
        "gate"
    }
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        self.0.length(node)
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.0.read(node, offset, buf)
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.0.write(node, offset, buf)
    }
}

// ---------------------------------------------------------------------------
// Class 5: every request that reaches a node is counted by drain (rule 18)
// ---------------------------------------------------------------------------

#[test]
fn a_drain_waits_for_a_request_that_entered_directly_at_the_node_and_refuses_new_ones() {
    let _wd = watchdog("drain_counts_direct_requests", BUDGET);
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (gate, control) = Gate::new(1 << 20);
    let gate = Arc::new(gate);
    let (disk, filter) = main
        .run({
            let gate = gate.clone();
            move |bql| {
                bql.write(|w| {
                    let disk = w.add_node("disk", SharedGate(gate), &[])?;
                    let filter = w.add_node(
                        "filter",
                        PassthroughFilter::new(),
                        &[(ChildRole::Filtered, &disk)],
                    )?;
                    Ok::<_, Error>((disk, filter))
                })
            }
        })
        .unwrap();

    // A job-like request enters at the filter (no backend) and waits in the
    // gate below it.
    let f = filter.clone();
    let first = io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let mut buf = [0u8; 512];
        f.io(&guard).read(0, &mut buf).await
    });
    recv(&control.entered, "the direct request reached the gate");

    // Drain the disk below: it covers the filter above, where the request
    // entered, so it must wait for it.
    let (drained_tx, drained_rx) = mpsc::channel();
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
    let d = disk.clone();
    let section = main.spawn(move |cx| async move {
        let drained = cx.drain(&d).await;
        let _ = drained_tx.send(());
        let _ = end_rx.await;
        drop(drained);
    });
    wait_until("the drain has begun", || {
        let d = disk.clone();
        main.run(move |bql| d.gs(bql).drain_count() == 1)
    });
    assert!(
        drained_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the drain returned while a request that entered at the filter was in flight"
    );
    assert_eq!(
        main.run({
            let f = filter.clone();
            move |bql| f.gs(bql).in_flight()
        }),
        1
    );

    // While the drain waits, a new direct request (at the drained node or at
    // the filter above) is refused at once instead of making it wait longer.
    let (d, f) = (disk.clone(), filter.clone());
    let refused = join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let mut buf = [0u8; 512];
            (
                d.io(&guard).read(0, &mut buf).await,
                f.io(&guard).write(0, &[1u8; 512]).await,
            )
        }),
        "direct requests during the drain's wait",
    );
    for r in [refused.0, refused.1] {
        let e = r.expect_err("a request on a draining node must be refused");
        assert!(matches!(e, Error::Drained { .. }), "{e}");
        assert!(e.to_string().contains("rule 18"), "{e}");
    }

    control.release(1);
    join(first, "the first request").unwrap();
    recv(&drained_rx, "the drain completed after the request");
    assert_eq!(gate.requests.load(Ordering::SeqCst), 1);

    // Drained: still refused, and the node never saw it.
    let d = disk.clone();
    let e = join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            d.io(&guard).length().await
        }),
        "a request on the drained node",
    )
    .unwrap_err();
    assert!(matches!(e, Error::Drained { .. }), "{e}");
    assert_eq!(gate.requests.load(Ordering::SeqCst), 1);

    // After the section ends, direct requests work again.
    let _ = end_tx.send(());
    join(section, "the drain section");
    control.release(1);
    let f = filter.clone();
    join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            f.io(&guard).write(0, &[2u8; 512]).await
        }),
        "a direct request after the drain",
    )
    .unwrap();
    drop(io);
    main.shutdown();
}

/// A driver with a public operation of its own, reached from code holding a
/// read guard through `IoRef::enter_own`.
#[derive(Default)]
struct Counting {
    ops: AtomicU32,
}

impl Counting {
    /// Counts one operation on `node`, which must be this driver's node.
    fn poke<'a>(&'a self, node: blockgraph::IoRef<'a>) -> blockgraph::NodeRequest<'a, String> {
        node.enter_own(self, move |own| {
            self.ops.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(own.name().to_owned()) })
        })
    }
}

impl BlockDriver for Counting {
    fn format_name(&self) -> &'static str {
        "counting"
    }
    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async { Ok(4096) })
    }
    fn read<'a>(&'a self, _: RequestRef<'a>, _: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        buf.fill(0);
        Box::pin(async { Ok(()) })
    }
    fn write<'a>(&'a self, _: RequestRef<'a>, _: u64, _: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn a_drivers_own_operation_reaches_only_its_own_node() {
    let _wd = watchdog("enter_own", BUDGET);
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (a, b) = main
        .run(|bql| {
            bql.write(|w| {
                let a = w.add_node("a", Counting::default(), &[])?;
                let b = w.add_node("b", Counting::default(), &[])?;
                Ok::<_, Error>((a, b))
            })
        })
        .unwrap();
    let (own, other) = join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let a = a.io(&guard);
            let b = b.io(&guard);
            let driver_a = a.driver_as::<Counting>().unwrap();
            (driver_a.poke(a).await, driver_a.poke(b).await)
        }),
        "driver-specific operations",
    );
    assert_eq!(own.unwrap(), "a");
    let e = other.unwrap_err().to_string();
    assert!(e.contains("not the driver of node 'b'"), "{e}");
    drop(io);
    main.shutdown();
}

// ---------------------------------------------------------------------------
// Class 6: a panic in any user callback leaves the graph as it was (rule 20)
// ---------------------------------------------------------------------------

/// Which callback panics.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bomb {
    ChildPermissions,
    Open,
    Close,
    Reopen,
    DrainedBegin,
    DrainedEnd,
    Read,
}

/// A memory disk that panics in one callback while armed.
struct Panicky {
    inner: MemoryDriver,
    bomb: Bomb,
    armed: Arc<AtomicBool>,
}

impl Panicky {
    fn new(bomb: Bomb, armed: &Arc<AtomicBool>) -> Self {
        Panicky {
            inner: MemoryDriver::new(1 << 16),
            bomb,
            armed: armed.clone(),
        }
    }

    fn maybe(&self, here: Bomb) {
        if self.bomb == here && self.armed.load(Ordering::SeqCst) {
            panic!("boom in {here:?}");
        }
    }
}

impl BlockDriver for Panicky {
    fn format_name(&self) -> &'static str {
        "panicky"
    }
    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        self.maybe(Bomb::Open);
        self.inner.open(node)
    }
    fn close(&self, _node: CallbackRef<'_>) {
        self.maybe(Bomb::Close);
    }
    fn reopen(&self, _node: CallbackRef<'_>, _options: &[(&str, &str)]) -> Result<()> {
        self.maybe(Bomb::Reopen);
        Ok(())
    }
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        self.maybe(Bomb::ChildPermissions);
        self.inner.child_permissions(role, users)
    }
    fn drained_begin(&self, _node: CallbackRef<'_>) {
        self.maybe(Bomb::DrainedBegin);
    }
    fn drained_end(&self, _node: CallbackRef<'_>) {
        self.maybe(Bomb::DrainedEnd);
    }
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        self.inner.length(node)
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.maybe(Bomb::Read);
        self.inner.read(node, offset, buf)
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.inner.write(node, offset, buf)
    }
    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        self.inner.block_status(node, offset, len)
    }
}

/// Builds `top (panicky) -> file (memory)` and `spare (memory)` with a
/// backend on `top`.
fn bomb_graph(main: &MainLoop, bomb: Bomb, armed: &Arc<AtomicBool>) -> Vec<NodeHandle> {
    let armed = armed.clone();
    main.run(move |bql| {
        bql.write(|w| {
            let file = w.add_node("file", MemoryDriver::new(1 << 16), &[])?;
            let top = w.add_node(
                "top",
                Panicky::new(bomb, &armed),
                &[(ChildRole::File, &file)],
            )?;
            let spare = w.add_node("spare", MemoryDriver::new(1 << 16), &[])?;
            w.add_backend("vda", &top, BackendOptions::default())?;
            Ok::<_, Error>(vec![top, file, spare])
        })
    })
    .unwrap()
}

/// After a panic: the graph is consistent, unchanged (`before`), a write
/// through the backend completes and a further mutation succeeds.
fn assert_usable(main: &MainLoop, before: &str, nodes: &[NodeHandle]) {
    // Everything but the count of committed mutations (some triggers commit
    // other mutations of their own).
    let structure = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("mutations "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let after = main.run(|bql| {
        assert_consistent(bql.graph());
        snapshot(bql.graph())
    });
    assert_eq!(structure(before), structure(&after), "the graph changed");
    let io = main.new_io_thread("check").unwrap();
    let blk = main.run(|bql| {
        let name = bql.graph().backends().next().unwrap().name().to_owned();
        name
    });
    assert_eq!(blk, "vda");
    let top = nodes[0].clone();
    let spare = nodes[2].clone();
    // A mutation that recomputes permissions and checks cycles everywhere
    // below `top`: no stale cycle or conflict is left behind.
    main.run(move |bql| {
        let drained = bql.drain(&top);
        bql.write(|w| w.set_backing(&drained, Some(&spare)))?;
        bql.write(|w| w.set_backing(&drained, None))
    })
    .unwrap();
    let after = main.run(|bql| snapshot(bql.graph()));
    assert_eq!(
        structure(before),
        structure(&after),
        "set/clear backing left a trace"
    );
    // Requests flow (the backend is not left quiesced).
    let top = nodes[0].clone();
    join(
        io.spawn(move |mut cx| async move {
            let guard = cx.read().await;
            top.io(&guard).write(0, &[9u8; 512]).await
        }),
        "a request after the panic",
    )
    .unwrap();
}

fn bomb_test(bomb: Bomb, trigger: impl FnOnce(&MainLoop, &[NodeHandle]) -> String) {
    let _wd = watchdog("panicking_callback", BUDGET);
    let main = MainLoop::new().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let nodes = bomb_graph(&main, bomb, &armed);
    let before = main.run(|bql| snapshot(bql.graph()));
    armed.store(true, Ordering::SeqCst);
    let msg = trigger(&main, &nodes);
    armed.store(false, Ordering::SeqCst);
    assert!(msg.contains(&format!("boom in {bomb:?}")), "{msg}");
    assert_usable(&main, &before, &nodes);
    main.shutdown();
}

#[test]
fn a_panic_in_child_permissions_rolls_the_mutation_back() {
    bomb_test(Bomb::ChildPermissions, |main, nodes| {
        let (top, spare) = (nodes[0].clone(), nodes[2].clone());
        panics(|| {
            main.run(move |bql| {
                let drained = bql.drain(&top);
                let _ = bql.write(|w| w.set_backing(&drained, Some(&spare)));
            })
        })
    });
}

#[test]
fn a_panic_in_open_rolls_the_mutation_back() {
    bomb_test(Bomb::Open, |main, nodes| {
        let file = nodes[1].clone();
        let armed = Arc::new(AtomicBool::new(true));
        let msg = panics(|| {
            main.run(move |bql| {
                let _ = bql.write(|w| {
                    w.add_node(
                        "newcomer",
                        Panicky::new(Bomb::Open, &armed),
                        &[(ChildRole::File, &file)],
                    )
                });
            })
        });
        // The name is free again.
        main.run(|bql| {
            bql.write(|w| w.add_node("newcomer", MemoryDriver::new(512), &[]))
                .map(|_| ())
        })
        .unwrap();
        let removed = main.run(|bql| {
            let n = bql.graph().node("newcomer").unwrap().to_handle();
            let d = bql.drain(&n);
            bql.write(|w| w.remove_node(&d))
        });
        removed.unwrap();
        msg
    });
}

#[test]
fn a_panic_in_reopen_changes_nothing() {
    bomb_test(Bomb::Reopen, |main, nodes| {
        let top = nodes[0].clone();
        panics(|| {
            main.run(move |bql| {
                let drained = bql.drain(&top);
                let _ = bql.write(|w| w.reopen(&drained, &[("x", "y")]));
            })
        })
    });
}

/// Drains and un-drains `nodes[0]` (the panicking `top`), returning the
/// panic's message, and checks that no section is left behind.
fn drain_and_end(main: &MainLoop, nodes: &[NodeHandle]) -> String {
    let top = nodes[0].clone();
    let msg = panics(|| {
        main.run(move |bql| {
            let drained = bql.drain(&top);
            drop(drained);
        })
    });
    let top = nodes[0].clone();
    assert_eq!(main.run(move |bql| top.gs(bql).drain_count()), 0);
    msg
}

#[test]
fn a_panic_in_drained_begin_ends_the_section() {
    bomb_test(Bomb::DrainedBegin, drain_and_end);
}

#[test]
fn a_panic_in_drained_end_still_ends_the_section() {
    bomb_test(Bomb::DrainedEnd, drain_and_end);
}

#[test]
fn a_panic_in_an_io_callback_fails_that_request_only() {
    bomb_test(Bomb::Read, |main, nodes| {
        let io = main.new_io_thread("bomb").unwrap();
        let top = nodes[0].clone();
        let msg = panics(|| {
            let _ = join(
                io.spawn(move |mut cx| async move {
                    let guard = cx.read().await;
                    let mut buf = [0u8; 512];
                    top.io(&guard).read(0, &mut buf).await
                }),
                "a request whose driver panics",
            );
        });
        // The request's count was released by unwinding: a drain completes.
        let top = nodes[0].clone();
        main.run(move |bql| {
            assert_eq!(top.gs(bql).in_flight(), 0);
            drop(bql.drain(&top));
        });
        msg
    });
}

#[test]
fn a_panic_in_close_leaves_a_consistent_graph_with_the_node_removed() {
    // `close` runs after the removal committed (the driver may already have
    // released what it held), so the node stays removed; every other
    // callback of the same commit still ran and the graph is consistent.
    let _wd = watchdog("panicking_close", BUDGET);
    let main = MainLoop::new().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let node = main
        .run(move |bql| bql.write(|w| w.add_node("doomed", Panicky::new(Bomb::Close, &a), &[])))
        .unwrap();
    let n = node.clone();
    let msg = panics(|| {
        main.run(move |bql| {
            let d = bql.drain(&n);
            let _ = bql.write(|w| w.remove_node(&d));
        })
    });
    assert!(msg.contains("boom in Close"), "{msg}");
    armed.store(false, Ordering::SeqCst);
    main.run(move |bql| {
        assert_consistent(bql.graph());
        assert!(!node.gs(bql).is_in_graph());
        assert_eq!(bql.graph().nodes().count(), 0);
        bql.write(|w| w.add_node("doomed", MemoryDriver::new(512), &[]))
            .unwrap();
    });
    main.shutdown();
}

// ---------------------------------------------------------------------------
// Class 2: callbacks that reach back into the graph (rule 19)
// ---------------------------------------------------------------------------

thread_local! {
    /// A drain section parked by the test on the main-loop thread.
    static PARKED: RefCell<Option<Drained<'static>>> = const { RefCell::new(None) };
}

/// A memory disk whose `child_permissions` ends the parked drain section,
/// whose `drained_end` then walks the whole graph through its `GsRef`.
struct ReachesBack {
    inner: MemoryDriver,
    walked: Arc<AtomicU32>,
}

impl BlockDriver for ReachesBack {
    fn format_name(&self) -> &'static str {
        "reaches-back"
    }
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        // Drops a `Drained` in the middle of the permission recomputation.
        PARKED.with(|p| drop(p.borrow_mut().take()));
        self.inner.child_permissions(role, users)
    }
    fn drained_end(&self, node: CallbackRef<'_>) {
        // Reads the very lists a mutation in progress is editing.
        let mut seen = 0;
        for child in node.children() {
            seen += child.node.parents().count();
            seen += child.node.children().count();
        }
        seen += node.parents().count();
        std::hint::black_box(seen);
        self.walked.fetch_add(1, Ordering::SeqCst);
    }
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        self.inner.length(node)
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.inner.read(node, offset, buf)
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.inner.write(node, offset, buf)
    }
}

#[test]
fn a_drain_ended_from_inside_a_permission_callback_sees_a_consistent_graph() {
    let _wd = watchdog("callback_reaches_back", BUDGET);
    let main = MainLoop::new().unwrap();
    let walked = Arc::new(AtomicU32::new(0));
    let w2 = walked.clone();
    let (top, spare) = main
        .run(move |bql| {
            bql.write(|w| {
                let file = w.add_node("file", MemoryDriver::new(1 << 16), &[])?;
                let reaches_back = || ReachesBack {
                    inner: MemoryDriver::new(1 << 16),
                    walked: w2.clone(),
                };
                let top = w.add_node("top", reaches_back(), &[(ChildRole::File, &file)])?;
                w.add_backend("vda", &top, BackendOptions::default())?;
                let spare = w.add_node("spare", reaches_back(), &[])?;
                Ok::<_, Error>((top, spare))
            })
        })
        .unwrap();
    let spare: &'static NodeHandle = Box::leak(Box::new(spare));
    let walked_during = main.run({
        let walked = walked.clone();
        move |bql| {
            // Park a section on `spare` in a thread-local; `top`'s
            // `child_permissions` drops it during the next mutation's
            // permission recomputation, and `spare`'s `drained_end` then
            // walks the lists that mutation is editing.
            let parked = bql.drain(spare);
            PARKED.with(|p| *p.borrow_mut() = Some(parked));
            let drained = bql.drain(&top);
            bql.write(|w| w.set_backing(&drained, Some(spare))).unwrap();
            let walked_during = walked.load(Ordering::SeqCst);
            assert!(PARKED.with(|p| p.borrow().is_none()));
            // `spare` joined `top`'s section as its new child.
            assert_eq!(spare.gs(bql).drain_count(), 1);
            drop(drained);
            assert_eq!(top.gs(bql).drain_count(), 0);
            assert_eq!(spare.gs(bql).drain_count(), 0);
            assert_consistent(bql.graph());
            assert_eq!(
                top.gs(bql).backing().map(|b| b.name().to_owned()),
                Some("spare".to_owned())
            );
            walked_during
        }
    });
    assert_eq!(walked_during, 1, "drained_end ran inside the mutation");
    // Then `top` and `spare` when the last section ended.
    assert_eq!(walked.load(Ordering::SeqCst), 3);
    main.shutdown();
}

// ---------------------------------------------------------------------------
// Rule 21: a drain inside a write section fails fast
// ---------------------------------------------------------------------------

thread_local! {
    /// A main-loop task's handle, smuggled out of its task by the test.
    static SMUGGLED: RefCell<Option<blockgraph::MainTask>> = const { RefCell::new(None) };
}

#[test]
fn a_drain_started_inside_a_write_section_panics_with_the_rule() {
    let _wd = watchdog("drain_inside_write", BUDGET);
    let main = MainLoop::new().unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    // The types stop `bql.drain` inside `bql.write` (both need `&mut Bql`);
    // only a `MainTask` smuggled through a thread-local gets there.
    join(
        main.spawn(|cx| async move {
            SMUGGLED.with(|s| *s.borrow_mut() = Some(cx));
        }),
        "smuggling a MainTask",
    );
    let d = disk.clone();
    let msg = panics(|| {
        main.run(move |bql| {
            bql.write(|_w| {
                let cx = SMUGGLED.with(|s| s.borrow_mut().take()).unwrap();
                let drained = futures::executor::block_on(cx.drain(&d));
                drop(drained);
            })
        })
    });
    assert!(
        msg.contains("rule 21") && msg.contains("inside a write section"),
        "{msg}"
    );
    // Nothing was left behind: no section, and the graph changes normally.
    let d = disk.clone();
    main.run(move |bql| {
        assert_eq!(d.gs(bql).drain_count(), 0);
        let drained = bql.drain(&d);
        bql.write(|w| w.remove_node(&drained)).unwrap();
    });
    main.shutdown();
}
