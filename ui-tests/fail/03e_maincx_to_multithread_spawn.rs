// Rule 3: moving main-loop proofs onto a multi-thread runtime.
//
// Violation: an async main-loop task hands its `MainTask` (which lends the
// `Bql`) to `tokio::spawn`, whose tasks may run on any worker thread.
// Expected: error: future cannot be sent between threads safely: `MainTask`
// holds the `!Send` `Bql`.
use blockgraph::MainLoop;

fn main() {
    let main = MainLoop::new().unwrap();
    let count = main
        .spawn(|mut cx| async move {
            tokio::spawn(async move { cx.bql(|bql| bql.graph().nodes().count()) })
                .await
                .unwrap()
        })
        .join();
    assert_eq!(count, 0);
    main.shutdown();
}
