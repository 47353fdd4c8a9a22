//! Dirty bitmaps on the daemon's nodes: QEMU's `block-dirty-bitmap-*`
//! checks, in QEMU's order and words (`block/monitor/bitmap-qmp-cmds.c`,
//! `bdrv_dirty_bitmap_check`), over the library's `NodeRef` verbs, which
//! run on the main loop. The bits themselves are the library's: every
//! write that completes on a node marks its enabled bitmaps; a qcow2
//! node's persistent bitmaps are loaded at open and stored when it is
//! closed (`flush_to_close`: `blockdev-del`, shutdown).

use blockgraph::drivers::qcow2::Qcow2Driver;
use std::collections::HashMap;

use blockgraph::{Bql, DirtyBitmapInfo, DirtyBitmapOptions, NodeHandle};
use serde_json::{json, Value};

use super::Daemon;
use crate::opts::{lib_err, QResult, QmpError};

/// `block-dirty-bitmap-add`'s arguments.
#[derive(Debug, Clone)]
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

/// A dirty bitmap action of a `transaction`.
#[derive(Debug)]
pub enum BitmapAction {
    /// `block-dirty-bitmap-add`.
    Add(BitmapAdd),
    /// `-remove`, `-clear`, `-enable`, `-disable`: `node`, `name`.
    Verb {
        /// `node`.
        node: String,
        /// `name`.
        name: String,
        /// Which.
        verb: BitmapVerb,
    },
    /// `-merge`.
    Merge {
        /// `node`.
        node: String,
        /// `target`.
        target: String,
        /// `bitmaps`.
        sources: Vec<BitmapRef>,
    },
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
fn check(info: &Planned, inconsistent_too: bool) -> QResult<()> {
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

    /// The bitmap `name` of `node` as the actions checked so far leave it
    /// (`plan`), else as it is.
    fn planned_bitmap(&self, plan: &BitmapPlan, node: &NodeHandle, name: &str) -> Option<Planned> {
        if let Some(v) = plan.over.get(&(node.name().to_owned(), name.to_owned())) {
            return v.clone();
        }
        let (h, n) = (node.clone(), name.to_owned());
        self.main.run(move |bql| {
            h.gs(bql)
                .dirty_bitmaps()
                .into_iter()
                .find(|b| b.name == n)
                .map(|b| Planned {
                    name: b.name,
                    busy: b.busy,
                    inconsistent: b.inconsistent,
                })
        })
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(&mut self, spec: BitmapAdd) -> QResult<()> {
        let checked = self.check_bitmap_add(&spec, &mut BitmapPlan::default())?;
        self.apply_bitmap_now(checked)
    }

    /// `block-dirty-bitmap-remove`, `-clear`, `-enable`, `-disable`.
    pub fn bitmap_verb(&mut self, node: &str, name: &str, verb: BitmapVerb) -> QResult<()> {
        let checked = self.check_bitmap_verb(node, name, verb, &mut BitmapPlan::default())?;
        self.apply_bitmap_now(checked)
    }

    /// `block-dirty-bitmap-merge`: every source is looked up and checked,
    /// in order, before anything is merged, so a refused merge leaves the
    /// target as it was (QEMU merges into an anonymous bitmap first for
    /// the same reason). An empty list merges nothing (qemu-storage-daemon
    /// 10.0.2 crashes on it).
    pub fn bitmap_merge(&mut self, node: &str, target: &str, sources: &[BitmapRef]) -> QResult<()> {
        let checked = self.check_bitmap_merge(node, target, sources, &mut BitmapPlan::default())?;
        self.apply_bitmap_now(checked)
    }

    /// One checked bitmap action, alone (a command, not a transaction).
    fn apply_bitmap_now(&mut self, checked: CheckedBitmap) -> QResult<()> {
        self.main
            .run(move |bql| {
                let mut undo = Vec::new();
                apply_bitmap(bql, &checked, &mut undo, &mut 0)?;
                commit_bitmaps(bql, undo);
                Ok::<(), blockgraph::Error>(())
            })
            .map_err(bitmap_err)
    }

    /// `block-dirty-bitmap-add`'s checks, in QEMU's order and words,
    /// against the bitmaps as `plan` leaves them; records the new bitmap
    /// in `plan`.
    pub(super) fn check_bitmap_add(
        &self,
        spec: &BitmapAdd,
        plan: &mut BitmapPlan,
    ) -> QResult<CheckedBitmap> {
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
        let (shown, name, persistent, wanted) = (
            spec.node.clone(),
            spec.name.clone(),
            spec.persistent,
            spec.granularity,
        );
        let n = node.clone();
        let granularity = self.main.run(move |bql| {
            let n = n.gs(bql);
            // QEMU's `bdrv_get_default_bitmap_granularity`: the
            // cluster size within 4 KiB..64 KiB, else 64 KiB.
            let granularity = wanted.unwrap_or_else(|| {
                n.driver_as::<Qcow2Driver>()
                    .map(|q| q.cluster_size().clamp(4096, 65536))
                    .unwrap_or(65536)
            });
            if persistent {
                if let Err(e) = n.driver().can_store_dirty_bitmap(&name, granularity) {
                    return Err(if n.driver_as::<Qcow2Driver>().is_some() {
                        QmpError::generic(format!(
                            "Can't make bitmap '{name}' persistent in '{shown}': {e}"
                        ))
                    } else {
                        QmpError::generic(format!(
                            "Can't store persistent bitmaps to {shown}: Operation not supported"
                        ))
                    });
                }
            }
            Ok(granularity)
        })?;
        if self.planned_bitmap(plan, &node, &spec.name).is_some() {
            return Err(bitmap_err(blockgraph::Error::BitmapExists {
                node: spec.node.clone(),
                bitmap: spec.name.clone(),
            }));
        }
        if spec.name.len() > MAX_NAME {
            return Err(QmpError::generic(format!(
                "Bitmap name too long: {}",
                spec.name
            )));
        }
        plan.over.insert(
            (node.name().to_owned(), spec.name.clone()),
            Some(Planned {
                name: spec.name.clone(),
                inconsistent: false,
                busy: false,
            }),
        );
        let options = DirtyBitmapOptions::new()
            .granularity(granularity)
            .persistent(spec.persistent)
            .disabled(spec.disabled);
        Ok(CheckedBitmap::Add {
            node,
            name: spec.name.clone(),
            options,
        })
    }

    /// The checks of `-remove`, `-clear`, `-enable`, `-disable`, against
    /// the bitmaps as `plan` leaves them; records the effect in `plan`.
    pub(super) fn check_bitmap_verb(
        &self,
        node: &str,
        name: &str,
        verb: BitmapVerb,
        plan: &mut BitmapPlan,
    ) -> QResult<CheckedBitmap> {
        let handle = self.bitmap_node(node)?;
        let Some(info) = self.planned_bitmap(plan, &handle, name) else {
            return Err(QmpError::generic(format!(
                "Dirty bitmap '{name}' not found"
            )));
        };
        // An inconsistent bitmap can only be removed.
        check(&info, verb != BitmapVerb::Remove)?;
        let key = (handle.name().to_owned(), name.to_owned());
        // A bitmap a transaction removes stays until the transaction is
        // done, busy (QEMU's remove action takes it at prepare: a later
        // action on it is told it is in use). Clearing, enabling and
        // disabling change nothing a later check looks at.
        let mut info = info;
        info.busy |= verb == BitmapVerb::Remove;
        plan.over.insert(key, Some(info));
        Ok(CheckedBitmap::Verb {
            node: handle,
            name: name.to_owned(),
            verb,
        })
    }

    /// `-merge`'s checks, against the bitmaps as `plan` leaves them.
    pub(super) fn check_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[BitmapRef],
        plan: &mut BitmapPlan,
    ) -> QResult<CheckedBitmap> {
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
        let Some(info) = self.planned_bitmap(plan, &handle, target) else {
            return Err(QmpError::generic(format!(
                "Dirty bitmap '{target}' not found"
            )));
        };
        check(&info, true)?;
        let mut found = Vec::new();
        for (node, name) in resolved {
            let (node, source_size) = node?;
            let Some(info) = self.planned_bitmap(plan, &node, &name) else {
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
        Ok(CheckedBitmap::Merge {
            node: handle,
            target: target.to_owned(),
            sources: found,
        })
    }
}

/// The bitmaps as the actions of a transaction checked so far leave them:
/// (node's graph name, bitmap name) → the bitmap, or `None` once removed.
#[derive(Default)]
pub(super) struct BitmapPlan {
    over: HashMap<(String, String), Option<Planned>>,
}

/// What the checks look at of a bitmap.
#[derive(Clone)]
pub(super) struct Planned {
    name: String,
    busy: bool,
    inconsistent: bool,
}

/// Copies bitmap `name` of `node` into a new disabled bitmap, for undoing;
/// its name, or `None` when it cannot be copied (inconsistent).
fn copy_of(bql: &Bql, node: &NodeHandle, name: &str, serial: &mut u64) -> Option<String> {
    *serial += 1;
    // (A copy lives only inside the command.)
    let copy = format!("storage-daemon-transaction-copy-{serial}");
    node.gs(bql)
        .copy_dirty_bitmap(name, &copy, DirtyBitmapOptions::new().disabled(true))
        .ok()
        .map(|()| copy)
}

/// A bitmap action, checked.
pub(super) enum CheckedBitmap {
    /// `block-dirty-bitmap-add`.
    Add {
        node: NodeHandle,
        name: String,
        options: DirtyBitmapOptions,
    },
    /// `-remove`, `-clear`, `-enable`, `-disable`.
    Verb {
        node: NodeHandle,
        name: String,
        verb: BitmapVerb,
    },
    /// `-merge` of `sources` into `target`.
    Merge {
        node: NodeHandle,
        target: String,
        sources: Vec<(NodeHandle, String)>,
    },
}

impl CheckedBitmap {
    /// The nodes whose bitmaps it changes or reads.
    pub(super) fn nodes(&self) -> Vec<NodeHandle> {
        match self {
            CheckedBitmap::Add { node, .. } | CheckedBitmap::Verb { node, .. } => {
                vec![node.clone()]
            }
            CheckedBitmap::Merge { node, sources, .. } => std::iter::once(node.clone())
                .chain(sources.iter().map(|(n, _)| n.clone()))
                .collect(),
        }
    }
}

/// How to take back one applied bitmap action (QEMU's `abort` of its
/// transaction action), and the copy it keeps meanwhile.
pub(super) enum BitmapUndo {
    /// An added bitmap: remove it.
    Remove { node: NodeHandle, name: String },
    /// A removed bitmap: add it back with its options and, from `copy`,
    /// its bits.
    Recreate {
        node: NodeHandle,
        name: String,
        options: DirtyBitmapOptions,
        copy: Option<String>,
    },
    /// A cleared or merged-into bitmap: its bits back from `copy`.
    Refill {
        node: NodeHandle,
        name: String,
        copy: String,
    },
    /// An enabled or disabled bitmap: back to `enabled`.
    SetEnabled {
        node: NodeHandle,
        name: String,
        enabled: bool,
    },
}

/// Applies one checked action on the main loop; pushes how to take it
/// back onto `undo`. `serial` names the copies kept for that.
pub(super) fn apply_bitmap(
    bql: &mut Bql,
    action: &CheckedBitmap,
    undo: &mut Vec<BitmapUndo>,
    serial: &mut u64,
) -> blockgraph::Result<()> {
    match action {
        CheckedBitmap::Add {
            node,
            name,
            options,
        } => {
            node.gs(bql).add_dirty_bitmap(name, *options)?;
            undo.push(BitmapUndo::Remove {
                node: node.clone(),
                name: name.clone(),
            });
        }
        CheckedBitmap::Verb { node, name, verb } => {
            let n = node.gs(bql);
            let info = n
                .dirty_bitmaps()
                .into_iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| blockgraph::Error::NoSuchBitmap {
                    node: node.name().to_owned(),
                    bitmap: name.clone(),
                })?;
            let (node, name) = (node.clone(), name.clone());
            match verb {
                BitmapVerb::Remove => {
                    let copy = copy_of(bql, &node, &name, serial);
                    n.remove_dirty_bitmap(&name)?;
                    let options = DirtyBitmapOptions::new()
                        .granularity(info.granularity)
                        .persistent(info.persistent)
                        .disabled(!info.enabled);
                    undo.push(BitmapUndo::Recreate {
                        node,
                        name,
                        options,
                        copy,
                    });
                }
                BitmapVerb::Clear => {
                    let copy = copy_of(bql, &node, &name, serial)
                        .ok_or_else(|| blockgraph::Error::BitmapInconsistent(name.clone()))?;
                    let cleared = n.clear_dirty_bitmap(&name);
                    undo.push(BitmapUndo::Refill { node, name, copy });
                    cleared?;
                }
                BitmapVerb::Enable | BitmapVerb::Disable => {
                    if *verb == BitmapVerb::Enable {
                        n.enable_dirty_bitmap(&name)?;
                    } else {
                        n.disable_dirty_bitmap(&name)?;
                    }
                    undo.push(BitmapUndo::SetEnabled {
                        node,
                        name,
                        enabled: info.enabled,
                    });
                }
            }
        }
        CheckedBitmap::Merge {
            node,
            target,
            sources,
        } => {
            let n = node.gs(bql);
            let copy = copy_of(bql, node, target, serial)
                .ok_or_else(|| blockgraph::Error::BitmapInconsistent(target.clone()))?;
            undo.push(BitmapUndo::Refill {
                node: node.clone(),
                name: target.clone(),
                copy,
            });
            for (source, name) in sources {
                n.merge_dirty_bitmap(target, &source.gs(bql), name)?;
            }
        }
    }
    Ok(())
}

/// Takes back the applied actions, newest first (QEMU's `abort`).
pub(super) fn undo_bitmaps(bql: &mut Bql, undo: Vec<BitmapUndo>) {
    for u in undo.into_iter().rev() {
        match u {
            BitmapUndo::Remove { node, name } => {
                let _ = node.gs(bql).remove_dirty_bitmap(&name);
            }
            BitmapUndo::Recreate {
                node,
                name,
                options,
                copy,
            } => {
                let n = node.gs(bql);
                match &copy {
                    Some(copy) => {
                        let _ = n.copy_dirty_bitmap(copy, &name, options);
                        let _ = n.remove_dirty_bitmap(copy);
                    }
                    None => {
                        let _ = n.add_dirty_bitmap(&name, options);
                    }
                }
            }
            BitmapUndo::Refill { node, name, copy } => {
                let n = node.gs(bql);
                let _ = n.clear_dirty_bitmap(&name);
                let _ = n.merge_dirty_bitmap(&name, &n, &copy);
                let _ = n.remove_dirty_bitmap(&copy);
            }
            BitmapUndo::SetEnabled {
                node,
                name,
                enabled,
            } => {
                let n = node.gs(bql);
                let _ = if enabled {
                    n.enable_dirty_bitmap(&name)
                } else {
                    n.disable_dirty_bitmap(&name)
                };
            }
        }
    }
}

/// Drops the copies kept for undoing (QEMU's `commit`/`clean`).
pub(super) fn commit_bitmaps(bql: &mut Bql, undo: Vec<BitmapUndo>) {
    for u in undo {
        match u {
            BitmapUndo::Recreate {
                node,
                copy: Some(copy),
                ..
            }
            | BitmapUndo::Refill { node, copy, .. } => {
                let _ = node.gs(bql).remove_dirty_bitmap(&copy);
            }
            _ => {}
        }
    }
}
