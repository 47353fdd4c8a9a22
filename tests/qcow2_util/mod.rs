//! Helpers shared by the qcow2 test files: a main loop with I/O threads,
//! images in memory, a deterministic random generator and a reference
//! model of the guest disk.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::process::Command;

use blockgraph::drivers::qcow2::{
    open_image_chain, ChainOptions, CheckReport, CreateOptions, ImageChain,
};
use blockgraph::drivers::{
    qcow2::{Qcow2Driver, Qcow2Options},
    MemoryDriver,
};
use blockgraph::{ChildRole, IoTask, IoThread, MainLoop, NodeHandle, Result};

/// Room for qcow2 images held in memory: the memory driver does not grow,
/// so image files get this much space (refcounts decide what is used).
pub const MEM_CAPACITY: usize = 24 << 20;

pub struct Env {
    pub main: MainLoop,
    pub io: IoThread,
    pub io2: IoThread,
    next: std::sync::atomic::AtomicU32,
}

impl Env {
    pub fn new() -> Env {
        let main = MainLoop::new().expect("main loop");
        let io = main.new_io_thread("io0").expect("io thread");
        let io2 = main.new_io_thread("io1").expect("io thread");
        Env {
            main,
            io,
            io2,
            next: 0.into(),
        }
    }

    pub fn name(&self, prefix: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{prefix}{n}")
    }

    /// Runs `f` on the first I/O thread and waits for it.
    pub fn on_io<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(IoTask) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.io.spawn(f).join()
    }

    /// A memory node holding `bytes`, padded with zeroes to `capacity`.
    pub fn mem_node(&self, mut bytes: Vec<u8>, capacity: usize) -> NodeHandle {
        if bytes.len() < capacity {
            bytes.resize(capacity, 0);
        }
        let name = self.name("mem");
        self.main
            .run(move |bql| bql.write(|w| w.add_node(&name, MemoryDriver::from_bytes(bytes), &[])))
            .expect("add memory node")
    }

    /// The bytes of a memory node.
    pub fn contents(&self, node: &NodeHandle) -> Vec<u8> {
        let node = node.clone();
        self.main.run(move |bql| {
            node.gs(bql)
                .driver_as::<MemoryDriver>()
                .expect("a memory node")
                .contents()
        })
    }

    /// Formats `file` with `opts`.
    pub fn create(&self, file: &NodeHandle, opts: CreateOptions) -> Result<()> {
        let file = file.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::create(file.io(&g), &opts).await
        })
    }

    /// Opens the image in `file` and adds its node (with `backing`).
    pub fn open(
        &self,
        file: &NodeHandle,
        backing: Option<&NodeHandle>,
        opts: Qcow2Options,
    ) -> Result<NodeHandle> {
        let file = file.clone();
        let backing = backing.cloned();
        let name = self.name("qcow");
        self.on_io(move |mut cx| async move {
            let drv = {
                let g = cx.read().await;
                Qcow2Driver::open(file.io(&g), opts).await?
            };
            cx.run_on_main_loop(move |bql| {
                bql.write(|w| {
                    let mut kids = vec![(ChildRole::File, &file)];
                    if let Some(b) = &backing {
                        kids.push((ChildRole::Backing, b));
                    }
                    w.add_node(&name, drv, &kids)
                })
            })
            .await?
        })
    }

    /// Opens `bytes` as an image in a fresh memory node.
    pub fn open_bytes(&self, bytes: Vec<u8>, opts: Qcow2Options) -> Result<NodeHandle> {
        let len = bytes.len();
        let file = self.mem_node(bytes, len);
        self.open(&file, None, opts)
    }

    pub fn read(&self, node: &NodeHandle, offset: u64, len: usize) -> Result<Vec<u8>> {
        let node = node.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            let mut buf = vec![0u8; len];
            node.io(&g).read(offset, &mut buf).await?;
            Ok(buf)
        })
    }

    pub fn write(&self, node: &NodeHandle, offset: u64, data: Vec<u8>) -> Result<()> {
        let node = node.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            node.io(&g).write(offset, &data).await
        })
    }

    pub fn write_zeroes(&self, node: &NodeHandle, offset: u64, len: u64) -> Result<()> {
        let node = node.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            node.io(&g).write_zeroes(offset, len).await
        })
    }

    pub fn discard(&self, node: &NodeHandle, offset: u64, len: u64) -> Result<()> {
        let node = node.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            node.io(&g).discard(offset, len).await
        })
    }

    pub fn flush(&self, node: &NodeHandle) -> Result<()> {
        let node = node.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            node.io(&g).flush().await
        })
    }

    pub fn check(&self, node: &NodeHandle, repair: bool) -> Result<CheckReport> {
        let node = node.clone();
        self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            n.driver_as::<Qcow2Driver>()
                .expect("a qcow2 node")
                .check(n, repair)
                .await
        })
    }

    /// Reads the whole guest disk.
    pub fn read_all(&self, node: &NodeHandle) -> Result<Vec<u8>> {
        let n = node.clone();
        let len = self.on_io(move |mut cx| async move {
            let g = cx.read().await;
            n.io(&g).length().await
        })?;
        self.read(node, 0, len as usize)
    }

    /// Drains and removes `node` (parents first is the caller's job).
    pub fn remove(&self, node: &NodeHandle) -> Result<()> {
        let node = node.clone();
        self.main.run(move |bql| {
            let d = bql.drain(&node);
            bql.write(|w| w.remove_node(&d))
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.main.shutdown();
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Whether `qemu-img` and `qemu-io` can be run.
pub fn have_qemu() -> bool {
    ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Fails the test unless QEMU's tools are installed.
pub fn require_qemu() {
    assert!(
        have_qemu(),
        "qemu-img and qemu-io are needed (Debian package qemu-utils; .ci/run installs it)"
    );
}

/// A temporary path as a tool argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Opens `path` and its backing chain through `FileDriver` nodes.
pub fn open_chain(env: &Env, path: &Path, writable: bool) -> ImageChain {
    let path = path.to_path_buf();
    let name = env.name("img");
    env.on_io(move |mut cx| async move {
        let mut opts = ChainOptions::new(name);
        opts.writable = writable;
        open_image_chain(&mut cx, &path, opts).await
    })
    .unwrap_or_else(|e| panic!("opening the chain failed: {e}"))
}

/// Removes a chain's nodes (top first) so the files are closed and
/// unlocked for QEMU's tools.
pub fn close_chain(env: &Env, chain: ImageChain) {
    for img in &chain.images {
        if img.format == "qcow2" {
            env.remove(&img.node).unwrap();
        }
    }
    for img in &chain.images {
        env.remove(&img.file).unwrap();
    }
}

/// Runs a command, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `qemu-img` with arguments.
pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-io` running one command on an image (with `-f qcow2`).
pub fn qemu_io(path: &Path, command: &str) -> String {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command])
        .arg(path))
}
