//! The `rbd` driver against a real single-node Ceph cluster
//! (`tests/ceph/cluster.sh`: one monitor, one manager, one memstore OSD,
//! cephx), checked with Ceph's own `rbd` tool and QEMU's own rbd driver
//! (`qemu-img`/`qemu-io` with `qemu-block-extra`): images made by
//! `rbd create` and `qemu-img create -f raw rbd:…` read and written by us
//! and compared by `qemu-img compare`; resize; snapshots in node info and
//! opened read-only; qcow2 on RBD checked by `qemu-img check`; a mirror job
//! from a local qcow2 onto RBD; cancelled requests; credentials that never
//! show up in any printout.
//!
//! The cluster: `BLOCKGRAPH_CEPH_CONF` (set by `.ci/run`) names its
//! `ceph.conf`; without it the tests start one with the script. When
//! neither works (no Ceph packages, no loopback, …) every test prints a
//! loud `SKIP` line naming the reason and passes.
#![cfg(feature = "rbd")]

mod common;
mod job_util;
mod qcow2_util;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use blockgraph::driver::BlockDriver;
use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Options};
use blockgraph::drivers::{
    FileDriver, FileOptions, RbdDriver, RbdOptions, RbdSecret, ThrottleConfig, ThrottleDriver,
};
use blockgraph::job::{self, JobOptions, JobStatus, MirrorOptions, MirrorSync, MirrorTarget};
use blockgraph::{BackendOptions, ChildRole, Error, NodeHandle, Perm, Permissions};

use common::jobs::completed;
use common::watchdog;
use job_util::{until_null, until_status};
use qcow2_util::{open_chain, run, Env};

/// The cluster's `ceph.conf`, or why there is none.
fn cluster() -> Result<PathBuf, String> {
    static CONF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CONF.get_or_init(|| {
        if let Some(conf) = std::env::var_os("BLOCKGRAPH_CEPH_CONF") {
            return Ok(PathBuf::from(conf));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout
            .lines()
            .find_map(|l| l.strip_prefix("BLOCKGRAPH_CEPH_CONF="))
        {
            Some(conf) if out.status.success() => Ok(PathBuf::from(conf.trim())),
            _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        }
    })
    .clone()
}

/// The cluster's configuration, or `None` after a loud SKIP line: when
/// `.ci/run` could not install what the tests need
/// (`BLOCKGRAPH_CEPH_SKIP` says why), when no cluster runs or starts, or
/// when QEMU's rbd driver (`qemu-block-extra`), which checks our work, is
/// missing.
fn ceph(test: &str) -> Option<PathBuf> {
    let why = match std::env::var("BLOCKGRAPH_CEPH_SKIP") {
        Ok(why) if !why.is_empty() => Err(why),
        _ => cluster().and_then(|conf| {
            if qemu_has_rbd() {
                Ok(conf)
            } else {
                Err("QEMU's rbd driver is missing (install qemu-block-extra of \
                     qemu-utils' version; .ci/run does)"
                    .to_owned())
            }
        }),
    };
    match why {
        Ok(conf) => Some(conf),
        Err(why) => {
            // Straight to stderr so it shows even when the harness captures.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIP {test}: no Ceph cluster for the RBD tests: {why} ***\n"
            );
            None
        }
    }
}

fn qemu_has_rbd() -> bool {
    Command::new("qemu-img")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(" rbd"))
        .unwrap_or(false)
}

/// The img example built with the `rbd` feature (a plain `cargo test`
/// builds it without).
fn img_binary() -> PathBuf {
    example_with_rbd("img")
}

/// Example `name` built with the `rbd` feature.
fn example_with_rbd(name: &'static str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&name) {
        built.push(name);
        let profile_dir = common::process::profile_dir();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .args([
                "build",
                "--example",
                name,
                "--features",
                "rbd",
                "--target-dir",
            ])
            .arg(profile_dir.parent().expect("target dir"))
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo runs").success(),
            "building {name} failed"
        );
    }
    common::process::profile_dir().join("examples").join(name)
}

/// A fresh image name for this test run.
fn image_name(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "bg{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `rbd:rbd/<image>:conf=<conf>`, for QEMU's tools.
fn qemu_name(conf: &Path, image: &str) -> String {
    format!("rbd:rbd/{image}:conf={}", conf.display())
}

fn opts(conf: &Path, image: &str) -> RbdOptions {
    let mut o = RbdOptions::new("rbd", image);
    o.conf = Some(conf.to_owned());
    o
}

fn rbd_cli(conf: &Path, args: &[&str]) -> String {
    run(Command::new("rbd").arg("-c").arg(conf).args(args))
}

/// Removes the image (and its snapshots) when the test ends, passed or not.
struct Cleanup(PathBuf, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let spec = format!("rbd/{}", self.1);
        for args in [vec!["snap", "purge", &spec], vec!["rm", &spec]] {
            let _ = Command::new("rbd")
                .arg("-c")
                .arg(&self.0)
                .args(&args)
                .output();
        }
    }
}

