//! Vectored I/O (`readv`/`writev`) through the whole stack: random
//! segmentations of random requests must read and write exactly what the
//! contiguous calls do, on memory, raw over memory (a shifted window),
//! qcow2 (allocating writes, partial clusters, requests across L2 tables,
//! over a backing node), and under the throttle and copy-on-read filters;
//! backends count vectored requests in their statistics and dirty
//! bitmaps; an image written by vectored writes passes `qemu-img check`
//! and `qemu-img compare`.
//!
//! Requests on owned buffers (`read_buf`/`write_buf`, `IoBuf`) are mixed
//! into the same random cases; built-in pass-through layers hand the
//! buffer down as it is, and a filter that overrides only `write` still
//! sees every owned write.

mod common;
mod qcow2_util;

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockgraph::driver::{forward, Filter, IoFuture};
use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Options};
use blockgraph::drivers::{CopyOnRead, RawDriver, ThrottleConfig, ThrottleDriver, ThrottleLimit};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, DirtyBitmapOptions, Error, IoBuf, IoVec, IoVecMut,
    NodeHandle, Permissions, RequestRef,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use qcow2_util::{Env, Rng, MEM_CAPACITY};

/// Virtual size of every disk under test.
const SIZE: u64 = 256 << 10;
/// Longest request: several clusters of the small-cluster images.
const MAX_LEN: usize = 20 << 10;

/// One request of a case: a write or a read, at a byte offset, of some
/// length, cut into segments at the given points (duplicates make empty
/// segments).
#[derive(Debug, Clone)]
struct Op {
    write: bool,
    offset: u64,
    len: usize,
    cuts: Vec<usize>,
    seed: u64,
}

fn op() -> impl Strategy<Value = Op> {
    (
        any::<bool>(),
        0..SIZE,
        1..=MAX_LEN,
        vec(0..=MAX_LEN, 0..8),
        any::<u64>(),
    )
        .prop_map(|(write, offset, len, cuts, seed)| {
            let len = len.min((SIZE - offset) as usize).max(1);
            let offset = offset.min(SIZE - len as u64);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            cuts.sort_unstable();
            Op {
                write,
                offset,
                len,
                cuts,
                seed,
            }
        })
}

/// The lengths of the segments that `cuts` makes of `len` bytes.
fn segment_lengths(len: usize, cuts: &[usize]) -> Vec<usize> {
    let mut at = 0;
    let mut out = Vec::new();
    for &c in cuts {
        out.push(c - at);
        at = c;
    }
    out.push(len - at);
    out
}

/// `data` cut into owned segments of `lens`.
fn split_owned(data: &[u8], lens: &[usize]) -> Vec<Vec<u8>> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let s = data[at..at + n].to_vec();
            at += n;
            s
        })
        .collect()
}

/// Runs `ops` against `node` on the I/O thread: each write is a `writev`
/// of its segments, each read a `readv` compared with the model and with
/// a contiguous `read` of the same range; then the whole disk is compared
/// with the model.
fn run_ops(env: &Env, node: &NodeHandle, model: &mut Vec<u8>, ops: Vec<Op>) -> Result<(), String> {
    let node = node.clone();
    let start = std::mem::take(model);
    let (result, end) = env.on_io(move |mut cx| async move {
        let mut model = start;
        let g = cx.read().await;
        let n = node.io(&g);
        for op in &ops {
            let lens = segment_lengths(op.len, &op.cuts);
            let range = op.offset as usize..op.offset as usize + op.len;
            if op.write && op.seed % 3 == 0 {
                // A third of the writes move an owned buffer in instead.
                let data = Rng::new(op.seed).bytes(op.len);
                match n.write_buf(op.offset, IoBuf::copy_from(&data)).await {
                    Ok(back) if *back == data[..] => {}
                    Ok(_) => return (Err(format!("{op:?}: write_buf changed it")), model),
                    Err(e) => return (Err(format!("{op:?}: write_buf failed: {e}")), model),
                }
                model[range].copy_from_slice(&data);
            } else if op.write {
                let data = Rng::new(op.seed).bytes(op.len);
                let owned = split_owned(&data, &lens);
                let slices: Vec<IoSlice<'_>> = owned.iter().map(|s| IoSlice::new(s)).collect();
                if let Err(e) = n.writev(op.offset, IoVec::new(&slices)).await {
                    return (Err(format!("{op:?}: writev failed: {e}")), model);
                }
                model[range].copy_from_slice(&data);
            } else {
                let mut owned: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xa5; l]).collect();
                {
                    let mut slices: Vec<IoSliceMut<'_>> =
                        owned.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                    if let Err(e) = n.readv(op.offset, IoVecMut::new(&mut slices)).await {
                        return (Err(format!("{op:?}: readv failed: {e}")), model);
                    }
                }
                let got = owned.concat();
                let mut flat = vec![0x5a; op.len];
                if let Err(e) = n.read(op.offset, &mut flat).await {
                    return (Err(format!("{op:?}: read failed: {e}")), model);
                }
                if got != flat {
                    return (Err(format!("{op:?}: readv differs from read")), model);
                }
                let mut owned = IoBuf::zeroed(op.len);
                owned.fill(0x3c);
                match n.read_buf(op.offset, owned).await {
                    Ok(back) if *back == flat[..] => {}
                    Ok(_) => return (Err(format!("{op:?}: read_buf differs from read")), model),
                    Err(e) => return (Err(format!("{op:?}: read_buf failed: {e}")), model),
                }
                if got[..] != model[range] {
                    return (Err(format!("{op:?}: readv differs from the model")), model);
                }
            }
        }
        let mut all = vec![0u8; SIZE as usize];
        if let Err(e) = n.read(0, &mut all).await {
            return (Err(format!("whole-disk read failed: {e}")), model);
        }
        if all != model {
            return (Err("the disk differs from the model".into()), model);
        }
        (Ok(()), model)
    });
    *model = end;
    result
}

