// Rule 15, the right way: every proof comes from the one place that can
// vouch for it: the `Bql` from the main loop (`MainLoop::run`), a `GsRef`
// from `&Bql`, a `Drained` from `Bql::drain`, a `GraphWriter` from
// `Bql::write`, a `ReadGuard` from `IoTask::read`/`try_read`.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main.run(|bql| {
        let disk = bql
            .write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))
            .unwrap();
        let drained = bql.drain(&disk);
        assert!(disk.gs(bql).is_drained());
        drop(drained);
        disk
    });
    let names = io
        .spawn(move |mut cx| async move {
            let a = {
                let guard = cx.read().await;
                disk.io(&guard).name().to_owned()
            };
            let b = {
                let guard = cx.try_read().expect("no writer is active");
                let name = guard.node("disk").unwrap().name().to_owned();
                name
            };
            (a, b)
        })
        .join();
    assert_eq!(names, ("disk".to_owned(), "disk".to_owned()));
    drop(io);
    main.shutdown();
}
