//! Behaviour of graph mutations: replacing nodes under every combination
//! of drained sections, all-or-nothing permission checks, cycle rejection,
//! the errors users will hit, and the DOT dump.

mod common;

use std::time::Duration;

use blockgraph::drivers::{MemoryDriver, PassthroughFilter};
use blockgraph::{
    BackendOptions, BlockBackend, Bql, ChildRole, Error, IoThread, MainLoop, NodeHandle, Perm,
    Permissions,
};
use common::{
    assert_consistent, child_names, join, parent_names, snapshot, watchdog, Events, Overlay, Probe,
};

const SIZE: usize = 1 << 16;

fn count(bql: &Bql, h: &NodeHandle) -> u32 {
    h.gs(bql).drain_count()
}

fn memory(bql: &Bql, h: &NodeHandle) -> (Vec<u8>, u64) {
    let gs = h.gs(bql);
    let mem = gs
        .driver_as::<Probe<MemoryDriver>>()
        .map(|p| p.inner())
        .or_else(|| gs.driver_as::<MemoryDriver>())
        .expect("a memory node");
    (mem.contents(), mem.requests())
}

/// Writes `byte` over the first 4 KiB through `blk` and reads it back.
fn write_and_check(io: &IoThread, blk: &BlockBackend, byte: u8) {
    let b = blk.clone();
    let back = join(
        io.spawn(move |mut cx| async move {
            b.write(&mut cx, 0, &[byte; 4096]).await?;
            let mut buf = vec![0u8; 4096];
            b.read(&mut cx, 0, &mut buf).await?;
            Ok::<_, Error>(buf)
        }),
        "I/O through the backend",
    )
    .unwrap();
    assert!(back.iter().all(|&b| b == byte));
}

/// Reads the first 4 KiB through `blk`.
fn read_back(io: &IoThread, blk: &BlockBackend) -> Vec<u8> {
    let b = blk.clone();
    join(
        io.spawn(move |mut cx| async move {
            let mut buf = vec![0u8; 4096];
            b.read(&mut cx, 0, &mut buf).await.map(|_| buf)
        }),
        "a read through the backend",
    )
    .unwrap()
}

// ---------------------------------------------------------------------------
// replace_node
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Sections {
    /// Old and new in separate sections; the old one ends first.
    SeparateOldEndsFirst,
    /// Old and new in separate sections; the new one ends first.
    SeparateNewEndsFirst,
    /// The section on old is nested inside the one on new.
    OldNestedInNew,
    /// The section on new is nested inside the one on old.
    NewNestedInOld,
    /// New is drained by two nested sections.
    NewDrainedTwice,
    /// New already has a user of its own (a backend) when it replaces old.
    NewHasUsers,
}

