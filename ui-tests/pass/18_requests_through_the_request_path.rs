// Rule 18, the right way: user code makes requests through an `IoRef` (they
// enter the graph there and are counted by drains); a driver passes its
// request down to its children with the `RequestRef` it was given; a
// driver's own public operation reaches its node with `IoRef::enter_own`.
use blockgraph::{driver::{forward, BlockDriver, IoFuture}, drivers::MemoryDriver, ChildRole, IoRef, MainLoop, NodeRequest, RequestRef};

struct Filter;

impl Filter {
    /// A driver-specific operation: the name of the filtered child.
    fn child_name<'a>(&'a self, node: IoRef<'a>) -> NodeRequest<'a, String> {
        node.enter_own(self, |own| {
            let name = own.child(ChildRole::Filtered).map(|c| c.name().to_owned());
            Box::pin(async move { Ok(name.unwrap_or_default()) })
        })
    }
}

impl BlockDriver for Filter {
    fn format_name(&self) -> &'static str {
        "filter"
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        forward::length(node, ChildRole::Filtered)
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        forward::to_child(node, ChildRole::Filtered, |child| child.read(offset, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        forward::to_child(node, ChildRole::Filtered, |child| child.write(offset, buf))
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let top = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                w.add_node("top", Filter, &[(ChildRole::Filtered, &disk)])
            })
        })
        .unwrap();
    let (data, child) = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let top = top.io(&guard);
            top.write(0, &[3u8; 512]).await?;
            let mut buf = [0u8; 512];
            top.read(0, &mut buf).await?;
            let child = top.driver_as::<Filter>().unwrap().child_name(top).await?;
            Ok::<_, blockgraph::Error>((buf[0], child))
        })
        .join()
        .unwrap();
    assert_eq!((data, child.as_str()), (3, "disk"));
    drop(io);
    main.shutdown();
}
