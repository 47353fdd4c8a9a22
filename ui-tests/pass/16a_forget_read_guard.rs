// `std::mem::forget` of a `ReadGuard` is memory-safe (BRIEF §3, last
// paragraph): the reader count stays up, so writers are kept out, but
// nothing is freed under a reader and the graph stays readable.
//
// `forget` moves the guard, so every `IoRef` borrowed from it has ended
// before: a leaked guard leaves a count behind, never a usable proof.
//
// The program shows that while the I/O context lives the count stays at 1
// after the task that leaked it has finished, that it really keeps a writer
// out (a write section given 100 ms gives up), and that the graph is still
// readable from the main loop. Once the context is gone (its I/O thread
// dropped, no `IoTask` left), the lock prunes its counter, leaked count
// included: nothing can enter or leave through it any more, so writers may
// proceed and the main loop shuts down normally.
use blockgraph::{drivers::MemoryDriver, MainLoop};
use std::time::Duration;

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();

    let d = disk.clone();
    let len = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let len = d.io(&guard).length().await.unwrap();
            std::mem::forget(guard);
            len
        })
        .join();
    assert_eq!(len, 4096);
    assert_eq!(main.readers_inside(), 1);

    // A writer cannot get in; `MainTask::write` is cancel safe, so a timeout
    // withdraws it again.
    let got_in = main
        .spawn(|mut cx| async move {
            tokio::time::timeout(Duration::from_millis(100), cx.write(|_w| ()))
                .await
                .is_ok()
        })
        .join();
    assert!(!got_in);
    assert!(!main.writer_active());
    assert_eq!(main.readers_inside(), 1);

    // The graph is intact and readable with the main-loop proof.
    let d = disk.clone();
    let (name, children) = main.run(move |bql| {
        let node = d.gs(bql);
        (node.name().to_owned(), node.children().count())
    });
    assert_eq!((name.as_str(), children), ("disk", 0));

    // Removing the context drops its counter, leaked count included.
    drop(io);
    assert_eq!(main.readers_inside(), 0);
    let nodes = main.run(|bql| {
        bql.write(|w| w.add_node("other", MemoryDriver::new(512), &[]))
            .unwrap();
        bql.graph().nodes().count()
    });
    assert_eq!(nodes, 2);
    assert_eq!(disk.name(), "disk");
    main.shutdown();
}