fn add(
    env: &Env,
    name: &str,
    drv: impl BlockDriver,
    kids: Vec<(ChildRole, NodeHandle)>,
) -> NodeHandle {
    let name = name.to_owned();
    env.main
        .run(move |bql| {
            bql.write(|w| {
                let k: Vec<(ChildRole, &NodeHandle)> = kids.iter().map(|(r, n)| (*r, n)).collect();
                w.add_node(&name, drv, &k)
            })
        })
        .unwrap()
}

/// A new image of `size` (`rbd create --size`) named after `what`, and
/// what removes it when the test ends.
fn new_image(conf: &Path, what: &str, size: &str) -> (String, Cleanup) {
    let img = image_name(what);
    let cleanup = Cleanup(conf.to_owned(), img.clone());
    rbd_cli(conf, &["create", "--size", size, &format!("rbd/{img}")]);
    (img, cleanup)
}

/// `image` opened read-write as the graph node `name`.
fn open_node(env: &Env, name: &str, conf: &Path, image: &str) -> NodeHandle {
    add(
        env,
        name,
        RbdDriver::open(opts(conf, image)).unwrap(),
        vec![],
    )
}

fn remove(env: &Env, node: &NodeHandle) {
    let n = node.clone();
    env.main.run(move |bql| {
        let d = bql.drain(&n);
        bql.write(|w| w.remove_node(&d)).unwrap();
    });
}

/// A deterministic pattern.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
        .collect()
}

/// `qemu-img compare` of the RBD image (through QEMU's rbd driver, as
/// `format`) with `expected`.
fn qemu_compare(conf: &Path, image: &str, format: &str, expected: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    let out = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        format,
        "-F",
        "raw",
        &qemu_name(conf, image),
        raw.to_str().unwrap(),
    ]));
    assert!(out.contains("Images are identical"), "{image}: {out}");
}

#[test]
fn images_from_rbd_create_and_qemu_img_create_are_read_and_written_and_match_qemu() {
    let Some(conf) = ceph("rbd_read_write") else {
        return;
    };
    let _w = watchdog("rbd_read_write", Duration::from_secs(180));
    const SIZE: usize = 12 << 20;
    // One image by Ceph's tool, one by QEMU's rbd driver.
    let a = image_name("cli");
    let _ca = Cleanup(conf.clone(), a.clone());
    rbd_cli(&conf, &["create", "--size", "12M", &format!("rbd/{a}")]);
    let b = image_name("qemu");
    let _cb = Cleanup(conf.clone(), b.clone());
    run(Command::new("qemu-img").args(["create", "-f", "raw", &qemu_name(&conf, &b), "12M"]));
    // QEMU writes something first, which we must read.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 64k",
        &qemu_name(&conf, &b),
    ]));

    let env = Env::new();
    for image in [&a, &b] {
        let mut expected = vec![0u8; SIZE];
        if image == &b {
            expected[1 << 20..(1 << 20) + (64 << 10)].fill(0x5a);
        }
        let node = add(
            &env,
            "rbd0",
            RbdDriver::open(opts(&conf, image)).unwrap(),
            vec![],
        );
        assert_eq!(
            env.read(&node, 1 << 20, 64 << 10).unwrap(),
            expected[1 << 20..(1 << 20) + (64 << 10)]
        );
        // Whole objects, pieces across an object boundary (4 MiB), odd
        // offsets and lengths.
        for (off, len, seed) in [
            (0usize, 1usize << 20, 1u8),
            ((4 << 20) - 3000, 7001, 2),
            (5 << 20, 3 << 20, 3),
            (SIZE - 513, 513, 4),
            (123_457, 99_991, 5),
        ] {
            let data = pattern(len, seed);
            env.write(&node, off as u64, data.clone()).unwrap();
            expected[off..off + len].copy_from_slice(&data);
        }
        env.write_zeroes(&node, (5 << 20) + 4096, 1 << 20).unwrap();
        expected[(5 << 20) + 4096..(6 << 20) + 4096].fill(0);
        // A discard may keep the data; write zeroes afterwards makes the
        // expectation exact either way.
        env.discard(&node, 8 << 20, 4 << 20).unwrap();
        env.write_zeroes(&node, 8 << 20, 4 << 20).unwrap();
        expected[8 << 20..12 << 20].fill(0);
        env.flush(&node).unwrap();
        assert!(
            env.read(&node, 0, SIZE).unwrap() == expected,
            "{image}: our read-back differs"
        );
        // 1 MiB at a time: the request buffers are reused (a pool), and
        // holes and zeroed ranges must not show an earlier request's bytes.
        for round in 0..2 {
            for mb in 0..SIZE >> 20 {
                let got = env.read(&node, (mb as u64) << 20, 1 << 20).unwrap();
                assert!(
                    got[..] == expected[mb << 20..(mb + 1) << 20],
                    "{image}: MiB {mb} differs (round {round})"
                );
            }
        }
        remove(&env, &node);
        // QEMU's own rbd driver sees the same bytes.
        qemu_compare(&conf, image, "raw", &expected);
    }
}

