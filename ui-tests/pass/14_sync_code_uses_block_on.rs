// Rule 14, the right way: synchronous main-loop code gets the result of
// async I/O only through the main-loop entry point, `bql.block_on(..)`,
// which needs the `Bql` exclusively (so no proof is held across the wait).
// Here it submits the request to an I/O thread and waits for it.
use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};
use std::sync::Arc;

fn main() {
    let main = MainLoop::new().unwrap();
    let io = Arc::new(main.new_io_thread("io0").unwrap());
    let io_for_main = io.clone();
    let len = main.run(move |bql| {
        let blk = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_backend("vda", &disk, BackendOptions::default())
            })
            .unwrap();
        let request = io_for_main.spawn(move |mut cx| async move { blk.length(&mut cx).await });
        bql.block_on(request)
    });
    assert_eq!(len.unwrap(), 4096);
    drop(io);
    main.shutdown();
}
