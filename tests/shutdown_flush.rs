//! `MainLoop::shutdown` flushes every node before tearing the graph down
//! (QEMU's `bdrv_close_all` does the same): a qcow2 image written without
//! an explicit flush is complete and consistent for `qemu-img` afterwards.

use std::path::Path;
use std::process::Command;

use blockgraph::drivers::qcow2::{open_image_chain, ChainOptions};
use blockgraph::{BackendOptions, Error, MainLoop};

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (.ci/run installs qemu-utils)")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[test]
fn shutdown_writes_back_qcow2_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        "4M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let path = img.clone();
    io.spawn(move |mut cx| async move {
        let chain = open_image_chain(&mut cx, &path, ChainOptions::new("disk")).await?;
        let top = chain.top().clone();
        let blk = cx
            .run_on_main_loop(move |bql| {
                bql.write(|w| w.add_backend("vda", &top, BackendOptions::default()))
            })
            .await??;
        // Allocating writes: new L2 tables and refcounts, cached, not flushed.
        for i in 0..64u64 {
            blk.write(&mut cx, i * 65536, &[i as u8 + 1; 4096]).await?;
        }
        Ok::<_, Error>(())
    })
    .join()
    .unwrap();
    drop(io);
    main.shutdown();

    let check = qemu_img(&["check", s(&img)]);
    assert!(
        check.status.success(),
        "qemu-img check after shutdown: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = dir.path().join("disk.raw");
    let out = qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&raw).unwrap();
    for i in 0..64usize {
        let at = i * 65536;
        assert!(
            data[at..at + 4096].iter().all(|&b| b == i as u8 + 1),
            "block {i} was lost at shutdown"
        );
    }
}

/// A driver that logs its node's name at `flush_to_close` and does not
/// pass the flush on, so the log is the shutdown's own order.
struct LogFlush(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl blockgraph::driver::BlockDriver for LogFlush {
    fn format_name(&self) -> &'static str {
        "log-flush"
    }

    fn length<'a>(
        &'a self,
        _node: blockgraph::RequestRef<'a>,
    ) -> blockgraph::driver::IoFuture<'a, u64> {
        Box::pin(async { Ok(0) })
    }

    fn read<'a>(
        &'a self,
        _node: blockgraph::RequestRef<'a>,
        _offset: u64,
        _buf: &'a mut [u8],
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn write<'a>(
        &'a self,
        _node: blockgraph::RequestRef<'a>,
        _offset: u64,
        _buf: &'a [u8],
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush_to_close<'a>(
        &'a self,
        node: blockgraph::RequestRef<'a>,
    ) -> blockgraph::driver::IoFuture<'a, ()> {
        self.0.lock().unwrap().push(node.name().to_owned());
        Box::pin(async { Ok(()) })
    }
}

/// The shutdown flushes every node once, each before the nodes it uses
/// (a diamond and a lone node included), whatever order they were added in.
#[test]
fn shutdown_flushes_each_node_once_users_first() {
    use blockgraph::ChildRole::{Backing, File, Filtered};
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let main = MainLoop::new().unwrap();
    let l = log.clone();
    main.run(move |bql| {
        bql.write(|w| {
            let n = |name: &str| (name.to_owned(), LogFlush(l.clone()));
            let (name, d) = n("d");
            let d = w.add_node(&name, d, &[])?;
            let (name, lone) = n("lone");
            w.add_node(&name, lone, &[])?;
            let (name, c) = n("c");
            let c = w.add_node(&name, c, &[(File, &d)])?;
            let (name, b) = n("b");
            let b = w.add_node(&name, b, &[(Filtered, &d)])?;
            let (name, a) = n("a");
            w.add_node(&name, a, &[(Filtered, &b), (Backing, &c)])?;
            Ok::<_, Error>(())
        })
    })
    .unwrap();
    main.shutdown();
    let log = log.lock().unwrap().clone();
    let mut sorted = log.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["a", "b", "c", "d", "lone"],
        "each node once: {log:?}"
    );
    let at = |n: &str| log.iter().position(|x| x == n).unwrap();
    for (user, used) in [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")] {
        assert!(at(user) < at(used), "'{user}' after '{used}': {log:?}");
    }
}
