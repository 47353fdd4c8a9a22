// Rule 10, the right way: an I/O task drops its read guard before asking the
// main loop for a write section (the writer waits for every reader).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (before, after) = io
        .spawn(move |mut cx| async move {
            let before = cx.read().await.graph().nodes().count();
            cx.run_on_main_loop(|bql| {
                bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
                    .unwrap();
            })
            .await
            .unwrap();
            let after = cx.read().await.graph().nodes().count();
            (before, after)
        })
        .join();
    assert_eq!((before, after), (0, 1));
    drop(io);
    main.shutdown();
}
