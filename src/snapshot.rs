//! Live external snapshots (QEMU's `blockdev-snapshot-sync` and
//! `blockdev-snapshot`), one disk or several at one instant.
//!
//! A snapshot puts a new qcow2 *overlay* on top of a disk's current top
//! node: the overlay takes over the top's users (the guest's backend,
//! exports), reads what it does not store from the old top through its
//! backing edge, and receives every later write. The old top becomes
//! read-only (with its file), so it is a stable image from then on (to
//! copy, back up, or commit later).
//!
//! [`snapshot_sync`] creates the overlay files itself (a qcow2 image the
//! size of the top, backed by the top's file with its format recorded, as
//! `qemu-img create -f qcow2 -b <top> -F <fmt>` does), opens them and
//! appends them; [`snapshot`] appends overlay nodes the caller already
//! added. Either takes several disks: they are all drained together, their
//! caches flushed, and the graph changes made in one
//! [`GraphWriter::transaction`](crate::GraphWriter::transaction), so the
//! snapshots are of one instant and either all happen or none does (on
//! error the graph is as before and the files `snapshot_sync` created are
//! removed). Guest requests that arrive meanwhile queue at their backends
//! and continue into the overlays.
//!
//! Both are async main-loop operations ([`MainTask`]); the I/O they need
//! (formatting the overlays, flushing the old tops) runs on `io`.

use std::path::{Path, PathBuf};

use crate::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use crate::drivers::{FileDriver, FileOptions};
use crate::graph::proof::{Drained, NodeHandle};
use crate::graph::runtime::{IoThread, MainTask};
use crate::types::{ChildRole, Error, Result};

/// One disk of a [`snapshot_sync`] (QEMU's `blockdev-snapshot-sync`
/// arguments with `mode=absolute-paths`, `format=qcow2`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SnapshotSync {
    /// The disk's current top node, which the overlay goes on.
    pub top: NodeHandle,
    /// Where to create the overlay image (it must not exist).
    pub overlay_file: PathBuf,
    /// The overlay's node name (QEMU's `snapshot-node-name`).
    pub overlay_node: String,
    /// The name of the overlay's `file` node.
    pub file_node: String,
}

impl SnapshotSync {
    /// A snapshot of `top` into a new qcow2 image at `overlay_file`, as
    /// node `overlay_node` on a file node `overlay_node` + `-file`.
    pub fn new(top: &NodeHandle, overlay_file: impl Into<PathBuf>, overlay_node: &str) -> Self {
        SnapshotSync {
            top: top.clone(),
            overlay_file: overlay_file.into(),
            overlay_node: overlay_node.to_owned(),
            file_node: format!("{overlay_node}-file"),
        }
    }
}

/// Creates a qcow2 overlay for every disk in `disks` and puts them all on
/// top at one instant (QEMU's `blockdev-snapshot-sync`, several of them in
/// one `transaction`). Returns the overlay nodes, in `disks`' order.
///
/// For each disk: the overlay image is created at `overlay_file` with the
/// top's size, the top's file as its backing file (its name relative to
/// the overlay's directory when they share one, else absolute) and the
/// top's format; it is opened as a qcow2 node on a new `file` node. Then
/// every top is drained, flushed (its cached metadata written back: it is
/// about to become read-only) and, in one transaction, gets its overlay
/// appended and is switched read-only with its file.
///
/// # Errors
///
/// A top whose file cannot be found ([`Error::InvalidArgument`]: the top
/// must be a `file` node or have one as its `file` child), an overlay file
/// that exists, the I/O errors of creating and flushing, and whatever the
/// transaction refuses (a duplicate name, a top that another user writes
/// and so cannot become read-only). On any error nothing has changed: the
/// nodes and files made for the snapshot are removed again.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::{FileDriver, FileOptions}, snapshot, BackendOptions, MainLoop};
///
/// let dir = tempfile::tempdir()?;
/// let base = FileDriver::create(dir.path().join("base.raw"), 1 << 20, FileOptions::default())?;
/// let main = MainLoop::new()?;
/// let io = main.new_io_thread("io0")?;
/// let top = main.run(|bql| bql.write(|w| {
///     let top = w.add_node("base", base, &[])?;
///     w.add_backend("vda", &top, BackendOptions::default())?;
///     Ok::<_, blockgraph::Error>(top)
/// }))?;
/// let overlay_path = dir.path().join("snap.qcow2");
/// let p = overlay_path.clone();
/// let overlays = main.spawn(move |mut task| async move {
///     let disk = snapshot::SnapshotSync::new(&top, p, "snap");
///     snapshot::snapshot_sync(&mut task, &io, &[disk]).await
/// }).join()?;
/// assert_eq!(overlays[0].name(), "snap");
/// let nodes = main.run(|bql| bql.query_nodes());
/// let base = nodes.iter().find(|n| n.name == "base").unwrap();
/// assert!(base.read_only);
/// assert!(overlay_path.exists());
/// # main.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub async fn snapshot_sync(
    main: &mut MainTask,
    io: &IoThread,
    disks: &[SnapshotSync],
) -> Result<Vec<NodeHandle>> {
    let mut made = Made::default();
    match sync_inner(main, io, disks, &mut made).await {
        Ok(overlays) => Ok(overlays),
        Err(e) => {
            made.undo(main).await;
            Err(e)
        }
    }
}

