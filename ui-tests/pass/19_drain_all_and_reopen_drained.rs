// Twin of `03f_drained_all_to_thread` and `04c_set_read_only_undrained`:
// the drain-all section stays on the main loop and lends the `Drained` a
// reopen and a transaction of mutations want.
use blockgraph::{
    drivers::{MemoryDriver, PassthroughFilter},
    MainLoop,
};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let a = bql
            .write(|w| w.add_node("a", MemoryDriver::new(4096), &[]))
            .unwrap();
        let b = bql
            .write(|w| w.add_node("b", MemoryDriver::new(4096), &[]))
            .unwrap();
        let all = bql.drain_all();
        let (da, db) = (all.drained(&a).unwrap(), all.drained(&b).unwrap());
        bql.write(|w| {
            w.transaction(|w| {
                w.insert_filter(&da, "fa", PassthroughFilter::new())?;
                w.insert_filter(&db, "fb", PassthroughFilter::new())?;
                Ok(())
            })
        })
        .unwrap();
        // Memory nodes have no read-only mode: refused cleanly, not a panic.
        assert!(bql.write(|w| w.set_read_only(&da, true)).is_err());
        drop((da, db, all));
    });
    main.shutdown();
}
