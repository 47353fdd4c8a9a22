//! A tour of blockgraph's three proofs, step by step.
//!
//! Run it with `cargo run --example tour`. Each step prints what it shows;
//! the comments point at the misuse the compiler would reject (see
//! `ui-tests/fail/` for each of them compiled and failing).

use blockgraph::drivers::{MemoryDriver, PassthroughFilter};
use blockgraph::{BackendOptions, ChildRole, MainLoop, Result};

fn main() -> Result<()> {
    // The main loop owns the graph. Code that changes the graph runs there,
    // with the `Bql` (QEMU's Big QEMU Lock) lent to a synchronous closure.
    let main = MainLoop::new()?;
    let io = main.new_io_thread("io0")?;

    println!("1. GsRef: looking at the graph from the main loop");
    let (disk, blk) = main.run(|bql| {
        // Graph writes happen inside a write section: `GraphWriter`.
        let (disk, blk) = bql.write(|w| {
            let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
            let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
            Ok::<_, blockgraph::Error>((disk, blk))
        })?;
        // A `NodeHandle` is only a name that keeps the node alive. To look
        // inside, borrow a proof: `gs(&bql)` gives a `GsRef`.
        let gs = disk.gs(bql);
        println!(
            "   node '{}' ({}), {} user(s), drained by {} section(s)",
            gs.name(),
            gs.driver_name(),
            gs.parents().len(),
            gs.drain_count()
        );
        // `gs` borrows `bql`: calling `bql.write(..)` here while `gs` is
        // still used afterwards would not compile (ui-tests/fail/05).
        Ok::<_, blockgraph::Error>((disk, blk))
    })?;

    println!("2. IoRef: I/O under the graph read lock, on an I/O thread");
    let d = disk.clone();
    let b = blk.clone();
    let seen = io
        .spawn(move |mut cx| async move {
            // A backend request takes the read lock itself, once, and passes
            // the proof down the driver stack.
            b.write(&mut cx, 0, b"hello, graph").await?;
            // Or take the lock explicitly and look at nodes with `IoRef`s.
            let guard = cx.read().await;
            let node = d.io(&guard);
            let mut buf = [0u8; 12];
            node.read(0, &mut buf).await?;
            // `cx.read()` again here would not compile: one read lock per
            // task (ui-tests/fail/11). Nor could this task drain the graph
            // (ui-tests/fail/09): that needs the main loop.
            Ok::<_, blockgraph::Error>(String::from_utf8_lossy(&buf).into_owned())
        })
        .join()?;
    println!("   read back through the IoRef: {seen:?}");

    println!("3. Drained: quiesce a node, then change the graph around it");
    let d = disk.clone();
    main.run(move |bql| {
        // Draining stops new requests reaching the node (the backend queues
        // them) and waits for those in flight. It needs `&mut Bql`: no
        // `GsRef` may be alive across it.
        let drained = bql.drain(&d);
        println!(
            "   '{}' drained: {}",
            drained.name(),
            d.gs(bql).is_drained()
        );
        // Mutations that disturb a node's users take its `Drained`.
        bql.write(|w| w.insert_filter(&drained, "filter0", PassthroughFilter::new()))?;
        // `drained` borrows `d`; dropping `d` first would not compile
        // (ui-tests/fail/07). Dropping `drained` ends the section.
        drop(drained);
        let root = bql.graph().backends().next().and_then(|b| b.root());
        println!(
            "   backend now sends requests to '{}'",
            root.map_or("-", |r| r.name())
        );
        Ok::<_, blockgraph::Error>(())
    })?;

    println!("4. The same backend keeps working, through the filter");
    let b = blk.clone();
    let data = io
        .spawn(move |mut cx| async move {
            let mut buf = [0u8; 12];
            b.read(&mut cx, 0, &mut buf).await?;
            Ok::<_, blockgraph::Error>(buf)
        })
        .join()?;
    println!("   {:?}", String::from_utf8_lossy(&data));

    println!("5. Async main-loop code: MainTask yields instead of blocking");
    let d = disk.clone();
    let chain = main
        .spawn(move |mut cx| async move {
            // Swap filter0 for a new filter: insert filter1 above the disk,
            // then take filter0 out. Each step drains what it disturbs.
            let drained = cx.drain(&d).await;
            cx.write(|w| w.insert_filter(&drained, "filter1", PassthroughFilter::new()))
                .await?;
            drop(drained);
            let filter0 = cx.bql(|bql| bql.node("filter0").map(|n| n.to_handle()));
            let filter0 = filter0.expect("filter0 exists");
            let drained = cx.drain(&filter0).await;
            cx.write(|w| w.remove_filter(&drained)).await?;
            drop(drained);
            Ok::<_, blockgraph::Error>(cx.bql(|bql| {
                let root = bql.graph().backends().next().and_then(|b| b.root());
                root.map(|r| {
                    r.backing_chain()
                        .iter()
                        .map(|n| n.name().to_owned())
                        .collect()
                })
                .unwrap_or_else(Vec::new)
            }))
        })
        .join()?;
    println!("   backend -> {}", chain.join(" -> "));
    assert_eq!(chain, ["filter1", "disk"]);
    let roles = main.run(|bql| {
        let f = bql.node("filter1").expect("filter1 exists");
        f.children()
            .map(|c| {
                format!(
                    "{} is filter1's {} child, taking {}",
                    c.node.name(),
                    c.role,
                    c.perms.take
                )
            })
            .collect::<Vec<_>>()
    });
    println!("   {}", roles.join(", "));
    assert!(roles[0].contains(&ChildRole::Filtered.to_string()));

    println!("6. The graph as Graphviz DOT");
    print!("{}", main.run(|bql| bql.graph().to_dot()));

    drop(io);
    main.shutdown();
    Ok(())
}
