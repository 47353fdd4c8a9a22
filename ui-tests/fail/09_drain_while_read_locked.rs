// Rule 9: draining while holding the graph read lock (the QEMU 10.0
// deadlock: the drain waits for I/O that waits for the lock).
//
// Violation: an I/O task holds its read guard and asks the main loop to
// drain a node.
// Expected: error[E0499]: cannot borrow `cx` as mutable more than once at a
// time: the `ReadGuard` borrows the task's `IoTask` mutably, and so does
// `run_on_main_loop`, the only way from I/O code to the main loop.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let drained_count = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let length = disk.io(&guard).length().await.unwrap();
            let count = cx
                .run_on_main_loop(move |bql| {
                    let drained = bql.drain(&disk);
                    drained.name().len()
                })
                .await
                .unwrap();
            drop(guard);
            (length, count)
        })
        .join();
    assert_eq!(drained_count, (4096, 4));
    drop(io);
    main.shutdown();
}
