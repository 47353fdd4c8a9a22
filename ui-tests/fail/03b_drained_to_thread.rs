// Rule 3: sending a `Drained` section to another thread.
//
// Violation: main-loop code drains a node and hands the section to a
// (scoped) thread, which would end it off the main loop.
// Expected: error[E0277]: `*const ()` cannot be sent between threads safely,
// "within `Drained<'_>`": a drained section is `!Send`; it ends where it
// began, on the main loop.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let drained = bql.drain(&disk);
        std::thread::scope(|s| {
            s.spawn(move || drop(drained)).join().unwrap();
        });
    });
    main.shutdown();
}
