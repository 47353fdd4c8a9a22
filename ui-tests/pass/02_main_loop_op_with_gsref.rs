// Rule 2, the right way: main-loop-only operations (`to_handle`,
// `drain_count`, drain, mutations) run on the main loop with a `GsRef`. I/O
// code that needs one drops its read guard and asks the main loop with
// `IoTask::run_on_main_loop`.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    main.run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();

    let (handle, drains) = main.run(|bql| {
        let node = bql.node("disk").unwrap();
        (node.to_handle(), node.drain_count())
    });
    assert_eq!((handle.name(), drains), ("disk", 0));

    let again = io
        .spawn(|mut cx| async move {
            let name = {
                let guard = cx.read().await;
                guard.node("disk").unwrap().name().to_owned()
            };
            cx.run_on_main_loop(move |bql| bql.node(&name).unwrap().to_handle())
                .await
                .unwrap()
        })
        .join();
    assert!(again.ptr_eq(&handle));

    drop(io);
    main.shutdown();
}
