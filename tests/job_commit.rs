//! `block-commit` of an intermediate image: the core of QEMU's iotest 040
//! on real image files (a four-level qcow2 chain made by `qemu-img`,
//! committed with and without an explicit base while guests write and
//! read on two I/O threads for the whole job; the data checked block by
//! block; every image passes `qemu-img check`, holds what it should under
//! `qemu-img compare`, and `qemu-img info --backing-chain` shows the
//! rewritten chain), refusals, and pause/resume/cancel and drains of every
//! involved node at random points of a commit. Active commit (the active
//! layer into base, on the mirror machinery): iotest 040's active case
//! with guests writing through `complete` and the pivot onto base, a
//! cancel after READY (with and without force), and a drain of each
//! involved node.

mod common;
mod job_util;
mod qcow2_util;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blockgraph::drivers::qcow2::Qcow2Driver;
use blockgraph::job::{self, query_jobs, CommitOptions, Job, JobEvent, JobOptions, JobStatus};
use blockgraph::{Error, NodeHandle, Result};

use common::jobs::{backend_node, completed, verbs_and_drains, while_drained};
use common::{join, watchdog};
use job_util::{
    add_vda, apply, assert_same, chain_below, chain_contents, chain_nodes, check_clean, close,
    compare, create, flush, guest, img, mem_chain, qemu_io_in, read_disk, remove_backend,
    until_null, MemChain, CLUSTER, CLUSTERS, SIZE,
};
use qcow2_util::{open_chain, require_qemu, Env, Rng};

/// The images of the chain, bottom up.
const IMAGES: [&str; 4] = ["base.img", "mid.img", "top.img", "active.img"];

/// base.img <- mid.img <- top.img <- active.img, made by `qemu-img` in
/// `dir` with names relative to it (as QEMU's iotests do), with data in
/// every layer, overlapping, in whole and half clusters, and zeroes in
/// top that hide base's data. Returns what each image's chain shows,
/// bottom up (`views[3]` is the guest disk).
fn make_chain(dir: &Path) -> [Vec<u8>; 4] {
    create(dir, IMAGES[0], None);
    for pair in IMAGES.windows(2) {
        create(dir, pair[1], Some(pair[0]));
    }
    let mut views: [Vec<u8>; 4] = std::array::from_fn(|_| vec![0u8; SIZE as usize]);
    let mut commands: [Vec<String>; 4] = Default::default();
    for i in 0..CLUSTERS {
        let len = if i % 2 == 0 { CLUSTER } else { CLUSTER / 2 };
        let at = i * CLUSTER;
        let mut put = |level: usize, pattern: Option<u8>| {
            commands[level].push(match pattern {
                Some(p) => format!("write -P {p} {at} {len}"),
                None => format!("write -z {at} {CLUSTER}"),
            });
            let (from, to) = match pattern {
                Some(_) => (at as usize, (at + len) as usize),
                None => (at as usize, (at + CLUSTER) as usize),
            };
            for view in &mut views[level..] {
                view[from..to].fill(pattern.unwrap_or(0));
            }
        };
        if i % 4 != 1 {
            put(0, Some(0x10 + (i % 7) as u8));
        }
        if i % 3 == 0 {
            put(1, Some(0x20 + (i % 7) as u8));
        }
        if i % 5 == 0 {
            put(2, Some(0x30 + (i % 7) as u8));
        } else if i % 11 == 2 {
            put(2, None); // zeroes over base's (and mid's) data
        }
        if i % 7 == 0 {
            put(3, Some(0x40 + (i % 7) as u8));
        }
    }
    for (image, commands) in IMAGES.iter().zip(commands) {
        qemu_io_in(dir, image, commands);
    }
    views
}

fn info_chain(dir: &Path, image: &str) -> Vec<serde_json::Value> {
    let out = img(
        dir,
        &["info", "--backing-chain", "--output=json", "-U", image],
    );
    match serde_json::from_str(&out).expect("qemu-img info JSON") {
        serde_json::Value::Array(images) => images,
        other => panic!("not a chain: {other}"),
    }
}

fn start_commit(
    env: &Env,
    options: JobOptions,
    commit: CommitOptions,
) -> Result<(Job, job::JobEvents)> {
    let io = env.io.handle();
    env.main.run(move |bql| {
        let job = job::commit(bql, &io, options, commit)?;
        let events = job.events();
        Ok((job, events))
    })
}