/// vda -> filter f -> old (memory, 0xAA); vdc (a reader) -> old directly;
/// new (memory, 0xBB) alone or with its own reader vdb. Replacing old by
/// new moves f and vdc to new.
fn replace_under(case: Sections) {
    let _wd = watchdog("replace_under", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let events = Events::new();
    let (old, new, f, vda, vdc) = main
        .run({
            let events = events.clone();
            move |bql| {
                bql.write(|w| {
                    let old = w.add_node(
                        "old",
                        Probe::new(MemoryDriver::from_bytes(vec![0xAA; SIZE]), &events),
                        &[],
                    )?;
                    let new = w.add_node(
                        "new",
                        Probe::new(MemoryDriver::from_bytes(vec![0xBB; SIZE]), &events),
                        &[],
                    )?;
                    let f = w.add_node(
                        "f",
                        Probe::new(PassthroughFilter::new(), &events),
                        &[(ChildRole::Filtered, &old)],
                    )?;
                    let vda = w.add_backend("vda", &f, BackendOptions::default())?;
                    let vdc = w.add_backend(
                        "vdc",
                        &old,
                        BackendOptions::with_perms(Permissions::SHARED_READER),
                    )?;
                    Ok::<_, Error>((old, new, f, vda, vdc))
                })
            }
        })
        .unwrap();
    let vdb = match case {
        Sections::NewHasUsers => {
            let new = new.clone();
            Some(
                main.run(move |bql| {
                    bql.write(|w| {
                        w.add_backend(
                            "vdb",
                            &new,
                            BackendOptions::with_perms(Permissions::SHARED_READER),
                        )
                    })
                })
                .unwrap(),
            )
        }
        _ => None,
    };
    assert!(read_back(&io, &vda).iter().all(|&b| b == 0xAA));
    events.take();

    main.run({
        let (old, new, f, vda, vdc, vdb) = (
            old.clone(),
            new.clone(),
            f.clone(),
            vda.clone(),
            vdc.clone(),
            vdb.clone(),
        );
        move |bql| {
            let replace = |bql: &mut Bql,
                           d_old: &blockgraph::Drained<'_>,
                           d_new: &blockgraph::Drained<'_>| {
                bql.write(|w| w.replace_node(d_old, d_new)).unwrap();
                // Users moved: f and vdc now use new; old has no user left.
                assert!(parent_names(old.gs(bql)).is_empty());
                let mut users = parent_names(new.gs(bql));
                users.sort();
                let mut expected = vec!["backend:vdc".to_owned(), "f:filtered".to_owned()];
                if vdb.is_some() {
                    expected.insert(0, "backend:vdb".to_owned());
                }
                assert_eq!(users, expected);
                assert_eq!(child_names(f.gs(bql)), ["filtered:new"]);
                assert_consistent(bql.graph());
                // Every user of the drained new node is quiesced.
                assert!(new.gs(bql).is_drained());
                assert!(f.gs(bql).is_drained());
                assert!(vda.is_quiesced() && vdc.is_quiesced());
            };
            let counts = |bql: &Bql| (count(bql, &old), count(bql, &new), count(bql, &f));
            // After the replacement, each section covers what it quiesced
            // plus what the new edges brought in: new's section now covers
            // f (a user of new), and old's section covers new (the child
            // f, which it quiesced, now uses). So right after the
            // replacement old=1, new=2, f=2 with one section each.
            match case {
                Sections::SeparateOldEndsFirst => {
                    let d_old = bql.drain(&old);
                    let d_new = bql.drain(&new);
                    replace(bql, &d_old, &d_new);
                    assert_eq!(counts(bql), (1, 2, 2));
                    drop(d_old);
                    assert_eq!(counts(bql), (0, 1, 1));
                    assert!(
                        vda.is_quiesced() && vdc.is_quiesced(),
                        "users of a drained node resumed"
                    );
                    drop(d_new);
                }
                Sections::SeparateNewEndsFirst => {
                    let d_old = bql.drain(&old);
                    let d_new = bql.drain(&new);
                    replace(bql, &d_old, &d_new);
                    assert_eq!(counts(bql), (1, 2, 2));
                    drop(d_new);
                    // old's section still covers the users it quiesced, and
                    // new, which they use now.
                    assert_eq!(counts(bql), (1, 1, 1));
                    assert!(new.gs(bql).is_drained());
                    assert!(vda.is_quiesced() && vdc.is_quiesced());
                    drop(d_old);
                }
                Sections::OldNestedInNew => {
                    let d_new = bql.drain(&new);
                    {
                        let d_old = bql.drain(&old);
                        replace(bql, &d_old, &d_new);
                        assert_eq!(counts(bql), (1, 2, 2));
                    }
                    assert_eq!(counts(bql), (0, 1, 1));
                    assert!(vda.is_quiesced() && vdc.is_quiesced());
                    drop(d_new);
                }
                Sections::NewNestedInOld => {
                    let d_old = bql.drain(&old);
                    {
                        let d_new = bql.drain(&new);
                        replace(bql, &d_old, &d_new);
                        assert_eq!(counts(bql), (1, 2, 2));
                    }
                    assert_eq!(counts(bql), (1, 1, 1));
                    assert!(vda.is_quiesced() && vdc.is_quiesced());
                    drop(d_old);
                }
                Sections::NewDrainedTwice => {
                    let d_new_outer = bql.drain(&new);
                    let d_new = bql.drain(&new);
                    let d_old = bql.drain(&old);
                    replace(bql, &d_old, &d_new);
                    assert_eq!(counts(bql), (1, 3, 3));
                    drop(d_new);
                    drop(d_old);
                    assert_eq!(counts(bql), (0, 1, 1));
                    assert!(vda.is_quiesced() && vdc.is_quiesced());
                    drop(d_new_outer);
                }
                Sections::NewHasUsers => {
                    let d_old = bql.drain(&old);
                    let d_new = bql.drain(&new);
                    assert!(vdb.as_ref().unwrap().is_quiesced());
                    replace(bql, &d_old, &d_new);
                    assert_eq!(counts(bql), (1, 2, 2));
                    drop(d_old);
                    assert_eq!(counts(bql), (0, 1, 1));
                    assert!(vdb.as_ref().unwrap().is_quiesced());
                    drop(d_new);
                    assert!(!vdb.as_ref().unwrap().is_quiesced());
                }
            }
            // Every section has ended: nothing is drained or quiesced.
            assert_eq!(counts(bql), (0, 0, 0));
            for h in [&old, &new, &f] {
                assert!(!h.gs(bql).is_drained(), "{} still drained", h.name());
            }
            assert!(!vda.is_quiesced() && !vdc.is_quiesced());
            assert_consistent(bql.graph());
        }
    });
    // Callbacks: one begin and one end for each node, whatever the nesting.
    let mut got = events.take();
    got.sort();
    assert_eq!(
        got,
        [
            "begin f",
            "begin new",
            "begin old",
            "end f",
            "end new",
            "end old"
        ],
        "{case:?}"
    );

    // I/O goes to new: the write lands there, old is untouched.
    let (_, new_requests) = main.run({
        let new = new.clone();
        move |bql| memory(bql, &new)
    });
    write_and_check(&io, &vda, 0xCC);
    assert!(read_back(&io, &vdc).iter().all(|&b| b == 0xCC));
    let ((old_data, _), (new_data, new_after)) =
        main.run(move |bql| (memory(bql, &old), memory(bql, &new)));
    assert!(
        old_data.iter().all(|&b| b == 0xAA),
        "a write reached the replaced node"
    );
    assert!(new_data[..4096].iter().all(|&b| b == 0xCC));
    assert!(new_data[4096..].iter().all(|&b| b == 0xBB));
    assert_eq!(new_after, new_requests + 3);
    drop(io);
    main.shutdown();
}

