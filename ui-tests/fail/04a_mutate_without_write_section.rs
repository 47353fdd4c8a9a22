// Rule 4: mutating the graph without a write section.
//
// Violation: main-loop code has drained the node (correctly) but inserts a
// filter straight through the `Bql`, without `bql.write(|w| ...)`.
// Expected: error[E0599]: no method named `insert_filter` found for mutable
// reference `&mut Bql`: graph mutations exist only on `GraphWriter`, the
// write-section proof.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let drained = bql.drain(&disk);
        bql.insert_filter(&drained, "filter0", PassthroughFilter::new())
            .unwrap();
    });
    main.shutdown();
}
