// Rule 15: forging a proof in safe code.
//
// Violation: building a `ReadGuard` with a struct literal, without taking
// the read lock.
// Expected: error[E0451]: field `cx` of struct `ReadGuard` is private: only
// `IoTask::read`/`try_read` make one, after counting the reader.
use blockgraph::{MainLoop, ReadGuard};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let nodes = io
        .spawn(|mut cx| async move {
            let guard = ReadGuard { cx: &mut cx };
            guard.graph().nodes().count()
        })
        .join();
    assert_eq!(nodes, 0);
    drop(io);
    main.shutdown();
}
