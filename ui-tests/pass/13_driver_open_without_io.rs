// Rule 13, the right way: a main-loop callback (`open`) only looks at the
// graph through its `GsRef`. I/O the driver needs before it opens (probing a
// header) runs as a request on an I/O thread, under a read guard, and its
// result is handed to the driver's constructor.
use blockgraph::{driver::{require_child, BlockDriver, IoFuture}, drivers::MemoryDriver, CallbackRef, ChildRole, Error, MainLoop, RequestRef, Result};

const MAGIC: u8 = 0xb1;

/// A format whose image starts with a magic byte.
struct MagicFormat {
    magic: u8,
}

impl BlockDriver for MagicFormat {
    fn format_name(&self) -> &'static str {
        "magic"
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        node.child(ChildRole::File).ok_or(Error::NoSuchChild {
            node: node.name().to_owned(),
            role: ChildRole::File,
        })?;
        if self.magic == MAGIC {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "bad magic {:#x}",
                self.magic
            )))
        }
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::File)?.length().await })
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::File)?
                .read(offset, buf)
                .await
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::File)?
                .write(offset, buf)
                .await
        })
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let mut image = vec![0u8; 4096];
    image[0] = MAGIC;
    let file = main
        .run(move |bql| bql.write(|w| w.add_node("file", MemoryDriver::from_bytes(image), &[])))
        .unwrap();

    let f = file.clone();
    let magic = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let mut header = [0u8; 1];
            f.io(&guard).read(0, &mut header).await.map(|()| header[0])
        })
        .join()
        .unwrap();

    let opened = main.run(move |bql| {
        bql.write(|w| w.add_node("img", MagicFormat { magic }, &[(ChildRole::File, &file)]))
            .is_ok()
    });
    assert!(opened);
    drop(io);
    main.shutdown();
}
