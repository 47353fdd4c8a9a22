// Rule 2 for block jobs: starting a job (here `block-commit`) changes the
// graph, so it is a main-loop operation: it takes the `Bql`, mutably.
//
// Violation: an I/O task holding a read guard starts a commit, passing
// the `IoRef` it has instead of the `Bql` it cannot have.
// Expected: error[E0308]: mismatched types (expected `&mut Bql`, found
// `&NodeRef<'_, ReadLocked>`: "types differ in mutability" is the first
// difference rustc names, the types differ too).
use blockgraph::job::{self, CommitOptions, JobOptions};
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let handle = io.handle();
    let mid = main
        .run(|bql| bql.write(|w| w.add_node("mid", MemoryDriver::new(4096), &[])))
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let node = mid.io(&guard);
        job::commit(
            &node,
            &handle,
            JobOptions::new("c"),
            CommitOptions::new(&mid),
        )
    })
    .join()
    .unwrap();
}
