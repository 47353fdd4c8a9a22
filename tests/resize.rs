//! Resizing goes through one operation that checks the resize permission
//! (issue 7, class 8): `BlockBackend::truncate` needs `Perm::RESIZE` in the
//! backend's permissions, a driver resizing its child needs it on the edge
//! (`NodeRef::truncate_child`), and qcow2 grows its L1 table (and refcount
//! table) so that QEMU's tools accept the result.

mod common;
mod qcow2_util;

use std::path::Path;
use std::time::Duration;

use blockgraph::drivers::qcow2::{open_image_chain, ChainOptions, CreateOptions};
use blockgraph::drivers::{
    qcow2::{Qcow2Driver, Qcow2Options},
    FileDriver, FileOptions, PassthroughFilter, RawDriver,
};
use blockgraph::{
    driver::{BlockDriver, IoFuture, ResizePermit},
    BackendOptions, BlockBackend, ChildRole, Error, NodeHandle, Perm, Permissions, RequestRef,
};
use common::watchdog;
use qcow2_util::{p, qemu_img, qemu_io, require_qemu, Env};

const BUDGET: Duration = Duration::from_secs(120);

fn add_backend(env: &Env, node: &NodeHandle, options: BackendOptions) -> BlockBackend {
    let node = node.clone();
    let name = env.name("blk");
    env.main
        .run(move |bql| bql.write(|w| w.add_backend(&name, &node, options)))
        .expect("add backend")
}

fn add_file(env: &Env, path: &Path, size: u64) -> NodeHandle {
    let file = FileDriver::create(path, size, FileOptions::default()).unwrap();
    let name = env.name("file");
    env.main
        .run(move |bql| bql.write(|w| w.add_node(&name, file, &[])))
        .unwrap()
}

fn add_node(
    env: &Env,
    driver: impl BlockDriver,
    children: &[(ChildRole, &NodeHandle)],
) -> Result<NodeHandle, Error> {
    let children: Vec<(ChildRole, NodeHandle)> =
        children.iter().map(|(r, n)| (*r, (*n).clone())).collect();
    let name = env.name("node");
    env.main.run(move |bql| {
        bql.write(|w| {
            let kids: Vec<(ChildRole, &NodeHandle)> =
                children.iter().map(|(r, n)| (*r, n)).collect();
            w.add_node(&name, driver, &kids)
        })
    })
}

fn truncate(env: &Env, blk: &BlockBackend, size: u64) -> Result<(), Error> {
    let blk = blk.clone();
    env.on_io(move |mut cx| async move { blk.truncate(&mut cx, size).await })
}

fn length(env: &Env, blk: &BlockBackend) -> u64 {
    let blk = blk.clone();
    env.on_io(move |mut cx| async move { blk.length(&mut cx).await })
        .unwrap()
}

fn write(env: &Env, blk: &BlockBackend, offset: u64, data: Vec<u8>) {
    let blk = blk.clone();
    env.on_io(move |mut cx| async move { blk.write(&mut cx, offset, &data).await })
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"))
}

fn read(env: &Env, blk: &BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    let blk = blk.clone();
    env.on_io(move |mut cx| async move {
        let mut buf = vec![0xEEu8; len];
        blk.read(&mut cx, offset, &mut buf).await.map(|_| buf)
    })
    .unwrap_or_else(|e| panic!("read at {offset}: {e}"))
}

fn flush(env: &Env, blk: &BlockBackend) {
    let blk = blk.clone();
    env.on_io(move |mut cx| async move { blk.flush(&mut cx).await })
        .unwrap()
}

fn remove_backend(env: &Env, blk: BlockBackend) {
    env.main
        .run(move |bql| bql.write(|w| w.remove_backend(&blk)))
        .unwrap();
}

/// `qemu-img compare` of a qcow2 image against a raw reference file.
fn compare_with_raw(img: &Path, reference: &Path) {
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(img), p(reference)]);
}

fn assert_denied(err: Error, user: &str) {
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::PermissionDenied { perm, .. } if *perm == Perm::RESIZE),
        "{msg}"
    );
    assert!(msg.contains(user), "names who asked: {msg}");
    assert!(
        msg.contains("\"resize\" permission") && msg.contains("Perm::RESIZE"),
        "names the missing permission: {msg}"
    );
}

