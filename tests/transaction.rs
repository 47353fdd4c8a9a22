//! Several graph changes as one transaction (`GraphWriter::transaction`),
//! `drain_all`, and the structured queries.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockgraph::driver::{BlockDriver, IoFuture};
use blockgraph::drivers::{MemoryDriver, PassthroughFilter};
use blockgraph::{BackendOptions, CallbackRef, Error, MainLoop, Permissions, RequestRef};

#[test]
fn a_failing_second_change_undoes_the_first() {
    let _w = common::watchdog("tx_rollback", Duration::from_secs(30));
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let (a, b) = bql
            .write(|w| {
                let a = w.add_node("a", MemoryDriver::new(4096), &[])?;
                let b = w.add_node("b", MemoryDriver::new(4096), &[])?;
                w.add_backend("va", &a, BackendOptions::default())?;
                w.add_backend("vb", &b, BackendOptions::default())?;
                Ok::<_, Error>((a, b))
            })
            .unwrap();
        let (da, db) = (bql.drain(&a), bql.drain(&b));
        let before = common::snapshot(bql.graph());

        // Second change refused (duplicate name): the first is undone.
        let err = bql
            .write(|w| {
                w.transaction(|w| {
                    w.insert_filter(&da, "f", PassthroughFilter::new())?;
                    w.insert_filter(&db, "f", PassthroughFilter::new())?;
                    Ok(())
                })
            })
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateName(_)), "{err}");
        assert_eq!(common::snapshot(bql.graph()), before);

        // Refused by permissions: a reader's read-only switch and a filter
        // are undone when a writer is added to the read-only node.
        let err = bql
            .write(|w| {
                w.transaction(|w| {
                    w.insert_filter(&da, "fa", PassthroughFilter::new())?;
                    w.add_node("c", MemoryDriver::new(512), &[])?;
                    w.add_backend(
                        "extra",
                        &b,
                        BackendOptions::with_perms(Permissions::SHARED_READER),
                    )?;
                    // b has a writer (vb): a conflict with itself is fine,
                    // but another exclusive writer is not.
                    w.add_backend("second", &b, BackendOptions::default())?;
                    Ok(())
                })
            })
            .unwrap_err();
        assert!(matches!(err, Error::PermissionConflict { .. }), "{err}");
        assert_eq!(common::snapshot(bql.graph()), before);
        assert!(bql.node("c").is_none() && bql.node("fa").is_none());

        // An error the closure swallows still rolls everything back.
        let err = bql
            .write(|w| {
                w.transaction(|w| {
                    w.insert_filter(&da, "fa", PassthroughFilter::new())?;
                    let _ = w.insert_filter(&db, "fa", PassthroughFilter::new());
                    // Refused: the group already failed.
                    assert!(w.add_node("d", MemoryDriver::new(512), &[]).is_err());
                    Ok(())
                })
            })
            .unwrap_err();
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert_eq!(common::snapshot(bql.graph()), before);

        // A panic inside rolls back too.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bql.write(|w| {
                w.transaction(|w| -> blockgraph::Result<()> {
                    w.insert_filter(&da, "fa", PassthroughFilter::new())?;
                    panic!("in the middle");
                })
            })
        }));
        assert!(panicked.is_err());
        assert_eq!(common::snapshot(bql.graph()), before);

        // Both succeed: both are there, one mutation each, and a node added
        // in the group can be used by a later change of the same group.
        bql.write(|w| {
            w.transaction(|w| {
                let fa = w.insert_filter(&da, "fa", PassthroughFilter::new())?;
                w.insert_filter(&db, "fb", PassthroughFilter::new())?;
                w.add_node(
                    "above-fa",
                    PassthroughFilter::new(),
                    &[(blockgraph::ChildRole::Filtered, &fa)],
                )?;
                Ok(())
            })
        })
        .unwrap();
        assert!(bql.node("fa").is_some() && bql.node("fb").is_some());
        common::assert_consistent(bql.graph());
        drop((da, db));
    });
    main.shutdown();
}

