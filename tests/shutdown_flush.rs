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
