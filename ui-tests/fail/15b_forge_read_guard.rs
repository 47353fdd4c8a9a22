// Rule 15: forging a proof in safe code.
//
// Violation: building a `ReadGuard` with a struct literal, without taking
// the read lock.
// Expected: error[E0451]: field `cx` of struct `ReadGuard` is private: only
// `IoCx::read`/`try_read` make one, after counting the reader.
use blockgraph::{MainLoop, ReadGuard};

fn main() {
    let main = MainLoop::new().unwrap();
    let mut cx = main.new_io_context("ctx").task_handle();
    let guard = ReadGuard { cx: &mut cx };
    assert_eq!(guard.graph().nodes().count(), 0);
    main.shutdown();
}
