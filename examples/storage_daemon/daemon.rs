//! The daemon's state and the operations the commands perform on it: the
//! graph (a [`MainLoop`] and one [`IoThread`] for opening images), the
//! nodes added by name, throttle groups, the NBD server and its exports,
//! and the graceful shutdown.
//!
//! Everything here runs on one thread, the executor (see `main.rs`), so
//! commands are applied one at a time in the order they arrive, as QEMU's
//! monitor does. Blocking is fine on that thread: it is a plain thread, not
//! an I/O task, so [`MainLoop::run`] and [`TaskHandle::join`] may wait.
//!
//! [`TaskHandle::join`]: blockgraph::TaskHandle::join

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockgraph::driver::BlockDriver;
use blockgraph::drivers::qcow2::{
    open_image_chain, BackingPolicy, ChainOptions, Qcow2Driver, Qcow2Options,
};
use blockgraph::drivers::{
    CopyOnRead, FileDriver, FileOptions, NullDriver, RawDriver, ThrottleConfig, ThrottleDriver,
    ThrottleGroup,
};
use blockgraph::export::nbd::{
    ExportOptions, NbdListener, NbdServer, RemoveExportError, RemoveMode,
};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, IoThread, MainLoop, NodeHandle, ParentRef, Perm,
    Permissions,
};
use serde_json::{json, Value};

use crate::blockdev::{Backing, ChildSpec, Kind, NodeSpec};
use crate::opts::{lib_err, QResult, QmpError};
use crate::qmp::Events;

mod bitmaps;
mod jobs;
mod snapshots;

pub use bitmaps::{BitmapAction, BitmapAdd, BitmapRef, BitmapVerb};
pub use jobs::{BackupSpec, CommitSpec, JobArgs, JobVerbCmd, MirrorSpec, StreamSpec};
pub use snapshots::{SnapshotAction, SyncSpec};

/// One node the daemon added, under the name QMP shows.
struct Node {
    handle: NodeHandle,
    /// QEMU's driver name (`drv`).
    drv: &'static str,
    /// QEMU's `filename` of the node (`file` in the query).
    filename: String,
    /// The host file, for a `file` node.
    path: Option<PathBuf>,
    read_only: bool,
    /// Created for a parent (an inline child or an opened backing file),
    /// not by `blockdev-add` itself: deleted with that parent.
    implicit: bool,
    /// The implicit nodes created with this one.
    owned: Vec<String>,
    /// The throttle group, for a `throttle` node.
    group: Option<String>,
    /// QEMU's description of the node's options, for the `json:` filename
    /// of a filter above it.
    desc: Value,
    /// Creation order (QEMU lists the newest first).
    seq: u64,
}

/// What adding a node builds before it joins the graph.
struct Built {
    driver: Box<dyn BlockDriver>,
    children: Vec<(ChildRole, NodeHandle)>,
    /// QEMU's `filename`.
    filename: String,
    /// The host file, for a `file` node.
    path: Option<PathBuf>,
    /// The throttle group, for a `throttle` node.
    group: Option<String>,
    /// QEMU's description of the node's options (its `json:` filename).
    desc: Value,
}

/// One NBD export.
struct Export {
    name: String,
    node: String,
    backend: BlockBackend,
    /// Removed with `mode=hard` while clients were connected: no longer
    /// published (its NBD name may be used again), its connections are
    /// ending; QEMU's `shutting-down`. Deleted once the last one is gone.
    closing: bool,
}

/// The running NBD server.
struct Nbd {
    server: NbdServer,
    listener: NbdListener,
}

/// Where the NBD server listens (QEMU's `SocketAddress`).
#[derive(Debug, Clone)]
pub enum NbdAddr {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP socket.
    Inet(String, String),
}

/// What an export is to be (QEMU's `BlockExportOptions`, type `nbd`).
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// `id`.
    pub id: String,
    /// `node-name`.
    pub node: String,
    /// `name` (default: the node name).
    pub name: Option<String>,
    /// `description`.
    pub description: String,
    /// `writable`.
    pub writable: bool,
}

/// The daemon's state.
pub struct Daemon {
    main: MainLoop,
    io: Option<IoThread>,
    nodes: BTreeMap<String, Node>,
    groups: BTreeMap<String, Arc<ThrottleGroup>>,
    nbd: Option<Nbd>,
    exports: BTreeMap<String, Export>,
    events: Events,
    next_seq: u64,
    next_auto: u64,
    /// NBD server worker threads.
    nbd_threads: usize,
    /// The I/O thread block jobs run on.
    jobs_io: Option<IoThread>,
    /// The nodes each running block job uses (graph names), for QEMU's
    /// "Node 'x' is busy" checks; dropped once the job has concluded.
    job_uses: BTreeMap<String, jobs::JobUse>,
    /// The executor's queue, for work that finishes later on its own
    /// (an export whose last connection closed); weak, so that it does not
    /// keep the executor alive.
    later: Option<tokio::sync::mpsc::WeakUnboundedSender<crate::qmp::Msg>>,
}

/// A graph name for an implicit node. User node names are at most 31
/// characters (QEMU's rule, checked in `blockdev`), these are longer, so
/// the two can never collide; QMP shows them as `#blockN`, which the
/// graph's own naming rule does not allow.
fn implicit_graph_name(n: u64) -> String {
    format!("storage-daemon-implicit-node-{n:06}")
}

/// An I/O error's message without Rust's " (os error N)" tail, as QEMU
/// words it (`strerror`).
fn os_message(e: &blockgraph::Error) -> String {
    let s = match e {
        // The bare `strerror` text, without the library's context.
        blockgraph::Error::Io(io) => match io.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
            None => io.to_string(),
        },
        other => other.to_string(),
    };
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