#[test]
fn replace_node_old_and_new_in_separate_sections_old_ends_first() {
    replace_under(Sections::SeparateOldEndsFirst);
}

#[test]
fn replace_node_old_and_new_in_separate_sections_new_ends_first() {
    replace_under(Sections::SeparateNewEndsFirst);
}

#[test]
fn replace_node_old_section_nested_in_new_section() {
    replace_under(Sections::OldNestedInNew);
}

#[test]
fn replace_node_new_section_nested_in_old_section() {
    replace_under(Sections::NewNestedInOld);
}

#[test]
fn replace_node_new_drained_twice() {
    replace_under(Sections::NewDrainedTwice);
}

#[test]
fn replace_node_new_already_has_users() {
    replace_under(Sections::NewHasUsers);
}

#[test]
fn replace_node_keeps_stay_at_node_users_and_edges_from_new_to_old() {
    let _wd = watchdog("replace_stay_at_node", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let (old, top) = bql
            .write(|w| {
                let old = w.add_node("old", MemoryDriver::new(SIZE as u64), &[])?;
                w.add_backend("vda", &old, BackendOptions::default())?;
                w.add_backend(
                    "job",
                    &old,
                    BackendOptions {
                        perms: Permissions::SHARED_READER,
                        stay_at_node: true,
                    },
                )?;
                // top is a new user of old that takes over old's users.
                let top = w.add_node("top", Overlay::new(), &[(ChildRole::Backing, &old)])?;
                Ok::<_, Error>((old, top))
            })
            .unwrap();
        let d_old = bql.drain(&old);
        let d_top = bql.drain(&top);
        bql.write(|w| w.replace_node(&d_old, &d_top)).unwrap();
        assert_eq!(parent_names(old.gs(bql)), ["backend:job", "top:backing"]);
        assert_eq!(parent_names(top.gs(bql)), ["backend:vda"]);
        drop(d_top);
        drop(d_old);
        assert_consistent(bql.graph());
    });
    main.shutdown();
}

