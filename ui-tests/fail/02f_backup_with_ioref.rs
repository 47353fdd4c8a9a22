// Rule 2 for block jobs: starting a backup inserts its copy-before-write
// filter above the source, a graph change, so it is a main-loop
// operation: it takes the `Bql`, mutably.
//
// Violation: an I/O task holding a read guard starts a backup, passing
// the `IoRef` it has instead of the `Bql` it cannot have.
// Expected: error[E0308]: mismatched types (expected `&mut Bql`, found
// `&NodeRef<'_, ReadLocked>`).
use blockgraph::job::{self, BackupOptions, BackupSync, JobOptions};
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let handle = io.handle();
    let (disk, copy) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let copy = w.add_node("copy", MemoryDriver::new(4096), &[])?;
                Ok::<_, blockgraph::Error>((disk, copy))
            })
        })
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let node = disk.io(&guard);
        job::backup(
            &node,
            &handle,
            JobOptions::new("b"),
            BackupOptions::new(&disk, &copy, BackupSync::Full),
        )
    })
    .join()
    .unwrap();
}
