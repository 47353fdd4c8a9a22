// Rule 3: sending a `DrainedAll` section to another thread.
//
// Violation: main-loop code drains the whole graph and hands the section
// to a (scoped) thread, which would end it off the main loop.
// Expected: error[E0277]: `(dyn MainLoopThreadOnly + 'static)` cannot be
// sent between threads safely, "within `DrainedAll`": a drain-all section
// is `!Send`; it ends where it began, on the main loop.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let all = bql.drain_all();
        std::thread::scope(|s| {
            s.spawn(move || drop(all)).join().unwrap();
        });
    });
    main.shutdown();
}
