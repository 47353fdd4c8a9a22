// Rule 7, the right way: keep the `NodeHandle` for as long as the drained
// section lives; the section ends when the `Drained` is dropped.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let (during, after) = main.run(|bql| {
        bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let disk = bql.node("disk").unwrap().to_handle();
        let drained = bql.drain(&disk);
        let during = disk.gs(bql).drain_count();
        drop(drained);
        let after = disk.gs(bql).drain_count();
        (during, after)
    });
    assert_eq!((during, after), (1, 0));
    main.shutdown();
}