#[test]
fn drain_all_quiesces_every_backend_and_nodes_added_meanwhile_start_drained() {
    let _w = common::watchdog("drain_all", Duration::from_secs(30));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (a, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let a = w.add_node("a", MemoryDriver::new(4096), &[])?;
                let blk = w.add_backend("va", &a, BackendOptions::default())?;
                w.add_node("b", MemoryDriver::new(4096), &[])?;
                Ok::<_, Error>((a, blk))
            })
        })
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let a2 = a.clone();
    let blk2 = blk.clone();
    let handle = main.spawn(move |mut task| async move {
        let all = task.drain_all().await;
        task.bql(|bql| {
            for n in bql.query_nodes() {
                assert_eq!(n.drain_count, 1, "{}", n.name);
            }
            assert!(bql.query_backends()[0].quiesced);
        });
        // A request now queues.
        tx.send(()).unwrap();
        let c = task
            .write(|w| w.add_node("c", MemoryDriver::new(512), &[]))
            .await
            .unwrap();
        task.bql(|bql| {
            assert!(
                c.gs(bql).is_drained(),
                "a node added during drain_all starts drained"
            );
        });
        // A Drained for mutations, without waiting.
        let da = all.drained(&a2).unwrap();
        task.write(|w| w.insert_filter(&da, "fa", PassthroughFilter::new()))
            .await
            .unwrap();
        drop(da);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(blk2.completed_requests(), 0, "the request waited");
        drop(all);
    });
    common::recv(&rx, "drain_all begun");
    let b = blk.clone();
    let req = io.spawn(move |mut cx| async move { b.write(&mut cx, 0, &[1; 512]).await });
    common::join(handle, "drain_all task");
    common::join(req, "queued request").unwrap();
    main.run(|bql| {
        assert!(bql.query_nodes().iter().all(|n| n.drain_count == 0));
        let backends = bql.query_backends();
        assert_eq!(backends[0].root.as_deref(), Some("fa"));
        assert_eq!(backends[0].stats.writes, 1);
        assert_eq!(backends[0].stats.write_bytes, 512);
        assert!(backends[0].queued_requests >= 1);
    });
    drop(io);
    main.shutdown();
}

#[test]
fn queries_describe_nodes_and_backends() {
    let _w = common::watchdog("queries", Duration::from_secs(30));
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let blk = main
        .run(|bql| {
            bql.write(|w| {
                let base = w.add_node("base", MemoryDriver::new(8192), &[])?;
                let top = w.add_node(
                    "top",
                    common::Overlay::default(),
                    &[(blockgraph::ChildRole::Backing, &base)],
                )?;
                w.add_backend("vda", &top, BackendOptions::default())
            })
        })
        .unwrap();
    let b = blk.clone();
    common::join(
        io.spawn(move |mut cx| async move {
            let mut buf = [0u8; 512];
            b.read(&mut cx, 0, &mut buf).await?;
            b.write(&mut cx, 512, &buf).await?;
            b.flush(&mut cx).await?;
            assert!(b.read(&mut cx, 1 << 20, &mut buf).await.is_err());
            Ok::<_, Error>(())
        }),
        "I/O",
    )
    .unwrap();
    main.run(move |bql| {
        let nodes = bql.query_nodes();
        let top = nodes.iter().find(|n| n.name == "top").unwrap();
        assert_eq!(top.backing_chain, ["base"]);
        assert_eq!(top.children[0].role, "backing");
        assert_eq!(top.children[0].node, "base");
        assert_eq!(top.parents, ["backend 'vda'"]);
        assert!(!top.read_only);
        let base = nodes.iter().find(|n| n.name == "base").unwrap();
        assert_eq!(base.parents, ["node 'top' (as backing)"]);
        let b = &bql.query_backends()[0];
        assert_eq!((b.name.as_str(), b.root.as_deref()), ("vda", Some("top")));
        assert_eq!(b.take, "read|write");
        let s = b.stats;
        assert_eq!(
            (
                s.reads,
                s.read_bytes,
                s.writes,
                s.write_bytes,
                s.flushes,
                s.errors
            ),
            (1, 512, 1, 512, 1, 1)
        );
        assert_eq!(blk.stats(), s);
    });
    drop(io);
    main.shutdown();
}

/// With the `serde` feature, query results serialise (for a QMP-like
/// management protocol).
#[cfg(feature = "serde")]
#[test]
fn query_results_serialise_with_the_serde_feature() {
    let main = MainLoop::new().unwrap();
    let (nodes, backends) = main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        bql.write(|w| w.add_backend("vda", &disk, BackendOptions::default()))
            .unwrap();
        (bql.query_nodes(), bql.query_backends())
    });
    let json = serde_json::to_value(&nodes).unwrap();
    assert_eq!(json[0]["name"], "disk");
    assert_eq!(json[0]["parents"][0], "backend 'vda'");
    let json = serde_json::to_value(&backends).unwrap();
    assert_eq!(json[0]["stats"]["reads"], 0);
    main.shutdown();
}

/// A driver that logs its reopen callbacks: `reopen` takes `v=<value>`,
/// refuses `fail`, and arms `panic` for its next `reopen_abort`.
struct Reopens {
    log: Arc<Mutex<Vec<String>>>,
    panic_on_abort: Mutex<bool>,
}

impl Reopens {
    fn note(&self, node: &CallbackRef<'_>, what: String) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what}", node.name()));
    }
}

