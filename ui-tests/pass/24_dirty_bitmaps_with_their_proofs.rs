// The twin of 02c, 12b and 14b: a dirty bitmap is added, taken (busy) and
// freed on the main loop with a `GsRef`; a driver's I/O callback only
// writes (its node's bitmaps record it by themselves); the job's data path
// walks and resets it under a read guard through an `IoRef`.
use blockgraph::driver::{BlockDriver, IoFuture};
use blockgraph::{drivers::MemoryDriver, ChildRole, DirtyBitmapOptions, MainLoop, RequestRef};

struct Pass;

impl BlockDriver for Pass {
    fn format_name(&self) -> &'static str {
        "pass"
    }
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        let file = node.child(ChildRole::File).expect("file");
        file.length().into()
    }
    fn read<'a>(&'a self, node: RequestRef<'a>, o: u64, b: &'a mut [u8]) -> IoFuture<'a, ()> {
        let file = node.child(ChildRole::File).expect("file");
        file.read(o, b).into()
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, o: u64, b: &'a [u8]) -> IoFuture<'a, ()> {
        let file = node.child(ChildRole::File).expect("file");
        file.write(o, b).into()
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, top) = main
        .run(|bql| {
            let (disk, top) = bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
                let top = w.add_node("top", Pass, &[(ChildRole::File, &disk)])?;
                Ok::<_, blockgraph::Error>((disk, top))
            })?;
            let node = disk.gs(bql);
            node.add_dirty_bitmap("b0", DirtyBitmapOptions::new().granularity(4096))?;
            node.set_dirty_bitmap_busy("b0", true)?;
            Ok::<_, blockgraph::Error>((disk, top))
        })
        .unwrap();
    let d = disk.clone();
    let copied = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            top.io(&guard).write(8192, &[1; 4096]).await?;
            let node = d.io(&guard);
            let mut copied = Vec::new();
            while let Some((off, len)) = node.next_dirty("b0", 0)? {
                copied.push((off, len));
                node.reset_dirty("b0", off, len)?;
            }
            Ok::<_, blockgraph::Error>(copied)
        })
        .join()
        .unwrap();
    assert_eq!(copied, vec![(8192, 4096)]);
    main.run(move |bql| {
        let node = disk.gs(bql);
        node.set_dirty_bitmap_busy("b0", false)?;
        node.clear_dirty_bitmap("b0")
    })
    .unwrap();
    drop(io);
    main.shutdown();
}