/// Runs random cases on stacks made by `make` (the top node and the
/// disk's initial content); `after` checks what else must hold after each
/// case.
fn check_stack(
    name: &'static str,
    cases: u32,
    make: impl Fn(&Env) -> (NodeHandle, Vec<u8>),
    after: impl Fn(&Env, &NodeHandle),
) {
    let _dog = common::watchdog(name, Duration::from_secs(300));
    let env = Env::new();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&vec(op(), 1..12), |ops| {
            let (node, mut model) = make(&env);
            run_ops(&env, &node, &mut model, ops).map_err(TestCaseError::fail)?;
            after(&env, &node);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn add_above(
    env: &Env,
    name: &str,
    child: &NodeHandle,
    role: ChildRole,
    drv: impl blockgraph::driver::BlockDriver,
) -> NodeHandle {
    let name = env.name(name);
    let child = child.clone();
    env.main
        .run(move |bql| bql.write(|w| w.add_node(&name, drv, &[(role, &child)])))
        .expect("add node")
}

/// A qcow2 image of `SIZE` bytes with `cs`-byte clusters in memory, over
/// `backing` if given.
fn qcow2(env: &Env, cs: u64, backing: Option<&NodeHandle>) -> NodeHandle {
    let file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(&file, CreateOptions::new(SIZE).cluster_size(cs))
        .expect("create");
    env.open(&file, backing, Qcow2Options::default())
        .expect("open")
}

/// A memory node holding random data, the backing node of the tests that
/// need one (its content shows through where the overlay stores nothing).
fn random_backing(env: &Env, seed: u64) -> (NodeHandle, Vec<u8>) {
    let data = Rng::new(seed).bytes(SIZE as usize);
    (env.mem_node(data.clone(), SIZE as usize), data)
}

fn qcow2_is_clean(env: &Env, node: &NodeHandle) {
    let report = env.check(node, false).expect("check");
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn io_vectors_slice_like_the_bytes_they_cover() {
    let _dog = common::watchdog("io_vectors_slice", Duration::from_secs(120));
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let case = (
        1..200usize,
        vec(0..200usize, 0..10),
        0..200usize,
        0..200usize,
        0..200usize,
    );
    runner
        .run(&case, |(len, cuts, a, b, mid)| {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            cuts.sort_unstable();
            let lens = segment_lengths(len, &cuts);
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let (start, sub) = (a % (len + 1), b);
            let sub = sub % (len - start + 1);
            let mid = mid % (len + 1);

            let owned = split_owned(&data, &lens);
            let slices: Vec<IoSlice<'_>> = owned.iter().map(|s| IoSlice::new(s)).collect();
            let iov = IoVec::new(&slices);
            prop_assert_eq!(iov.len(), len);
            prop_assert_eq!(iov.to_vec(), data.clone());
            prop_assert_eq!(
                iov.slice(start, sub).to_vec(),
                data[start..start + sub].to_vec()
            );
            let (x, y) = iov.split_at(mid);
            prop_assert_eq!(x.to_vec(), data[..mid].to_vec());
            prop_assert_eq!(y.to_vec(), data[mid..].to_vec());
            let nonempty = lens.iter().filter(|&&l| l > 0).count();
            prop_assert_eq!(iov.segment_count(), nonempty);
            prop_assert_eq!(iov.as_contiguous().is_some(), nonempty <= 1);
            let io_slices = iov.slice(start, sub).to_io_slices();
            prop_assert_eq!(io_slices.iter().map(|s| s.len()).sum::<usize>(), sub);

            // Writing through a sub-view changes exactly those bytes.
            let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0; l]).collect();
            {
                let mut segs: Vec<IoSliceMut<'_>> =
                    bufs.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                let mut iov = IoVecMut::new(&mut segs);
                iov.copy_from_slice(&data);
                iov.slice_mut(start, sub).fill(0xff);
                let (mut head, mut tail) = iov.split_at(mid);
                let (hl, tl) = (head.len(), tail.len());
                head.slice_mut(0, hl.min(1)).fill(0xee);
                tail.slice_mut(tl - tl.min(1), tl.min(1)).fill(0xdd);
            }
            let mut expect = data.clone();
            expect[start..start + sub].fill(0xff);
            expect[..mid.min(1)].fill(0xee);
            if mid < len {
                expect[len - 1] = 0xdd;
            }
            prop_assert_eq!(bufs.concat(), expect);
            Ok(())
        })
        .unwrap();
}

#[test]
fn memory_vectored_matches_contiguous() {
    check_stack(
        "memory",
        48,
        |env| {
            (
                env.mem_node(Vec::new(), SIZE as usize),
                vec![0; SIZE as usize],
            )
        },
        |_, _| {},
    );
}

#[test]
fn raw_window_over_memory_vectored_matches_contiguous() {
    check_stack(
        "raw",
        48,
        |env| {
            let mem = env.mem_node(vec![0x11; 8192], SIZE as usize + 8192);
            let raw = RawDriver::with_window(4096, Some(SIZE)).expect("window");
            let top = add_above(env, "raw", &mem, ChildRole::File, raw);
            // The window starts at 4096: those 4096 bytes of 0x11 are in it.
            let mut model = vec![0; SIZE as usize];
            model[..4096].fill(0x11);
            (top, model)
        },
        |_, _| {},
    );
}

#[test]
fn qcow2_small_clusters_across_l2_tables_vectored_matches_contiguous() {
    // 512-byte clusters: an L2 table maps 32 KiB, so a 20 KiB request
    // crosses tables and most requests cover partial clusters.
    check_stack(
        "qcow2-512",
        32,
        |env| (qcow2(env, 512, None), vec![0; SIZE as usize]),
        qcow2_is_clean,
    );
}

#[test]
fn qcow2_4k_clusters_vectored_matches_contiguous() {
    check_stack(
        "qcow2-4k",
        32,
        |env| (qcow2(env, 4096, None), vec![0; SIZE as usize]),
        qcow2_is_clean,
    );
}

#[test]
fn qcow2_over_backing_vectored_matches_contiguous() {
    check_stack(
        "qcow2-backing",
        32,
        |env| {
            let (backing, data) = random_backing(env, 7);
            (qcow2(env, 1024, Some(&backing)), data)
        },
        qcow2_is_clean,
    );
}

#[test]
fn throttle_over_qcow2_vectored_matches_contiguous() {
    check_stack(
        "throttle",
        24,
        |env| {
            let (backing, data) = random_backing(env, 8);
            let img = qcow2(env, 4096, Some(&backing));
            let config = ThrottleConfig {
                iops_total: Some(ThrottleLimit::new(1_000_000)),
                ..ThrottleConfig::default()
            };
            let name = env.name("group");
            let throttle = ThrottleDriver::with_config(&name, config).expect("throttle");
            (
                add_above(env, "throttle", &img, ChildRole::Filtered, throttle),
                data,
            )
        },
        |_, _| {},
    );
}

#[test]
fn copy_on_read_over_qcow2_vectored_matches_contiguous() {
    check_stack(
        "copy-on-read",
        24,
        |env| {
            let (backing, data) = random_backing(env, 9);
            let img = qcow2(env, 2048, Some(&backing));
            (
                add_above(env, "cor", &img, ChildRole::Filtered, CopyOnRead::new()),
                data,
            )
        },
        |env, node| {
            // Everything was read at the end, so everything was copied up:
            // the image alone (without its backing node) holds the disk.
            let node = node.clone();
            let copied = env.main.run(move |bql| {
                node.gs(bql)
                    .driver_as::<CopyOnRead>()
                    .expect("a copy-on-read node")
                    .bytes_copied()
            });
            assert!(copied > 0, "nothing was copied up");
        },
    );
}

/// A copy-up under a vectored read of several segments writes what it
/// read to the image, and the reader gets the same bytes.
#[test]
fn copy_on_read_copies_up_what_a_scattered_read_returns() {
    let _dog = common::watchdog("cor_scatter", Duration::from_secs(60));
    let env = Env::new();
    let (backing, data) = random_backing(&env, 10);
    let img = qcow2(&env, 4096, Some(&backing));
    let cor = add_above(&env, "cor", &img, ChildRole::Filtered, CopyOnRead::new());
    let (c, i) = (cor.clone(), img.clone());
    let (got, status) = env
        .on_io(move |mut cx| async move {
            let g = cx.read().await;
            let (mut a, mut b, mut c3) = (vec![0u8; 1000], vec![0u8; 5000], vec![0u8; 2192]);
            {
                let mut segs = [
                    IoSliceMut::new(&mut a),
                    IoSliceMut::new(&mut b),
                    IoSliceMut::new(&mut c3),
                ];
                c.io(&g).readv(4096, IoVecMut::new(&mut segs)).await?;
            }
            let status = i.io(&g).block_status(4096, 8192).await?;
            Ok::<_, Error>(([a, b, c3].concat(), status))
        })
        .unwrap();
    assert_eq!(got, data[4096..4096 + 8192]);
    assert_eq!(status, (blockgraph::driver::BlockStatus::Data, 8192));
    // Read the image without its backing node: the copied data is there.
    env.remove(&cor).unwrap();
    let stored = env.read(&img, 4096, 8192).unwrap();
    assert_eq!(stored, data[4096..4096 + 8192]);
}

/// A dirty bitmap `b` (4 KiB granules) on each of `marked`; writable
/// backends `vda` and `vdb` on `writable`'s nodes and a shared reader `vdc`
/// on `reader`.
fn marked_backends(
    env: &Env,
    writable: [&NodeHandle; 2],
    marked: &[&NodeHandle],
    reader: &NodeHandle,
) -> (BlockBackend, BlockBackend, BlockBackend) {
    let [a, b] = writable.map(NodeHandle::clone);
    let marked: Vec<NodeHandle> = marked.iter().map(|n| (*n).clone()).collect();
    let reader = reader.clone();
    env.main
        .run(move |bql| -> blockgraph::Result<_> {
            for node in &marked {
                node.gs(bql)
                    .add_dirty_bitmap("b", DirtyBitmapOptions::new().granularity(4096))?;
            }
            bql.write(|w| {
                let vda = w.add_backend("vda", &a, BackendOptions::default())?;
                let vdb = w.add_backend("vdb", &b, BackendOptions::default())?;
                let vdc = w.add_backend(
                    "vdc",
                    &reader,
                    BackendOptions::with_perms(Permissions::SHARED_READER),
                )?;
                Ok((vda, vdb, vdc))
            })
        })
        .expect("backends")
}

/// Backends count a vectored request as one request of its length, mark
/// dirty bitmaps for `writev`, and refuse `writev` without write
/// permission, as they do `write`.
#[test]
fn backend_counts_vectored_requests_and_marks_bitmaps() {
    let _dog = common::watchdog("backend_stats", Duration::from_secs(60));
    let env = Env::new();
    let disk = env.mem_node(Vec::new(), SIZE as usize);
    let img = qcow2(&env, 4096, None);
    let (blk, blk_img, ro) = marked_backends(&env, [&disk, &img], &[&disk, &img], &img);
    let before = blk.stats();
    let denied = env.on_io(move |mut cx| async move {
        let (x, y) = ([1u8; 3000], [2u8; 5000]);
        let segs = [IoSlice::new(&x), IoSlice::new(&y)];
        blk.writev(&mut cx, 10_000, IoVec::new(&segs)).await?;
        blk_img.writev(&mut cx, 70_000, IoVec::new(&segs)).await?;
        let (mut p, mut q) = ([0u8; 100], [0u8; 7900]);
        {
            let mut segs = [IoSliceMut::new(&mut p), IoSliceMut::new(&mut q)];
            blk.readv(&mut cx, 10_000, IoVecMut::new(&mut segs)).await?;
        }
        assert_eq!((p[99], q[2899], q[2900], q[7899]), (1, 1, 2, 2));
        let stats = blk.stats();
        let denied = ro.writev(&mut cx, 0, IoVec::new(&segs)).await;
        let denied_flat = ro.write(&mut cx, 0, &x).await;
        Ok::<_, Error>((stats, (denied, denied_flat)))
    });
    let (stats, denied) = denied.expect("vectored requests");
    assert_eq!(stats.reads - before.reads, 1);
    assert_eq!(stats.read_bytes - before.read_bytes, 8000);
    assert_eq!(stats.writes - before.writes, 1);
    assert_eq!(stats.write_bytes - before.write_bytes, 8000);
    // Refused by the same check as a contiguous write.
    assert!(
        matches!(denied, (Err(Error::ReadOnly(_)), Err(Error::ReadOnly(_)))),
        "a read-only backend took a write: {denied:?}"
    );
    let (d, i) = (disk.clone(), img.clone());
    let (on_disk, on_img) = env.main.run(move |bql| {
        let a = d.gs(bql).dirty_bitmap_snapshot("b").unwrap().dirty_ranges();
        let b = i.gs(bql).dirty_bitmap_snapshot("b").unwrap().dirty_ranges();
        (a, b)
    });
    // 10_000..18_000 touches granules 2..=4; 70_000..78_000 granules 17..=19.
    assert_eq!(on_disk, vec![(8192, 3 * 4096)]);
    assert_eq!(on_img, vec![(17 * 4096, 3 * 4096)]);
}

/// An image written only by vectored writes of odd segmentations (through
/// qcow2 on a file node) is a clean image with exactly the data QEMU reads
/// from a raw file written the same way.
#[test]
fn qemu_img_checks_and_compares_an_image_written_by_writev() {
    qcow2_util::require_qemu();
    let _dog = common::watchdog("qemu_compare", Duration::from_secs(240));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("v.qcow2");
    let raw = dir.path().join("v.raw");
    let size = 4u64 << 20;
    qcow2_util::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        qcow2_util::p(&image),
        &size.to_string(),
    ]);
    let env = Env::new();
    let chain = qcow2_util::open_chain(&env, &image, true);
    let node = chain.images[0].node.clone();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(11);
    let mut writes = Vec::new();
    for _ in 0..200 {
        let len = rng.below(40_000) as usize + 1;
        let off = rng.below(size - len as u64);
        let data = rng.bytes(len);
        let mut cuts: Vec<usize> = (0..rng.below(9))
            .map(|_| rng.below(len as u64 + 1) as usize)
            .collect();
        cuts.sort_unstable();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        writes.push((off, split_owned(&data, &segment_lengths(len, &cuts))));
    }
    let n = node.clone();
    env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        for (off, owned) in &writes {
            let slices: Vec<IoSlice<'_>> = owned.iter().map(|s| IoSlice::new(s)).collect();
            n.io(&g).writev(*off, IoVec::new(&slices)).await?;
        }
        n.io(&g).flush().await
    })
    .expect("vectored writes");
    qcow2_util::close_chain(&env, chain);
    std::fs::write(&raw, &model).unwrap();
    let check = qcow2_util::qemu_img(&["check", qcow2_util::p(&image)]);
    assert!(check.contains("No errors were found"), "{check}");
    let compare = qcow2_util::qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        qcow2_util::p(&raw),
        qcow2_util::p(&image),
    ]);
    assert!(compare.contains("Images are identical"), "{compare}");
}

