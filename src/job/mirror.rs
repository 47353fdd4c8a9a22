//! `blockdev-mirror` / `drive-mirror`: copy a device to a target while the
//! guest keeps writing it, keep the target in sync, and on `complete`
//! pivot the source's users onto the target (QEMU's `block/mirror.c`).
//!
//! What it does, step by step: see [`mirror`].

use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::backend::BlockBackend;
use crate::driver::range_lock::RangeLock;
use crate::driver::{forward, Filter, IoFuture};
use crate::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use crate::drivers::{FileDriver, FileOptions};
use crate::graph::dirty_bitmap::{DirtyBitmapOptions, MAX_GRANULARITY, MIN_GRANULARITY};
use crate::graph::proof::{Bql, NodeHandle, NodeRef, Proof, RequestRef};
use crate::graph::runtime::{IoTask, IoThreadHandle};
use crate::types::{BlockStatus, ChildRole, Error, Perm, Permissions, Result};

use super::copy::{copy_range, read_then_write, ChunkError, CopyChunks, CopyOptions};
use super::driver::{JobCx, JobDriver, JobRunner};
use super::filter::JobFilter;
use super::handle::{Job, JobOptions};
use super::setup::{
    dropped_with_their_files, job_backend, launch, length_of, remove_unused, CommonOptions,
};
use super::shared::JobShared;
use super::status::JobType;

/// What the initial copy covers (QEMU's `MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MirrorSync {
    /// The whole device, as the guest sees it (every layer of the chain).
    #[default]
    Full,
    /// Only what the source's top image stores; the rest is expected to
    /// come from the target's backing file (the source's backing).
    Top,
    /// Nothing: only what the guest writes from the job's start on.
    None,
}

/// How guest writes reach the target (QEMU's `MirrorCopyMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// A guest write goes to the source only and marks its range dirty;
    /// the job's copy loop catches up (QEMU's `background`).
    #[default]
    Background,
    /// A guest write goes to the source and the target before it
    /// completes, so the target never falls behind on written data
    /// (QEMU's `write-blocking`, active mirroring).
    WriteBlocking,
}

/// The format of a target the job creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A qcow2 image on a new file.
    Qcow2,
    /// A raw file.
    Raw,
}

/// Where the mirror goes.
#[derive(Debug, Clone)]
pub enum MirrorTarget {
    /// An existing node (QEMU's `blockdev-mirror`): nobody else may use it
    /// while the job runs; it must be at least as large as the source.
    Node(NodeHandle),
    /// A new image the job creates (QEMU's `drive-mirror` with
    /// `mode=absolute-paths`): `path` must not exist; the image gets the
    /// source's size. The node is named `node_name` (a qcow2 image's file
    /// node `<node_name>-file`).
    NewImage {
        /// The host file to create.
        path: PathBuf,
        /// Its format.
        format: ImageFormat,
        /// The new node's name.
        node_name: String,
        /// For a qcow2 target: make the source's backing image its backing
        /// (named by its file in the header), which is what `sync=top`
        /// needs to show the guest's data. Ignored for raw.
        backing: bool,
    },
}

/// What to mirror, and how (QEMU's `blockdev-mirror` arguments).
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    source: NodeHandle,
    target: MirrorTarget,
    sync: MirrorSync,
    mode: CopyMode,
    granularity: u64,
    common: CommonOptions,
}

impl MirrorOptions {
    /// Mirror `source` (the node whose users the job pivots) to `target`,
    /// with `sync=full`, background copy and a 64 KiB granularity.
    pub fn new(source: &NodeHandle, target: MirrorTarget) -> Self {
        MirrorOptions {
            source: source.clone(),
            target,
            sync: MirrorSync::Full,
            mode: CopyMode::Background,
            granularity: 64 << 10,
            common: CommonOptions::new(CopyOptions {
                chunk_size: 1 << 20,
                ..CopyOptions::default()
            }),
        }
    }

    /// What the initial copy covers.
    pub fn sync(mut self, sync: MirrorSync) -> Self {
        self.sync = sync;
        self
    }

    /// How guest writes reach the target.
    pub fn copy_mode(mut self, mode: CopyMode) -> Self {
        self.mode = mode;
        self
    }

    /// The granularity of the job's dirty bitmap on the source, in bytes
    /// (QEMU's `granularity`; rounded up to a power of two from 512 bytes
    /// to 2 GiB; default 64 KiB).
    pub fn granularity(mut self, bytes: u64) -> Self {
        self.granularity = bytes;
        self
    }

    common_option_setters!(
        common,
        "mirror",
        /// Chunk size and requests in flight of the initial copy (default
        /// 1 MiB chunks, 4 in flight); a chunk is also the most the dirty loop
        /// copies at once.
    );
}

