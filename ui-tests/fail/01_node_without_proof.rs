// Rule 1: reaching a node's state, children or parents without any proof.
//
// Violation: asking a `NodeHandle` (a refcounted name that proves nothing)
// for the node's children.
// Expected: error[E0599]: no method named `children` found for struct
// `NodeHandle`. A handle only has `name()`, `gs(&bql)`, `io(&guard)`; the
// node is reached through the `GsRef`/`IoRef` those return.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let children = disk.children().count();
    assert_eq!(children, 0);
    main.shutdown();
}
