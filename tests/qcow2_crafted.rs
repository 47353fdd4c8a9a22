//! Hostile qcow2 images: every malformed header field, table and backing
//! chain gets a clear error, never a panic, an unbounded allocation or a
//! read outside the image.

mod qcow2_util;

use std::path::Path;

use blockgraph::drivers::qcow2::Qcow2Options;
use blockgraph::drivers::qcow2::{
    open_image_chain, BackingPolicy, ChainOptions, CreateOptions, Qcow2Limits,
};
use blockgraph::{Error, Result};
use qcow2_util::{Env, Rng, MEM_CAPACITY};

const CS: u64 = 4096;

/// A valid v3 image (4 KiB clusters, 1 MiB) with data in its first
/// clusters. Layout: 0 header, 1 refcount table, 2 refcount block, 3 L1,
/// 4 L2, 5.. data.
fn base_image(env: &Env, opts: CreateOptions) -> Vec<u8> {
    let file = env.mem_node(Vec::new(), MEM_CAPACITY);
    env.create(&file, opts).unwrap();
    let mut o = Qcow2Options::default();
    o.require_backing = false;
    let node = env.open(&file, None, o).unwrap();
    env.write(&node, 0, (0..3 * CS).map(|i| i as u8).collect())
        .unwrap();
    env.flush(&node).unwrap();
    let end = env.check(&node, false).unwrap().image_end_offset;
    env.remove(&node).unwrap();
    let mut bytes = env.contents(&file);
    bytes.truncate(end as usize);
    bytes
}

fn v3() -> CreateOptions {
    CreateOptions::new(1 << 20).cluster_size(CS)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn open_err(env: &Env, bytes: Vec<u8>, opts: Qcow2Options) -> Error {
    match env.open_bytes(bytes, opts) {
        Ok(_) => panic!("a hostile image was accepted"),
        Err(e) => e,
    }
}

fn assert_invalid(e: Error, needle: &str) {
    match &e {
        Error::InvalidImage { reason, .. } if reason.contains(needle) => {}
        _ => panic!("expected an invalid-image error mentioning {needle:?}, got: {e}"),
    }
}

fn assert_unsupported(e: Error, needle: &str) {
    match &e {
        Error::UnsupportedImage { feature, .. } if feature.contains(needle) => {}
        _ => panic!("expected an unsupported-feature error mentioning {needle:?}, got: {e}"),
    }
}

#[test]
fn bad_magic_version_and_truncated_files() {
    let env = Env::new();
    let good = base_image(&env, v3());
    let mut b = good.clone();
    b[0] = b'X';
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "magic");
    for v in [0u32, 1, 4, u32::MAX] {
        let mut b = good.clone();
        put32(&mut b, 4, v);
        assert_unsupported(open_err(&env, b, Qcow2Options::default()), "version");
    }
    assert_invalid(
        open_err(&env, good[..50].to_vec(), Qcow2Options::default()),
        "too short",
    );
    assert_invalid(
        open_err(&env, Vec::new(), Qcow2Options::default()),
        "too short",
    );
    // Header fits but the tables are cut off.
    assert_invalid(
        open_err(&env, good[..4096].to_vec(), Qcow2Options::default()),
        "outside",
    );
}

#[test]
fn cluster_bits_out_of_range() {
    let env = Env::new();
    let good = base_image(&env, v3());
    for bits in [0u32, 8, 22, 63, 64, u32::MAX] {
        let mut b = good.clone();
        put32(&mut b, 20, bits);
        assert_invalid(open_err(&env, b, Qcow2Options::default()), "cluster_bits");
    }
}

