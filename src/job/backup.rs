//! `blockdev-backup`: a point-in-time copy of a node into an existing
//! target node, taken while the guest keeps writing, through a
//! copy-before-write filter (QEMU's `block/backup.c`,
//! `block/copy-before-write.c` and `block/block-copy.c`).
//!
//! What it does, step by step: see [`backup`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::driver::range_lock::RangeLock;
use crate::driver::{forward, require_child, Filter};
use crate::graph::driver::{IoFuture, ResizePermit};
use crate::graph::proof::{Bql, NodeHandle, RequestRef};
use crate::graph::runtime::{IoTask, IoThreadHandle};
use crate::types::{BlockStatus, ChildRole, Error, Perm, Permissions, Result};

use super::copy::{copy_range, ChunkError, CopyChunks, CopyOptions};
use super::driver::{JobCx, JobDriver, JobRunner};
use super::filter::JobFilter;
use super::handle::{Job, JobOptions};
use super::setup::{launch, length_of, CommonOptions};
use super::status::JobType;

/// The role of the filter's edge to the backup target (the filter's other
/// child is the source, [`ChildRole::Filtered`]).
const TARGET: ChildRole = ChildRole::Data;

/// The default copy granularity: QEMU's backup cluster size (64 KiB, or
/// the target's cluster size if that is larger).
pub const DEFAULT_BACKUP_CLUSTER: u64 = 64 << 10;

/// What happens to the bitmap of an incremental backup when the job ends
/// (QEMU's `bitmap-mode`, `BitmapSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BitmapSyncMode {
    /// On success the bitmap keeps only what changed since the backup
    /// started (the copied bits are cleared); on failure or cancellation
    /// it is as if the backup never ran (QEMU's `on-success`, the mode of
    /// `sync=incremental`).
    #[default]
    OnSuccess,
    /// The copied bits are cleared whatever the outcome: what was not
    /// copied stays dirty (QEMU's `always`).
    Always,
    /// The bitmap is never cleared: it keeps the old bits and gains what
    /// changed during the backup (QEMU's `never`).
    Never,
}

/// What a backup copies (QEMU's `sync` argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupSync {
    /// Every byte of the source (QEMU's `full`).
    Full,
    /// Only what the source's top image stores itself (QEMU's `top`): the
    /// target is expected to have the source's backing as its backing, or
    /// the same data below it.
    Top,
    /// Only what the dirty bitmap `bitmap` of the source marks (QEMU's
    /// `bitmap`, and `incremental` with [`BitmapSyncMode::OnSuccess`]).
    /// The bitmap is busy while the job runs.
    Bitmap {
        /// The bitmap's name (on the source node).
        bitmap: String,
        /// What happens to the bitmap at the end.
        mode: BitmapSyncMode,
    },
}

impl BackupSync {
    /// QEMU's `sync=incremental`: the bitmap `bitmap`, cleared of what was
    /// copied only if the backup succeeds.
    pub fn incremental(bitmap: impl Into<String>) -> Self {
        BackupSync::Bitmap {
            bitmap: bitmap.into(),
            mode: BitmapSyncMode::OnSuccess,
        }
    }
}

/// What to back up, and where (QEMU's `blockdev-backup` arguments).
#[derive(Debug, Clone)]
pub struct BackupOptions {
    source: NodeHandle,
    target: NodeHandle,
    sync: BackupSync,
    cluster_size: u64,
    common: CommonOptions,
    at_start: AtStart,
}

/// What [`BackupOptions::at_start`] runs (taken once).
type AtStartFn = Box<dyn FnOnce(&mut Bql) -> Result<()> + Send>;

/// [`BackupOptions::at_start`]'s closure, shared by clones of the
/// options and run by the first job that starts with them.
#[derive(Clone, Default)]
struct AtStart(Arc<Mutex<Option<AtStartFn>>>);

impl std::fmt::Debug for AtStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|g| g.is_some()).unwrap_or(true);
        f.write_str(if set { "Some(..)" } else { "None" })
    }
}

