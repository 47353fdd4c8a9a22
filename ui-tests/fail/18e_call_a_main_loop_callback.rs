// Rule 18: driver callbacks are called only by the graph, always with their
// own node — the main-loop callbacks too.
//
// Violation: main-loop code tells a node's driver that a drain began,
// without a drain (the driver would stop its work while requests still
// reach it), by calling the callback itself with the `GsRef` it has.
// Expected: error[E0308]: mismatched types — main-loop callbacks take a
// `CallbackRef` (`NodeRef<'_, InCallback>`), which only the graph makes,
// not a `GsRef` (`NodeRef<'_, GlobalState>`).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let gs = disk.gs(bql);
        gs.driver().drained_begin(gs);
    });
    main.shutdown();
}
