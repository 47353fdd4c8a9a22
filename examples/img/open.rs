//! Opening images and stacks (and creating new images) on an I/O thread
//! of a main loop that lives as long as the subcommand.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockgraph::driver::BlockDriver;
use blockgraph::drivers::qcow2::{
    open_image_chain, BackingPolicy, ChainOptions, CreateOptions, FileOpener, Qcow2Driver,
};
use blockgraph::drivers::Preallocation;
use blockgraph::drivers::{
    CopyOnRead, FaultInjector, FileDriver, FileOptions, MemoryDriver, NullDriver, RawDriver,
    ThrottleDriver,
};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, IoTask, IoThread, MainLoop, NodeHandle, Perm,
    Permissions,
};

use crate::args::Common;
use crate::output::{err, Res};
use crate::stack::{FileLayer, Layer};

/// How images are opened.
#[derive(Clone)]
pub struct OpenPolicy {
    pub writable: bool,
    pub force_share: bool,
    pub allow_absolute: bool,
    /// Flushes of the files end at the page cache (`convert -t unsafe`).
    pub no_flush: bool,
}

impl OpenPolicy {
    pub fn new(common: &Common, writable: bool) -> Self {
        OpenPolicy {
            writable,
            force_share: common.force_share,
            allow_absolute: common.allow_absolute,
            no_flush: false,
        }
    }

    pub fn file_options(&self, layer: FileLayer, writable: bool) -> FileOptions {
        FileOptions {
            read_only: !writable,
            direct: layer.direct,
            locking: !layer.no_locking,
            share_writes: self.force_share,
            aio: layer.aio,
            no_flush: self.no_flush,
            ..FileOptions::default()
        }
    }

    pub fn backing_policy(&self) -> BackingPolicy {
        let mut p = BackingPolicy::default();
        p.allow_absolute = self.allow_absolute;
        p.allow_escape = self.allow_absolute;
        p
    }
}

/// One image of an opened chain (the top image first).
pub struct OpenedImage {
    pub path: PathBuf,
    pub format: &'static str,
    /// The format node.
    pub node: NodeHandle,
    /// The protocol node under it (the node itself for a bare file).
    pub file: NodeHandle,
}

/// What a stack opened: its top node and, for a file, the image chain.
pub struct Opened {
    pub top: NodeHandle,
    pub images: Vec<OpenedImage>,
}

/// Adds a node on the main loop, with `child` below it.
pub async fn add_node(
    cx: &mut IoTask,
    name: String,
    driver: Box<dyn BlockDriver>,
    child: Option<(ChildRole, NodeHandle)>,
) -> Res<NodeHandle> {
    cx.run_on_main_loop(move |bql| {
        bql.write(|w| {
            let kids: Vec<(ChildRole, &NodeHandle)> = child.iter().map(|(r, h)| (*r, h)).collect();
            w.add_node_boxed(&name, driver, &kids)
        })
    })
    .await
    .map_err(err)?
    .map_err(err)
}

