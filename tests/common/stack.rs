//! The driver tests' fixture: a main loop, an I/O thread and a stack of
//! nodes with a backend on top, built in one write section, with the
//! requests the tests make through it.

use blockgraph::driver::{BlockDriver, IoFuture};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, Error, IoRef, IoThread, MainLoop, NodeHandle, Result,
};

/// A stack of nodes, each one's child the node below it, bottom first;
/// then a backend on the top node. Build it with [`Stack::build`] (a fresh
/// main loop and I/O thread) or add it to a graph with [`Stack::add_to`].
///
/// ```ignore
/// // backend "vda" -> fault (Filtered) -> memory "disk"
/// let rig = Stack::new()
///     .node("disk", MemoryDriver::new(SIZE))
///     .above(ChildRole::Filtered, "fault", injector)
///     .build();
/// ```
pub struct Stack {
    /// Name, driver, and the role under which the node below hangs.
    layers: Vec<(String, Box<dyn BlockDriver>, ChildRole)>,
    backend: (String, BackendOptions),
}

impl Default for Stack {
    fn default() -> Self {
        Stack {
            layers: Vec::new(),
            backend: ("vda".to_owned(), BackendOptions::default()),
        }
    }
}

impl Stack {
    /// An empty stack, with a backend `vda` (default options) to come.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bottom node.
    pub fn node(self, name: impl Into<String>, driver: impl BlockDriver) -> Self {
        assert!(self.layers.is_empty(), "node() is the bottom of the stack");
        self.above(ChildRole::Filtered, name, driver)
    }

    /// A node above the current top, which becomes its `role` child (on an
    /// empty stack: the bottom node, and `role` does not matter).
    pub fn above(
        mut self,
        role: ChildRole,
        name: impl Into<String>,
        driver: impl BlockDriver,
    ) -> Self {
        self.layers.push((name.into(), Box::new(driver), role));
        self
    }

    /// Names the backend and chooses its options.
    pub fn backend(mut self, name: impl Into<String>, options: BackendOptions) -> Self {
        self.backend = (name.into(), options);
        self
    }

    /// The same options for the backend `vda`.
    pub fn backend_options(self, options: BackendOptions) -> Self {
        self.backend("vda", options)
    }

    /// Adds the nodes and the backend to `main`'s graph in one write
    /// section; returns the nodes, bottom first, and the backend.
    pub fn add_to(self, main: &MainLoop) -> Result<(Vec<NodeHandle>, BlockBackend)> {
        let Stack { layers, backend } = self;
        main.run(move |bql| {
            bql.write(|w| {
                let mut nodes: Vec<NodeHandle> = Vec::new();
                for (name, driver, role) in layers {
                    let below: Vec<_> = nodes.last().map(|n| (role, n)).into_iter().collect();
                    let node = w.add_node_boxed(&name, driver, &below)?;
                    nodes.push(node);
                }
                let top = nodes.last().expect("a stack has a node");
                let blk = w.add_backend(&backend.0, top, backend.1)?;
                Ok::<_, Error>((nodes, blk))
            })
        })
    }

    /// A fresh main loop and I/O thread `io0`, with the stack on them.
    pub fn build(self) -> Rig {
        let main = MainLoop::new().unwrap();
        let io = main.new_io_thread("io0").unwrap();
        let (nodes, blk) = self.add_to(&main).unwrap();
        Rig {
            main,
            io,
            nodes,
            blk,
        }
    }
}

/// A built [`Stack`]: what the driver tests drive.
pub struct Rig {
    pub main: MainLoop,
    pub io: IoThread,
    /// The nodes, bottom first.
    pub nodes: Vec<NodeHandle>,
    pub blk: BlockBackend,
}

impl Rig {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> NodeHandle {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .unwrap_or_else(|| panic!("no node '{name}' in the stack"))
            .clone()
    }

    /// Writes `data` at `offset` through the backend, on the I/O thread.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let (blk, data) = (self.blk.clone(), data.to_vec());
        self.io
            .spawn(move |mut cx| async move { blk.write(&mut cx, offset, &data).await })
            .join()
    }

    /// Reads `len` bytes at `offset` through the backend into a buffer
    /// filled with `0xEE` first (so a driver that leaves part of it
    /// unwritten shows).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let blk = self.blk.clone();
        self.io
            .spawn(move |mut cx| async move {
                let mut buf = vec![0xEE; len];
                blk.read(&mut cx, offset, &mut buf).await.map(|_| buf)
            })
            .join()
    }

    /// The backend's length.
    pub fn length(&self) -> Result<u64> {
        let blk = self.blk.clone();
        self.io
            .spawn(move |mut cx| async move { blk.length(&mut cx).await })
            .join()
    }

    /// Flushes through the backend.
    pub fn flush(&self) -> Result<()> {
        let blk = self.blk.clone();
        self.io
            .spawn(move |mut cx| async move { blk.flush(&mut cx).await })
            .join()
    }

    /// Resizes through the backend (which must take `Perm::RESIZE`).
    pub fn truncate(&self, size: u64) -> Result<()> {
        let blk = self.blk.clone();
        self.io
            .spawn(move |mut cx| async move { blk.truncate(&mut cx, size).await })
            .join()
    }

    /// Runs `f` on the node `name` directly (no backend checks), under a
    /// read guard.
    pub fn on_node<T: Send + 'static>(
        &self,
        name: &str,
        f: impl for<'r> FnOnce(IoRef<'r>) -> IoFuture<'r, T> + Send + 'static,
    ) -> Result<T> {
        let node = self.node(name);
        self.io
            .spawn(move |mut cx| async move {
                let guard = cx.read().await;
                f(node.io(&guard)).await
            })
            .join()
    }

    /// Runs `f` on the driver of the node `name`, on the main loop.
    pub fn driver<D: BlockDriver, R: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(&D) -> R + Send + 'static,
    ) -> R {
        let node = self.node(name);
        self.main.run(move |bql| {
            let gs = node.gs(bql);
            f(gs.driver_as::<D>()
                .expect("the node's driver is of this type"))
        })
    }

    /// Stops the I/O thread, then the main loop.
    pub fn finish(self) {
        drop(self.io);
        self.main.shutdown();
    }
}

/// Adds `driver` as the node `name`, with no children, to a fresh graph and
/// returns the error that refused it; checks that the failed add left
/// nothing behind. For drivers that need a child.
pub fn add_alone(name: &str, driver: impl BlockDriver) -> Error {
    let main = MainLoop::new().unwrap();
    let name = name.to_owned();
    let err = main
        .run(move |bql| bql.write(|w| w.add_node(&name, driver, &[])))
        .expect_err("the node joined the graph without its child");
    assert_eq!(main.run(|bql| bql.graph().nodes().len()), 0);
    main.shutdown();
    err
}