/// The name of a mirror job's dirty bitmap on its source, `#mirror:<job
/// id>` (`#` as QEMU's generated node names): one per job, so two jobs on
/// one source do not meet. The bitmap is busy while the job runs (no user
/// verb can change or remove it), removed when the job ends; a user bitmap
/// of that name on the source, made before the job, makes setup fail
/// ([`Error::BitmapExists`]) with nothing changed.
fn bitmap_name(job: &Job) -> String {
    format!("#mirror:{}", job.id())
}

/// What the filter and the job share.
#[derive(Debug)]
struct MirrorState {
    /// The job's dirty bitmap on the source (DESIGN §15): created disabled,
    /// so the request path records nothing into it; the filter marks it,
    /// and only where the target did not get the change (QEMU's mirror
    /// disables its bitmap the same way and marks it from `mirror_top`).
    bitmap: String,
    /// Its granularity in bytes.
    granule: u64,
    /// Woken when the filter marks the bitmap while the job waits for
    /// work ([`MirrorState::waiting`]).
    became_dirty: Notify,
    /// The job is about to wait, or waits, for the bitmap to get dirty.
    waiting: AtomicBool,
    /// Copies take their range serialising; write-through guest writes a
    /// plain range: a copy never interleaves with a guest write that goes
    /// to the target too.
    lock: RangeLock,
    /// Guest writes go to the target too (write-blocking mode, and every
    /// mode once the job converges for `complete` or a cancel after
    /// ready).
    write_through: AtomicBool,
}

/// The role of the filter's edge to the target.
const TARGET: ChildRole = ChildRole::Data;

/// What the filter's target edge and the job's writer share: only writing
/// (nobody reads a half-copied image), and for an active commit also
/// consistent reads — the target is `base`, which the chain above reads,
/// and what the job writes there is what that chain shows already.
fn target_share(commit: bool) -> Perm {
    if commit {
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED
    } else {
        Perm::WRITE | Perm::WRITE_UNCHANGED
    }
}

/// An active commit run on the mirror machinery (see
/// [`commit`](super::commit)): what the pivot drops and what clean undoes.
#[derive(Debug)]
pub(super) struct ActiveCommit {
    /// The active layer and the images below it, down to just above
    /// `base` (the target), top first.
    pub(super) intermediates: Vec<NodeHandle>,
    /// `base` was read-only: setup switched it; clean switches it back
    /// unless the job pivoted (then it is the new active layer).
    pub(super) base_made_rw: bool,
    /// The users moved onto `base`.
    pub(super) pivoted: bool,
}

/// The mirror filter (QEMU's `mirror_top`), above the source: passes every
/// request to the source and records what guests change in the job's
/// dirty bitmap on the source; in write-through mode also writes the change
/// to the target (its `Data` child) before completing it.
#[derive(Debug)]
struct MirrorTop {
    state: Arc<MirrorState>,
    /// Active commit: the target is below the source in its own chain.
    commit: bool,
}

impl MirrorTop {
    /// A change of `[offset, offset + len)`: `source` makes it on the
    /// source, `target` on the target.
    fn change<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
        source: IoFuture<'a, ()>,
        target: impl FnOnce() -> Option<IoFuture<'a, ()>> + Send + 'a,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let state = &self.state;
            if !state.write_through.load(Ordering::SeqCst) {
                source.await?;
                // Marked once the source has it: a copy that took the
                // range before this point reads it again later.
                return self.mark(node, offset, len);
            }
            let _range = state
                .lock
                .lock(offset, offset.saturating_add(len), false)
                .await;
            source.await?;
            let mirrored = match target() {
                Some(t) => t.await.is_ok(),
                None => false,
            };
            if !mirrored {
                // The job copies it (and its error policy sees a failure).
                return self.mark(node, offset, len);
            }
            Ok(())
        })
    }

    /// Marks `[offset, offset + len)` in the job's bitmap on the source
    /// (the filter's child) and wakes the job if it waits for work.
    fn mark(&self, node: RequestRef<'_>, offset: u64, len: u64) -> Result<()> {
        let state = &self.state;
        let source = node.child(ChildRole::Filtered).ok_or_else(|| {
            Error::driver("mirror_top", "the filter has no source to record writes on")
        })?;
        source.set_dirty(&state.bitmap, offset, len)?;
        // Pairs with the fence in `wait_for_work`: either the job sees
        // these bits when it checks the bitmap, or this sees it waiting.
        fence(Ordering::SeqCst);
        if state.waiting.load(Ordering::Relaxed) {
            state.became_dirty.notify_waiters();
        }
        Ok(())
    }
}

impl Filter for MirrorTop {
    const CHILD: ChildRole = ChildRole::Filtered;