fn read_only(env: &Env, node: &NodeHandle) -> bool {
    let name = node.name().to_owned();
    env.main.run(move |bql| {
        bql.query_nodes()
            .into_iter()
            .find(|n| n.name == name)
            .map(|n| n.read_only)
            .expect("node listed")
    })
}

/// iotest 040's core. `explicit_base`: commit mid.img into base.img (the
/// overlay is top.img, a read-only image whose header must change);
/// otherwise commit top.img with no base given (down to base.img, through
/// mid.img; the overlay is the active image).
fn commit_040(explicit_base: bool) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let views = make_chain(d);
    let originals: Vec<(&str, Vec<u8>)> = IMAGES
        .iter()
        .map(|i| (*i, std::fs::read(d.join(i)).unwrap()))
        .collect();

    let env = Env::new();
    let chain = open_chain(&env, &d.join("active.img"), true);
    assert_eq!(chain.images.len(), 4);
    let node = |image: &str| {
        let at = IMAGES.len() - 1 - IMAGES.iter().position(|i| *i == image).unwrap();
        chain.images[at].node.clone()
    };
    let (active, top, mid, base) = (
        node("active.img"),
        node("top.img"),
        node("mid.img"),
        node("base.img"),
    );
    assert!(read_only(&env, &base) && read_only(&env, &top));
    let vda = add_vda(&env, &active);

    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &vda, 0, 40, stop.clone(), 32);
    let g1 = guest(&env.io2, &vda, 1, 41, stop.clone(), 32);

    let mut options = JobOptions::new("commit0");
    options.speed = 4 << 20; // the guests overlap the whole job
    let copy = job::CopyOptions {
        chunk_size: 128 << 10,
        in_flight: 4,
        alignment: 1,
    };
    let (commit, overlay, committed, overlay_image) = if explicit_base {
        (
            CommitOptions::new(&mid).base(&base),
            top.clone(),
            vec![mid.clone()],
            "top.img",
        )
    } else {
        (
            CommitOptions::new(&top),
            active.clone(),
            vec![top.clone(), mid.clone()],
            "active.img",
        )
    };
    let (_job, mut events) = start_commit(&env, options, commit.copy_options(copy)).unwrap();
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut wrote: BTreeMap<u64, Vec<u8>> = join(g0, "guest 0");
    wrote.extend(join(g1, "guest 1"));
    let mut disk = views[3].clone();
    apply(&mut disk, &wrote);

    // The graph: the committed images are gone, the overlay sits on base,
    // whose mode is back to read-only; the overlay reports its new name.
    let below: Vec<String> = chain_below(&env, &active);
    let want: Vec<String> = if explicit_base {
        vec![top.name().to_owned(), base.name().to_owned()]
    } else {
        vec![base.name().to_owned()]
    };
    assert_eq!(below, want);
    let (o, gone) = (overlay.clone(), committed.clone());
    let name = env.main.run(move |bql| {
        for n in &gone {
            assert!(
                !n.gs(bql).is_in_graph(),
                "'{}' still in the graph",
                n.name()
            );
        }
        let q = o.gs(bql);
        let q = q.driver_as::<Qcow2Driver>().unwrap();
        (q.backing_file(), q.backing_format())
    });
    assert_eq!(name, (Some("base.img".into()), Some("qcow2".into())));
    assert!(read_only(&env, &base), "base is read-only again");
    assert_eq!(read_only(&env, &overlay), explicit_base);
    assert!(env.main.run(|bql| query_jobs(bql)).is_empty());

    // The data, block by block, through the guest's backend.
    let disk_now = read_disk(&env.io, &vda);
    assert_same(&disk_now, &disk);
    flush(&env, &vda);

    close(&env, &vda, chain_nodes(&chain));
    drop(env);

    // qemu-img's view: the rewritten chain…
    let names: Vec<String> = info_chain(d, "active.img")
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<&str> = if explicit_base {
        vec!["active.img", "top.img", "base.img"]
    } else {
        vec!["active.img", "base.img"]
    };
    assert_eq!(names.len(), want.len(), "{names:?}");
    for (n, w) in names.iter().zip(&want) {
        assert!(n.ends_with(w), "{names:?} is not {want:?}");
    }
    let overlay_info = &info_chain(d, overlay_image)[0];
    assert_eq!(
        overlay_info["backing-filename"], "base.img",
        "{overlay_info}"
    );
    assert_eq!(overlay_info["backing-filename-format"], "qcow2");
    // …every image clean…
    for image in IMAGES {
        check_clean(d, image);
    }
    // …the guest's disk, base holding what the committed chain showed, the
    // overlay's own chain (now over base) showing what it showed before…
    compare(d, "active.img", "qcow2", &disk);
    let committed_view = if explicit_base { &views[1] } else { &views[2] };
    compare(d, "base.img", "qcow2", committed_view);
    if explicit_base {
        compare(d, "top.img", "qcow2", &views[2]);
    }
    // …and the committed images not written at all.
    for (image, bytes) in &originals {
        let dropped = if explicit_base {
            *image == "mid.img"
        } else {
            *image == "mid.img" || *image == "top.img"
        };
        if dropped {
            assert!(
                std::fs::read(d.join(image)).unwrap() == *bytes,
                "{image} was written"
            );
        }
    }
}

