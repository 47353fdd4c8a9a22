//! Helpers shared by the block job tests: a three-level qcow2 chain in
//! memory with a known content per cluster, guest I/O that keeps its own
//! model of what it wrote, waiting for a job to end, and image files made
//! and checked by QEMU's tools.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockgraph::drivers::qcow2::{CreateOptions, ImageChain, Qcow2Options};
use blockgraph::drivers::{FaultController, FaultInjector};
use blockgraph::job::{Job, JobEvent, JobEvents, JobStatus};
use blockgraph::{BackendOptions, BlockBackend, ChildRole, IoThread, NodeHandle, TaskHandle};

use crate::qcow2_util::{run, Env, Rng, MEM_CAPACITY};

pub const CLUSTER: u64 = 64 << 10;
pub const SIZE: u64 = 4 << 20;
pub const CLUSTERS: u64 = SIZE / CLUSTER;

/// The bytes layer `layer` stores in cluster `i`.
pub fn pattern(layer: u8, i: u64) -> Vec<u8> {
    let mut v = vec![layer; CLUSTER as usize];
    for (k, b) in v.iter_mut().enumerate().step_by(512) {
        *b = (i as u8).wrapping_mul(7) ^ (k >> 9) as u8 ^ layer;
    }
    v
}

/// Which layer stores cluster `i`: top every 5th, mid every 3rd, base
/// everything.
pub fn layer_of(i: u64) -> u8 {
    if i % 5 == 0 {
        3
    } else if i % 3 == 0 {
        2
    } else {
        1
    }
}

/// The guest disk the chain shows.
pub fn chain_contents() -> Vec<u8> {
    (0..CLUSTERS)
        .flat_map(|i| pattern(layer_of(i), i))
        .collect()
}

pub struct MemChain {
    pub base: NodeHandle,
    pub mid: NodeHandle,
    pub top: NodeHandle,
    /// A fault injector between top and mid (top's backing), if asked.
    pub fault: Option<(NodeHandle, FaultController)>,
    /// Counts requests reaching top's file (a fault injector without
    /// rules).
    pub top_file_requests: FaultController,
    pub vda: BlockBackend,
}

/// base (qcow2, every cluster) <- mid (every 3rd) <- top (every 5th),
/// all in memory; `fault` puts a fault injector between top and mid.
pub fn mem_chain(env: &Env, fault: bool) -> MemChain {
    let opts = || CreateOptions::new(SIZE).cluster_size(CLUSTER);
    let base_file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(&base_file, opts()).unwrap();
    let base = env.open(&base_file, None, Qcow2Options::default()).unwrap();
    for i in 0..CLUSTERS {
        env.write(&base, i * CLUSTER, pattern(1, i)).unwrap();
    }
    let mid_file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(&mid_file, opts().backing("base.qcow2", "qcow2"))
        .unwrap();
    let mid = env
        .open(&mid_file, Some(&base), Qcow2Options::default())
        .unwrap();
    for i in (0..CLUSTERS).filter(|i| layer_of(*i) == 2) {
        env.write(&mid, i * CLUSTER, pattern(2, i)).unwrap();
    }
    let fault = fault.then(|| {
        let injector = FaultInjector::new();
        let control = injector.controller();
        let (m, name) = (mid.clone(), env.name("fault"));
        let node = env
            .main
            .run(move |bql| {
                bql.write(|w| w.add_node(&name, injector, &[(ChildRole::Filtered, &m)]))
            })
            .unwrap();
        (node, control)
    });
    let below_top = fault.as_ref().map_or(&mid, |(n, _)| n).clone();
    let top_mem = env.mem_node(Vec::new(), MEM_CAPACITY);
    let counter = FaultInjector::new();
    let top_file_requests = counter.controller();
    let (m, name) = (top_mem.clone(), env.name("count"));
    let top_file = env
        .main
        .run(move |bql| bql.write(|w| w.add_node(&name, counter, &[(ChildRole::Filtered, &m)])))
        .unwrap();
    env.create(&top_file, opts().backing("mid.qcow2", "qcow2"))
        .unwrap();
    let top = env
        .open(&top_file, Some(&below_top), Qcow2Options::default())
        .unwrap();
    for i in (0..CLUSTERS).filter(|i| layer_of(*i) == 3) {
        env.write(&top, i * CLUSTER, pattern(3, i)).unwrap();
    }
    let (t, name) = (top.clone(), env.name("vda"));
    let vda = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend(&name, &t, BackendOptions::default())))
        .unwrap();
    MemChain {
        base,
        mid,
        top,
        fault,
        top_file_requests,
        vda,
    }
}

/// The names of `node`'s backing chain below it, top down.
pub fn chain_below(env: &Env, node: &NodeHandle) -> Vec<String> {
    let n = node.clone();
    env.main.run(move |bql| {
        n.gs(bql)
            .backing_chain()
            .iter()
            .skip(1)
            .map(|r| r.name().to_owned())
            .collect()
    })
}

/// Reads the whole guest disk through `blk` on `io`.
pub fn read_disk(io: &IoThread, blk: &BlockBackend) -> Vec<u8> {
    let blk = blk.clone();
    crate::common::join(
        io.spawn(move |mut cx| async move {
            let mut buf = vec![0u8; SIZE as usize];
            blk.read(&mut cx, 0, &mut buf).await.map(|_| buf)
        }),
        "reading the disk",
    )
    .unwrap()
}