    fn format_name(&self) -> &'static str {
        "mirror_top"
    }

    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        match role {
            // Active commit: sharing `WRITE` on the source makes its
            // backing edge (and every one below it) share it too (DESIGN
            // §12, per-link permissions), so the job may write `base`
            // while the chain reads it, as commit's `commit_top` does.
            ChildRole::Filtered if self.commit => Permissions {
                take: users.take,
                share: users.share | Perm::WRITE | Perm::WRITE_UNCHANGED,
            },
            ChildRole::Filtered => users,
            TARGET => Permissions {
                take: Perm::WRITE,
                share: target_share(self.commit),
            },
            _ => Permissions::UNRESTRICTED,
        }
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.change(
            node,
            offset,
            buf.len() as u64,
            forward::write(node, ChildRole::Filtered, offset, buf),
            move || Some(forward::write(node, TARGET, offset, buf)),
        )
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.change(
            node,
            offset,
            len,
            forward::write_zeroes(node, ChildRole::Filtered, offset, len),
            move || Some(forward::write_zeroes(node, TARGET, offset, len)),
        )
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        // What a discarded range reads as is the source's business: the
        // job copies whatever it reads afterwards.
        self.change(
            node,
            offset,
            len,
            forward::discard(node, ChildRole::Filtered, offset, len),
            || None,
        )
    }
}

/// Starts a mirror job (QEMU's `blockdev-mirror`, or `drive-mirror` with a
/// target it creates) on this main loop, doing its I/O on `io`'s thread.
/// Guest I/O continues on the source meanwhile.
///
/// ```text
///  before:  vda → source → …
///  during:  vda → mirror filter → source → …          (job reader on source)
///                       ╰──(data)──→ target            (job writer on target)
///  after complete:       vda → target                  (source left, unused by vda)
///  after cancel:         vda → source → …              (target left as copied)
/// ```
///
/// * **Setup** (main loop, this function): the target created if asked
///   (a raw or qcow2 file of the source's size, the qcow2 one optionally
///   backed by the source's backing image); drains of the source and the
///   target, and one write section with one transaction that inserts the
///   mirror filter above the source (it takes over every user of the
///   source) with an edge to the target, and adds the job's reader on the
///   source and writer on the target (both `stay_at_node`); in that drain
///   section, the job's dirty bitmap on the source (`#mirror:<job id>`,
///   the job's granularity, disabled — only the filter marks it — and
///   busy until `clean` removes it; DESIGN §13). The filter's
///   target edge and the writer take `WRITE` and share only writing, so
///   any other user of the target is refused while the job runs.
/// * **Run** (the job's I/O task): the initial pass of the copy engine
///   (`sync=full`: every range the chain shows data in, or everything for
///   an existing target; `sync=top`: what the top image stores,
///   [`BlockBackend::block_status_above`] its backing; `sync=none`:
///   nothing), each chunk under a serialising range lock, its dirty bits
///   reset before the read; then the dirty loop: copy the dirty granules
///   until the bitmap is clean, then [`JobEvent::Ready`](super::JobEvent::Ready)
///   and keep copying what the guest dirties, until `complete` (or a
///   cancel without force). Then every guest write is made write-through
///   and the last dirty granules copied. Every request takes the read
///   lock for itself; pause points come between copies.
/// * **Prepare** (finalization): loop { copy what is dirty; flush the
///   target; on the main loop, drains of the filter and the target (every
///   guest request in flight has completed, on both, since writes are
///   write-through), and *there*, with nothing in flight and nothing able
///   to start, the dirty bitmap is checked clean — if not, back to copying —
///   and one write section with one transaction removes the job's
///   backends, detaches the filter from the target, moves every user of
///   the filter (the source's users: backends, overlays, other filters)
///   onto the target ([`GraphWriter::replace_node`](crate::GraphWriter::replace_node);
///   not for a cancel after ready) and removes the filter }. The target
///   is flushed once more.
/// * **Cancel** before ready or with force, or failure: the filter and
///   backends are removed (users back on the source), then the bitmap;
///   the target keeps what was copied. A cancel without force after
///   ready completes the job without the pivot: the target is identical
///   to the source at the moment of the final drain, and flushed.
///
/// # Errors
///
/// An invalid or duplicate job id; the source or target removed or of
/// another graph, the target the source or in use, or smaller than the
/// source; a new target's file existing; the filter node's name taken; a
/// bitmap of the job's name on the source ([`Error::BitmapExists`]); a
/// permission conflict. Nothing is changed then (a created target file is
/// removed).
///
/// # Examples
///
/// ```no_run
/// use blockgraph::job::{self, JobOptions, MirrorOptions, MirrorTarget};
/// # fn f(main: &blockgraph::MainLoop, io: &blockgraph::IoThread,
/// #      disk: blockgraph::NodeHandle, copy: blockgraph::NodeHandle) -> blockgraph::Result<()> {
/// let io = io.handle();
/// let job = main.run(move |bql| {
///     let options = MirrorOptions::new(&disk, MirrorTarget::Node(copy));
///     job::mirror(bql, &io, JobOptions::new("mirror0"), options)
/// })?;
/// // … wait for `JobEvent::Ready`, then on the main loop: `job.complete(bql)` …
/// # Ok(()) }
/// ```
pub fn mirror(
    bql: &mut Bql,
    io: &IoThreadHandle,
    options: JobOptions,
    mirror: MirrorOptions,
) -> Result<Job> {
    launch(bql, io, JobType::Mirror, &options, |bql, job| {
        set_up(bql, io, job, &mirror)
    })
}

