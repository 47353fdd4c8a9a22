// Rule 13/14 for vectored I/O: a scatter read needs the read-lock proof.
//
// Violation: main-loop code holds a `GsRef` (from the `Bql`) and calls
// `readv` on it, as if the main loop could do I/O without taking the graph
// read lock.
// Expected: error[E0277]: I/O needs an `IoRef`: the proof that this task
// holds the graph read lock (the `IoProof` bound on `NodeRef::readv`).
use std::io::IoSliceMut;

use blockgraph::{drivers::MemoryDriver, IoVecMut, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
    main.run(|bql| {
        let node = disk.gs(bql);
        let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let _request = node.readv(0, IoVecMut::new(&mut segs));
    });
    main.shutdown();
}
