// Rule 3: sending a `GsRef` to another thread.
//
// Violation: main-loop code moves a `GsRef` into a (scoped) thread.
// Expected: error[E0277]: `*const ()` cannot be sent between threads safely,
// "within `NodeRef<'_, GlobalState>`": the `GlobalState` proof is `!Send`,
// because it only holds on the main-loop thread.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let node = bql.node("disk").unwrap();
        std::thread::scope(|s| {
            s.spawn(move || node.name().len()).join().unwrap();
        });
    });
    main.shutdown();
}