/// The host file and format of `node` (a file node, or a format node on
/// one), for a new image's backing file name.
fn file_of(bql: &Bql, node: &NodeHandle) -> Option<(PathBuf, String)> {
    let n = node.gs(bql);
    if let Some(f) = n.driver_as::<FileDriver>() {
        return Some((f.path().to_owned(), "raw".to_owned()));
    }
    let file = n.child(ChildRole::File)?;
    let path = file.driver_as::<FileDriver>()?.path().to_owned();
    Some((path, n.driver_name().to_owned()))
}

/// A target the job created: its nodes (top first) and file, removed if
/// setup fails.
#[derive(Default)]
struct Created {
    nodes: Vec<NodeHandle>,
    file: Option<PathBuf>,
}

impl Created {
    fn undo(self, bql: &mut Bql) {
        for n in &self.nodes {
            if n.gs(bql).is_in_graph() {
                let d = bql.drain(n);
                let _ = bql.write(|w| w.remove_node(&d));
            }
        }
        if let Some(f) = self.file {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[allow(clippy::too_many_arguments)] // the parts of `MirrorTarget::NewImage`, unpacked
fn create_target(
    bql: &mut Bql,
    io: &IoThreadHandle,
    source: &NodeHandle,
    len: u64,
    path: &std::path::Path,
    format: ImageFormat,
    node_name: &str,
    backing: bool,
    created: &mut Created,
) -> Result<NodeHandle> {
    if path.exists() {
        return Err(Error::InvalidArgument(format!(
            "mirror: the target file '{}' exists",
            path.display()
        )));
    }
    match format {
        ImageFormat::Raw => {
            let file = FileDriver::create(path, len, FileOptions::default())?;
            created.file = Some(path.to_owned());
            let node = bql.write(|w| w.add_node(node_name, file, &[]))?;
            created.nodes.push(node.clone());
            Ok(node)
        }
        ImageFormat::Qcow2 => {
            let backing_node = if backing {
                source
                    .gs(bql)
                    .backing()
                    .map(|b| b.to_handle())
                    .map(|b| {
                        file_of(bql, &b).map(|f| (b.clone(), f)).ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "mirror: the source's backing '{}' has no file name to \
                                 record in the target",
                                b.name()
                            ))
                        })
                    })
                    .transpose()?
            } else {
                None
            };
            let file = FileDriver::create(path, 0, FileOptions::default())?;
            created.file = Some(path.to_owned());
            let file_name = format!("{node_name}-file");
            let file_node = bql.write(|w| w.add_node(&file_name, file, &[]))?;
            created.nodes.push(file_node.clone());
            let f = file_node.clone();
            let header = backing_node
                .as_ref()
                .map(|(_, (p, fmt))| (p.display().to_string(), fmt.clone()));
            let driver = bql.block_on(io.spawn(move |mut cx| async move {
                let g = cx.read().await;
                let mut options = CreateOptions::new(len);
                if let Some((name, fmt)) = header {
                    options = options.backing(name, fmt);
                }
                Qcow2Driver::create(f.try_io(&g)?, &options).await?;
                Qcow2Driver::open(f.try_io(&g)?, Qcow2Options::default()).await
            }))?;
            let node = bql.write(|w| {
                let mut children = vec![(ChildRole::File, &file_node)];
                if let Some((b, _)) = &backing_node {
                    children.push((ChildRole::Backing, b));
                }
                w.add_node(node_name, driver, &children)
            })?;
            created.nodes.insert(0, node.clone());
            Ok(node)
        }
    }
}

fn set_up(bql: &mut Bql, io: &IoThreadHandle, job: &Job, o: &MirrorOptions) -> Result<MirrorJob> {
    let source = o.source.gs(bql);
    if !source.is_in_graph() {
        return Err(Error::NodeRemoved(source.name().to_owned()));
    }
    let base = match o.sync {
        MirrorSync::Top => source.backing().map(|b| b.to_handle()),
        _ => None,
    };
    let len = length_of(bql, io, &o.source)?;
    let mut created = Created::default();
    let result = set_up_with(bql, io, job, o, len, base, &mut created);
    if result.is_err() {
        created.undo(bql);
    }
    result
}