/// Records the memory regions of the vectored requests passing through
/// it, then passes them on unchanged.
#[derive(Default)]
struct SegmentProbe {
    seen: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl SegmentProbe {
    fn record<'s>(&self, segs: impl Iterator<Item = &'s [u8]>) {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(segs.map(|s| (s.as_ptr() as usize, s.len())));
    }
}

impl Filter for SegmentProbe {
    fn format_name(&self) -> &'static str {
        "segment-probe"
    }

    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        self.record(iov.segments());
        forward::readv(node, Self::CHILD, offset, iov)
    }

    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        self.record(iov.segments());
        forward::writev(node, Self::CHILD, offset, iov)
    }
}

/// A qcow2 image of `SIZE` bytes with 4 KiB clusters whose file is a
/// `probe` filter over memory: the probe node and the image.
fn qcow2_over_probe(env: &Env, probe: impl Filter) -> (NodeHandle, NodeHandle) {
    let mem = env.mem_node(Vec::new(), MEM_CAPACITY);
    let probe = add_above(env, "probe", &mem, ChildRole::Filtered, probe);
    env.create(&probe, CreateOptions::new(SIZE).cluster_size(4096))
        .expect("create");
    let img = env
        .open(&probe, None, Qcow2Options::default())
        .expect("open");
    (probe, img)
}

