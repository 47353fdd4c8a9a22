// Vectored I/O lends the caller's memory for the whole request.
//
// Violation: a VMM starts a scatter read into two of its buffers and,
// before the request completes, writes to one of them itself (the driver
// below may be writing into it at that moment).
// Expected: error[E0506]: cannot assign to `a[_]` because it is borrowed:
// the request's future holds the `IoVecMut`, which borrows the buffers
// until it is awaited or dropped.
use std::io::IoSliceMut;

use blockgraph::{drivers::MemoryDriver, IoVecMut, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
        let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let request = disk.io(&guard).readv(0, IoVecMut::new(&mut segs));
        a[0] = 1;
        request.await.unwrap();
    })
    .join();
    drop(io);
    main.shutdown();
}