#[test]
fn l1_table_outside_the_file_unaligned_or_huge() {
    let env = Env::new();
    let good = base_image(&env, v3());
    let mut b = good.clone();
    put64(&mut b, 40, 1 << 40);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "L1 table");
    let mut b = good.clone();
    put64(&mut b, 40, 3 * CS + 8);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "not aligned");
    let mut b = good.clone();
    put64(&mut b, 40, 0);
    assert_invalid(
        open_err(&env, b, Qcow2Options::default()),
        "overlaps the header",
    );
    let mut b = good.clone();
    put32(&mut b, 36, u32::MAX);
    assert_invalid(
        open_err(&env, b, Qcow2Options::default()),
        "exceeds the limit",
    );
    // Within the default limit but not within the file.
    let mut b = good.clone();
    put32(&mut b, 36, 1 << 20);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "outside");
    // Too small for the virtual size.
    let mut b = good.clone();
    put64(&mut b, 24, 1 << 40);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "needs");
    // An embedder limit below the image's L1 size.
    let mut opts = Qcow2Options::default();
    let mut limits = Qcow2Limits::default();
    limits.max_l1_bytes = 0;
    opts.limits = limits;
    assert_invalid(open_err(&env, good.clone(), opts), "exceeds the limit");
    // Absurd virtual size.
    let mut b = good;
    put64(&mut b, 24, u64::MAX);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "virtual size");
}

#[test]
fn refcount_table_outside_the_file_or_huge() {
    let env = Env::new();
    let good = base_image(&env, v3());
    let mut b = good.clone();
    put64(&mut b, 48, 1 << 50);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "refcount table");
    let mut b = good.clone();
    put64(&mut b, 48, CS + 512);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "not aligned");
    let mut b = good.clone();
    put32(&mut b, 56, u32::MAX);
    assert_invalid(
        open_err(&env, b, Qcow2Options::default()),
        "exceeds the limit",
    );
    let mut b = good.clone();
    put32(&mut b, 56, 0);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "no clusters");
    let mut b = good;
    put32(&mut b, 56, 100);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "outside");
}

#[test]
fn absurd_backing_file_names() {
    let env = Env::new();
    let good = base_image(&env, v3().backing("base.qcow2", "qcow2"));
    let mut b = good.clone();
    put32(&mut b, 16, u32::MAX);
    assert_invalid(
        open_err(&env, b, Qcow2Options::default()),
        "backing file name length",
    );
    let mut b = good.clone();
    put32(&mut b, 16, 1023);
    put64(&mut b, 8, CS - 10);
    assert_invalid(
        open_err(&env, b, Qcow2Options::default()),
        "outside the first cluster",
    );
    let mut b = good.clone();
    put64(&mut b, 8, 16);
    assert_invalid(
        open_err(&env, b, Qcow2Options::default()),
        "inside the header",
    );
    let mut b = good.clone();
    let off = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
    b[off] = 0xff;
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "UTF-8");
    let mut b = good;
    put32(&mut b, 16, 0);
    assert_invalid(open_err(&env, b, Qcow2Options::default()), "empty");
}

#[test]
fn unsupported_features_are_refused_not_misread() {
    let env = Env::new();
    let good = base_image(&env, v3());
    for (method, name) in [(1u32, "AES"), (2, "LUKS"), (9, "encryption method 9")] {
        let mut b = good.clone();
        put32(&mut b, 32, method);
        assert_unsupported(open_err(&env, b, Qcow2Options::read_only()), name);
    }
    for (bit, name) in [
        (2u32, "external data file"),
        (4, "extended L2"),
        (5, "unknown incompatible features: bit 5"),
        (63, "bit 63"),
    ] {
        let mut b = good.clone();
        let inc = u64::from_be_bytes(b[72..80].try_into().unwrap()) | (1 << bit);
        put64(&mut b, 72, inc);
        assert_unsupported(open_err(&env, b, Qcow2Options::read_only()), name);
    }
    // Compression type bit with zstd in the (extended) header.
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 3);
    assert_unsupported(open_err(&env, b, Qcow2Options::read_only()), "compression");

    // Unknown bit named by the image's feature name table.
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 7);
    let ext = 104;
    put32(&mut b, ext, 0x6803_f857);
    put32(&mut b, ext + 4, 48);
    b[ext + 8..ext + 56].fill(0);
    b[ext + 8] = 0;
    b[ext + 9] = 7;
    b[ext + 10..ext + 10 + 12].copy_from_slice(b"time travel\0");
    put64(&mut b, ext + 56, 0);
    assert_unsupported(open_err(&env, b, Qcow2Options::read_only()), "time travel");

    // Bad refcount order.
    let mut b = good;
    put32(&mut b, 96, 7);
    assert_invalid(
        open_err(&env, b, Qcow2Options::read_only()),
        "refcount_order",
    );
}

