//! The core of QEMU's iotest 030 (block-stream) on real image files: a
//! three-level qcow2 chain made by `qemu-img`, streamed with and without a
//! base while guests write and read on two I/O threads for the whole job;
//! then the data is checked block by block, every image left behind
//! passes `qemu-img check`, holds what it should under `qemu-img compare`,
//! and `qemu-img info` shows the rewritten chain.

mod common;
mod job_util;
mod qcow2_util;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockgraph::job::{self, JobEvent, JobOptions, StreamOptions};
use blockgraph::{Error, NodeHandle};

use common::{join, watchdog};
use job_util::{
    add_vda, apply, assert_same, chain_nodes, check_clean, close, create, guest, img, qemu_io_in,
    until_null, CLUSTER, CLUSTERS, SIZE,
};
use qcow2_util::{open_chain, p, qemu_img, require_qemu, Env};

/// base.img (every cluster), mid.img (every 3rd), top.img (every 5th), named
/// relative to `dir` as QEMU's iotests do; returns the guest disk.
fn make_chain(dir: &Path) -> Vec<u8> {
    create(dir, "base.img", None);
    create(dir, "mid.img", Some("base.img"));
    create(dir, "top.img", Some("mid.img"));
    let mut disk = vec![0u8; SIZE as usize];
    for i in 0..CLUSTERS {
        let (image, pattern) = if i % 5 == 0 {
            ("top.img", 0x30 + (i % 7) as u8)
        } else if i % 3 == 0 {
            ("mid.img", 0x20 + (i % 7) as u8)
        } else if i % 4 != 1 {
            ("base.img", 0x10 + (i % 7) as u8)
        } else {
            continue; // a hole everywhere
        };
        // Half clusters too, so ranges do not all fall on cluster bounds.
        let len = if i % 2 == 0 { CLUSTER } else { CLUSTER / 2 };
        let offset = i * CLUSTER;
        qemu_io_in(dir, image, [format!("write -P {pattern} {offset} {len}")]);
        disk[(i * CLUSTER) as usize..(i * CLUSTER + len) as usize].fill(pattern);
    }
    disk
}

fn info(dir: &Path, image: &str) -> serde_json::Value {
    let out = img(dir, &["info", "--output=json", "-U", image]);
    serde_json::from_str(&out).expect("qemu-img info JSON")
}

/// `qemu-img compare` of the qcow2 `a` with `b`.
fn compare_files(dir: &Path, a: &str, b: &str, b_format: &str) {
    let out = img(dir, &["compare", "-f", "qcow2", "-F", b_format, a, b]);
    assert!(out.contains("Images are identical"), "{a} vs {b}: {out}");
}

