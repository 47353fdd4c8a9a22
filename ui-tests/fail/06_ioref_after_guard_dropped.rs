// Rule 6: using an `IoRef` after its read guard is gone.
//
// Violation: I/O code releases the read lock and then issues I/O through an
// `IoRef` it took under that lock (a writer could have removed the node).
// Expected: error[E0505]: cannot move out of `guard` because it is borrowed:
// the `IoRef` borrows the `ReadGuard`.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let len = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let node = disk.io(&guard);
            drop(guard);
            node.length().await
        })
        .join()
        .unwrap();
    assert_eq!(len, 4096);
    drop(io);
    main.shutdown();
}