/// Opens `layers` (bottom: `path`) on the calling I/O thread. Node names
/// start with `prefix`.
async fn open_stack(
    cx: &mut IoTask,
    layers: &[Layer],
    path: Option<&Path>,
    policy: &OpenPolicy,
    prefix: &str,
) -> Res<Opened> {
    let need_path = || path.ok_or_else(|| "this stack needs a FILE argument".to_string());
    let n = layers.len();
    let mut images = Vec::new();
    // Bottom (and the qcow2 chain above a file).
    let (mut below, mut start) = match (&layers[n - 1], n.checked_sub(2).map(|i| &layers[i])) {
        #[cfg(feature = "nbd-client")]
        (Layer::File(_), above) if nbd::is_nbd(path) => {
            let (top, used) =
                nbd::open(cx, need_path()?, above, policy, prefix, &mut images).await?;
            (top, n - used)
        }
        (Layer::File(f), Some(Layer::Qcow2)) => {
            let path = need_path()?;
            let mut opts = ChainOptions::new(format!("{prefix}qcow2"));
            opts.writable = policy.writable;
            opts.policy = policy.backing_policy();
            let (p, f) = (policy.clone(), *f);
            let opener: FileOpener = Arc::new(move |path: &Path, writable: bool| {
                if let Some(rbd) = rbd_driver(path, writable) {
                    return rbd;
                }
                Ok(
                    Box::new(FileDriver::open(path, p.file_options(f, writable))?)
                        as Box<dyn BlockDriver>,
                )
            });
            opts.opener = Some(opener);
            let chain = open_image_chain(cx, path, opts).await.map_err(err)?;
            for img in &chain.images {
                images.push(OpenedImage {
                    path: img.path.clone(),
                    format: img.format,
                    node: img.node.clone(),
                    file: img.file.clone(),
                });
            }
            (chain.top().clone(), n - 2)
        }
        (Layer::File(f), _) => {
            let path = need_path()?;
            let drv: Box<dyn BlockDriver> = match rbd_driver(path, policy.writable) {
                Some(rbd) => rbd.map_err(err)?,
                None => Box::new(
                    FileDriver::open(path, policy.file_options(*f, policy.writable))
                        .map_err(err)?,
                ),
            };
            let node = add_node(cx, format!("{prefix}file"), drv, None).await?;
            images.push(OpenedImage {
                path: path.to_owned(),
                format: "raw",
                node: node.clone(),
                file: node.clone(),
            });
            (node, n - 1)
        }
        (Layer::Null { size, delay }, _) => {
            if path.is_some() {
                return Err("a stack ending in null takes no FILE argument".into());
            }
            let drv = NullDriver::new(*size).with_delay(*delay);
            (
                add_node(cx, format!("{prefix}null"), Box::new(drv), None).await?,
                n - 1,
            )
        }
        (Layer::Memory(size), _) => {
            if path.is_some() {
                return Err("a stack ending in memory takes no FILE argument".into());
            }
            let drv = MemoryDriver::new(*size);
            (
                add_node(cx, format!("{prefix}memory"), Box::new(drv), None).await?,
                n - 1,
            )
        }
        _ => return Err("the stack has no protocol layer at the bottom".into()),
    };
    while start > 0 {
        start -= 1;
        let layer = &layers[start];
        let (driver, role): (Box<dyn BlockDriver>, ChildRole) = match layer {
            Layer::Throttle(cfg) => (
                Box::new(
                    ThrottleDriver::with_config(&format!("{prefix}group{start}"), *cfg)
                        .map_err(err)?,
                ),
                ChildRole::Filtered,
            ),
            Layer::Cor => (Box::new(CopyOnRead::new()), ChildRole::Filtered),
            Layer::Fault(rule) => {
                let f = FaultInjector::new();
                f.add_rule(*rule).map_err(err)?;
                (Box::new(f), ChildRole::Filtered)
            }
            Layer::Raw(offset, size) => (
                Box::new(RawDriver::with_window(*offset, *size).map_err(err)?),
                ChildRole::File,
            ),
            other => return Err(format!("'{}' cannot sit above another layer", other.name())),
        };
        let name = format!("{prefix}{}{start}", layer.name());
        below = add_node(cx, name, driver, Some((role, below))).await?;
    }
    Ok(Opened { top: below, images })
}

/// NBD file names (`nbd://`, `nbd+unix://`, `nbd:`) at the bottom of a
/// stack: an `nbd` node, with a `qcow2` node over it when the stack has
/// one (the export then serves the qcow2 file's bytes).
#[cfg(feature = "nbd-client")]
mod nbd {
    use std::path::Path;

    use blockgraph::drivers::qcow2::{Qcow2Driver, Qcow2Options};
    use blockgraph::drivers::{NbdDriver, NbdOptions};
    use blockgraph::{ChildRole, IoTask, NodeHandle};

    use super::{add_node, OpenPolicy, OpenedImage};
    use crate::output::{err, Res};
    use crate::stack::Layer;

    /// Whether `path` is an NBD file name.
    pub fn is_nbd(path: Option<&Path>) -> bool {
        path.and_then(Path::to_str)
            .is_some_and(NbdOptions::is_nbd_filename)
    }

