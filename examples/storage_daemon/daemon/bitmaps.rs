//! Dirty bitmaps on the daemon's nodes: QEMU's `block-dirty-bitmap-*`
//! checks, in QEMU's order and words (`block/monitor/bitmap-qmp-cmds.c`,
//! `bdrv_dirty_bitmap_check`), over the library's `NodeRef` verbs, which
//! run on the main loop. The bits themselves are the library's: every
//! write that completes on a node marks its enabled bitmaps; a qcow2
//! node's persistent bitmaps are loaded at open and stored when it is
//! closed (`flush_to_close`: `blockdev-del`, shutdown).

use blockgraph::drivers::qcow2::Qcow2Driver;
use blockgraph::{DirtyBitmapInfo, DirtyBitmapOptions, NodeHandle};
use serde_json::{json, Value};

use super::Daemon;
use crate::opts::{lib_err, QResult, QmpError};

/// `block-dirty-bitmap-add`'s arguments.
#[derive(Debug)]
pub struct BitmapAdd {
    /// `node`.
    pub node: String,
    /// `name`.
    pub name: String,
    /// `granularity` (bytes; default: the image's cluster size, clamped
    /// to 4 KiB..64 KiB, as QEMU).
    pub granularity: Option<u64>,
    /// `persistent`.
    pub persistent: bool,
    /// `disabled`.
    pub disabled: bool,
}

/// A verb on one bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapVerb {
    /// `block-dirty-bitmap-remove`.
    Remove,
    /// `block-dirty-bitmap-clear`.
    Clear,
    /// `block-dirty-bitmap-enable`.
    Enable,
    /// `block-dirty-bitmap-disable`.
    Disable,
}

/// A merge source: bitmap `name` of node `node`.
#[derive(Debug, Clone)]
pub struct BitmapRef {
    /// The node (QMP name).
    pub node: String,
    /// The bitmap.
    pub name: String,
}

/// QEMU's longest bitmap name (`BDRV_BITMAP_MAX_NAME_SIZE`).
const MAX_NAME: usize = 1023;

/// QEMU's words for what the library refuses.
pub(super) fn bitmap_err(e: blockgraph::Error) -> QmpError {
    match e {
        blockgraph::Error::NoSuchBitmap { bitmap, .. } => {
            QmpError::generic(format!("Dirty bitmap '{bitmap}' not found"))
        }
        blockgraph::Error::BitmapExists { bitmap, .. } => {
            QmpError::generic(format!("Bitmap already exists: {bitmap}"))
        }
        blockgraph::Error::BitmapBusy(name) => QmpError::generic(format!(
            "Bitmap '{name}' is currently in use by another operation and cannot be used"
        )),
        blockgraph::Error::BitmapInconsistent(name) => QmpError::generic(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        )),
        e => lib_err(e),
    }
}

/// QEMU's `bdrv_dirty_bitmap_check` on a listed bitmap: busy first, then
/// inconsistent (if `inconsistent_too`).
fn check(info: &DirtyBitmapInfo, inconsistent_too: bool) -> QResult<()> {
    if info.busy {
        return Err(bitmap_err(blockgraph::Error::BitmapBusy(info.name.clone())));
    }
    if inconsistent_too && info.inconsistent {
        return Err(bitmap_err(blockgraph::Error::BitmapInconsistent(
            info.name.clone(),
        )));
    }
    Ok(())
}

/// QEMU's `BlockDirtyInfo`.
pub(super) fn bitmap_json(info: &DirtyBitmapInfo) -> Value {
    let mut v = json!({
        "name": info.name,
        "recording": info.enabled,
        "persistent": info.persistent,
        "busy": info.busy,
        "granularity": info.granularity,
        "count": info.count,
    });
    if info.inconsistent {
        v["inconsistent"] = json!(true);
    }
    v
}

impl Daemon {
    /// The node QMP calls `name`, for the bitmap verbs ("Node 'x' not
    /// found", QEMU's `block_dirty_bitmap_lookup`).
    fn bitmap_node(&self, name: &str) -> QResult<NodeHandle> {
        self.nodes
            .get(name)
            .map(|n| n.handle.clone())
            .ok_or_else(|| QmpError::generic(format!("Node '{name}' not found")))
    }

