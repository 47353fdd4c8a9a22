//! Live snapshots on the daemon: `blockdev-snapshot-sync`,
//! `blockdev-snapshot` and `transaction`, all as one transaction of
//! [`blockgraph::snapshot::snapshot`].
//!
//! Every action is first checked against the graph as the actions before
//! it leave it (QEMU prepares them in order, and so words its errors), with
//! QEMU's messages; then the `-sync` overlays are created and opened (a
//! qcow2 image on a new file, its header naming the old top as QEMU's
//! `bdrv_img_create` does), and one library call appends every overlay at
//! one instant. Any failure removes the nodes and the files this command
//! created, so the graph is as before (QEMU leaves created files behind).

use std::path::PathBuf;

use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Driver};
use blockgraph::{ChildRole, NodeHandle, ParentRef};

use std::sync::{Arc, Mutex};

use super::bitmaps::{
    apply_bitmap, bitmap_err, commit_bitmaps, undo_bitmaps, BitmapPlan, BitmapUndo, CheckedBitmap,
};
use super::jobs::PreparedBackup;
use super::{BitmapAction, Daemon};
use crate::blockdev::{Backing, ChildSpec, Kind, NodeSpec};
use crate::opts::{lib_err, QResult, QmpError};

/// `blockdev-snapshot-sync`'s arguments.
#[derive(Debug, Clone)]
pub struct SyncSpec {
    /// `device`.
    pub device: Option<String>,
    /// `node-name`.
    pub node_name: Option<String>,
    /// `snapshot-file`.
    pub snapshot_file: PathBuf,
    /// `snapshot-node-name`.
    pub snapshot_node_name: Option<String>,
    /// `format` (default `qcow2`).
    pub format: String,
    /// `mode`: `existing` opens `snapshot-file` as it is instead of
    /// creating it.
    pub existing: bool,
}

/// One action of a `transaction` this daemon can do.
#[derive(Debug)]
pub enum SnapshotAction {
    /// A `block-dirty-bitmap-*` action.
    Bitmap(super::BitmapAction),
    /// `blockdev-backup`.
    Backup(super::BackupSpec),
    /// `blockdev-snapshot-sync`.
    Sync(SyncSpec),
    /// `blockdev-snapshot`: `node`, `overlay`.
    Existing {
        /// `node`.
        node: String,
        /// `overlay`.
        overlay: String,
    },
    /// `abort`: fails the transaction.
    Abort,
}

/// An action once checked.
enum Checked {
    Bitmap(CheckedBitmap),
    Backup(PreparedBackup),
    Sync {
        top: NodeHandle,
        spec: SyncSpec,
    },
    Existing {
        top: NodeHandle,
        overlay: NodeHandle,
    },
}

impl Daemon {
    /// `transaction` (and the single commands, as a transaction of one):
    /// all actions or none.
    pub fn snapshot_transaction(&mut self, actions: Vec<SnapshotAction>) -> QResult<()> {
        let checked = self.check_snapshots(actions)?;
        if checked.is_empty() {
            return Ok(());
        }
        let mut created: Vec<String> = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        let result = self.apply_transaction(checked, &mut created, &mut files);
        if result.is_err() {
            for name in created.into_iter().rev() {
                let _ = self.remove_one(&name);
            }
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        }
        self.reconcile();
        result
    }

