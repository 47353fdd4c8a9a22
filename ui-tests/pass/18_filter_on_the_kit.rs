// The driver kit, the right way (twin of 18g, 18h and 01b): a `Filter`'s
// callbacks are reached through the request path (a backend or an `IoRef`
// of its node), its overrides pass the request down with the `forward`
// helpers and the `RequestRef` they were given, and `require_child` works
// under every proof: `GsRef` and `CallbackRef` on the main loop, `IoRef`
// and `RequestRef` in I/O code.
use std::sync::atomic::{AtomicU64, Ordering};

use blockgraph::driver::{forward, require_child, Filter, IoFuture};
use blockgraph::drivers::MemoryDriver;
use blockgraph::{BackendOptions, CallbackRef, ChildRole, MainLoop, RequestRef, Result};

#[derive(Default)]
struct CountWrites(AtomicU64);

impl Filter for CountWrites {
    fn format_name(&self) -> &'static str {
        "count-writes"
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        require_child(node, Self::CHILD).map(drop) // CallbackRef
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        match require_child(node, Self::CHILD) {
            // RequestRef
            Ok(_) => forward::write(node, Self::CHILD, offset, buf),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (top, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
                let top = w.add_node("top", CountWrites::default(), &[(ChildRole::Filtered, &disk)])?;
                let blk = w.add_backend("vda", &top, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((top, blk))
            })
        })
        .unwrap();
    let t = top.clone();
    let below = main.run(move |bql| require_child(t.gs(bql), ChildRole::Filtered).unwrap().name().to_owned()); // GsRef
    assert_eq!(below, "disk");
    let read = io
        .spawn(move |mut cx| async move {
            blk.write(&mut cx, 0, &[5u8; 512]).await?;
            let guard = cx.read().await;
            let top = top.io(&guard);
            top.write(512, &[6u8; 512]).await?;
            let disk = require_child(top, ChildRole::Filtered)?; // IoRef
            let mut buf = [0u8; 1024];
            disk.read(0, &mut buf).await?;
            let writes = top.driver_as::<CountWrites>().unwrap().0.load(Ordering::Relaxed);
            Ok::<_, blockgraph::Error>((buf[0], buf[512], writes))
        })
        .join()
        .unwrap();
    assert_eq!(read, (5, 6, 2));
    drop(io);
    main.shutdown();
}
