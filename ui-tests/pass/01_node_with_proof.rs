// Rule 1, the right way: a `NodeHandle` only names a node; its children and
// parents are reached through a proof: `handle.gs(bql)` (a `GsRef`) on the
// main loop, `handle.io(&guard)` (an `IoRef`) under a read guard.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, ChildRole, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, filter) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let filter = w.add_node(
                    "filter0",
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &disk)],
                )?;
                Ok::<_, blockgraph::Error>((disk, filter))
            })
        })
        .unwrap();

    let children = main.run(move |bql| {
        filter
            .gs(bql)
            .children()
            .map(|c| (c.role, c.node.name().to_owned()))
            .collect::<Vec<_>>()
    });
    assert_eq!(children, [(ChildRole::Filtered, "disk".to_owned())]);

    let parents = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let parents = disk.io(&guard).parents().count();
            parents
        })
        .join();
    assert_eq!(parents, 1);

    drop(io);
    main.shutdown();
}
