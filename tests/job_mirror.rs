//! `blockdev-mirror` / `drive-mirror`: the core of QEMU's iotest 041 on
//! real image files (a two-level qcow2 chain made by `qemu-img`, mirrored
//! with sync full/top to a new qcow2 or raw image in both copy modes,
//! completed (pivot) or cancelled after READY, while guests write and read
//! on two I/O threads for the whole job; the data checked block by block
//! through the guest's backend; every image passes `qemu-img check` and
//! holds what it should under `qemu-img compare`), sync=none onto a target
//! that already holds the data, refusals, a drain of each involved node,
//! pause/resume/cancel/complete and drains at random points, and a pivot
//! under heavy guest write load.

mod common;
mod job_util;
mod qcow2_util;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blockgraph::job::{
    self, query_jobs, CopyMode, ImageFormat, Job, JobEvent, JobOptions, JobStatus, MirrorOptions,
    MirrorSync, MirrorTarget,
};
use blockgraph::{BackendOptions, BlockBackend, Error, NodeHandle, Result};

use common::jobs::{backend_node, cancelled, completed, random_verbs, while_drained, Verb};
use common::{join, watchdog};
use job_util::{
    add_vda, apply, assert_same, chain_contents, chain_nodes, check_clean, close, compare, create,
    flush, guest, mem_chain, qemu_io_in, read_disk, remove_backend, until_null, until_status,
    CLUSTER, CLUSTERS, SIZE,
};
use qcow2_util::{open_chain, require_qemu, Env, Rng};

fn start(env: &Env, options: JobOptions, mirror: MirrorOptions) -> Result<(Job, job::JobEvents)> {
    let io = env.io.handle();
    env.main.run(move |bql| {
        let job = job::mirror(bql, &io, options, mirror)?;
        let events = job.events();
        Ok((job, events))
    })
}

fn verb(
    env: &Env,
    job: &Job,
    f: impl FnOnce(&Job, &blockgraph::Bql) -> Result<()> + Send + 'static,
) -> Result<()> {
    let j = job.clone();
    env.main.run(move |bql| f(&j, bql))
}

/// base.img <- top.img in `dir` by `qemu-img`, with data in both layers
/// (whole and half clusters) and zeroes in top over base's data. Returns
/// what base shows and what top (the guest) shows.
fn make_chain(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    create(dir, "base.img", None);
    create(dir, "top.img", Some("base.img"));
    let mut base = vec![0u8; SIZE as usize];
    let mut top = vec![0u8; SIZE as usize];
    let (mut cb, mut ct) = (Vec::new(), Vec::new());
    for i in 0..CLUSTERS {
        let at = i * CLUSTER;
        let len = if i % 2 == 0 { CLUSTER } else { CLUSTER / 2 };
        let r = at as usize..(at + len) as usize;
        if i % 4 != 1 {
            let p = 0x10 + (i % 7) as u8;
            cb.push(format!("write -P {p} {at} {len}"));
            base[r.clone()].fill(p);
            top[r.clone()].fill(p);
        }
        if i % 3 == 0 {
            let p = 0x30 + (i % 5) as u8;
            ct.push(format!("write -P {p} {at} {len}"));
            top[r].fill(p);
        } else if i % 11 == 2 {
            ct.push(format!("write -z {at} {CLUSTER}"));
            top[at as usize..(at + CLUSTER) as usize].fill(0);
        }
    }
    qemu_io_in(dir, "base.img", cb);
    qemu_io_in(dir, "top.img", ct);
    (base, top)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Complete,
    CancelAfterReady,
}

