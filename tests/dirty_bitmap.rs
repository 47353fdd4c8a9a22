//! In-memory dirty bitmaps (DESIGN §15): what they record (writes,
//! zeroing, discards that complete, from any issuer, on the node they
//! reach), the management verbs with QEMU's semantics (enable, disable,
//! clear, merge, copy, busy, granularity), a job's data path under the
//! read lock, and the query.

mod common;

use std::time::Duration;

use blockgraph::drivers::{MemoryDriver, RawDriver};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, DirtyBitmapOptions, Error, IoThread, MainLoop,
    NodeHandle,
};
use common::{join, watchdog};

const MIB: u64 = 1 << 20;
const BUDGET: Duration = Duration::from_secs(120);

struct Rig {
    main: MainLoop,
    io: [IoThread; 2],
    disk: NodeHandle,
    raw: NodeHandle,
    blk: BlockBackend,
}

/// backend → raw → memory (16 MiB), two I/O threads.
fn rig() -> Rig {
    let main = MainLoop::new().unwrap();
    let io = [
        main.new_io_thread("io0").unwrap(),
        main.new_io_thread("io1").unwrap(),
    ];
    let (disk, raw, blk) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::new(16 * MIB), &[])?;
                let raw = w.add_node("raw", RawDriver::new(), &[(ChildRole::File, &disk)])?;
                let blk = w.add_backend("vda", &raw, BackendOptions::resizable())?;
                Ok::<_, Error>((disk, raw, blk))
            })
        })
        .unwrap();
    Rig {
        main,
        io,
        disk,
        raw,
        blk,
    }
}

impl Rig {
    fn add(&self, node: &NodeHandle, name: &str, opts: DirtyBitmapOptions) {
        let (node, name) = (node.clone(), name.to_owned());
        self.main
            .run(move |bql| node.gs(bql).add_dirty_bitmap(&name, opts))
            .unwrap();
    }

    /// The dirty ranges of `node`'s bitmap `name`.
    fn ranges(&self, node: &NodeHandle, name: &str) -> Vec<(u64, u64)> {
        let (node, name) = (node.clone(), name.to_owned());
        self.main
            .run(move |bql| node.gs(bql).dirty_bitmap_snapshot(&name))
            .unwrap()
            .dirty_ranges()
    }

    fn count(&self, node: &NodeHandle, name: &str) -> u64 {
        let (node, name) = (node.clone(), name.to_owned());
        self.main.run(move |bql| {
            node.gs(bql)
                .dirty_bitmaps()
                .into_iter()
                .find(|b| b.name == name)
                .expect("bitmap")
                .count
        })
    }

    /// Writes `(offset, len)` pairs through the backend from I/O thread `t`.
    fn write(&self, t: usize, writes: Vec<(u64, usize)>) {
        let blk = self.blk.clone();
        join(
            self.io[t].spawn(move |mut cx| async move {
                for (off, len) in writes {
                    blk.write(&mut cx, off, &vec![0xa5; len]).await?;
                }
                Ok::<_, Error>(())
            }),
            "writes",
        )
        .unwrap();
    }