// ---------------------------------------------------------------------------
// Permissions: all or nothing
// ---------------------------------------------------------------------------

#[test]
fn filter_that_would_make_a_second_exclusive_writer_fails_and_changes_nothing() {
    let _wd = watchdog("perm_conflict", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let events = Events::new();
    // Two writers that share with each other on one node: vda follows the
    // node, vdb (a job's user, say) stays at it.
    let sharing_writer = Permissions {
        take: Perm::CONSISTENT_READ | Perm::WRITE,
        share: Perm::ALL,
    };
    let (disk, vda, vdb) = main
        .run(move |bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(SIZE as u64), &[])?;
                let vda =
                    w.add_backend("vda", &disk, BackendOptions::with_perms(sharing_writer))?;
                let vdb = w.add_backend(
                    "vdb",
                    &disk,
                    BackendOptions {
                        perms: sharing_writer,
                        stay_at_node: true,
                    },
                )?;
                Ok::<_, Error>((disk, vda, vdb))
            })
        })
        .unwrap();

    let (before, after, err) = main.run({
        let (disk, events) = (disk.clone(), events.clone());
        move |bql| {
            let d = bql.drain(&disk);
            let before = snapshot(bql.graph());
            // The filter takes WRITE on disk and shares only reads, but vdb
            // stays on disk and writes: two writers, one exclusive.
            let err = bql
                .write(|w| {
                    w.insert_filter(
                        &d,
                        "f",
                        Probe::new(PassthroughFilter::exclusive_writer(), &events),
                    )
                })
                .unwrap_err();
            let after = snapshot(bql.graph());
            assert!(bql.node("f").is_none());
            drop(d);
            (before, after, err)
        }
    });
    match &err {
        Error::PermissionConflict { node, detail } => {
            assert_eq!(node, "disk");
            assert!(detail.contains("'f'") && detail.contains("vdb"), "{detail}");
            assert!(detail.contains("write"), "{detail}");
        }
        other => panic!("expected a permission conflict, got {other:?}"),
    }
    assert_eq!(before, after, "the failed insertion changed the graph");
    assert!(events.take().is_empty(), "the rejected filter was opened");

    // Nothing left behind: the name is free, I/O works through both users.
    main.run(move |bql| {
        assert_eq!(parent_names(disk.gs(bql)), ["backend:vda", "backend:vdb"]);
        assert_eq!(bql.graph().nodes().count(), 1);
        assert_consistent(bql.graph());
        let d = bql.drain(&disk);
        bql.write(|w| w.insert_filter(&d, "f", PassthroughFilter::new()))
            .unwrap();
    });
    write_and_check(&io, &vda, 1);
    write_and_check(&io, &vdb, 2);
    drop(io);
    main.shutdown();
}

#[test]
fn conflicting_backend_is_rejected_and_changes_nothing() {
    let _wd = watchdog("backend_conflict", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, Error>(disk)
            })
            .unwrap();
        let before = snapshot(bql.graph());
        // A second exclusive writer.
        let err = bql
            .write(|w| w.add_backend("vdb", &disk, BackendOptions::default()))
            .unwrap_err();
        assert!(
            matches!(err, Error::PermissionConflict { ref node, .. } if node == "disk"),
            "{err:?}"
        );
        assert_eq!(before, snapshot(bql.graph()));
        // The name was not taken by the failed attempt.
        bql.write(|w| {
            w.add_backend(
                "vdb",
                &disk,
                BackendOptions::with_perms(Permissions::SHARED_READER),
            )
        })
        .unwrap();
        assert_consistent(bql.graph());
    });
    main.shutdown();
}

