//! Issue 15: mutations check only what they touch, and still find every
//! conflict and cycle they make, in one corner of a large graph, and roll
//! back exactly (the snapshot and DOT dump byte-identical).

mod common;

use std::time::Duration;

use blockgraph::drivers::{MemoryDriver, NullDriver, PassthroughFilter};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, NodeHandle, Perm, Permissions};
use common::{assert_consistent, snapshot, watchdog};

/// Independent disks (`backend -> null`) to make the graph large.
const DISKS: usize = 2_000;

struct Corner {
    top: NodeHandle,
    mid: NodeHandle,
    bottom: NodeHandle,
    spare: NodeHandle,
}

/// `DISKS` unrelated disks, then in one corner `top -> mid -> bottom`
/// (filters over a memory disk) with a reader on `bottom` that lets others
/// only read, and a spare node.
fn large_graph(main: &MainLoop) -> Corner {
    main.run(|bql| {
        bql.write(|w| {
            for i in 0..DISKS {
                let n = w.add_node(&format!("disk{i}"), NullDriver::new(1 << 20), &[])?;
                w.add_backend(&format!("vd{i}"), &n, BackendOptions::default())?;
            }
            let bottom = w.add_node("bottom", MemoryDriver::new(1 << 16), &[])?;
            let reader = Permissions {
                take: Perm::CONSISTENT_READ,
                share: Perm::CONSISTENT_READ,
            };
            w.add_backend("reader", &bottom, BackendOptions::with_perms(reader))?;
            let mid = w.add_node(
                "mid",
                PassthroughFilter::new(),
                &[(ChildRole::Filtered, &bottom)],
            )?;
            let top = w.add_node(
                "top",
                PassthroughFilter::new(),
                &[(ChildRole::Filtered, &mid)],
            )?;
            let spare = w.add_node("spare", MemoryDriver::new(1 << 16), &[])?;
            Ok::<_, Error>(Corner {
                top,
                mid,
                bottom,
                spare,
            })
        })
    })
    .unwrap()
}

#[test]
fn a_conflict_two_levels_below_the_change_is_found_and_rolled_back_exactly() {
    let _wd = watchdog("scale_conflict", Duration::from_secs(300));
    let main = MainLoop::new().unwrap();
    let corner = large_graph(&main);
    let before = main.run(|bql| (snapshot(bql.graph()), bql.graph().to_dot()));

    // A writer at the top: its permissions propagate through two filters
    // down to `bottom`, whose reader does not share writes.
    let top = corner.top.clone();
    let err = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &top, BackendOptions::default())))
        .unwrap_err();
    match &err {
        Error::PermissionConflict { node, detail } => {
            assert_eq!(node, "bottom", "{err}");
            assert!(detail.contains("write"), "{err}");
        }
        other => panic!("expected a permission conflict, got {other}"),
    }
    let after = main.run(|bql| {
        assert_consistent(bql.graph());
        (snapshot(bql.graph()), bql.graph().to_dot())
    });
    // Everything but the mutation count is the same, byte for byte.
    assert_eq!(before.1, after.1, "DOT dump changed");
    assert_eq!(before.0, after.0, "snapshot changed");

    // Inserting a filter above `mid` (moving `top`'s edge) changes no
    // permission (nobody writes yet) and succeeds.
    let mid = corner.mid.clone();
    main.run(move |bql| {
        let drained = bql.drain(&mid);
        bql.write(|w| w.insert_filter(&drained, "between", PassthroughFilter::new()))
            .map(|_| ())
    })
    .unwrap();
    main.shutdown();
}

#[test]
fn a_cycle_deep_in_a_chain_is_found_and_rolled_back_exactly() {
    let _wd = watchdog("scale_cycle", Duration::from_secs(300));
    let main = MainLoop::new().unwrap();
    let corner = large_graph(&main);
    let before = main.run(|bql| bql.graph().to_dot());

    // `bottom` backed by `top` closes a cycle bottom -> top -> mid -> bottom.
    let (bottom, top) = (corner.bottom.clone(), corner.top.clone());
    let err = main
        .run(move |bql| {
            let drained = bql.drain(&bottom);
            bql.write(|w| w.set_backing(&drained, Some(&top)))
        })
        .unwrap_err();
    assert!(matches!(err, Error::Cycle { .. }), "{err}");
    let after = main.run(|bql| {
        assert_consistent(bql.graph());
        bql.graph().to_dot()
    });
    assert_eq!(before, after, "DOT dump changed");

    // The graph still takes the same edge the other way round.
    let (spare, bottom) = (corner.spare.clone(), corner.bottom.clone());
    main.run(move |bql| {
        let drained = bql.drain(&bottom);
        bql.write(|w| w.set_backing(&drained, Some(&spare)))
    })
    .unwrap();
    main.shutdown();
}

