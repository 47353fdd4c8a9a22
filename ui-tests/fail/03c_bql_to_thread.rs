// Rule 3: sending the `Bql` to another thread.
//
// Violation: the `&mut Bql` lent to a main-loop closure is moved into a
// (scoped) thread.
// Expected: error[E0277]: `*mut ()` cannot be sent between threads safely,
// "within `Bql`": the main-loop token is `!Send` and `!Sync`.
use blockgraph::MainLoop;

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        std::thread::scope(|s| {
            s.spawn(move || bql.graph().nodes().count()).join().unwrap();
        });
    });
    main.shutdown();
}