    fn verb(
        &self,
        f: impl FnOnce(blockgraph::GsRef<'_>) -> blockgraph::Result<()> + Send + 'static,
    ) -> blockgraph::Result<()> {
        let disk = self.disk.clone();
        self.main.run(move |bql| f(disk.gs(bql)))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.main.shutdown();
    }
}

/// Granule indices → merged byte ranges, for expectations.
fn ranges_of(granules: impl IntoIterator<Item = u64>, g: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = granules.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in v {
        match out.last_mut() {
            Some((s, l)) if *s + *l == i * g => *l += g,
            _ => out.push((i * g, g)),
        }
    }
    out
}

#[test]
fn writes_from_two_io_threads_are_all_recorded() {
    let _w = watchdog("writes_from_two_io_threads_are_all_recorded", BUDGET);
    let r = rig();
    r.add(&r.disk, "b0", DirtyBitmapOptions::new().granularity(4096));
    let g = 4096u64;
    // Thread 0 dirties even granules, thread 1 odd ones, 4 MiB apart, at
    // once: neighbouring bits in the same words from two threads.
    let even: Vec<(u64, usize)> = (0..512).map(|i| (i * 2 * g, 512)).collect();
    let odd: Vec<(u64, usize)> = (0..512).map(|i| ((i * 2 + 1) * g + 1024, 1024)).collect();
    let (a, b) = (r.blk.clone(), r.blk.clone());
    let t0 = r.io[0].spawn(move |mut cx| async move {
        for (off, len) in even {
            a.write(&mut cx, off, &vec![1; len]).await?;
        }
        Ok::<_, Error>(())
    });
    let t1 = r.io[1].spawn(move |mut cx| async move {
        for (off, len) in odd {
            b.write(&mut cx, off, &vec![2; len]).await?;
        }
        Ok::<_, Error>(())
    });
    join(t0, "thread 0").unwrap();
    join(t1, "thread 1").unwrap();
    assert_eq!(r.ranges(&r.disk, "b0"), vec![(0, 1024 * g)]);
    assert_eq!(r.count(&r.disk, "b0"), 1024 * g);
}

#[test]
fn enable_disable_clear_merge_copy_follow_qemu() {
    let _w = watchdog("enable_disable_clear_merge_copy_follow_qemu", BUDGET);
    let r = rig();
    let g = 65536;
    r.add(&r.disk, "a", DirtyBitmapOptions::new());
    r.add(&r.disk, "off", DirtyBitmapOptions::new().disabled(true));
    r.write(0, vec![(0, 512)]);
    assert_eq!(r.ranges(&r.disk, "a"), ranges_of([0], g));
    assert!(
        r.ranges(&r.disk, "off").is_empty(),
        "disabled records nothing"
    );

    // Disabled: writes go unrecorded, bits stay.
    r.verb(|n| n.disable_dirty_bitmap("a")).unwrap();
    r.write(1, vec![(3 * g, 512)]);
    assert_eq!(r.ranges(&r.disk, "a"), ranges_of([0], g));
    // Enabled again: recording from now on.
    r.verb(|n| n.enable_dirty_bitmap("a")).unwrap();
    r.verb(|n| n.enable_dirty_bitmap("off")).unwrap();
    r.write(1, vec![(5 * g, 512)]);
    assert_eq!(r.ranges(&r.disk, "a"), ranges_of([0, 5], g));
    assert_eq!(r.ranges(&r.disk, "off"), ranges_of([5], g));

    // Merge "a" into "off" (an OR), and a 4 KiB-granular bitmap into a
    // 64 KiB one: each source granule dirties the target granule it is in.
    r.verb(|n| n.merge_dirty_bitmap("off", &n, "a")).unwrap();
    assert_eq!(r.ranges(&r.disk, "off"), ranges_of([0, 5], g));
    r.add(&r.disk, "fine", DirtyBitmapOptions::new().granularity(4096));
    r.write(0, vec![(7 * g + 8192, 4096)]);
    assert_eq!(r.ranges(&r.disk, "fine"), vec![(7 * g + 8192, 4096)]);
    r.verb(|n| n.merge_dirty_bitmap("off", &n, "fine")).unwrap();
    assert_eq!(r.ranges(&r.disk, "off"), ranges_of([0, 5, 7], g));

    // Copy: a new bitmap with the same bits and, unless told, granularity.
    r.verb(|n| n.copy_dirty_bitmap("fine", "fine2", DirtyBitmapOptions::new().disabled(true)))
        .unwrap();
    let infos = r.main.run({
        let d = r.disk.clone();
        move |bql| d.gs(bql).dirty_bitmaps()
    });
    let fine2 = infos.iter().find(|b| b.name == "fine2").unwrap();
    assert_eq!(
        (fine2.granularity, fine2.count, fine2.enabled),
        (4096, 4096, false)
    );

    // Clear: no bits, still recording.
    r.verb(|n| n.clear_dirty_bitmap("a")).unwrap();
    assert_eq!(r.count(&r.disk, "a"), 0);
    r.write(0, vec![(2 * g, 1)]);
    assert_eq!(r.ranges(&r.disk, "a"), ranges_of([2], g));

    // Names: unique per node, looked up by name.
    assert!(matches!(
        r.verb(|n| n.add_dirty_bitmap("a", DirtyBitmapOptions::new())),
        Err(Error::BitmapExists { .. })
    ));
    assert!(matches!(
        r.verb(|n| n.clear_dirty_bitmap("nope")),
        Err(Error::NoSuchBitmap { .. })
    ));
    r.verb(|n| n.remove_dirty_bitmap("a")).unwrap();
    assert!(matches!(
        r.verb(|n| n.remove_dirty_bitmap("a")),
        Err(Error::NoSuchBitmap { .. })
    ));
}

#[test]
fn granularity_is_a_power_of_two_and_writes_round_out_to_it() {
    let _w = watchdog("granularity_rounding", BUDGET);
    let r = rig();
    for bad in [0u64, 256, 1000, 3 << 12, 1 << 32] {
        let e =
            r.verb(move |n| n.add_dirty_bitmap("x", DirtyBitmapOptions::new().granularity(bad)));
        assert!(matches!(e, Err(Error::InvalidArgument(_))), "{bad}: {e:?}");
    }
    assert!(matches!(
        r.verb(|n| n.add_dirty_bitmap("", DirtyBitmapOptions::new())),
        Err(Error::InvalidArgument(_))
    ));
    r.add(&r.disk, "d", DirtyBitmapOptions::new());
    r.add(&r.disk, "s", DirtyBitmapOptions::new().granularity(512));
    r.add(&r.disk, "k", DirtyBitmapOptions::new().granularity(4096));
    // One byte short of a granule boundary to one past it.
    r.write(0, vec![(4095, 2), (10_000, 1)]);
    // Granules 0 and 1, then 2: one run.
    assert_eq!(r.ranges(&r.disk, "k"), vec![(0, 12288)]);
    assert_eq!(r.ranges(&r.disk, "s"), vec![(3584, 1024), (9728, 512)]);
    assert_eq!(r.ranges(&r.disk, "d"), vec![(0, 65536)]);
    assert_eq!(r.count(&r.disk, "d"), 65536);
}

#[test]
fn a_busy_bitmap_refuses_changes_but_its_job_may_use_it() {
    let _w = watchdog("busy", BUDGET);
    let r = rig();
    r.add(&r.disk, "b", DirtyBitmapOptions::new().granularity(4096));
    r.add(&r.disk, "other", DirtyBitmapOptions::new());
    r.write(0, vec![(0, 4096), (8192, 4096)]);
    r.verb(|n| n.set_dirty_bitmap_busy("b", true)).unwrap();
    let busy = |e: blockgraph::Result<()>| matches!(e, Err(Error::BitmapBusy(_)));
    assert!(
        busy(r.verb(|n| n.set_dirty_bitmap_busy("b", true))),
        "taken twice"
    );
    assert!(busy(r.verb(|n| n.remove_dirty_bitmap("b"))));
    assert!(busy(r.verb(|n| n.enable_dirty_bitmap("b"))));
    assert!(busy(r.verb(|n| n.disable_dirty_bitmap("b"))));
    assert!(busy(r.verb(|n| n.clear_dirty_bitmap("b"))));
    assert!(busy(r.verb(|n| n.merge_dirty_bitmap("b", &n, "other"))));
    // It may be read: merged from, copied, listed as busy.
    r.verb(|n| n.merge_dirty_bitmap("other", &n, "b")).unwrap();
    let info = r.main.run({
        let d = r.disk.clone();
        move |bql| d.gs(bql).dirty_bitmaps()
    });
    assert!(info.iter().find(|b| b.name == "b").unwrap().busy);
    // A busy bitmap still records guest writes.
    r.write(1, vec![(20_000, 10)]);

    // The job's data path, under the read lock: walk, copy, reset.
    let disk = r.disk.clone();
    let copied = join(
        r.io[0].spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = disk.io(&g);
            let mut copied = Vec::new();
            let mut at = 0;
            while let Some((off, len)) = n.next_dirty("b", at)? {
                copied.push((off, len));
                n.reset_dirty("b", off, len)?;
                at = off + len;
            }
            // A failed copy puts the range back.
            n.set_dirty("b", 8192, 4096)?;
            Ok::<_, Error>(copied)
        }),
        "job walk",
    )
    .unwrap();
    assert_eq!(copied, vec![(0, 4096), (8192, 4096), (16384, 4096)]);
    assert_eq!(r.ranges(&r.disk, "b"), vec![(8192, 4096)]);
    r.verb(|n| n.set_dirty_bitmap_busy("b", false)).unwrap();
    r.verb(|n| n.remove_dirty_bitmap("b")).unwrap();
}

