//! QMP's snapshot commands: `blockdev-snapshot-sync`, `blockdev-snapshot`
//! and `transaction`, with QEMU's arguments (`qapi/block-core.json`,
//! `qapi/transaction.json`). The single commands are transactions of one
//! action, as in QEMU.
//!
//! [`ACTIONS`] lists the `transaction` action types by QEMU's names:
//! `Ready` ones parse their `data` into a [`SnapshotAction`]; `Pending`
//! ones (backups, dirty bitmaps, internal snapshots) are answered as a
//! QEMU without them answers an unknown type ("Parameter 'type' does not
//! accept value 'x'"), like the pending commands.

use serde_json::{json, Value};

use crate::daemon::{Daemon, SnapshotAction, SyncSpec};
use crate::opts::{Opts, QResult, QmpError};

/// What a `transaction` action type does here.
pub enum Action {
    /// Parses the action's `data`.
    Ready(fn(Opts) -> QResult<SnapshotAction>),
    /// Not here yet: which work will add it.
    Pending(&'static str),
}

const BACKUP: &str = "backup jobs (src/job/)";
const BITMAPS: &str = "dirty bitmaps (src/, qcow2)";
const INTERNAL: &str = "internal snapshots over QMP (the qcow2 driver has them)";

/// Every action type of QEMU's `TransactionAction`.
pub const ACTIONS: &[(&str, Action)] = &[
    ("abort", Action::Ready(abort)),
    ("blockdev-snapshot", Action::Ready(existing)),
    ("blockdev-snapshot-sync", Action::Ready(sync)),
    ("blockdev-snapshot-internal-sync", Action::Pending(INTERNAL)),
    ("drive-backup", Action::Pending(BACKUP)),
    ("blockdev-backup", Action::Pending(BACKUP)),
    ("block-dirty-bitmap-add", Action::Pending(BITMAPS)),
    ("block-dirty-bitmap-remove", Action::Pending(BITMAPS)),
    ("block-dirty-bitmap-clear", Action::Pending(BITMAPS)),
    ("block-dirty-bitmap-enable", Action::Pending(BITMAPS)),
    ("block-dirty-bitmap-disable", Action::Pending(BITMAPS)),
    ("block-dirty-bitmap-merge", Action::Pending(BITMAPS)),
];

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
/// actions support in QEMU). All actions are parsed first, then done as
/// one snapshot transaction.
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
        let data = a.take("data").unwrap_or(Value::Null);
        if data.is_null() {
            return Err(a.missing("data"));
        }
        a.finish()?;
        let data = Opts::new(data, o.is_keyval())?;
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