    /// Opens the nbd node (and a qcow2 node over it when `above` is
    /// qcow2); the top node and the index of the next layer up.
    pub async fn open(
        cx: &mut IoTask,
        path: &Path,
        above: Option<&Layer>,
        policy: &OpenPolicy,
        prefix: &str,
        images: &mut Vec<OpenedImage>,
    ) -> Res<(NodeHandle, usize)> {
        let uri = path.to_str().unwrap_or_default();
        let opts = NbdOptions::parse_uri(uri)
            .map_err(err)?
            .read_only(!policy.writable);
        let drv = NbdDriver::connect_async(opts).await.map_err(err)?;
        let node = add_node(cx, format!("{prefix}nbd"), Box::new(drv), None).await?;
        let mut used = 1;
        let mut top = node.clone();
        let mut format = "raw";
        if matches!(above, Some(Layer::Qcow2)) {
            let mut o = Qcow2Options::default();
            o.read_only = !policy.writable;
            let q = {
                let g = cx.read().await;
                Qcow2Driver::open(node.io(&g), o).await.map_err(err)?
            };
            let child = Some((ChildRole::File, node.clone()));
            top = add_node(cx, format!("{prefix}qcow2"), Box::new(q), child).await?;
            used = 2;
            format = "qcow2";
        }
        images.push(OpenedImage {
            path: path.to_owned(),
            format,
            node: top.clone(),
            file: node,
        });
        Ok((top, used))
    }
}

/// An `rbd:pool/image[@snap][:opt=val...]` path (QEMU's file name syntax)
/// opened as an RBD image, or `None` for any other path.
#[cfg(feature = "rbd")]
pub fn rbd_driver(path: &Path, writable: bool) -> Option<blockgraph::Result<Box<dyn BlockDriver>>> {
    use blockgraph::drivers::{RbdDriver, RbdOptions};
    let name = path.to_str().filter(|s| s.starts_with("rbd:"))?;
    Some(RbdOptions::parse_filename(name).and_then(|mut o| {
        o.read_only = !writable;
        Ok(Box::new(RbdDriver::open(o)?) as Box<dyn BlockDriver>)
    }))
}

/// An `rbd:` path created as a new RBD image of `size` bytes and opened,
/// or `None` for any other path.
#[cfg(feature = "rbd")]
pub fn rbd_create(path: &Path, size: u64) -> Option<blockgraph::Result<Box<dyn BlockDriver>>> {
    use blockgraph::drivers::{RbdDriver, RbdOptions};
    let name = path.to_str().filter(|s| s.starts_with("rbd:"))?;
    Some(
        RbdOptions::parse_filename(name)
            .and_then(|o| Ok(Box::new(RbdDriver::create(o, size)?) as Box<dyn BlockDriver>)),
    )
}

/// Without the `rbd` feature an `rbd:` path is refused.
#[cfg(not(feature = "rbd"))]
pub fn rbd_create(path: &Path, _size: u64) -> Option<blockgraph::Result<Box<dyn BlockDriver>>> {
    rbd_driver(path, true)
}

/// `name` as it may be printed: an `rbd:` name without its credentials
/// (the key, secrets; QEMU's syntax lets a file name carry them), any
/// other name as it is.
pub fn shown_name(name: &str) -> String {
    #[cfg(feature = "rbd")]
    if name.starts_with("rbd:") {
        return blockgraph::drivers::RbdOptions::parse_filename(name)
            .map(|o| o.display_name())
            .unwrap_or_else(|_| "rbd:<unparsable>".into());
    }
    name.to_owned()
}

/// Without the `rbd` feature an `rbd:` path is refused, not taken for a
/// local file name.
#[cfg(not(feature = "rbd"))]
pub fn rbd_driver(
    path: &Path,
    _writable: bool,
) -> Option<blockgraph::Result<Box<dyn BlockDriver>>> {
    let name = path.to_str().filter(|s| s.starts_with("rbd:"))?;
    let _ = name;
    Some(Err(blockgraph::Error::InvalidArgument(
        "rbd: images need the img tool built with the `rbd` cargo feature".into(),
    )))
}

