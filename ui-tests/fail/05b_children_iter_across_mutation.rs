// Rule 5: keeping an iterator over a node's children alive across a graph
// mutation.
//
// Violation: main-loop code iterates over a node's children and detaches one
// of them in the loop body (the edge list would change under the iterator).
// Expected: error[E0502]: cannot borrow `*bql` as mutable because it is also
// borrowed as immutable: the iterator borrows `&Bql` for as long as it runs.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, ChildRole, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let filter = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_node(
                    "filter0",
                    PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &disk)],
                )
            })
            .unwrap();
        let drained = bql.drain(&filter);
        for child in filter.gs(bql).children() {
            bql.write(|w| w.detach_child(&drained, child.role)).unwrap();
        }
    });
    main.shutdown();
}