/// Where the end-of-extensions marker of a `base_image` lies.
fn end_marker(b: &[u8]) -> usize {
    let mut pos = 104;
    loop {
        let ty = u32::from_be_bytes(b[pos..pos + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if ty == 0 {
            return pos;
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
}

/// Header edges (issue 9): QEMU's behaviour as the reference, the spec as
/// the tie-breaker; each a clear error or a correct reading, never a panic.
#[test]
fn header_edges_are_read_as_qemu_reads_them_or_refused() {
    let env = Env::new();
    let good = base_image(&env, v3());

    // header_length not a multiple of 8: the spec forbids it; QEMU reads
    // the extensions from the unaligned offset (misreading them: at 105
    // it silently drops every extension, at 108 it fails). Refused.
    for len in [105u32, 108, 111] {
        let mut b = good.clone();
        put32(&mut b, 100, len);
        assert_invalid(
            open_err(&env, b, Qcow2Options::read_only()),
            "header_length",
        );
    }

    // End marker with a length past the extension area: QEMU refuses
    // ("Header extension too large"); so do we. A length that fits is
    // harmless (QEMU accepts it too).
    let end = end_marker(&good);
    let mut b = good.clone();
    put32(&mut b, end + 4, 0xffff_ff00);
    assert_invalid(open_err(&env, b, Qcow2Options::read_only()), "too large");
    let mut b = good.clone();
    put32(&mut b, end + 4, 16);
    let node = env.open_bytes(b, Qcow2Options::read_only()).unwrap();
    assert_eq!(env.read(&node, 0, 4).unwrap(), vec![0, 1, 2, 3]);

    // A compression type byte without the feature bit (header long
    // enough to hold it): the spec says it must be zero; QEMU refuses.
    let mut b = good.clone();
    put32(&mut b, 100, 112);
    // The extensions move up by 8 bytes to start after the longer header.
    let ext: Vec<u8> = b[104..end + 8].to_vec();
    b[112..112 + ext.len()].copy_from_slice(&ext);
    b[104..112].fill(0);
    let zlib = b.clone();
    b[104] = 1;
    assert_invalid(
        open_err(&env, b, Qcow2Options::read_only()),
        "compression type 1",
    );
    // The same header with a zero byte (zlib) reads fine.
    let node = env.open_bytes(zlib, Qcow2Options::read_only()).unwrap();
    assert_eq!(env.read(&node, 0, 4).unwrap(), vec![0, 1, 2, 3]);

    // A crypto header extension in an unencrypted image: the spec allows it
    // only with LUKS; QEMU refuses.
    let mut b = good;
    put32(&mut b, end, 0x0537_be77);
    put32(&mut b, end + 4, 16);
    put64(&mut b, end + 8, 5 * CS);
    put64(&mut b, end + 16, 512);
    put64(&mut b, end + 24, 0);
    assert_invalid(open_err(&env, b, Qcow2Options::read_only()), "crypto");
}

/// `good` with a bitmaps extension (`ext`: its 24 bytes) in place of the
/// end marker, auto-clear bit 0 set, and `dir` as the directory in
/// cluster 5.
fn with_bitmaps(good: &[u8], ext: [u64; 3], dir: &[u8]) -> Vec<u8> {
    let mut b = good.to_vec();
    let end = end_marker(&b);
    put32(&mut b, end, 0x2385_2875);
    put32(&mut b, end + 4, 24);
    put32(&mut b, end + 8, ext[0] as u32);
    put32(&mut b, end + 12, (ext[0] >> 32) as u32);
    put64(&mut b, end + 16, ext[1]);
    put64(&mut b, end + 24, ext[2]);
    put64(&mut b, end + 32, 0);
    put64(&mut b, 88, 1);
    let at = 5 * CS as usize;
    b[at..at + dir.len()].copy_from_slice(dir);
    b
}

/// One bitmap directory entry: table at cluster 6, one table entry.
fn bitmap_entry(name: &str, granularity_bits: u8, flags: u32, extra: u32) -> Vec<u8> {
    let mut e = vec![0u8; 24];
    put64(&mut e, 0, 6 * CS);
    put32(&mut e, 8, 1);
    put32(&mut e, 12, flags);
    e[16] = 1;
    e[17] = granularity_bits;
    e[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
    put32(&mut e, 20, extra);
    e.extend(std::iter::repeat_n(0u8, extra as usize));
    e.extend_from_slice(name.as_bytes());
    while e.len() % 8 != 0 {
        e.push(0);
    }
    e
}

#[test]
fn hostile_bitmaps_extensions_get_clear_errors() {
    let env = Env::new();
    let good = base_image(&env, v3());
    let entry = bitmap_entry("b0", 16, 2, 0);
    let n = entry.len() as u64;
    let dir_off = 5 * CS;

    // A valid one is listed. Its table (cluster 6) must be valid too: the
    // bitmaps' bits are loaded at open (DESIGN §15). One zero entry: a
    // clean bitmap.
    let mut b = with_bitmaps(&good, [1, n, dir_off], &entry);
    put64(&mut b, 6 * CS as usize, 0);
    let garbage_table = with_bitmaps(&good, [1, n, dir_off], &entry);
    let node = env.open_bytes(b, Qcow2Options::read_only()).unwrap();
    let node2 = node.clone();
    let list = env.main.run(move |bql| {
        node2
            .gs(bql)
            .driver_as::<blockgraph::drivers::qcow2::Qcow2Driver>()
            .unwrap()
            .bitmaps()
    });
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].granularity), ("b0", 65536));
    assert!(list[0].auto && !list[0].in_use);

    // Malformed extensions and directories.
    let cases: Vec<([u64; 3], Vec<u8>, &str)> = vec![
        ([0, n, dir_off], entry.clone(), "0 bitmaps"),
        ([1 | (7 << 32), n, dir_off], entry.clone(), "reserved"),
        ([1, n, 1 << 40], entry.clone(), "bitmap directory"),
        ([1, n, dir_off + 512], entry.clone(), "bitmap directory"),
        ([1, 1 << 40, dir_off], entry.clone(), "directory of"),
        ([2, n, dir_off], entry.clone(), "fewer bitmaps"),
        (
            [1, n - 8, dir_off],
            entry.clone(),
            "broken bitmap directory",
        ),
        ([1, n, dir_off], bitmap_entry("b0", 40, 2, 0), "constraints"),
        (
            [1, n, dir_off],
            bitmap_entry("b0", 16, 1 << 5, 0),
            "constraints",
        ),
    ];
    for (ext, dir, needle) in cases {
        let b = with_bitmaps(&good, ext, &dir);
        assert_invalid(open_err(&env, b, Qcow2Options::read_only()), needle);
    }
    // The table there holds guest data: its entry has reserved bits set.
    assert_invalid(
        open_err(&env, garbage_table, Qcow2Options::read_only()),
        "table entry 0",
    );
    let extra = bitmap_entry("b0", 16, 2, 8);
    let b = with_bitmaps(&good, [1, extra.len() as u64, dir_off], &extra);
    assert_unsupported(open_err(&env, b, Qcow2Options::read_only()), "extra data");

    // Without auto-clear bit 0 the extension is stale: ignored, whatever
    // it says (its length is still checked, as QEMU does).
    let mut b = with_bitmaps(&good, [0, 0, 1 << 40], &entry);
    put64(&mut b, 88, 0);
    env.open_bytes(b, Qcow2Options::read_only()).unwrap();
    let mut b = with_bitmaps(&good, [1, n, dir_off], &entry);
    put64(&mut b, 88, 0);
    let end = end_marker(&good);
    put32(&mut b, end + 4, 16);
    assert_invalid(
        open_err(&env, b, Qcow2Options::read_only()),
        "bitmaps extension",
    );
}

#[test]
fn corrupt_bit_and_snapshots_allow_reading_only() {
    let env = Env::new();
    let good = base_image(&env, v3());
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 1);
    assert_invalid(
        open_err(&env, b.clone(), Qcow2Options::default()),
        "corrupt",
    );
    let ro = env.open_bytes(b, Qcow2Options::read_only()).unwrap();
    assert_eq!(env.read(&ro, 5, 1).unwrap(), vec![5]);

    // One snapshot: the image opens writable too (writes copy what the
    // snapshot shares; only snapshot operations read its table), and the
    // active layer reads fine.
    let mut b = good.clone();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 4 * CS);
    assert!(env.open_bytes(b.clone(), Qcow2Options::default()).is_ok());
    let ro = env.open_bytes(b, Qcow2Options::read_only()).unwrap();
    assert_eq!(
        env.read(&ro, 0, 3 * CS as usize).unwrap(),
        (0..3 * CS).map(|i| i as u8).collect::<Vec<_>>()
    );
    // The check reads the snapshot table (here the L2 table's bytes, an
    // entry with an absurd L1 size): a clear error, no panic.
    assert_invalid(env.check(&ro, false).unwrap_err(), "snapshot");
    // Snapshot table outside the file.
    let mut b = good.clone();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 1 << 40);
    assert_invalid(
        open_err(&env, b, Qcow2Options::read_only()),
        "snapshot table",
    );
    let mut b = good;
    put32(&mut b, 60, u32::MAX);
    assert_invalid(open_err(&env, b, Qcow2Options::read_only()), "snapshots");
}

