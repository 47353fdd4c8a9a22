// Rule 8, the right way: enter the nested event loop (`bql.block_on`) with
// no proof held: copy out what the wait needs, wait, then take proofs again.
// Never wait from inside a write section.
use blockgraph::{drivers::MemoryDriver, BackendOptions, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let blk = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_backend("vda", &disk, BackendOptions::default())
            })
        })
        .unwrap();
    let task = io.spawn(move |mut cx| async move { blk.length(&mut cx).await });
    let (name, size) = main.run(move |bql| {
        let name = bql.node("disk").unwrap().name().to_owned();
        let size = bql.block_on(task).unwrap();
        assert!(bql.node(&name).is_some());
        (name, size)
    });
    assert_eq!((name.as_str(), size), ("disk", 4096));
    drop(io);
    main.shutdown();
}