#[test]
fn resize_and_snapshots_listed_in_node_info_and_opened_read_only() {
    let Some(conf) = ceph("rbd_resize_snapshots") else {
        return;
    };
    let _w = watchdog("rbd_resize_snapshots", Duration::from_secs(180));
    let img = image_name("snap");
    let _c = Cleanup(conf.clone(), img.clone());
    run(Command::new("qemu-img").args(["create", "-f", "raw", &qemu_name(&conf, &img), "4M"]));
    let env = Env::new();
    let node = open_node(&env, "rbd0", &conf, &img);
    env.write(&node, 0, vec![0x11; 65536]).unwrap();
    env.flush(&node).unwrap();
    rbd_cli(&conf, &["snap", "create", &format!("rbd/{img}@first")]);
    env.write(&node, 0, vec![0x22; 65536]).unwrap();
    rbd_cli(&conf, &["snap", "create", &format!("rbd/{img}@second")]);

    // Node info: the image, its size and both snapshots, oldest first.
    let info = env.main.run(|bql| bql.query_nodes());
    let n = info
        .iter()
        .find(|n| n.name == "rbd0")
        .expect("rbd0 in query");
    assert_eq!(n.driver, "rbd");
    let spec = &n.driver_info.format_specific;
    let get = |k: &str| {
        spec.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("snapshots"), Some("2"), "{spec:?}");
    assert_eq!(get("snapshot[0]"), Some("first"), "{spec:?}");
    assert_eq!(get("snapshot[1]"), Some("second"), "{spec:?}");
    assert_eq!(get("image"), Some(img.as_str()));
    assert_eq!(n.driver_info.size, Some(4 << 20));
    assert_eq!(n.driver_info.cluster_size, Some(4 << 20));

    // Grow through a backend that took RESIZE; Ceph and QEMU see it.
    let vda = env
        .main
        .run({
            let node = node.clone();
            move |bql| {
                bql.write(|w| {
                    let perms = Permissions {
                        take: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
                        share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
                    };
                    w.add_backend("vda", &node, BackendOptions::with_perms(perms))
                })
            }
        })
        .unwrap();
    let blk = vda.clone();
    common::join(
        env.io
            .spawn(move |mut cx| async move { blk.truncate(&mut cx, 8 << 20).await }),
        "truncate",
    )
    .unwrap();
    assert!(rbd_cli(&conf, &["info", &format!("rbd/{img}")]).contains("size 8 MiB"));
    let mut expected = vec![0x22u8; 65536];
    expected.resize(8 << 20, 0);
    env.main
        .run(move |bql| bql.write(|w| w.remove_backend(&vda)))
        .unwrap();
    remove(&env, &node);
    qemu_compare(&conf, &img, "raw", &expected);

    // A snapshot opens read-only, with the data it had.
    let mut o = opts(&conf, &img);
    o.snapshot = Some("first".into());
    let snap = RbdDriver::open(o).unwrap();
    assert!(snap.is_read_only());
    let snap = add(&env, "snap", snap, vec![]);
    assert_eq!(env.read(&snap, 0, 65536).unwrap(), vec![0x11; 65536]);
    assert_eq!(env.read(&snap, 65536, 4096).unwrap(), vec![0; 4096]);
    match env.write(&snap, 0, vec![1; 512]) {
        Err(Error::ReadOnly(_)) | Err(Error::PermissionConflict { .. }) => {}
        other => panic!("a write to a snapshot: {other:?}"),
    }
    remove(&env, &snap);

    // A missing image or pool fails cleanly.
    let e = RbdDriver::open(opts(&conf, "no-such-image")).unwrap_err();
    assert!(e.to_string().contains("no-such-image"), "{e}");
}

#[test]
fn qcow2_on_rbd_under_a_filter_passes_qemu_img_check() {
    let Some(conf) = ceph("rbd_qcow2") else {
        return;
    };
    let _w = watchdog("rbd_qcow2", Duration::from_secs(180));
    let img = image_name("qcow2");
    let _c = Cleanup(conf.clone(), img.clone());
    let env = Env::new();
    // The RBD image starts empty; qcow2 grows it (RESIZE on its file).
    let rbd = add(
        &env,
        "rbd0",
        RbdDriver::create(opts(&conf, &img), 0).unwrap(),
        vec![],
    );
    let throttle = ThrottleDriver::with_config("g0", ThrottleConfig::default()).unwrap();
    let file = add(
        &env,
        "throttle0",
        throttle,
        vec![(ChildRole::Filtered, rbd.clone())],
    );
    env.create(&file, CreateOptions::new(16 << 20).cluster_size(65536))
        .unwrap();
    let q = env.open(&file, None, Qcow2Options::default()).unwrap();
    let mut expected = vec![0u8; 16 << 20];
    for (off, len, seed) in [
        (0usize, 200_000usize, 7u8),
        (3 << 20, 1 << 20, 8),
        ((15 << 20) + 17, 5000, 9),
    ] {
        let data = pattern(len, seed);
        env.write(&q, off as u64, data.clone()).unwrap();
        expected[off..off + len].copy_from_slice(&data);
    }
    env.flush(&q).unwrap();
    for n in [&q, &file, &rbd] {
        remove(&env, n);
    }
    let out = run(Command::new("qemu-img").args(["check", "-f", "qcow2", &qemu_name(&conf, &img)]));
    assert!(out.contains("No errors were found"), "{out}");
    qemu_compare(&conf, &img, "qcow2", &expected);
}

