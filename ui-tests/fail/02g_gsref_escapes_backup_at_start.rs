// Rule 5: a `GsRef` lives only as long as the `&mut Bql` it came from.
//
// Violation: the step a backup runs at its drained start
// (`BackupOptions::at_start`) stores the `GsRef` it made in a thread-local
// (the step runs on the main loop; a channel would be refused as not
// `Send` already), to use it after the start, when the graph may have
// changed.
// Expected: error: borrowed data escapes outside of closure: the `GsRef`
// borrows the `&mut Bql` lent to the step for the call only.
use std::cell::RefCell;

use blockgraph::drivers::MemoryDriver;
use blockgraph::job::{self, BackupOptions, BackupSync, JobOptions};
use blockgraph::{Error, GsRef, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, copy) = main
        .run(|bql| {
            bql.write(|w| {
                Ok::<_, Error>((
                    w.add_node("disk", MemoryDriver::new(1 << 20), &[])?,
                    w.add_node("copy", MemoryDriver::new(1 << 20), &[])?,
                ))
            })
        })
        .unwrap();
    thread_local! {
        static KEPT: RefCell<Option<GsRef<'static>>> = const { RefCell::new(None) };
    }
    let handle = io.handle();
    main.run(move |bql| {
        let options = BackupOptions::new(&disk, &copy, BackupSync::Full).at_start(move |bql| {
            KEPT.with(|k| *k.borrow_mut() = Some(bql.node("disk").unwrap()));
            Ok(())
        });
        job::backup(bql, &handle, JobOptions::new("b"), options).map(drop)
    })
    .unwrap();
    main.run(|_| KEPT.with(|k| println!("{}", k.borrow().as_ref().unwrap().name())));
}