fn set_up_with(
    bql: &mut Bql,
    io: &IoThreadHandle,
    job: &Job,
    o: &MirrorOptions,
    len: u64,
    base: Option<NodeHandle>,
    created: &mut Created,
) -> Result<MirrorJob> {
    let (target, zeroed) = match &o.target {
        MirrorTarget::Node(t) => (t.clone(), false),
        MirrorTarget::NewImage {
            path,
            format,
            node_name,
            backing,
        } => (
            create_target(
                bql, io, &o.source, len, path, *format, node_name, *backing, created,
            )?,
            true,
        ),
    };
    attach(
        bql,
        io,
        job,
        Attach {
            source: o.source.clone(),
            target,
            zeroed,
            len,
            sync: o.sync,
            base,
            mode: o.mode,
            granularity: o.granularity,
            filter_name: o.common.filter_name(job, "mirror"),
            copy: o.common.copy,
            commit: None,
        },
    )
}

/// Starts the mirror machinery for an active commit (QEMU's
/// `commit_active_start`): `top` (the active layer) is the source, `base`
/// (below it, in its chain) the target, the initial pass copies what
/// `top`..`base` stores. Called by [`commit`](super::commit), which
/// created `job` and found the committed range: the images from `top`
/// down to just above `base`, and `base`.
pub(super) fn active_commit(
    bql: &mut Bql,
    io: &IoThreadHandle,
    job: &Job,
    top: &NodeHandle,
    (intermediates, base): (Vec<NodeHandle>, NodeHandle),
    filter_name: String,
    copy: CopyOptions,
) -> Result<MirrorJob> {
    let base = &base;
    let len = length_of(bql, io, top)?;
    let base_made_rw = base.gs(bql).driver().is_read_only();
    attach(
        bql,
        io,
        job,
        Attach {
            source: top.clone(),
            target: base.clone(),
            zeroed: false,
            len,
            sync: MirrorSync::Top,
            base: Some(base.clone()),
            mode: CopyMode::Background,
            granularity: 64 << 10,
            filter_name,
            copy,
            commit: Some(ActiveCommit {
                intermediates,
                base_made_rw,
                pivoted: false,
            }),
        },
    )
}

/// What [`attach`] sets up.
struct Attach {
    source: NodeHandle,
    target: NodeHandle,
    zeroed: bool,
    len: u64,
    sync: MirrorSync,
    base: Option<NodeHandle>,
    mode: CopyMode,
    granularity: u64,
    filter_name: String,
    copy: CopyOptions,
    commit: Option<ActiveCommit>,
}

/// Checks the target and inserts the filter and the job's backends: the
/// part of setup a mirror and an active commit share.
fn attach(bql: &mut Bql, io: &IoThreadHandle, job: &Job, a: Attach) -> Result<MirrorJob> {
    let Attach {
        source,
        target,
        zeroed,
        len,
        sync,
        base,
        mode,
        granularity,
        filter_name,
        copy,
        commit,
    } = a;
    {
        let t = target.gs(bql);
        if !t.is_in_graph() {
            return Err(Error::NodeRemoved(t.name().to_owned()));
        }
        let s = source.gs(bql);
        // An active commit's target is below the source by design (its
        // caller checked it is strictly below, and it is used by the chain
        // above it); a mirror's may be neither.
        if commit.is_none() {
            let below_source = std::iter::once(s)
                .chain(s.backing_chain())
                .any(|n| n.name() == t.name());
            if below_source {
                return Err(Error::InvalidArgument(format!(
                    "mirror: the target '{}' is the source '{}' or in its backing chain",
                    t.name(),
                    s.name()
                )));
            }
            if t.parents().len() != 0 {
                return Err(Error::InvalidArgument(format!(
                    "mirror: the target '{}' is in use",
                    t.name()
                )));
            }
        }
    }
    let what = if commit.is_some() {
        "block-commit"
    } else {
        "mirror"
    };
    let target_len = length_of(bql, io, &target)?;
    if target_len < len {
        return Err(Error::InvalidArgument(format!(
            "{what}: the target '{}' ({target_len} bytes) is smaller than the source '{}' \
             ({len} bytes)",
            target.name(),
            source.name()
        )));
    }
    // Rounded up to a power of two, within a bitmap's limits (512 bytes
    // to 2 GiB, QEMU's).
    let granule = granularity
        .clamp(MIN_GRANULARITY, MAX_GRANULARITY)
        .next_power_of_two();
    let state = Arc::new(MirrorState {
        bitmap: bitmap_name(job),
        granule,
        became_dirty: Notify::new(),
        waiting: AtomicBool::new(false),
        lock: RangeLock::default(),
        write_through: AtomicBool::new(mode == CopyMode::WriteBlocking),
    });
    let is_commit = commit.is_some();
    let label = if is_commit { "commit" } else { "mirror" };
    let make_rw = commit.as_ref().is_some_and(|c| c.base_made_rw);
    // Reads the source; lets the guest do anything but resize it.
    let reader_options = job_backend(
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED,
    );
    // Shares writing with the filter's edge only (whoever else writes must
    // share WRITE, and a plain writer does not); nobody reads, but for an
    // active commit's chain.
    let writer_options = job_backend(Perm::WRITE, target_share(is_commit));
    let source_drained = bql.drain(&source);
    let target_drained = bql.drain(&target);
    // Disabled: only the filter marks it (see `MirrorState::bitmap`); made
    // inside the drain section that inserts the filter, busy at once.
    source.gs(bql).add_dirty_bitmap(
        &state.bitmap,
        DirtyBitmapOptions::new()
            .granularity(granule)
            .disabled(true),
    )?;
    if let Err(e) = source.gs(bql).set_dirty_bitmap_busy(&state.bitmap, true) {
        remove_bitmap(bql, &source, &state.bitmap);
        return Err(e);
    }
    let added = bql.write(|w| {
        w.transaction(|w| {
            if make_rw {
                w.set_read_only(&target_drained, false)?;
            }
            let filter = w.insert_filter_with(
                &source_drained,
                &filter_name,
                JobFilter::new(
                    MirrorTop {
                        state: state.clone(),
                        commit: is_commit,
                    },
                    job.clone(),
                ),
                &[(TARGET, &target)],
            )?;
            let reader = w.add_backend(
                &format!("{}-{label}-source", job.id()),
                &source,
                reader_options,
            )?;
            let writer = w.add_backend(
                &format!("{}-{label}-target", job.id()),
                &target,
                writer_options,
            )?;
            Ok((filter, reader, writer))
        })
    });
    drop(target_drained);
    drop(source_drained);
    let (filter, reader, writer) = match added {
        Ok(added) => added,
        Err(e) => {
            remove_bitmap(bql, &source, &state.bitmap);
            return Err(e);
        }
    };
    Ok(MirrorJob {
        kind: if is_commit {
            JobType::Commit
        } else {
            JobType::Mirror
        },
        source,
        target,
        filter,
        reader,
        writer,
        base,
        sync,
        zeroed,
        len,
        state,
        copy,
        commit,
    })
}