impl BackupOptions {
    /// Back up `source` into the existing node `target` (as large as the
    /// source at least; a raw or qcow2 image, typically new).
    pub fn new(source: &NodeHandle, target: &NodeHandle, sync: BackupSync) -> Self {
        BackupOptions {
            source: source.clone(),
            target: target.clone(),
            sync,
            cluster_size: DEFAULT_BACKUP_CLUSTER,
            common: CommonOptions::new(CopyOptions {
                chunk_size: 1 << 20,
                ..CopyOptions::default()
            }),
            at_start: AtStart::default(),
        }
    }

    /// Runs `f` at the job's point in time: on the main loop, while the
    /// source and the target are drained and the copy-before-write filter
    /// is already in, so no guest write lands between the two (QEMU's
    /// `transaction` of a `blockdev-backup` with other actions, such as
    /// adding or clearing a dirty bitmap that is to record exactly the
    /// writes after the backup's point in time). If `f` fails, the filter
    /// is removed and the job does not start, with `f`'s error; `f` must
    /// undo what it did itself.
    ///
    /// # Examples
    ///
    /// A full backup and a new dirty bitmap at one instant (the bitmap
    /// then records exactly the writes the backup does not hold: the start
    /// of an incremental backup chain); a failing step leaves no job.
    ///
    /// ```
    /// use blockgraph::drivers::MemoryDriver;
    /// use blockgraph::job::{self, BackupOptions, BackupSync, JobOptions, JobStatus};
    /// use blockgraph::{DirtyBitmapOptions, Error, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let io = main.new_io_thread("jobs")?;
    /// let (disk, copy) = main.run(|bql| bql.write(|w| {
    ///     Ok::<_, Error>((
    ///         w.add_node("disk", MemoryDriver::new(1 << 20), &[])?,
    ///         w.add_node("copy", MemoryDriver::new(1 << 20), &[])?,
    ///     ))
    /// }))?;
    /// let h = io.handle();
    /// let (d, c) = (disk.clone(), copy.clone());
    /// let refused = main.run(move |bql| {
    ///     let options = BackupOptions::new(&d, &c, BackupSync::Full)
    ///         .at_start(|_bql| Err(Error::InvalidArgument("not now".into())));
    ///     job::backup(bql, &h, JobOptions::new("b0"), options).map(|_| ())
    /// });
    /// assert!(matches!(refused, Err(Error::InvalidArgument(_))));
    ///
    /// let h = io.handle();
    /// let (d, c, d2) = (disk.clone(), copy.clone(), disk.clone());
    /// let job = main.run(move |bql| {
    ///     let options = BackupOptions::new(&d, &c, BackupSync::Full).at_start(move |bql| {
    ///         d2.gs(bql).add_dirty_bitmap("since-full", DirtyBitmapOptions::new())
    ///     });
    ///     job::backup(bql, &h, JobOptions::new("b1"), options)
    /// })?;
    /// let d = disk.clone();
    /// assert!(main.run(move |bql| d.gs(bql).dirty_bitmaps().iter().any(|b| b.name == "since-full")));
    /// while job.status() != JobStatus::Null {
    ///     std::thread::sleep(std::time::Duration::from_millis(5));
    /// }
    /// # drop(io);
    /// # main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn at_start(mut self, f: impl FnOnce(&mut Bql) -> Result<()> + Send + 'static) -> Self {
        self.at_start = AtStart(Arc::new(Mutex::new(Some(Box::new(f)))));
        self
    }

    /// The copy granularity (default [`DEFAULT_BACKUP_CLUSTER`]): the unit
    /// the filter copies before a guest write, and that the job tracks as
    /// copied. A power of two from 512 bytes to 64 MiB; use the target's
    /// cluster size if it is larger than the default, so that no target
    /// cluster is written twice.
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    common_option_setters!(
        common,
        "backup",
        /// Chunk size and requests in flight of the job's background copy
        /// (the chunk is rounded to whole clusters).
    );
}