#[test]
fn every_issuer_marks_the_node_it_reaches_and_failures_mark_nothing() {
    let _w = watchdog("every_issuer", BUDGET);
    let r = rig();
    let opts = DirtyBitmapOptions::new().granularity(4096);
    r.add(&r.disk, "low", opts);
    r.add(&r.raw, "top", opts);
    // Through the backend: raw passes the write down; both nodes record.
    r.write(0, vec![(0, 4096)]);
    // Zeroing and discard through the backend.
    let blk = r.blk.clone();
    join(
        r.io[0].spawn(move |mut cx| async move {
            blk.write_zeroes(&mut cx, 4 * 4096, 4096).await?;
            blk.discard(&mut cx, 8 * 4096, 8192).await
        }),
        "zeroes and discard",
    )
    .unwrap();
    let expect = vec![(0, 4096), (4 * 4096, 4096), (8 * 4096, 8192)];
    assert_eq!(r.ranges(&r.raw, "top"), expect);
    assert_eq!(r.ranges(&r.disk, "low"), expect);
    // Straight on the memory node through an IoRef (a job's direct I/O):
    // only that node's bitmap; then a write that fails marks nothing, and
    // reads mark nothing.
    let disk = r.disk.clone();
    let failed = join(
        r.io[1].spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = disk.io(&g);
            n.write(12 * 4096, &[1; 4096]).await?;
            let mut buf = [0; 4096];
            n.read(13 * 4096, &mut buf).await?;
            Ok::<_, Error>(n.write(16 * MIB - 512, &[1; 4096]).await)
        }),
        "direct I/O",
    )
    .unwrap();
    assert!(failed.is_err(), "past the end");
    assert_eq!(r.ranges(&r.raw, "top"), expect);
    let mut low = expect.clone();
    low.push((12 * 4096, 4096));
    assert_eq!(r.ranges(&r.disk, "low"), low);
    // Nodes without bitmaps are untouched by all this.
    assert!(r.main.run({
        let d = r.disk.clone();
        move |bql| d.gs(bql).dirty_bitmaps().len() == 1
    }));
}