/// Waits for the job's events until it is gone; returns them all.
pub fn until_null(events: &mut JobEvents) -> Vec<JobEvent> {
    let mut all = Vec::new();
    loop {
        match events.next_timeout(crate::common::TIMEOUT) {
            Some(e) => {
                let end = e == JobEvent::StatusChange(JobStatus::Null);
                all.push(e);
                if end {
                    return all;
                }
            }
            None => panic!("the job did not end; events so far: {all:?}"),
        }
    }
}

/// Waits until `job` has `status`.
pub fn until_status(job: &Job, status: JobStatus) {
    crate::common::wait_until(&format!("job '{}' is {status}", job.id()), || {
        job.status() == status
    });
}

/// Guest writes of one 4 KiB block each at random places of the clusters
/// `i` with `i % 2 == lane`, each read back at once; runs on `io` until
/// `stop`, and returns what it wrote last at each offset.
pub fn guest(
    io: &IoThread,
    blk: &BlockBackend,
    lane: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    min_writes: usize,
) -> TaskHandle<BTreeMap<u64, Vec<u8>>> {
    let blk = blk.clone();
    io.spawn(move |mut cx| async move {
        let mut rng = Rng::new(seed);
        let mut wrote = BTreeMap::new();
        let mut n = 0usize;
        while n < min_writes || !stop.load(Ordering::SeqCst) {
            let cluster = rng.below(CLUSTERS / 2) * 2 + lane;
            let offset = cluster * CLUSTER + rng.below(CLUSTER / 4096) * 4096;
            let data = rng.bytes(4096);
            blk.write(&mut cx, offset, &data)
                .await
                .unwrap_or_else(|e| panic!("guest write at {offset}: {e}"));
            let mut back = vec![0u8; 4096];
            blk.read(&mut cx, offset, &mut back)
                .await
                .unwrap_or_else(|e| panic!("guest read at {offset}: {e}"));
            assert!(back == data, "guest read at {offset} lost its own write");
            wrote.insert(offset, data);
            n += 1;
            if n % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        wrote
    })
}

/// `expected` with the guests' writes applied.
pub fn apply(expected: &mut [u8], writes: &BTreeMap<u64, Vec<u8>>) {
    for (off, data) in writes {
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

/// Compares block by block, naming the first 4 KiB block that differs.
pub fn assert_same(actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.chunks(4096).zip(expected.chunks(4096)).enumerate() {
        assert!(a == e, "block {i} (offset {}) differs", i * 4096);
    }
}

/// A shared list of what happened, for ordering checks.
pub type Log = Arc<Mutex<Vec<String>>>;

// ---- image files made and checked by QEMU's tools ---------------------

/// Runs `qemu-img` in `dir`, names relative to it (as QEMU's iotests do).
pub fn img(dir: &Path, args: &[&str]) -> String {
    run(Command::new("qemu-img").current_dir(dir).args(args))
}

/// Creates `name` (qcow2, 64 KiB clusters, the tests' size), optionally
/// over `backing`.
pub fn create(dir: &Path, name: &str, backing: Option<&str>) {
    let size = SIZE.to_string();
    let cluster = format!("cluster_size={CLUSTER}");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &cluster];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([name, &size]);
    img(dir, &args);
}

/// Runs one `qemu-io` on the qcow2 `image` in `dir` with `commands`.
pub fn qemu_io_in(dir: &Path, image: &str, commands: impl IntoIterator<Item = String>) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", "qcow2"]);
    for c in commands {
        cmd.args(["-c", &c]);
    }
    run(cmd.arg(image));
}

pub fn check_clean(dir: &Path, image: &str) {
    let out = img(dir, &["check", image]);
    assert!(out.contains("No errors were found"), "{image}: {out}");
}

/// `qemu-img compare` of `image` (`format`, its whole chain) with the raw
/// bytes `expected`.
pub fn compare(dir: &Path, image: &str, format: &str, expected: &[u8]) {
    let raw = format!("{image}.expected.raw");
    std::fs::write(dir.join(&raw), expected).unwrap();
    let out = img(dir, &["compare", "-f", format, "-F", "raw", image, &raw]);
    assert!(out.contains("Images are identical"), "{image}: {out}");
}

/// Flushes the guest's disk (the qcow2 metadata cache goes to the files).
pub fn flush(env: &Env, vda: &BlockBackend) {
    let blk = vda.clone();
    crate::common::join(
        env.io
            .spawn(move |mut cx| async move { blk.flush(&mut cx).await }),
        "flush",
    )
    .unwrap();
}

/// Attaches the guest's backend `vda` to `node`.
pub fn add_vda(env: &Env, node: &NodeHandle) -> BlockBackend {
    let n = node.clone();
    env.main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &n, BackendOptions::default())))
        .unwrap()
}

pub fn remove_backend(env: &Env, vda: &BlockBackend) {
    let vda = vda.clone();
    env.main
        .run(move |bql| bql.write(|w| w.remove_backend(&vda)))
        .unwrap();
}

/// Each image's node and file, top down.
pub fn chain_nodes(chain: &ImageChain) -> Vec<NodeHandle> {
    let mut nodes = Vec::new();
    for i in &chain.images {
        nodes.extend([i.node.clone(), i.file.clone()]);
    }
    nodes
}

/// Removes the backend and every one of `nodes` that is still there (a
/// job removed some), so QEMU's tools may open the files.
pub fn close(env: &Env, vda: &BlockBackend, nodes: Vec<NodeHandle>) {
    let vda = vda.clone();
    env.main.run(move |bql| {
        bql.write(|w| w.remove_backend(&vda)).unwrap();
        for n in &nodes {
            if n.gs(bql).is_in_graph() {
                let d = bql.drain(n);
                bql.write(|w| w.remove_node(&d)).unwrap();
            }
        }
    });
}
