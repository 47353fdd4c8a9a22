// Rule 4: reopening a node (read-only) without it drained.
//
// Violation: inside a write section, a node that was never drained is
// switched to read-only: the plain `NodeHandle` is passed where the
// drained section belongs.
// Expected: error[E0308]: mismatched types: expected `&Drained<'_>`, found
// `&NodeHandle`: a reopen disturbs the node's users and takes its
// drained-section proof (or one lent by `DrainedAll::drained`).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let _ = bql.write(|w| w.set_read_only(&disk, true));
    });
    main.shutdown();
}
