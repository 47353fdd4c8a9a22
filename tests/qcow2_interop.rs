//! qcow2 interoperability with QEMU's own tools (`qemu-img`, `qemu-io`;
//! Debian `qemu-utils`, installed by `.ci/run`).
//!
//! * Images `qemu-img` makes (v2 and v3; 4 KiB, 64 KiB and 2 MiB clusters;
//!   zero clusters, discarded ranges, compressed clusters, a backing chain
//!   three deep) read back through our stack byte for byte as
//!   `qemu-img convert -O raw` reads them.
//! * Images we create and write (including growth past the first refcount
//!   block, and a backing chain) pass `qemu-img check` and compare equal
//!   with `qemu-img compare` against the expected content.
//!
//! Images stay a few MiB so the file runs in seconds.

mod common;
mod qcow2_util;

use std::path::{Path, PathBuf};

use blockgraph::drivers::qcow2::CreateOptions;
use blockgraph::drivers::{qcow2::Qcow2Options, FileDriver, FileOptions};
use blockgraph::NodeHandle;
use qcow2_util::{close_chain, open_chain, p, qemu_img, qemu_io, require_qemu, Env, Rng};

/// What QEMU reads from `img` (through `qemu-img convert -O raw`).
fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.expected.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&["convert", "-O", "raw", p(img), p(&out)]);
    std::fs::read(&out).unwrap()
}

/// Reads the whole guest disk of the image at `path` through our stack
/// and compares it with QEMU's reading.
fn assert_reads_like_qemu(env: &Env, path: &Path, dir: &Path) {
    let expected = qemu_raw(path, dir);
    let chain = open_chain(env, path, false);
    let ours = env.read_all(chain.top()).unwrap();
    assert_eq!(
        ours.len(),
        expected.len(),
        "virtual size of {}",
        path.display()
    );
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != expected[i]) {
        panic!(
            "{}: first difference at byte {i:#x}: ours {:#04x}, qemu {:#04x}",
            path.display(),
            ours[i],
            expected[i]
        );
    }
    close_chain(env, chain);
}

/// Fills an image with a mix of qemu-io writes, zero writes and discards.
fn scribble_with_qemu_io(img: &Path, cluster: u64, v3: bool) {
    let c = cluster;
    let cmds = [
        format!("write -P 0x11 0 {}", 3 * c),
        format!("write -P 0x22 {} 512", c + 512),
        format!("write -P 0x33 {} {}", 5 * c - 1024, 2048),
        format!("write -P 0x44 {} {}", 8 * c, 4 * c),
        // Zero clusters over data (with -z, v3 stores zero flags).
        format!("write -z {} {}", 9 * c, 2 * c),
        format!("write -z {} 1024", 2 * c + 1024),
        // Discarded ranges.
        format!("discard {} {}", 0, c),
        format!("write -P 0x55 {} {}", 14 * c, c),
        format!("discard {} {}", 14 * c, c),
    ];
    for cmd in cmds {
        qemu_io(img, &cmd);
    }
    if v3 {
        // Zero a range nothing was ever written to: zero flags on
        // unallocated clusters.
        qemu_io(img, &format!("write -z {} {}", 20 * c, 2 * c));
    }
}

#[test]
fn qemu_made_images_read_back_identical() {
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        for cluster in [4096u64, 65536, 2 << 20] {
            let size = (24 * cluster).max(4 << 20);
            let img = dir.path().join(format!("q-{compat}-{cluster}.qcow2"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size={cluster}"),
                p(&img),
                &size.to_string(),
            ]);
            scribble_with_qemu_io(&img, cluster, compat == "1.1");
            assert_reads_like_qemu(&env, &img, dir.path());
        }
    }
}