/// Puts existing overlay nodes on top of disks at one instant (QEMU's
/// `blockdev-snapshot`, several in one `transaction`): for each
/// `(top, overlay)`, `overlay` gets `top` as its backing node and takes
/// over `top`'s users, and `top` becomes read-only with its file.
///
/// `overlay` must have been added without a backing node and without
/// users (QEMU: "The overlay already has a backing image" / "is in use"),
/// for instance a qcow2 node opened with
/// [`Qcow2Options::require_backing`] off; its image's backing file name
/// is not changed.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an overlay with a backing node or users,
/// or the same node twice; the flush's errors; whatever the transaction
/// refuses. On error nothing has changed.
pub async fn snapshot(
    main: &mut MainTask,
    io: &IoThread,
    disks: &[(NodeHandle, NodeHandle)],
) -> Result<()> {
    main.bql(|bql| -> Result<()> {
        for (i, (top, overlay)) in disks.iter().enumerate() {
            if top.ptr_eq(overlay) {
                return Err(Error::InvalidArgument(format!(
                    "node '{}' cannot be its own overlay",
                    top.name()
                )));
            }
            for (other_top, other_overlay) in &disks[..i] {
                if other_top.ptr_eq(top) || other_overlay.ptr_eq(overlay) {
                    return Err(Error::InvalidArgument(format!(
                        "node '{}' or '{}' is named twice in one snapshot",
                        top.name(),
                        overlay.name()
                    )));
                }
            }
            let o = overlay.gs(bql);
            if o.backing().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "the overlay '{}' already has a backing image",
                    o.name()
                )));
            }
            if o.parents().len() != 0 {
                return Err(Error::InvalidArgument(format!(
                    "the overlay '{}' is in use",
                    o.name()
                )));
            }
        }
        Ok(())
    })?;
    let mut drained_tops: Vec<Drained<'_>> = Vec::new();
    let mut drained_overlays: Vec<Drained<'_>> = Vec::new();
    for (top, overlay) in disks {
        drained_tops.push(main.drain(top).await);
        drained_overlays.push(main.drain(overlay).await);
    }
    for d in &drained_tops {
        d.flush(io).await?;
    }
    main.write(|w| {
        w.transaction(|w| {
            for (top, overlay) in drained_tops.iter().zip(&drained_overlays) {
                let top_handle = &disks
                    .iter()
                    .find(|(t, _)| t.name() == top.name())
                    .expect("drained from disks")
                    .0;
                // Users move first: the overlay's backing edge does not
                // share WRITE, so it can join only once the top's writers
                // have left (each step of a transaction is checked).
                w.replace_node(top, overlay)?;
                w.set_backing(overlay, Some(top_handle))?;
                w.set_read_only(top, true)?;
            }
            Ok(())
        })
    })
    .await
}

