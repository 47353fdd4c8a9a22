//! An outside driver on the public kit only: a filter that checksums each 4 KiB block written
//! through it and fails reads that do not match (`cargo run --example custom_driver`).
use blockgraph::driver::{forward, Filter, IoFuture};
use blockgraph::drivers::MemoryDriver;
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, RequestRef, Result};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Mutex;

const BLOCK: u64 = 4096;
fn sum(block: &[u8]) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(block)
}

/// The filter's own error, kept as the `source` of the `Error::Driver` it reports.
#[derive(Debug, thiserror::Error)]
#[error("the block at offset {0} does not match its checksum")]
struct Mismatch(u64);
/// Checksums by block offset; what it does not override is the child's (the kit's defaults).
#[derive(Default)]
struct Checksum(Mutex<HashMap<u64, u64>>);
impl Checksum {
    fn forget(&self, at: u64, len: u64) {
        let mut sums = self.0.lock().unwrap();
        sums.retain(|&b, _| b < at || b >= at + len);
    }
}

impl Filter for Checksum {
    fn format_name(&self) -> &'static str {
        "checksum"
    }
    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        forward::request_alignment(node, Self::CHILD).max(BLOCK as u32)
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, at: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            forward::write(node, Self::CHILD, at, buf).await?;
            let mut sums = self.0.lock().unwrap();
            for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                sums.insert(at + i as u64 * BLOCK, sum(block));
            }
            Ok(())
        })
    }
    fn read<'a>(&'a self, node: RequestRef<'a>, at: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            forward::read(node, Self::CHILD, at, buf).await?;
            let sums = self.0.lock().unwrap();
            for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                let b = at + i as u64 * BLOCK;
                if sums.get(&b).is_some_and(|&s| s != sum(block)) {
                    return Err(Error::driver("checksum", Mismatch(b)));
                }
            }
            Ok(())
        })
    }
    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, at: u64, len: u64) -> IoFuture<'a, ()> {
        self.forget(at, len);
        forward::write_zeroes(node, Self::CHILD, at, len)
    }
    fn discard<'a>(&'a self, node: RequestRef<'a>, at: u64, len: u64) -> IoFuture<'a, ()> {
        self.forget(at, len);
        forward::discard(node, Self::CHILD, at, len)
    }
}

/// backend `vda` -> checksum `sum` -> memory `disk` (public: `tests/custom_driver.rs` runs it).
pub fn main() -> Result<()> {
    let main = MainLoop::new()?;
    let io = main.new_io_thread("io0")?;
    let (disk, blk) = main.run(|bql| {
        bql.write(|w| {
            let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
            let sum = w.add_node("sum", Checksum::default(), &[(ChildRole::Filtered, &disk)])?;
            let blk = w.add_backend("vda", &sum, BackendOptions::default())?;
            Ok::<_, Error>((disk, blk))
        })
    })?;
    let (first, second) = io
        .spawn(move |mut cx| async move {
            blk.write(&mut cx, 0, &[7; 2 * BLOCK as usize]).await?;
            let mut buf = vec![0; 2 * BLOCK as usize];
            let first = blk.read(&mut cx, 0, &mut buf).await.map(|()| buf.clone());
            // One byte of the second block changes on the disk, behind the filter's back.
            disk.io(&cx.read().await).write(BLOCK + 5, &[8]).await?;
            Ok::<_, Error>((first, blk.read(&mut cx, 0, &mut buf).await))
        })
        .join()?;
    assert_eq!(first?, vec![7; 2 * BLOCK as usize]);
    let err = second.expect_err("the changed byte is caught");
    println!("8 KiB read back through the filter; then one byte changed below it: {err}");
    let source = std::error::Error::source(&err).expect("the filter's own error is kept");
    assert_eq!(source.downcast_ref::<Mismatch>().map(|m| m.0), Some(BLOCK));
    drop(io);
    main.shutdown();
    Ok(())
}
