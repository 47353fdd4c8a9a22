// Rule 6, the right way: finish the I/O through an `IoRef` while its read
// guard is alive; drop the guard afterwards.
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    let m = main.clone();
    let (len, readers_inside) = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let node = disk.io(&guard);
            node.write(0, &[7; 512]).await.unwrap();
            let len = node.length().await.unwrap();
            let inside = m.readers_inside();
            drop(guard);
            (len, inside)
        })
        .join();
    assert_eq!((len, readers_inside), (4096, 1));
    assert_eq!(main.readers_inside(), 0);
    drop(io);
    main.shutdown();
}
