//! `blockdev-backup` through a copy-before-write filter: ports of the core
//! of QEMU's iotests 055 (full backup under guest writes: the target holds
//! the source as of the start, block by block, even where the guest
//! rewrote it during the job), 056 (`sync=top`) and 124 (incremental
//! backups with a dirty bitmap into a chain of qcow2 overlays), on image
//! files made by `qemu-img` and checked with `qemu-img check`/`compare`,
//! with guests writing on two I/O threads during every job; the bitmap's
//! fate per `bitmap-mode`; refusals; drains of every involved node; and
//! random pause/resume/cancel/drains with no hang and no lost guest write.

mod common;
mod job_util;
mod qcow2_util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blockgraph::drivers::{FaultAction, FaultInjector, FaultOp, FaultRule, MemoryDriver};
use blockgraph::job::{
    self, query_jobs, BackupOptions, BackupSync, BitmapSyncMode, CopyBeforeWrite, Job, JobEvent,
    JobEvents, JobFilter, JobOptions, JobStatus,
};
use blockgraph::{BlockBackend, ChildRole, DirtyBitmapOptions, Error, NodeHandle, Result};

use common::jobs::{cancelled, completed, verbs_and_drains, while_drained};
use common::{join, watchdog};
use job_util::{
    add_vda, apply, assert_same, chain_contents, check_clean, compare, create, flush, guest, img,
    mem_chain, qemu_io_in, read_disk, remove_backend, until_null, CLUSTER, CLUSTERS, SIZE,
};
use qcow2_util::{open_chain, require_qemu, Env, Rng};

fn start_backup(env: &Env, options: JobOptions, backup: BackupOptions) -> Result<(Job, JobEvents)> {
    let io = env.io.handle();
    env.main.run(move |bql| {
        let job = job::backup(bql, &io, options, backup)?;
        let events = job.events();
        Ok((job, events))
    })
}

fn mem_target(env: &Env) -> NodeHandle {
    let name = env.name("target");
    env.main
        .run(move |bql| bql.write(|w| w.add_node(&name, MemoryDriver::new(SIZE), &[])))
        .unwrap()
}

/// Reads all of `node` directly (the job is gone, nothing else uses it).
fn node_contents(env: &Env, node: &NodeHandle) -> Vec<u8> {
    env.read(node, 0, SIZE as usize).unwrap()
}

fn filter_of(env: &Env, name: &str) -> NodeHandle {
    let name = name.to_owned();
    env.main
        .run(move |bql| bql.node(&name).map(|n| n.to_handle()))
        .expect("the job's filter")
}

/// Clusters that `writes` touched.
fn clusters_of(writes: &BTreeMap<u64, Vec<u8>>, cluster: u64) -> BTreeSet<u64> {
    writes.keys().map(|o| o / cluster).collect()
}

fn bitmap_clusters(env: &Env, node: &NodeHandle, name: &str, cluster: u64) -> BTreeSet<u64> {
    let (n, name) = (node.clone(), name.to_owned());
    let snap = env
        .main
        .run(move |bql| n.gs(bql).dirty_bitmap_snapshot(&name))
        .unwrap();
    let mut out = BTreeSet::new();
    for (s, l) in snap.dirty_ranges() {
        out.extend(s / cluster..(s + l).div_ceil(cluster));
    }
    out
}

fn bitmap_busy(env: &Env, node: &NodeHandle, name: &str) -> bool {
    let (n, name) = (node.clone(), name.to_owned());
    env.main.run(move |bql| {
        n.gs(bql)
            .dirty_bitmaps()
            .into_iter()
            .find(|b| b.name == name)
            .expect("the bitmap")
            .busy
    })
}

