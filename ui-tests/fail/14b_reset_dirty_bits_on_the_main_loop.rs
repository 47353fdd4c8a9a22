// Dirty bitmaps: a job's data path (the next dirty area, resetting the
// granules it copied, setting a range again after a failed copy) runs
// under the graph read lock, beside the job's I/O, as in QEMU's job
// coroutines; main-loop code has the whole-bitmap verbs instead (clear).
//
// Violation: synchronous main-loop code resets copied ranges through a
// `GsRef`, without the read guard.
// Expected: error[E0277]: I/O needs an `IoRef`: the proof that this task
// holds the graph read lock.
use blockgraph::{drivers::MemoryDriver, DirtyBitmapOptions, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))?;
        let node = disk.gs(bql);
        node.add_dirty_bitmap("b0", DirtyBitmapOptions::new())?;
        node.reset_dirty("b0", 0, 4096)
    })
    .unwrap();
}