/// qcow2 hands the file the caller's own regions, cut at cluster
/// boundaries: no intermediate buffer for data clusters, whether read,
/// rewritten in place or newly allocated whole.
#[test]
fn qcow2_passes_the_callers_regions_to_its_file() {
    let _dog = common::watchdog("qcow2_regions", Duration::from_secs(60));
    let env = Env::new();
    let (probe, img) = qcow2_over_probe(&env, SegmentProbe::default());
    let take_seen = |env: &Env| {
        let p = probe.clone();
        env.main.run(move |bql| {
            let node = p.gs(bql);
            let drv = node.driver_as::<SegmentProbe>().unwrap();
            std::mem::take(&mut *drv.seen.lock().unwrap())
        })
    };
    let inside = |seen: &[(usize, usize)], bufs: &[(usize, usize)]| {
        seen.iter()
            .all(|&(a, n)| bufs.iter().any(|&(b, m)| a >= b && a + n <= b + m))
    };
    for (what, offset) in [("allocating", 8192u64), ("in place", 8192)] {
        let _ = take_seen(&env);
        // Whole clusters 2..6, in segments that do not follow them.
        let data = Rng::new(offset).bytes(4 * 4096);
        let owned = split_owned(&data, &[5000, 3000, 8384]);
        let bufs: Vec<(usize, usize)> = owned
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        let i = img.clone();
        env.on_io(move |mut cx| async move {
            let g = cx.read().await;
            let slices: Vec<IoSlice<'_>> = owned.iter().map(|s| IoSlice::new(s)).collect();
            i.io(&g).writev(offset, IoVec::new(&slices)).await
        })
        .unwrap();
        let seen = take_seen(&env);
        let bytes: usize = seen.iter().map(|s| s.1).sum();
        assert!(
            bytes >= data.len() && inside(&seen, &bufs),
            "{what} writev: {seen:?} not in {bufs:?}"
        );
    }
    let mut owned: Vec<Vec<u8>> = vec![vec![0; 4000], vec![0; 96], vec![0; 12_288]];
    let bufs: Vec<(usize, usize)> = owned
        .iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect();
    let i = img.clone();
    let owned = env
        .on_io(move |mut cx| async move {
            let g = cx.read().await;
            {
                let mut slices: Vec<IoSliceMut<'_>> =
                    owned.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                i.io(&g).readv(8192, IoVecMut::new(&mut slices)).await?;
            }
            Ok::<_, Error>(owned)
        })
        .unwrap();
    let seen = take_seen(&env);
    assert_eq!(
        seen.iter().map(|s| s.1).sum::<usize>(),
        4 * 4096,
        "{seen:?}"
    );
    assert!(inside(&seen, &bufs), "readv: {seen:?} not in {bufs:?}");
    assert_eq!(owned.concat(), Rng::new(8192).bytes(4 * 4096));
    qcow2_is_clean(&env, &img);
}

