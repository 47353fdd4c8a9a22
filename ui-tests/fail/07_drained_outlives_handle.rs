// Rule 7: a `Drained` section outliving the borrow it came from.
//
// Violation: a node is drained through a handle that lives in an inner
// block, and the section is kept after the block ends.
// Expected: error[E0597]: `disk` does not live long enough: `Drained<'g>`
// borrows the `NodeHandle` it was made from for as long as it lives.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let drained = {
            let disk = bql.node("disk").unwrap().to_handle();
            bql.drain(&disk)
        };
        assert_eq!(drained.name(), "disk");
    });
    main.shutdown();
}
