// Rule 9, the right way: an I/O task drops its read guard before asking the
// main loop to drain (the drain may wait for requests that need the lock).
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let parents = io
        .spawn(move |mut cx| async move {
            let length = {
                let guard = cx.read().await;
                disk.io(&guard).length().await.unwrap()
            };
            assert_eq!(length, 4096);
            let d = disk.clone();
            cx.run_on_main_loop(move |bql| {
                let drained = bql.drain(&d);
                bql.write(|w| w.insert_filter(&drained, "filter0", PassthroughFilter::new()))
                    .unwrap();
            })
            .await
            .unwrap();
            let guard = cx.read().await;
            let parents = disk.io(&guard).parents().count();
            parents
        })
        .join();
    assert_eq!(parents, 1);
    drop(io);
    main.shutdown();
}