/// Frees and removes the job's bitmap from `source` (also from a source
/// the graph dropped, an active commit's pivoted top: harmless there).
fn remove_bitmap(bql: &Bql, source: &NodeHandle, name: &str) {
    let s = source.gs(bql);
    let _ = s.set_dirty_bitmap_busy(name, false);
    if let Err(e) = s.remove_dirty_bitmap(name) {
        if !matches!(e, Error::NoSuchBitmap { .. }) {
            tracing::warn!(
                "mirror: could not remove bitmap '{name}' of '{}': {e}",
                s.name()
            );
        }
    }
}

/// Bytes dirty in the job's bitmap (whole granules).
fn dirty_bytes<P: Proof>(source: NodeRef<'_, P>, name: &str) -> u64 {
    source
        .dirty_bitmaps()
        .into_iter()
        .find(|b| b.name == name)
        .map_or(0, |b| b.count)
}

pub(super) struct MirrorJob {
    /// `Mirror`, or `Commit` for an active commit.
    kind: JobType,
    /// The node the job's bitmap is on (the filter's child).
    source: NodeHandle,
    target: NodeHandle,
    filter: NodeHandle,
    reader: BlockBackend,
    writer: BlockBackend,
    /// `sync=top`: the source's backing, where the copy stops.
    base: Option<NodeHandle>,
    sync: MirrorSync,
    /// The target is new: it reads as zeroes everywhere.
    zeroed: bool,
    len: u64,
    state: Arc<MirrorState>,
    copy: CopyOptions,
    /// An active commit: the target is `base`.
    commit: Option<ActiveCommit>,
}

/// Copies `[offset, offset + buf.len())` (`offset` on a granule) from the
/// source to the target under a serialising lock, its dirty bits reset
/// before the read (every granule it touches: the last one may end past
/// the device); on failure they are set again.
async fn copy_one(
    io: &mut IoTask,
    j: &MirrorJob,
    offset: u64,
    buf: &mut [u8],
) -> std::result::Result<(), ChunkError> {
    let state = &j.state;
    let len = buf.len() as u64;
    let _range = state.lock.lock(offset, offset + len, true).await;
    let granules = (offset + len).div_ceil(state.granule) * state.granule - offset;
    {
        let guard = io.read().await;
        j.source
            .try_io(&guard)
            .and_then(|s| s.reset_dirty(&state.bitmap, offset, granules))
            .map_err(ChunkError::read)?;
    }
    let result = read_then_write(io, &j.reader, &j.writer, offset, buf).await;
    if result.is_err() {
        let guard = io.read().await;
        let marked = j
            .source
            .try_io(&guard)
            .and_then(|s| s.set_dirty(&state.bitmap, offset, len));
        if let Err(e) = marked {
            tracing::warn!("mirror: could not mark a failed copy dirty again: {e}");
        }
    }
    result
}

/// The initial pass's hook for the copy engine.
struct InitialCopy<'j> {
    job: &'j MirrorJob,
}

