// Rule 12, the right way: a driver's I/O callbacks recurse into children
// with the `RequestRef` they were given; main-loop-only work (here: keeping a
// `NodeHandle` to the child) happens in a main-loop callback, which gets a
// `GsRef`.
use blockgraph::{driver::{require_child, BlockDriver, IoFuture}, drivers::MemoryDriver, BackendOptions, CallbackRef, ChildRole, MainLoop, NodeHandle, RequestRef, Result};
use std::sync::Mutex;

/// Remembers its child (from `open`) and passes requests down.
#[derive(Default)]
struct RememberingFilter {
    child: Mutex<Option<NodeHandle>>,
}

impl BlockDriver for RememberingFilter {
    fn format_name(&self) -> &'static str {
        "remembering"
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        let child = node.child(ChildRole::Filtered).map(|c| c.to_handle());
        *self.child.lock().unwrap() = child;
        Ok(())
    }

    fn close(&self, _node: CallbackRef<'_>) {
        self.child.lock().unwrap().take();
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::Filtered)?.length().await })
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::Filtered)?
                .read(offset, buf)
                .await
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::Filtered)?
                .write(offset, buf)
                .await
        })
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (blk, remembered) = main
        .run(|bql| {
            let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))?;
            let drained = bql.drain(&disk);
            let blk = bql.write(|w| {
                w.insert_filter(&drained, "filter0", RememberingFilter::default())?;
                w.add_backend("vda", &disk, BackendOptions::default())
            })?;
            drop(drained);
            let filter = bql.node("filter0").unwrap();
            let driver = filter.driver_as::<RememberingFilter>().unwrap();
            let remembered = driver.child.lock().unwrap().as_ref().unwrap().ptr_eq(&disk);
            Ok::<_, blockgraph::Error>((blk, remembered))
        })
        .unwrap();
    assert!(remembered);

    let data = io
        .spawn(move |mut cx| async move {
            blk.write(&mut cx, 0, &[5; 512]).await?;
            let mut buf = [0u8; 512];
            blk.read(&mut cx, 0, &mut buf).await.map(|()| buf)
        })
        .join()
        .unwrap();
    assert_eq!(data, [5; 512]);
    drop(io);
    main.shutdown();
}