#[test]
fn commit_an_intermediate_into_an_explicit_base_040() {
    let _w = watchdog("commit_040_base", Duration::from_secs(180));
    commit_040(true);
}

#[test]
fn commit_without_a_base_goes_down_to_the_bottom_040() {
    let _w = watchdog("commit_040_no_base", Duration::from_secs(180));
    commit_040(false);
}

#[test]
fn a_cancelled_commit_leaves_the_chain_its_headers_and_base_read_only() {
    let _w = watchdog("commit_040_cancel", Duration::from_secs(180));
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let views = make_chain(d);
    let env = Env::new();
    let chain = open_chain(&env, &d.join("active.img"), true);
    let (active, top, base) = (
        chain.images[0].node.clone(),
        chain.images[1].node.clone(),
        chain.images[3].node.clone(),
    );
    let vda = add_vda(&env, &active);
    let below_before = chain_below(&env, &active);
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &vda, 0, 42, stop.clone(), 16);
    let g1 = guest(&env.io2, &vda, 1, 43, stop.clone(), 16);
    let mut options = JobOptions::new("cancelled");
    options.speed = 512 << 10; // seconds: it is cancelled half way
    let (job, mut events) = start_commit(
        &env,
        options,
        CommitOptions::new(&top).copy_options(job::CopyOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        }),
    )
    .unwrap();
    assert!(!read_only(&env, &base), "the job writes base");
    common::wait_until("the commit has copied something", || job.progress().0 > 0);
    let j = job.clone();
    env.main.run(move |bql| j.cancel(bql, false)).unwrap();
    let all = until_null(&mut events);
    assert!(
        all.iter().any(|e| matches!(e, JobEvent::Cancelled { .. })),
        "{all:?}"
    );
    stop.store(true, Ordering::SeqCst);
    let mut disk = views[3].clone();
    apply(&mut disk, &join(g0, "guest 0"));
    apply(&mut disk, &join(g1, "guest 1"));
    assert_eq!(chain_below(&env, &active), below_before);
    assert!(read_only(&env, &base), "base is read-only again");
    assert_same(&read_disk(&env.io, &vda), &disk);
    flush(&env, &vda);
    close(&env, &vda, chain_nodes(&chain));
    drop(env);
    let names: Vec<String> = info_chain(d, "active.img")
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for image in IMAGES {
        check_clean(d, image);
    }
    compare(d, "active.img", "qcow2", &disk);
    // What reached base is what top showed there: top's chain still reads
    // the same.
    compare(d, "top.img", "qcow2", &views[2]);
}

#[test]
fn bad_ranges_and_a_backing_name_for_an_active_commit_are_refused_and_change_nothing() {
    let _w = watchdog("commit_refusals", Duration::from_secs(60));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let before = env.main.run(|bql| common::structure(bql.graph()));
    let refuse = |commit: CommitOptions, words: &str| {
        let err = start_commit(&env, JobOptions::new("refused"), commit).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains(words)),
            "{err}"
        );
        assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
        assert_eq!(env.main.run(|bql| common::structure(bql.graph())), before);
    };
    // top is the active layer (the guest's backend is on it): an active
    // commit has no overlay header to name a backing file in, and its
    // base must be below it too.
    refuse(
        CommitOptions::new(&chain.top).backing_file("base.qcow2", "qcow2"),
        "is the active layer",
    );
    refuse(
        CommitOptions::new(&chain.top).base(&chain.top),
        "is not in the backing chain below",
    );
    // Nothing below base; mid is not below base, nor top below mid, nor
    // mid below itself.
    refuse(CommitOptions::new(&chain.base), "nothing to commit into");
    refuse(
        CommitOptions::new(&chain.base).base(&chain.mid),
        "is not in the backing chain below",
    );
    refuse(
        CommitOptions::new(&chain.mid).base(&chain.top),
        "is not in the backing chain below",
    );
    refuse(
        CommitOptions::new(&chain.mid).base(&chain.mid),
        "is not in the backing chain below",
    );
    // The chain is fine and usable afterwards: a commit of mid works.
    let (_job, mut events) =
        start_commit(&env, JobOptions::new("ok"), CommitOptions::new(&chain.mid)).unwrap();
    assert!(completed(&until_null(&mut events)));
    assert_eq!(chain_below(&env, &chain.top), [chain.base.name()]);
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
}

