// Rule 5: keeping a `GsRef` alive across a graph mutation.
//
// Violation: a `GsRef` taken before a write section is used after it (the
// mutation could have removed the node or rewired its edges).
// Expected: error[E0502]: cannot borrow `*bql` as mutable because it is also
// borrowed as immutable: the `GsRef` borrows `&Bql`, the write section needs
// `&mut Bql`.
use blockgraph::{drivers::{MemoryDriver, PassthroughFilter}, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let drained = bql.drain(&disk);
        let node = disk.gs(bql);
        bql.write(|w| w.insert_filter(&drained, "filter0", PassthroughFilter::new()))
            .unwrap();
        assert_eq!(node.parents().count(), 1);
    });
    main.shutdown();
}