/// A qcow2 image in a host file, opened writable under a backend.
fn qcow2_on_file(
    env: &Env,
    path: &Path,
    opts: CreateOptions,
    backend: BackendOptions,
) -> (NodeHandle, NodeHandle, BlockBackend) {
    let file = add_file(env, path, 0);
    env.create(&file, opts).unwrap();
    let qcow = env.open(&file, None, Qcow2Options::default()).unwrap();
    let blk = add_backend(env, &qcow, backend);
    (qcow, file, blk)
}

#[test]
fn a_backend_without_resize_is_refused_and_nothing_changes() {
    let _wd = watchdog("a_backend_without_resize_is_refused", BUDGET);
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();

    // Memory, the default exclusive writer (no RESIZE).
    let mem = env.mem_node(vec![0x5A; 8192], 8192);
    let blk = add_backend(&env, &mem, BackendOptions::default());
    assert_denied(truncate(&env, &blk, 16384).unwrap_err(), "backend 'blk");
    assert_denied(truncate(&env, &blk, 512).unwrap_err(), "backend 'blk");
    assert_eq!(length(&env, &blk), 8192);
    assert!(read(&env, &blk, 0, 8192).iter().all(|&b| b == 0x5A));

    // A host file under raw: the file on disk keeps its size and bytes.
    let path = dir.path().join("fixed.raw");
    let file = add_file(&env, &path, 65536);
    let raw = add_node(&env, RawDriver::new(), &[(ChildRole::File, &file)]).unwrap();
    let blk = add_backend(&env, &raw, BackendOptions::default());
    write(&env, &blk, 4096, vec![7; 4096]);
    let err = truncate(&env, &blk, 1 << 20).unwrap_err();
    assert_denied(err, "backend 'blk");
    assert_eq!(length(&env, &blk), 65536);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 65536);
    assert!(read(&env, &blk, 4096, 4096).iter().all(|&b| b == 7));

    // A reader that shares everything cannot resize either.
    let reader = add_backend(
        &env,
        &raw,
        BackendOptions::with_perms(Permissions::SHARED_READER),
    );
    assert_denied(truncate(&env, &reader, 0).unwrap_err(), "backend 'blk");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 65536);
}

#[test]
fn a_resizable_backend_grows_memory_file_raw_and_qcow2() {
    let _wd = watchdog("a_resizable_backend_grows", BUDGET);
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();

    let mem = env.mem_node(vec![0x11; 4096], 4096);
    let file_path = dir.path().join("plain.raw");
    let file = add_file(&env, &file_path, 4096);
    let raw_path = dir.path().join("under-raw.raw");
    let raw_file = add_file(&env, &raw_path, 4096);
    let raw = add_node(&env, RawDriver::new(), &[(ChildRole::File, &raw_file)]).unwrap();
    let filtered = env.mem_node(vec![0x11; 4096], 4096);
    let filter = add_node(
        &env,
        PassthroughFilter::new(),
        &[(ChildRole::Filtered, &filtered)],
    )
    .unwrap();
    let mut stacks: Vec<(&str, BlockBackend)> = vec![
        (
            "memory",
            add_backend(&env, &mem, BackendOptions::resizable()),
        ),
        (
            "file",
            add_backend(&env, &file, BackendOptions::resizable()),
        ),
        ("raw", add_backend(&env, &raw, BackendOptions::resizable())),
        (
            "filter",
            add_backend(&env, &filter, BackendOptions::resizable()),
        ),
    ];
    let q_path = dir.path().join("grow.qcow2");
    let (_q, _qf, qblk) = qcow2_on_file(
        &env,
        &q_path,
        CreateOptions::new(4096),
        BackendOptions::resizable(),
    );
    stacks.push(("qcow2", qblk));

    for (what, blk) in &stacks {
        write(&env, blk, 0, vec![0x11; 4096]);
        assert_eq!(length(&env, blk), 4096, "{what}");
        truncate(&env, blk, 1 << 20).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(length(&env, blk), 1 << 20, "{what}: new length seen");
        assert!(
            read(&env, blk, 4096, (1 << 20) - 4096)
                .iter()
                .all(|&b| b == 0),
            "{what}: the grown area reads as zeroes"
        );
        assert!(
            read(&env, blk, 0, 4096).iter().all(|&b| b == 0x11),
            "{what}: old data kept"
        );
        write(&env, blk, (1 << 20) - 512, vec![0x22; 512]);
        assert!(read(&env, blk, (1 << 20) - 512, 512)
            .iter()
            .all(|&b| b == 0x22));
        flush(&env, blk);
    }
    assert_eq!(std::fs::metadata(&file_path).unwrap().len(), 1 << 20);
    assert_eq!(std::fs::metadata(&raw_path).unwrap().len(), 1 << 20);
}