#[test]
fn qemu_compressed_images_read_back_identical() {
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    // Compressible but varied data, with some incompressible clusters and
    // some all-zero ones.
    let mut rng = Rng::new(5);
    let size = 3usize << 20;
    let mut raw = vec![0u8; size];
    for (i, chunk) in raw.chunks_mut(4096).enumerate() {
        match i % 5 {
            0 => chunk.copy_from_slice(&rng.bytes(4096)),
            1 => {}
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = ((i * 7 + j / 16) % 251) as u8;
                }
            }
        }
    }
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &raw).unwrap();
    for (compat, cluster) in [("1.1", 65536u64), ("0.10", 4096), ("1.1", 2 << 20)] {
        let img = dir.path().join(format!("c-{compat}-{cluster}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster}"),
            p(&src),
            p(&img),
        ]);
        let map = qemu_img(&["map", "--output=json", p(&img)]);
        assert!(
            map.contains("\"compressed\": true"),
            "qemu-img produced compressed clusters: {map}"
        );
        assert_reads_like_qemu(&env, &img, dir.path());
        let chain = open_chain(&env, &img, false);
        assert!(env.read_all(chain.top()).unwrap() == raw);
        close_chain(&env, chain);
    }
}

#[test]
fn qemu_backing_chain_three_deep_reads_back_identical() {
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (4u64 << 20).to_string();
    // raw base <- qcow2 v2 <- qcow2 v3 <- qcow2 v3 (top)
    let base = d.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&base), &size]);
    std::fs::write(
        &base,
        (0..4u32 << 20)
            .map(|i| (i / 4096 % 200 + 1) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let l1 = d.join("l1.qcow2");
    let l2 = d.join("l2.qcow2");
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&l1),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "l1.qcow2",
        "-F",
        "qcow2",
        p(&l2),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "l2.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io(&l1, "write -P 0xa1 65536 131072");
    qemu_io(&l1, "write -P 0xa2 1000448 4096");
    qemu_io(&l2, "write -P 0xb1 98304 8192");
    qemu_io(&l2, "write -z 200704 65536");
    qemu_io(&top, "write -P 0xc1 0 4096");
    qemu_io(&top, "write -P 0xc2 1048576 70000");
    qemu_io(&top, "write -z 2097152 131072");

    let chain = open_chain(&env, &top, false);
    let formats: Vec<_> = chain.images.iter().map(|i| i.format).collect();
    assert_eq!(formats, ["qcow2", "qcow2", "qcow2", "raw"]);
    close_chain(&env, chain);
    assert_reads_like_qemu(&env, &top, d);
}

/// Creates an image with our driver on a host file, then opens it.
fn create_ours(env: &Env, path: &Path, opts: CreateOptions) -> (NodeHandle, NodeHandle) {
    let drv = FileDriver::create(path, 0, FileOptions::default()).unwrap();
    let name = env.name("f");
    let file = env
        .main
        .run(move |bql| bql.write(|w| w.add_node(&name, drv, &[])))
        .unwrap();
    env.create(&file, opts).unwrap();
    let node = env.open(&file, None, Qcow2Options::default()).unwrap();
    (file, node)
}