/// Holds a drain of `node` from a main-loop task for `hold`; while it is
/// held the job is not running and makes no progress.
fn drain_during(env: &Env, job: &Job, node: &NodeHandle, hold: Duration) {
    while_drained(&env.main, node, || {
        // A worker counts its last chunk just after its request completes; one
        // whose requests the drain does not cover (the job's reader is on the
        // top it commits, its writer on base: a drain of the overlay or the
        // filter covers neither) goes on to its next pause point, at most the
        // rest of its chunk.
        thread::sleep(Duration::from_millis(50));
        let (status, progress) = (job.status(), job.progress().0);
        thread::sleep(hold);
        assert_ne!(status, JobStatus::Running, "drained '{}'", node.name());
        if status == JobStatus::Paused {
            let now = job.progress().0;
            assert_eq!(
                now,
                progress,
                "the job went on while '{}' was drained ({} bytes)",
                node.name(),
                now - progress
            );
        }
    });
}

/// Once `job` has copied something: drains top, mid, base and the job's
/// filter `filter` in turn, the job running before each drain and again
/// after it.
fn drain_each_node(env: &Env, job: &Job, chain: &MemChain, filter: &str) {
    common::wait_until("the commit has copied something", || job.progress().0 > 0);
    let name = filter.to_owned();
    let filter = env
        .main
        .run(move |bql| bql.node(&name).map(|n| n.to_handle()))
        .expect("the job's filter");
    for node in [&chain.top, &chain.mid, &chain.base, &filter] {
        assert_eq!(
            job.status(),
            JobStatus::Running,
            "before draining '{}'",
            node.name()
        );
        drain_during(env, job, node, Duration::from_millis(100));
        common::wait_until("the job runs again", || job.status() == JobStatus::Running);
    }
}

#[test]
fn a_drain_of_each_involved_node_pauses_the_commit_which_then_completes() {
    let _w = watchdog("commit_drain_each_node", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &chain.vda, 0, 7, stop.clone(), 16);
    let g1 = guest(&env.io2, &chain.vda, 1, 8, stop.clone(), 16);
    let mut options = JobOptions::new("drained");
    options.speed = 256 << 10; // mid's 1.3 MiB take seconds
    let (job, mut events) = start_commit(
        &env,
        options,
        CommitOptions::new(&chain.mid)
            .base(&chain.base)
            .copy_options(job::CopyOptions {
                chunk_size: 64 << 10,
                ..Default::default()
            }),
    )
    .unwrap();
    // The overlay (top), the committed image, base, the job's filter.
    drain_each_node(&env, &job, &chain, "drained-commit");
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
    let mut expected = chain_contents();
    apply(&mut expected, &join(g0, "guest 0"));
    apply(&mut expected, &join(g1, "guest 1"));
    assert_same(&read_disk(&env.io, &chain.vda), &expected);
    assert_eq!(chain_below(&env, &chain.top), [chain.base.name()]);
}