/// Streams top.img (down to `base` or everything) with two guests busy on
/// two I/O threads, and checks everything. `with_base` keeps base.img.
fn stream_030(with_base: bool) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut expected = make_chain(d);
    // Copies of the lower images, to show the stream leaves them alone.
    for f in ["base.img", "mid.img"] {
        std::fs::copy(d.join(f), d.join(format!("{f}.orig"))).unwrap();
    }

    let env = Env::new();
    let chain = open_chain(&env, &d.join("top.img"), true);
    assert_eq!(chain.images.len(), 3);
    let (top, mid, base) = (
        chain.images[0].node.clone(),
        chain.images[1].node.clone(),
        chain.images[2].node.clone(),
    );
    let files: Vec<NodeHandle> = chain.images.iter().map(|i| i.file.clone()).collect();
    let vda = add_vda(&env, &top);

    // Guests on both I/O threads, for the whole job and a little after.
    let stop = Arc::new(AtomicBool::new(false));
    let g0 = guest(&env.io, &vda, 0, 30, stop.clone(), 32);
    let g1 = guest(&env.io2, &vda, 1, 31, stop.clone(), 32);

    let mut options = JobOptions::new("stream0");
    options.speed = 8 << 20; // about half a second: the guests overlap it
    let mut so = StreamOptions::new(&top).copy_options(job::CopyOptions {
        chunk_size: 128 << 10,
        in_flight: 4,
        alignment: 1,
    });
    if with_base {
        so = so.base(&base);
    }
    let io = env.io.handle();
    let mut events = env
        .main
        .run(move |bql| {
            let job = job::stream(bql, &io, options, so)?;
            Ok::<_, Error>(job.events())
        })
        .unwrap();
    let all = until_null(&mut events);
    assert!(
        all.iter()
            .any(|e| matches!(e, JobEvent::Completed { error: None, .. })),
        "{all:?}"
    );
    stop.store(true, Ordering::SeqCst);
    let mut wrote: BTreeMap<u64, Vec<u8>> = join(g0, "guest 0");
    wrote.extend(join(g1, "guest 1"));
    apply(&mut expected, &wrote);

    // The graph: top's backing is base, or nothing; mid is gone, and so is
    // its file node (and base's without a base), as after a commit.
    let (t, m, b) = (top.clone(), mid.clone(), base.clone());
    env.main.run(move |bql| {
        let in_graph: Vec<bool> = files.iter().map(|f| f.gs(bql).is_in_graph()).collect();
        assert_eq!(
            in_graph,
            [true, false, with_base],
            "file nodes of top, mid, base"
        );
        let below: Vec<String> = t
            .gs(bql)
            .backing_chain()
            .iter()
            .skip(1)
            .map(|n| n.name().to_owned())
            .collect();
        if with_base {
            assert_eq!(below, [b.name()]);
        } else {
            assert!(below.is_empty(), "{below:?}");
            assert!(!b.gs(bql).is_in_graph());
        }
        assert!(!m.gs(bql).is_in_graph());
    });

    // The data, block by block, through the guest's backend.
    let blk = vda.clone();
    let disk = join(
        env.io.spawn(move |mut cx| async move {
            let mut buf = vec![0u8; SIZE as usize];
            blk.read(&mut cx, 0, &mut buf).await?;
            blk.flush(&mut cx).await?;
            Ok::<_, Error>(buf)
        }),
        "reading the disk",
    )
    .unwrap();
    assert_same(&disk, &expected);

    // Close everything so QEMU's tools may open the files.
    close(&env, &vda, chain_nodes(&chain));
    drop(env);

    // top.img names base.img now (or nothing), and holds the guest disk.
    let top_info = info(d, "top.img");
    if with_base {
        assert_eq!(top_info["backing-filename"], "base.img", "{top_info}");
        assert_eq!(top_info["backing-filename-format"], "qcow2", "{top_info}");
    } else {
        assert!(top_info.get("backing-filename").is_none(), "{top_info}");
    }
    for image in ["top.img", "mid.img", "base.img"] {
        check_clean(d, image);
    }
    std::fs::write(d.join("expected.raw"), &expected).unwrap();
    compare_files(d, "top.img", "expected.raw", "raw");
    // The images left behind are as they were.
    compare_files(d, "base.img", "base.img.orig", "qcow2");
    compare_files(d, "mid.img", "mid.img.orig", "qcow2");
    // Without a base, everything is in top itself.
    if with_base {
        return;
    }
    let map = qemu_img(&["map", "--output=json", p(&d.join("top.img"))]);
    let extents: serde_json::Value = serde_json::from_str(&map).unwrap();
    for e in extents.as_array().unwrap() {
        if e["data"] == true {
            assert_eq!(e["depth"], 0, "all data is in top: {e}");
        }
    }
}

#[test]
fn stream_with_a_base_keeps_the_base_and_drops_the_intermediate() {
    let _w = watchdog("stream_030_base", Duration::from_secs(180));
    stream_030(true);
}

#[test]
fn stream_without_a_base_makes_top_stand_alone() {
    let _w = watchdog("stream_030_no_base", Duration::from_secs(180));
    stream_030(false);
}
