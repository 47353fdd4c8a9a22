//! qcow2 driver behaviour over the memory driver: read/write/zero/discard
//! semantics against a reference model, backing files, concurrent writers
//! on two I/O threads, allocation growth past the first refcount block,
//! crash consistency at every step, and `check`.

mod common;
mod qcow2_util;

use blockgraph::drivers::qcow2::CreateOptions;
use blockgraph::drivers::qcow2::Qcow2Options;
use blockgraph::{driver::BlockStatus, Error, NodeHandle};
use qcow2_util::{Env, Rng, MEM_CAPACITY};

/// A fresh image of `size` bytes in memory.
fn new_image(env: &Env, opts: CreateOptions) -> (NodeHandle, NodeHandle) {
    let file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(&file, opts).expect("create");
    let node = env
        .open(&file, None, Qcow2Options::default())
        .expect("open");
    (file, node)
}

/// Random writes, zeroes and discards against a model; everything read
/// back must match, before and after reopening the flushed image.
fn exercise(env: &Env, opts: CreateOptions, seed: u64, ops: usize) {
    let size = opts.size;
    let cs = opts.cluster_size;
    let (file, node) = new_image(env, opts);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    for _ in 0..ops {
        let sector = 512u64;
        let off = rng.below(size / sector) * sector;
        let max = (size - off).min(3 * cs + 1024);
        let len = (rng.below(max / sector) + 1) * sector;
        match rng.below(10) {
            0 => {
                env.write_zeroes(&node, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                // Discarded whole clusters read as zeroes here (no backing
                // file); partial ones keep their data.
                env.discard(&node, off, len).unwrap();
                let first = off.div_ceil(cs) * cs;
                let last = ((off + len) / cs * cs).max(first);
                let last = if off + len == size { size } else { last };
                model[first as usize..last as usize].fill(0);
            }
            2 => env.flush(&node).unwrap(),
            _ => {
                let data = rng.bytes(len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                env.write(&node, off, data).unwrap();
            }
        }
        if rng.below(4) == 0 {
            let roff = rng.below(size / 512) * 512;
            let rlen = ((size - roff).min(2 * cs)) as usize;
            assert_eq!(
                env.read(&node, roff, rlen).unwrap(),
                &model[roff as usize..roff as usize + rlen]
            );
        }
    }
    assert!(env.read_all(&node).unwrap() == model, "whole disk differs");
    let report = env.check(&node, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    env.remove(&node).unwrap();

    // Reopen what is in the file: the flushed image has everything.
    let bytes = env.contents(&file);
    let again = env.open_bytes(bytes, Qcow2Options::read_only()).unwrap();
    assert!(
        env.read_all(&again).unwrap() == model,
        "reopened disk differs"
    );
}

#[test]
fn v3_images_of_every_cluster_size_match_the_model() {
    let env = Env::new();
    for (i, cs) in [512u64, 4096, 65536, 2 << 20].into_iter().enumerate() {
        let size = if cs == 2 << 20 { 6 << 20 } else { 1 << 20 };
        exercise(
            &env,
            CreateOptions::new(size).cluster_size(cs),
            i as u64,
            60,
        );
    }
}

#[test]
fn v2_images_match_the_model() {
    let env = Env::new();
    for (i, cs) in [512u64, 65536].into_iter().enumerate() {
        exercise(
            &env,
            CreateOptions::new(1 << 20).cluster_size(cs).version(2),
            10 + i as u64,
            60,
        );
    }
}

#[test]
fn odd_sized_disk_handles_its_last_partial_cluster() {
    let env = Env::new();
    // 1 MiB + 5 sectors: the last cluster is mostly outside the disk.
    exercise(
        &env,
        CreateOptions::new((1 << 20) + 2560).cluster_size(4096),
        99,
        60,
    );
}

#[test]
fn zero_and_discard_leave_the_right_block_status() {
    let env = Env::new();
    let cs = 4096u64;
    let (_file, node) = new_image(&env, CreateOptions::new(1 << 20).cluster_size(cs));
    let status = |off: u64| {
        let n = node.clone();
        env.on_io(move |mut cx| async move {
            let g = cx.read().await;
            n.io(&g).block_status(off, 4096).await
        })
        .unwrap()
    };
    assert_eq!(status(0).0, BlockStatus::Unallocated);
    env.write(&node, 0, vec![0xaa; 3 * cs as usize]).unwrap();
    assert_eq!(status(0), (BlockStatus::Data, 4096));
    env.write_zeroes(&node, cs, cs).unwrap();
    assert_eq!(status(cs).0, BlockStatus::Zero);
    assert_eq!(
        env.read(&node, cs, cs as usize).unwrap(),
        vec![0; cs as usize]
    );
    // Partial zeroing writes zeroes into the allocated cluster.
    env.write_zeroes(&node, 2 * cs + 512, 512).unwrap();
    let third = env.read(&node, 2 * cs, cs as usize).unwrap();
    assert_eq!(&third[..512], &[0xaa; 512]);
    assert_eq!(&third[512..1024], &[0; 512]);
    assert_eq!(&third[1024..], &vec![0xaa; cs as usize - 1024][..]);
    env.discard(&node, 0, cs).unwrap();
    assert_eq!(status(0).0, BlockStatus::Unallocated);
    assert_eq!(env.read(&node, 0, 512).unwrap(), vec![0; 512]);
    // The freed clusters are reported as such once flushed: no leak.
    env.flush(&node).unwrap();
    let report = env.check(&node, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        report.allocated_clusters, 1,
        "only the third cluster holds data"
    );
}

#[test]
fn requests_past_the_end_and_writes_to_read_only_images_fail() {
    let env = Env::new();
    let (file, node) = new_image(&env, CreateOptions::new(1 << 20).cluster_size(4096));
    assert!(matches!(
        env.read(&node, (1 << 20) - 512, 1024),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        env.write(&node, u64::MAX - 10, vec![0; 512]),
        Err(Error::OutOfRange { .. })
    ));
    env.flush(&node).unwrap();
    env.remove(&node).unwrap();
    let ro = env.open(&file, None, Qcow2Options::read_only()).unwrap();
    assert!(matches!(
        env.write(&ro, 0, vec![1; 512]),
        Err(Error::ReadOnly(_))
    ));
    assert!(matches!(env.discard(&ro, 0, 4096), Err(Error::ReadOnly(_))));
    assert!(matches!(
        env.write_zeroes(&ro, 0, 4096),
        Err(Error::ReadOnly(_))
    ));
}

#[test]
fn backing_file_shows_through_and_copy_on_write_keeps_the_rest() {
    for version in [2u32, 3] {
        let env = Env::new();
        let cs = 4096u64;
        let size = 256 << 10;
        let mut rng = Rng::new(7);
        let base_data = rng.bytes(size as usize);
        let base = env.mem_node(base_data.clone(), size as usize);
        let file = env.mem_node(Vec::new(), MEM_CAPACITY);
        env.create(
            &file,
            CreateOptions::new(size)
                .cluster_size(cs)
                .version(version)
                .backing("base.raw", "raw"),
        )
        .unwrap();
        // Without the backing child, opening is refused by default.
        assert!(matches!(
            env.open(&file, None, Qcow2Options::default()),
            Err(Error::InvalidArgument(_))
        ));
        let top = env
            .open(&file, Some(&base), Qcow2Options::default())
            .unwrap();
        let mut model = base_data.clone();
        assert_eq!(env.read_all(&top).unwrap(), model);

        // A sector in the middle of a cluster: the rest comes from the base.
        env.write(&top, cs + 1024, vec![0x11; 512]).unwrap();
        model[(cs + 1024) as usize..(cs + 1536) as usize].fill(0x11);
        // Zeroes must hide the backing file.
        env.write_zeroes(&top, 4 * cs, 2 * cs).unwrap();
        model[(4 * cs) as usize..(6 * cs) as usize].fill(0);
        env.write_zeroes(&top, 8 * cs + 512, 512).unwrap();
        model[(8 * cs + 512) as usize..(8 * cs + 1024) as usize].fill(0);
        assert_eq!(env.read_all(&top).unwrap(), model);

        // Discard of a whole cluster: zeroes in v3, the backing data in v2.
        env.discard(&top, cs, cs).unwrap();
        if version == 3 {
            model[cs as usize..(2 * cs) as usize].fill(0);
        } else {
            model[cs as usize..(2 * cs) as usize]
                .copy_from_slice(&base_data[cs as usize..(2 * cs) as usize]);
        }
        assert_eq!(env.read_all(&top).unwrap(), model);
        env.flush(&top).unwrap();
        assert!(env.check(&top, false).unwrap().is_clean());
    }
}

#[test]
fn backing_shorter_than_the_image_reads_zeroes_beyond_it() {
    let env = Env::new();
    let base = env.mem_node(vec![0x5a; 10_000], 10_000);
    let file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(
        &file,
        CreateOptions::new(64 << 10)
            .cluster_size(4096)
            .backing("b", "raw"),
    )
    .unwrap();
    let top = env
        .open(&file, Some(&base), Qcow2Options::default())
        .unwrap();
    let all = env.read_all(&top).unwrap();
    assert!(all[..10_000].iter().all(|&b| b == 0x5a));
    assert!(all[10_000..].iter().all(|&b| b == 0));
    // Copy-on-write of the cluster holding the end of the backing file.
    env.write(&top, 8192, vec![1; 512]).unwrap();
    let c = env.read(&top, 8192, 4096).unwrap();
    assert_eq!(&c[..512], &[1; 512]);
    assert!(c[512..10_000 - 8192].iter().all(|&b| b == 0x5a));
    assert!(c[10_000 - 8192..].iter().all(|&b| b == 0));
}

#[test]
fn two_io_threads_write_the_same_clusters_concurrently() {
    let env = Env::new();
    let cs = 4096u64;
    let size = 2u64 << 20;
    let (file, node) = new_image(&env, CreateOptions::new(size).cluster_size(cs));
    // Thread A writes the even sectors, thread B the odd ones: every
    // cluster is allocated by whichever comes first while the other writes
    // into it, so the in-flight allocation path is exercised constantly.
    let sectors = size / 512;
    let spawn = |io: &blockgraph::IoThread, parity: u64| {
        let node = node.clone();
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            // Several requests in flight at once from this thread too.
            let mut futs = Vec::new();
            for chunk in 0..8u64 {
                futs.push(async move {
                    let mut s = chunk * 2 + parity;
                    while s < sectors {
                        let byte = (s % 251) as u8;
                        n.write(s * 512, &[byte; 512]).await?;
                        s += 16;
                    }
                    Ok::<_, blockgraph::Error>(())
                });
            }
            for r in futures::future::join_all(futs).await {
                r?;
            }
            Ok::<_, blockgraph::Error>(())
        })
    };
    let a = spawn(&env.io, 0);
    let b = spawn(&env.io2, 1);
    a.join().unwrap();
    b.join().unwrap();
    let all = env.read_all(&node).unwrap();
    for s in 0..sectors {
        let want = (s % 251) as u8;
        let got = &all[(s * 512) as usize..((s + 1) * 512) as usize];
        assert!(got.iter().all(|&x| x == want), "sector {s} lost a write");
    }
    env.flush(&node).unwrap();
    let report = env.check(&node, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        report.allocated_clusters,
        size / cs,
        "each cluster allocated once"
    );
    let _ = file;
}

#[test]
fn concurrent_rewrites_discards_and_reads_stay_consistent() {
    let env = Env::new();
    let cs = 4096u64;
    let size = 1u64 << 20;
    let (_file, node) = new_image(&env, CreateOptions::new(size).cluster_size(cs));
    // Thread A keeps rewriting clusters 0..128 with their own index; thread
    // B discards and zeroes clusters 128..256 and writes them again. Reads
    // of A's range must only ever see A's pattern.
    let a = {
        let node = node.clone();
        env.io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            for round in 0..6u64 {
                for c in 0..128u64 {
                    n.write(c * cs, &vec![c as u8; cs as usize]).await?;
                    if round > 0 && c % 7 == 0 {
                        let mut buf = vec![0u8; cs as usize];
                        n.read(c * cs, &mut buf).await?;
                        assert!(buf.iter().all(|&x| x == c as u8), "cluster {c} torn");
                    }
                }
            }
            Ok::<_, blockgraph::Error>(())
        })
    };
    let b = {
        let node = node.clone();
        env.io2.spawn(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            for round in 0..6u64 {
                for c in 128..256u64 {
                    match (c + round) % 3 {
                        0 => n.discard(c * cs, cs).await?,
                        1 => n.write_zeroes(c * cs, cs).await?,
                        _ => n.write(c * cs, &vec![0xee; cs as usize]).await?,
                    }
                }
                n.flush().await?;
            }
            Ok::<_, blockgraph::Error>(())
        })
    };
    a.join().unwrap();
    b.join().unwrap();
    let all = env.read_all(&node).unwrap();
    for c in 0..128u64 {
        assert!(all[(c * cs) as usize..((c + 1) * cs) as usize]
            .iter()
            .all(|&x| x == c as u8));
    }
    env.flush(&node).unwrap();
    let report = env.check(&node, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn allocation_grows_past_the_first_refcount_block_and_table() {
    let env = Env::new();
    // 512-byte clusters: one refcount block covers 256 clusters (128 KiB)
    // and the one-cluster refcount table 64 blocks (8 MiB), so 10 MiB of
    // data needs dozens of new blocks and a bigger, moved table.
    let cs = 512u64;
    let size = 12u64 << 20;
    let (file, node) = new_image(&env, CreateOptions::new(size).cluster_size(cs));
    let mut rng = Rng::new(3);
    let data = rng.bytes(10 << 20);
    for (i, chunk) in data.chunks(256 << 10).enumerate() {
        env.write(&node, (i as u64) * (256 << 10), chunk.to_vec())
            .unwrap();
    }
    assert!(env.read(&node, 0, data.len()).unwrap() == data);
    env.flush(&node).unwrap();
    let report = env.check(&node, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.image_end_offset > 10 << 20);
    env.remove(&node).unwrap();
    let bytes = env.contents(&file);
    let table = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
    assert_ne!(table, 512, "the refcount table moved");
    let again = env.open_bytes(bytes, Qcow2Options::read_only()).unwrap();
    assert!(env.read(&again, 0, data.len()).unwrap() == data);
}

#[test]
fn every_intermediate_state_is_consistent() {
    intermediate_states_are_consistent(Qcow2Options::default(), 11);
}

#[test]
fn every_intermediate_state_is_consistent_with_tiny_caches() {
    // Two L2 tables and two refcount blocks cached: dirty tables are
    // evicted (and so written) in the middle of requests.
    let mut opts = Qcow2Options::default();
    opts.l2_cache_bytes = 0;
    opts.refcount_cache_bytes = 0;
    intermediate_states_are_consistent(opts, 12);
}

fn intermediate_states_are_consistent(opts: Qcow2Options, seed: u64) {
    // The memory driver applies each write at once, so the file after each
    // request is a state a crash could leave. Each must open and check
    // without errors (leaks are allowed), and after each flush it must hold
    // exactly the guest data.
    let env = Env::new();
    let cs = 512u64;
    let size = 256u64 << 10;
    let file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(&file, CreateOptions::new(size).cluster_size(cs))
        .unwrap();
    let node = env.open(&file, None, opts).unwrap();
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; size as usize];
    let check_state = |flushed: Option<&Vec<u8>>| {
        let bytes = env.contents(&file);
        let copy = env.open_bytes(bytes, Qcow2Options::read_only()).unwrap();
        let r = env.check(&copy, false).unwrap();
        assert_eq!(r.corruptions, 0, "{r:?}");
        if let Some(model) = flushed {
            assert!(&env.read_all(&copy).unwrap() == model);
            assert_eq!(r.leaks, 0, "a flushed image has no leaks: {r:?}");
        }
        env.remove(&copy).unwrap();
    };
    for step in 0..120 {
        let off = rng.below(size / 512) * 512;
        let len = ((rng.below(8) + 1) * 512).min(size - off);
        match rng.below(6) {
            0 => {
                env.discard(&node, off, len).unwrap();
                let first = off.div_ceil(cs) * cs;
                let last = ((off + len) / cs * cs).max(first);
                model[first as usize..last as usize].fill(0);
            }
            1 => {
                env.write_zeroes(&node, off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let d = rng.bytes(len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                env.write(&node, off, d).unwrap();
            }
        }
        if step % 10 == 9 {
            env.flush(&node).unwrap();
            check_state(Some(&model));
        } else if step % 3 == 0 {
            check_state(None);
        }
    }
}

#[test]
fn check_finds_an_injected_leak_and_repairs_it() {
    let env = Env::new();
    let cs = 4096u64;
    let (file, node) = new_image(&env, CreateOptions::new(1 << 20).cluster_size(cs));
    env.write(&node, 0, vec![1; 8192]).unwrap();
    env.flush(&node).unwrap();
    assert!(env.check(&node, false).unwrap().is_clean());
    env.remove(&node).unwrap();

    // Our layout: header, refcount table, refcount block, L1 (clusters
    // 0-3), then the L2 table and data. Give cluster 40 (unused) a
    // refcount of 1 in the refcount block at cluster 2.
    let mut bytes = env.contents(&file);
    let block = u64::from_be_bytes(bytes[cs as usize..cs as usize + 8].try_into().unwrap());
    assert_eq!(block, 2 * cs);
    let at = (block + 40 * 2) as usize;
    bytes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    let leaky_file = env.mem_node(bytes, MEM_CAPACITY);
    let leaky = env
        .open(&leaky_file, None, Qcow2Options::default())
        .unwrap();
    let r = env.check(&leaky, false).unwrap();
    assert_eq!((r.leaks, r.corruptions), (1, 0), "{r:?}");
    assert!(r.messages[0].contains("cluster 40"), "{:?}", r.messages);
    let r = env.check(&leaky, true).unwrap();
    assert_eq!(r.repaired_leaks, 1);
    assert!(env.check(&leaky, false).unwrap().is_clean());
    assert_eq!(env.read(&leaky, 0, 8192).unwrap(), vec![1; 8192]);
}

#[test]
fn check_finds_a_refcount_that_is_too_low() {
    let env = Env::new();
    let cs = 4096u64;
    let (file, node) = new_image(&env, CreateOptions::new(1 << 20).cluster_size(cs));
    env.write(&node, 0, vec![1; 4096]).unwrap();
    env.flush(&node).unwrap();
    env.remove(&node).unwrap();
    let mut bytes = env.contents(&file);
    // Cluster 4 is the L2 table, cluster 5 the data: zero the data's
    // refcount.
    let at = (2 * cs + 5 * 2) as usize;
    assert_eq!(u16::from_be_bytes([bytes[at], bytes[at + 1]]), 1);
    bytes[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    let bad = env.open_bytes(bytes, Qcow2Options::read_only()).unwrap();
    let r = env.check(&bad, false).unwrap();
    assert!(r.corruptions >= 1, "{r:?}");
    assert!(!r.is_clean());
}

#[test]
fn dirty_image_is_repaired_on_writable_open() {
    let env = Env::new();
    let cs = 4096u64;
    let (file, node) = new_image(&env, CreateOptions::new(1 << 20).cluster_size(cs));
    env.write(&node, 0, vec![3; 4096]).unwrap();
    env.flush(&node).unwrap();
    env.remove(&node).unwrap();
    let mut bytes = env.contents(&file);
    // Dirty bit plus a leaked cluster, as lazy refcounts could leave.
    bytes[79] |= 1;
    let at = (2 * cs + 50 * 2) as usize;
    bytes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    let f2 = env.mem_node(bytes, MEM_CAPACITY);
    let n2 = env.open(&f2, None, Qcow2Options::default()).unwrap();
    assert!(env.check(&n2, false).unwrap().is_clean());
    assert_eq!(env.contents(&f2)[79] & 1, 0, "dirty bit cleared");
    assert_eq!(env.read(&n2, 0, 4096).unwrap(), vec![3; 4096]);
}

/// Writes the cluster at `offset` of `node` compressed.
fn write_compressed(env: &Env, node: &NodeHandle, offset: u64, data: Vec<u8>) {
    let node = node.clone();
    env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        let n = node.io(&g);
        n.driver_as::<blockgraph::drivers::qcow2::Qcow2Driver>()
            .unwrap()
            .write_compressed(n, offset, &data)
            .await
    })
    .unwrap();
}

#[test]
fn compressed_clusters_round_trip_and_are_rewritten_by_copy_on_write() {
    let env = Env::new();
    let cs = 4096u64;
    let size = 64 * cs;
    let (file, node) = new_image(&env, CreateOptions::new(size).cluster_size(cs));
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(21);
    for c in 0..32u64 {
        let data: Vec<u8> = if c % 4 == 3 {
            rng.bytes(cs as usize) // incompressible: stored as is
        } else {
            (0..cs).map(|i| ((i / 32 + c) % 7) as u8).collect()
        };
        model[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&data);
        write_compressed(&env, &node, c * cs, data);
    }
    assert!(env.read_all(&node).unwrap() == model);
    // Partial rewrites of compressed clusters: the rest is inflated into
    // a fresh cluster.
    env.write(&node, 5 * cs + 2048, vec![0xee; 512]).unwrap();
    let at = (5 * cs + 2048) as usize;
    model[at..at + 512].fill(0xee);
    env.write_zeroes(&node, 6 * cs, cs).unwrap();
    model[(6 * cs) as usize..(7 * cs) as usize].fill(0);
    // Compressed over compressed.
    write_compressed(&env, &node, 0, vec![9; cs as usize]);
    model[..cs as usize].fill(9);
    assert!(env.read_all(&node).unwrap() == model);
    env.flush(&node).unwrap();
    let report = env.check(&node, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The compressible clusters really are stored compressed.
    env.remove(&node).unwrap();
    let bytes = env.contents(&file);
    let l2 = 4 * cs as usize; // first allocation after the metadata
    let entry = u64::from_be_bytes(bytes[l2 + 8..l2 + 16].try_into().unwrap());
    assert_ne!(entry & (1 << 62), 0, "cluster 1 is stored compressed");
    let again = env.open_bytes(bytes, Qcow2Options::read_only()).unwrap();
    assert!(env.read_all(&again).unwrap() == model);
    // Misaligned compressed writes are refused.
    let (_f, n2) = new_image(&env, CreateOptions::new(size).cluster_size(cs));
    let n = n2.clone();
    let r = env.on_io(move |mut cx| async move {
        let g = cx.read().await;
        let io = n.io(&g);
        io.driver_as::<blockgraph::drivers::qcow2::Qcow2Driver>()
            .unwrap()
            .write_compressed(io, 512, &[1; 4096])
            .await
    });
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
}

#[test]
fn metadata_waits_for_flush_and_says_so() {
    let env = Env::new();
    let cs = 4096u64;
    let (file, node) = new_image(&env, CreateOptions::new(1 << 20).cluster_size(cs));
    let pending = |node: &NodeHandle| {
        let n = node.clone();
        env.on_io(move |mut cx| async move {
            let g = cx.read().await;
            let io = n.io(&g);
            io.driver_as::<blockgraph::drivers::qcow2::Qcow2Driver>()
                .unwrap()
                .has_unflushed_metadata()
                .await
        })
    };
    assert!(!pending(&node));
    env.write(&node, 0, vec![7; 4096]).unwrap();
    assert!(
        pending(&node),
        "a new cluster's mapping is cached, not yet written"
    );
    // Before the flush the file does not map the cluster yet...
    let before = env
        .open_bytes(env.contents(&file), Qcow2Options::read_only())
        .unwrap();
    assert_eq!(env.read(&before, 0, 4096).unwrap(), vec![0; 4096]);
    // ...after it, it does.
    env.flush(&node).unwrap();
    assert!(!pending(&node));
    let after = env
        .open_bytes(env.contents(&file), Qcow2Options::read_only())
        .unwrap();
    assert_eq!(env.read(&after, 0, 4096).unwrap(), vec![7; 4096]);
    // Rewriting an allocated cluster needs no metadata.
    env.write(&node, 0, vec![8; 4096]).unwrap();
    assert!(!pending(&node));
}

/// The deepest chain the graph's depth rule allows (`MAX_GRAPH_DEPTH`:
/// qcow2 images over a memory base), which is also the heaviest per layer
/// of the built-in drivers: a read of a cluster only the base stores goes
/// through every image, on an I/O thread, and so does a write (its
/// copy-on-write reads the base), in debug builds too. One image more is
/// refused.
#[test]
fn a_backing_chain_as_deep_as_the_graph_allows_reads_through() {
    let _wd = common::watchdog("deepest_backing_chain", std::time::Duration::from_secs(300));
    let env = Env::new();
    let mut below = env.mem_node(vec![7u8; 1 << 20], 1 << 20);
    let create = |env: &Env| {
        let file = env.mem_node(Vec::new(), 1 << 20);
        env.create(&file, CreateOptions::new(1 << 20)).unwrap();
        file
    };
    let opts = || {
        let mut o = Qcow2Options::default();
        o.require_backing = false;
        o
    };
    for _ in 1..blockgraph::MAX_GRAPH_DEPTH {
        let file = create(&env);
        below = env.open(&file, Some(&below), opts()).unwrap();
    }
    assert!(env.read(&below, 0, 4096).unwrap().iter().all(|&b| b == 7));
    env.write(&below, 512, vec![1; 512]).unwrap();
    let r = env.read(&below, 0, 4096).unwrap();
    assert!(r[..512].iter().all(|&b| b == 7) && r[512..1024].iter().all(|&b| b == 1));
    let file = create(&env);
    match env.open(&file, Some(&below), opts()) {
        Err(Error::GraphTooDeep { depth, .. }) => {
            assert_eq!(depth, blockgraph::MAX_GRAPH_DEPTH + 1)
        }
        other => panic!("expected GraphTooDeep, got {other:?}"),
    }
}