#[test]
fn bad_table_entries_fail_the_request_not_the_process() {
    let env = Env::new();
    let good = base_image(&env, v3());
    let l1 = 3 * CS as usize;
    let l2 = 4 * CS as usize;
    // (what the error says, where to write, the bad entry)
    let cases: [(&str, usize, u64); 7] = [
        ("L2 table at", l1, (1 << 63) | (1 << 40)),
        ("reserved bits", l1, (1 << 63) | (4 * CS) | 0x100),
        ("not cluster aligned", l1, (1 << 63) | (4 * CS + 512)),
        ("not cluster aligned", l2, (1 << 63) | (5 * CS + 512)),
        ("reserved bits", l2, (1 << 63) | (5 * CS) | 0x2),
        // Compressed entry pointing far outside the file.
        ("outside", l2, (1 << 62) | (1 << 50)),
        // Compressed entry over data that is no deflate stream.
        ("compressed cluster", l2, (1 << 62) | (5 * CS)),
    ];
    for (needle, at, entry) in cases {
        let mut b = good.clone();
        put64(&mut b, at, entry);
        let node = env.open_bytes(b, Qcow2Options::default()).unwrap();
        match env.read(&node, 0, 4096) {
            Err(Error::InvalidImage { reason, .. }) if reason.contains(needle) => {}
            other => panic!("expected an error mentioning {needle:?}, got {other:?}"),
        }
        // Writes to the same place fail cleanly too.
        assert!(env.write(&node, 0, vec![1; 4096]).is_err());
        // The check reports rather than panics.
        let _ = env.check(&node, false);
    }
    // A data cluster past the end of the file reads as zeroes (like a
    // sparse file), never from outside the image.
    let mut b = good.clone();
    put64(&mut b, l2, (1 << 63) | (1000 * CS));
    let node = env.open_bytes(b, Qcow2Options::read_only()).unwrap();
    assert_eq!(env.read(&node, 0, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn refcount_structures_pointing_outside_fail_writes_cleanly() {
    let env = Env::new();
    let good = base_image(&env, v3());
    // Refcount table entry 0 points outside the file: allocation fails.
    let mut b = good.clone();
    put64(&mut b, CS as usize, 1 << 40);
    let node = env.open_bytes(b, Qcow2Options::default()).unwrap();
    assert_eq!(env.read(&node, 0, 4).unwrap(), vec![0, 1, 2, 3]);
    match env.write(&node, 512 << 10, vec![1; 4096]) {
        Err(Error::InvalidImage { reason, .. }) => assert!(reason.contains("refcount block")),
        other => panic!("expected an invalid-image error, got {other:?}"),
    }
    // Refcount block 0 missing entirely.
    let mut b = good;
    put64(&mut b, CS as usize, 0);
    let node = env.open_bytes(b, Qcow2Options::default()).unwrap();
    assert!(matches!(
        env.write(&node, 512 << 10, vec![1; 4096]),
        Err(Error::InvalidImage { .. })
    ));
}

#[test]
fn random_corruption_never_panics() {
    let env = Env::new();
    let good = base_image(&env, v3().backing("b", "raw"));
    let mut rng = Rng::new(42);
    let mut accepted = 0;
    for round in 0..300 {
        let mut b = good.clone();
        // Flip bytes in the header, the tables or anywhere.
        for _ in 0..1 + rng.below(4) {
            let region = match rng.below(4) {
                0 => 0..256u64,
                1 => CS..5 * CS,
                2 => 3 * CS..3 * CS + 16,
                _ => 0..b.len() as u64,
            };
            let at = (region.start + rng.below(region.end - region.start)) as usize;
            b[at] = if round % 2 == 0 {
                rng.next() as u8
            } else {
                b[at] ^ (1 << rng.below(8))
            };
        }
        let mut opts = Qcow2Options::default();
        opts.require_backing = false;
        let Ok(node) = env.open_bytes(b, opts) else {
            continue;
        };
        accepted += 1;
        let _ = env.read(&node, 0, 16 << 10);
        let _ = env.write(&node, 8192, vec![9; 8192]);
        let _ = env.write(&node, 700 << 10, vec![9; 512]);
        let _ = env.discard(&node, 0, 4096);
        let _ = env.flush(&node);
        let _ = env.check(&node, false);
        env.remove(&node).unwrap();
    }
    assert!(accepted > 0, "some corruptions hit unused bytes");
}

// ---- backing chains -----------------------------------------------------

/// Writes an image made by our driver to `path`.
fn write_image(env: &Env, path: &Path, opts: CreateOptions) {
    let file = env.mem_node(Vec::new(), 1 << 20);
    env.create(&file, opts).unwrap();
    let node = env
        .open(&file, None, {
            let mut o = Qcow2Options::default();
            o.require_backing = false;
            o
        })
        .unwrap();
    env.flush(&node).unwrap();
    let end = env.check(&node, false).unwrap().image_end_offset;
    env.remove(&node).unwrap();
    let mut bytes = env.contents(&file);
    env.remove(&file).unwrap();
    bytes.truncate(end as usize);
    std::fs::write(path, bytes).unwrap();
}

fn open_chain(env: &Env, path: &Path, policy: BackingPolicy) -> Result<usize> {
    let path = path.to_path_buf();
    let name = env.name("chain");
    env.on_io(move |mut cx| async move {
        let mut opts = ChainOptions::new(name);
        opts.writable = false;
        opts.policy = policy;
        open_image_chain(&mut cx, &path, opts)
            .await
            .map(|c| c.images.len())
    })
}

fn assert_refused(r: Result<usize>, needle: &str) {
    match r {
        Err(Error::BackingRefused { reason, .. }) if reason.contains(needle) => {}
        other => panic!("expected a refusal mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn backing_loop_is_detected() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    write_image(&env, &a, v3().backing("b.qcow2", "qcow2"));
    write_image(&env, &b, v3().backing("a.qcow2", "qcow2"));
    assert_refused(open_chain(&env, &a, BackingPolicy::default()), "loops");
    // Self-reference.
    let s = dir.path().join("self.qcow2");
    write_image(&env, &s, v3().backing("./self.qcow2", "qcow2"));
    assert_refused(open_chain(&env, &s, BackingPolicy::default()), "loops");
    // Nothing is left in the graph after a refusal: the names are free.
    let names = env.main.run(|bql| bql.graph().nodes().count());
    assert_eq!(names, 0, "failed opens clean up their nodes");
}

#[test]
fn backing_chain_depth_is_bounded() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..6 {
        let path = dir.path().join(format!("l{i}.qcow2"));
        let opts = if i == 5 {
            v3()
        } else {
            v3().backing(format!("l{}.qcow2", i + 1), "qcow2")
        };
        write_image(&env, &path, opts);
    }
    let top = dir.path().join("l0.qcow2");
    assert_eq!(open_chain(&env, &top, BackingPolicy::default()).unwrap(), 6);
    let mut p = BackingPolicy::default();
    p.max_depth = 3;
    assert_refused(open_chain(&env, &top, p), "deeper");
}

#[test]
fn absolute_and_escaping_backing_paths_are_refused_by_default() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("vm");
    std::fs::create_dir(&sub).unwrap();
    let base = dir.path().join("base.qcow2");
    write_image(&env, &base, v3());

    let abs = sub.join("abs.qcow2");
    write_image(&env, &abs, v3().backing(base.to_str().unwrap(), "qcow2"));
    assert_refused(open_chain(&env, &abs, BackingPolicy::default()), "absolute");
    let mut allow = BackingPolicy::default();
    allow.allow_absolute = true;
    assert_eq!(open_chain(&env, &abs, allow).unwrap(), 2);

    let up = sub.join("up.qcow2");
    write_image(&env, &up, v3().backing("../base.qcow2", "qcow2"));
    assert_refused(open_chain(&env, &up, BackingPolicy::default()), "..");
    let mut allow = BackingPolicy::default();
    allow.allow_escape = true;
    assert_eq!(open_chain(&env, &up, allow).unwrap(), 2);

    let etc = sub.join("etc.qcow2");
    write_image(&env, &etc, v3().backing("/etc/passwd", "raw"));
    assert_refused(open_chain(&env, &etc, BackingPolicy::default()), "absolute");

    // A symbolic link inside the directory that leads out of it.
    std::os::unix::fs::symlink(&base, sub.join("link.qcow2")).unwrap();
    let via = sub.join("via.qcow2");
    write_image(&env, &via, v3().backing("link.qcow2", "qcow2"));
    assert_refused(
        open_chain(&env, &via, BackingPolicy::default()),
        "symbolic link",
    );
}

#[test]
fn backing_without_a_format_is_not_probed_by_default() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("guest.raw"), vec![7u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    let mut opts = v3();
    opts.backing_file = Some("guest.raw".into());
    write_image(&env, &top, opts);
    assert_refused(open_chain(&env, &top, BackingPolicy::default()), "probing");
    let mut p = BackingPolicy::default();
    p.allow_probing = true;
    assert_eq!(open_chain(&env, &top, p).unwrap(), 2);
    // Probing recognises a qcow2 backing file by its magic.
    write_image(&env, &dir.path().join("q.qcow2"), v3());
    let top2 = dir.path().join("top2.qcow2");
    let mut opts = v3();
    opts.backing_file = Some("q.qcow2".into());
    write_image(&env, &top2, opts);
    let name = env.name("probe");
    let formats = env
        .on_io(move |mut cx| async move {
            let mut o = ChainOptions::new(name);
            o.writable = false;
            o.policy.allow_probing = true;
            let chain = open_image_chain(&mut cx, &top2, o).await?;
            Ok::<_, Error>(chain.images.iter().map(|i| i.format).collect::<Vec<_>>())
        })
        .unwrap();
    assert_eq!(formats, ["qcow2", "qcow2"]);
    // Missing backing file: a clean I/O error.
    let gone = dir.path().join("gone.qcow2");
    write_image(&env, &gone, v3().backing("nowhere.qcow2", "qcow2"));
    assert!(matches!(
        open_chain(&env, &gone, BackingPolicy::default()),
        Err(Error::Io(_))
    ));
    // Unknown backing format.
    let odd = dir.path().join("odd.qcow2");
    write_image(&env, &odd, v3().backing("guest.raw", "vmdk"));
    assert!(matches!(
        open_chain(&env, &odd, BackingPolicy::default()),
        Err(Error::UnsupportedImage { .. })
    ));
}