// ---------------------------------------------------------------------------
// Cycles
// ---------------------------------------------------------------------------

#[test]
fn append_overlay_always_makes_a_fresh_node_at_the_top() {
    let _wd = watchdog("append_overlay_fresh", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (base, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let base = w.add_node("base", MemoryDriver::new(SIZE as u64), &[])?;
                let blk = w.add_backend("vda", &base, BackendOptions::default())?;
                Ok::<_, Error>((base, blk))
            })
        })
        .unwrap();
    main.run(move |bql| {
        let mut top = base.clone();
        for i in 1..=5 {
            let d = bql.drain(&top);
            let before = snapshot(bql.graph());
            // Reusing a name is refused, not turned into a cycle.
            let err = bql
                .write(|w| w.append_overlay(&d, top.name(), Overlay::new(), &[]))
                .unwrap_err();
            assert!(matches!(err, Error::DuplicateName(_)), "{err:?}");
            assert_eq!(before, snapshot(bql.graph()));
            let o = bql
                .write(|w| w.append_overlay(&d, &format!("o{i}"), Overlay::new(), &[]))
                .unwrap();
            assert!(!o.ptr_eq(&top));
            drop(d);
            let chain: Vec<String> = o
                .gs(bql)
                .backing_chain()
                .iter()
                .map(|n| n.name().to_owned())
                .collect();
            let mut expected: Vec<String> = (1..=i).rev().map(|j| format!("o{j}")).collect();
            expected.push("base".into());
            assert_eq!(chain, expected);
            let root = bql
                .graph()
                .backends()
                .next()
                .unwrap()
                .root()
                .unwrap()
                .name();
            assert_eq!(root, format!("o{i}"));
            assert_consistent(bql.graph());
            top = o;
        }
    });
    write_and_check(&io, &blk, 3);
    drop(io);
    main.shutdown();
}

#[test]
fn append_overlay_whose_extra_child_uses_the_base_is_rejected_as_a_cycle() {
    let _wd = watchdog("append_overlay_cycle", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let (base, user) = bql
            .write(|w| {
                let base = w.add_node("base", MemoryDriver::new(4096), &[])?;
                let user = w.add_node("user", Overlay::new(), &[(ChildRole::Backing, &base)])?;
                Ok::<_, Error>((base, user))
            })
            .unwrap();
        let d = bql.drain(&base);
        let before = snapshot(bql.graph());
        // The overlay would take over `user`'s edge to base while having
        // `user` as its own child: user -> o -> user.
        let err = bql
            .write(|w| w.append_overlay(&d, "o", Overlay::new(), &[(ChildRole::File, &user)]))
            .unwrap_err();
        assert!(matches!(err, Error::Cycle { .. }), "{err:?}");
        assert_eq!(before, snapshot(bql.graph()));
        assert!(bql.node("o").is_none());
        drop(d);
        assert_consistent(bql.graph());
    });
    main.shutdown();
}

#[test]
fn set_backing_and_attach_child_that_would_create_a_cycle_are_rejected() {
    let _wd = watchdog("set_backing_cycle", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (base, mid, top, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let base = w.add_node("base", MemoryDriver::new(SIZE as u64), &[])?;
                let mid = w.add_node("mid", Overlay::new(), &[(ChildRole::Backing, &base)])?;
                let top = w.add_node("top", Overlay::new(), &[(ChildRole::Backing, &mid)])?;
                let blk = w.add_backend("vda", &top, BackendOptions::default())?;
                Ok::<_, Error>((base, mid, top, blk))
            })
        })
        .unwrap();
    main.run(move |bql| {
        let d_base = bql.drain(&base);
        let d_mid = bql.drain(&mid);
        let before = snapshot(bql.graph());
        let attempts: [(&str, Result<(), Error>); 5] = [
            (
                "base backed by top",
                bql.write(|w| w.set_backing(&d_base, Some(&top))),
            ),
            (
                "base backed by itself",
                bql.write(|w| w.set_backing(&d_base, Some(&base))),
            ),
            // Replacing mid's backing with top: the old edge is removed in
            // the same transaction, and must come back.
            (
                "mid backed by top",
                bql.write(|w| w.set_backing(&d_mid, Some(&top))),
            ),
            (
                "base gets top as file",
                bql.write(|w| w.attach_child(&d_base, ChildRole::File, &top)),
            ),
            (
                "mid gets itself as file",
                bql.write(|w| w.attach_child(&d_mid, ChildRole::File, &mid)),
            ),
        ];
        for (what, result) in attempts {
            match result {
                Err(Error::Cycle { .. }) => {}
                other => panic!("{what}: expected a cycle error, got {other:?}"),
            }
        }
        assert_eq!(
            before,
            snapshot(bql.graph()),
            "a rejected cycle changed the graph"
        );
        assert_eq!(
            top.gs(bql)
                .backing_chain()
                .iter()
                .map(|n| n.name())
                .collect::<Vec<_>>(),
            ["top", "mid", "base"]
        );
        drop(d_mid);
        drop(d_base);
        assert_consistent(bql.graph());
    });
    write_and_check(&io, &blk, 4);
    drop(io);
    main.shutdown();
}

