// Issue 7, class 8: resizing skips permissions.
//
// Violation: code holding an `IoRef` resizes the node by calling its
// driver's `truncate` callback itself (as `FileDriver::truncate` allowed),
// skipping the check that whoever resizes took `Perm::RESIZE`.
// Expected: error[E0061]: the callback takes a `RequestRef` (which only the
// request path makes) and a `ResizePermit`, which only
// `BlockBackend::truncate` and `NodeRef::truncate_child` make (after the
// check); see `resize_forge_a_permit` for making one by hand.
use blockgraph::drivers::{FileDriver, FileOptions};
use blockgraph::MainLoop;

fn main() {
    let dir = std::env::temp_dir().join(format!("ui-resize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = FileDriver::create(dir.join("disk.img"), 4096, FileOptions::default()).unwrap();
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let node = main
        .run(|bql| bql.write(|w| w.add_node("file0", file, &[])))
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let n = node.io(&guard);
        n.driver().truncate(n, 1 << 20).await
    })
    .join()
    .unwrap();
    drop(io);
    main.shutdown();
}