/// iotest 041's core: mirror top.img (guest disk) to a new `format`
/// image, guests on two I/O threads throughout, READY, then `end`.
fn mirror_041(sync: MirrorSync, mode: CopyMode, format: ImageFormat, end: End) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base_view, disk0) = make_chain(d);
    let env = Env::new();
    let chain = open_chain(&env, &d.join("top.img"), true);
    let top = chain.images[0].node.clone();
    let vda = add_vda(&env, &top);
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &vda, 0, 40, stop.clone(), 32);
    let g1 = guest(&env.io2, &vda, 1, 41, stop.clone(), 32);

    let mut options = JobOptions::new("mirror0");
    options.speed = 8 << 20; // the guests overlap the copy
    let target_path = d.join("target.img");
    let mirror = MirrorOptions::new(
        &top,
        MirrorTarget::NewImage {
            path: target_path.clone(),
            format,
            node_name: "target".into(),
            backing: sync == MirrorSync::Top,
        },
    )
    .sync(sync)
    .copy_mode(mode)
    .copy_options(job::CopyOptions {
        chunk_size: 256 << 10,
        in_flight: 4,
        alignment: 1,
    });
    let (job, mut events) = start(&env, options, mirror).unwrap();
    assert_eq!(backend_node(&env.main, &vda), "mirror0-mirror");
    // Rate-limited below what the guests dirty, a background mirror never
    // converges (QEMU's too): lift the limit once the copy is under way.
    common::wait_until("the mirror has copied something", || job.progress().0 > 0);
    verb(&env, &job, |j, bql| j.set_speed(bql, 0)).unwrap();
    until_status(&job, JobStatus::Ready);
    // (Progress is not compared with its total here: the guests keep
    // dirtying, and the job counts each new dirty run as more work.)
    assert!(job.progress().0 > 0);
    let target = env
        .main
        .run(|bql| bql.node("target").map(|n| n.to_handle()))
        .expect("the target node");
    let mut disk = disk0.clone();
    match end {
        End::Complete => {
            // The pivot happens with the guests still writing.
            thread::sleep(Duration::from_millis(50));
            verb(&env, &job, |j, bql| j.complete(bql)).unwrap();
            let all = until_null(&mut events);
            assert!(completed(&all), "{all:?}");
            assert!(all.contains(&JobEvent::Ready), "{all:?}");
            stop.store(true, Ordering::SeqCst);
            apply(&mut disk, &join(g0, "guest 0"));
            apply(&mut disk, &join(g1, "guest 1"));
            assert_eq!(backend_node(&env.main, &vda), "target", "vda pivoted");
        }
        End::CancelAfterReady => {
            stop.store(true, Ordering::SeqCst);
            apply(&mut disk, &join(g0, "guest 0"));
            apply(&mut disk, &join(g1, "guest 1"));
            verb(&env, &job, |j, bql| j.cancel(bql, false)).unwrap();
            let all = until_null(&mut events);
            // QEMU: a ready mirror cancelled without force completes.
            assert!(completed(&all), "{all:?}");
            assert_eq!(backend_node(&env.main, &vda), top.name(), "vda stays");
        }
    }
    assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
    assert!(env.main.run(|bql| bql.node("mirror0-mirror").is_none()));
    // The data, block by block, through the guest's backend (from the
    // target after a pivot).
    assert_same(&read_disk(&env.io, &vda), &disk);
    flush(&env, &vda);
    // Close everything so QEMU's tools may open the files.
    let target_file = env
        .main
        .run(|bql| bql.node("target-file").map(|n| n.to_handle()));
    let mut nodes = vec![target.clone()];
    nodes.extend(target_file);
    nodes.extend(chain_nodes(&chain));
    close(&env, &vda, nodes);
    drop(env);
    for image in ["base.img", "top.img"] {
        check_clean(d, image);
    }
    compare(d, "base.img", "qcow2", &base_view);
    match format {
        ImageFormat::Qcow2 => {
            check_clean(d, "target.img");
            compare(d, "target.img", "qcow2", &disk);
        }
        ImageFormat::Raw => compare(d, "target.img", "raw", &disk),
    }
    if end == End::CancelAfterReady {
        compare(d, "top.img", "qcow2", &disk);
    }
}

#[test]
fn sync_full_background_to_a_new_qcow2_completes_with_a_pivot_041() {
    let _w = watchdog("mirror_full_background_qcow2", Duration::from_secs(120));
    mirror_041(
        MirrorSync::Full,
        CopyMode::Background,
        ImageFormat::Qcow2,
        End::Complete,
    );
}

#[test]
fn sync_full_write_blocking_to_a_new_raw_completes_with_a_pivot_041() {
    let _w = watchdog("mirror_full_blocking_raw", Duration::from_secs(120));
    mirror_041(
        MirrorSync::Full,
        CopyMode::WriteBlocking,
        ImageFormat::Raw,
        End::Complete,
    );
}