// ---------------------------------------------------------------------------
// Errors users will hit
// ---------------------------------------------------------------------------

#[test]
fn names_must_be_valid_and_unique() {
    let _wd = watchdog("names", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, Error>(disk)
            })
            .unwrap();
        let before = snapshot(bql.graph());
        let too_long = format!("a{}", "b".repeat(127));
        for bad in [
            "",
            "1disk",
            "-x",
            "has space",
            "dot/slash",
            "ünï",
            too_long.as_str(),
        ] {
            let err = bql
                .write(|w| w.add_node(bad, MemoryDriver::new(512), &[]))
                .unwrap_err();
            assert!(
                matches!(&err, Error::InvalidName(n) if n == bad),
                "{bad:?}: {err:?}"
            );
            let err = bql
                .write(|w| {
                    w.add_backend(
                        bad,
                        &disk,
                        BackendOptions::with_perms(Permissions::SHARED_READER),
                    )
                })
                .unwrap_err();
            assert!(
                matches!(&err, Error::InvalidName(n) if n == bad),
                "{bad:?}: {err:?}"
            );
        }
        // Node and backend names share one namespace.
        for dup in ["disk", "vda"] {
            let err = bql
                .write(|w| w.add_node(dup, MemoryDriver::new(512), &[]))
                .unwrap_err();
            assert!(
                matches!(&err, Error::DuplicateName(n) if n == dup),
                "{err:?}"
            );
            let err = bql
                .write(|w| {
                    w.add_backend(
                        dup,
                        &disk,
                        BackendOptions::with_perms(Permissions::SHARED_READER),
                    )
                })
                .unwrap_err();
            assert!(
                matches!(&err, Error::DuplicateName(n) if n == dup),
                "{err:?}"
            );
        }
        let d = bql.drain(&disk);
        let err = bql
            .write(|w| w.insert_filter(&d, "vda", PassthroughFilter::new()))
            .unwrap_err();
        assert!(
            matches!(&err, Error::DuplicateName(n) if n == "vda"),
            "{err:?}"
        );
        drop(d);
        assert_eq!(before, snapshot(bql.graph()));
        // The longest valid name, and the characters allowed.
        let longest = format!("a{}", "b".repeat(126));
        bql.write(|w| w.add_node(&longest, MemoryDriver::new(512), &[]))
            .unwrap();
        bql.write(|w| w.add_node("A-b_c.9", MemoryDriver::new(512), &[]))
            .unwrap();
    });
    main.shutdown();
}