#[test]
fn mirror_from_a_local_qcow2_onto_rbd() {
    let Some(conf) = ceph("rbd_mirror") else {
        return;
    };
    let _w = watchdog("rbd_mirror", Duration::from_secs(240));
    const SIZE: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        local.to_str().unwrap(),
        "8M",
    ]));
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 0 1M",
        "-c",
        "write -P 0x44 5M 300k",
        local.to_str().unwrap(),
    ]));
    let (img, _c) = new_image(&conf, "mirror", "8M");
    // Stale data on the target that the full copy must overwrite.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x99 2M 1M",
        &qemu_name(&conf, &img),
    ]));

    let env = Env::new();
    let chain = open_chain(&env, &local, true);
    let top = chain.images[0].node.clone();
    let target = add(
        &env,
        "rbd-target",
        RbdDriver::open(opts(&conf, &img)).unwrap(),
        vec![],
    );
    let vda = job_util::add_vda(&env, &top);
    // The guest writes while the job runs.
    let blk = vda.clone();
    common::join(
        env.io
            .spawn(move |mut cx| async move { blk.write(&mut cx, 7 << 20, &[0x55; 4096]).await }),
        "guest write",
    )
    .unwrap();
    let io = env.io.handle();
    let mirror =
        MirrorOptions::new(&top, MirrorTarget::Node(target.clone())).sync(MirrorSync::Full);
    let (job, mut events) = env
        .main
        .run(move |bql| {
            let job = job::mirror(bql, &io, JobOptions::new("m0"), mirror)?;
            let events = job.events();
            Ok::<_, Error>((job, events))
        })
        .unwrap();
    until_status(&job, JobStatus::Ready);
    let blk = vda.clone();
    common::join(
        env.io
            .spawn(move |mut cx| async move { blk.write(&mut cx, 6 << 20, &[0x66; 8192]).await }),
        "guest write while ready",
    )
    .unwrap();
    let j = job.clone();
    env.main.run(move |bql| j.complete(bql)).unwrap();
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    // The guest now runs on RBD.
    assert_eq!(common::jobs::backend_node(&env.main, &vda), "rbd-target");
    job_util::flush(&env, &vda);
    let mut nodes = vec![target];
    nodes.extend(job_util::chain_nodes(&chain));
    job_util::close(&env, &vda, nodes);
    drop(env);

    let mut expected = vec![0u8; SIZE as usize];
    expected[..1 << 20].fill(0x33);
    expected[5 << 20..(5 << 20) + 300 * 1024].fill(0x44);
    expected[7 << 20..(7 << 20) + 4096].fill(0x55);
    expected[6 << 20..(6 << 20) + 8192].fill(0x66);
    qemu_compare(&conf, &img, "raw", &expected);
    // And QEMU compares the two images directly: the source kept the
    // guest's writes up to the pivot.
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            local.to_str().unwrap(),
            &qemu_name(&conf, &img),
        ])
        .output()
        .unwrap();
    // The write after the pivot went to RBD only.
    assert!(!out.status.success(), "the last guest write should differ");
}

#[test]
fn dropped_requests_never_touch_freed_memory() {
    let Some(conf) = ceph("rbd_cancel") else {
        return;
    };
    let _w = watchdog("rbd_cancel", Duration::from_secs(180));
    let (img, _c) = new_image(&conf, "cancel", "8M");
    let env = Env::new();
    let node = open_node(&env, "rbd0", &conf, &img);
    env.write(&node, 0, pattern(8 << 20, 3)).unwrap();
    let n = node.clone();
    let pending = env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        let mut pending = 0;
        for round in 0..50u32 {
            // Start a read and a write, poll once (submitted to librbd),
            // then drop them with their caller buffers while librbd works.
            let mut buf = vec![0u8; 1 << 20];
            let data = vec![round as u8; 1 << 20];
            let off = u64::from(round % 8) << 20;
            let node = n.io(&g);
            {
                let mut r = node.read(off, &mut buf);
                pending += usize::from(common::poll_once(&mut r).await.is_pending());
            }
            drop(buf);
            {
                let mut w = node.write(off, &data);
                pending += usize::from(common::poll_once(&mut w).await.is_pending());
            }
            drop(data);
            // Scribble over freed memory's likely reuse.
            let junk = vec![0xEEu8; 1 << 20];
            std::hint::black_box(&junk);
        }
        pending
    });
    // Most were dropped while librbd still worked on them.
    assert!(
        pending >= 50,
        "only {pending} of 100 requests were still in flight when dropped"
    );
    // Every byte is either the old pattern or a round's fill, block-wise
    // whole writes (librbd writes each object atomically enough for 1 MiB
    // aligned writes inside one object).
    env.flush(&node).unwrap();
    let all = env.read(&node, 0, 8 << 20).unwrap();
    let old = pattern(8 << 20, 3);
    for mb in 0..8 {
        let r = mb << 20..(mb + 1) << 20;
        let chunk = &all[r.clone()];
        let ok =
            chunk == &old[r] || (chunk.iter().all(|b| *b == chunk[0]) && u32::from(chunk[0]) < 50);
        assert!(
            ok,
            "MiB {mb} holds neither the old data nor one round's write"
        );
    }
    remove(&env, &node);
}