#[test]
fn resize_conflicts_with_a_user_that_does_not_share_it() {
    let _wd = watchdog("resize_conflicts", BUDGET);
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();

    // Backend against backend, both orders.
    let a = env.mem_node(vec![0; 4096], 4096);
    let _guest = add_backend(&env, &a, BackendOptions::default());
    let name = env.name("resizer");
    let a2 = a.clone();
    let err = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend(&name, &a2, BackendOptions::resizable())))
        .unwrap_err();
    assert!(
        matches!(&err, Error::PermissionConflict { .. }) && err.to_string().contains("resize"),
        "{err}"
    );
    let b = env.mem_node(vec![0; 4096], 4096);
    let _resizer = add_backend(&env, &b, BackendOptions::resizable());
    let name = env.name("reader");
    let b2 = b.clone();
    let fussy_reader = Permissions {
        take: Perm::CONSISTENT_READ,
        share: Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
    };
    let err = env
        .main
        .run(move |bql| {
            bql.write(|w| w.add_backend(&name, &b2, BackendOptions::with_perms(fussy_reader)))
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::PermissionConflict { .. }) && err.to_string().contains("resize"),
        "{err}"
    );

    // A user that shares it is fine, and the resize goes through.
    let c = env.mem_node(vec![0; 4096], 4096);
    let sharing_guest = Permissions {
        take: Perm::CONSISTENT_READ | Perm::WRITE,
        share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE,
    };
    let guest = add_backend(&env, &c, BackendOptions::with_perms(sharing_guest));
    let resizer = add_backend(
        &env,
        &c,
        BackendOptions::with_perms(Permissions {
            take: Perm::RESIZE,
            share: Perm::ALL,
        }),
    );
    truncate(&env, &resizer, 8192).unwrap();
    assert_eq!(length(&env, &guest), 8192, "the other backend sees it");

    // A writing qcow2 takes RESIZE on its file (it grows the file by
    // allocating), so a user of the file that does not share RESIZE
    // conflicts with it.
    let path = dir.path().join("img.qcow2");
    let file = add_file(&env, &path, 0);
    env.create(&file, CreateOptions::new(1 << 20)).unwrap();
    let _reader = add_backend(&env, &file, BackendOptions::with_perms(fussy_reader));
    let qcow = env.open(&file, None, Qcow2Options::default()).unwrap();
    let name = env.name("vda");
    let err = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend(&name, &qcow, BackendOptions::default())))
        .unwrap_err();
    assert!(
        matches!(&err, Error::PermissionConflict { .. }) && err.to_string().contains("resize"),
        "{err}"
    );
}

/// A filter that resizes its child through `truncate_child`, taking on
/// the child what its users take, minus RESIZE unless `pass_resize`.
struct ResizingFilter {
    pass_resize: bool,
    role: ChildRole,
}

impl BlockDriver for ResizingFilter {
    fn format_name(&self) -> &'static str {
        "resizing-filter"
    }
    fn child_permissions(&self, _role: ChildRole, users: Permissions) -> Permissions {
        let take = if self.pass_resize {
            users.take
        } else {
            users.take & !Perm::RESIZE
        };
        Permissions {
            take,
            share: users.share,
        }
    }
    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        blockgraph::driver::forward::length(node, ChildRole::Filtered)
    }
    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        blockgraph::driver::forward::to_child(node, ChildRole::Filtered, |c| c.read(offset, buf))
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        blockgraph::driver::forward::to_child(node, ChildRole::Filtered, |c| c.write(offset, buf))
    }
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        node.truncate_child(self.role, size)
    }
}

