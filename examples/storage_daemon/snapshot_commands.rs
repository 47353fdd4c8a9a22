//! QMP's snapshot commands: `blockdev-snapshot-sync`, `blockdev-snapshot`
//! and `transaction`, with QEMU's arguments (`qapi/block-core.json`,
//! `qapi/transaction.json`). The single commands are transactions of one
//! action, as in QEMU.
//!
//! [`ACTIONS`] lists the `transaction` action types by QEMU's names:
//! `Ready` ones (snapshots, `blockdev-backup`, the dirty bitmap verbs)
//! parse their `data` into a [`SnapshotAction`]; `Pending` ones
//! (`drive-backup`, internal snapshots) are answered as a QEMU without
//! them answers an unknown type ("Parameter 'type' does not accept value
//! 'x'"), like the pending commands.

use serde_json::{json, Value};

use crate::daemon::{BitmapAction, BitmapVerb, Daemon, SnapshotAction, SyncSpec};
use crate::opts::{Opts, QResult, QmpError};

/// What a `transaction` action type does here.
pub enum Action {
    /// Parses the action's `data`.
    Ready(fn(Opts) -> QResult<SnapshotAction>),
    /// Not here yet: which work will add it.
    Pending(&'static str),
}

const DRIVE_BACKUP: &str = "drive-backup (the daemon creates no backup target image; \
                            blockdev-add one and use blockdev-backup)";
const INTERNAL: &str = "internal snapshots over QMP (the qcow2 driver has them)";

/// Every action type of QEMU's `TransactionAction`.
pub const ACTIONS: &[(&str, Action)] = &[
    ("abort", Action::Ready(abort)),
    ("blockdev-snapshot", Action::Ready(existing)),
    ("blockdev-snapshot-sync", Action::Ready(sync)),
    ("blockdev-snapshot-internal-sync", Action::Pending(INTERNAL)),
    ("drive-backup", Action::Pending(DRIVE_BACKUP)),
    ("blockdev-backup", Action::Ready(backup)),
    ("block-dirty-bitmap-add", Action::Ready(bitmap_add)),
    ("block-dirty-bitmap-remove", Action::Ready(bitmap_remove)),
    ("block-dirty-bitmap-clear", Action::Ready(bitmap_clear)),
    ("block-dirty-bitmap-enable", Action::Ready(bitmap_enable)),
    ("block-dirty-bitmap-disable", Action::Ready(bitmap_disable)),
    ("block-dirty-bitmap-merge", Action::Ready(bitmap_merge)),
];

/// `BlockdevBackup`.
fn backup(o: Opts) -> QResult<SnapshotAction> {
    Ok(SnapshotAction::Backup(crate::job_commands::backup_spec(o)?))
}

/// `BlockDirtyBitmapAdd`.
fn bitmap_add(o: Opts) -> QResult<SnapshotAction> {
    Ok(SnapshotAction::Bitmap(BitmapAction::Add(
        crate::bitmap_commands::add_spec(o)?,
    )))
}

/// `BlockDirtyBitmap` for one verb.
fn bitmap_verb(o: Opts, verb: BitmapVerb) -> QResult<SnapshotAction> {
    let (node, name) = crate::bitmap_commands::node_and_name(o)?;
    Ok(SnapshotAction::Bitmap(BitmapAction::Verb {
        node,
        name,
        verb,
    }))
}

fn bitmap_remove(o: Opts) -> QResult<SnapshotAction> {
    bitmap_verb(o, BitmapVerb::Remove)
}

fn bitmap_clear(o: Opts) -> QResult<SnapshotAction> {
    bitmap_verb(o, BitmapVerb::Clear)
}

fn bitmap_enable(o: Opts) -> QResult<SnapshotAction> {
    bitmap_verb(o, BitmapVerb::Enable)
}

fn bitmap_disable(o: Opts) -> QResult<SnapshotAction> {
    bitmap_verb(o, BitmapVerb::Disable)
}

/// `BlockDirtyBitmapMerge`.
fn bitmap_merge(o: Opts) -> QResult<SnapshotAction> {
    let (node, target, sources) = crate::bitmap_commands::merge_spec(o)?;
    Ok(SnapshotAction::Bitmap(BitmapAction::Merge {
        node,
        target,
        sources,
    }))
}

fn abort(o: Opts) -> QResult<SnapshotAction> {
    o.finish()?;
    Ok(SnapshotAction::Abort)
}

/// `BlockdevSnapshot`: `node`, `overlay`.
fn existing(mut o: Opts) -> QResult<SnapshotAction> {
    let node = o.req_str("node")?;
    let overlay = o.req_str("overlay")?;
    o.finish()?;
    Ok(SnapshotAction::Existing { node, overlay })
}

/// `BlockdevSnapshotSync`.
fn sync(mut o: Opts) -> QResult<SnapshotAction> {
    let device = o.str("device")?;
    let node_name = o.str("node-name")?;
    let snapshot_file = o.req_str("snapshot-file")?;
    let snapshot_node_name = o.str("snapshot-node-name")?;
    let format = o.str("format")?.unwrap_or_else(|| "qcow2".into());
    let mode = o.enumeration("mode", &["existing", "absolute-paths"])?;
    o.finish()?;
    Ok(SnapshotAction::Sync(SyncSpec {
        device,
        node_name,
        snapshot_file: snapshot_file.into(),
        snapshot_node_name,
        format,
        existing: mode.as_deref() == Some("existing"),
    }))
}

/// `blockdev-snapshot-sync`.
pub fn blockdev_snapshot_sync(d: &mut Daemon, o: Opts) -> QResult<Value> {
    d.snapshot_transaction(vec![sync(o)?])?;
    Ok(json!({}))
}

/// `blockdev-snapshot`.
pub fn blockdev_snapshot(d: &mut Daemon, o: Opts) -> QResult<Value> {
    d.snapshot_transaction(vec![existing(o)?])?;
    Ok(json!({}))
}

/// `transaction`: `actions` (each `{type, data}`) and `properties`
/// (`completion-mode`: `individual`, or `grouped`, which only backup
/// actions support in QEMU and this daemon refuses for every action). All
/// actions are parsed first, then checked in order, then done at one
/// instant (`Daemon::snapshot_transaction`).
pub fn transaction(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let Some(list) = o.array("actions")? else {
        return Err(o.missing("actions"));
    };
    let grouped = match o.object("properties")? {
        Some(mut p) => {
            let mode = p.enumeration("completion-mode", &["individual", "grouped"])?;
            p.finish()?;
            mode.as_deref() == Some("grouped")
        }
        None => false,
    };
    let mut parsed = Vec::new();
    for (i, item) in list.into_iter().enumerate() {
        let mut a = o.element("actions", i, item)?;
        let ty = a.req_str("type")?;
        let Some((name, action)) = ACTIONS.iter().find(|(n, _)| *n == ty) else {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{ty}'"
            )));
        };
        // (Nested, so that its errors name `actions[i].data.x` as QEMU's.)
        let Some(data) = a.object("data")? else {
            return Err(a.missing("data"));
        };
        a.finish()?;
        match action {
            Action::Ready(parse) => parsed.push((*name, parse(data)?)),
            Action::Pending(by) => {
                eprintln!(
                    "storage_daemon: transaction action '{name}' is not here yet (it comes with {by})"
                );
                return Err(QmpError::generic(format!(
                    "Parameter 'type' does not accept value '{ty}'"
                )));
            }
        }
    }
    o.finish()?;
    if grouped {
        if let Some((name, _)) = parsed.first() {
            return Err(QmpError::generic(format!(
                "Action '{name}' does not support transaction property completion-mode = grouped"
            )));
        }
    }
    d.snapshot_transaction(parsed.into_iter().map(|(_, a)| a).collect())?;
    Ok(json!({}))
}