impl BlockDriver for Reopens {
    fn format_name(&self) -> &'static str {
        "reopens"
    }

    fn reopen(&self, node: CallbackRef<'_>, options: &[(&str, &str)]) -> blockgraph::Result<()> {
        match options {
            [("v", v)] => {
                self.note(&node, format!("reopen {v}"));
                Ok(())
            }
            [("panic", _)] => {
                *self.panic_on_abort.lock().unwrap() = true;
                self.note(&node, "reopen panic".into());
                Ok(())
            }
            _ => Err(Error::InvalidArgument("refused".into())),
        }
    }

    fn reopen_commit(&self, node: CallbackRef<'_>) {
        self.note(&node, "commit".into());
    }

    fn reopen_abort(&self, node: CallbackRef<'_>) {
        self.note(&node, "abort".into());
        if std::mem::take(&mut *self.panic_on_abort.lock().unwrap()) {
            panic!("reopen_abort panics (expected by this test)");
        }
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async { Ok(0) })
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        _buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn write<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        _buf: &'a [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Every `reopen` that succeeded gets exactly one `reopen_commit` when its
/// transaction commits, or one `reopen_abort` (newest first) when it rolls
/// back, whatever step failed; a panicking `reopen_abort` does not keep
/// the others from running, and the panic reaches the caller after the
/// rollback.
#[test]
fn each_successful_reopen_is_committed_or_aborted_once() {
    let _w = common::watchdog("tx_reopen_protocol", Duration::from_secs(30));
    let log = Arc::new(Mutex::new(Vec::new()));
    let take = || std::mem::take(&mut *log.lock().unwrap());
    let main = MainLoop::new().unwrap();
    let node = |name: &'static str| {
        let log = log.clone();
        main.run(move |bql| {
            bql.write(|w| {
                let driver = Reopens {
                    log,
                    panic_on_abort: Mutex::new(false),
                };
                w.add_node(name, driver, &[])
            })
        })
        .unwrap()
    };
    let (a, b) = (node("a"), node("b"));

    // A later reopen is refused: the two before it are aborted, newest first.
    let (ha, hb) = (a.clone(), b.clone());
    main.run(move |bql| {
        let (da, db) = (bql.drain(&ha), bql.drain(&hb));
        bql.write(|w| {
            w.transaction(|w| {
                w.reopen(&da, &[("v", "1")])?;
                w.reopen(&db, &[("v", "2")])?;
                w.reopen(&da, &[("fail", "")])
            })
        })
    })
    .unwrap_err();
    assert_eq!(take(), ["a reopen 1", "b reopen 2", "b abort", "a abort"]);

    // A later graph change fails: aborted too.
    let ha = a.clone();
    main.run(move |bql| {
        let da = bql.drain(&ha);
        bql.write(|w| {
            w.transaction(|w| {
                w.reopen(&da, &[("v", "3")])?;
                w.add_node("b", MemoryDriver::new(512), &[]).map(drop)
            })
        })
    })
    .unwrap_err();
    assert_eq!(take(), ["a reopen 3", "a abort"]);

    // Committed: one commit each, in order.
    let (ha, hb) = (a.clone(), b.clone());
    main.run(move |bql| {
        let (da, db) = (bql.drain(&ha), bql.drain(&hb));
        bql.write(|w| {
            w.transaction(|w| {
                w.reopen(&da, &[("v", "4")])?;
                w.reopen(&db, &[("v", "5")])
            })
        })
    })
    .unwrap();
    assert_eq!(take(), ["a reopen 4", "b reopen 5", "a commit", "b commit"]);
    // A single reopen outside a transaction is committed at once.
    let ha = a.clone();
    main.run(move |bql| {
        let da = bql.drain(&ha);
        bql.write(|w| w.reopen(&da, &[("v", "6")]))
    })
    .unwrap();
    assert_eq!(take(), ["a reopen 6", "a commit"]);

    // A panicking abort: the other abort still runs, then the panic goes on.
    let (ha, hb) = (a.clone(), b.clone());
    let panicked = main.run(move |bql| {
        let (da, db) = (bql.drain(&ha), bql.drain(&hb));
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = bql.write(|w| {
                w.transaction(|w| {
                    w.reopen(&da, &[("v", "7")])?;
                    w.reopen(&db, &[("panic", "")])?;
                    w.reopen(&da, &[("fail", "")])
                })
            });
        }))
        .is_err()
    });
    assert!(panicked, "the abort's panic did not reach the caller");
    assert_eq!(
        take(),
        ["a reopen 7", "b reopen panic", "b abort", "a abort"]
    );
    // The graph is usable afterwards.
    let ha = a.clone();
    main.run(move |bql| {
        let da = bql.drain(&ha);
        bql.write(|w| w.reopen(&da, &[("v", "8")]))
    })
    .unwrap();
    assert_eq!(take(), ["a reopen 8", "a commit"]);
    main.shutdown();
}
