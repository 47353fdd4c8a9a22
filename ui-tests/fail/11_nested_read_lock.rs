// Rule 11: taking the read lock a second time in a task that already holds
// it (the inner `read()` would queue behind a waiting writer, which waits
// for the outer guard: deadlock).
//
// Violation: an I/O task calls `cx.read()` while its first guard is alive.
// Expected: error[E0499]: cannot borrow `cx` as mutable more than once at a
// time: a `ReadGuard` borrows the task's `IoTask` mutably. Pass the `IoRef`
// down instead.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let len = io
        .spawn(move |mut cx| async move {
            let outer = cx.read().await;
            let node = disk.io(&outer);
            let inner = cx.read().await;
            let len = disk.io(&inner).length().await.unwrap();
            assert_eq!(node.name(), "disk");
            len
        })
        .join();
    assert_eq!(len, 4096);
    drop(io);
    main.shutdown();
}
