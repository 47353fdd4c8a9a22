// `std::mem::forget` of a `Drained` section is memory-safe: the node stays
// drained (its backend keeps queueing requests) for ever, but the section's
// state is owned, so nothing dangles, and the graph can still be changed
// and torn down.
use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let (count, drained, quiesced) = main.run(|bql| {
        let (disk, blk) = bql
            .write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((disk, blk))
            })
            .unwrap();
        std::mem::forget(bql.drain(&disk));
        let node = disk.gs(bql);
        let seen = (node.drain_count(), node.is_drained(), blk.is_quiesced());
        // The graph still changes: the backend can be removed and a node added.
        bql.write(|w| {
            w.remove_backend(&blk)?;
            w.add_node("other", MemoryDriver::new(512), &[]).map(drop)
        })
        .unwrap();
        seen
    });
    assert_eq!((count, drained, quiesced), (1, true, true));
    main.shutdown();
}