/// The copy state the filter and the job share (QEMU's `BlockCopyState`):
/// which clusters still hold data the target has not received, and a
/// serialising range lock under which each copy runs.
#[derive(Debug)]
struct CopyState {
    cluster: u64,
    /// The source's length when the job started.
    len: u64,
    /// One bit per cluster: set while its old data still has to go to
    /// the target. Cleared only once the target has it.
    todo: Mutex<Vec<u64>>,
    /// A copy holds its clusters serialised: a guest write to them waits,
    /// and finds them copied once it gets the lock.
    lock: RangeLock,
    /// `sync=top`: a cluster the source's top image does not store is
    /// dropped instead of copied.
    top_only: bool,
    /// Bytes copied to the target by guest writes (before-write copies).
    by_guest: AtomicU64,
    /// Bytes copied to the target by the job.
    by_job: AtomicU64,
}

/// Longest range one copy reads and writes at once.
const MAX_COPY: u64 = 1 << 20;

impl CopyState {
    fn new(len: u64, cluster: u64, top_only: bool) -> Self {
        let clusters = len.div_ceil(cluster);
        CopyState {
            cluster,
            len,
            todo: Mutex::new(vec![0; clusters.div_ceil(64) as usize]),
            lock: RangeLock::default(),
            top_only,
            by_guest: AtomicU64::new(0),
            by_job: AtomicU64::new(0),
        }
    }