#[test]
fn sync_top_to_a_qcow2_backed_by_the_source_backing_completes_041() {
    let _w = watchdog("mirror_top_qcow2", Duration::from_secs(120));
    mirror_041(
        MirrorSync::Top,
        CopyMode::Background,
        ImageFormat::Qcow2,
        End::Complete,
    );
}

#[test]
fn cancel_after_ready_leaves_the_source_and_a_consistent_target_041() {
    let _w = watchdog("mirror_cancel_after_ready", Duration::from_secs(120));
    mirror_041(
        MirrorSync::Full,
        CopyMode::Background,
        ImageFormat::Qcow2,
        End::CancelAfterReady,
    );
}

#[test]
fn cancel_after_ready_write_blocking_raw_041() {
    let _w = watchdog("mirror_cancel_after_ready_raw", Duration::from_secs(120));
    mirror_041(
        MirrorSync::Full,
        CopyMode::WriteBlocking,
        ImageFormat::Raw,
        End::CancelAfterReady,
    );
}

/// An in-memory target of the disk's size (an existing node).
fn mem_target(env: &Env, bytes: Vec<u8>) -> NodeHandle {
    env.mem_node(bytes, SIZE as usize)
}

#[test]
fn sync_none_onto_a_target_holding_the_data_copies_only_new_writes() {
    let _w = watchdog("mirror_sync_none", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let target = mem_target(&env, chain_contents());
    let mirror = MirrorOptions::new(&chain.top, MirrorTarget::Node(target.clone()))
        .sync(MirrorSync::None)
        .copy_mode(CopyMode::WriteBlocking);
    let (job, mut events) = start(&env, JobOptions::new("none"), mirror).unwrap();
    // Only writes from the job's start on are mirrored: the guests start
    // now.
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &chain.vda, 0, 3, stop.clone(), 64);
    let g1 = guest(&env.io2, &chain.vda, 1, 4, stop.clone(), 64);
    until_status(&job, JobStatus::Ready);
    thread::sleep(Duration::from_millis(30));
    verb(&env, &job, |j, bql| j.complete(bql)).unwrap();
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut expected = chain_contents();
    apply(&mut expected, &join(g0, "guest 0"));
    apply(&mut expected, &join(g1, "guest 1"));
    assert_eq!(backend_node(&env.main, &chain.vda), target.name());
    assert_same(&read_disk(&env.io, &chain.vda), &expected);
    // Nothing was copied but what the guests wrote.
    let (current, _) = job.progress();
    assert!(current < SIZE, "copied {current} bytes");
}

#[test]
fn bad_targets_are_refused_and_change_nothing() {
    let _w = watchdog("mirror_refusals", Duration::from_secs(60));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let small = env.mem_node(Vec::new(), (SIZE / 2) as usize);
    let used = mem_target(&env, Vec::new());
    let u = used.clone();
    env.main
        .run(move |bql| bql.write(|w| w.add_backend("other", &u, BackendOptions::default())))
        .unwrap();
    let before = env.main.run(|bql| common::snapshot(bql.graph()));
    for (target, what) in [
        (chain.top.clone(), "the source"),
        (chain.mid.clone(), "below the source"),
        (small, "smaller"),
        (used, "in use"),
    ] {
        let r = start(
            &env,
            JobOptions::new("bad"),
            MirrorOptions::new(&chain.top, MirrorTarget::Node(target)),
        );
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{what}: {:?}",
            r.map(|_| ())
        );
        assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
        assert_eq!(env.main.run(|bql| common::snapshot(bql.graph())), before);
    }
    // A target that exists on disk is not overwritten.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exists.img");
    std::fs::write(&path, b"keep").unwrap();
    let r = start(
        &env,
        JobOptions::new("bad"),
        MirrorOptions::new(
            &chain.top,
            MirrorTarget::NewImage {
                path: path.clone(),
                format: ImageFormat::Raw,
                node_name: "t".into(),
                backing: false,
            },
        ),
    );
    assert!(r.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
}