#[test]
fn structural_errors_are_clear_and_change_nothing() {
    let _wd = watchdog("structural_errors", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let (disk, f, spare) = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let f = w.add_node(
                    "f",
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &disk)],
                )?;
                w.add_backend("vda", &f, BackendOptions::default())?;
                let spare = w.add_node("spare", MemoryDriver::new(4096), &[])?;
                Ok::<_, Error>((disk, f, spare))
            })
            .unwrap();
        let before = snapshot(bql.graph());

        // A node with users cannot be removed.
        let d = bql.drain(&disk);
        match bql.write(|w| w.remove_node(&d)).unwrap_err() {
            Error::HasParents { node, parents } => {
                assert_eq!(node, "disk");
                assert!(parents.contains("'f'"), "{parents}");
            }
            other => panic!("expected HasParents, got {other:?}"),
        }
        drop(d);
        let d = bql.drain(&f);
        match bql.write(|w| w.remove_node(&d)).unwrap_err() {
            Error::HasParents { node, parents } => {
                assert_eq!(node, "f");
                assert!(parents.contains("vda"), "{parents}");
            }
            other => panic!("expected HasParents, got {other:?}"),
        }
        // Detaching a child the node does not have.
        match bql
            .write(|w| w.detach_child(&d, ChildRole::Backing))
            .unwrap_err()
        {
            Error::NoSuchChild { node, role } => {
                assert_eq!((node.as_str(), role), ("f", ChildRole::Backing));
            }
            other => panic!("expected NoSuchChild, got {other:?}"),
        }
        // A second child in a role that is taken.
        let err = bql
            .write(|w| w.attach_child(&d, ChildRole::Filtered, &spare))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        // remove_filter on something that is not a filter.
        drop(d);
        let d = bql.drain(&spare);
        let err = bql.write(|w| w.remove_filter(&d)).unwrap_err();
        assert!(matches!(err, Error::NoSuchChild { .. }), "{err:?}");
        drop(d);
        assert_eq!(
            before,
            snapshot(bql.graph()),
            "a failed mutation changed the graph"
        );

        // A removed node cannot come back through its old handle.
        let d = bql.drain(&spare);
        bql.write(|w| w.remove_node(&d)).unwrap();
        drop(d);
        assert!(!spare.gs(bql).is_in_graph());
        let err = bql
            .write(|w| w.add_node("user", Overlay::new(), &[(ChildRole::Backing, &spare)]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::NodeRemoved(n) if n == "spare"),
            "{err:?}"
        );
        let d = bql.drain(&spare);
        let err = bql
            .write(|w| w.insert_filter(&d, "g", PassthroughFilter::new()))
            .unwrap_err();
        assert!(
            matches!(&err, Error::NodeRemoved(n) if n == "spare"),
            "{err:?}"
        );
        drop(d);
        assert!(bql.node("user").is_none() && bql.node("g").is_none());
        assert_consistent(bql.graph());
    });
    main.shutdown();
}

