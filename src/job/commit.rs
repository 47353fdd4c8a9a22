//! `block-commit`: copy what the images between `top` and `base` of a
//! backing chain store down into `base`, then drop them from the chain
//! (QEMU's `block/commit.c`). With `top` the active layer this is an
//! *active commit*, run on the mirror machinery as QEMU's
//! `commit_active_start` runs on `block/mirror.c`: it goes READY and
//! pivots on `complete`.
//!
//! What it does, step by step: see [`commit`].

use crate::backend::BlockBackend;
use crate::driver::Filter;
use crate::drivers::qcow2::Qcow2Driver;
use crate::graph::proof::{Bql, NodeHandle, ParentRef};
use crate::graph::runtime::{IoTask, IoThreadHandle};
use crate::types::{BlockStatus, ChildRole, Error, Perm, Permissions, Result};

use super::copy::{copy_range, read_then_write, ChunkError, CopyChunks, CopyOptions};
use super::driver::{JobCx, JobDriver};
use super::filter::JobFilter;
use super::handle::{Job, JobOptions};
use super::setup::{dropped_with_their_files, job_backend, launch, remove_unused, ChainOptions};
use super::status::JobType;

/// What to commit (QEMU's `block-commit` arguments, for a `top` that is
/// not the active layer).
#[derive(Debug, Clone)]
pub struct CommitOptions {
    chain: ChainOptions,
}

impl CommitOptions {
    /// Commit `top` and every image below it down to the bottom of the
    /// chain into that bottom image (QEMU's default base). `top` must be
    /// an intermediate image: some image (its *overlay*) uses it as its
    /// backing file.
    pub fn new(top: &NodeHandle) -> Self {
        CommitOptions {
            chain: ChainOptions::new(top),
        }
    }

    chain_option_setters!(
        chain,
        base:
        /// Commit into `base` (a node below `top` in its backing chain); the
        /// images from `top` down to just above `base` are dropped.
        ,
        backing_file:
        /// The backing file name and format to write into the overlay's header
        /// (QEMU's `backing-file`). Default: the name the lowest committed
        /// image stores for `base` (right when that image and the overlay are
        /// in one directory, the usual layout).
    );

    common_option_setters!(
        chain.common,
        "commit",
        /// Chunk size and requests in flight of the copy.
    );
}

/// What goes into the overlay's header at the end.
#[derive(Debug, Clone)]
enum Header {
    /// The overlay is not a qcow2 image: it has no header to rewrite.
    Skip,
    Write {
        new: (String, String),
        /// What it stores now, written back if the graph change fails.
        old: Option<(String, String)>,
    },
}

/// The job's filter above the overlay (QEMU's `commit_top`): passes every
/// request down and shares everything on its child, so the overlay's
/// backing edge shares `WRITE` and the job may write `base`
/// (DESIGN §12, per-link permissions).
#[derive(Debug)]
struct CommitTop;

impl Filter for CommitTop {
    const CHILD: ChildRole = ChildRole::Filtered;

    fn format_name(&self) -> &'static str {
        "commit-top"
    }

    fn child_permissions(&self, _role: ChildRole, users: Permissions) -> Permissions {
        Permissions {
            take: users.take,
            share: Perm::ALL,
        }
    }
}

