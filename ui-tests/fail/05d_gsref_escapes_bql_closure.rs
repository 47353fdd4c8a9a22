// Rule 5: keeping a `GsRef` alive where other main-loop code may change the
// graph (across an `.await` of an async main-loop task).
//
// Violation: an async main-loop task smuggles a `GsRef` out of the
// synchronous `cx.bql(..)` closure, to keep it across `.await`s.
// Expected: error: lifetime may not live long enough: a `GsRef` borrows the
// `&mut Bql` lent to the closure and cannot outlive the call.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let name = main
        .spawn(|mut cx| async move {
            cx.bql(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
                .unwrap();
            let node = cx.bql(|bql| bql.node("disk").unwrap());
            tokio::task::yield_now().await;
            node.name().to_owned()
        })
        .join();
    assert_eq!(name, "disk");
    main.shutdown();
}
