//! The `copy-on-read` filter, over a small overlay format defined here (a
//! sector bitmap with a backing node), so the tests see exactly what is
//! allocated where.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use blockgraph::drivers::CopyOnRead;
use blockgraph::{
    driver::{BlockDriver, BlockStatus, IoFuture},
    BackendOptions, ChildRole, Error, Permissions, RequestRef,
};

mod common;
use common::{add_alone, Rig, Stack};

const SECTOR: u64 = 512;

/// A test image format: data and a per-sector allocation map in memory;
/// unallocated sectors read from the backing node (or as zeroes).
struct Overlay {
    state: Mutex<(Vec<u8>, Vec<bool>)>,
    /// Reads pause this long after copying their data, which widens the
    /// window in which a copy-up could race with a guest write.
    read_delay: Option<Duration>,
    fail_writes: AtomicBool,
    writes: AtomicU64,
}

impl Overlay {
    fn new(size: u64) -> Self {
        Overlay {
            state: Mutex::new((
                vec![0; size as usize],
                vec![false; (size / SECTOR) as usize],
            )),
            read_delay: None,
            fail_writes: AtomicBool::new(false),
            writes: AtomicU64::new(0),
        }
    }

    fn with_data(self, offset: u64, data: &[u8]) -> Self {
        self.store(offset, data);
        self
    }

    fn with_read_delay(mut self, d: Duration) -> Self {
        self.read_delay = Some(d);
        self
    }

    fn store(&self, offset: u64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        st.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for s in offset / SECTOR..(offset + data.len() as u64).div_ceil(SECTOR) {
            st.1[s as usize] = true;
        }
    }

    fn allocated(&self, offset: u64, len: u64) -> Vec<bool> {
        let st = self.state.lock().unwrap();
        st.1[(offset / SECTOR) as usize..((offset + len) / SECTOR) as usize].to_vec()
    }

    fn stored(&self, offset: u64, len: usize) -> Vec<u8> {
        self.state.lock().unwrap().0[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockDriver for Overlay {
    fn format_name(&self) -> &'static str {
        "test-overlay"
    }

    fn request_alignment(&self, _node: RequestRef<'_>) -> u32 {
        SECTOR as u32
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.state.lock().unwrap().0.len() as u64) })
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            assert!(offset % SECTOR == 0 && buf.len() as u64 % SECTOR == 0);
            let mut from_backing = Vec::new();
            {
                let st = self.state.lock().unwrap();
                for (i, chunk) in buf.chunks_mut(SECTOR as usize).enumerate() {
                    let s = offset / SECTOR + i as u64;
                    if st.1[s as usize] {
                        let at = (s * SECTOR) as usize;
                        chunk.copy_from_slice(&st.0[at..at + SECTOR as usize]);
                    } else {
                        from_backing.push(i);
                    }
                }
            }
            for i in from_backing {
                let chunk = &mut buf[i * SECTOR as usize..(i + 1) * SECTOR as usize];
                match node.backing() {
                    Some(b) => b.read(offset + i as u64 * SECTOR, chunk).await?,
                    None => chunk.fill(0),
                }
            }
            if let Some(d) = self.read_delay {
                tokio::time::sleep(d).await;
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, _node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.fail_writes.load(Ordering::SeqCst) {
                return Err(Error::Io(io::Error::from_raw_os_error(28)));
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.store(offset, buf);
            Ok(())
        })
    }

    fn block_status<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(async move {
            let st = self.state.lock().unwrap();
            let first = (offset / SECTOR) as usize;
            let last = (offset + len).div_ceil(SECTOR) as usize;
            let a = st.1[first];
            let run = st.1[first..last].iter().take_while(|&&x| x == a).count() as u64;
            let n = (run * SECTOR).min(len);
            let status = if a {
                BlockStatus::Data
            } else {
                BlockStatus::Unallocated
            };
            Ok((status, n))
        })
    }
}