impl Daemon {
    /// A daemon with an empty graph.
    pub fn new(events: Events) -> Result<Daemon, String> {
        let main = MainLoop::new().map_err(|e| e.to_string())?;
        let io = main.new_io_thread("open").map_err(|e| e.to_string())?;
        let jobs_io = main.new_io_thread("jobs").map_err(|e| e.to_string())?;
        // One server thread per CPU, up to four (`STORAGE_DAEMON_NBD_THREADS`
        // overrides): a client that opens several connections (nbdcopy
        // does, on a multi-conn export) is then served on every CPU. With
        // one thread, nbdcopy of 1 GiB out of a raw file was at
        // qemu-storage-daemon's speed; with two, 1.7x faster.
        let nbd_threads = std::env::var("STORAGE_DAEMON_NBD_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)));
        Ok(Daemon {
            main,
            io: Some(io),
            nodes: BTreeMap::new(),
            groups: BTreeMap::new(),
            nbd: None,
            exports: BTreeMap::new(),
            events,
            next_seq: 0,
            next_auto: 0,
            nbd_threads,
            jobs_io: Some(jobs_io),
            job_uses: BTreeMap::new(),
            later: None,
        })
    }

    /// Where to queue work for later (see `later`).
    pub fn set_executor(&mut self, queue: tokio::sync::mpsc::WeakUnboundedSender<crate::qmp::Msg>) {
        self.later = Some(queue);
    }

    fn io(&self) -> QResult<&IoThread> {
        self.io
            .as_ref()
            .ok_or_else(|| QmpError::generic("the daemon is shutting down"))
    }

    // ---- nodes ----------------------------------------------------------

    /// `blockdev-add`: adds the node `spec` describes and the implicit
    /// nodes it defines inline; all or nothing.
    pub fn blockdev_add(&mut self, spec: NodeSpec) -> QResult<()> {
        let Some(name) = spec.node_name.clone() else {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        };
        let mut created = Vec::new();
        match self.add_node(spec, Some(name), &mut created) {
            Ok(_) => Ok(()),
            Err(e) => {
                // Undo in reverse: the newest node is the parent of the
                // ones before it.
                for name in created.into_iter().rev() {
                    let _ = self.remove_one(&name);
                }
                Err(e)
            }
        }
    }

    /// Adds one node (and its inline children); pushes every node added to
    /// `created`. Returns the QMP name.
    fn add_node(
        &mut self,
        spec: NodeSpec,
        name: Option<String>,
        created: &mut Vec<String>,
    ) -> QResult<String> {
        let implicit = name.is_none();
        let (display, graph_name) = match name {
            Some(n) => (n.clone(), n),
            None => self.auto_name(),
        };
        if self.nodes.contains_key(&display) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{display}'"
            )));
        }
        let mut owned = Vec::new();
        let read_only = spec.read_only;
        let built = match spec.kind {
            Kind::File {
                filename,
                direct,
                locking,
                aio,
            } => {
                let opts = FileOptions {
                    read_only,
                    direct,
                    locking,
                    share_writes: spec.force_share,
                    aio,
                    ..FileOptions::default()
                };
                let drv = FileDriver::open(&filename, opts).map_err(|e| {
                    QmpError::generic(format!(
                        "Could not open '{}': {}",
                        filename.display(),
                        os_message(&e)
                    ))
                })?;
                let shown = filename.display().to_string();
                Built {
                    desc: json!({"driver": "file", "filename": shown}),
                    driver: Box::new(drv),
                    children: Vec::new(),
                    filename: shown,
                    path: Some(filename),
                    group: None,
                }
            }
            Kind::Raw { file, offset, size } => {
                let child = self.child(file, created, &mut owned)?;
                let drv = RawDriver::with_window(offset, size).map_err(lib_err)?;
                let mut desc = json!({"driver": "raw", "file": self.nodes[&child].desc});
                if offset != 0 {
                    desc["offset"] = json!(offset);
                }
                if let Some(size) = size {
                    desc["size"] = json!(size);
                }
                self.format_over(Box::new(drv), &child, ChildRole::File, desc)
            }
            Kind::Qcow2 { file, backing } => {
                let child = self.child(file, created, &mut owned)?;
                let file_handle = self.nodes[&child].handle.clone();
                let mut opts = Qcow2Options::default();
                opts.read_only = read_only;
                opts.require_backing = !matches!(backing, Backing::Nothing);
                let fh = file_handle.clone();
                let drv = self
                    .io()?
                    .spawn(move |mut cx| async move {
                        let g = cx.read().await;
                        Qcow2Driver::open(fh.io(&g), opts).await
                    })
                    .join()
                    .map_err(|e| {
                        QmpError::generic(format!(
                            "Could not open '{}': {e}",
                            self.nodes[&child].filename
                        ))
                    })?;
                let backing_node = match backing {
                    Backing::Nothing => None,
                    Backing::Child(spec) => Some(self.child(spec, created, &mut owned)?),
                    Backing::FromImage => match drv.backing_file() {
                        None => None,
                        Some(name) => {
                            let format = drv.backing_format();
                            let base = self.nodes[&child].path.clone();
                            Some(self.open_backing(
                                base.as_deref(),
                                &name,
                                format.as_deref(),
                                created,
                                &mut owned,
                            )?)
                        }
                    },
                };
                let desc = json!({"driver": "qcow2", "file": self.nodes[&child].desc});
                let mut built = self.format_over(Box::new(drv), &child, ChildRole::File, desc);
                if let Some(b) = backing_node {
                    built
                        .children
                        .push((ChildRole::Backing, self.nodes[&b].handle.clone()));
                }
                built
            }
            Kind::Throttle { file, group } => {
                let Some(g) = self.groups.get(&group).cloned() else {
                    return Err(QmpError::generic(format!(
                        "Throttle group '{group}' does not exist"
                    )));
                };
                let child = self.child(file, created, &mut owned)?;
                let desc = json!({"driver": "throttle", "throttle-group": group,
                                  "file": self.nodes[&child].desc});
                let mut built = self.filter_over(Box::new(ThrottleDriver::new(g)), &child, desc);
                built.group = Some(group);
                built
            }
            Kind::CopyOnRead { file } => {
                let child = self.child(file, created, &mut owned)?;
                let desc = json!({"driver": "copy-on-read", "file": self.nodes[&child].desc});
                self.filter_over(Box::new(CopyOnRead::new()), &child, desc)
            }
            Kind::Nbd(crate::blockdev::NbdSpec(options)) => {
                let drv = blockgraph::drivers::NbdDriver::connect(options.clone())
                    .map_err(|e| QmpError::generic(format!("Could not open NBD export: {e}")))?;
                let filename = drv.info().filename.unwrap_or_default();
                let server = match &options.address {
                    blockgraph::drivers::NbdAddress::Unix(p) => {
                        json!({"type": "unix", "path": p.display().to_string()})
                    }
                    blockgraph::drivers::NbdAddress::Tcp { host, port } => {
                        json!({"type": "inet", "host": host, "port": port.to_string()})
                    }
                };
                Built {
                    desc: json!({"driver": "nbd", "server": server, "export": options.export}),
                    driver: Box::new(drv),
                    children: Vec::new(),
                    filename,
                    path: None,
                    group: None,
                }
            }
            #[cfg(feature = "rbd")]
            Kind::Rbd(crate::blockdev::RbdSpec { mut options }) => {
                options.read_only = read_only;
                let filename = options.display_name();
                let drv = blockgraph::drivers::RbdDriver::open(options.clone())
                    .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))?;
                let mut desc =
                    json!({"driver": "rbd", "pool": options.pool, "image": options.image});
                for (key, value) in [
                    ("namespace", options.namespace.clone()),
                    ("snapshot", options.snapshot.clone()),
                    (
                        "conf",
                        options.conf.as_ref().map(|c| c.display().to_string()),
                    ),
                    ("user", options.user.clone()),
                ] {
                    if let Some(v) = value {
                        desc[key] = json!(v);
                    }
                }
                Built {
                    desc,
                    driver: Box::new(drv),
                    children: Vec::new(),
                    filename,
                    path: None,
                    group: None,
                }
            }
            Kind::Null {
                size,
                latency_ns,
                read_zeroes,
            } => {
                let mut desc = json!({"driver": "null-co"});
                if let Some(v) = size {
                    desc["size"] = json!(v);
                }
                if let Some(v) = latency_ns {
                    desc["latency-ns"] = json!(v);
                }
                if let Some(v) = read_zeroes {
                    desc["read-zeroes"] = json!(v);
                }
                // QEMU's plain name when no option was given, its JSON
                // description otherwise.
                let filename = if size.is_none() && latency_ns.is_none() && read_zeroes.is_none() {
                    "null-co://".to_owned()
                } else {
                    format!("json:{desc}")
                };
                Built {
                    driver: Box::new(
                        NullDriver::new(size.unwrap_or(1 << 30))
                            .with_delay(Duration::from_nanos(latency_ns.unwrap_or(0)))
                            .with_read_zeroes(read_zeroes.unwrap_or(false)),
                    ),
                    children: Vec::new(),
                    filename,
                    path: None,
                    group: None,
                    desc,
                }
            }
        };
        let Built {
            driver,
            children,
            filename,
            path,
            group,
            desc,
        } = built;
        let handle = self.add_graph_node(graph_name, driver, children)?;
        self.register(
            display.clone(),
            Node {
                handle,
                drv: spec.driver,
                filename,
                path,
                read_only,
                implicit,
                owned,
                group,
                desc,
                seq: 0,
            },
        );
        created.push(display.clone());
        Ok(display)
    }

    /// A format driver over `child` (`raw`, `qcow2`): QEMU names it by its
    /// file's name.
    fn format_over(
        &self,
        driver: Box<dyn BlockDriver>,
        child: &str,
        role: ChildRole,
        desc: Value,
    ) -> Built {
        let c = &self.nodes[child];
        Built {
            driver,
            children: vec![(role, c.handle.clone())],
            filename: c.filename.clone(),
            path: None,
            group: None,
            desc,
        }
    }

    /// A filter over `child` (`throttle`, `copy-on-read`): QEMU names it by
    /// its JSON description.
    fn filter_over(&self, driver: Box<dyn BlockDriver>, child: &str, desc: Value) -> Built {
        let c = &self.nodes[child];
        Built {
            driver,
            children: vec![(ChildRole::Filtered, c.handle.clone())],
            filename: format!("json:{desc}"),
            path: None,
            group: None,
            desc,
        }
    }

    fn auto_name(&mut self) -> (String, String) {
        self.next_auto += 1;
        (
            format!("#block{}", self.next_auto),
            implicit_graph_name(self.next_auto),
        )
    }

    fn register(&mut self, display: String, mut node: Node) {
        self.next_seq += 1;
        node.seq = self.next_seq;
        self.nodes.insert(display, node);
    }

    fn add_graph_node(
        &self,
        name: String,
        driver: Box<dyn BlockDriver>,
        children: Vec<(ChildRole, NodeHandle)>,
    ) -> QResult<NodeHandle> {
        self.main
            .run(move |bql| {
                bql.write(|w| {
                    let kids: Vec<(ChildRole, &NodeHandle)> =
                        children.iter().map(|(r, h)| (*r, h)).collect();
                    w.add_node_boxed(&name, driver, &kids)
                })
            })
            .map_err(lib_err)
    }

    /// Resolves a child: an existing node, or a new implicit one.
    fn child(
        &mut self,
        spec: ChildSpec,
        created: &mut Vec<String>,
        owned: &mut Vec<String>,
    ) -> QResult<String> {
        match spec {
            ChildSpec::Ref(name) => {
                if self.nodes.contains_key(&name) {
                    Ok(name)
                } else {
                    Err(QmpError::generic(format!(
                        "Cannot find device='{name}' nor node-name='{name}'"
                    )))
                }
            }
            ChildSpec::Inline(spec) => {
                let name = spec.node_name.clone();
                let implicit = name.is_none();
                let added = self.add_node(*spec, name, created)?;
                if implicit {
                    owned.push(added.clone());
                }
                Ok(added)
            }
        }
    }

    /// Opens the backing file an image names (read-only, with its own
    /// chain), as QEMU does when `backing` is not given.
    fn open_backing(
        &mut self,
        image: Option<&Path>,
        name: &str,
        format: Option<&str>,
        created: &mut Vec<String>,
        owned: &mut Vec<String>,
    ) -> QResult<String> {
        let Some(image) = image else {
            return Err(QmpError::generic(format!(
                "Cannot open backing file '{name}': the image's file has no host path \
                 (give 'backing' explicitly, or null)"
            )));
        };
        let mut policy = BackingPolicy::default();
        // QEMU opens whatever the image names.
        policy.allow_absolute = true;
        policy.allow_escape = true;
        policy.allow_probing = true;
        let path = policy.resolve(image, name).map_err(lib_err)?;
        let fail = |e: String| {
            QmpError::generic(format!(
                "Could not open backing file '{}': {e}",
                path.display()
            ))
        };
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => return Err(fail(format!("backing format '{other}' is not supported"))),
            None => {
                let mut magic = [0u8; 4];
                use std::io::Read;
                std::fs::File::open(&path)
                    .and_then(|mut f| f.read_exact(&mut magic))
                    .is_ok()
                    && magic == *b"QFI\xfb"
            }
        };
        if !is_qcow2 {
            let drv = FileDriver::open(
                &path,
                FileOptions {
                    read_only: true,
                    ..FileOptions::default()
                },
            )
            .map_err(|e| fail(os_message(&e)))?;
            let (display, graph) = self.auto_name();
            let handle = self.add_graph_node(graph, Box::new(drv), Vec::new())?;
            let shown = path.display().to_string();
            self.register(
                display.clone(),
                Node {
                    handle,
                    drv: "file",
                    desc: json!({"driver": "file", "filename": shown}),
                    filename: shown,
                    path: Some(path.clone()),
                    read_only: true,
                    implicit: true,
                    owned: Vec::new(),
                    group: None,
                    seq: 0,
                },
            );
            created.push(display.clone());
            owned.push(display.clone());
            return Ok(display);
        }
        self.next_auto += 1;
        let mut opts = ChainOptions::new(implicit_graph_name(self.next_auto));
        opts.writable = false;
        opts.policy = policy;
        let p = path.clone();
        let chain = self
            .io()?
            .spawn(move |mut cx| async move { open_image_chain(&mut cx, &p, opts).await })
            .join()
            .map_err(|e| fail(e.to_string()))?;
        // Register bottom up, so that each node's owner comes after it.
        let mut below: Option<String> = None;
        let mut top = String::new();
        for img in chain.images.iter().rev() {
            let shown = img.path.display().to_string();
            let file_desc = json!({"driver": "file", "filename": shown});
            self.next_auto += 1;
            let file_name = format!("#block{}", self.next_auto);
            self.register(
                file_name.clone(),
                Node {
                    handle: img.file.clone(),
                    drv: "file",
                    filename: shown.clone(),
                    path: Some(img.path.clone()),
                    read_only: true,
                    implicit: true,
                    owned: Vec::new(),
                    group: None,
                    desc: file_desc.clone(),
                    seq: 0,
                },
            );
            created.push(file_name.clone());
            if img.node.ptr_eq(&img.file) {
                top = file_name;
            } else {
                self.next_auto += 1;
                let name = format!("#block{}", self.next_auto);
                let mut own = vec![file_name];
                own.extend(below.take());
                self.register(
                    name.clone(),
                    Node {
                        handle: img.node.clone(),
                        drv: img.format,
                        filename: shown,
                        path: None,
                        read_only: true,
                        implicit: true,
                        owned: own,
                        group: None,
                        desc: json!({"driver": img.format, "file": file_desc}),
                        seq: 0,
                    },
                );
                created.push(name.clone());
                top = name;
            }
            below = Some(top.clone());
        }
        owned.push(top.clone());
        Ok(top)
    }

    /// `blockdev-del`: removes a node added by `blockdev-add` (flushed
    /// first) and the implicit nodes it owns.
    pub fn blockdev_del(&mut self, name: &str) -> QResult<()> {
        let Some(node) = self.nodes.get(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        // QEMU's order (`qmp_blockdev_del`): a BlockBackend on it (an
        // export, also while an intermediate commit's filter sits between
        // them; not while an active commit's filter has taken its users
        // over, as QEMU's BlockBackends are then on the filter), a job,
        // the monitor's ownership, other parents.
        let (implicit, handle) = (node.implicit, node.handle.clone());
        let (node_parents, backend_parents) = self.parents(&handle);
        // (The backends on a node under an active commit's filter are the
        // job's, which QEMU puts on the filter too.)
        let in_use = backend_parents > 0 || self.exports.values().any(|e| e.node == name);
        if in_use && !self.under_job_filter(handle.name()) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        self.check_not_busy(&[handle.name().to_owned()])?;
        if implicit {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if node_parents > 0 {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        self.remove_one(name)
    }

    /// (node parents, backend parents) of `handle`.
    fn parents(&self, handle: &NodeHandle) -> (usize, usize) {
        let h = handle.clone();
        self.main.run(move |bql| {
            let gs = h.gs(bql);
            gs.parents().fold((0, 0), |(n, b), p| match p {
                ParentRef::Node { .. } => (n + 1, b),
                ParentRef::Backend { .. } => (n, b + 1),
            })
        })
    }

    /// Flushes and removes node `name`, then the implicit nodes it owned
    /// that nothing else uses.
    fn remove_one(&mut self, name: &str) -> QResult<()> {
        let Some(node) = self.nodes.get(name) else {
            return Ok(());
        };
        let handle = node.handle.clone();
        let owned = node.owned.clone();
        // Removing does not flush (the node is drained); flush first, as
        // the library asks, so that a qcow2 node's cached metadata is on
        // disk.
        if let Ok(io) = self.io() {
            let h = handle.clone();
            io.spawn(move |mut cx| async move {
                let g = cx.read().await;
                // A flush to close: a qcow2 node stores its persistent
                // dirty bitmaps, as QEMU does when it closes an image.
                h.io(&g).flush_to_close().await
            })
            .join()
            .map_err(|e| QmpError::generic(format!("Flushing '{name}' failed: {e}")))?;
        }
        let h = handle.clone();
        self.main
            .run(move |bql| {
                let drained = bql.drain(&h);
                bql.write(|w| w.remove_node(&drained))
            })
            .map_err(lib_err)?;
        self.nodes.remove(name);
        for child in owned {
            let Some(c) = self.nodes.get(&child) else {
                continue;
            };
            if c.implicit && self.parents(&c.handle) == (0, 0) {
                self.remove_one(&child)?;
            }
        }
        Ok(())
    }

    /// Brings the node table in line with the graph after what jobs and
    /// snapshots did to it: nodes a finished job removed (stream and
    /// commit drop the images they emptied) leave the table, with the
    /// implicit nodes they owned that nothing uses any more (those still
    /// used pass to the removed node's owner); image and file nodes show
    /// the mode the graph gave them (a snapshot's old top read-only, a
    /// commit's base read-write while it runs); exports follow their
    /// backend's root; busy marks of concluded jobs go. Cheap when nothing
    /// changed.
    pub fn reconcile(&mut self) {
        self.forget_finished_jobs();
        let handles: Vec<(String, NodeHandle)> = self
            .nodes
            .iter()
            .map(|(d, n)| (d.clone(), n.handle.clone()))
            .collect();
        let backends: Vec<(String, String)> = self
            .exports
            .keys()
            .map(|id| (id.clone(), format!("storage-daemon-nbd-export.{id}")))
            .collect();
        let (gone, read_only, roots) = self.main.run(move |bql| {
            let gone: Vec<String> = handles
                .iter()
                .filter(|(_, h)| !h.gs(bql).is_in_graph())
                .map(|(d, _)| d.clone())
                .collect();
            let read_only: BTreeMap<String, bool> = bql
                .query_nodes()
                .into_iter()
                .map(|n| (n.name, n.read_only))
                .collect();
            let graph = bql.graph();
            let roots: Vec<(String, String)> = backends
                .iter()
                .filter_map(|(id, b)| {
                    let backend = graph.backends().find(|x| x.name() == b)?;
                    // Below a job's filter is the node the user named.
                    let mut root = backend.root()?;
                    while let Some(below) = root.child(ChildRole::Filtered) {
                        if !handles.iter().any(|(_, h)| h.name() == root.name()) {
                            root = below;
                        } else {
                            break;
                        }
                    }
                    Some((id.clone(), root.name().to_owned()))
                })
                .collect();
            (gone, read_only, roots)
        });
        let mut orphans = Vec::new();
        for name in gone {
            if let Some(node) = self.nodes.remove(&name) {
                // What a removed node owned passes to its owner (commit
                // and stream drop the images between an overlay and the
                // base; the base is the overlay's now), so deleting that
                // owner still deletes the whole chain it opened.
                let heirs: Vec<String> = node
                    .owned
                    .iter()
                    .filter(|o| self.nodes.get(*o).is_some_and(|n| n.implicit))
                    .cloned()
                    .collect();
                for owner in self.nodes.values_mut() {
                    if let Some(at) = owner.owned.iter().position(|o| *o == name) {
                        owner.owned.remove(at);
                        owner.owned.extend(heirs.iter().cloned());
                    }
                }
                orphans.extend(node.owned);
            }
        }
        // The mode of an image or file node is the graph's: a snapshot
        // makes its old top read-only, a commit makes its base read-write
        // while it runs and read-only again after (the library's commit
        // job switches both ways itself). Filters and `raw` accept either
        // mode in the library, so their flag stays what the user opened.
        for node in self.nodes.values_mut() {
            if matches!(node.drv, "qcow2" | "file") {
                if let Some(ro) = read_only.get(node.handle.name()) {
                    node.read_only = *ro;
                }
            }
        }
        for (id, root) in roots {
            let shown = self.display_name(&root);
            if let Some(e) = self.exports.get_mut(&id) {
                e.node = shown;
            }
        }
        // Implicit nodes of removed ones: gone with them, or removed now
        // if nothing else uses them.
        while let Some(name) = orphans.pop() {
            let Some(node) = self.nodes.get(&name) else {
                continue;
            };
            if !node.implicit {
                continue;
            }
            let h = node.handle.clone();
            let in_graph = self.main.run(move |bql| h.gs(bql).is_in_graph());
            if !in_graph {
                if let Some(n) = self.nodes.remove(&name) {
                    orphans.extend(n.owned);
                }
            } else if self.parents(&node.handle.clone()) == (0, 0) {
                let _ = self.remove_one(&name);
            }
        }
    }

    // ---- throttle groups ------------------------------------------------

    /// `object-add qom-type=throttle-group`: a group with `config`.
    pub fn add_throttle_group(&mut self, id: &str, config: ThrottleConfig) -> QResult<()> {
        if self.groups.contains_key(id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let group = ThrottleGroup::new(id, config).map_err(lib_err)?;
        self.groups.insert(id.to_owned(), group);
        Ok(())
    }

    /// `object-del`: removes a throttle group no node uses.
    pub fn del_object(&mut self, id: &str) -> QResult<()> {
        if !self.groups.contains_key(id) {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        }
        if self.nodes.values().any(|n| n.group.as_deref() == Some(id)) {
            return Err(QmpError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.groups.remove(id);
        Ok(())
    }

    // ---- query-named-block-nodes ----------------------------------------

    /// `query-named-block-nodes`: QEMU's `BlockDeviceInfo` for every node,
    /// newest first, with the fields the public API can fill.
    pub fn query_named_block_nodes(&self, flat: bool) -> QResult<Value> {
        // Facts that need I/O (lengths, qcow2 header flags), by graph name.
        let handles: Vec<NodeHandle> = self.nodes.values().map(|n| n.handle.clone()).collect();
        let facts = self
            .io()?
            .spawn(move |mut cx| async move {
                let g = cx.read().await;
                let mut out = BTreeMap::new();
                for h in &handles {
                    let Ok(node) = h.try_io(&g) else { continue };
                    let size = node.length().await.ok();
                    let mut f = Facts {
                        size,
                        ..Facts::default()
                    };
                    if let Some(q) = node.driver_as::<Qcow2Driver>() {
                        f.qcow2 = Some(Qcow2Facts {
                            version: q.version(),
                            backing_file: q.backing_file(),
                            backing_format: q.backing_format(),
                            refcount_bits: q.refcount_bits(),
                            lazy_refcounts: q.lazy_refcounts().await,
                            dirty: q.is_dirty().await,
                            corrupt: q.is_corrupt().await,
                            extended_l2: q.extended_l2().await,
                            compression: q.compression_type(),
                        });
                    }
                    // A filter reports what is below it (QEMU's
                    // bdrv_get_info forwards through filters).
                    let mut below = Some(node);
                    while let Some(n) = below {
                        if let Some(q) = n.driver_as::<Qcow2Driver>() {
                            f.cluster_size = Some(q.cluster_size());
                        }
                        below = n.child(ChildRole::Filtered);
                    }
                    f.backing = node.backing().map(|b| b.name().to_owned());
                    f.bitmaps = node.dirty_bitmaps();
                    // Backing links only (filters do not count), as QEMU.
                    let mut below = node.backing();
                    while let Some(b) = below {
                        f.depth += 1;
                        below = b.backing();
                    }
                    out.insert(h.name().to_owned(), f);
                }
                out
            })
            .join();
        let by_graph: BTreeMap<&str, &str> = self
            .nodes
            .iter()
            .map(|(d, n)| (n.handle.name(), d.as_str()))
            .collect();
        let mut nodes: Vec<(&String, &Node)> = self.nodes.iter().collect();
        nodes.sort_by_key(|(_, n)| std::cmp::Reverse(n.seq));
        let mut list = Vec::new();
        for (name, node) in nodes {
            let Some(f) = facts.get(node.handle.name()) else {
                continue;
            };
            let image = self.image_info(node, f, &facts, &by_graph, !flat);
            // QEMU counts the backing chain only where it walks it, in
            // the nested (not flat) answer.
            let depth = if flat { 0 } else { f.depth };
            let mut info = json!({
                "node-name": name,
                "drv": node.drv,
                "file": node.filename,
                "ro": node.read_only,
                "backing_file_depth": depth,
                "encrypted": false,
                "active": true,
                "detect_zeroes": "off",
                "bps": 0, "bps_rd": 0, "bps_wr": 0,
                "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "write_threshold": 0,
                "cache": {"writeback": true, "direct": false, "no-flush": false},
                "image": image,
            });
            if let Some(b) = f.qcow2.as_ref().and_then(|q| q.backing_file.clone()) {
                info["backing_file"] = Value::String(b);
            }
            // Newest first, and only when there are any, as QEMU.
            if !f.bitmaps.is_empty() {
                info["dirty-bitmaps"] =
                    Value::Array(f.bitmaps.iter().rev().map(bitmaps::bitmap_json).collect());
            }
            list.push(info);
        }
        Ok(Value::Array(list))
    }

    /// QEMU's `ImageInfo` of `node`, with the backing image's nested when
    /// `deep`.
    fn image_info(
        &self,
        node: &Node,
        f: &Facts,
        facts: &BTreeMap<String, Facts>,
        by_graph: &BTreeMap<&str, &str>,
        deep: bool,
    ) -> Value {
        let mut image = json!({
            "filename": node.filename,
            "format": node.drv,
            "dirty-flag": false,
        });
        if let Some(size) = f.size {
            // QEMU counts lengths in 512-byte sectors, rounded up.
            image["virtual-size"] = json!(size.div_ceil(512) * 512);
        }
        if let Some(actual) = self.actual_size(node) {
            image["actual-size"] = json!(actual);
        }
        if node.drv == "file" {
            image["format-specific"] = json!({"type": "file", "data": {}});
        }
        if let Some(c) = f.cluster_size {
            image["cluster-size"] = json!(c);
        }
        if let Some(q) = &f.qcow2 {
            image["dirty-flag"] = json!(q.dirty);
            image["format-specific"] = json!({
                "type": "qcow2",
                "data": {
                    "compat": if q.version >= 3 { "1.1" } else { "0.10" },
                    "compression-type": q.compression,
                    "lazy-refcounts": q.lazy_refcounts,
                    "refcount-bits": q.refcount_bits,
                    "corrupt": q.corrupt,
                    "extended-l2": q.extended_l2,
                }
            });
            if let Some(b) = &q.backing_file {
                image["backing-filename"] = json!(b);
                let full = node
                    .path
                    .as_deref()
                    .or_else(|| {
                        // The file child's path.
                        node.owned
                            .iter()
                            .filter_map(|o| self.nodes.get(o))
                            .find_map(|n| n.path.as_deref())
                    })
                    .and_then(|p| p.parent())
                    .map(|dir| dir.join(b).display().to_string())
                    .unwrap_or_else(|| b.clone());
                image["full-backing-filename"] = json!(full);
                if let Some(fmt) = &q.backing_format {
                    image["backing-filename-format"] = json!(fmt);
                }
            }
        }
        if deep {
            let below = f
                .backing
                .as_deref()
                .and_then(|g| Some((by_graph.get(g)?, facts.get(g)?)));
            if let Some((name, bf)) = below {
                if let Some(bnode) = self.nodes.get(*name) {
                    image["backing-image"] = self.image_info(bnode, bf, facts, by_graph, true);
                }
            }
        }
        image
    }

    /// Bytes the host allocated for the node's file (its own, or its file
    /// child's for a format or filter node).
    fn actual_size(&self, node: &Node) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = match &node.path {
            Some(p) => p.clone(),
            None => {
                let own = node.owned.iter().filter_map(|o| self.nodes.get(o));
                let mut found = None;
                for n in own {
                    if n.path.is_some() && n.filename == node.filename {
                        found = n.path.clone();
                        break;
                    }
                }
                match found {
                    Some(p) => p,
                    None => self
                        .nodes
                        .values()
                        .find(|n| n.drv == "file" && n.filename == node.filename)?
                        .path
                        .clone()?,
                }
            }
        };
        std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
    }

    // ---- NBD ------------------------------------------------------------

    /// `nbd-server-start`.
    pub fn nbd_server_start(&mut self, addr: NbdAddr) -> QResult<()> {
        if self.nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let server = NbdServer::with_threads(&self.main, self.nbd_threads).map_err(lib_err)?;
        let listener = match addr {
            NbdAddr::Unix(path) => {
                // QEMU replaces a stale socket file.
                if std::fs::symlink_metadata(&path)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(&path);
                }
                server.listen_unix(&path).map_err(|e| {
                    QmpError::generic(format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        os_message(&e)
                    ))
                })?
            }
            NbdAddr::Inet(host, port) => {
                use std::net::ToSocketAddrs;
                let sa = (host.as_str(), port.parse::<u16>().unwrap_or(u16::MAX))
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .filter(|_| port.parse::<u16>().is_ok())
                    .ok_or_else(|| {
                        QmpError::generic(format!("address resolution failed for {host}:{port}"))
                    })?;
                server.listen_tcp(sa).map_err(|e| {
                    QmpError::generic(format!("Failed to bind socket: {}", os_message(&e)))
                })?
            }
        };
        self.nbd = Some(Nbd { server, listener });
        Ok(())
    }

    /// `nbd-server-stop`: ends the connections (after their requests in
    /// flight), then deletes every export.
    pub fn nbd_server_stop(&mut self) -> QResult<()> {
        let Some(nbd) = self.nbd.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        nbd.listener.shutdown();
        nbd.server.shutdown();
        let ids: Vec<String> = self.exports.keys().cloned().collect();
        for id in ids {
            self.delete_export(&id)?;
        }
        Ok(())
    }

    /// `block-export-add type=nbd`.
    pub fn block_export_add(&mut self, spec: ExportSpec) -> QResult<()> {
        if !crate::blockdev::valid_node_name(&spec.id) && !valid_id(&spec.id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if self.exports.contains_key(&spec.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                spec.id
            )));
        }
        let Some(node) = self.nodes.get(&spec.node) else {
            return Err(QmpError::generic(format!(
                "Cannot find device='' nor node-name='{}'",
                spec.node
            )));
        };
        let Some(nbd) = &self.nbd else {
            return Err(QmpError::generic("NBD server not running"));
        };
        let name = spec.name.clone().unwrap_or_else(|| spec.node.clone());
        if nbd.server.export_names().contains(&name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if spec.writable && node.read_only {
            return Err(QmpError::generic(format!(
                "Cannot export read-only node '{}' as writable",
                spec.node
            )));
        }
        // QEMU's export takes what it needs and shares everything.
        let take = if spec.writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        let opts = BackendOptions::with_perms(Permissions {
            take,
            share: Perm::ALL,
        });
        let backend_name = format!("storage-daemon-nbd-export.{}", spec.id);
        let root = node.handle.clone();
        let backend = self
            .main
            .run(move |bql| bql.write(|w| w.add_backend(&backend_name, &root, opts)))
            .map_err(lib_err)?;
        let added = nbd.server.add_export(ExportOptions {
            name: name.clone(),
            description: spec.description.clone(),
            backend: backend.clone(),
            read_only: !spec.writable,
        });
        if let Err(e) = added {
            let b = backend.clone();
            let _ = self
                .main
                .run(move |bql| bql.write(|w| w.remove_backend(&b)));
            return Err(lib_err(e));
        }
        self.exports.insert(
            spec.id.clone(),
            Export {
                name,
                node: spec.node,
                backend,
                closing: false,
            },
        );
        Ok(())
    }

    /// `block-export-del`, QEMU's `qmp_block_export_del`: `safe` refuses
    /// while clients are connected; `hard` ends their connections (after
    /// the replies of their requests in flight) and deletes the export once
    /// the last one is gone, which may be after the command returns: until
    /// then the export shows `shutting-down` and its id stays taken.
    pub fn block_export_del(&mut self, id: &str, hard: bool) -> QResult<()> {
        let Some(export) = self.exports.get(id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        if export.closing {
            return Err(QmpError::generic(format!(
                "Export '{id}' is already shutting down"
            )));
        }
        let Some(nbd) = &self.nbd else {
            return self.delete_export(id);
        };
        let mode = if hard {
            RemoveMode::Hard
        } else {
            RemoveMode::Safe
        };
        let removal = match nbd.server.remove_export_with(&export.name, mode) {
            Ok(removal) => removal,
            // (QEMU adds the hint "Use mode='hard' to force client
            // disconnect", which QMP does not carry.)
            Err(RemoveExportError::InUse { .. }) => {
                return Err(QmpError::generic(format!("export '{id}' still in use")))
            }
            Err(RemoveExportError::NotFound(_)) => return self.delete_export(id),
        };
        if removal.connections() == 0 {
            return self.delete_export(id);
        }
        if let Some(e) = self.exports.get_mut(id) {
            e.closing = true;
        }
        // The connections end on the server's threads; once the last one
        // has, the executor deletes the export (drain, backend, event).
        let removal = Arc::new(removal);
        let (queue, waited) = (self.later.clone(), removal.clone());
        let owned_id = id.to_owned();
        let waiter = std::thread::Builder::new()
            .name("export-del".into())
            .spawn(move || {
                let id = owned_id;
                waited.wait();
                if let Some(queue) = queue.and_then(|q| q.upgrade()) {
                    let _ = queue.send(crate::qmp::Msg::Later(Box::new(move |d: &mut Daemon| {
                        d.export_closed(&id)
                    })));
                }
            });
        if waiter.is_err() {
            // No thread: wait here (the requests in flight, and at most
            // the server's grace for a client that does not read them).
            removal.wait();
            return self.delete_export(id);
        }
        Ok(())
    }

    /// The last connection of export `id`, removed with `mode=hard`, is
    /// gone: delete it (unless `nbd-server-stop` or shutdown already did).
    fn export_closed(&mut self, id: &str) {
        if self.exports.get(id).is_some_and(|e| e.closing) {
            let _ = self.delete_export(id);
        }
    }

    /// Unpublishes export `id` (unless a hard removal already did), waits
    /// for its requests in flight (a drain of its node), removes its
    /// backend and emits `BLOCK_EXPORT_DELETED`.
    fn delete_export(&mut self, id: &str) -> QResult<()> {
        let Some(export) = self.exports.remove(id) else {
            return Ok(());
        };
        if let (Some(nbd), false) = (&self.nbd, export.closing) {
            // (A closing export's name may be another export's by now.)
            nbd.server.remove_export(&export.name);
        }
        let backend = export.backend.clone();
        let removed = self.main.run(move |bql| {
            // The backend's root now (a snapshot or a job may have moved
            // it since the export was added).
            let root = bql
                .graph()
                .backends()
                .find(|b| b.name() == backend.name())
                .and_then(|b| b.root())
                .map(|r| r.to_handle());
            let _drained = root.as_ref().map(|r| bql.drain(r));
            bql.write(|w| w.remove_backend(&backend))
        });
        self.events
            .emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        removed.map_err(lib_err)
    }

    /// `query-block-exports`.
    pub fn query_block_exports(&self) -> Value {
        Value::Array(
            self.exports
                .iter()
                .map(|(id, e)| {
                    json!({"id": id, "type": "nbd", "node-name": e.node,
                        "shutting-down": e.closing})
                })
                .collect(),
        )
    }

    // ---- shutdown -------------------------------------------------------

    /// Closes the exports (connections end after their requests in flight
    /// are answered), flushes every node (users first) and stops the graph.
    /// Returns the flush failures, if any, as messages.
    pub fn shutdown(&mut self) -> Vec<String> {
        // Jobs first, as qemu-storage-daemon cancels them on exit: their
        // filters and backends leave the graph before anything is flushed.
        let mut problems = self.cancel_all_jobs();
        drop(self.jobs_io.take());
        if self.nbd.is_some() {
            if let Err(e) = self.nbd_server_stop() {
                problems.push(e.desc);
            }
        }
        if let Some(io) = self.io.take() {
            let flushed = io
                .spawn(|mut cx| async move {
                    let g = cx.read().await;
                    // Users first: a format node writes its metadata to its
                    // file when flushed, so each node is flushed before its
                    // children (its depth is its longest path from a root).
                    let nodes: Vec<_> = g.graph().nodes().collect();
                    let mut order: Vec<(usize, _)> = nodes
                        .iter()
                        .map(|n| {
                            let mut depth = 0;
                            let mut frontier = vec![*n];
                            while !frontier.is_empty() && depth < nodes.len() {
                                frontier = frontier
                                    .iter()
                                    .flat_map(|x| x.parents())
                                    .filter_map(|p| match p {
                                        ParentRef::Node { node, .. } => Some(node),
                                        ParentRef::Backend { .. } => None,
                                    })
                                    .collect();
                                if !frontier.is_empty() {
                                    depth += 1;
                                }
                            }
                            (depth, *n)
                        })
                        .collect();
                    order.sort_by_key(|(d, _)| *d);
                    let mut errors = Vec::new();
                    for (_, n) in order {
                        if let Err(e) = n.flush().await {
                            errors.push(format!("flushing node '{}' failed: {e}", n.name()));
                        }
                    }
                    errors
                })
                .join();
            problems.extend(flushed);
            drop(io);
        }
        self.nodes.clear();
        self.groups.clear();
        // Flushes every node again, users first, and stops the main loop.
        self.main.shutdown();
        problems
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub(crate) fn valid_id(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// What `query-named-block-nodes` reads from a node under the read lock.
#[derive(Default)]
struct Facts {
    size: Option<u64>,
    /// The qcow2 cluster size, of this node or the one below its filters.
    cluster_size: Option<u64>,
    qcow2: Option<Qcow2Facts>,
    backing: Option<String>,
    depth: usize,
    /// Its dirty bitmaps, oldest first.
    bitmaps: Vec<blockgraph::DirtyBitmapInfo>,
}

struct Qcow2Facts {
    version: u32,
    backing_file: Option<String>,
    backing_format: Option<String>,
    refcount_bits: u32,
    lazy_refcounts: bool,
    dirty: bool,
    corrupt: bool,
    extended_l2: bool,
    compression: &'static str,
}