    fn bits(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.todo.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the clusters touched by `[offset, offset + len)` to copy.
    fn set(&self, offset: u64, len: u64) {
        let (first, end) = self.clusters(offset, len);
        let mut bits = self.bits();
        for c in first..end {
            bits[(c / 64) as usize] |= 1 << (c % 64);
        }
    }

    /// Marks the clusters `[first, end)` copied.
    fn clear(&self, first: u64, end: u64) {
        let mut bits = self.bits();
        for c in first..end {
            bits[(c / 64) as usize] &= !(1 << (c % 64));
        }
    }

    /// The cluster numbers `[first, end)` that `[offset, offset + len)`
    /// touches, within the source.
    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.len);
        if offset >= end {
            return (0, 0);
        }
        (offset / self.cluster, end.div_ceil(self.cluster))
    }

    /// Whether cluster `c` is still to copy, and how many clusters from
    /// `c` on (before `end`) are in the same state.
    fn run(&self, c: u64, end: u64) -> (bool, u64) {
        let bits = self.bits();
        let at = |c: u64| bits[(c / 64) as usize] & (1 << (c % 64)) != 0;
        let state = at(c);
        let mut n = 1;
        while c + n < end && at(c + n) == state {
            n += 1;
        }
        (state, n)
    }

    /// Clusters still to copy.
    fn remaining(&self) -> u64 {
        self.bits().iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Byte ranges of the clusters still to copy, joined.
    fn todo_ranges(&self) -> Vec<(u64, u64)> {
        let clusters = self.len.div_ceil(self.cluster);
        let mut out = Vec::new();
        let mut c = 0;
        while c < clusters {
            let (todo, n) = self.run(c, clusters);
            if todo {
                let start = c * self.cluster;
                let end = ((c + n) * self.cluster).min(self.len);
                out.push((start, end - start));
            }
            c += n;
        }
        out
    }

    /// Copies every cluster that `[offset, offset + len)` touches and that
    /// the target has not received yet, from the filter's source child to
    /// its target child, inside a request that entered at the filter
    /// (`node`): a guest write about to change those clusters, or the
    /// job's background copy. Returns when each of them is copied (by
    /// this call or by one it waited for).
    async fn copy_before(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        by_job: bool,
    ) -> std::result::Result<(), ChunkError> {
        let (first, end) = self.clusters(offset, len);
        let mut c = first;
        let max = (MAX_COPY / self.cluster).max(1);
        while c < end {
            let (todo, n) = self.run(c, end);
            if !todo {
                c += n;
                continue;
            }
            let n = n.min(max);
            let start = c * self.cluster;
            let stop = ((c + n) * self.cluster).min(self.len);
            // Whoever copies these clusters holds them: a write waiting here
            // goes on only once they are on the target.
            let _held = self.lock.lock(start, stop, true).await;
            // Others may have copied some meanwhile: copy what is still to.
            let mut k = c;
            while k < c + n {
                let (todo, m) = self.run(k, c + n);
                if todo {
                    self.copy_clusters(node, k, k + m, by_job).await?;
                }
                k += m;
            }
            c += n;
        }
        Ok(())
    }

    /// Copies clusters `[first, end)` (held, and to copy) to the target
    /// and marks them copied.
    async fn copy_clusters(
        &self,
        node: RequestRef<'_>,
        first: u64,
        end: u64,
        by_job: bool,
    ) -> std::result::Result<(), ChunkError> {
        let source = require_child(node, ChildRole::Filtered).map_err(ChunkError::read)?;
        let target = require_child(node, TARGET).map_err(ChunkError::write)?;
        let stop = (end * self.cluster).min(self.len);
        let mut pos = first * self.cluster;
        let mut buf = Vec::new();
        while pos < stop {
            let room = stop - pos;
            // What to do with [pos, pos + n): copy it, write zeroes, or
            // (sync=top, not stored in the top image) drop it.
            let (status, n) = if self.top_only {
                let (status, n) = source
                    .block_status(pos, room)
                    .await
                    .map_err(ChunkError::read)?;
                let n = n.clamp(1, room);
                if status == BlockStatus::Unallocated {
                    // Only whole clusters can be dropped; a partly stored
                    // cluster is copied whole.
                    let whole = n / self.cluster * self.cluster;
                    if whole > 0 || pos + n == stop {
                        (status, if whole > 0 { whole } else { n })
                    } else {
                        (BlockStatus::Data, self.cluster.min(room))
                    }
                } else {
                    // Round up to whole clusters: the map is per cluster.
                    (status, n.div_ceil(self.cluster) * self.cluster)
                }
            } else {
                (BlockStatus::Data, room)
            };
            let n = n.min(room);
            match status {
                BlockStatus::Unallocated => {}
                BlockStatus::Zero if self.top_only => {
                    target
                        .write_zeroes(pos, n)
                        .await
                        .map_err(ChunkError::write)?;
                }
                _ => {
                    buf.resize(n as usize, 0);
                    source
                        .read(pos, &mut buf[..n as usize])
                        .await
                        .map_err(ChunkError::read)?;
                    target
                        .write(pos, &buf[..n as usize])
                        .await
                        .map_err(ChunkError::write)?;
                    let counter = if by_job { &self.by_job } else { &self.by_guest };
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
            let (a, b) = (pos / self.cluster, (pos + n).div_ceil(self.cluster));
            self.clear(a, b);
            pos += n;
        }
        Ok(())
    }
}

/// The copy-before-write filter (QEMU's `copy-before-write` driver),
/// above the backup's source, with the target as its second child: before
/// a write, zeroing or discard reaches clusters whose old data the target
/// has not received yet, it copies them there (or waits for the copy that
/// holds them), then lets the request through. So the target receives
/// the source as it was when the filter was inserted, whoever writes.
///
/// On the source it takes what its users take plus a consistent read, and
/// lets nobody else write or resize it (a writer beside the filter would
/// change data the target has not received). On the target it takes
/// `WRITE` and shares everything but resizing (a reader of the target,
/// image fleecing, may stay). Resizing through the filter is refused
/// while the backup runs (the job checked the sizes once).
#[derive(Debug)]
pub struct CopyBeforeWrite {
    state: Arc<CopyState>,
}

impl CopyBeforeWrite {
    /// Bytes of old data guest writes copied to the target so far.
    pub fn bytes_copied_before_writes(&self) -> u64 {
        self.state.by_guest.load(Ordering::Relaxed)
    }

    /// Bytes the job's background copy sent to the target so far.
    pub fn bytes_copied_by_job(&self) -> u64 {
        self.state.by_job.load(Ordering::Relaxed)
    }

    fn before<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
        then: impl FnOnce() -> IoFuture<'a, ()> + Send + 'a,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            // A failed copy fails the guest's request (QEMU's default
            // `on-cbw-error=break-guest-write`): the source keeps its old
            // data, the cluster stays to copy, the backup stays right.
            self.state
                .copy_before(node, offset, len, false)
                .await
                .map_err(|e| e.error)?;
            then().await
        })
    }
}

