// Rule 5: keeping a `GsRef` read inside a write section alive across the
// next mutation of that section.
//
// Violation: a `GsRef` from `GraphWriter::node` is used after
// `insert_filter` changed the graph.
// Expected: error[E0502]: cannot borrow `*w` as mutable because it is also
// borrowed as immutable: `w.node()` borrows `&GraphWriter`, every mutation
// needs `&mut GraphWriter`.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let drained = bql.drain(&disk);
        bql.write(|w| {
            let node = w.node("disk").unwrap();
            w.insert_filter(&drained, "filter0", PassthroughFilter::new())
                .unwrap();
            assert_eq!(node.parents().count(), 1);
        });
    });
    main.shutdown();
}
