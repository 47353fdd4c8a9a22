// Rule 10: taking the write section while holding a read guard in the same
// task (the writer would wait forever for this task's own reader count).
//
// Violation: an I/O task holds its read guard and asks the main loop for a
// write section.
// Expected: error[E0499]: cannot borrow `cx` as mutable more than once at a
// time: the `ReadGuard` borrows the task's `IoTask` mutably, and so does
// `run_on_main_loop`.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let added = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let before = guard.graph().nodes().count();
            let added = cx
                .run_on_main_loop(|bql| {
                    bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
                        .is_ok()
                })
                .await
                .unwrap();
            drop(guard);
            (before, added)
        })
        .join();
    assert_eq!(added, (0, true));
    drop(io);
    main.shutdown();
}