#[test]
fn bad_requests_on_a_backend_get_clear_errors() {
    let _wd = watchdog("bad_requests", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let events = Events::new();
    let (disk, rw, ro) = main
        .run({
            let events = events.clone();
            move |bql| {
                bql.write(|w| {
                    let disk = w.add_node(
                        "disk",
                        Probe::new(MemoryDriver::new(8192), &events).with_alignment(512),
                        &[],
                    )?;
                    let rw = w.add_backend("rw", &disk, BackendOptions::default())?;
                    let ro = w.add_backend(
                        "ro",
                        &disk,
                        BackendOptions::with_perms(Permissions::SHARED_READER),
                    )?;
                    Ok::<_, Error>((disk, rw, ro))
                })
            }
        })
        .unwrap();
    let requests_before = main.run({
        let disk = disk.clone();
        move |bql| memory(bql, &disk).1
    });
    let results = join(
        io.spawn(move |mut cx| async move {
            let mut buf = vec![0u8; 1024];
            let mut out = Vec::new();
            out.push(("read past the end", rw.read(&mut cx, 7680, &mut buf).await));
            out.push((
                "read at the end",
                rw.read(&mut cx, 8192, &mut buf[..512]).await,
            ));
            out.push((
                "write past the end",
                rw.write(&mut cx, 8192, &buf[..512]).await,
            ));
            out.push((
                "overflowing offset",
                rw.read(&mut cx, u64::MAX - 511, &mut buf[..512]).await,
            ));
            out.push((
                "zeroes past the end",
                rw.write_zeroes(&mut cx, 4096, 8192).await,
            ));
            out.push((
                "misaligned offset",
                rw.read(&mut cx, 100, &mut buf[..512]).await,
            ));
            out.push(("misaligned length", rw.write(&mut cx, 0, &buf[..100]).await));
            out.push(("write read-only", ro.write(&mut cx, 0, &buf[..512]).await));
            out.push(("zeroes read-only", ro.write_zeroes(&mut cx, 0, 512).await));
            out.push(("discard read-only", ro.discard(&mut cx, 0, 512).await));
            // And requests that are fine still work.
            out.push(("good read", ro.read(&mut cx, 7680, &mut buf[..512]).await));
            out.push(("good write", rw.write(&mut cx, 0, &buf[..512]).await));
            out
        }),
        "the requests",
    );
    for (what, result) in &results {
        match (*what, result) {
            (
                "read past the end",
                Err(Error::OutOfRange {
                    offset: 7680,
                    len: 1024,
                    size: 8192,
                }),
            )
            | (
                "read at the end",
                Err(Error::OutOfRange {
                    offset: 8192,
                    len: 512,
                    size: 8192,
                }),
            )
            | (
                "write past the end",
                Err(Error::OutOfRange {
                    offset: 8192,
                    len: 512,
                    size: 8192,
                }),
            )
            | (
                "overflowing offset",
                Err(Error::OutOfRange {
                    len: 512,
                    size: 8192,
                    ..
                }),
            )
            | (
                "zeroes past the end",
                Err(Error::OutOfRange {
                    offset: 4096,
                    len: 8192,
                    size: 8192,
                }),
            )
            | (
                "misaligned offset",
                Err(Error::Misaligned {
                    offset: 100,
                    alignment: 512,
                    ..
                }),
            )
            | (
                "misaligned length",
                Err(Error::Misaligned {
                    len: 100,
                    alignment: 512,
                    ..
                }),
            )
            | ("good read", Ok(()))
            | ("good write", Ok(())) => {}
            (
                "write read-only" | "zeroes read-only" | "discard read-only",
                Err(Error::ReadOnly(name)),
            ) if name == "ro" => {}
            _ => panic!("{what}: unexpected {result:?}"),
        }
    }
    // Only the two good requests reached the driver.
    let requests_after = main.run(move |bql| memory(bql, &disk).1);
    assert_eq!(requests_after, requests_before + 2);
    drop(io);
    main.shutdown();
}

// ---------------------------------------------------------------------------
// DOT dump
// ---------------------------------------------------------------------------

#[test]
fn dot_dump_shows_names_drivers_roles_and_permissions() {
    let _wd = watchdog("dot", Duration::from_secs(60));
    let main = MainLoop::new().unwrap();
    let dot = main.run(|bql| {
        bql.write(|w| {
            let base = w.add_node("base", MemoryDriver::new(65536), &[])?;
            let top = w.add_node("top", Overlay::new(), &[(ChildRole::Backing, &base)])?;
            let f = w.add_node(
                "thefilter",
                PassthroughFilter::exclusive_writer(),
                &[(ChildRole::Filtered, &top)],
            )?;
            w.add_backend("vda", &f, BackendOptions::default())?;
            Ok::<_, Error>(())
        })
        .unwrap();
        bql.graph().to_dot()
    });
    assert!(dot.starts_with("digraph"), "{dot}");
    for needle in [
        // names
        "\"base\"",
        "\"top\"",
        "\"thefilter\"",
        "vda",
        // drivers
        "memory, 65536 bytes",
        "overlay",
        "filter (exclusive writer)",
        // roles
        "backing",
        "filtered",
        "root",
        // permissions: the backend's, and what the filter takes below
        "takes read|write",
        "shares read|write-unchanged",
        "shares read",
    ] {
        assert!(dot.contains(needle), "DOT dump lacks {needle:?}:\n{dot}");
    }
    // One edge per child, plus the backend's.
    assert_eq!(dot.matches("->").count(), 3, "{dot}");
    main.shutdown();
}