#[test]
fn bitmaps_follow_a_resize() {
    let _w = watchdog("resize", BUDGET);
    let r = rig();
    r.add(&r.disk, "b", DirtyBitmapOptions::new().granularity(4096));
    r.write(0, vec![(8 * MIB, 4096), (15 * MIB, 4096)]);
    let blk = r.blk.clone();
    join(
        r.io[0].spawn(move |mut cx| async move {
            blk.truncate(&mut cx, 12 * MIB).await?;
            blk.truncate(&mut cx, 12 * MIB + 8192).await
        }),
        "resize",
    )
    .unwrap();
    // Bits past the shrunk end are gone; the grown area is dirty (QEMU
    // marks a grown area like a write).
    assert_eq!(
        r.ranges(&r.disk, "b"),
        vec![(8 * MIB, 4096), (12 * MIB, 8192)]
    );
    let snap = r
        .main
        .run({
            let d = r.disk.clone();
            move |bql| d.gs(bql).dirty_bitmap_snapshot("b")
        })
        .unwrap();
    assert_eq!(snap.size(), 12 * MIB + 8192);
}

#[test]
fn query_nodes_lists_each_nodes_bitmaps() {
    let _w = watchdog("query", BUDGET);
    let r = rig();
    r.add(&r.disk, "b0", DirtyBitmapOptions::new());
    r.add(
        &r.disk,
        "b1",
        DirtyBitmapOptions::new().granularity(512).disabled(true),
    );
    r.verb(|n| n.set_dirty_bitmap_busy("b0", true)).unwrap();
    r.write(0, vec![(0, 1)]);
    let nodes = r.main.run(|bql| bql.query_nodes());
    let disk = nodes.iter().find(|n| n.name == "disk").unwrap();
    let raw = nodes.iter().find(|n| n.name == "raw").unwrap();
    assert!(raw.dirty_bitmaps.is_empty());
    let b: Vec<_> = disk
        .dirty_bitmaps
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.granularity,
                b.count,
                b.enabled,
                b.persistent,
                b.inconsistent,
                b.busy,
            )
        })
        .collect();
    assert_eq!(
        b,
        vec![
            ("b0", 65536, 65536, true, false, false, true),
            ("b1", 512, 0, false, false, false, false),
        ]
    );
}

#[test]
fn a_driver_that_stores_nothing_refuses_persistent_bitmaps() {
    let _w = watchdog("persistent_refused", BUDGET);
    let r = rig();
    let e = r.verb(|n| n.add_dirty_bitmap("p", DirtyBitmapOptions::new().persistent(true)));
    assert!(matches!(e, Err(Error::Unsupported { .. })), "{e:?}");
    assert!(r.verb(|n| n.clear_dirty_bitmap("p")).is_err(), "not added");
}
