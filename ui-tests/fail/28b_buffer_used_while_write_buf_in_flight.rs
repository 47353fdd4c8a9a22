// An owned buffer belongs to the request while it runs: that is what lets
// the file driver hand it to the kernel without a copy.
//
// Violation: a VMM moves a buffer into `write_buf` and, before the request
// completes, changes the buffer itself (the kernel may be reading it at
// that moment).
// Expected: error[E0382]: borrow of moved value: `buf`: the request owns
// it; the caller gets it back from the completed request.
use blockgraph::{drivers::MemoryDriver, BackendOptions, IoBuf, MainLoop};

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
    io.spawn(move |mut cx| async move {
        let mut buf = IoBuf::zeroed(512);
        let request = blk.write_buf(&mut cx, 0, buf);
        buf.fill(0xff);
        request.await.unwrap();
    })
    .join();
    main.shutdown();
}