#[test]
fn full_backup_of_a_memory_chain_holds_the_start_while_guests_write() {
    let _w = watchdog("backup_full_mem", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let target = mem_target(&env);
    let mut options = JobOptions::new("full");
    options.speed = 2 << 20; // two seconds: the guests overlap it
    let (job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(&chain.top, &target, BackupSync::Full),
    )
    .unwrap();
    // Started after the job: the backup's point in time is before them.
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &chain.vda, 0, 1, stop.clone(), 32);
    let g1 = guest(&env.io2, &chain.vda, 1, 2, stop.clone(), 32);
    let filter = filter_of(&env, "full-backup");
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut disk = chain_contents();
    let (w0, w1) = (join(g0, "guest 0"), join(g1, "guest 1"));
    apply(&mut disk, &w0);
    apply(&mut disk, &w1);
    assert_same(&read_disk(&env.io, &chain.vda), &disk);
    assert_same(&node_contents(&env, &target), &chain_contents());
    assert!(env
        .main
        .run(move |bql| !filter.gs(bql).is_in_graph() && query_jobs(bql).is_empty()));
    drop(job);
}

// ---- image files made and checked by QEMU's tools ---------------------

/// Runs `qemu-io` commands on `image`, applying each to `model`:
/// `(cluster, Some(pattern))` writes the pattern over the cluster, `None`
/// writes zeroes.
fn fill(dir: &Path, image: &str, writes: &[(u64, Option<u8>)], model: &mut [u8]) {
    let mut commands = Vec::new();
    for (i, p) in writes {
        let at = i * CLUSTER;
        commands.push(match p {
            Some(p) => format!("write -P {p} {at} {CLUSTER}"),
            None => format!("write -z {at} {CLUSTER}"),
        });
        model[at as usize..(at + CLUSTER) as usize].fill(p.unwrap_or(0));
    }
    qemu_io_in(dir, image, commands);
}

/// The clusters `image` itself stores (`qemu-img map`, depth 0).
fn own_clusters(dir: &Path, image: &str) -> BTreeSet<u64> {
    let out = img(dir, &["map", "--output=json", "-f", "qcow2", image]);
    let map: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut own = BTreeSet::new();
    for e in map.as_array().expect("a list") {
        if e["depth"] == 0 && e["present"] == true {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            own.extend(s / CLUSTER..(s + l).div_ceil(CLUSTER));
        }
    }
    own
}

/// The source image of the file tests: data in three clusters of four.
fn source_image(dir: &Path) -> Vec<u8> {
    create(dir, "source.img", None);
    let mut model = vec![0u8; SIZE as usize];
    let writes: Vec<_> = (0..CLUSTERS)
        .filter(|i| i % 4 != 3)
        .map(|i| (i, Some(0x10 + (i % 13) as u8)))
        .collect();
    fill(dir, "source.img", &writes, &mut model);
    model
}

/// Guests on both I/O threads, started now; `stop` ends them.
fn guests(env: &Env, vda: &BlockBackend, seed: u64, stop: &Arc<AtomicBool>) -> Guests {
    Guests(
        guest(&env.io, vda, 0, seed, stop.clone(), 24),
        guest(&env.io2, vda, 1, seed + 1, stop.clone(), 24),
    )
}

struct Guests(
    blockgraph::TaskHandle<BTreeMap<u64, Vec<u8>>>,
    blockgraph::TaskHandle<BTreeMap<u64, Vec<u8>>>,
);

impl Guests {
    /// Joins both; what they wrote, in one map (their lanes never overlap).
    fn join(self) -> BTreeMap<u64, Vec<u8>> {
        let mut all = join(self.0, "guest 0");
        all.extend(join(self.1, "guest 1"));
        all
    }
}

fn copy_options() -> job::CopyOptions {
    job::CopyOptions {
        chunk_size: 128 << 10,
        in_flight: 4,
        alignment: 1,
    }
}