/// A filter that overrides only `read` and `write` (as a user's filter,
/// or backup's copy-before-write, does) sees every vectored request too:
/// the kit's vectored defaults go through the filter's own callbacks, and
/// the data still arrives whole.
#[derive(Default)]
struct CountingFilter {
    reads: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
}

impl Filter for CountingFilter {
    fn format_name(&self) -> &'static str {
        "counting"
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        forward::read(node, Self::CHILD, offset, buf)
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        forward::write(node, Self::CHILD, offset, buf)
    }
}

#[test]
fn a_filter_that_overrides_read_and_write_sees_vectored_requests() {
    let _dog = common::watchdog("filter_defaults", Duration::from_secs(60));
    let env = Env::new();
    let mem = env.mem_node(Vec::new(), SIZE as usize);
    let top = add_above(
        &env,
        "count",
        &mem,
        ChildRole::Filtered,
        CountingFilter::default(),
    );
    let t = top.clone();
    let got = env
        .on_io(move |mut cx| async move {
            let g = cx.read().await;
            let (x, y, z) = ([1u8; 100], [2u8; 0], [3u8; 412]);
            let segs = [IoSlice::new(&x), IoSlice::new(&y), IoSlice::new(&z)];
            t.io(&g).writev(1000, IoVec::new(&segs)).await?;
            let one = [IoSlice::new(&x)];
            t.io(&g).writev(5000, IoVec::new(&one)).await?;
            let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
            {
                let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
                t.io(&g).readv(1000, IoVecMut::new(&mut segs)).await?;
            }
            Ok::<_, Error>([a, b].concat())
        })
        .unwrap();
    let mut expect = vec![1u8; 100];
    expect.extend([3u8; 412]);
    assert_eq!(got, expect);
    let t = top.clone();
    let (reads, writes) = env.main.run(move |bql| {
        let n = t.gs(bql);
        let f = n.driver_as::<CountingFilter>().unwrap();
        let o = std::sync::atomic::Ordering::Relaxed;
        (f.reads.load(o), f.writes.load(o))
    });
    assert_eq!(
        (reads, writes),
        (1, 2),
        "the filter missed vectored requests"
    );
}