#[test]
fn pause_resume_cancel_and_drains_at_random_points_lose_no_guest_write() {
    let _w = watchdog("commit_pause_resume_cancel_drain", Duration::from_secs(300));
    let env = Env::new();
    let mut rng = Rng::new(0xc0_4417);
    for round in 0..10u64 {
        let chain = mem_chain(&env, false);
        let stop = Arc::new(AtomicBool::new(false));
        let g0 = guest(&env.io, &chain.vda, 0, round * 2 + 1, stop.clone(), 16);
        let g1 = guest(&env.io2, &chain.vda, 1, round * 2 + 2, stop.clone(), 16);
        let mut options = JobOptions::new(format!("commit{round}"));
        options.speed = 4 << 20;
        let commit = CommitOptions::new(&chain.mid)
            .base(&chain.base)
            .copy_options(job::CopyOptions {
                chunk_size: 64 << 10,
                in_flight: 1 + (round % 4) as usize,
                alignment: 1,
            });
        let (job, mut events) = start_commit(&env, options, commit).unwrap();
        let filter = env
            .main
            .run({
                let name = format!("commit{round}-commit");
                move |bql| bql.node(&name).map(|n| n.to_handle())
            })
            .expect("the job's filter");
        let involved = [
            chain.top.clone(),
            chain.mid.clone(),
            chain.base.clone(),
            filter,
        ];
        let cancelled = verbs_and_drains(
            &env.main,
            &job,
            &involved,
            |n| rng.below(n),
            |node| drain_during(&env, &job, node, Duration::from_millis(60)),
        );
        let all = until_null(&mut events);
        stop.store(true, Ordering::SeqCst);
        let mut expected = chain_contents();
        apply(&mut expected, &join(g0, "guest 0"));
        apply(&mut expected, &join(g1, "guest 1"));
        assert_same(&read_disk(&env.io, &chain.vda), &expected);
        let below = chain_below(&env, &chain.top);
        if completed(&all) {
            assert_eq!(below, [chain.base.name()], "round {round}");
        } else {
            assert!(cancelled, "round {round}: the job failed: {all:?}");
            assert_eq!(
                below,
                [chain.mid.name(), chain.base.name()],
                "round {round}: a cancelled commit changed the chain"
            );
        }
        assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
        for node in [&chain.top, &chain.base] {
            let report = env.check(node, false).unwrap();
            assert!(report.is_clean(), "round {round}: {report:?}");
        }
        remove_backend(&env, &chain.vda);
    }
}

fn verb(
    env: &Env,
    job: &Job,
    f: impl FnOnce(&Job, &blockgraph::Bql) -> Result<()> + Send + 'static,
) {
    let j = job.clone();
    env.main.run(move |bql| f(&j, bql)).unwrap();
}

/// How an active commit ends after READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActiveEnd {
    Complete,
    Cancel { force: bool },
}

/// iotest 040's active-commit case: the active image committed down to
/// base.img (no base given) while guests write and read on two I/O threads
/// from before the job until after its pivot; or cancelled after READY.
fn active_commit_040(end: ActiveEnd) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let views = make_chain(d);
    let originals: Vec<(&str, Vec<u8>)> = IMAGES
        .iter()
        .map(|i| (*i, std::fs::read(d.join(i)).unwrap()))
        .collect();
    let env = Env::new();
    let chain = open_chain(&env, &d.join("active.img"), true);
    assert_eq!(chain.images.len(), 4);
    let (active, top, mid, base) = (
        chain.images[0].node.clone(),
        chain.images[1].node.clone(),
        chain.images[2].node.clone(),
        chain.images[3].node.clone(),
    );
    assert!(read_only(&env, &base));
    let vda = add_vda(&env, &active);
    let below_before = chain_below(&env, &active);

    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &vda, 0, 44, stop.clone(), 32);
    let g1 = guest(&env.io2, &vda, 1, 45, stop.clone(), 32);
    let mut options = JobOptions::new("active0");
    options.speed = 4 << 20; // the guests overlap the initial pass
    let copy = job::CopyOptions {
        chunk_size: 128 << 10,
        in_flight: 4,
        alignment: 1,
    };
    let (job, mut events) = start_commit(
        &env,
        options,
        CommitOptions::new(&active).copy_options(copy),
    )
    .unwrap();
    assert_eq!(job.job_type(), job::JobType::Commit);
    assert!(!read_only(&env, &base), "the job writes base");
    // The limit makes the guests overlap the initial pass; lifted, the
    // dirty loop outruns them.
    common::wait_until("the commit has copied something", || job.progress().0 > 0);
    thread::sleep(Duration::from_millis(300));
    verb(&env, &job, |j, bql| j.set_speed(bql, 0));
    job_util::until_status(&job, JobStatus::Ready);
    // Guests keep writing while the job stays in sync.
    thread::sleep(Duration::from_millis(200));
    match end {
        ActiveEnd::Complete => verb(&env, &job, |j, bql| j.complete(bql)),
        ActiveEnd::Cancel { force } => verb(&env, &job, move |j, bql| j.cancel(bql, force)),
    }
    let all = until_null(&mut events);
    assert!(all.contains(&JobEvent::Ready), "{all:?}");
    match end {
        ActiveEnd::Cancel { force: true } => assert!(
            all.iter().any(|e| matches!(e, JobEvent::Cancelled { .. })),
            "{all:?}"
        ),
        _ => assert!(completed(&all), "{all:?}"),
    }
    // The guests went on through the pivot; they stop now.
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let mut disk = views[3].clone();
    apply(&mut disk, &join(g0, "guest 0"));
    apply(&mut disk, &join(g1, "guest 1"));
    assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
    assert!(env.main.run(|bql| bql.node("active0-commit").is_none()));
    let pivoted = end == ActiveEnd::Complete;
    if pivoted {
        // Every user of the active layer is on base, the committed images
        // are gone, base stays read-write as the new active layer.
        assert_eq!(backend_node(&env.main, &vda), base.name());
        let gone = vec![active.clone(), top.clone(), mid.clone()];
        env.main.run(move |bql| {
            for n in &gone {
                assert!(
                    !n.gs(bql).is_in_graph(),
                    "'{}' still in the graph",
                    n.name()
                );
            }
        });
        assert!(!read_only(&env, &base), "base is the active layer now");
    } else {
        assert_eq!(backend_node(&env.main, &vda), active.name());
        assert_eq!(chain_below(&env, &active), below_before);
        assert!(read_only(&env, &base), "base is read-only again");
    }
    assert_same(&read_disk(&env.io, &vda), &disk);
    flush(&env, &vda);
    close(&env, &vda, chain_nodes(&chain));
    drop(env);

    for image in IMAGES {
        check_clean(d, image);
    }
    if pivoted {
        // qemu-img: base.img is the whole chain now, and holds the disk.
        let chain = info_chain(d, "base.img");
        assert_eq!(chain.len(), 1, "{chain:?}");
        compare(d, "base.img", "qcow2", &disk);
        // The committed images below the active one were not written.
        for (image, bytes) in &originals {
            if *image == "mid.img" || *image == "top.img" {
                assert!(
                    std::fs::read(d.join(image)).unwrap() == *bytes,
                    "{image} was written"
                );
            }
        }
    } else {
        let names = info_chain(d, "active.img");
        assert_eq!(names.len(), 4, "{names:?}");
        // What reached base is stored above it too (in the active image
        // or an image between): the guest's view did not change. (The
        // intermediates' own views may: base now holds the active layer's
        // data, as in QEMU.)
        compare(d, "active.img", "qcow2", &disk);
    }
}

