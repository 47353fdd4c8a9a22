// Vectored I/O the right way: through an `IoRef` (read guard held) or a
// backend, with the caller's buffers lent until the request completes;
// parts of a vector lent one after the other, or split into disjoint
// halves used together.
use std::io::{IoSlice, IoSliceMut};

use blockgraph::{drivers::MemoryDriver, BackendOptions, IoVec, IoVecMut, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(4096), &[])?;
                let blk = w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, blockgraph::Error>((disk, blk))
            })
        })
        .unwrap();
    let (a, b) = io
        .spawn(move |mut cx| async move {
            {
                let guard = cx.read().await;
                let node = disk.io(&guard);
                let (x, y) = ([1u8; 3], [2u8; 5]);
                let segs = [IoSlice::new(&x), IoSlice::new(&y)];
                node.writev(100, IoVec::new(&segs)).await.unwrap();
            }
            let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
            {
                let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
                let mut iov = IoVecMut::new(&mut segs);
                blk.readv(&mut cx, 100, iov.slice_mut(0, 8)).await.unwrap();
                // One part after the other...
                iov.slice_mut(0, 1).fill(9);
                iov.slice_mut(7, 1).fill(9);
                // ...or two disjoint halves at once.
                let (mut head, mut tail) = iov.split_at(4);
                head.slice_mut(3, 1).fill(8);
                tail.slice_mut(0, 1).fill(7);
            }
            a[1] += 0; // the buffers are the caller's again
            (a, b)
        })
        .join();
    assert_eq!((a, b), ([9, 1, 1, 8], [7, 2, 2, 9]));
    drop(io);
    main.shutdown();
}
