// Rule 2 for block jobs: starting a mirror inserts its filter above the
// source (and completing it pivots the source's users), so it is a
// main-loop operation: it takes the `Bql`, mutably.
//
// Violation: an I/O task holding a read guard starts a mirror, passing
// the `IoRef` it has instead of the `Bql` it cannot have.
// Expected: error[E0308]: mismatched types (expected `&mut Bql`, found
// `&NodeRef<'_, ReadLocked>`).
use blockgraph::job::{self, JobOptions, MirrorOptions, MirrorTarget};
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let handle = io.handle();
    let (src, dst) = main
        .run(|bql| {
            bql.write(|w| {
                let s = w.add_node("src", MemoryDriver::new(4096), &[])?;
                let d = w.add_node("dst", MemoryDriver::new(4096), &[])?;
                Ok::<_, blockgraph::Error>((s, d))
            })
        })
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let node = src.io(&guard);
        job::mirror(
            &node,
            &handle,
            JobOptions::new("m"),
            MirrorOptions::new(&src, MirrorTarget::Node(dst.clone())),
        )
    })
    .join()
    .unwrap();
}