#[test]
fn truncate_child_needs_resize_on_the_edge() {
    let _wd = watchdog("truncate_child_needs_resize_on_the_edge", BUDGET);
    let env = Env::new();

    // The edge did not take RESIZE: refused, naming the parent and child.
    let child = env.mem_node(vec![3; 4096], 4096);
    let filter = add_node(
        &env,
        ResizingFilter {
            pass_resize: false,
            role: ChildRole::Filtered,
        },
        &[(ChildRole::Filtered, &child)],
    )
    .unwrap();
    let blk = add_backend(&env, &filter, BackendOptions::resizable());
    let err = truncate(&env, &blk, 8192).unwrap_err();
    assert_denied(err, &format!("node '{}' (filtered edge)", filter.name()));
    let err = truncate(&env, &blk, 8192).unwrap_err();
    assert!(err.to_string().contains(child.name()), "{err}");
    assert_eq!(length(&env, &blk), 4096);
    assert!(read(&env, &blk, 0, 4096).iter().all(|&b| b == 3));

    // With RESIZE on the edge it goes through.
    let child = env.mem_node(vec![3; 4096], 4096);
    let filter = add_node(
        &env,
        ResizingFilter {
            pass_resize: true,
            role: ChildRole::Filtered,
        },
        &[(ChildRole::Filtered, &child)],
    )
    .unwrap();
    let blk = add_backend(&env, &filter, BackendOptions::resizable());
    truncate(&env, &blk, 8192).unwrap();
    assert_eq!(length(&env, &blk), 8192);

    // No such child: a clear error.
    let child = env.mem_node(vec![3; 4096], 4096);
    let filter = add_node(
        &env,
        ResizingFilter {
            pass_resize: true,
            role: ChildRole::File,
        },
        &[(ChildRole::Filtered, &child)],
    )
    .unwrap();
    let blk = add_backend(&env, &filter, BackendOptions::resizable());
    let err = truncate(&env, &blk, 8192).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoSuchChild {
                role: ChildRole::File,
                ..
            }
        ),
        "{err}"
    );

    // raw with a fixed window refuses, and takes no RESIZE on its file.
    let file = env.mem_node(vec![0; 65536], 65536);
    let raw = add_node(
        &env,
        RawDriver::with_window(4096, Some(8192)).unwrap(),
        &[(ChildRole::File, &file)],
    )
    .unwrap();
    let blk = add_backend(&env, &raw, BackendOptions::resizable());
    let err = truncate(&env, &blk, 16384).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { driver: "raw", .. }),
        "{err}"
    );
    assert_eq!(length(&env, &blk), 8192);
}

#[test]
fn raw_with_an_offset_resizes_its_file_past_the_offset() {
    let _wd = watchdog("raw_with_an_offset", BUDGET);
    let env = Env::new();
    let file = env.mem_node(vec![9; 8192], 8192);
    let raw = add_node(
        &env,
        RawDriver::with_window(4096, None).unwrap(),
        &[(ChildRole::File, &file)],
    )
    .unwrap();
    let blk = add_backend(&env, &raw, BackendOptions::resizable());
    assert_eq!(length(&env, &blk), 4096);
    truncate(&env, &blk, 16384).unwrap();
    assert_eq!(length(&env, &blk), 16384);
    assert_eq!(env.contents(&file).len(), 4096 + 16384);
    assert!(read(&env, &blk, 4096, 12288).iter().all(|&b| b == 0));
}