impl Filter for CopyBeforeWrite {
    const CHILD: ChildRole = ChildRole::Filtered;

    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn describe(&self) -> String {
        format!(
            "copy-before-write, {} bytes copied before writes",
            self.bytes_copied_before_writes()
        )
    }

    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        match role {
            ChildRole::Filtered => Permissions {
                take: users.take | Perm::CONSISTENT_READ,
                share: users.share & !(Perm::WRITE | Perm::RESIZE),
            },
            TARGET => Permissions {
                take: Perm::WRITE,
                share: Perm::ALL & !Perm::RESIZE,
            },
            _ => Permissions::UNRESTRICTED,
        }
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.before(node, offset, buf.len() as u64, move || {
            forward::write(node, Self::CHILD, offset, buf)
        })
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.before(node, offset, len, move || {
            forward::write_zeroes(node, Self::CHILD, offset, len)
        })
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.before(node, offset, len, move || {
            forward::discard(node, Self::CHILD, offset, len)
        })
    }

    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        let _ = (node, size);
        Box::pin(async {
            Err(Error::InvalidArgument(
                "cannot resize a node while a backup of it runs".into(),
            ))
        })
    }
}

/// Starts a backup job (QEMU's `blockdev-backup`) on this main loop, doing
/// its I/O on `io`'s thread: `target` receives `source` as it is at this
/// call, while guests keep writing `source`.
///
/// ```text
///  before:  vda → source → …                     target
///  during:  vda → copy-before-write → source → …
///                        ╰──(data)──→ target
///  after:   vda → source → …                     target (a point-in-time copy)
/// ```
///
/// * **Setup** (main loop, this function): the sizes are read (one
///   request on `io`); drains of the source and the target, and in them
///   one write section that inserts the copy-before-write filter above the
///   source (it takes over the source's users) with an edge to the target;
///   then, still drained (no write can slip in), for
///   [`BackupSync::Bitmap`] the bitmap's bits are taken as the job's copy
///   map, the bitmap cleared (it records what changes from now on) and
///   marked busy. From the end of the drain on, every write to the source
///   goes through the filter.
/// * **Run** (the job's I/O task): the copy engine walks the source; a
///   cluster still to copy is copied by one request that enters at the
///   filter node (under the job task's read lock) and copies from the
///   filter's source child to its target child — the same code, lock and
///   map as a guest write's copy, so neither copies a cluster the other
///   has copied, and a guest write never overtakes the copy of its
///   cluster. `sync=top` drops the clusters the source's top image does
///   not store (asked per cluster, lazily, before the first copy of it).
///   A drain of any node the job uses pauses it (its filter is above
///   them); a copy refused because the filter is drained waits for the
///   drain's end. Then the target is flushed.
/// * **Commit / abort**: the bitmap gets QEMU's `bitmap-mode` semantics
///   (see [`BitmapSyncMode`]): after a failure the original bits are put
///   back (`on-success`, `never`), or the clusters not copied are
///   (`always`); `never` puts them back after a success too.
/// * **Clean** (always): the bitmap is freed; drains of the filter and the
///   target, and one write section that removes the filter (its users go
///   back to the source). A cancelled or failed backup leaves the target
///   partial and the source untouched (QEMU).
///
/// # Errors
///
/// An invalid or duplicate job id; the source or target removed, of
/// another graph, the same node, or the target in the source's backing
/// chain; a target smaller than the source; a bad cluster size; for
/// `sync=bitmap` a missing, busy or inconsistent bitmap; the filter's name
/// taken; a permission conflict (another writer on the source, or a user
/// of the target that does not share writing). Nothing is changed then.
///
/// # Examples
///
/// ```no_run
/// use blockgraph::job::{self, BackupOptions, BackupSync, JobOptions};
/// # fn f(main: &blockgraph::MainLoop, io: &blockgraph::IoThread,
/// #      disk: blockgraph::NodeHandle, copy: blockgraph::NodeHandle) -> blockgraph::Result<()> {
/// let io = io.handle();
/// let job = main.run(move |bql| {
///     job::backup(bql, &io, JobOptions::new("backup0"),
///                 BackupOptions::new(&disk, &copy, BackupSync::Full))
/// })?;
/// // … wait for `job.events()` to report `Completed` …
/// # Ok(()) }
/// ```
pub fn backup(
    bql: &mut Bql,
    io: &IoThreadHandle,
    options: JobOptions,
    backup: BackupOptions,
) -> Result<Job> {
    launch(bql, io, JobType::Backup, &options, |bql, job| {
        set_up(bql, io, job, &backup)
    })
}

