// Rule 18 on the driver kit: the forwarding helpers pass a request that is
// already inside a driver down to a child; they never start one.
//
// Violation: code holding a read guard uses `forward::write` on a node's
// `IoRef` to write straight into its filtered child, going around the
// node's request accounting (a drain of the top node would not wait).
// Expected: error[E0308]: mismatched types — the helpers take a
// `RequestRef` (`NodeRef<'_, InRequest>`), not an `IoRef`
// (`NodeRef<'_, ReadLocked>`).
use blockgraph::{driver::forward, drivers::{MemoryDriver, PassthroughFilter}, ChildRole, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let top = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_node("top", PassthroughFilter::new(), &[(ChildRole::Filtered, &disk)])
            })
        })
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        forward::write(top.io(&guard), ChildRole::Filtered, 0, &[1u8; 512]).await
    })
    .join()
    .unwrap();
}