/// A drain covers everything above the drained node: over a chain of a
/// thousand filters it covers each node once, and `drain_all` over the
/// whole large graph covers every node once.
#[test]
fn drains_of_a_tall_chain_and_of_the_whole_graph_cover_each_node_once() {
    let _wd = watchdog("tall_chain_drain", Duration::from_secs(120));
    const HEIGHT: usize = 1_000;
    let main = MainLoop::new().unwrap();
    let corner = large_graph(&main);
    let (bottom, top) = main
        .run(|bql| {
            bql.write(|w| {
                let bottom = w.add_node("tall0", MemoryDriver::new(1 << 16), &[])?;
                let mut below = bottom.clone();
                for i in 1..HEIGHT {
                    below = w.add_node(
                        &format!("tall{i}"),
                        PassthroughFilter::new(),
                        &[(ChildRole::Filtered, &below)],
                    )?;
                }
                w.add_backend("tallvd", &below, BackendOptions::default())?;
                Ok::<_, Error>((bottom, below))
            })
        })
        .unwrap();
    main.run(move |bql| {
        let drained = bql.drain(&bottom);
        assert_eq!(bottom.gs(bql).drain_count(), 1);
        assert_eq!(
            top.gs(bql).drain_count(),
            1,
            "the top of the chain is covered"
        );
        drop(drained);
        assert_eq!(top.gs(bql).drain_count(), 0, "ending the drain uncovers it");

        let all = bql.drain_all();
        let graph = bql.graph();
        assert_eq!(graph.nodes().len(), DISKS + 4 + HEIGHT);
        assert!(
            graph.nodes().all(|n| n.drain_count() == 1),
            "drain_all covers every node once"
        );
        drop(all);
        assert!(bql.graph().nodes().all(|n| n.drain_count() == 0));
    });
    drop(corner);
    main.shutdown();
}

/// A chain `depth` nodes deep: a memory disk under `depth - 1` pass-through
/// filters named `{prefix}{i}`; returns the bottom and the top.
fn chain(main: &MainLoop, prefix: &'static str, depth: usize) -> (NodeHandle, NodeHandle) {
    main.run(move |bql| {
        bql.write(|w| {
            let bottom = w.add_node(&format!("{prefix}0"), MemoryDriver::new(1 << 16), &[])?;
            let mut top = bottom.clone();
            for i in 1..depth {
                top = w.add_node(
                    &format!("{prefix}{i}"),
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &top)],
                )?;
            }
            Ok::<_, Error>((bottom, top))
        })
    })
    .unwrap()
}

/// The depth rule: a graph exactly `MAX_GRAPH_DEPTH` nodes deep works end
/// to end (requests through every layer on an I/O thread, a drain of the
/// bottom covering the top, the shutdown flush), and every change that
/// would make a path longer (a node on top, a filter in the middle, a
/// child that joins two chains) is refused with `Error::GraphTooDeep` and
/// changes nothing; the same changes are taken where they fit.
#[test]
fn a_graph_at_the_depth_limit_works_and_no_change_makes_it_deeper() {
    use blockgraph::MAX_GRAPH_DEPTH;
    let _wd = watchdog("depth_limit", Duration::from_secs(300));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io").unwrap();
    let (bottom, top) = chain(&main, "deep", MAX_GRAPH_DEPTH);
    let blk = main
        .run({
            let top = top.clone();
            move |bql| bql.write(|w| w.add_backend("vd", &top, BackendOptions::default()))
        })
        .unwrap();

    // Requests through every layer, on an I/O thread.
    let b = blk.clone();
    let read = common::join(
        io.spawn(move |mut cx| async move {
            b.write(&mut cx, 4096, &[0x5a; 4096]).await?;
            b.flush(&mut cx).await?;
            let mut buf = vec![0u8; 8192];
            b.read(&mut cx, 0, &mut buf).await?;
            Ok::<_, Error>(buf)
        }),
        "requests through the deepest chain",
    )
    .unwrap();
    assert!(read[..4096].iter().all(|&b| b == 0) && read[4096..].iter().all(|&b| b == 0x5a));

    let before = main.run(|bql| snapshot(bql.graph()));
    let refused = |what: &str, r: Result<NodeHandle, Error>| match r {
        Err(Error::GraphTooDeep { depth, max, .. }) => {
            assert_eq!(
                (depth, max),
                (MAX_GRAPH_DEPTH + 1, MAX_GRAPH_DEPTH),
                "{what}"
            );
        }
        other => panic!("{what}: expected GraphTooDeep, got {other:?}"),
    };
    // One more node on top.
    let t = top.clone();
    refused(
        "a node on top",
        main.run(move |bql| {
            bql.write(|w| {
                w.add_node(
                    "over",
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &t)],
                )
            })
        }),
    );
    // A filter in the middle (the backend would move onto it).
    let mid = main.run(|bql| bql.node("deep500").unwrap().to_handle());
    refused(
        "a filter in the middle",
        main.run(move |bql| {
            let d = bql.drain(&mid);
            bql.write(|w| w.insert_filter(&d, "between", PassthroughFilter::new()))
        }),
    );
    let t = top.clone();
    let err = main
        .run(move |bql| {
            bql.write(|w| {
                w.add_node(
                    "over",
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &t)],
                )
            })
        })
        .unwrap_err();
    assert!(err.to_string().contains("at most 1024 deep"), "{err}");
    assert_eq!(
        main.run(|bql| snapshot(bql.graph())),
        before,
        "a refusal changed the graph"
    );

    // A node over a short chain takes a second child only if the path
    // through it still fits: the chain as deep as the limit does not.
    let (_, short) = chain(&main, "short", 10);
    let (s, l) = (short.clone(), top.clone());
    main.run(move |bql| {
        bql.write(|w| {
            w.add_node(
                "join-ok",
                PassthroughFilter::new(),
                &[(ChildRole::Filtered, &s)],
            )
        })
    })
    .unwrap();
    let joined = main.run(|bql| bql.node("join-ok").unwrap().to_handle());
    refused(
        "a second child that makes the path too long",
        main.run(move |bql| {
            let d = bql.drain(&joined);
            bql.write(|w| w.attach_child(&d, ChildRole::Data, &l))
                .map(|()| l.clone())
        }),
    );

    // A drain of the bottom still covers the top.
    let (b, t) = (bottom.clone(), top.clone());
    main.run(move |bql| {
        let drained = bql.drain(&b);
        assert_eq!(t.gs(bql).drain_count(), 1);
        drop(drained);
    });
    drop(io);
    main.shutdown();
}
