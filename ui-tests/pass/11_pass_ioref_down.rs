// Rule 11, the right way: take the read lock once at the top of the request
// and pass the `IoRef` down to helpers, which never lock again.
use blockgraph::{drivers::MemoryDriver, IoRef, MainLoop, Result};

async fn copy_first_sector(from: IoRef<'_>, to: IoRef<'_>) -> Result<()> {
    let mut buf = [0u8; 512];
    from.read(0, &mut buf).await?;
    to.write(0, &buf).await
}

async fn first_byte(node: IoRef<'_>) -> Result<u8> {
    let mut buf = [0u8; 512];
    node.read(0, &mut buf).await?;
    Ok(buf[0])
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (src, dst) = main
        .run(|bql| {
            bql.write(|w| {
                let src = w.add_node("src", MemoryDriver::from_bytes(vec![9; 4096]), &[])?;
                let dst = w.add_node("dst", MemoryDriver::new(4096), &[])?;
                Ok::<_, blockgraph::Error>((src, dst))
            })
        })
        .unwrap();
    let byte = io
        .spawn(move |mut cx| async move {
            let guard = cx.read().await;
            let (src, dst) = (src.io(&guard), dst.io(&guard));
            copy_first_sector(src, dst).await?;
            first_byte(dst).await
        })
        .join()
        .unwrap();
    assert_eq!(byte, 9);
    drop(io);
    main.shutdown();
}