/// Starts a commit job (QEMU's `block-commit` of an intermediate image) on
/// this main loop, doing its I/O on `io`'s thread. Guest I/O continues on
/// the active layer meanwhile.
///
/// ```text
///  before:  vda → active → overlay → top → mid → base      (commit top, base = base)
///  during:  vda → active → commit filter → overlay → top → mid → base (read-write)
///                          job reader (on top) ↗   job writer (on base) ↗
///  after:   vda → active → overlay → base   (overlay's header names base)
/// ```
///
/// (`overlay` is often the active layer itself: a three-image chain.)
///
/// * **Setup** (main loop, this function): drains of the overlay and of
///   `base`, and one write section with one transaction that inserts the
///   job's filter above the overlay (it shares everything on the overlay,
///   so the overlay's backing edge lets a writer into the chain below,
///   QEMU's `commit_top`), adds the job's reader on `top` and, once `base`
///   is switched read-write if it was read-only, the job's writer on
///   `base` (both `stay_at_node`). Either all of it happens or none.
/// * **Run** (the job's I/O task): the copy engine walks the device; for
///   each range, [`BlockBackend::block_status_above`] (one request, under
///   the read lock) says whether an image from `top` down to just above
///   `base` stores it; such a range is read through the job's reader (the
///   view of `top`) and written into `base` through the writer. Nothing
///   else writes those images (the guest writes the active layer), so the
///   copy needs no range lock against the guest: `base` takes what the
///   guest already sees through `top`, which is why writing `base` early
///   changes no guest-visible byte.
/// * **Prepare** (finalization): `base` is flushed through the writer (the
///   copied data is durable before anything stops naming `top`); the
///   overlay's header is rewritten to name `base`
///   ([`Qcow2Driver::change_backing_file`], under the read lock, the
///   overlay switched read-write for it if it is read-only), as QEMU's
///   `bdrv_drop_intermediate` updates the file name before the graph; then
///   on the main loop, drains of the filter, the overlay, every committed
///   image and its file, and one write section with one transaction that
///   removes the job's backends and filter, makes `base` the overlay's
///   backing and removes each committed image (and its file node) that
///   nobody else uses. If that transaction fails, the overlay's old
///   header is written back.
/// * **Clean** (either way): whatever of the filter and the backends is
///   still there is removed, and `base` (and the overlay) switched back to
///   read-only if the job made them read-write. A cancelled or failed
///   commit leaves the chain as it was; what it copied into `base` is what
///   `top` showed there already, invisible to the guest.
///
/// **Active commit** (`top` is the active layer: no image uses it as its
/// backing file; QEMU's `block-commit` of the active layer, which needs
/// `job-complete`): the mirror job's machinery with `top` as its source
/// and `base` as its target, in a mode where the target is below the
/// source in its own chain.
///
/// ```text
///  before:  vda → top → mid → base
///  during:  vda → <job>-commit (mirror_top) → top → mid → base (read-write)
///                        ╰────────── data edge ─────────────↗
///  after complete:  vda → base (read-write: the new active layer)
///  after cancel:    vda → top → mid → base (read-only again, if it was)
/// ```
///
/// * **Setup** (main loop): drains of `top` and `base`, one write section,
///   one transaction: `base` switched read-write if it was read-only, the
///   mirror filter inserted above `top` with an edge to `base`, the job's
///   reader on `top` and writer on `base`. The filter shares `WRITE` on
///   `top`, so every backing edge below shares it (DESIGN §12's per-link
///   rule) and the job may write `base` while the chain reads it; its
///   edge to `base` and the writer share consistent reads for that chain.
/// * **Run** (job task): the initial pass copies what `top`..`base`
///   stores ([`BlockBackend::block_status_above`] `base`) from the view of
///   `top` into `base`; guest writes mark the job's dirty bitmap on `top`; the
///   dirty loop copies it clean, then READY, and keeps copying.
/// * **Prepare** after `complete`: mirror's convergence (write-through,
///   copy until clean, flush `base`), then on the main loop, drains of the
///   filter, `base` and every committed image and its file, the bitmap
///   checked clean there, and one transaction: the job's backends
///   removed, the filter's edge to `base` detached, every user of the
///   filter moved onto `base`, the filter removed, then each committed
///   image (and file) nobody else uses removed. `base` stays read-write.
/// * **Cancel** after READY (without force: the job completes without the
///   pivot, as a mirror's does; with force or before READY: cancelled):
///   the filter and backends go, `base` is flushed and switched back to
///   read-only if the job made it read-write. The chain is as it was:
///   what the job wrote into `base` is stored above it too, so the
///   guest's view never changed.
///
/// # Errors
///
/// An invalid or duplicate job id; `top` removed or of another graph;
/// `top` the backing file of several images; a backing file name given
/// for an active commit (there is no overlay header to write it into);
/// `base` not below `top`, or no image below `top`; no backing file name
/// to write (see [`CommitOptions::backing_file`]); the filter node's name
/// taken; `base` that cannot become read-write; a permission conflict
/// (another writer on `base`). Nothing is changed then.
///
/// # Examples
///
/// ```no_run
/// use blockgraph::job::{self, CommitOptions, JobOptions};
/// # fn f(main: &blockgraph::MainLoop, io: &blockgraph::IoThread,
/// #      mid: blockgraph::NodeHandle, base: blockgraph::NodeHandle) -> blockgraph::Result<()> {
/// let io = io.handle();
/// let job = main.run(move |bql| {
///     job::commit(bql, &io, JobOptions::new("commit0"), CommitOptions::new(&mid).base(&base))
/// })?;
/// // … wait for `job.events()` to report `Completed` …
/// # Ok(()) }
/// ```
pub fn commit(
    bql: &mut Bql,
    io: &IoThreadHandle,
    options: JobOptions,
    commit: CommitOptions,
) -> Result<Job> {
    let o = &commit.chain;
    if is_active_layer(bql, &o.top) {
        return launch(bql, io, JobType::Commit, &options, |bql, job| {
            set_up_active(bql, io, job, o)
        });
    }
    launch(bql, io, JobType::Commit, &options, |bql, job| {
        set_up(bql, job, o)
    })
}