fn check(bql: &Bql, o: &BackupOptions) -> Result<()> {
    if !o.cluster_size.is_power_of_two() || !(512..=(64 << 20)).contains(&o.cluster_size) {
        return Err(Error::InvalidArgument(format!(
            "backup: the cluster size must be a power of two from 512 bytes to 64 MiB, not {}",
            o.cluster_size
        )));
    }
    let s = o.source.gs(bql);
    let t = o.target.gs(bql);
    for n in [&s, &t] {
        if !n.is_in_graph() {
            return Err(Error::NodeRemoved(n.name().to_owned()));
        }
    }
    if std::iter::once(s)
        .chain(s.backing_chain())
        .any(|n| n.name() == t.name())
    {
        return Err(Error::InvalidArgument(format!(
            "backup: the target '{}' is the source '{}' or in its backing chain",
            t.name(),
            s.name()
        )));
    }
    if let BackupSync::Bitmap { bitmap, .. } = &o.sync {
        let info = s
            .dirty_bitmaps()
            .into_iter()
            .find(|b| &b.name == bitmap)
            .ok_or_else(|| Error::NoSuchBitmap {
                node: s.name().to_owned(),
                bitmap: bitmap.clone(),
            })?;
        if info.busy {
            return Err(Error::BitmapBusy(bitmap.clone()));
        }
        if info.inconsistent {
            return Err(Error::BitmapInconsistent(bitmap.clone()));
        }
    }
    Ok(())
}

