// Rule 2 for dirty bitmaps: adding, removing, enabling, disabling,
// clearing, merging, copying a bitmap and marking it busy are main-loop
// commands (QEMU's `block-dirty-bitmap-*` QMP commands, under the BQL).
//
// Violation: an I/O task holding a read guard adds a bitmap through its
// `IoRef`.
// Expected: error[E0277]: this is a main-loop-only operation, and an
// `IoRef` only proves that the graph is read-locked.
use blockgraph::{drivers::MemoryDriver, DirtyBitmapOptions, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let disk = main
        .run(|bql| bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[])))
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let node = disk.io(&guard);
        node.add_dirty_bitmap("b0", DirtyBitmapOptions::new())
    })
    .join()
    .unwrap();
}
