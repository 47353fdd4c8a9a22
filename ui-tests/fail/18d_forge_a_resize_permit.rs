// Issue 7, class 8: resizing skips permissions.
//
// Violation: code holding an `IoRef` makes the `ResizePermit` the driver's
// `truncate` callback needs, to resize without `Perm::RESIZE`.
// Expected: error[E0624]: associated function `checked` is private (only
// the crate makes permits, after checking the permission).
use blockgraph::{driver::ResizePermit, drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let node = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let n = node.io(&guard);
        n.driver().truncate(n, 1 << 20, ResizePermit::checked()).await
    })
    .join()
    .unwrap();
    drop(io);
    main.shutdown();
}
