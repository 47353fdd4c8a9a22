// Rule 18 on the driver kit: a `Filter`'s callbacks, like every driver
// callback, are called only by the crate's request path, with their own
// node.
//
// Violation: code holding a read guard calls a filter's `write` callback
// itself (the `Filter` trait is public), handing it the `IoRef` of the node
// below: the write would skip the filter node's request accounting.
// Expected: error[E0308]: mismatched types — `Filter::write` takes a
// `RequestRef` (`NodeRef<'_, InRequest>`), which only the request path
// makes, not an `IoRef` (`NodeRef<'_, ReadLocked>`).
use blockgraph::{driver::Filter, drivers::MemoryDriver, ChildRole, MainLoop};

struct Nop;

impl Filter for Nop {
    fn format_name(&self) -> &'static str {
        "nop"
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, top) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let top = w.add_node("top", Nop, &[(ChildRole::Filtered, &disk)])?;
                Ok::<_, blockgraph::Error>((disk, top))
            })
        })
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let (disk, top) = (disk.io(&guard), top.io(&guard));
        let nop = top.driver_as::<Nop>().unwrap();
        Filter::write(nop, disk, 0, &[1u8; 512]).await
    })
    .join()
    .unwrap();
}