    /// QEMU's checks of each action, in order, against the graph as the
    /// actions before it leave it.
    fn check_snapshots(&mut self, actions: Vec<SnapshotAction>) -> QResult<Vec<Checked>> {
        // (top, overlay name) of the actions checked so far.
        let mut planned: Vec<(NodeHandle, String)> = Vec::new();
        // The bitmaps as the actions checked so far leave them.
        let mut bitmaps = BitmapPlan::default();
        // The job ids the actions checked so far take.
        let mut job_ids: Vec<String> = Vec::new();
        let mut out = Vec::new();
        let with_backup = actions
            .iter()
            .any(|a| matches!(a, SnapshotAction::Backup(_)));
        let with_snapshot = actions
            .iter()
            .any(|a| matches!(a, SnapshotAction::Sync(_) | SnapshotAction::Existing { .. }));
        if with_backup && with_snapshot {
            return Err(QmpError::generic(
                "blockdev-backup and snapshot actions in one transaction are not supported by \
                 this daemon: the backup's point in time is its own drained section",
            ));
        }
        for action in actions {
            let checked = match action {
                SnapshotAction::Bitmap(b) => Checked::Bitmap(match b {
                    BitmapAction::Add(spec) => self.check_bitmap_add(&spec, &mut bitmaps)?,
                    BitmapAction::Verb { node, name, verb } => {
                        self.check_bitmap_verb(&node, &name, verb, &mut bitmaps)?
                    }
                    BitmapAction::Merge {
                        node,
                        target,
                        sources,
                    } => self.check_bitmap_merge(&node, &target, &sources, &mut bitmaps)?,
                }),
                SnapshotAction::Backup(spec) => {
                    let id = spec.job.job_id.clone().unwrap_or_default();
                    if job_ids.contains(&id) {
                        return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
                    }
                    if out.iter().any(|c| matches!(c, Checked::Backup(_))) {
                        return Err(QmpError::generic(
                            "More than one blockdev-backup in a transaction is not supported \
                             by this daemon: start the others with their own transactions",
                        ));
                    }
                    let prepared = self.check_backup(spec)?;
                    // A node another backup of this transaction uses is
                    // busy, as after that backup started.
                    for n in &prepared.busy {
                        let taken = out
                            .iter()
                            .any(|c| matches!(c, Checked::Backup(p) if p.busy.contains(n)));
                        if taken {
                            return Err(QmpError::generic(format!(
                                "Node '{}' is busy: block device is in use by block job: backup",
                                self.display_name(n)
                            )));
                        }
                    }
                    job_ids.push(id);
                    Checked::Backup(prepared)
                }
                SnapshotAction::Abort => {
                    return Err(QmpError::generic("Transaction aborted using Abort action"))
                }
                SnapshotAction::Sync(spec) => {
                    let device = spec.device.clone().unwrap_or_default();
                    let node = spec.node_name.clone().unwrap_or_default();
                    let top = self.lookup(&device, &node)?;
                    self.check_snapshot_top(&top, &planned)?;
                    let Some(snap) = &spec.snapshot_node_name else {
                        return Err(QmpError::generic("New overlay node-name missing"));
                    };
                    if self.nodes.contains_key(snap) || planned.iter().any(|(_, o)| o == snap) {
                        return Err(QmpError::generic("New overlay node-name already in use"));
                    }
                    if !crate::blockdev::valid_node_name(snap) {
                        return Err(QmpError::generic(format!("Invalid node-name: '{snap}'")));
                    }
                    if spec.format != "qcow2" {
                        return Err(QmpError::generic(format!(
                            "Parameter 'format': this daemon creates and opens qcow2 \
                             overlays only, not '{}'",
                            spec.format
                        )));
                    }
                    planned.push((top.clone(), snap.clone()));
                    Checked::Sync { top, spec }
                }
                SnapshotAction::Existing { node, overlay } => {
                    // QEMU's order: the top and its blockers, then the
                    // overlay (used by a device, has a backing), then the
                    // append itself (a cycle).
                    let top = self.lookup(&node, &node)?;
                    self.check_snapshot_top(&top, &planned)?;
                    let ov = self.lookup(&overlay, &overlay)?;
                    let o = ov.clone();
                    let (has_backing, backends, nodes) = self.main.run(move |bql| {
                        let g = o.gs(bql);
                        let backends = g
                            .parents()
                            .filter(|p| matches!(p, ParentRef::Backend { .. }))
                            .count();
                        (
                            g.backing().is_some(),
                            backends,
                            g.parents().len() - backends,
                        )
                    });
                    if backends > 0 || planned.iter().any(|(_, o)| *o == overlay) {
                        return Err(QmpError::generic("The overlay is already in use"));
                    }
                    if has_backing {
                        return Err(QmpError::generic("The overlay already has a backing image"));
                    }
                    if top.ptr_eq(&ov) {
                        return Err(QmpError::generic(format!(
                            "Making '{overlay}' a backing child of '{node}' would create a cycle"
                        )));
                    }
                    if nodes > 0 {
                        return Err(QmpError::generic("The overlay is already in use"));
                    }
                    planned.push((top.clone(), overlay.clone()));
                    Checked::Existing { top, overlay: ov }
                }
            };
            out.push(checked);
        }
        Ok(out)
    }

