// Rule 18, the right way to undo a reopen: make it part of a transaction.
// If a later step fails, the graph calls the driver's `reopen_abort` with
// the node's own `CallbackRef`, and the limits are as before.
use blockgraph::{
    drivers::{NullDriver, ThrottleConfig, ThrottleDriver, ThrottleLimit},
    ChildRole, MainLoop,
};

fn main() {
    let main = MainLoop::new().unwrap();
    main.run(|bql| {
        let before = ThrottleConfig {
            iops_total: Some(ThrottleLimit::new(100)),
            ..Default::default()
        };
        let thr = bql
            .write(|w| {
                let null = w.add_node("null", NullDriver::new(4096), &[])?;
                let thr = ThrottleDriver::with_config("g", before)?;
                w.add_node("thr", thr, &[(ChildRole::Filtered, &null)])
            })
            .unwrap();
        let drained = bql.drain(&thr);
        let failed = bql.write(|w| {
            w.transaction(|w| {
                w.reopen(&drained, &[("iops-total", "500")])?;
                w.reopen(&drained, &[("iops-total", "0")]) // refused
            })
        });
        assert!(failed.is_err());
        drop(drained);
        let gs = thr.gs(bql);
        let now = gs.driver_as::<ThrottleDriver>().unwrap().group().config();
        assert_eq!(now, before);
    });
    main.shutdown();
}
