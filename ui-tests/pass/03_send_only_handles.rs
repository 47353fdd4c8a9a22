// Rule 3, the right way: main-loop proofs (`Bql`, `GsRef`, `Drained`,
// `GraphWriter`, `MainTask`) stay on the main loop. What crosses threads is
// `Send` by design: the `MainLoop` handle, `NodeHandle`s (names), and
// `IoRef`s (the read lock holds wherever the request runs).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();

    // A plain thread gets the handles and asks the main loop for the proofs.
    let (m, d) = (main.clone(), disk.clone());
    let drained = std::thread::spawn(move || {
        m.run(move |bql| {
            let drained = bql.drain(&d);
            let seen = d.gs(bql).is_drained();
            drop(drained); // the section ends on the main loop, where it began
            seen
        })
    })
    .join()
    .unwrap();
    assert!(drained);

    // An async main-loop task keeps its `MainTask` on the main loop.
    let count = main
        .spawn(|mut cx| async move { cx.bql(|bql| bql.graph().nodes().count()) })
        .join();
    assert_eq!(count, 1);

    // An `IoRef` may go to another thread while the guard is held.
    let len = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let node = disk.io(&guard);
            std::thread::scope(|s| s.spawn(move || node.name().len()).join().unwrap())
        })
        .join();
    assert_eq!(len, 4);

    drop(io);
    main.shutdown();
}
