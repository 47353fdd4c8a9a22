// Rule 4, the right way: drain the node whose users a mutation disturbs,
// then change the graph inside a write section with the `Drained` proof.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, BackendOptions, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let root = main.run(|bql| {
        let disk = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>(disk)
            })
            .unwrap();
        let drained = bql.drain(&disk);
        bql.write(|w| w.insert_filter(&drained, "filter0", PassthroughFilter::new()))
            .unwrap();
        drop(drained);
        let backend = bql.graph().backends().next().unwrap();
        backend.root().unwrap().name().to_owned()
    });
    assert_eq!(root, "filter0");
    main.shutdown();
}
