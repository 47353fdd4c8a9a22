// Rule 18: driver callbacks are called only by the crate's request path,
// always with their own node.
//
// Violation: code holding a read guard calls a node's driver callback
// directly, handing it another node's `IoRef` (QEMU-style "call the driver
// with any bs": it would skip the request's accounting and the drained
// check, and write image A's metadata into node B).
// Expected: error[E0308]: mismatched types — a callback takes a
// `RequestRef` (`NodeRef<'_, InRequest>`), which only the request path
// makes, not an `IoRef` (`NodeRef<'_, ReadLocked>`).
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (a, b) = main
        .run(|bql| {
            bql.write(|w| {
                let a = w.add_node("a", MemoryDriver::new(4096), &[])?;
                let b = w.add_node("b", MemoryDriver::new(4096), &[])?;
                Ok::<_, blockgraph::Error>((a, b))
            })
        })
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let (a, b) = (a.io(&guard), b.io(&guard));
        a.driver().write(b, 0, &[1u8; 512]).await
    })
    .join()
    .unwrap();
}
