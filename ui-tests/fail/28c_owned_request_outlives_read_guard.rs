// An owned buffer frees a request from its buffer's borrow, not from the
// graph lock: a node request is still bounded by the read guard it was
// made under (rule 14).
//
// Violation: an I/O task makes a `read_buf` request under a read guard,
// drops the guard, and awaits the request afterwards (the graph could
// have changed under it).
// Expected: error[E0597]: `guard` does not live long enough: the request
// borrows the `IoRef`'s guard, owned buffer or not.
use blockgraph::{drivers::MemoryDriver, IoBuf, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    io.spawn(move |mut cx| async move {
        let request = {
            let guard = cx.read().await;
            disk.io(&guard).read_buf(0, IoBuf::zeroed(512))
        };
        request.await.unwrap();
    })
    .join();
    main.shutdown();
}