/// Creates `path` as a new image of `size` bytes, raw or (with `qcow2`)
/// formatted as qcow2 and flushed, and adds its file node `name` on the
/// calling I/O thread. A file that cannot be formatted is removed again.
/// `raw_prealloc` is a raw image's preallocation (a qcow2 image's is in
/// `qcow2`).
pub async fn create_image(
    cx: &mut IoTask,
    name: &str,
    path: &Path,
    size: u64,
    qcow2: Option<&CreateOptions>,
    file_options: FileOptions,
    raw_prealloc: Preallocation,
) -> Res<NodeHandle> {
    let length = if qcow2.is_some() { 0 } else { size };
    // A raw image's preallocation is its file's; a qcow2 image's is made
    // by the qcow2 driver over a file created empty.
    let prealloc = match qcow2 {
        Some(_) => Preallocation::Off,
        None => raw_prealloc,
    };
    // An `rbd:` image is created in its pool (qcow2 grows it as it
    // allocates) and left there if formatting fails, as qemu-img does.
    let (file, local): (Box<dyn BlockDriver>, bool) = match rbd_create(path, length) {
        Some(_) if prealloc != Preallocation::Off => {
            return Err(format!(
                "preallocation={prealloc} is not supported for a raw rbd image"
            ))
        }
        Some(rbd) => (rbd.map_err(err)?, false),
        None => (
            Box::new(
                FileDriver::create_preallocated(path, length, file_options, prealloc)
                    .map_err(err)?,
            ),
            true,
        ),
    };
    let formatted = async {
        let node = add_node(cx, name.to_owned(), file, None).await?;
        let g = cx.read().await;
        if let Some(opts) = qcow2 {
            Qcow2Driver::create(node.io(&g), opts).await.map_err(err)?;
        }
        node.io(&g).flush().await.map_err(err)?;
        drop(g);
        Ok(node)
    }
    .await;
    if formatted.is_err() && local {
        let _ = std::fs::remove_file(path);
    }
    formatted
}

/// A main loop with I/O threads; removes everything on drop.
pub struct Env {
    pub main: MainLoop,
    pub threads: Vec<IoThread>,
}

impl Env {
    pub fn new(threads: usize) -> Res<Env> {
        let main = MainLoop::new().map_err(err)?;
        let threads = (0..threads)
            .map(|i| main.new_io_thread(&format!("io{i}")).map_err(err))
            .collect::<Res<Vec<_>>>()?;
        Ok(Env { main, threads })
    }

    /// Runs `f` on the first I/O thread and waits for it.
    pub fn io<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(IoTask) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.threads[0].spawn(f).join()
    }

    /// A backend on `node`: a writer that shares nothing, or a reader that
    /// shares everything.
    pub fn backend(&self, name: &str, node: &NodeHandle, writable: bool) -> Res<BlockBackend> {
        let opts = if writable {
            BackendOptions::with_perms(Permissions::EXCLUSIVE_WRITER)
        } else {
            BackendOptions::with_perms(Permissions {
                take: Perm::CONSISTENT_READ,
                share: Perm::ALL,
            })
        };
        self.backend_with(name, node, opts)
    }

    /// A backend on `node` with `opts`.
    pub fn backend_with(
        &self,
        name: &str,
        node: &NodeHandle,
        opts: BackendOptions,
    ) -> Res<BlockBackend> {
        let (name, node) = (name.to_owned(), node.clone());
        self.main
            .run(move |bql| bql.write(|w| w.add_backend(&name, &node, opts)))
            .map_err(err)
    }

    /// Opens an image (or stack) on the first I/O thread.
    pub fn open(
        &self,
        layers: Vec<Layer>,
        path: Option<PathBuf>,
        policy: OpenPolicy,
        prefix: &'static str,
    ) -> Res<Opened> {
        self.io(move |mut cx| async move {
            open_stack(&mut cx, &layers, path.as_deref(), &policy, prefix).await
        })
    }

    /// The length of `node` in bytes.
    pub fn length(&self, node: &NodeHandle) -> Res<u64> {
        let node = node.clone();
        self.io(move |mut cx| async move {
            let g = cx.read().await;
            node.io(&g).length().await.map_err(err)
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.threads.clear();
        self.main.shutdown();
    }
}
