// Rule 2: calling a main-loop-only operation with only an `IoRef`.
//
// Violation: I/O code turns the `IoRef` it got under its read guard into a
// `NodeHandle` (`to_handle()`, QEMU's `bdrv_ref()`: global-state code that
// decides node lifetime).
// Expected: error[E0277]: this is a main-loop-only operation, and an `IoRef`
// only proves that the graph is read-locked (the `MainLoopProof`
// `on_unimplemented` message: `ReadLocked` is not `GlobalState`).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let again = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let node = disk.io(&guard);
            node.to_handle()
        })
        .join();
    assert_eq!(again.name(), "disk");
    drop(io);
    main.shutdown();
}
