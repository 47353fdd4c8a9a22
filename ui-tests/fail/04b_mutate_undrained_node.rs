// Rule 4: mutating the graph without the affected node drained.
//
// Violation: inside a write section, a filter is inserted above a node that
// was never drained (its users could still have requests in flight): the
// plain `NodeHandle` is passed where the drained section belongs.
// Expected: error[E0308]: mismatched types: expected `&Drained<'_>`, found
// `&NodeHandle`: mutations that disturb a node's users take the node's
// drained-section proof.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        bql.write(|w| w.insert_filter(&disk, "filter0", PassthroughFilter::new()))
            .unwrap();
    });
    main.shutdown();
}