#[test]
fn credentials_are_never_printed() {
    let Some(conf) = ceph("rbd_credentials") else {
        return;
    };
    let _w = watchdog("rbd_credentials", Duration::from_secs(180));
    // The admin key, from the cluster's keyring.
    let keyring = conf.with_file_name("keyring");
    let text = std::fs::read_to_string(&keyring).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("a key in the keyring")
        .trim()
        .to_owned();
    let (img, _c) = new_image(&conf, "cred", "1M");

    // The right key, given as an option (the keyring is not read: it is
    // pointed away).
    let mut o = opts(&conf, &img);
    o.user = Some("admin".into());
    o.key = Some(RbdSecret::new(key.clone()));
    o.keyring = Some("/nonexistent".into());
    let drv = RbdDriver::open(o.clone()).unwrap();
    let shown = [
        format!("{o:?}"),
        format!("{drv:?}"),
        drv.describe(),
        format!("{:?}", drv.info()),
    ];
    let env = Env::new();
    let node = add(&env, "rbd0", drv, vec![]);
    env.write(&node, 0, vec![7; 4096]).unwrap();
    let info = format!("{:?}", env.main.run(|bql| bql.query_nodes()));
    for s in shown.iter().chain([&info]) {
        assert!(!s.contains(&key), "the key shows in: {s}");
    }
    remove(&env, &node);

    // Wrong keys: one malformed (refused before librados sees it: librados
    // logs a key it cannot decode), one well-formed (refused by the
    // cluster). No key is in the error.
    let malformed = "AQBx1e5mAAAAABAAn0tR3allyAk3yN0tr3alQ==".to_owned();
    let other = run(Command::new("ceph-authtool").arg("--gen-print-key"))
        .trim()
        .to_owned();
    let wrong = [malformed.clone(), other.clone()];
    for w in &wrong {
        let mut bad = o.clone();
        bad.key = Some(RbdSecret::new(w.clone()));
        bad.extra.push(("client_mount_timeout".into(), "5".into()));
        bad.extra.push(("rados_mon_op_timeout".into(), "5".into()));
        let e = RbdDriver::open(bad).unwrap_err();
        let msg = format!("{e} / {e:?}");
        assert!(!msg.contains(w.as_str()) && !msg.contains(&key), "{msg}");
    }

    // Through the img tool, key in the file name: not in its output.
    let bin = img_binary();
    for k in [&key, &malformed, &other] {
        let name = format!(
            "rbd:rbd/{img}:conf={}:id=admin:keyring=/nonexistent:key={k}:client_mount_timeout=5",
            conf.display()
        );
        let out = Command::new(&bin).args(["info", &name]).output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(k.as_str()), "img info printed the key: {all}");
        assert_eq!(
            out.status.success(),
            *k == key,
            "img info with key {}: {all}",
            if *k == key { "right" } else { "wrong" }
        );
    }
    // Nor in Ceph's own logs (the client's, written through librados in
    // this process and the img tool, and the daemons').
    let logs = conf.with_file_name("log");
    // (A cluster not started by tests/ceph/cluster.sh may log elsewhere.)
    for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let text =
            String::from_utf8_lossy(&std::fs::read(entry.path()).unwrap_or_default()).into_owned();
        for k in [&key, &malformed, &other] {
            assert!(
                !text.contains(k.as_str()),
                "{} holds a key",
                entry.path().display()
            );
        }
    }
}