#[test]
fn another_writer_on_the_target_is_refused_while_mirroring() {
    let _w = watchdog("mirror_target_exclusive", Duration::from_secs(60));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let target = mem_target(&env, Vec::new());
    let mut options = JobOptions::new("excl");
    options.speed = 1 << 20;
    let (job, mut events) = start(
        &env,
        options,
        MirrorOptions::new(&chain.top, MirrorTarget::Node(target.clone())),
    )
    .unwrap();
    let t = target.clone();
    let r = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend("intruder", &t, BackendOptions::default())));
    assert!(matches!(r, Err(Error::PermissionConflict { .. })), "{r:?}");
    verb(&env, &job, |j, bql| j.cancel(bql, true)).unwrap();
    let all = until_null(&mut events);
    assert!(cancelled(&all), "{all:?}");
    assert_eq!(backend_node(&env.main, &chain.vda), chain.top.name());
    // Free again.
    let t = target.clone();
    env.main
        .run(move |bql| bql.write(|w| w.add_backend("after", &t, BackendOptions::default())))
        .unwrap();
}

/// The bitmaps of `node`: (name, granularity, enabled, busy).
fn bitmaps_of(env: &Env, node: &NodeHandle) -> Vec<(String, u64, bool, bool)> {
    let n = node.clone();
    env.main.run(move |bql| {
        n.gs(bql)
            .dirty_bitmaps()
            .into_iter()
            .map(|b| (b.name, b.granularity, b.enabled, b.busy))
            .collect()
    })
}

#[test]
fn the_job_tracks_writes_in_a_busy_bitmap_on_the_source_removed_at_the_end() {
    let _w = watchdog("mirror_bitmap", Duration::from_secs(60));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let user = blockgraph::DirtyBitmapOptions::new();
    let top = chain.top.clone();
    env.main
        .run(move |bql| top.gs(bql).add_dirty_bitmap("user", user))
        .unwrap();
    let mine = |id: &str| format!("#mirror:{id}");
    // A user bitmap with the job's name: refused, nothing changed.
    let top = chain.top.clone();
    let clash = mine("clash");
    env.main
        .run(move |bql| top.gs(bql).add_dirty_bitmap(&clash, user))
        .unwrap();
    let target = mem_target(&env, Vec::new());
    let before = env.main.run(|bql| common::snapshot(bql.graph()));
    let r = start(
        &env,
        JobOptions::new("clash"),
        MirrorOptions::new(&chain.top, MirrorTarget::Node(target)),
    );
    assert!(
        matches!(r, Err(Error::BitmapExists { .. })),
        "{:?}",
        r.map(|_| ())
    );
    assert_eq!(env.main.run(|bql| common::snapshot(bql.graph())), before);
    let top = chain.top.clone();
    let clash = mine("clash");
    env.main
        .run(move |bql| top.gs(bql).remove_dirty_bitmap(&clash))
        .unwrap();
    // Cancelled and completed: the job's bitmap is there, disabled (the
    // filter marks it) and busy, while the job runs; gone afterwards.
    for (id, cancel) in [("m1", true), ("m2", false)] {
        let mut options = JobOptions::new(id);
        options.speed = 4 << 20;
        let target = mem_target(&env, Vec::new());
        let mirror = MirrorOptions::new(&chain.top, MirrorTarget::Node(target)).granularity(4096);
        let (job, mut events) = start(&env, options, mirror).unwrap();
        assert_eq!(
            bitmaps_of(&env, &chain.top),
            [
                ("user".to_owned(), 65536, true, false),
                (mine(id), 4096, false, true)
            ]
        );
        let (top, name) = (chain.top.clone(), mine(id));
        let r = env
            .main
            .run(move |bql| top.gs(bql).remove_dirty_bitmap(&name));
        assert!(matches!(r, Err(Error::BitmapBusy(_))), "{r:?}");
        if cancel {
            verb(&env, &job, |j, bql| j.cancel(bql, true)).unwrap();
        } else {
            until_status(&job, JobStatus::Ready);
            verb(&env, &job, |j, bql| j.complete(bql)).unwrap();
        }
        let all = until_null(&mut events);
        assert!(cancelled(&all) || completed(&all), "{all:?}");
        assert_eq!(
            bitmaps_of(&env, &chain.top),
            [("user".to_owned(), 65536, true, false)]
        );
    }
}

/// Holds a drain of `node` from a main-loop task for `hold`.
fn drain_during(env: &Env, node: &NodeHandle, hold: Duration) {
    while_drained(&env.main, node, || {
        thread::sleep(hold);
    });
}