fn assert_qemu_check_clean(img: &Path) {
    let out = qemu_img(&["check", p(img)]);
    assert!(
        out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
}

fn assert_qemu_compare(img: &Path, expected: &[u8], dir: &Path) {
    let raw = dir.join(format!(
        "{}.want.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&raw, expected).unwrap();
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(img), p(&raw)]);
    assert!(
        out.contains("Images are identical"),
        "qemu-img compare: {out}"
    );
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    for (version, cluster, size) in [
        (3u32, 65536u64, 4u64 << 20),
        (2, 4096, 4 << 20),
        // 512-byte clusters: one refcount block covers 128 KiB, the first
        // refcount table 8 MiB; 9 MiB of data needs dozens of new blocks
        // and a new, larger refcount table.
        (3, 512, 12 << 20),
        (3, 2 << 20, 8 << 20),
    ] {
        let img = dir.path().join(format!("ours-v{version}-{cluster}.qcow2"));
        let (file, node) = create_ours(
            &env,
            &img,
            CreateOptions::new(size)
                .cluster_size(cluster)
                .version(version),
        );
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(cluster + u64::from(version));
        // Dense writes over the first part, then scattered ones.
        let dense = if cluster == 512 {
            9 << 20
        } else {
            (size / 2).min(3 << 20) as usize
        };
        for off in (0..dense).step_by(64 << 10) {
            let d = rng.bytes((64 << 10).min(dense - off));
            model[off..off + d.len()].copy_from_slice(&d);
            env.write(&node, off as u64, d).unwrap();
        }
        for _ in 0..40 {
            let off = rng.below(size / 512) * 512;
            let len = (((rng.below(16) + 1) * 512).min(size - off)) as usize;
            match rng.below(5) {
                0 => {
                    env.write_zeroes(&node, off, len as u64).unwrap();
                    model[off as usize..off as usize + len].fill(0);
                }
                1 => {
                    env.discard(&node, off, len as u64).unwrap();
                    let first = off.div_ceil(cluster) * cluster;
                    let last = ((off + len as u64) / cluster * cluster).max(first);
                    model[first as usize..last as usize].fill(0);
                }
                _ => {
                    let d = rng.bytes(len);
                    model[off as usize..off as usize + len].copy_from_slice(&d);
                    env.write(&node, off, d).unwrap();
                }
            }
        }
        env.flush(&node).unwrap();
        assert!(env.check(&node, false).unwrap().is_clean());
        env.remove(&node).unwrap();
        env.remove(&file).unwrap();
        drop((node, file));

        assert_qemu_check_clean(&img);
        assert_qemu_compare(&img, &model, dir.path());
        if cluster == 512 {
            let info = qemu_img(&["info", "--output=json", p(&img)]);
            assert!(info.contains("\"cluster-size\": 512"), "{info}");
            let header = std::fs::read(&img).unwrap();
            let table = u64::from_be_bytes(header[48..56].try_into().unwrap());
            let clusters = u32::from_be_bytes(header[56..60].try_into().unwrap());
            assert!(
                table != 512 && clusters > 1,
                "the refcount table grew and moved"
            );
        }

        // And QEMU can keep writing it, and we read what it wrote.
        qemu_io(&img, "write -P 0x7e 4096 8192");
        model[4096..12288].fill(0x7e);
        assert_qemu_check_clean(&img);
        let chain = open_chain(&env, &img, false);
        assert!(env.read_all(chain.top()).unwrap() == model);
        close_chain(&env, chain);
    }
}

#[test]
fn our_backing_chain_passes_qemu_check_and_compare() {
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 2u64 << 20;
    // Base: ours, with data.
    let base = d.join("base.qcow2");
    let (bfile, bnode) = create_ours(&env, &base, CreateOptions::new(size).cluster_size(4096));
    let mut model: Vec<u8> = (0..size).map(|i| (i / 512 % 97) as u8).collect();
    env.write(&bnode, 0, model.clone()).unwrap();
    env.flush(&bnode).unwrap();
    env.remove(&bnode).unwrap();
    env.remove(&bfile).unwrap();
    drop((bnode, bfile));

    // Overlay: ours, naming the base relatively, opened through the chain
    // opener and written.
    let top = d.join("top.qcow2");
    {
        let drv = FileDriver::create(&top, 0, FileOptions::default()).unwrap();
        let tfile = env
            .main
            .run(|bql| bql.write(|w| w.add_node("topfile", drv, &[])))
            .unwrap();
        env.create(
            &tfile,
            CreateOptions::new(size)
                .cluster_size(65536)
                .backing("base.qcow2", "qcow2"),
        )
        .unwrap();
        env.remove(&tfile).unwrap();
    }
    let chain = open_chain(&env, &top, true);
    assert_eq!(chain.images.len(), 2);
    let node = chain.top().clone();
    env.write(&node, 1000 * 512, vec![0xcc; 3 * 512]).unwrap();
    model[1000 * 512..1003 * 512].fill(0xcc);
    env.write_zeroes(&node, 3 * 65536, 65536).unwrap();
    model[3 * 65536..4 * 65536].fill(0);
    env.write(&node, size - 512, vec![0xdd; 512]).unwrap();
    model[(size - 512) as usize..].fill(0xdd);
    env.flush(&node).unwrap();
    assert_eq!(env.read_all(&node).unwrap(), model);
    drop(node);
    close_chain(&env, chain);

    assert_qemu_check_clean(&top);
    assert_qemu_check_clean(&base);
    assert_qemu_compare(&top, &model, d);
    let info = qemu_img(&["info", "--backing-chain", p(&top)]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
}

#[test]
fn qemu_check_accepts_our_leaky_crash_state_after_repair() {
    // A write whose metadata was never flushed leaves only leaks behind:
    // qemu-img check -r leaks repairs them and the flushed data is intact.
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    let (file, node) = create_ours(&env, &img, CreateOptions::new(1 << 20).cluster_size(4096));
    env.write(&node, 0, vec![0x42; 8192]).unwrap();
    env.flush(&node).unwrap();
    // Unflushed allocating writes and a discard after the flush.
    env.write(&node, 65536, vec![0x43; 4096]).unwrap();
    env.write(&node, 200 * 4096, vec![0x44; 3 * 4096]).unwrap();
    env.discard(&node, 4096, 4096).unwrap();
    // "Crash": copy the file as it is now, without flushing.
    let crashed: PathBuf = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", p(&crashed)])
        .output()
        .unwrap();
    // 0: clean; 3: leaks only. Never 2 (corruption).
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check on a crash state: {code:?} {}",
        String::from_utf8_lossy(&out.stdout)
    );
    qemu_img(&["check", "-r", "leaks", p(&crashed)]);
    assert_qemu_check_clean(&crashed);
    let mut want = vec![0u8; 1 << 20];
    want[..8192].fill(0x42);
    let got = qemu_raw(&crashed, dir.path());
    assert_eq!(&got[..8192], &want[..8192], "flushed data survived");
    env.remove(&node).unwrap();
    env.remove(&file).unwrap();
}

#[test]
fn our_compressed_images_pass_qemu_check_and_compare() {
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours-compressed.qcow2");
    let cs = 65536u64;
    let size = 2u64 << 20;
    let (file, node) = create_ours(&env, &img, CreateOptions::new(size).cluster_size(cs));
    let mut model = vec![0u8; size as usize];
    for c in 0..size / cs {
        let data: Vec<u8> = (0..cs).map(|i| ((i / 100 + c * 3) % 13) as u8).collect();
        model[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&data);
        let n = node.clone();
        env.on_io(move |mut cx| async move {
            let g = cx.read().await;
            let io = n.io(&g);
            io.driver_as::<blockgraph::drivers::qcow2::Qcow2Driver>()
                .unwrap()
                .write_compressed(io, c * cs, &data)
                .await
        })
        .unwrap();
    }
    // Rewrite part of one compressed cluster.
    env.write(&node, 3 * cs + 4096, vec![0xab; 4096]).unwrap();
    model[(3 * cs + 4096) as usize..(3 * cs + 8192) as usize].fill(0xab);
    env.flush(&node).unwrap();
    env.remove(&node).unwrap();
    env.remove(&file).unwrap();
    drop((node, file));
    assert_qemu_check_clean(&img);
    assert_qemu_compare(&img, &model, dir.path());
    let map = qemu_img(&["map", "--output=json", p(&img)]);
    assert!(map.contains("\"compressed\": true"), "{map}");
}

#[test]
fn concurrent_writers_on_a_host_file_pass_qemu_check() {
    let _w = common::watchdog("concurrent_writers", std::time::Duration::from_secs(120));
    // Two I/O threads, several requests in flight each, allocating the same
    // clusters from different sides, on a real host file.
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("concurrent.qcow2");
    let cs = 4096u64;
    let size = 4u64 << 20;
    let (file, node) = create_ours(&env, &img, CreateOptions::new(size).cluster_size(cs));
    let spawn = |io: &blockgraph::IoThread, parity: u64| {
        let node = node.clone();
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            let mut lanes = Vec::new();
            for lane in 0..4u64 {
                lanes.push(async move {
                    // 1 KiB pieces: thread 0 takes even ones, thread 1 odd.
                    let mut k = lane * 2 + parity;
                    while k < size / 1024 {
                        n.write(k * 1024, &[(k % 253) as u8; 1024]).await?;
                        k += 8;
                    }
                    Ok::<_, blockgraph::Error>(())
                });
            }
            for r in futures::future::join_all(lanes).await {
                r?;
            }
            n.flush().await
        })
    };
    let a = spawn(&env.io, 0);
    let b = spawn(&env.io2, 1);
    a.join().unwrap();
    b.join().unwrap();
    env.flush(&node).unwrap();
    env.remove(&node).unwrap();
    env.remove(&file).unwrap();
    drop((node, file));
    let model: Vec<u8> = (0..size).map(|i| (i / 1024 % 253) as u8).collect();
    assert_qemu_check_clean(&img);
    assert_qemu_compare(&img, &model, dir.path());
}

