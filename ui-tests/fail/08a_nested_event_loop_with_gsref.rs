// Rule 8: entering the nested event loop while a proof is held.
//
// Violation: main-loop code holds a `GsRef` across `bql.block_on(..)`, the
// synchronous wait (QEMU's `AIO_WAIT_WHILE`).
// Expected: error[E0502]: cannot borrow `*bql` as mutable because it is also
// borrowed as immutable: `block_on` needs the `Bql` exclusively.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let task = io.spawn(|_cx| async { 4096 });
    main.run(move |bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let node = disk.gs(bql);
        let size = bql.block_on(task);
        assert_eq!((node.name(), size), ("disk", 4096));
    });
    drop(io);
    main.shutdown();
}