#[test]
fn the_storage_daemon_exports_an_rbd_image_with_qemus_options() {
    let Some(conf) = ceph("rbd_daemon") else {
        return;
    };
    let _w = watchdog("rbd_daemon", Duration::from_secs(240));
    let (img, _c) = new_image(&conf, "daemon", "4M");
    let bin = example_with_rbd("storage_daemon");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(&bin)
        .args([
            "--blockdev",
            &format!(
                "driver=rbd,node-name=r0,pool=rbd,image={img},conf={},user=admin",
                conf.display()
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=e0,node-name=r0,name=r,writable=on",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited with {status}:\n{}", log_text());
        }
        if start.elapsed() > common::TIMEOUT {
            let _ = child.kill();
            panic!(
                "the daemon did not listen within {:?}:\n{}",
                common::TIMEOUT,
                log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///r?socket={}", sock.display());
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x42 64k 192k", &url]));
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > common::TIMEOUT {
            let _ = child.kill();
            panic!("the daemon did not exit on SIGTERM:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", log_text());
    let mut expected = vec![0u8; 4 << 20];
    expected[64 << 10..256 << 10].fill(0x42);
    qemu_compare(&conf, &img, "raw", &expected);
}

#[test]
fn block_status_follows_the_object_map() {
    let Some(conf) = ceph("rbd_block_status") else {
        return;
    };
    let _w = watchdog("rbd_block_status", Duration::from_secs(180));
    let img = image_name("status");
    let _c = Cleanup(conf.clone(), img.clone());
    // librbd's default features include object-map and fast-diff.
    rbd_cli(&conf, &["create", "--size", "20M", &format!("rbd/{img}")]);
    let env = Env::new();
    let node = open_node(&env, "rbd0", &conf, &img);
    const MB: u64 = 1 << 20;
    env.write(&node, 4 * MB + 100, vec![1; 4096]).unwrap();
    env.write(&node, 12 * MB, vec![2; 4096]).unwrap();
    env.write(&node, 16 * MB, vec![3; 4096]).unwrap();
    let status = |off: u64, len: u64| {
        let n = node.clone();
        env.on_io(move |mut cx| async move {
            let g = cx.read().await;
            n.io(&g).block_status(off, len).await.unwrap()
        })
    };
    use blockgraph::driver::BlockStatus::{Data, Zero};
    // Whole 4 MiB objects: 0-4M zero, 4-8M data, 8-12M zero, 12-20M data.
    assert_eq!(status(0, 20 * MB), (Zero, 4 * MB));
    assert_eq!(status(MB, 20 * MB - MB), (Zero, 3 * MB));
    assert_eq!(status(4 * MB, 16 * MB), (Data, 4 * MB));
    assert_eq!(status(5 * MB, 15 * MB), (Data, 3 * MB));
    assert_eq!(status(8 * MB, 12 * MB), (Zero, 4 * MB));
    assert_eq!(status(12 * MB, 8 * MB), (Data, 8 * MB));
    assert_eq!(status(13 * MB, MB), (Data, MB));
    // A whole object discarded is gone from the map.
    env.discard(&node, 4 * MB, 4 * MB).unwrap();
    assert_eq!(status(0, 20 * MB), (Zero, 12 * MB));
    remove(&env, &node);
    // QEMU's map agrees on what is data.
    let map = run(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &qemu_name(&conf, &img),
    ]));
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(12 * MB, 8 * MB)], "{map}");
}

#[test]
fn the_img_tool_creates_converts_and_reads_rbd_images() {
    let Some(conf) = ceph("rbd_img_tool") else {
        return;
    };
    let _w = watchdog("rbd_img_tool", Duration::from_secs(300));
    let bin = img_binary();
    let img_tool = |args: &[&str]| run(Command::new(&bin).args(args));
    // `img create -f qcow2` on RBD: QEMU's check is clean.
    let q = image_name("imgq");
    let _cq = Cleanup(conf.clone(), q.clone());
    let out = img_tool(&["create", "-f", "qcow2", &qemu_name(&conf, &q), "16M"]);
    assert!(out.contains("fmt=qcow2"), "{out}");
    let check = run(Command::new("qemu-img").args(["check", "-f", "qcow2", &qemu_name(&conf, &q)]));
    assert!(check.contains("No errors were found"), "{check}");
    // `img convert` from a local qcow2 to RBD (raw) and back out of it.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let src_s = src.to_str().unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", src_s, "8M"]));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x17 1M 1536k", src_s]));
    let r = image_name("imgr");
    let _cr = Cleanup(conf.clone(), r.clone());
    img_tool(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        src_s,
        &qemu_name(&conf, &r),
    ]);
    let cmp = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        src_s,
        &qemu_name(&conf, &r),
    ]));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let back = dir.path().join("back.qcow2");
    img_tool(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &qemu_name(&conf, &r),
        back.to_str().unwrap(),
    ]);
    let cmp = run(Command::new("qemu-img").args(["compare", src_s, back.to_str().unwrap()]));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // `img info` through the rbd protocol.
    let info = img_tool(&["info", &qemu_name(&conf, &r)]);
    assert!(
        info.contains("protocol type: rbd") && info.contains("8 MiB"),
        "{info}"
    );
}