/// The fault injector's rules apply to vectored requests as to
/// contiguous ones: a rule on a range fails the `readv`/`writev` that
/// touches it and lets the others through.
#[test]
fn fault_rules_apply_to_vectored_requests() {
    use blockgraph::drivers::{FaultAction, FaultInjector, FaultOp, FaultRule};
    let _dog = common::watchdog("fault_vectored", Duration::from_secs(60));
    let env = Env::new();
    let mem = env.mem_node(Vec::new(), SIZE as usize);
    let injector = FaultInjector::new();
    let ctl = injector.controller();
    ctl.add_rule(FaultRule::new(FaultOp::Write, FaultAction::EIO).in_range(65536, 4096))
        .unwrap();
    ctl.add_rule(FaultRule::new(FaultOp::Read, FaultAction::EIO).in_range(131072, 4096))
        .unwrap();
    let top = add_above(&env, "fault", &mem, ChildRole::Filtered, injector);
    let t = top.clone();
    let results = env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        let n = t.io(&g);
        let (x, y) = ([1u8; 1000], [2u8; 3096]);
        let segs = [IoSlice::new(&x), IoSlice::new(&y)];
        let w_hit = n.writev(65536 - 100, IoVec::new(&segs)).await;
        let w_miss = n.writev(0, IoVec::new(&segs)).await;
        let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
        let r_hit = {
            let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
            n.readv(131072 + 4000, IoVecMut::new(&mut segs)).await
        };
        let r_miss = {
            let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
            n.readv(0, IoVecMut::new(&mut segs)).await
        };
        (w_hit, w_miss, r_hit, r_miss, [a, b].concat())
    });
    let (w_hit, w_miss, r_hit, r_miss, read) = results;
    assert!(
        w_hit.is_err(),
        "a vectored write into the faulty range succeeded"
    );
    assert!(
        r_hit.is_err(),
        "a vectored read of the faulty range succeeded"
    );
    w_miss.unwrap();
    r_miss.unwrap();
    let mut expect = vec![1u8; 1000];
    expect.extend([2u8; 3096]);
    assert_eq!(read, expect);
    assert_eq!(ctl.failed(), 2);
}

/// A host file of `SIZE` random bytes opened with `aio` (and `O_DIRECT`
/// when `direct`): the file driver gathers and scatters vectors into its
/// host call's own buffer, on both paths. The temporary directory lives as
/// long as the test process (one per case would leave many).
fn file_node(
    env: &Env,
    aio: blockgraph::drivers::Aio,
    direct: bool,
    seed: u64,
) -> (NodeHandle, Vec<u8>) {
    use blockgraph::drivers::{FileDriver, FileOptions};
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let data = Rng::new(seed).bytes(SIZE as usize);
    let path = dir.path().join(env.name("file"));
    std::fs::write(&path, &data).unwrap();
    let opts = FileOptions {
        direct,
        aio: Some(aio),
        ..FileOptions::default()
    };
    let drv = match FileDriver::open(&path, opts) {
        Ok(drv) => drv,
        // O_DIRECT on a file system that refuses it (tmpfs): buffered.
        Err(_) if direct => FileDriver::open(
            &path,
            FileOptions {
                direct: false,
                ..opts
            },
        )
        .unwrap(),
        Err(e) => panic!("opening {}: {e}", path.display()),
    };
    let name = env.name("file");
    let node = env
        .main
        .run(move |bql| bql.write(|w| w.add_node(&name, drv, &[])))
        .expect("add node");
    (node, data)
}