/// `top` is in the graph and no image uses it as its backing file.
fn is_active_layer(bql: &Bql, top: &NodeHandle) -> bool {
    let t = top.gs(bql);
    t.is_in_graph()
        && !t.parents().any(|p| {
            matches!(
                p,
                ParentRef::Node {
                    role: ChildRole::Backing,
                    ..
                }
            )
        })
}

/// The images from `top` down to just above `base` (top first), and
/// `base`: the explicit one, which must be below `top`, or the bottom of
/// `top`'s chain.
fn committed_range(bql: &Bql, o: &ChainOptions) -> Result<(Vec<NodeHandle>, NodeHandle)> {
    let top = o.top.gs(bql);
    let chain = top.backing_chain();
    let base_at = match &o.base {
        None if chain.len() < 2 => {
            return Err(Error::InvalidArgument(format!(
                "block-commit: '{}' has no backing file: there is nothing to commit into",
                top.name()
            )))
        }
        None => chain.len() - 1,
        Some(base) => chain
            .iter()
            .skip(1)
            .position(|n| n.name() == base.name())
            .map(|i| i + 1)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "block-commit: '{}' is not in the backing chain below '{}'",
                    base.name(),
                    top.name()
                ))
            })?,
    };
    Ok((
        chain[..base_at].iter().map(|n| n.to_handle()).collect(),
        chain[base_at].to_handle(),
    ))
}

/// Active commit: the mirror machinery with `top` as the source and `base`
/// as the target (see [`commit`]).
fn set_up_active(
    bql: &mut Bql,
    io: &IoThreadHandle,
    job: &Job,
    o: &ChainOptions,
) -> Result<super::mirror::MirrorJob> {
    if o.backing_file.is_some() {
        return Err(Error::InvalidArgument(format!(
            "block-commit: '{}' is the active layer: no image above it has a header to \
             rewrite, so a backing file name makes no sense",
            o.top.name()
        )));
    }
    let range = committed_range(bql, o)?;
    let filter_name = o.common.filter_name(job, "commit");
    super::mirror::active_commit(bql, io, job, &o.top, range, filter_name, o.common.copy)
}

/// What setup found in the graph.
struct Plan {
    overlay: NodeHandle,
    intermediates: Vec<NodeHandle>,
    base: NodeHandle,
    header: Header,
    base_read_only: bool,
    overlay_read_only: bool,
}