#[test]
fn stream_a_local_backing_file_into_a_qcow2_on_rbd() {
    let Some(conf) = ceph("rbd_stream") else {
        return;
    };
    let _w = watchdog("rbd_stream", Duration::from_secs(240));
    const MB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let base_s = base.to_str().unwrap().to_owned();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", &base_s, "8M"]));
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x21 0 3M",
        "-c",
        "write -P 0x22 6M 1M",
        &base_s,
    ]));
    let img = image_name("stream");
    let _c = Cleanup(conf.clone(), img.clone());
    let env = Env::new();
    let chain = open_chain(&env, &base, false);
    let base_node = chain.images[0].node.clone();
    // The overlay: qcow2 on RBD, its backing the local file.
    let rbd = add(
        &env,
        "rbd0",
        RbdDriver::create(opts(&conf, &img), 0).unwrap(),
        vec![],
    );
    env.create(
        &rbd,
        CreateOptions::new(8 << 20)
            .cluster_size(65536)
            .backing(base_s.clone(), "qcow2".to_owned()),
    )
    .unwrap();
    let top = env
        .open(&rbd, Some(&base_node), Qcow2Options::default())
        .unwrap();
    env.write(&top, MB as u64, vec![0x31; MB]).unwrap();
    let mut expected = vec![0u8; 8 * MB];
    expected[..3 * MB].fill(0x21);
    expected[6 * MB..7 * MB].fill(0x22);
    expected[MB..2 * MB].fill(0x31);
    assert!(
        env.read(&top, 0, 8 * MB).unwrap() == expected,
        "before the stream"
    );

    let io = env.io.handle();
    let so = blockgraph::job::StreamOptions::new(&top);
    let mut events = env
        .main
        .run(move |bql| {
            let job = job::stream(bql, &io, JobOptions::new("s0"), so)?;
            Ok::<_, Error>(job.events())
        })
        .unwrap();
    let all = until_null(&mut events);
    assert!(completed(&all), "{all:?}");
    // The overlay stands alone now.
    let t = top.clone();
    let below = env.main.run(move |bql| t.gs(bql).backing_chain().len());
    assert_eq!(below, 1, "the top still has a backing node");
    assert!(
        env.read(&top, 0, 8 * MB).unwrap() == expected,
        "after the stream"
    );
    env.flush(&top).unwrap();
    for n in [&top, &rbd] {
        remove(&env, n);
    }
    let mut nodes = job_util::chain_nodes(&chain);
    nodes.retain(|n| {
        env.main.run({
            let n = n.clone();
            move |bql| n.gs(bql).is_in_graph()
        })
    });
    for n in &nodes {
        remove(&env, n);
    }
    drop(env);
    // QEMU: no backing file any more, clean, and the guest's data.
    let info = run(Command::new("qemu-img").args(["info", "-f", "qcow2", &qemu_name(&conf, &img)]));
    assert!(!info.contains("backing file"), "{info}");
    let check =
        run(Command::new("qemu-img").args(["check", "-f", "qcow2", &qemu_name(&conf, &img)]));
    assert!(check.contains("No errors were found"), "{check}");
    qemu_compare(&conf, &img, "qcow2", &expected);
}

#[test]
fn read_only_and_back_as_live_snapshots_and_jobs_switch_it() {
    let Some(conf) = ceph("rbd_read_only_switch") else {
        return;
    };
    let _w = watchdog("rbd_read_only_switch", Duration::from_secs(180));
    let (img, _c) = new_image(&conf, "live", "4M");
    let env = Env::new();
    let node = open_node(&env, "rbd0", &conf, &img);
    env.write(&node, 0, vec![0x41; 4096]).unwrap();
    // Read-only, as a live snapshot makes the old top: writes refused.
    let set = |ro: bool| {
        let n = node.clone();
        env.main.run(move |bql| {
            let d = bql.drain(&n);
            bql.write(|w| w.set_read_only(&d, ro))
        })
    };
    set(true).unwrap();
    let info = env.main.run(|bql| bql.query_nodes());
    assert!(
        info.iter().any(|n| n.name == "rbd0" && n.read_only),
        "{info:?}"
    );
    assert!(env.write(&node, 0, vec![0x42; 4096]).is_err());
    assert_eq!(env.read(&node, 0, 4096).unwrap(), vec![0x41; 4096]);
    // And back (what commit and mirror do to their targets).
    set(false).unwrap();
    env.write(&node, 0, vec![0x43; 4096]).unwrap();
    remove(&env, &node);
    // An image opened read-only stays so.
    let mut o = opts(&conf, &img);
    o.read_only = true;
    let ro = add(&env, "ro", RbdDriver::open(o).unwrap(), vec![]);
    let n = ro.clone();
    let e = env.main.run(move |bql| {
        let d = bql.drain(&n);
        bql.write(|w| w.set_read_only(&d, false))
    });
    assert!(e.is_err(), "{e:?}");
    remove(&env, &ro);
    let mut expected = vec![0x43u8; 4096];
    expected.resize(4 << 20, 0);
    qemu_compare(&conf, &img, "raw", &expected);
}