/// backend -> copy-on-read `cor` -> overlay `top` -> ...`below` (each the
/// backing of the previous, `base0` first).
fn chain(top: Overlay, below: Vec<Overlay>) -> Rig {
    let mut stack = Stack::new();
    for (i, o) in below.into_iter().enumerate().rev() {
        stack = stack.above(ChildRole::Backing, format!("base{i}"), o);
    }
    stack
        .above(ChildRole::Backing, "top", top)
        .above(ChildRole::Filtered, "cor", CopyOnRead::new())
        .build()
}

/// Runs `f` on the `top` overlay's driver.
fn on_top<R: Send + 'static>(c: &Rig, f: impl FnOnce(&Overlay) -> R + Send + 'static) -> R {
    c.driver("top", f)
}

fn copied(c: &Rig) -> u64 {
    c.driver("cor", CopyOnRead::bytes_copied)
}

const SIZE: u64 = 1 << 20;

#[test]
fn reads_copy_up_what_the_backing_chain_stores() {
    let base = Overlay::new(SIZE).with_data(0, &[7; 65536]);
    let c = chain(Overlay::new(SIZE), vec![base]);
    let data = c.read(0, 131072).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 7));
    assert!(data[65536..].iter().all(|&b| b == 0));
    // Only what the base stores was copied; the rest stays unallocated.
    assert!(on_top(&c, |t| t.allocated(0, 65536)).iter().all(|&a| a));
    assert!(on_top(&c, |t| t.allocated(65536, 65536))
        .iter()
        .all(|&a| !a));
    assert_eq!(on_top(&c, |t| t.stored(0, 65536)), vec![7; 65536]);
    assert_eq!(copied(&c), 65536);
    // A second read is served by the top alone: nothing more is copied.
    let writes = on_top(&c, |t| t.writes.load(Ordering::SeqCst));
    assert_eq!(c.read(0, 131072).unwrap(), data);
    assert_eq!(copied(&c), 65536);
    assert_eq!(on_top(&c, |t| t.writes.load(Ordering::SeqCst)), writes);
    c.finish();
}

#[test]
fn copy_up_reaches_down_a_three_deep_chain_and_skips_allocated_parts() {
    let base = Overlay::new(SIZE).with_data(0, &[1; 4096]);
    let mid = Overlay::new(SIZE).with_data(8192, &[2; 4096]);
    let top = Overlay::new(SIZE).with_data(2048, &[3; 1024]);
    let c = chain(top, vec![mid, base]);
    let data = c.read(0, 16384).unwrap();
    assert!(data[..2048].iter().all(|&b| b == 1));
    assert!(
        data[2048..3072].iter().all(|&b| b == 3),
        "the top's own data"
    );
    assert!(data[3072..4096].iter().all(|&b| b == 1));
    assert!(data[4096..8192].iter().all(|&b| b == 0));
    assert!(data[8192..12288].iter().all(|&b| b == 2));
    assert_eq!(copied(&c), 4096 - 1024 + 4096);
    assert_eq!(on_top(&c, |t| t.stored(0, 12288)), data[..12288]);
    c.finish();
}