/// qcow2 with 512-byte clusters: one L1 table cluster maps 2 MiB, one
/// refcount table cluster covers 8 MiB of file. Growing from 1 MiB to
/// 12 MiB moves the L1 table; writing 9 MiB of data then grows the
/// refcount table too.
#[test]
fn qcow2_grows_its_l1_table_and_qemu_img_agrees() {
    let _wd = watchdog("qcow2_grows_its_l1_table", Duration::from_secs(300));
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("grow.qcow2");
    let reference = dir.path().join("grow.raw");
    const OLD: u64 = 1 << 20;
    const NEW: u64 = 12 << 20;
    let (qcow, file, blk) = qcow2_on_file(
        &env,
        &img,
        CreateOptions::new(OLD).cluster_size(512),
        BackendOptions::resizable(),
    );
    let header = |at: usize, len: usize| -> u64 {
        let bytes = std::fs::read(&img).unwrap();
        bytes[at..at + len]
            .iter()
            .fold(0, |v, &b| v << 8 | u64::from(b))
    };
    let (l1_size, l1_offset, rt_clusters) = (header(36, 4), header(40, 8), header(56, 4));
    assert_eq!((l1_size, rt_clusters), (32, 1), "1 MiB: one L1 cluster");
    let mut expect = vec![0u8; NEW as usize];
    let mut put = |blk: &BlockBackend, off: u64, byte: u8, len: usize| {
        write(&env, blk, off, vec![byte; len]);
        expect[off as usize..off as usize + len].fill(byte);
    };
    put(&blk, 0, 0x01, 65536);
    put(&blk, OLD - 512, 0x02, 512);
    truncate(&env, &blk, NEW).unwrap();
    assert_eq!(length(&env, &blk), NEW);
    put(&blk, OLD, 0x03, 4096);
    // Data across the old L1 boundary and at the new end.
    put(&blk, (2 << 20) - 512, 0x04, 1024);
    put(&blk, NEW - 512, 0x05, 512);
    for i in 0..9u64 {
        put(&blk, (2 << 20) + i * (1 << 20), 0x10 + i as u8, 1 << 20);
    }
    assert_eq!(read(&env, &blk, 0, NEW as usize), expect);
    flush(&env, &blk);
    let report = env.check(&qcow, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    remove_backend(&env, blk);
    env.remove(&qcow).unwrap();
    env.remove(&file).unwrap();

    assert_eq!(header(36, 4), 384, "12 MiB: 384 L1 entries");
    assert_ne!(header(40, 8), l1_offset, "the L1 table moved");
    assert!(header(56, 4) > 1, "the refcount table grew");
    std::fs::write(&reference, &expect).unwrap();
    qemu_img(&["check", "-f", "qcow2", p(&img)]);
    let info = qemu_img(&["info", "--output=json", "-f", "qcow2", p(&img)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {NEW}")),
        "qemu-img info: {info}"
    );
    compare_with_raw(&img, &reference);
}

/// Growing over a backing file that is longer than the old size: the new
/// area reads as zeroes, not as the backing file (QEMU writes zeroes
/// there too), in our reading and in QEMU's.
#[test]
fn qcow2_grown_over_a_longer_backing_file_reads_zeroes() {
    let _wd = watchdog("qcow2_grown_over_a_longer_backing_file", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xBB; 1 << 20]).unwrap();
    for compat in ["0.10", "1.1"] {
        let top = dir.path().join(format!("top-{compat}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size=4096"),
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&top),
            "299520",
        ]);
        // The cluster the old end cuts through may hold backing bytes past
        // the old end once copied up.
        qemu_io(&top, "write -P 0x7 299008 512");
        let path = top.clone();
        let name = env.name("top");
        let chain = env
            .on_io(move |mut cx| async move {
                open_image_chain(&mut cx, &path, ChainOptions::new(name)).await
            })
            .unwrap();
        let blk = add_backend(&env, chain.top(), BackendOptions::resizable());
        truncate(&env, &blk, 600 * 1024).unwrap();
        let data = read(&env, &blk, 0, 600 * 1024);
        assert!(data[..299008].iter().all(|&b| b == 0xBB), "{compat}");
        assert!(data[299008..299520].iter().all(|&b| b == 7), "{compat}");
        assert!(
            data[299520..].iter().all(|&b| b == 0),
            "{compat}: the grown area reads as zeroes"
        );
        flush(&env, &blk);
        remove_backend(&env, blk);
        for i in &chain.images {
            if i.format == "qcow2" {
                env.remove(&i.node).unwrap();
            }
        }
        for i in &chain.images {
            env.remove(&i.file).unwrap();
        }
        qemu_img(&["check", "-f", "qcow2", p(&top)]);
        let reference = dir.path().join(format!("ref-{compat}.raw"));
        std::fs::write(&reference, &data).unwrap();
        compare_with_raw(&top, &reference);
    }
}