fn set_up(bql: &mut Bql, io: &IoThreadHandle, job: &Job, o: &BackupOptions) -> Result<BackupJob> {
    check(bql, o)?;
    let len = length_of(bql, io, &o.source)?;
    let target_len = length_of(bql, io, &o.target)?;
    if target_len < len {
        return Err(Error::InvalidArgument(format!(
            "backup: the target '{}' ({target_len} bytes) is smaller than the source '{}' \
             ({len} bytes)",
            o.target.name(),
            o.source.name()
        )));
    }
    let state = Arc::new(CopyState::new(
        len,
        o.cluster_size,
        o.sync == BackupSync::Top,
    ));
    let filter_name = o.common.filter_name(job, "backup");
    let source_drained = bql.drain(&o.source);
    let target_drained = bql.drain(&o.target);
    let added = bql.write(|w| {
        w.insert_filter_with(
            &source_drained,
            &filter_name,
            JobFilter::new(
                CopyBeforeWrite {
                    state: state.clone(),
                },
                job.clone(),
            ),
            &[(TARGET, &o.target)],
        )
    });
    let filter = match added {
        Ok(filter) => filter,
        Err(e) => {
            drop(target_drained);
            drop(source_drained);
            return Err(e);
        }
    };
    // The caller's step at the point in time (still drained).
    let at_start = o
        .at_start
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(f) = at_start {
        // A failing or panicking step leaves no filter behind (a panic goes
        // on to the caller once the graph is as it was, rule 20).
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(bql)));
        if !matches!(outcome, Ok(Ok(()))) {
            drop(target_drained);
            drop(source_drained);
            let d = bql.drain(&filter);
            let _ = bql.write(|w| w.remove_filter(&d));
            match outcome {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(())) => unreachable!("checked above"),
            }
        }
    }
    // Still drained: nothing has written the source since the filter went
    // in, so the bitmap's bits are exactly what changed before this point.
    let bitmap = match &o.sync {
        BackupSync::Bitmap { bitmap, mode } => {
            let s = o.source.gs(bql);
            let taken = s.dirty_bitmap_snapshot(bitmap).and_then(|snap| {
                s.clear_dirty_bitmap(bitmap)?;
                s.set_dirty_bitmap_busy(bitmap, true)?;
                Ok(snap)
            });
            match taken {
                Ok(snap) => {
                    let ranges = snap.dirty_ranges();
                    for (off, l) in &ranges {
                        state.set(*off, *l);
                    }
                    Some(TakenBitmap {
                        name: bitmap.clone(),
                        mode: *mode,
                        ranges,
                    })
                }
                Err(e) => {
                    drop(target_drained);
                    drop(source_drained);
                    let d = bql.drain(&filter);
                    let _ = bql.write(|w| w.remove_filter(&d));
                    return Err(e);
                }
            }
        }
        _ => {
            state.set(0, len);
            None
        }
    };
    drop(target_drained);
    drop(source_drained);
    Ok(BackupJob {
        source: o.source.clone(),
        target: o.target.clone(),
        filter,
        state,
        bitmap,
        copy: o.common.copy,
    })
}

/// The bitmap an incremental backup took.
struct TakenBitmap {
    name: String,
    mode: BitmapSyncMode,
    /// Its dirty ranges when the job started.
    ranges: Vec<(u64, u64)>,
}

struct BackupJob {
    source: NodeHandle,
    target: NodeHandle,
    filter: NodeHandle,
    state: Arc<CopyState>,
    bitmap: Option<TakenBitmap>,
    copy: CopyOptions,
}

/// Runs `op` as one request entering at the job's filter node, under a
/// read guard of `io`; while the filter is drained (the request is
/// refused), waits at the job's pause points and tries again. `None`
/// when the job was cancelled meanwhile.
async fn through_filter<T: Send + 'static>(
    io: &mut IoTask,
    runner: &JobRunner,
    filter: &NodeHandle,
    op: impl for<'a> Fn(&'a CopyBeforeWrite, RequestRef<'a>) -> IoFuture<'a, T>,
) -> Result<Option<T>> {
    loop {
        let result = {
            let guard = io.read().await;
            let node = filter.try_io(&guard)?;
            let driver = node
                .driver_as::<JobFilter<CopyBeforeWrite>>()
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "'{}' is not a backup filter any more",
                        node.name()
                    ))
                })?;
            node.enter_own(driver, |request| op(driver.inner(), request))
                .await
        };
        match result {
            Err(Error::Drained { .. }) => {
                // The drain pauses the job (its filter's drained_begin):
                // wait there; the sleep covers the instant between the
                // refusal and the pause.
                if runner.pause_point(io).await.is_err() {
                    return Ok(None);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            other => return other.map(Some),
        }
    }
}

/// The job's hook for the copy engine: clusters still to copy are copied
/// through the filter.
struct BackupChunks {
    filter: NodeHandle,
    state: Arc<CopyState>,
    runner: JobRunner,
}

impl CopyChunks for BackupChunks {
    async fn needs_copy(&self, _io: &mut IoTask, offset: u64, len: u64) -> Result<(bool, u64)> {
        let s = &self.state;
        let (first, end) = s.clusters(offset, len);
        if first >= end {
            return Ok((false, len.max(1)));
        }
        let (todo, n) = s.run(first, end);
        let stop = ((first + n) * s.cluster).min(offset + len);
        Ok((todo, (stop - offset).max(1)))
    }

