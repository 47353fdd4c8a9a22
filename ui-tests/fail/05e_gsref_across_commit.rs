// Rule 5 for block jobs: starting a job changes the graph (commit inserts
// its filter above the overlay and switches base read-write), so no
// `GsRef` may live across it: `job::commit` takes the `Bql` mutably.
//
// Violation: a `GsRef` of the overlay, taken before the commit starts, is
// used after it.
// Expected: error[E0502]: cannot borrow `*bql` as mutable because it is
// also borrowed as immutable.
use blockgraph::job::{self, CommitOptions, JobOptions};
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let handle = io.handle();
    let (top, mid) = main
        .run(|bql| {
            bql.write(|w| {
                let mid = w.add_node("mid", MemoryDriver::new(4096), &[])?;
                let top = w.add_node("top", MemoryDriver::new(4096), &[])?;
                Ok::<_, blockgraph::Error>((top, mid))
            })
        })
        .unwrap();
    main.run(move |bql| {
        let overlay = top.gs(bql);
        let job = job::commit(bql, &handle, JobOptions::new("c"), CommitOptions::new(&mid));
        println!("{} over a commit: {:?}", overlay.name(), job.is_ok());
    });
}