    /// The top of a snapshot must not be in a job, nor the top of an
    /// earlier action of the same transaction (it has an overlay then).
    fn check_snapshot_top(
        &self,
        top: &NodeHandle,
        planned: &[(NodeHandle, String)],
    ) -> QResult<()> {
        self.check_not_busy(&[top.name().to_owned()])?;
        // QEMU blocks snapshots of a node that is another's backing (the
        // old top of an earlier snapshot, of this transaction or before).
        let t = top.clone();
        let under = self.main.run(move |bql| {
            t.gs(bql).parents().find_map(|p| match p {
                ParentRef::Node {
                    node,
                    role: ChildRole::Backing,
                } => Some(node.name().to_owned()),
                _ => None,
            })
        });
        let overlay = planned
            .iter()
            .find(|(t, _)| t.ptr_eq(top))
            .map(|(_, o)| o.clone())
            .or_else(|| under.map(|g| self.display_name(&g)));
        if let Some(overlay) = overlay {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: node is used as backing hd of '{overlay}'",
                self.display_name(top.name())
            )));
        }
        Ok(())
    }

    /// Does the checked actions at one instant: every node they involve
    /// is drained (guest writes wait at their backends), then the backups
    /// start (their point in time), the bitmap actions are applied and the
    /// overlays appended, then the drains end. A failure takes back what
    /// was done (QEMU's `abort`: an added bitmap is removed, a removed,
    /// cleared or merged-into one restored, a started backup cancelled).
    fn apply_transaction(
        &mut self,
        checked: Vec<Checked>,
        created: &mut Vec<String>,
        files: &mut Vec<PathBuf>,
    ) -> QResult<()> {
        let mut pairs = Vec::new();
        let mut bitmaps = Vec::new();
        let mut backups = Vec::new();
        for c in checked {
            match c {
                Checked::Existing { top, overlay } => pairs.push((top, overlay)),
                Checked::Sync { top, spec } => {
                    let overlay = self.create_overlay(&top, &spec, created, files)?;
                    pairs.push((top, overlay));
                }
                Checked::Bitmap(b) => bitmaps.push(b),
                Checked::Backup(p) => backups.push(p),
            }
        }
        if let Some(backup) = backups.pop() {
            return self.start_backup_with_bitmaps(backup, bitmaps);
        }
        // Every node involved, once: drained together for one instant.
        let involved = distinct(
            pairs
                .iter()
                .map(|(t, _)| t.clone())
                .chain(bitmaps.iter().flat_map(CheckedBitmap::nodes)),
        );
        // The library's snapshot drives I/O (flushes) from a main-loop
        // task on an I/O thread of its own.
        let io = self.main.new_io_thread("snapshot").map_err(lib_err)?;
        self.main
            .spawn(move |mut task| async move {
                let mut drained = Vec::new();
                for n in &involved {
                    drained.push(task.drain(n).await);
                }
                let mut undo = Vec::new();
                let mut failed = None;
                let mut serial = 0;
                for b in &bitmaps {
                    let applied = task.bql(|bql| apply_bitmap(bql, b, &mut undo, &mut serial));
                    if let Err(e) = applied {
                        failed = Some(bitmap_err(e));
                        break;
                    }
                }
                if failed.is_none() && !pairs.is_empty() {
                    if let Err(e) = blockgraph::snapshot::snapshot(&mut task, &io, &pairs).await {
                        failed = Some(lib_err(e));
                    }
                }
                let result = match failed {
                    None => {
                        task.bql(|bql| commit_bitmaps(bql, undo));
                        Ok(())
                    }
                    Some(e) => {
                        task.bql(|bql| undo_bitmaps(bql, undo));
                        Err(e)
                    }
                };
                drop(drained);
                drop(io);
                result
            })
            .join()
    }

    /// A `blockdev-backup` action with the bitmap actions of its
    /// transaction: the bitmap actions run at the backup's point in time,
    /// inside the job's own drained section of its source and target
    /// (`BackupOptions::at_start`), while the other nodes they involve are
    /// drained around the whole start. If they fail, they are taken back
    /// and the job does not start; if the job cannot start, they are taken
    /// back too.
    fn start_backup_with_bitmaps(
        &mut self,
        backup: PreparedBackup,
        bitmaps: Vec<CheckedBitmap>,
    ) -> QResult<()> {
        let (source, target) = (backup.source.clone(), backup.target.clone());
        // (The job drains its source and target itself, and asks their
        // lengths first: a drain of ours would hold those requests.)
        let others: Vec<NodeHandle> = distinct(bitmaps.iter().flat_map(CheckedBitmap::nodes))
            .into_iter()
            .filter(|n| !n.ptr_eq(&source) && !n.ptr_eq(&target))
            .collect();
        let io = self.jobs_io()?.handle();
        let auto_finalize = backup.jo.auto_finalize;
        let done: Arc<Mutex<Vec<BitmapUndo>>> = Arc::default();
        let record = done.clone();
        let options = backup.options.at_start(move |bql| {
            let mut undo = Vec::new();
            let mut serial = 0;
            for b in &bitmaps {
                if let Err(e) = apply_bitmap(bql, b, &mut undo, &mut serial) {
                    undo_bitmaps(bql, undo);
                    return Err(e);
                }
            }
            *record.lock().unwrap_or_else(|e| e.into_inner()) = undo;
            Ok(())
        });
        let jo = backup.jo;
        let job = self
            .main
            .run(move |bql| {
                let drained: Vec<_> = others.iter().map(|n| bql.drain(n)).collect();
                let started = blockgraph::job::backup(bql, &io, jo, options);
                let undo = std::mem::take(&mut *done.lock().unwrap_or_else(|e| e.into_inner()));
                match &started {
                    Ok(_) => commit_bitmaps(bql, undo),
                    Err(_) => undo_bitmaps(bql, undo),
                }
                drop(drained);
                started
            })
            .map_err(bitmap_err)?;
        self.track_job(&job, "backup", backup.busy, auto_finalize, false);
        Ok(())
    }

    /// Creates (or, with `mode=existing`, opens) a `-sync` overlay: a
    /// qcow2 image the size of `top` naming `top`'s file and format as its
    /// backing (QEMU's `bdrv_img_create`), on an implicit `file` node, as
    /// node `snapshot-node-name` without a backing node yet.
    fn create_overlay(
        &mut self,
        top: &NodeHandle,
        spec: &SyncSpec,
        created: &mut Vec<String>,
        files: &mut Vec<PathBuf>,
    ) -> QResult<NodeHandle> {
        let path = spec.snapshot_file.clone();
        let shown = path.display().to_string();
        let could_not = |e: String| QmpError::generic(format!("Could not create '{shown}': {e}"));
        if !spec.existing {
            let existed = path.exists();
            std::fs::File::create(&path)
                .map_err(|e| could_not(super::os_message(&blockgraph::Error::Io(e))))?;
            if !existed {
                files.push(path.clone());
            }
        }
        let file = self.add_node(
            NodeSpec {
                node_name: None,
                driver: "file",
                read_only: false,
                force_share: false,
                kind: Kind::File {
                    filename: path.clone(),
                    direct: false,
                    locking: true,
                    aio: None,
                },
            },
            None,
            created,
        )?;
        if !spec.existing {
            let (backing, format) = self
                .nodes
                .values()
                .find(|n| n.handle.ptr_eq(top))
                .map(|n| (n.filename.clone(), n.drv))
                .ok_or_else(|| QmpError::generic("the snapshot's top has no file name"))?;
            let (t, f) = (top.clone(), self.nodes[&file].handle.clone());
            self.io()?
                .spawn(move |mut cx| async move {
                    let g = cx.read().await;
                    let size = t.try_io(&g)?.length().await?;
                    let options = CreateOptions::new(size).backing(backing, format);
                    Qcow2Driver::create(f.try_io(&g)?, &options).await
                })
                .join()
                .map_err(|e| could_not(e.to_string()))?;
        }
        let name = spec.snapshot_node_name.clone().unwrap_or_default();
        let overlay = self.add_node(
            NodeSpec {
                node_name: Some(name.clone()),
                driver: "qcow2",
                read_only: false,
                force_share: false,
                kind: Kind::Qcow2 {
                    file: ChildSpec::Ref(file.clone()),
                    backing: Backing::Nothing,
                },
            },
            Some(name.clone()),
            created,
        )?;
        let node = self
            .nodes
            .get_mut(&overlay)
            .ok_or_else(|| QmpError::generic("the overlay vanished"))?;
        node.owned.push(file);
        Ok(node.handle.clone())
    }
}

/// `nodes` without repeats, in order.
fn distinct(nodes: impl Iterator<Item = NodeHandle>) -> Vec<NodeHandle> {
    let mut out: Vec<NodeHandle> = Vec::new();
    for n in nodes {
        if !out.iter().any(|o| o.ptr_eq(&n)) {
            out.push(n);
        }
    }
    out
}