#[test]
fn file_vectored_matches_contiguous_on_both_aio_paths() {
    use blockgraph::drivers::Aio;
    let mut modes = vec![Aio::Threads];
    if Aio::io_uring_available() {
        modes.push(Aio::IoUring);
    }
    for aio in modes {
        for direct in [false, true] {
            let seed = AtomicU64::new(1);
            check_stack(
                if direct { "file, O_DIRECT" } else { "file" },
                16,
                |env| file_node(env, aio, direct, seed.fetch_add(1, Ordering::Relaxed)),
                |_, _| {},
            );
        }
    }
}

/// Records the address of each owned buffer passing through it, then
/// passes it on unchanged; counts the borrowed writes it sees.
#[derive(Default)]
struct BufferProbe {
    seen: std::sync::Mutex<Vec<usize>>,
}

impl Filter for BufferProbe {
    fn format_name(&self) -> &'static str {
        "buffer-probe"
    }

    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        self.seen.lock().unwrap().push(buf.as_ptr() as usize);
        forward::read_buf(node, Self::CHILD, offset, buf)
    }

    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        self.seen.lock().unwrap().push(buf.as_ptr() as usize);
        forward::write_buf(node, Self::CHILD, offset, buf)
    }
}

/// Counts the writes that reach its `write`: it overrides nothing else.
#[derive(Default)]
struct CountWrites(AtomicU64);

impl Filter for CountWrites {
    fn format_name(&self) -> &'static str {
        "count-writes"
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        forward::write(node, Self::CHILD, offset, buf)
    }
}

/// An owned buffer goes down throttle and a raw window as it is (the probe
/// below them sees the caller's buffer, and the same buffer comes back);
/// a filter that overrides only `write` sees owned writes through it (the
/// default does not let them slip past); the backend counts owned
/// requests, marks dirty bitmaps and refuses them where it refuses writes.
#[test]
fn owned_buffers_pass_down_as_they_are_and_are_accounted_like_writes() {
    let _dog = common::watchdog("owned_buffers", Duration::from_secs(60));
    let env = Env::new();
    let mem = env.mem_node(Vec::new(), SIZE as usize + 4096);
    let probe = add_above(
        &env,
        "probe",
        &mem,
        ChildRole::Filtered,
        BufferProbe::default(),
    );
    let raw = RawDriver::with_window(4096, Some(SIZE)).expect("window");
    let raw = add_above(&env, "raw", &probe, ChildRole::File, raw);
    let config = ThrottleConfig {
        iops_total: Some(ThrottleLimit::new(1_000_000)),
        ..ThrottleConfig::default()
    };
    let throttle = ThrottleDriver::with_config(&env.name("group"), config).expect("throttle");
    let top = add_above(&env, "throttle", &raw, ChildRole::Filtered, throttle);
    let other = env.mem_node(Vec::new(), 4096);
    let counted = add_above(
        &env,
        "count",
        &other,
        ChildRole::Filtered,
        CountWrites::default(),
    );
    let (blk, via_count, ro) = marked_backends(&env, [&top, &counted], &[&top], &top);
    let before = blk.stats();
    let (addrs, stats, denied) = env
        .on_io(move |mut cx| async move {
            let mut data = IoBuf::zeroed(8000);
            data.fill(0x5e);
            let sent = data.as_ptr() as usize;
            let data = blk.write_buf(&mut cx, 10_000, data).await?;
            assert_eq!(
                (data.as_ptr() as usize, data[0]),
                (sent, 0x5e),
                "handed back"
            );
            let read = blk.read_buf(&mut cx, 10_000, IoBuf::zeroed(8000)).await?;
            assert!(read.iter().all(|&b| b == 0x5e));
            let read_addr = read.as_ptr() as usize;
            let stats = blk.stats();
            via_count
                .write_buf(&mut cx, 0, IoBuf::copy_from(b"counted"))
                .await?;
            let denied = ro.write_buf(&mut cx, 0, IoBuf::zeroed(512)).await;
            Ok::<_, Error>(((sent, read_addr), stats, denied))
        })
        .expect("owned requests");
    assert_eq!(stats.writes - before.writes, 1);
    assert_eq!(stats.write_bytes - before.write_bytes, 8000);
    assert_eq!(stats.reads - before.reads, 1);
    assert_eq!(stats.read_bytes - before.read_bytes, 8000);
    assert!(
        matches!(denied, Err(Error::ReadOnly(_))),
        "a read-only backend took an owned write: {denied:?}"
    );
    let (p, c, t) = (probe.clone(), counted.clone(), top.clone());
    let (seen, writes, dirty) = env.main.run(move |bql| {
        let seen = p
            .gs(bql)
            .driver_as::<BufferProbe>()
            .unwrap()
            .seen
            .lock()
            .unwrap()
            .clone();
        let writes = c
            .gs(bql)
            .driver_as::<CountWrites>()
            .unwrap()
            .0
            .load(Ordering::Relaxed);
        let dirty = t.gs(bql).dirty_bitmap_snapshot("b").unwrap().dirty_ranges();
        (seen, writes, dirty)
    });
    // The caller's buffers reached the probe below throttle and raw; the
    // counting filter's owned write went through its `write`.
    assert_eq!(seen, vec![addrs.0, addrs.1]);
    assert_eq!(writes, 1);
    // 10_000..18_000 touches granules 2..=4.
    assert_eq!(dirty, vec![(8192, 3 * 4096)]);
}

