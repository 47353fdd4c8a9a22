// Owned buffers the right way: through an `IoRef` (read guard held for the
// whole request) or a backend; the buffer is moved into the request and
// comes back with its result, ready for the next one.
use blockgraph::{drivers::MemoryDriver, BackendOptions, IoBuf, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((disk, blk))
            })
        })
        .unwrap();
    let read = io
        .spawn(move |mut cx| async move {
            let mut buf = IoBuf::zeroed(512);
            buf.fill(0x42);
            let mut buf = blk.write_buf(&mut cx, 0, buf).await.unwrap();
            buf.fill(0); // ours again
            let guard = cx.read().await;
            disk.io(&guard).read_buf(0, buf).await.unwrap()
        })
        .join();
    assert!(read.iter().all(|&b| b == 0x42));
    drop(io);
    main.shutdown();
}