impl CopyChunks for InitialCopy<'_> {
    async fn needs_copy(&self, io: &mut IoTask, offset: u64, len: u64) -> Result<(bool, u64)> {
        let j = self.job;
        match j.sync {
            MirrorSync::Top => {
                let (status, n) = j
                    .reader
                    .block_status_above(io, j.base.as_ref(), offset, len)
                    .await?;
                Ok((status != BlockStatus::Unallocated, n))
            }
            _ if !j.zeroed => Ok((true, len)),
            _ => {
                let (status, n) = j.reader.block_status(io, offset, len).await?;
                Ok((status == BlockStatus::Data, n))
            }
        }
    }

    async fn copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), ChunkError> {
        copy_one(io, self.job, offset, buf).await
    }
}

impl MirrorJob {
    /// Copies one dirty run at or after `*pos` (wrapping around); false
    /// when the bitmap is clean. Failures go through the job's error policy:
    /// the range stays dirty; `report` fails the job.
    async fn copy_next(
        &self,
        io: &mut IoTask,
        runner: &JobRunner,
        pos: &mut u64,
        buf: &mut Vec<u8>,
        throttle: bool,
    ) -> Result<bool> {
        let g = self.state.granule;
        // At most a chunk, in whole granules.
        let chunk = self.copy.chunk_size.max(g).div_ceil(g) * g;
        let (found, remaining) = {
            let guard = io.read().await;
            let source = self.source.try_io(&guard)?;
            let name = &self.state.bitmap;
            let from = (*pos / g * g).min(self.len);
            let found = match source.next_dirty(name, from)? {
                Some(area) => Some(area),
                None => source.next_dirty(name, 0)?,
            };
            (found, dirty_bytes(source, name))
        };
        // Clipped to the device (the bitmap may know a size in whole
        // granules).
        let Some(range) = found
            .map(|(start, len)| start..(start + len).min(start + chunk).min(self.len))
            .filter(|r| r.start < r.end)
        else {
            return Ok(false);
        };
        let n = range.end - range.start;
        runner.set_remaining(remaining);
        if throttle {
            runner.throttle(io, n).await?;
        }
        buf.resize(n as usize, 0);
        match copy_one(io, self, range.start, &mut buf[..n as usize]).await {
            Ok(()) => runner.add_progress(n),
            Err(ChunkError { operation, error }) => {
                if runner.error_action(&error, operation) == super::ErrorAction::Report {
                    return Err(error);
                }
            }
        }
        *pos = range.end;
        Ok(true)
    }

    /// Copies until the bitmap is clean, with pause points (`pause`) or
    /// without (finalization).
    async fn copy_until_clean(&self, cx: &mut JobCx<'_>, pause: bool) -> Result<()> {
        let runner = cx.runner().clone();
        let (mut pos, mut buf) = (0, Vec::new());
        loop {
            if pause {
                cx.pause_point().await?;
            }
            if !self
                .copy_next(cx.io(), &runner, &mut pos, &mut buf, pause)
                .await?
            {
                return Ok(());
            }
        }
    }
}

