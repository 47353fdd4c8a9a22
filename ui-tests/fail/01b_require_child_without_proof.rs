// Rule 1 for the driver kit's `require_child`: a node's children are read
// under a proof (any of them), never from a bare handle.
//
// Violation: main-loop code asks a `NodeHandle` (a name that keeps the node
// alive, no proof that the graph holds still) for its child.
// Expected: error[E0308]: mismatched types — `require_child` takes a
// `NodeRef` (a `GsRef`, `CallbackRef`, `IoRef` or `RequestRef`), not a
// `NodeHandle`.
use blockgraph::{driver::require_child, drivers::{MemoryDriver, PassthroughFilter}, ChildRole, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let top = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_node("top", PassthroughFilter::new(), &[(ChildRole::Filtered, &disk)])
            })
            .unwrap();
        let disk = require_child(top, ChildRole::Filtered).unwrap();
        println!("{}", disk.name());
    });
    main.shutdown();
}
