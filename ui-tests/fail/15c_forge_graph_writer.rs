// Rule 15: forging a proof in safe code.
//
// Violation: calling the write section's constructor directly, to mutate
// the graph without announcing a writer or waiting for readers. (`todo!()`
// stands for the graph, whose type is crate-private too.)
// Expected: error[E0624]: associated function `new` is private: only
// `Bql::write`/`MainTask::write` make a `GraphWriter`, inside a write section
// (and inside the crate the constructor is `unsafe` with a `# Safety`
// contract).
#![allow(unused)] // the code after `todo!()` is unreachable; keep the snapshot to the error
use blockgraph::{drivers::MemoryDriver, GraphWriter, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|_bql| {
        let mut w = GraphWriter::new(todo!());
        w.add_node("disk", MemoryDriver::new(4096), &[]).unwrap();
    });
    main.shutdown();
}
