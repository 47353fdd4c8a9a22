// Rule 5, the right way: copy out what you need from a `GsRef` (or collect
// an iterator), let it go, mutate, then take a fresh `GsRef`. Inside a write
// section, read again through the writer after each mutation.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let parents_after = main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let parents_before = disk.gs(bql).parents().count();
        assert_eq!(parents_before, 0);

        let drained = bql.drain(&disk);
        bql.write(|w| {
            w.insert_filter(&drained, "filter0", PassthroughFilter::new())
                .unwrap();
            // A fresh `GsRef` from the writer sees the new edge.
            assert_eq!(w.node("disk").unwrap().parents().count(), 1);
        });
        drop(drained);

        let names: Vec<String> = bql.graph().nodes().map(|n| n.name().to_owned()).collect();
        assert_eq!(names, ["disk", "filter0"]);
        disk.gs(bql).parents().count()
    });
    assert_eq!(parents_after, 1);
    main.shutdown();
}