fn plan(bql: &Bql, o: &ChainOptions) -> Result<Plan> {
    let top = o.top.gs(bql);
    if !top.is_in_graph() {
        return Err(Error::NodeRemoved(top.name().to_owned()));
    }
    let overlays: Vec<_> = top
        .parents()
        .filter_map(|p| match p {
            ParentRef::Node {
                node,
                role: ChildRole::Backing,
            } => Some(node),
            _ => None,
        })
        .collect();
    let overlay = match overlays.as_slice() {
        [one] => *one,
        [] => {
            return Err(Error::InvalidArgument(format!(
                "block-commit: '{}' is the active layer (no image uses it as its backing \
                 file): that is an active commit",
                top.name()
            )))
        }
        _ => {
            return Err(Error::InvalidArgument(format!(
                "block-commit: '{}' is the backing file of several images ({}); commit \
                 needs the one image above it",
                top.name(),
                overlays
                    .iter()
                    .map(|n| format!("'{}'", n.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let (intermediates, base) = committed_range(bql, o)?;
    let header = match overlay.driver_as::<Qcow2Driver>() {
        None => Header::Skip,
        Some(q) => {
            let old = q
                .backing_file()
                .map(|f| (f, q.backing_format().unwrap_or_default()));
            let new = match &o.backing_file {
                Some(explicit) => explicit.clone(),
                None => {
                    let base = base.gs(bql);
                    let lowest = intermediates
                        .last()
                        .expect("base is strictly below top")
                        .gs(bql);
                    lowest
                        .driver_as::<Qcow2Driver>()
                        .and_then(|q| {
                            let format = q
                                .backing_format()
                                .unwrap_or_else(|| base.driver_name().to_owned());
                            q.backing_file().map(|f| (f, format))
                        })
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "block-commit: '{}' stores no backing file name for '{}'; say \
                                 which to write into '{}' (CommitOptions::backing_file)",
                                lowest.name(),
                                base.name(),
                                overlay.name()
                            ))
                        })?
                }
            };
            Header::Write { new, old }
        }
    };
    Ok(Plan {
        overlay: overlay.to_handle(),
        base_read_only: base.gs(bql).driver().is_read_only(),
        intermediates,
        base,
        header,
        overlay_read_only: overlay.driver().is_read_only(),
    })
}

fn set_up(bql: &mut Bql, job: &Job, o: &ChainOptions) -> Result<CommitJob> {
    let plan = plan(bql, o)?;
    let filter_name = o.common.filter_name(job, "commit");
    // Reads the view of top; lets everyone do anything (top is read-only
    // anyway, or written only by whoever was allowed to).
    let reader_options = job_backend(Perm::CONSISTENT_READ, Perm::ALL);
    // QEMU's commit base: the only writer; readers and unchanged-data
    // writers may stay.
    let writer_options = job_backend(
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    );
    let overlay_drained = bql.drain(&plan.overlay);
    let base_drained = bql.drain(&plan.base);
    let added = bql.write(|w| {
        w.transaction(|w| {
            let filter = w.insert_filter(
                &overlay_drained,
                &filter_name,
                JobFilter::new(CommitTop, job.clone()),
            )?;
            let reader =
                w.add_backend(&format!("{}-commit-top", job.id()), &o.top, reader_options)?;
            if plan.base_read_only {
                w.set_read_only(&base_drained, false)?;
            }
            let writer = w.add_backend(
                &format!("{}-commit-base", job.id()),
                &plan.base,
                writer_options,
            )?;
            Ok((filter, reader, writer))
        })
    });
    drop(base_drained);
    drop(overlay_drained);
    let (filter, reader, writer) = added?;
    Ok(CommitJob {
        top: o.top.clone(),
        overlay: plan.overlay,
        intermediates: plan.intermediates,
        base: plan.base,
        filter,
        reader,
        writer,
        header: plan.header,
        base_made_rw: plan.base_read_only,
        overlay_read_only: plan.overlay_read_only,
        overlay_made_rw: false,
        header_written: false,
        copy: o.common.copy,
    })
}

struct CommitJob {
    top: NodeHandle,
    overlay: NodeHandle,
    /// `top` and the images below it, down to just above `base`.
    intermediates: Vec<NodeHandle>,
    base: NodeHandle,
    filter: NodeHandle,
    reader: BlockBackend,
    writer: BlockBackend,
    header: Header,
    /// `base` was read-only: setup switched it; clean switches it back.
    base_made_rw: bool,
    overlay_read_only: bool,
    /// The overlay was switched read-write for its header.
    overlay_made_rw: bool,
    /// The overlay's header names `base` now.
    header_written: bool,
    copy: CopyOptions,
}

/// Commit's hook for the copy engine.
struct CommitChunks {
    reader: BlockBackend,
    writer: BlockBackend,
    base: NodeHandle,
}

impl CopyChunks for CommitChunks {
    async fn needs_copy(&self, io: &mut IoTask, offset: u64, len: u64) -> Result<(bool, u64)> {
        // Stored by top or an image below it, above base (data or zeroes
        // that hide base's data): copy it down.
        let (status, n) = self
            .reader
            .block_status_above(io, Some(&self.base), offset, len)
            .await?;
        Ok((status != BlockStatus::Unallocated, n))
    }

    async fn copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), ChunkError> {
        read_then_write(io, &self.reader, &self.writer, offset, buf).await
    }
}

impl CommitJob {
    /// Writes `name` into the overlay's header, under a read guard of the
    /// job's task.
    async fn write_header(&self, io: &mut IoTask, name: Option<&(String, String)>) -> Result<()> {
        let guard = io.read().await;
        let node = self.overlay.try_io(&guard)?;
        let q = node.driver_as::<Qcow2Driver>().ok_or_else(|| {
            Error::InvalidArgument(format!("'{}' is no longer a qcow2 image", node.name()))
        })?;
        q.change_backing_file(node, name.map(|(f, t)| (f.as_str(), t.as_str())))
            .await
    }
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    async fn run(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let len = self.reader.length(cx.io()).await?;
        let base_len = self.writer.length(cx.io()).await?;
        if base_len < len {
            return Err(Error::InvalidArgument(format!(
                "block-commit: '{}' ({base_len} bytes) is smaller than '{}' ({len} bytes); \
                 resize it first",
                self.base.name(),
                self.top.name()
            )));
        }
        let alignment = u64::from(self.reader.request_alignment(cx.io()).await?)
            .max(u64::from(self.writer.request_alignment(cx.io()).await?));
        let options = self.copy.aligned_to(alignment);
        let chunks = CommitChunks {
            reader: self.reader.clone(),
            writer: self.writer.clone(),
            base: self.base.clone(),
        };
        let report = copy_range(cx, &chunks, 0..len, &options).await?;
        // A range the `ignore` policy skipped is missing from base:
        // dropping top would lose it.
        match report.ignored {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn prepare(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        // What was copied is durable before anything stops naming top.
        self.writer.flush(cx.io()).await?;
        if let Header::Write { new, .. } = self.header.clone() {
            if self.overlay_read_only {
                let overlay = self.overlay.clone();
                cx.on_main_loop(move |bql| {
                    let d = bql.drain(&overlay);
                    bql.write(|w| w.set_read_only(&d, false))
                })
                .await??;
                self.overlay_made_rw = true;
            }
            self.write_header(cx.io(), Some(&new)).await?;
            self.header_written = true;
        }
        let (overlay, base, filter, reader, writer) = (
            self.overlay.clone(),
            self.base.clone(),
            self.filter.clone(),
            self.reader.clone(),
            self.writer.clone(),
        );
        let intermediates = self.intermediates.clone();
        cx.on_main_loop(move |bql| {
            // The committed images and their files, each drained.
            let doomed = dropped_with_their_files(bql, &intermediates);
            let filter_drained = bql.drain(&filter);
            let overlay_drained = bql.drain(&overlay);
            let drained: Vec<_> = doomed.iter().map(|n| bql.drain(n)).collect();
            bql.write(|w| {
                w.transaction(|w| {
                    w.remove_backend(&reader)?;
                    w.remove_backend(&writer)?;
                    w.remove_filter(&filter_drained)?;
                    w.set_backing(&overlay_drained, Some(&base))?;
                    remove_unused(w, &drained)
                })
            })
        })
        .await?
    }

    async fn abort(&mut self, cx: &mut JobCx<'_>) {
        // The graph still has top under the overlay: so must its header.
        if self.header_written {
            if let Header::Write { old, .. } = self.header.clone() {
                match self.write_header(cx.io(), old.as_ref()).await {
                    Ok(()) => self.header_written = false,
                    Err(e) => tracing::warn!(
                        "commit job '{}': the header of '{}' still names '{}' (equivalent \
                         data): writing back its old backing file name failed: {e}",
                        cx.job().id(),
                        self.overlay.name(),
                        self.base.name()
                    ),
                }
            }
        }
    }

    async fn clean(&mut self, cx: &mut JobCx<'_>) {
        // Going read-only needs the metadata on disk: flush what the job
        // made writable (an error here: the backend is gone, because
        // prepare flushed and removed it).
        if self.base_made_rw {
            let _ = self.writer.flush(cx.io()).await;
        }
        if self.overlay_made_rw {
            let guard = cx.io().read().await;
            if let Ok(node) = self.overlay.try_io(&guard) {
                let _ = node.flush().await;
            }
        }
        let (filter, reader, writer, base, overlay) = (
            self.filter.clone(),
            self.reader.clone(),
            self.writer.clone(),
            self.base.clone(),
            self.overlay.clone(),
        );
        let restore = [(base, self.base_made_rw), (overlay, self.overlay_made_rw)];
        let failed = cx
            .on_main_loop(move |bql| {
                let _ = bql.write(|w| w.remove_backend(&reader));
                let _ = bql.write(|w| w.remove_backend(&writer));
                if filter.gs(bql).is_in_graph() {
                    let d = bql.drain(&filter);
                    let _ = bql.write(|w| w.remove_filter(&d));
                }
                let mut failed = Vec::new();
                for (node, made_rw) in restore {
                    if made_rw && node.gs(bql).is_in_graph() {
                        let d = bql.drain(&node);
                        if let Err(e) = bql.write(|w| w.set_read_only(&d, true)) {
                            failed.push(format!("'{}': {e}", node.name()));
                        }
                    }
                }
                failed
            })
            .await;
        match failed {
            Ok(failed) if failed.is_empty() => {}
            Ok(failed) => tracing::warn!(
                "commit job '{}': could not switch back to read-only: {}",
                cx.job().id(),
                failed.join("; ")
            ),
            Err(e) => tracing::warn!("commit job '{}': clean-up failed: {e}", cx.job().id()),
        }
    }
}