/// qcow2 hands its file the caller's owned buffer where one run of data
/// clusters covers the request (reads, rewrites in place, and allocating
/// writes of whole clusters); an allocating write of part of a cluster
/// (old content to merge), or a read over an unallocated cluster, takes
/// the lent path and the file sees no owned buffer.
#[test]
fn qcow2_passes_owned_buffers_to_its_file_where_one_run_covers_them() {
    let _dog = common::watchdog("qcow2_owned", Duration::from_secs(60));
    let env = Env::new();
    let (probe, img) = qcow2_over_probe(&env, BufferProbe::default());
    let take_seen = |env: &Env| {
        let p = probe.clone();
        env.main.run(move |bql| {
            let node = p.gs(bql);
            let drv = node.driver_as::<BufferProbe>().unwrap();
            std::mem::take(&mut *drv.seen.lock().unwrap())
        })
    };
    let _ = take_seen(&env); // creating and opening the image
    let i = img.clone();
    let (addrs, got, hole) = env
        .on_io(move |mut cx| async move {
            let g = cx.read().await;
            let n = i.io(&g);
            // Clusters 2..6 are new, written whole: allocated, and the
            // buffer written there as it is.
            let first = IoBuf::copy_from(&Rng::new(1).bytes(4 * 4096));
            let a0 = first.as_ptr() as usize;
            n.write_buf(8192, first).await?;
            // Now stored one after the other: rewritten in place, as it is.
            let second = IoBuf::copy_from(&Rng::new(2).bytes(3 * 4096 - 100));
            let a1 = second.as_ptr() as usize;
            n.write_buf(8192 + 100, second).await?;
            let read = n.read_buf(8192, IoBuf::zeroed(4 * 4096)).await?;
            let a2 = read.as_ptr() as usize;
            // Cluster 6 is unallocated: the read takes the lent path.
            let hole = n.read_buf(8192, IoBuf::zeroed(5 * 4096)).await?;
            // Part of cluster 8, allocated: merged with its old content
            // (zeroes) in a buffer of the driver's own.
            n.write_buf(8 * 4096 + 100, IoBuf::copy_from(&[7; 1000]))
                .await?;
            Ok::<_, Error>(([a0, a1, a2], read, hole))
        })
        .unwrap();
    let seen = take_seen(&env);
    assert_eq!(
        seen,
        addrs.to_vec(),
        "allocated whole, in place, read: as they are"
    );
    let mut expect = Rng::new(1).bytes(4 * 4096);
    expect[100..100 + 3 * 4096 - 100].copy_from_slice(&Rng::new(2).bytes(3 * 4096 - 100));
    assert_eq!(&*got, &expect[..]);
    assert_eq!(&hole[..4 * 4096], &expect[..]);
    assert!(hole[4 * 4096..].iter().all(|&b| b == 0));
    let partial = env.read(&img, 8 * 4096, 4096).unwrap();
    assert!(partial[..100].iter().all(|&b| b == 0));
    assert!(partial[100..1100].iter().all(|&b| b == 7));
    assert!(partial[1100..].iter().all(|&b| b == 0));
    qcow2_is_clean(&env, &img);
}

/// A driver that breaks the owned-buffer rule: it hands back a buffer of
/// another length, or panics with the buffer in hand.
struct BadBuffers;

impl Filter for BadBuffers {
    fn format_name(&self) -> &'static str {
        "bad-buffers"
    }

    fn read_buf<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(async move { Ok(IoBuf::zeroed(buf.len() / 2)) })
    }

    fn write_buf<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        _buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(async move { panic!("bad-buffers panics in write_buf at {offset}") })
    }
}

/// The backend fails a request whose driver hands back a buffer of another
/// length (the caller would index it by the length it asked for), naming
/// the rule; a driver that panics with the buffer fails the request (the
/// buffer is dropped with the panicking future) and the backend goes on.
#[test]
fn a_driver_that_breaks_the_owned_buffer_rule_fails_the_request() {
    let _dog = common::watchdog("bad_buffers", Duration::from_secs(60));
    let env = Env::new();
    let mem = env.mem_node(Vec::new(), 65536);
    let bad = add_above(&env, "bad", &mem, ChildRole::Filtered, BadBuffers);
    let b = bad.clone();
    let blk = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &b, BackendOptions::default())))
        .expect("backend");
    let (short, after) = env.on_io(move |mut cx| async move {
        let short = blk.read_buf(&mut cx, 0, IoBuf::zeroed(4096)).await;
        let caught = std::panic::AssertUnwindSafe(blk.write_buf(&mut cx, 512, IoBuf::zeroed(512)));
        let panicked = futures::FutureExt::catch_unwind(caught).await;
        assert!(panicked.is_err(), "the driver's panic reached the caller");
        // Still usable: a borrowed read goes through the filter's default.
        let mut flat = [1u8; 16];
        let after = blk.read(&mut cx, 0, &mut flat).await.map(|()| flat);
        (short, after)
    });
    let err = short.expect_err("a short buffer must fail the read");
    let msg = err.to_string();
    assert!(
        msg.contains("handed back a buffer of 2048 bytes for a request of 4096")
            && msg.contains("must return the buffer they were given"),
        "{msg}"
    );
    assert_eq!(after.expect("the backend goes on"), [0u8; 16]);
}