#[test]
fn a_live_snapshot_of_an_rbd_disk_onto_a_local_overlay_that_qemu_opens() {
    let Some(conf) = ceph("rbd_live_snapshot") else {
        return;
    };
    let _w = watchdog("rbd_live_snapshot", Duration::from_secs(180));
    let (img, _c) = new_image(&conf, "live", "4M");
    let env = Env::new();
    let node = open_node(&env, "rbd0", &conf, &img);
    env.write(&node, 0, vec![0x51; 65536]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let overlay_path = dir.path().join("overlay.qcow2");
    // The overlay (QEMU's blockdev-snapshot: made beforehand), its header
    // naming the RBD image as QEMU names it.
    let backing_name = qemu_name(&conf, &img);
    let file = add(
        &env,
        "snap-file",
        FileDriver::create(&overlay_path, 0, FileOptions::default()).unwrap(),
        vec![],
    );
    env.create(
        &file,
        CreateOptions::new(4 << 20)
            .cluster_size(65536)
            .backing(backing_name.clone(), "raw".to_owned()),
    )
    .unwrap();
    let mut qo = Qcow2Options::default();
    qo.require_backing = false;
    let overlay = env.open(&file, None, qo).unwrap();
    let io = env.main.new_io_thread("snap-io").unwrap();
    let pair = (node.clone(), overlay.clone());
    let (made, io) = common::join(
        env.main.spawn(move |mut task| async move {
            let made = blockgraph::snapshot::snapshot(&mut task, &io, &[pair]).await;
            (made, io)
        }),
        "snapshot",
    );
    made.unwrap();
    drop(io);
    // The RBD disk is the overlay's read-only backing node now.
    let info = env.main.run(|bql| bql.query_nodes());
    assert!(
        info.iter().any(|n| n.name == "rbd0" && n.read_only),
        "{info:?}"
    );
    assert!(env.write(&node, 0, vec![0; 512]).is_err());
    env.write(&overlay, 65536, vec![0x52; 65536]).unwrap();
    env.flush(&overlay).unwrap();
    remove(&env, &overlay);
    let ov_file = env
        .main
        .run(|bql| bql.node("snap-file").map(|n| n.to_handle()));
    if let Some(f) = ov_file {
        remove(&env, &f);
    }
    remove(&env, &node);
    drop(env);
    // QEMU opens the overlay and finds its backing file through the rbd:
    // name we wrote into its header.
    let ov_s = overlay_path.to_str().unwrap();
    let info = run(Command::new("qemu-img").args(["info", ov_s]));
    assert!(
        info.contains(&format!("backing file: rbd:rbd/{img}")),
        "{info}"
    );
    let mut expected = vec![0x51u8; 65536];
    expected.resize(131072, 0x52);
    expected.resize(4 << 20, 0);
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    let cmp =
        run(Command::new("qemu-img").args(["compare", "-F", "raw", ov_s, raw.to_str().unwrap()]));
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

#[test]
fn hundreds_of_requests_in_flight_on_two_io_threads_lose_nothing() {
    let Some(conf) = ceph("rbd_in_flight") else {
        return;
    };
    let _w = watchdog("rbd_in_flight", Duration::from_secs(180));
    const BLOCK: usize = 16 << 10;
    const BLOCKS: usize = 1024; // 16 MiB
    let (img, _c) = new_image(&conf, "inflight", "16M");
    let env = Env::new();
    let node = open_node(&env, "rbd0", &conf, &img);
    // Each thread writes every other block, all its requests at once, in
    // two rounds (the second overwrites half of the first), then reads
    // everything back at once.
    let lane = |io: &blockgraph::IoThread, lane: usize| {
        let n = node.clone();
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let io = n.io(&g);
            for round in 0..2u8 {
                let blocks: Vec<usize> = (0..BLOCKS)
                    .filter(|b| b % 2 == lane && (round == 0 || b % 4 < 2))
                    .collect();
                let data: Vec<Vec<u8>> = blocks
                    .iter()
                    .map(|b| pattern(BLOCK, (*b as u8) ^ round.wrapping_mul(0x5b)))
                    .collect();
                let writes = blocks
                    .iter()
                    .zip(&data)
                    .map(|(b, d)| io.write((*b * BLOCK) as u64, d));
                for r in futures::future::join_all(writes).await {
                    r.unwrap();
                }
            }
            let mut bufs: Vec<Vec<u8>> = (0..BLOCKS / 2).map(|_| vec![0u8; BLOCK]).collect();
            let reads = bufs
                .iter_mut()
                .enumerate()
                .map(|(i, buf)| io.read(((i * 2 + lane) * BLOCK) as u64, buf));
            for r in futures::future::join_all(reads).await {
                r.unwrap();
            }
            bufs
        })
    };
    let (t0, t1) = (lane(&env.io, 0), lane(&env.io2, 1));
    let got = [common::join(t0, "lane 0"), common::join(t1, "lane 1")];
    let mut expected = vec![0u8; BLOCK * BLOCKS];
    for b in 0..BLOCKS {
        let round = if b % 4 < 2 { 1u8 } else { 0 };
        expected[b * BLOCK..(b + 1) * BLOCK]
            .copy_from_slice(&pattern(BLOCK, (b as u8) ^ round.wrapping_mul(0x5b)));
    }
    for (lane, bufs) in got.iter().enumerate() {
        for (i, buf) in bufs.iter().enumerate() {
            let b = i * 2 + lane;
            assert!(
                buf[..] == expected[b * BLOCK..(b + 1) * BLOCK],
                "block {b} read back wrong"
            );
        }
    }
    env.flush(&node).unwrap();
    remove(&env, &node);
    qemu_compare(&conf, &img, "raw", &expected);
}
