// Rule 13/14 for owned buffers: a read into an `IoBuf` needs the read-lock
// proof like any read; owning the buffer proves nothing about the graph.
//
// Violation: main-loop code holds a `GsRef` (from the `Bql`) and calls
// `read_buf` on it, as if the main loop could do I/O without taking the
// graph read lock.
// Expected: error[E0277]: I/O needs an `IoRef`: the proof that this task
// holds the graph read lock (the `IoProof` bound on `NodeRef::read_buf`).
use blockgraph::{drivers::MemoryDriver, IoBuf, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    main.run(|bql| {
        let node = disk.gs(bql);
        let _request = node.read_buf(0, IoBuf::zeroed(512));
    });
    main.shutdown();
}