#[test]
fn active_commit_pivots_the_guest_onto_base_040() {
    let _w = watchdog("active_commit_040", Duration::from_secs(180));
    active_commit_040(ActiveEnd::Complete);
}

#[test]
fn an_active_commit_cancelled_after_ready_leaves_the_chain_and_base_read_only() {
    let _w = watchdog("active_commit_cancel", Duration::from_secs(240));
    active_commit_040(ActiveEnd::Cancel { force: false });
    active_commit_040(ActiveEnd::Cancel { force: true });
}

#[test]
fn a_drain_of_each_node_pauses_the_active_commit_which_then_pivots() {
    let _w = watchdog("active_commit_drain_each_node", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &chain.vda, 0, 9, stop.clone(), 16);
    let g1 = guest(&env.io2, &chain.vda, 1, 10, stop.clone(), 16);
    let mut options = JobOptions::new("adrained");
    options.speed = 256 << 10; // top..base's ~2 MiB take seconds
    let (job, mut events) = start_commit(
        &env,
        options,
        CommitOptions::new(&chain.top).copy_options(job::CopyOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        }),
    )
    .unwrap();
    // The active layer, the image below it, base, the job's filter.
    drain_each_node(&env, &job, &chain, "adrained-commit");
    verb(&env, &job, |j, bql| j.set_speed(bql, 0));
    job_util::until_status(&job, JobStatus::Ready);
    verb(&env, &job, |j, bql| j.complete(bql));
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    let paused = all
        .iter()
        .filter(|e| **e == JobEvent::StatusChange(JobStatus::Paused))
        .count();
    assert!(paused >= 4, "paused once per drain: {all:?}");
    stop.store(true, Ordering::SeqCst);
    let mut expected = chain_contents();
    apply(&mut expected, &join(g0, "guest 0"));
    apply(&mut expected, &join(g1, "guest 1"));
    assert_eq!(backend_node(&env.main, &chain.vda), chain.base.name());
    assert_same(&read_disk(&env.io, &chain.vda), &expected);
    let (top, mid) = (chain.top.clone(), chain.mid.clone());
    assert!(env
        .main
        .run(move |bql| !top.gs(bql).is_in_graph() && !mid.gs(bql).is_in_graph()));
}