#[test]
fn qcow2_shrinks_only_over_nothing_stored() {
    let _wd = watchdog("qcow2_shrinks_only_over_nothing_stored", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("shrink.qcow2");
    let (qcow, file, blk) = qcow2_on_file(
        &env,
        &img,
        CreateOptions::new(4 << 20).cluster_size(4096),
        BackendOptions::resizable(),
    );
    write(&env, &blk, 0, vec![1; 8192]);
    write(&env, &blk, (3 << 20) + 100, vec![2; 100]);
    // Data past the new end: refused, nothing changed.
    let err = truncate(&env, &blk, 2 << 20).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("would drop data")),
        "{err}"
    );
    assert_eq!(length(&env, &blk), 4 << 20);
    assert!(read(&env, &blk, (3 << 20) + 100, 100)
        .iter()
        .all(|&b| b == 2));
    // Not a multiple of 512: refused.
    assert!(matches!(
        truncate(&env, &blk, (2 << 20) + 100),
        Err(Error::InvalidArgument(_))
    ));
    // Discarded first: allowed. Cutting through a cluster whose cut-off
    // part is zeroes is allowed too.
    let b = blk.clone();
    env.on_io(move |mut cx| async move { b.discard(&mut cx, 2 << 20, 2 << 20).await })
        .unwrap();
    truncate(&env, &blk, 6144).unwrap_err();
    write(&env, &blk, 4096, vec![0; 4096]);
    truncate(&env, &blk, 6144).unwrap();
    assert_eq!(length(&env, &blk), 6144);
    assert!(read(&env, &blk, 0, 4096).iter().all(|&b| b == 1));
    // Grown again: what was cut off reads as zeroes.
    truncate(&env, &blk, 1 << 20).unwrap();
    assert!(read(&env, &blk, 4096, (1 << 20) - 4096)
        .iter()
        .all(|&b| b == 0));
    truncate(&env, &blk, 6144).unwrap();
    flush(&env, &blk);
    remove_backend(&env, blk);
    env.remove(&qcow).unwrap();
    env.remove(&file).unwrap();
    qemu_img(&["check", "-f", "qcow2", p(&img)]);
    let info = qemu_img(&["info", "--output=json", "-f", "qcow2", p(&img)]);
    assert!(info.contains("\"virtual-size\": 6144"), "{info}");
}

#[test]
fn qcow2_with_internal_snapshots_refuses_to_resize() {
    let _wd = watchdog("qcow2_with_internal_snapshots", BUDGET);
    require_qemu();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "1M"]);
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    let path = img.clone();
    let name = env.name("snap");
    let chain = env
        .on_io(move |mut cx| async move {
            let mut opts = ChainOptions::new(name);
            opts.writable = false;
            open_image_chain(&mut cx, &path, opts).await
        })
        .unwrap();
    let blk = add_backend(
        &env,
        chain.top(),
        BackendOptions::with_perms(Permissions {
            take: Perm::CONSISTENT_READ | Perm::RESIZE,
            share: Perm::ALL,
        }),
    );
    let err = truncate(&env, &blk, 2 << 20).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { driver: "qcow2", operation } if operation.contains("snapshots")),
        "{err}"
    );
    assert_eq!(length(&env, &blk), 1 << 20);
}

/// The resize runs under the read lock like any request and lets nothing
/// else into the qcow2 node while the size changes: writes racing with a
/// grow all land, and the image stays consistent.
#[test]
fn qcow2_resize_races_with_writes() {
    let _wd = watchdog("qcow2_resize_races_with_writes", BUDGET);
    let env = Env::new();
    let file = env.mem_node(Vec::new(), 8 << 20);
    env.create(&file, CreateOptions::new(256 << 10).cluster_size(512))
        .unwrap();
    let qcow = env.open(&file, None, Qcow2Options::default()).unwrap();
    let blk = add_backend(&env, &qcow, BackendOptions::resizable());
    let b = blk.clone();
    let writer = env.io2.spawn(move |mut cx| async move {
        for i in 0..256u64 {
            b.write(&mut cx, i * 1024, &[(i % 255) as u8 + 1; 1024])
                .await?;
        }
        Ok::<_, Error>(())
    });
    for step in 1..=8u64 {
        truncate(&env, &blk, (256 << 10) + step * (512 << 10)).unwrap();
    }
    common::join(writer, "the writer").unwrap();
    let data = read(&env, &blk, 0, 256 << 10);
    for i in 0..256usize {
        assert!(data[i * 1024..(i + 1) * 1024]
            .iter()
            .all(|&b| b == (i % 255) as u8 + 1));
    }
    flush(&env, &blk);
    let report = env.check(&qcow, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let qd = qcow.clone();
    let size = env.main.run(move |bql| {
        qd.gs(bql)
            .driver_as::<Qcow2Driver>()
            .map(|d| d.virtual_size())
    });
    assert_eq!(size, Some((256 << 10) + 8 * (512 << 10)));
}