fn filter_of(env: &Env, job: &str) -> NodeHandle {
    let name = format!("{job}-mirror");
    env.main
        .run(move |bql| bql.node(&name).map(|n| n.to_handle()))
        .expect("the job's filter")
}

#[test]
fn a_drain_of_each_involved_node_pauses_the_mirror_which_then_completes() {
    let _w = watchdog("mirror_drain_each_node", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let target = mem_target(&env, Vec::new());
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &chain.vda, 0, 7, stop.clone(), 16);
    let g1 = guest(&env.io2, &chain.vda, 1, 8, stop.clone(), 16);
    let mut options = JobOptions::new("drained");
    options.speed = 1 << 20;
    let (job, mut events) = start(
        &env,
        options,
        MirrorOptions::new(&chain.top, MirrorTarget::Node(target.clone())),
    )
    .unwrap();
    common::wait_until("the mirror has copied something", || job.progress().0 > 0);
    let filter = filter_of(&env, "drained");
    for node in [&chain.top, &chain.mid, &target, &filter] {
        drain_during(&env, node, Duration::from_millis(80));
        common::wait_until("the job runs again", || {
            matches!(job.status(), JobStatus::Running | JobStatus::Ready)
        });
    }
    verb(&env, &job, |j, bql| j.set_speed(bql, 0)).unwrap();
    until_status(&job, JobStatus::Ready);
    // Drains while ready, too.
    for node in [&chain.top, &target, &filter] {
        drain_during(&env, node, Duration::from_millis(30));
    }
    common::wait_until("ready again", || job.status() == JobStatus::Ready);
    verb(&env, &job, |j, bql| j.complete(bql)).unwrap();
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    let paused = all
        .iter()
        .filter(|e| {
            matches!(
                e,
                JobEvent::StatusChange(JobStatus::Paused | JobStatus::Standby)
            )
        })
        .count();
    assert!(paused >= 4, "paused per drain: {all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut expected = chain_contents();
    apply(&mut expected, &join(g0, "guest 0"));
    apply(&mut expected, &join(g1, "guest 1"));
    assert_eq!(backend_node(&env.main, &chain.vda), target.name());
    assert_same(&read_disk(&env.io, &chain.vda), &expected);
}

#[test]
fn pause_resume_cancel_complete_and_drains_at_random_points_lose_no_guest_write() {
    let _w = watchdog("mirror_random_verbs", Duration::from_secs(300));
    let env = Env::new();
    let mut rng = Rng::new(0x41_0041);
    for round in 0..10u64 {
        let chain = mem_chain(&env, false);
        let target = mem_target(&env, Vec::new());
        let stop = Arc::new(AtomicBool::new(false));
        let g0 = guest(&env.io, &chain.vda, 0, round * 2 + 1, stop.clone(), 16);
        let g1 = guest(&env.io2, &chain.vda, 1, round * 2 + 2, stop.clone(), 16);
        let id = format!("mirror{round}");
        let mut options = JobOptions::new(id.clone());
        options.speed = 8 << 20;
        let mode = if round % 2 == 0 {
            CopyMode::Background
        } else {
            CopyMode::WriteBlocking
        };
        let mirror = MirrorOptions::new(&chain.top, MirrorTarget::Node(target.clone()))
            .copy_mode(mode)
            .copy_options(job::CopyOptions {
                chunk_size: 128 << 10,
                in_flight: 1 + (round % 4) as usize,
                alignment: 1,
            });
        let (job, mut events) = start(&env, options, mirror).unwrap();
        let filter = filter_of(&env, &id);
        let involved = [chain.top.clone(), chain.mid.clone(), target.clone(), filter];
        random_verbs(
            &env.main,
            &job,
            2 + rng.below(6),
            60,
            &[
                Verb::Pause,
                Verb::Resume,
                Verb::SetSpeed(16 << 20),
                Verb::Drain,
                Verb::Drain,
                Verb::Drain,
                Verb::Drain,
            ],
            |n| rng.below(n),
            |below| {
                let node = &involved[below(involved.len() as u64) as usize];
                drain_during(&env, node, Duration::from_millis(below(40)));
            },
        );
        let _ = verb(&env, &job, |j, bql| j.resume(bql));
        let ending = rng.below(4);
        let mut pivot = false;
        match ending {
            0 => {
                verb(&env, &job, |j, bql| j.cancel(bql, true)).unwrap();
            }
            1 => {
                // Cancel whenever: before READY it is a cancel, after it a
                // completion without pivot.
                verb(&env, &job, |j, bql| j.cancel(bql, false)).unwrap();
            }
            _ => {
                verb(&env, &job, |j, bql| j.set_speed(bql, 0)).unwrap();
                common::wait_until("ready", || job.status() == JobStatus::Ready);
                if rng.below(2) == 0 {
                    let node = &involved[rng.below(involved.len() as u64) as usize];
                    drain_during(&env, node, Duration::from_millis(10));
                    common::wait_until("ready", || job.status() == JobStatus::Ready);
                }
                verb(&env, &job, |j, bql| j.complete(bql)).unwrap();
                pivot = true;
            }
        }
        let all = until_null(&mut events);
        stop.store(true, Ordering::SeqCst);
        let mut expected = chain_contents();
        apply(&mut expected, &join(g0, "guest 0"));
        apply(&mut expected, &join(g1, "guest 1"));
        assert!(completed(&all) || cancelled(&all), "round {round}: {all:?}");
        let on = backend_node(&env.main, &chain.vda);
        if pivot {
            assert!(completed(&all), "round {round}: {all:?}");
            assert_eq!(on, target.name(), "round {round}");
        } else {
            assert_eq!(on, chain.top.name(), "round {round}");
        }
        assert!(env
            .main
            .run(move |bql| bql.node(&format!("mirror{round}-mirror")).is_none()));
        assert_same(&read_disk(&env.io, &chain.vda), &expected);
        assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
        let report = env.check(&chain.top, false).unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
        remove_backend(&env, &chain.vda);
    }
}

/// Guests that write as fast as they can (no pauses), each write checked
/// afterwards.
fn hammer(
    io: &blockgraph::IoThread,
    blk: &BlockBackend,
    lane: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> blockgraph::TaskHandle<BTreeMap<u64, Vec<u8>>> {
    let blk = blk.clone();
    io.spawn(move |mut cx| async move {
        let mut rng = Rng::new(seed);
        let mut wrote = BTreeMap::new();
        while !stop.load(Ordering::SeqCst) || wrote.len() < 64 {
            let cluster = rng.below(CLUSTERS / 2) * 2 + lane;
            let offset = cluster * CLUSTER + rng.below(CLUSTER / 4096) * 4096;
            let data = rng.bytes(4096);
            blk.write(&mut cx, offset, &data)
                .await
                .unwrap_or_else(|e| panic!("guest write at {offset}: {e}"));
            wrote.insert(offset, data);
            tokio::task::yield_now().await;
        }
        wrote
    })
}

#[test]
fn a_pivot_under_heavy_guest_write_load_keeps_every_write() {
    let _w = watchdog("mirror_pivot_under_load", Duration::from_secs(120));
    let env = Env::new();
    for (i, mode) in [CopyMode::Background, CopyMode::WriteBlocking]
        .into_iter()
        .enumerate()
    {
        let chain = mem_chain(&env, false);
        let target = mem_target(&env, Vec::new());
        let stop = Arc::new(AtomicBool::new(false));
        let g0 = hammer(&env.io, &chain.vda, 0, 90 + i as u64, stop.clone());
        let g1 = hammer(&env.io2, &chain.vda, 1, 95 + i as u64, stop.clone());
        let (job, mut events) = start(
            &env,
            JobOptions::new(format!("load{i}")),
            MirrorOptions::new(&chain.top, MirrorTarget::Node(target.clone())).copy_mode(mode),
        )
        .unwrap();
        common::wait_until("ready", || job.status() == JobStatus::Ready);
        thread::sleep(Duration::from_millis(100));
        verb(&env, &job, |j, bql| j.complete(bql)).unwrap();
        let all = until_null(&mut events);
        assert!(completed(&all), "{mode:?}: {all:?}");
        // The guests went on writing across the pivot.
        thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        let mut expected = chain_contents();
        apply(&mut expected, &join(g0, "guest 0"));
        apply(&mut expected, &join(g1, "guest 1"));
        assert_eq!(backend_node(&env.main, &chain.vda), target.name());
        assert_same(&read_disk(&env.io, &chain.vda), &expected);
        // The target alone holds it all.
        assert_same(&env.read_all(&target).unwrap(), &expected);
    }
}