    async fn copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), ChunkError> {
        let len = buf.len() as u64;
        let copied = through_filter(io, &self.runner, &self.filter, move |cbw, request| {
            Box::pin(async move { Ok(cbw.state.copy_before(request, offset, len, true).await) })
        })
        .await
        .map_err(ChunkError::read)?;
        // Cancelled while waiting for a drain's end: the engine's next pause
        // point reports it.
        copied.unwrap_or(Ok(()))
    }
}

impl BackupJob {
    /// Puts `ranges` back into the source's bitmap (QEMU's reclaim of a
    /// frozen bitmap's successor, or its merge of what was not copied).
    async fn dirty_again(&self, cx: &mut JobCx<'_>, ranges: &[(u64, u64)]) {
        let Some(b) = &self.bitmap else { return };
        let guard = cx.io().read().await;
        let result = self.source.try_io(&guard).and_then(|node| {
            ranges
                .iter()
                .try_for_each(|(off, len)| node.set_dirty(&b.name, *off, *len))
        });
        drop(guard);
        if let Err(e) = result {
            tracing::warn!(
                "backup job '{}': could not put the bits back into bitmap '{}': {e}",
                cx.job().id(),
                b.name
            );
        }
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    async fn run(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let chunks = BackupChunks {
            filter: self.filter.clone(),
            state: self.state.clone(),
            runner: cx.runner().clone(),
        };
        let cluster = self.state.cluster;
        let options = CopyOptions {
            chunk_size: self.copy.chunk_size.div_ceil(cluster).max(1) * cluster,
            alignment: cluster,
            ..self.copy
        };
        // A copy that waited out a drain may leave clusters behind: go
        // again until none is left (QEMU's backup loop does the same).
        loop {
            let report = copy_range(cx, &chunks, 0..self.state.len, &options).await?;
            if let Some(e) = report.ignored {
                // The target misses what the `ignore` policy skipped.
                return Err(e);
            }
            if self.state.remaining() == 0 {
                break;
            }
            cx.pause_point().await?;
        }
        let runner = cx.runner().clone();
        let flushed = through_filter(cx.io(), &runner, &self.filter, |_, request| {
            forward::flush(request, TARGET)
        })
        .await?;
        match flushed {
            Some(()) => Ok(()),
            None => Err(Error::JobCancelled(cx.job().id().to_owned())),
        }
    }

    async fn commit(&mut self, cx: &mut JobCx<'_>) {
        if let Some(b) = &self.bitmap {
            if b.mode == BitmapSyncMode::Never {
                let ranges = b.ranges.clone();
                self.dirty_again(cx, &ranges).await;
            }
        }
    }

    async fn abort(&mut self, cx: &mut JobCx<'_>) {
        if let Some(b) = &self.bitmap {
            let ranges = match b.mode {
                BitmapSyncMode::Always => self.state.todo_ranges(),
                BitmapSyncMode::OnSuccess | BitmapSyncMode::Never => b.ranges.clone(),
            };
            self.dirty_again(cx, &ranges).await;
        }
    }

    async fn clean(&mut self, cx: &mut JobCx<'_>) {
        let (filter, target, source) = (
            self.filter.clone(),
            self.target.clone(),
            self.source.clone(),
        );
        let bitmap = self.bitmap.as_ref().map(|b| b.name.clone());
        let result = cx
            .on_main_loop(move |bql| -> Result<()> {
                if let Some(name) = bitmap {
                    let s = source.gs(bql);
                    if s.is_in_graph() {
                        let _ = s.set_dirty_bitmap_busy(&name, false);
                    }
                }
                if filter.gs(bql).is_in_graph() {
                    let filter_drained = bql.drain(&filter);
                    let target_drained = target.gs(bql).is_in_graph().then(|| bql.drain(&target));
                    let removed = bql.write(|w| w.remove_filter(&filter_drained));
                    drop(target_drained);
                    removed?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = result.and_then(|r| r) {
            tracing::warn!(
                "backup job '{}': removing the copy-before-write filter failed: {e}",
                cx.job().id()
            );
        }
    }
}