    /// The length of `node` (QEMU's bitmap size), read on the I/O thread.
    pub(super) fn node_length(&self, node: &NodeHandle) -> QResult<u64> {
        let h = node.clone();
        self.io()?
            .spawn(move |mut cx| async move {
                let g = cx.read().await;
                h.try_io(&g)?.length().await
            })
            .join()
            .map_err(lib_err)
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(&mut self, spec: BitmapAdd) -> QResult<()> {
        if spec.name.is_empty() {
            return Err(QmpError::generic("Bitmap name cannot be empty"));
        }
        let node = self.lookup(&spec.node, &spec.node)?;
        if let Some(g) = spec.granularity {
            if g < 512 || !g.is_power_of_two() {
                return Err(QmpError::generic(
                    "Granularity must be power of 2 and at least 512",
                ));
            }
        }
        let shown = spec.node.clone();
        self.main.run(move |bql| {
            let n = node.gs(bql);
            // QEMU's `bdrv_get_default_bitmap_granularity`: the
            // cluster size within 4 KiB..64 KiB, else 64 KiB.
            let granularity = spec.granularity.unwrap_or_else(|| {
                n.driver_as::<Qcow2Driver>()
                    .map(|q| q.cluster_size().clamp(4096, 65536))
                    .unwrap_or(65536)
            });
            if spec.persistent {
                if let Err(e) = n.driver().can_store_dirty_bitmap(&spec.name, granularity) {
                    return Err(if n.driver_as::<Qcow2Driver>().is_some() {
                        QmpError::generic(format!(
                            "Can't make bitmap '{}' persistent in '{shown}': {e}",
                            spec.name
                        ))
                    } else {
                        QmpError::generic(format!(
                            "Can't store persistent bitmaps to {shown}: Operation not supported"
                        ))
                    });
                }
            }
            if n.dirty_bitmaps().iter().any(|b| b.name == spec.name) {
                return Err(bitmap_err(blockgraph::Error::BitmapExists {
                    node: shown,
                    bitmap: spec.name,
                }));
            }
            if spec.name.len() > MAX_NAME {
                return Err(QmpError::generic(format!(
                    "Bitmap name too long: {}",
                    spec.name
                )));
            }
            let options = DirtyBitmapOptions::new()
                .granularity(granularity)
                .persistent(spec.persistent)
                .disabled(spec.disabled);
            n.add_dirty_bitmap(&spec.name, options).map_err(bitmap_err)
        })
    }

    /// `block-dirty-bitmap-remove`, `-clear`, `-enable`, `-disable`.
    pub fn bitmap_verb(&mut self, node: &str, name: &str, verb: BitmapVerb) -> QResult<()> {
        let handle = self.bitmap_node(node)?;
        let name = name.to_owned();
        self.main.run(move |bql| {
            let n = handle.gs(bql);
            let Some(info) = n.dirty_bitmaps().into_iter().find(|b| b.name == name) else {
                return Err(QmpError::generic(format!(
                    "Dirty bitmap '{name}' not found"
                )));
            };
            // An inconsistent bitmap can only be removed.
            check(&info, verb != BitmapVerb::Remove)?;
            match verb {
                BitmapVerb::Remove => n.remove_dirty_bitmap(&name),
                BitmapVerb::Clear => n.clear_dirty_bitmap(&name),
                BitmapVerb::Enable => n.enable_dirty_bitmap(&name),
                BitmapVerb::Disable => n.disable_dirty_bitmap(&name),
            }
            .map_err(bitmap_err)
        })
    }

    /// `block-dirty-bitmap-merge`: every source is looked up and checked,
    /// in order, before anything is merged, so a refused merge leaves the
    /// target as it was (QEMU merges into an anonymous bitmap first for
    /// the same reason). An empty list merges nothing (qemu-storage-daemon
    /// 10.0.2 crashes on it).
    pub fn bitmap_merge(&mut self, node: &str, target: &str, sources: &[BitmapRef]) -> QResult<()> {
        let handle = self.bitmap_node(node)?;
        // Each source's node and its length, or the error its lookup
        // gives, in order. QEMU's bitmaps are as long as their node; the
        // library's are for nodes whose driver reports a size, and grow
        // with the writes they record otherwise (raw), so the lengths
        // QEMU compares are the nodes'.
        let resolved: Vec<(QResult<(NodeHandle, u64)>, String)> = sources
            .iter()
            .map(|s| {
                let node = self
                    .bitmap_node(&s.node)
                    .and_then(|h| Ok((h.clone(), self.node_length(&h)?)));
                (node, s.name.clone())
            })
            .collect();
        let target_size = self.node_length(&handle)?;
        let target = target.to_owned();
        self.main.run(move |bql| {
            let t = handle.gs(bql);
            let Some(info) = t.dirty_bitmaps().into_iter().find(|b| b.name == target) else {
                return Err(QmpError::generic(format!(
                    "Dirty bitmap '{target}' not found"
                )));
            };
            check(&info, true)?;
            let mut found = Vec::new();
            for (node, name) in resolved {
                let (node, source_size) = node?;
                let s = node.gs(bql);
                let Some(info) = s.dirty_bitmaps().into_iter().find(|b| b.name == name) else {
                    return Err(QmpError::generic(format!(
                        "Dirty bitmap '{name}' not found"
                    )));
                };
                // A busy source may be read; an inconsistent one not.
                if info.inconsistent {
                    return Err(bitmap_err(blockgraph::Error::BitmapInconsistent(name)));
                }
                // The library merges bitmaps of any sizes; QEMU refuses.
                if source_size != target_size {
                    return Err(QmpError::generic(format!(
                        "Bitmaps are of different sizes (destination size is {target_size}, \
                         source size is {source_size}) and can't be merged"
                    )));
                }
                found.push((node, name));
            }
            for (node, name) in found {
                t.merge_dirty_bitmap(&target, &node.gs(bql), &name)
                    .map_err(bitmap_err)?;
            }
            Ok(())
        })
    }
}
