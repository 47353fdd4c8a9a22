// Rule 3: sending a write section to another thread.
//
// Violation: the `&mut GraphWriter` of a write section is moved into a
// (scoped) thread, which would change the graph off the main loop.
// Expected: error[E0277]: `*mut ()` cannot be sent between threads safely,
// "within `GraphWriter<'_>`": the write section is `!Send`.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        bql.write(|w| {
            std::thread::scope(|s| {
                s.spawn(move || w.add_node("disk", MemoryDriver::new(4096), &[]))
                    .join()
                    .unwrap()
                    .unwrap();
            });
        });
    });
    main.shutdown();
}