/// What `snapshot_sync` made so far, to remove on error.
#[derive(Default)]
struct Made {
    files: Vec<PathBuf>,
    nodes: Vec<NodeHandle>,
}

impl Made {
    async fn undo(self, main: &mut MainTask) {
        // Overlays first (they use the file nodes); each has no user if
        // the transaction rolled back.
        for node in self.nodes.iter().rev() {
            let still_there = main.bql(|bql| node.gs(bql).is_in_graph());
            if !still_there {
                continue;
            }
            let drained = main.drain(node).await;
            let _ = main.write(|w| w.remove_node(&drained)).await;
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The top's host file and format, for the overlay's header.
fn backing_of(main: &mut MainTask, top: &NodeHandle) -> Result<(PathBuf, String)> {
    main.bql(|bql| {
        let node = top.gs(bql);
        if let Some(f) = node.driver_as::<FileDriver>() {
            return Ok((f.path().to_owned(), "raw".to_owned()));
        }
        let file = node
            .child(ChildRole::File)
            .and_then(|c| c.driver_as::<FileDriver>().map(|f| f.path().to_owned()));
        match file {
            Some(path) => Ok((path, node.driver_name().to_owned())),
            None => Err(Error::InvalidArgument(format!(
                "cannot snapshot node '{}': it is not a file node and has no file child \
                 (its image has no file name to record in the overlay)",
                node.name()
            ))),
        }
    })
}

/// The backing file name to store in an overlay at `overlay`: relative to
/// the overlay's directory when `backing` is in it (what a reader resolves
/// under the default backing policy), absolute otherwise.
fn backing_name(overlay: &Path, backing: &Path) -> String {
    match (overlay.parent(), backing.parent(), backing.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().into_owned(),
        _ => backing.display().to_string(),
    }
}

async fn sync_inner(
    main: &mut MainTask,
    io: &IoThread,
    disks: &[SnapshotSync],
    made: &mut Made,
) -> Result<Vec<NodeHandle>> {
    let mut overlays: Vec<(NodeHandle, Qcow2Driver)> = Vec::new();
    for disk in disks {
        if disk.overlay_file.exists() {
            return Err(Error::InvalidArgument(format!(
                "the overlay file '{}' exists",
                disk.overlay_file.display()
            )));
        }
        let (backing, format) = backing_of(main, &disk.top)?;
        let file = FileDriver::create(&disk.overlay_file, 0, FileOptions::default())?;
        made.files.push(disk.overlay_file.clone());
        let name = disk.file_node.clone();
        let file_node = main.write(|w| w.add_node(&name, file, &[])).await?;
        made.nodes.push(file_node.clone());
        let top = disk.top.clone();
        let f = file_node.clone();
        let backing_file = backing_name(&disk.overlay_file, &backing);
        let driver = io
            .spawn(move |mut cx| async move {
                let g = cx.read().await;
                let size = top.try_io(&g)?.length().await?;
                let options = CreateOptions::new(size).backing(backing_file, format);
                Qcow2Driver::create(f.try_io(&g)?, &options).await?;
                Qcow2Driver::open(f.try_io(&g)?, Qcow2Options::default()).await
            })
            .await?;
        overlays.push((file_node, driver));
    }

    let mut drained: Vec<Drained<'_>> = Vec::new();
    for disk in disks {
        drained.push(main.drain(&disk.top).await);
    }
    for d in &drained {
        d.flush(io).await?;
    }
    let created = main
        .write(|w| {
            w.transaction(|w| {
                let mut out = Vec::new();
                for ((disk, top), (file_node, driver)) in disks.iter().zip(&drained).zip(overlays) {
                    let overlay = w.append_overlay(
                        top,
                        &disk.overlay_node,
                        driver,
                        &[(ChildRole::File, &file_node)],
                    )?;
                    w.set_read_only(top, true)?;
                    out.push(overlay);
                }
                Ok(out)
            })
        })
        .await?;
    Ok(created)
}
