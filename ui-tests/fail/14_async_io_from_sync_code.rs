// Rule 14: calling async I/O from synchronous code without going through the
// main-loop entry point (`Bql::block_on`, the one nested event loop).
//
// Violation: a synchronous main-loop closure awaits a backend read directly.
// Expected: error[E0728]: `await` is only allowed inside `async` functions
// and blocks: synchronous main-loop code gets I/O results only through
// `bql.block_on(..)`, which needs the `Bql` exclusively.
use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let blk = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_backend("vda", &disk, BackendOptions::default())
            })
        })
        .unwrap();
    let ctx = main.new_io_context("sync");
    let len = main.run(move |_bql| {
        let mut cx = ctx.task_handle();
        blk.length(&mut cx).await
    });
    assert_eq!(len.unwrap(), 4096);
    main.shutdown();
}