#[test]
fn concurrent_owned_writers_on_a_host_file_pass_qemu_check() {
    let _w = common::watchdog(
        "concurrent_owned_writers",
        std::time::Duration::from_secs(120),
    );
    // The same with owned buffers (`write_buf`), which qcow2 hands to the
    // file as they are: first whole clusters, allocated by runs of
    // different lengths from both threads at once, then 1 KiB pieces
    // rewritten in place by the other thread.
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("owned.qcow2");
    let cs = 4096u64;
    let size = 4u64 << 20;
    let (file, node) = create_ours(&env, &img, CreateOptions::new(size).cluster_size(cs));
    let spawn = |io: &blockgraph::IoThread, parity: u64| {
        let node = node.clone();
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            let mut lanes = Vec::new();
            for lane in 0..4u64 {
                lanes.push(async move {
                    // Runs of 1..=3 clusters: thread 0 takes even runs of
                    // 4-cluster groups, thread 1 odd ones.
                    let mut group = lane * 2 + parity;
                    while group * 4 * cs < size {
                        let run = 1 + group % 3;
                        let at = group * 4 * cs;
                        let mut buf = blockgraph::IoBuf::zeroed((run * cs) as usize);
                        buf.fill((group % 251) as u8 + 1);
                        n.write_buf(at, buf).await?;
                        group += 8;
                    }
                    Ok::<_, blockgraph::Error>(())
                });
            }
            for r in futures::future::join_all(lanes).await {
                r?;
            }
            n.flush().await
        })
    };
    let a = spawn(&env.io, 0);
    let b = spawn(&env.io2, 1);
    a.join().unwrap();
    b.join().unwrap();
    let pieces = |io: &blockgraph::IoThread, parity: u64| {
        let node = node.clone();
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            // The first KiB of each group's first cluster, by the thread
            // that did not allocate it.
            let mut group = 1 - parity;
            while group * 4 * cs < size {
                let mut buf = blockgraph::IoBuf::zeroed(1024);
                buf.fill(0xF0);
                n.write_buf(group * 4 * cs, buf).await?;
                group += 2;
            }
            n.flush().await
        })
    };
    let a = pieces(&env.io, 0);
    let b = pieces(&env.io2, 1);
    a.join().unwrap();
    b.join().unwrap();
    env.flush(&node).unwrap();
    env.remove(&node).unwrap();
    env.remove(&file).unwrap();
    drop((node, file));
    let mut model = vec![0u8; size as usize];
    for group in 0..size / (4 * cs) {
        let at = (group * 4 * cs) as usize;
        let run = (1 + group % 3) * cs;
        model[at..at + run as usize].fill((group % 251) as u8 + 1);
        model[at..at + 1024].fill(0xF0);
    }
    assert_qemu_check_clean(&img);
    assert_qemu_compare(&img, &model, dir.path());
}

