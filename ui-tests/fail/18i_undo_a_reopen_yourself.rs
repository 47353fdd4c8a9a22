// Rule 18: driver callbacks are called only by the graph, always with their
// own node: the reopen phases too.
//
// Violation: main-loop code undoes a throttle node's last reopen by calling
// `reopen_abort` itself, outside any transaction (the driver would put back
// limits the graph committed, and a later rollback of the graph would find
// nothing left to undo). Expected: error[E0308]: mismatched types —
// `reopen_abort` takes a `CallbackRef` (`NodeRef<'_, InCallback>`), which
// only the graph makes, not a `GsRef` (`NodeRef<'_, GlobalState>`).
use blockgraph::{
    drivers::{NullDriver, ThrottleConfig, ThrottleDriver},
    ChildRole, MainLoop,
};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let thr = bql
            .write(|w| {
                let null = w.add_node("null", NullDriver::new(4096), &[])?;
                let thr = ThrottleDriver::with_config("g", ThrottleConfig::default())?;
                w.add_node("thr", thr, &[(ChildRole::Filtered, &null)])
            })
            .unwrap();
        let gs = thr.gs(bql);
        gs.driver().reopen_abort(gs);
    });
    main.shutdown();
}
