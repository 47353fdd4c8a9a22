// Rule 14: calling async I/O from synchronous code without going through the
// main-loop entry point (`Bql::block_on`, the one nested event loop).
//
// Violation: a synchronous main-loop closure drives the disk's I/O itself,
// on the `GsRef` it has, with an executor of its own.
// Expected: error[E0277]: I/O needs an `IoRef`: synchronous main-loop code
// holds no read lock (and can get no `IoTask`); it submits I/O to an I/O
// thread and waits with `bql.block_on(..)`, which needs the `Bql`
// exclusively (see ui-tests/pass/14_sync_code_uses_block_on.rs).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let len = main.run(|bql| {
        bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let disk = bql.node("disk").unwrap();
        futures::executor::block_on(disk.length())
    });
    assert_eq!(len.unwrap(), 4096);
    main.shutdown();
}