/// Guest writes racing with copy-ups of the same sectors: the guest's data
/// always wins (the copy-up never writes back what it read before the
/// guest's write).
#[test]
fn guest_writes_racing_copy_ups_are_never_overwritten() {
    const CLUSTERS: u64 = 64;
    let base = Overlay::new(SIZE).with_data(0, &vec![1; (CLUSTERS * 4096) as usize]);
    let top = Overlay::new(SIZE).with_read_delay(Duration::from_millis(2));
    let c = chain(top, vec![base]);
    let io1 = c.main.new_io_thread("io1").unwrap();
    let mut tasks = Vec::new();
    for i in 0..CLUSTERS {
        let blk = c.blk.clone();
        tasks.push(c.io.spawn(move |mut cx| async move {
            let mut buf = vec![0; 4096];
            blk.read(&mut cx, i * 4096, &mut buf).await
        }));
        let blk = c.blk.clone();
        tasks.push(io1.spawn(move |mut cx| async move {
            // Lands while the copy-up of the same cluster is in progress.
            tokio::time::sleep(Duration::from_millis(1)).await;
            blk.write(&mut cx, i * 4096 + 512, &[9; 1024]).await
        }));
    }
    for t in tasks {
        t.join().unwrap();
    }
    for i in 0..CLUSTERS {
        let stored = on_top(&c, move |t| t.stored(i * 4096 + 512, 1024));
        assert_eq!(
            stored,
            vec![9; 1024],
            "cluster {i}: the guest write was lost"
        );
    }
    drop(io1);
    c.finish();
}

#[test]
fn a_failed_copy_up_fails_the_read() {
    let base = Overlay::new(SIZE).with_data(0, &[5; 4096]);
    let top = Overlay::new(SIZE);
    top.fail_writes.store(true, Ordering::SeqCst);
    let c = chain(top, vec![base]);
    let err = c.read(0, 4096).unwrap_err();
    assert!(
        matches!(&err, Error::Io(e) if e.raw_os_error() == Some(28)),
        "{err}"
    );
    assert_eq!(copied(&c), 0);
    // Once writes work again, the same read copies up.
    on_top(&c, |t| t.fail_writes.store(false, Ordering::SeqCst));
    assert_eq!(c.read(0, 4096).unwrap(), vec![5; 4096]);
    assert_eq!(copied(&c), 4096);
    c.finish();
}

#[test]
fn the_filter_takes_write_unchanged_and_keeps_other_writers_out() {
    let c = chain(Overlay::new(SIZE), vec![Overlay::new(SIZE)]);
    let top = c.node("top");
    let (taken, err) = c.main.run(move |bql| {
        let taken = top.gs(bql).parent_permissions();
        let err = bql
            .write(|w| w.add_backend("intruder", &top, BackendOptions::default()))
            .unwrap_err();
        (taken, err)
    });
    assert!(
        taken.take.contains(blockgraph::Perm::WRITE_UNCHANGED),
        "{taken:?}"
    );
    assert!(matches!(err, Error::PermissionConflict { .. }), "{err}");
    // A reader that tolerates writers is fine.
    let top = c.node("top");
    c.main
        .run(move |bql| {
            bql.write(|w| {
                w.add_backend(
                    "reader",
                    &top,
                    BackendOptions::with_perms(Permissions::SHARED_READER),
                )
            })
        })
        .unwrap();
    c.finish();
}

#[test]
fn a_copy_on_read_node_needs_a_filtered_child() {
    let err = add_alone("cor", CopyOnRead::new());
    assert!(
        matches!(
            err,
            Error::NoSuchChild {
                role: ChildRole::Filtered,
                ..
            }
        ),
        "{err}"
    );
}

/// Inserted live above an image in use: from then on the guest's reads
/// populate it.
#[test]
fn inserted_live_it_starts_populating() {
    let s = Stack::new()
        .node("base", Overlay::new(SIZE).with_data(0, &[4; 8192]))
        .above(ChildRole::Backing, "top", Overlay::new(SIZE))
        .build();
    assert_eq!(s.read(0, 8192).unwrap(), vec![4; 8192]);
    assert!(!on_top(&s, |t| t.allocated(0, 8192)[0]));
    let t = s.node("top");
    s.main
        .run(move |bql| {
            let drained = bql.drain(&t);
            bql.write(|w| w.insert_filter(&drained, "cor", CopyOnRead::new()))
        })
        .unwrap();
    assert_eq!(s.read(0, 8192).unwrap(), vec![4; 8192]);
    assert!(on_top(&s, |t| t.allocated(0, 8192).iter().all(|&a| a)));
    s.finish();
}