impl MirrorJob {
    /// Waits (not busy, no lock held) until the bitmap is dirty or the
    /// job's state changed (pause, cancel, complete).
    async fn wait_for_work(&self, io: &mut IoTask, shared: &JobShared, runner: &JobRunner) {
        let state = &*self.state;
        let _idle = runner.idle();
        let dirty = state.became_dirty.notified();
        let woken = shared.wake.notified();
        let mut dirty = std::pin::pin!(dirty);
        let mut woken = std::pin::pin!(woken);
        dirty.as_mut().enable();
        woken.as_mut().enable();
        {
            let st = shared.lock();
            if st.cancelled || st.complete_requested || st.user_paused || st.drain_pauses > 0 {
                return;
            }
        }
        state.waiting.store(true, Ordering::Relaxed);
        // Pairs with the fence in `MirrorTop::mark`.
        fence(Ordering::SeqCst);
        let clean = {
            let guard = io.read().await;
            // An error: not waiting; the copy loop reports it.
            self.source
                .try_io(&guard)
                .and_then(|s| s.next_dirty(&state.bitmap, 0))
                .is_ok_and(|area| area.is_none())
        };
        if clean {
            futures::future::select(dirty, woken).await;
        }
        state.waiting.store(false, Ordering::Relaxed);
    }
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        self.kind
    }

    async fn run(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let runner = cx.runner().clone();
        let granule = self.state.granule;
        if self.sync != MirrorSync::None {
            let alignment = u64::from(self.reader.request_alignment(cx.io()).await?)
                .max(u64::from(self.writer.request_alignment(cx.io()).await?))
                .max(granule);
            let options = CopyOptions {
                chunk_size: self.copy.chunk_size.div_ceil(alignment).max(1) * alignment,
                alignment,
                in_flight: self.copy.in_flight,
            };
            let report = copy_range(cx, &InitialCopy { job: self }, 0..self.len, &options).await?;
            if let Some(e) = report.ignored {
                // A range the `ignore` policy skipped is missing from the
                // target: the target would not be a mirror.
                return Err(e);
            }
        }
        let shared = cx.job().shared.clone();
        let (mut pos, mut buf) = (0, Vec::new());
        loop {
            cx.pause_point().await?;
            if runner.completion_requested() {
                break;
            }
            if self
                .copy_next(cx.io(), &runner, &mut pos, &mut buf, true)
                .await?
            {
                continue;
            }
            // In sync.
            runner.set_remaining(0);
            runner.set_ready();
            self.wait_for_work(cx.io(), &shared, &runner).await;
        }
        // Converge: from now on no guest write leaves the target behind.
        self.state.write_through.store(true, Ordering::SeqCst);
        self.copy_until_clean(cx, true).await
    }

    async fn prepare(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let pivot = !cx.runner().cancelled_after_ready();
        let mut rounds = 0u32;
        loop {
            self.copy_until_clean(cx, false).await?;
            self.writer.flush(cx.io()).await?;
            let (filter, source, target, reader, writer, state) = (
                self.filter.clone(),
                self.source.clone(),
                self.target.clone(),
                self.reader.clone(),
                self.writer.clone(),
                self.state.clone(),
            );
            // An active commit's pivot drops the committed images.
            let dropped = match &self.commit {
                Some(c) if pivot => c.intermediates.clone(),
                _ => Vec::new(),
            };
            let done = cx
                .on_main_loop(move |bql| -> Result<bool> {
                    // The committed images and their files (top first).
                    let doomed = dropped_with_their_files(bql, &dropped);
                    // Every guest request has completed (on the source and,
                    // write-through, on the target) and none can start:
                    // what the bitmap says now is final.
                    let filter_drained = bql.drain(&filter);
                    let target_drained = bql.drain(&target);
                    let drained: Vec<_> = doomed.iter().map(|n| bql.drain(n)).collect();
                    let dirty = source.gs(bql).dirty_bitmap_snapshot(&state.bitmap)?;
                    if dirty.count() != 0 {
                        return Ok(false);
                    }
                    bql.write(|w| {
                        w.transaction(|w| {
                            w.remove_backend(&reader)?;
                            w.remove_backend(&writer)?;
                            w.detach_child(&filter_drained, TARGET)?;
                            if pivot {
                                w.replace_node(&filter_drained, &target_drained)?;
                            }
                            w.remove_filter(&filter_drained)?;
                            // Top down: an image someone else uses stays.
                            remove_unused(w, &drained)?;
                            Ok(true)
                        })
                    })
                })
                .await??;
            if done {
                break;
            }
            rounds += 1;
            if rounds >= 1000 {
                return Err(Error::driver(
                    "mirror",
                    "the target could not be brought in sync: copying keeps failing",
                ));
            }
        }
        if let Some(c) = &mut self.commit {
            c.pivoted = pivot;
        }
        // What the guest wrote through since the last flush.
        let guard = cx.io().read().await;
        self.target.try_io(&guard)?.flush().await
    }

    async fn clean(&mut self, cx: &mut JobCx<'_>) {
        // An active commit that did not pivot leaves base read-only again,
        // as it found it; going read-only needs its metadata on disk.
        let restore = self
            .commit
            .as_ref()
            .is_some_and(|c| c.base_made_rw && !c.pivoted);
        if restore {
            let guard = cx.io().read().await;
            if let Ok(node) = self.target.try_io(&guard) {
                let _ = node.flush().await;
            }
        }
        let (filter, reader, writer, source, target, bitmap) = (
            self.filter.clone(),
            self.reader.clone(),
            self.writer.clone(),
            self.source.clone(),
            self.target.clone(),
            self.state.bitmap.clone(),
        );
        let result = cx
            .on_main_loop(move |bql| -> Result<()> {
                let _ = bql.write(|w| w.remove_backend(&reader));
                let _ = bql.write(|w| w.remove_backend(&writer));
                if filter.gs(bql).is_in_graph() {
                    let d = bql.drain(&filter);
                    bql.write(|w| {
                        w.transaction(|w| {
                            w.detach_child(&d, TARGET)?;
                            w.remove_filter(&d)
                        })
                    })?;
                }
                // Nothing marks it any more (the filter is gone).
                remove_bitmap(bql, &source, &bitmap);
                if restore && target.gs(bql).is_in_graph() {
                    let d = bql.drain(&target);
                    bql.write(|w| w.set_read_only(&d, true))?;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                tracing::warn!("mirror job '{}': clean-up failed: {e}", cx.job().id())
            }
        }
    }
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob")
            .field("target", &self.target.name())
            .field("filter", &self.filter.name())
            .field("sync", &self.sync)
            .field("commit", &self.commit)
            .finish()
    }
}