/// iotest 055's core: a full backup of a qcow2 image into a new qcow2
/// image while guests write on two I/O threads; the target holds the
/// source as of the job's start, block by block, even where the guests
/// rewrote it during the job.
#[test]
fn full_backup_holds_the_source_as_of_the_start_055() {
    let _w = watchdog("backup_055", Duration::from_secs(180));
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let start = source_image(d);
    create(d, "target.img", None);
    let env = Env::new();
    let source = open_chain(&env, &d.join("source.img"), true);
    let target = open_chain(&env, &d.join("target.img"), true);
    let (src, tgt) = (source.images[0].node.clone(), target.images[0].node.clone());
    let vda = add_vda(&env, &src);
    let mut options = JobOptions::new("backup055");
    options.speed = 3 << 20; // more than a second: the guests overlap it
    let (_job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(&src, &tgt, BackupSync::Full).copy_options(copy_options()),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let g = guests(&env, &vda, 55, &stop);
    // The guests' writes copy old data before they land.
    let filter = filter_of(&env, "backup055-backup");
    common::wait_until("a guest write copied its cluster first", || {
        let f = filter.clone();
        env.main.run(move |bql| {
            let n = f.gs(bql);
            !n.is_in_graph()
                || n.driver_as::<JobFilter<CopyBeforeWrite>>()
                    .is_some_and(|d| d.inner().bytes_copied_before_writes() > 0)
        })
    });
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let wrote = g.join();
    assert!(wrote.len() >= 48);
    let mut now = start.clone();
    apply(&mut now, &wrote);
    assert_same(&read_disk(&env.io, &vda), &now);
    assert_same(&node_contents(&env, &tgt), &start);
    // The filter is gone: vda is on the source again.
    let s = src.clone();
    assert!(env
        .main
        .run(move |bql| { !filter.gs(bql).is_in_graph() && s.gs(bql).parents().len() == 1 }));
    flush(&env, &vda);
    remove_backend(&env, &vda);
    qcow2_util::close_chain(&env, source);
    qcow2_util::close_chain(&env, target);
    drop(env);
    check_clean(d, "source.img");
    check_clean(d, "target.img");
    compare(d, "target.img", "qcow2", &start);
    compare(d, "source.img", "qcow2", &now);
}

/// iotest 056's core: `sync=top` of an overlay copies only what the
/// overlay itself stores (data and zeroes that hide its backing), into a
/// target backed by the same backing image; the target's chain reads as
/// the source did at the start.
#[test]
fn sync_top_copies_only_what_the_top_image_stores_056() {
    let _w = watchdog("backup_056", Duration::from_secs(180));
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "base.img", None);
    let mut start = vec![0u8; SIZE as usize];
    let base: Vec<_> = (0..CLUSTERS)
        .map(|i| (i, Some(0x20 + (i % 7) as u8)))
        .collect();
    fill(d, "base.img", &base, &mut start);
    create(d, "source.img", Some("base.img"));
    let top: Vec<_> = (0..CLUSTERS)
        .filter_map(|i| match i % 7 {
            0 | 3 => Some((i, Some(0x40 + (i % 5) as u8))),
            5 => Some((i, None)),
            _ => None,
        })
        .collect();
    let top_clusters: BTreeSet<u64> = top.iter().map(|(i, _)| *i).collect();
    fill(d, "source.img", &top, &mut start);
    create(d, "target.img", Some("base.img"));
    let env = Env::new();
    let source = open_chain(&env, &d.join("source.img"), true);
    let target = open_chain(&env, &d.join("target.img"), true);
    let (src, tgt) = (source.images[0].node.clone(), target.images[0].node.clone());
    let vda = add_vda(&env, &src);
    let mut options = JobOptions::new("backup056");
    options.speed = 1 << 20;
    let (_job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(&src, &tgt, BackupSync::Top).copy_options(copy_options()),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let g = guests(&env, &vda, 56, &stop);
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut now = start.clone();
    apply(&mut now, &g.join());
    assert_same(&read_disk(&env.io, &vda), &now);
    assert_same(&node_contents(&env, &tgt), &start);
    flush(&env, &vda);
    remove_backend(&env, &vda);
    qcow2_util::close_chain(&env, source);
    qcow2_util::close_chain(&env, target);
    drop(env);
    for i in ["base.img", "source.img", "target.img"] {
        check_clean(d, i);
    }
    compare(d, "target.img", "qcow2", &start);
    compare(d, "source.img", "qcow2", &now);
    // Only the top's clusters were copied, guest writes or not.
    assert_eq!(own_clusters(d, "target.img"), top_clusters);
}

/// Guest writes of known blocks through `vda`, not concurrent with
/// anything: `(offset, byte)` each 4 KiB.
fn write_blocks(env: &Env, vda: &BlockBackend, seed: u64, n: usize) -> BTreeMap<u64, Vec<u8>> {
    let blk = vda.clone();
    join(
        env.io.spawn(move |mut cx| async move {
            let mut rng = Rng::new(seed);
            let mut wrote = BTreeMap::new();
            for _ in 0..n {
                let off = rng.below(SIZE / 4096) * 4096;
                let data = rng.bytes(4096);
                blk.write(&mut cx, off, &data).await.unwrap();
                wrote.insert(off, data);
            }
            wrote
        }),
        "guest writes",
    )
}

/// iotest 124's core: a full backup that starts a bitmap, guest writes,
/// then an incremental backup with the bitmap into a new qcow2 overlay
/// backed by the full backup — guests writing during both jobs. The chain
/// reproduces the source at the incremental's start; the bitmap then holds
/// only what changed since (cleared of what was copied), is free again,
/// and a cancelled incremental keeps every bit.
#[test]
fn incremental_backups_chain_up_to_the_source_124() {
    let _w = watchdog("backup_124", Duration::from_secs(240));
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let start = source_image(d);
    create(d, "full.img", None);
    let env = Env::new();
    let source = open_chain(&env, &d.join("source.img"), true);
    let full = open_chain(&env, &d.join("full.img"), true);
    let (src, full_node) = (source.images[0].node.clone(), full.images[0].node.clone());
    let vda = add_vda(&env, &src);

    // The bitmap and the full backup at one instant (QEMU's transaction).
    let mut options = JobOptions::new("full0");
    options.speed = 4 << 20;
    let (s, f, io) = (src.clone(), full_node.clone(), env.io.handle());
    let backup =
        BackupOptions::new(&src, &full_node, BackupSync::Full).copy_options(copy_options());
    let (_job, mut events) = env
        .main
        .run(move |bql| -> Result<_> {
            s.gs(bql)
                .add_dirty_bitmap("bitmap0", DirtyBitmapOptions::new().granularity(CLUSTER))?;
            let _ = f;
            let job = job::backup(bql, &io, options, backup)?;
            let events = job.events();
            Ok((job, events))
        })
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let g = guests(&env, &vda, 124, &stop);
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let during_full = g.join();
    assert_same(&node_contents(&env, &full_node), &start);
    // The bitmap saw every write since the full backup started.
    let mut changed = clusters_of(&during_full, CLUSTER);
    assert_eq!(bitmap_clusters(&env, &src, "bitmap0", CLUSTER), changed);
    let more = write_blocks(&env, &vda, 1240, 20);
    changed.extend(clusters_of(&more, CLUSTER));
    assert_eq!(bitmap_clusters(&env, &src, "bitmap0", CLUSTER), changed);
    let mut at_incremental = start.clone();
    apply(&mut at_incremental, &during_full);
    apply(&mut at_incremental, &more);
    // The full backup's image closes; the overlay opens on it.
    qcow2_util::close_chain(&env, full);
    check_clean(d, "full.img");
    create(d, "inc1.img", Some("full.img"));
    let inc = open_chain(&env, &d.join("inc1.img"), true);
    assert_eq!(inc.images.len(), 2, "inc1 over full");
    let inc_node = inc.images[0].node.clone();
    let mut options = JobOptions::new("inc1");
    options.speed = 1 << 20;
    let (job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(&src, &inc_node, BackupSync::incremental("bitmap0"))
            .copy_options(copy_options()),
    )
    .unwrap();
    assert!(
        bitmap_busy(&env, &src, "bitmap0"),
        "busy while the job runs"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let g = guests(&env, &vda, 125, &stop);
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let during_inc = g.join();
    drop(job);
    // The chain inc1 → full reads as the source did at the start.
    assert_same(&node_contents(&env, &inc_node), &at_incremental);
    // The bitmap: only what changed since the incremental started; free.
    assert_eq!(
        bitmap_clusters(&env, &src, "bitmap0", CLUSTER),
        clusters_of(&during_inc, CLUSTER)
    );
    assert!(!bitmap_busy(&env, &src, "bitmap0"));
    // inc1 stores only the clusters the bitmap named (plus nothing else).
    let mut now = at_incremental.clone();
    apply(&mut now, &during_inc);

    // A cancelled incremental into a second overlay keeps every bit, and
    // gains what the guests wrote meanwhile.
    qcow2_util::close_chain(&env, inc);
    create(d, "inc2.img", Some("inc1.img"));
    let inc2 = open_chain(&env, &d.join("inc2.img"), true);
    let before = bitmap_clusters(&env, &src, "bitmap0", CLUSTER);
    let mut options = JobOptions::new("inc2");
    options.speed = 64 << 10; // slow: cancelled long before the end
    let (job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(
            &src,
            &inc2.images[0].node,
            BackupSync::incremental("bitmap0"),
        )
        .copy_options(job::CopyOptions {
            chunk_size: CLUSTER,
            ..copy_options()
        }),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let g = guests(&env, &vda, 126, &stop);
    common::wait_until("the incremental has copied something", || {
        job.progress().0 > 0
    });
    let j = job.clone();
    env.main.run(move |bql| j.cancel(bql, false)).unwrap();
    let all = until_null(&mut events);
    assert!(cancelled(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let during_cancelled = g.join();
    let mut kept = before.clone();
    kept.extend(clusters_of(&during_cancelled, CLUSTER));
    assert_eq!(bitmap_clusters(&env, &src, "bitmap0", CLUSTER), kept);
    assert!(!bitmap_busy(&env, &src, "bitmap0"));
    apply(&mut now, &during_cancelled);
    assert_same(&read_disk(&env.io, &vda), &now);

    flush(&env, &vda);
    remove_backend(&env, &vda);
    qcow2_util::close_chain(&env, inc2);
    qcow2_util::close_chain(&env, source);
    drop(env);
    for i in ["source.img", "full.img", "inc1.img", "inc2.img"] {
        check_clean(d, i);
    }
    compare(d, "full.img", "qcow2", &start);
    compare(d, "inc1.img", "qcow2", &at_incremental);
    compare(d, "source.img", "qcow2", &now);
    // The incremental image stores only clusters the bitmap named.
    assert!(own_clusters(d, "inc1.img").is_subset(&changed));
}

/// QEMU's `bitmap-mode` on success and on failure (a target that fails
/// writes in one cluster the bitmap names), with no guest I/O during the
/// job so the outcome is exact.
#[test]
fn bitmap_modes_on_success_and_failure() {
    let _w = watchdog("backup_bitmap_modes", Duration::from_secs(120));
    let env = Env::new();
    for mode in [
        BitmapSyncMode::OnSuccess,
        BitmapSyncMode::Always,
        BitmapSyncMode::Never,
    ] {
        for fail in [false, true] {
            let chain = mem_chain(&env, false);
            let top = chain.top.clone();
            env.main
                .run(move |bql| top.gs(bql).add_dirty_bitmap("b", DirtyBitmapOptions::new()))
                .unwrap();
            let wrote = write_blocks(&env, &chain.vda, 7, 12);
            let named = clusters_of(&wrote, CLUSTER);
            let bad = *named.iter().nth(named.len() / 2).unwrap();
            let injector = FaultInjector::new();
            if fail {
                injector
                    .add_rule(
                        FaultRule::new(FaultOp::Write, FaultAction::Fail(5))
                            .in_range(bad * CLUSTER, CLUSTER),
                    )
                    .unwrap();
            }
            let (mem, name) = (mem_target(&env), env.name("fault"));
            let target = env
                .main
                .run(move |bql| {
                    bql.write(|w| w.add_node(&name, injector, &[(ChildRole::Filtered, &mem)]))
                })
                .unwrap();
            let (_job, mut events) = start_backup(
                &env,
                JobOptions::new("modes"),
                BackupOptions::new(
                    &chain.top,
                    &target,
                    BackupSync::Bitmap {
                        bitmap: "b".into(),
                        mode,
                    },
                ),
            )
            .unwrap();
            let all = until_null(&mut events);
            assert_eq!(completed(&all), !fail, "{mode:?}: {all:?}");
            let left = bitmap_clusters(&env, &chain.top, "b", CLUSTER);
            match (mode, fail) {
                (BitmapSyncMode::OnSuccess | BitmapSyncMode::Always, false) => {
                    assert!(left.is_empty(), "{mode:?}: {left:?}")
                }
                (BitmapSyncMode::OnSuccess | BitmapSyncMode::Never, _) => {
                    assert_eq!(left, named, "{mode:?} fail={fail}")
                }
                (BitmapSyncMode::Always, true) => {
                    assert!(left.contains(&bad) && left.is_subset(&named), "{left:?}")
                }
            }
            if !fail {
                // What the bitmap named is on the target, nothing else.
                let disk = read_disk(&env.io, &chain.vda);
                let got = node_contents(&env, &target);
                for c in 0..CLUSTERS {
                    let r = (c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize;
                    if named.contains(&c) {
                        assert!(got[r.clone()] == disk[r], "cluster {c}");
                    } else {
                        assert!(got[r].iter().all(|b| *b == 0), "cluster {c} copied");
                    }
                }
            }
            assert!(!bitmap_busy(&env, &chain.top, "b"));
            remove_backend(&env, &chain.vda);
        }
    }
}

#[test]
fn refusals_change_nothing() {
    let _w = watchdog("backup_refusals", Duration::from_secs(60));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let target = mem_target(&env);
    let small = {
        let name = env.name("small");
        env.main
            .run(move |bql| bql.write(|w| w.add_node(&name, MemoryDriver::new(SIZE / 2), &[])))
            .unwrap()
    };
    let top = chain.top.clone();
    env.main
        .run(move |bql| top.gs(bql).add_dirty_bitmap("b", DirtyBitmapOptions::new()))
        .unwrap();
    let before = env.main.run(|bql| common::structure(bql.graph()));
    let refuse = |backup: BackupOptions, what: &dyn Fn(&Error) -> bool| {
        let err = start_backup(&env, JobOptions::new("refused"), backup).unwrap_err();
        assert!(what(&err), "{err}");
        assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
        assert_eq!(env.main.run(|bql| common::structure(bql.graph())), before);
    };
    let invalid = |words: &'static str| move |e: &Error| matches!(e, Error::InvalidArgument(m) if m.contains(words));
    refuse(
        BackupOptions::new(&chain.top, &chain.top, BackupSync::Full),
        &invalid("in its backing chain"),
    );
    refuse(
        BackupOptions::new(&chain.top, &chain.mid, BackupSync::Full),
        &invalid("in its backing chain"),
    );
    refuse(
        BackupOptions::new(&chain.top, &small, BackupSync::Full),
        &invalid("is smaller than"),
    );
    refuse(
        BackupOptions::new(&chain.top, &target, BackupSync::Full).cluster_size(1000),
        &invalid("power of two"),
    );
    refuse(
        BackupOptions::new(&chain.top, &target, BackupSync::incremental("nope")),
        &|e| matches!(e, Error::NoSuchBitmap { .. }),
    );
    // A step at the start that fails, or panics, leaves no filter behind.
    refuse(
        BackupOptions::new(&chain.top, &target, BackupSync::Full)
            .at_start(|_| Err(Error::InvalidArgument("the step says no".into()))),
        &invalid("the step says no"),
    );
    let backup = BackupOptions::new(&chain.top, &target, BackupSync::Full)
        .at_start(|_| panic!("a panicking step at the start"));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        start_backup(&env, JobOptions::new("panicky"), backup)
    }));
    let message = panicked.expect_err("the step's panic reaches the caller");
    assert_eq!(
        message.downcast_ref::<&str>().copied(),
        Some("a panicking step at the start")
    );
    assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
    assert!(env.main.run(|bql| bql.node("panicky-backup").is_none()));
    assert_eq!(env.main.run(|bql| common::structure(bql.graph())), before);
    // A bitmap in use by one backup cannot serve a second one.
    let mut options = JobOptions::new("holder");
    options.speed = 64 << 10;
    let wrote = write_blocks(&env, &chain.vda, 3, 8);
    assert!(!wrote.is_empty());
    let (job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(&chain.top, &target, BackupSync::incremental("b")),
    )
    .unwrap();
    let other = mem_target(&env);
    let err = start_backup(
        &env,
        JobOptions::new("second"),
        BackupOptions::new(&chain.top, &other, BackupSync::incremental("b")),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BitmapBusy(_)), "{err}");
    let j = job.clone();
    env.main.run(move |bql| j.cancel(bql, false)).unwrap();
    assert!(cancelled(&until_null(&mut events)));
    assert!(env.main.run(|bql| bql.node("holder-backup").is_none()));
    assert!(!bitmap_busy(&env, &chain.top, "b"));
    let o = other.clone();
    env.main
        .run(move |bql| {
            let d = bql.drain(&o);
            bql.write(|w| w.remove_node(&d))
        })
        .unwrap();
    assert_eq!(env.main.run(|bql| common::structure(bql.graph())), before);
}

/// Holds a drain of `node` from a main-loop task for `hold`; while it is
/// held the job is not running, and (paused) makes no progress.
fn drain_during(env: &Env, job: &Job, node: &NodeHandle, hold: Duration) {
    while_drained(&env.main, node, || {
        // Every node a backup touches is below its filter, and its copies
        // enter at the filter: the drain waited for them all.
        let status = job.status();
        // A copy that finished just before the drain's wait ended may still
        // be counted after it: let that settle, then the count must stand.
        thread::sleep(hold);
        let progress = job.progress().0;
        thread::sleep(hold);
        if !matches!(status, JobStatus::Concluded | JobStatus::Null) {
            assert_ne!(status, JobStatus::Running, "drained '{}'", node.name());
        }
        if status == JobStatus::Paused {
            assert_eq!(
                job.progress().0,
                progress,
                "the job went on while '{}' was drained",
                node.name()
            );
        }
    });
}

#[test]
fn a_drain_of_each_involved_node_pauses_the_backup_which_then_completes() {
    let _w = watchdog("backup_drain_each_node", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let target = mem_target(&env);
    let mut options = JobOptions::new("drained");
    options.speed = 512 << 10; // 4 MiB take seconds
    let (job, mut events) = start_backup(
        &env,
        options,
        BackupOptions::new(&chain.top, &target, BackupSync::Full).copy_options(job::CopyOptions {
            chunk_size: CLUSTER,
            ..Default::default()
        }),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let g = guests(&env, &chain.vda, 9, &stop);
    common::wait_until("the backup has copied something", || job.progress().0 > 0);
    let filter = filter_of(&env, "drained-backup");
    for node in [&chain.top, &chain.base, &target, &filter] {
        assert_eq!(job.status(), JobStatus::Running, "before '{}'", node.name());
        drain_during(&env, &job, node, Duration::from_millis(100));
        common::wait_until("the job runs again", || job.status() == JobStatus::Running);
    }
    let j = job.clone();
    env.main.run(move |bql| j.set_speed(bql, 0)).unwrap();
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    let paused = all
        .iter()
        .filter(|e| **e == JobEvent::StatusChange(JobStatus::Paused))
        .count();
    assert!(paused >= 4, "paused once per drain: {all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut disk = chain_contents();
    apply(&mut disk, &g.join());
    assert_same(&read_disk(&env.io, &chain.vda), &disk);
    assert_same(&node_contents(&env, &target), &chain_contents());
}

/// Ten rounds of random pause, resume, set-speed, cancel and drains of
/// the source, its backing, the target and the filter during a backup
/// (full or incremental) with guests on two I/O threads: no hang, no lost
/// guest write, a completed backup holds the start, a cancelled one leaves
/// the source alone and the graph as it was.
#[test]
fn pause_resume_cancel_and_drains_at_random_points_lose_no_guest_write() {
    let _w = watchdog("backup_random_verbs", Duration::from_secs(300));
    let env = Env::new();
    let mut rng = Rng::new(0x000b_ac4b);
    for round in 0..10u64 {
        let chain = mem_chain(&env, false);
        let target = mem_target(&env);
        let incremental = round % 3 == 2;
        let sync = if incremental {
            let top = chain.top.clone();
            env.main
                .run(move |bql| top.gs(bql).add_dirty_bitmap("b", DirtyBitmapOptions::new()))
                .unwrap();
            BackupSync::incremental("b")
        } else {
            BackupSync::Full
        };
        // Incremental: written before the job, what the bitmap names.
        let before = if incremental {
            write_blocks(&env, &chain.vda, round, 24)
        } else {
            BTreeMap::new()
        };
        let mut start = chain_contents();
        apply(&mut start, &before);
        let mut options = JobOptions::new(format!("backup{round}"));
        options.speed = 4 << 20;
        let (job, mut events) = start_backup(
            &env,
            options,
            BackupOptions::new(&chain.top, &target, sync).copy_options(job::CopyOptions {
                chunk_size: CLUSTER * (1 + round % 3),
                in_flight: 1 + (round % 4) as usize,
                alignment: 1,
            }),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let g = guests(&env, &chain.vda, 100 + round * 2, &stop);
        let filter = filter_of(&env, &format!("backup{round}-backup"));
        let involved = [
            chain.top.clone(),
            chain.mid.clone(),
            target.clone(),
            filter.clone(),
        ];
        let was_cancelled = verbs_and_drains(
            &env.main,
            &job,
            &involved,
            |n| rng.below(n),
            |node| drain_during(&env, &job, node, Duration::from_millis(40)),
        );
        let all = until_null(&mut events);
        stop.store(true, Ordering::SeqCst);
        let mut disk = start.clone();
        apply(&mut disk, &g.join());
        assert_same(&read_disk(&env.io, &chain.vda), &disk);
        if completed(&all) {
            let got = node_contents(&env, &target);
            if incremental {
                for c in clusters_of(&before, CLUSTER) {
                    let r = (c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize;
                    assert!(got[r.clone()] == start[r], "round {round}: cluster {c}");
                }
            } else {
                assert_same(&got, &start);
            }
        } else {
            assert!(was_cancelled, "round {round}: the job failed: {all:?}");
            if incremental {
                let named = bitmap_clusters(&env, &chain.top, "b", CLUSTER);
                assert!(
                    clusters_of(&before, CLUSTER).is_subset(&named),
                    "round {round}"
                );
            }
        }
        let f = filter.clone();
        assert!(env
            .main
            .run(move |bql| !f.gs(bql).is_in_graph() && query_jobs(bql).is_empty()));
        let report = env.check(&chain.top, false).unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
        remove_backend(&env, &chain.vda);
    }
}