#[test]
fn we_write_qemu_images_with_any_refcount_width() {
    // refcount_bits 1, 2, 4, 8, 16, 32, 64 (refcount_order 0-6): our
    // allocations, including new refcount blocks (512-byte clusters), keep
    // qemu-img check happy.
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    for bits in [1u32, 2, 4, 8, 32, 64] {
        let img = dir.path().join(format!("rc{bits}.qcow2"));
        let size = 3u64 << 20;
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("refcount_bits={bits},cluster_size=512"),
            p(&img),
            &size.to_string(),
        ]);
        qemu_io(&img, "write -P 0x31 0 65536");
        let mut model = vec![0u8; size as usize];
        model[..65536].fill(0x31);
        let chain = open_chain(&env, &img, true);
        let node = chain.top().clone();
        let mut rng = Rng::new(u64::from(bits));
        let data = rng.bytes(2 << 20);
        env.write(&node, 512 << 10, data.clone()).unwrap();
        model[512 << 10..(512 << 10) + data.len()].copy_from_slice(&data);
        env.discard(&node, 8192, 8192).unwrap();
        model[8192..16384].fill(0);
        env.flush(&node).unwrap();
        assert!(env.check(&node, false).unwrap().is_clean());
        drop(node);
        close_chain(&env, chain);
        assert_qemu_check_clean(&img);
        assert_qemu_compare(&img, &model, dir.path());
    }
}
