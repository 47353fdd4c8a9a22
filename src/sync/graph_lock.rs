//! The graph read/write lock, QEMU's `block/graph-lock.c` redone.
//!
//! Every I/O context owns a [`ReaderShard`]: reader counters on two cache
//! lines of their own (counters only the context's owner thread writes, and
//! one that every other thread updates with a locked RMW), each line with a
//! copy of the writer flag. A reader updates its own shard, then loads the flag copy
//! on the line it just wrote, ordered by the [`FenceMode`]'s barrier; it
//! backs off and queues if the flag is up. The writer raises the flag and
//! every copy, issues the mode's barrier (`membarrier` in the asymmetric
//! mode), and waits until the sum over all shards is zero; leaving, it wakes
//! every queued reader. A writer that waits longer than a threshold reports
//! through `tracing` which contexts hold readers (and, in debug builds or
//! with the `lock-diagnostics` feature, where each guard was taken).
//!
//! Why this is correct (the Dekker pair in both fence modes, the owner and
//! foreign counters, why the writer's sum is never short, the flag copies,
//! wake-ups, contexts that go away) is argued in `DESIGN.md` §3, and only
//! there: a change to the protocol changes that section in the same commit.

use std::task::{Context, Poll, Waker};
#[cfg(not(loom))]
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use super::membarrier::{self, FenceMode};
use super::primitives::{
    register_waker, seq_cst_point, thread_id, thread_id_if_assigned, Arc, AtomicBool, AtomicU64,
    AtomicUsize, AtomicWaker, Mutex, Ordering,
};
use super::wake::{wake_catching, wake_each};

/// `owner` of a shard no thread has claimed yet (asymmetric mode).
const UNCLAIMED: u64 = u64::MAX;
/// `owner` of a shard nobody may claim (symmetric mode: every update is a
/// locked RMW on `foreign`).
const NOBODY: u64 = u64::MAX - 1;

/// The owner thread's half of a shard: one cache line only it writes
/// (besides the writer raising and lowering `writer`).
#[derive(Debug)]
struct OwnedCounter {
    /// [`thread_id`] of the thread allowed to write `count`, or
    /// [`UNCLAIMED`] / [`NOBODY`]; never 0, so a thread without an id yet
    /// never matches.
    owner: AtomicU64,
    /// Readers that entered on the owner thread (wrapping).
    entered: AtomicUsize,
    /// Readers that left on the owner thread (wrapping). Separate from
    /// `entered` so a lock/unlock pair is two independent increments, not
    /// a chain of two read-modify-writes of one word.
    left: AtomicUsize,
    /// Copy of the writer flag.
    writer: AtomicBool,
}

/// Every other thread's half of a shard.
#[derive(Debug)]
struct ForeignCounter {
    /// Readers that entered minus readers that left on any other thread
    /// (wrapping).
    count: AtomicUsize,
    /// Copy of the writer flag.
    writer: AtomicBool,
}

/// One I/O context's reader counters (see the module documentation).
#[derive(Debug)]
pub(crate) struct ReaderShard {
    owned: CachePadded<OwnedCounter>,
    foreign: CachePadded<ForeignCounter>,
    /// The context's name, for the slow-writer report.
    #[cfg_attr(loom, allow(dead_code))] // loom models make no reports
    name: Box<str>,
    /// Where each live guard of this context was taken (diagnostic builds).
    #[cfg(all(not(loom), any(debug_assertions, feature = "lock-diagnostics")))]
    sites: std::sync::Mutex<Vec<GuardSite>>,
}

/// A live read guard, as the slow-writer report describes it.
#[cfg(all(not(loom), any(debug_assertions, feature = "lock-diagnostics")))]
#[derive(Debug)]
struct GuardSite {
    /// The task whose `IoTask` took it (each `IoTask` holds one guard at most).
    task: u64,
    at: &'static std::panic::Location<'static>,
    thread: std::thread::Thread,
    since: Instant,
}

impl ReaderShard {
    fn new(mode: FenceMode, writer: bool, name: &str) -> Self {
        let owner = match mode {
            FenceMode::Asymmetric => UNCLAIMED,
            FenceMode::Symmetric => NOBODY,
        };
        ReaderShard {
            owned: CachePadded::new(OwnedCounter {
                owner: AtomicU64::new(owner),
                entered: AtomicUsize::new(0),
                left: AtomicUsize::new(0),
                writer: AtomicBool::new(writer),
            }),
            foreign: CachePadded::new(ForeignCounter {
                count: AtomicUsize::new(0),
                writer: AtomicBool::new(writer),
            }),
            name: name.into(),
            #[cfg(all(not(loom), any(debug_assertions, feature = "lock-diagnostics")))]
            sites: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records where task `task` took the guard it now holds (diagnostic
    /// builds; off the lock's own fast path, but a mutex per guard).
    #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
    pub(crate) fn note_guard_taken(&self, task: u64, at: &'static std::panic::Location<'static>) {
        #[cfg(not(loom))]
        lock_std(&self.sites).push(GuardSite {
            task,
            at,
            thread: std::thread::current(),
            since: Instant::now(),
        });
        #[cfg(loom)]
        let _ = (task, at);
    }

    /// Forgets the guard of task `task` (dropped).
    #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
    pub(crate) fn note_guard_released(&self, task: u64) {
        #[cfg(not(loom))]
        {
            let mut sites = lock_std(&self.sites);
            if let Some(i) = sites.iter().rposition(|s| s.task == task) {
                sites.swap_remove(i);
            }
        }
        #[cfg(loom)]
        let _ = task;
    }

    /// Appends a line per live guard to `out` (the slow-writer report).
    #[cfg(not(loom))]
    fn describe_guards(&self, out: &mut String, now: Instant) {
        #[cfg(any(debug_assertions, feature = "lock-diagnostics"))]
        for site in lock_std(&self.sites).iter() {
            use std::fmt::Write;
            let _ = write!(
                out,
                "\n    guard taken at {}:{}:{} on thread '{}', held for {:?}",
                site.at.file(),
                site.at.line(),
                site.at.column(),
                site.thread.name().unwrap_or("<unnamed>"),
                now.saturating_duration_since(site.since),
            );
        }
        #[cfg(not(any(debug_assertions, feature = "lock-diagnostics")))]
        {
            let _ = now;
            out.push_str(
                "\n    (build with debug assertions or the `lock-diagnostics` feature to see \
                 where each guard was taken)",
            );
        }
    }

    /// Number of readers currently inside the graph through this shard.
    ///
    /// A snapshot for diagnostics: exact whenever no guard of this shard is
    /// being taken or dropped on another thread meanwhile; a racing
    /// migration can make the two words momentarily disagree, shown as 0.
    pub(crate) fn readers(&self) -> usize {
        let sum = self.raw_sum();
        if (sum as isize) < 0 {
            0
        } else {
            sum
        }
    }

    /// `entered - left + foreign`, wrapping.
    ///
    /// `left` is loaded first: if that load sees a leave, it also makes the
    /// owner thread's earlier increment of `entered` visible to the load
    /// after it (release store, acquire load), so a reader is never seen
    /// leaving without being seen entering.
    fn raw_sum(&self) -> usize {
        let left = self.owned.left.load(Ordering::SeqCst);
        let entered = self.owned.entered.load(Ordering::SeqCst);
        let foreign = self.foreign.count.load(Ordering::SeqCst);
        entered.wrapping_sub(left).wrapping_add(foreign)
    }

    /// `(owned, foreign)` counts, for tests.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn words(&self) -> (usize, usize) {
        let left = self.owned.left.load(Ordering::SeqCst);
        let entered = self.owned.entered.load(Ordering::SeqCst);
        (
            entered.wrapping_sub(left),
            self.foreign.count.load(Ordering::SeqCst),
        )
    }

    /// Sets both flag copies (writer side, under the registry mutex).
    fn set_writer(&self, up: bool, order: Ordering) {
        self.owned.writer.store(up, order);
        self.foreign.writer.store(up, order);
    }

    /// Counts a reader entering (`ENTER`) or leaving on the calling
    /// thread's counter and returns the writer flag loaded after that (see
    /// the module documentation for the ordering).
    #[inline(always)]
    fn update<const ENTER: bool>(&self) -> bool {
        let owned = &*self.owned;
        if owned.owner.load(Ordering::Relaxed) == thread_id_if_assigned() {
            owned.bump(if ENTER { &owned.entered } else { &owned.left })
        } else {
            self.update_elsewhere::<ENTER>()
        }
    }

    /// [`ReaderShard::update`] off the owner thread, or claiming the shard:
    /// out of line so the owner's path is straight-line code.
    #[cold]
    #[inline(never)]
    fn update_elsewhere<const ENTER: bool>(&self) -> bool {
        let owned = &*self.owned;
        if owned.owner.load(Ordering::Relaxed) == UNCLAIMED && self.claim() {
            return owned.bump(if ENTER { &owned.entered } else { &owned.left });
        }
        let delta = if ENTER { 1 } else { usize::MAX };
        self.foreign.count.fetch_add(delta, Ordering::SeqCst);
        seq_cst_point();
        self.foreign.writer.load(Ordering::SeqCst)
    }

    /// Claims the shard for the calling thread if nobody has; whether the
    /// calling thread owns it now.
    fn claim(&self) -> bool {
        let me = thread_id();
        // Relaxed: `count` is still 0 and was published with the shard;
        // nothing else is handed over with ownership.
        match self
            .owned
            .owner
            .compare_exchange(UNCLAIMED, me, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(owner) => owner == me,
        }
    }
}

impl OwnedCounter {
    /// The owner thread's update of `counter` (`entered` or `left`): plain
    /// load + store, light barrier, flag.
    #[inline(always)]
    fn bump(&self, counter: &AtomicUsize) -> bool {
        // Only the owner thread writes these counters, so load + store
        // loses no update. Release: a leaving reader's graph accesses happen
        // before a writer's load that sees the new count (and, for `left`,
        // the increment of `entered` before it: see `raw_sum`).
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Release,
        );
        membarrier::light_barrier();
        // SeqCst (a plain `mov` on x86): its acquire half makes a previous
        // writer's changes visible to the reader that enters.
        self.writer.load(Ordering::SeqCst)
    }
}

/// The graph lock shared by the main loop and every I/O context.
#[derive(Debug)]
pub(crate) struct GraphLock {
    /// Raised while a writer is waiting or inside; copied into every shard
    /// (readers load their shard's copy). Changed under `shards`' mutex.
    writer_active: CachePadded<AtomicBool>,
    /// How readers order their counter update before their flag load.
    mode: FenceMode,
    /// Nesting depth of write sections. Only the main-loop thread changes it.
    writers: AtomicUsize,
    /// The (single, main-loop) writer waiting for readers to leave.
    writer_waker: AtomicWaker,
    /// Readers that found the writer flag raised.
    queued_readers: Mutex<Vec<Waker>>,
    /// Every shard that may still hold readers.
    shards: Mutex<Vec<Arc<ReaderShard>>>,
    /// Report a writer's wait after this many nanoseconds, then after twice
    /// that, and so on; `u64::MAX`: never.
    #[cfg(not(loom))]
    report_after: std::sync::atomic::AtomicU64,
    /// Whether `slow_wait` holds a wait (a cheap check for the writer that
    /// gets in at once).
    #[cfg(not(loom))]
    wait_tracked: std::sync::atomic::AtomicBool,
    /// The current writer's wait, once it has had to wait.
    #[cfg(not(loom))]
    slow_wait: std::sync::Mutex<Option<SlowWait>>,
}

/// A writer's wait for readers, as tracked for the report.
#[cfg(not(loom))]
#[derive(Debug)]
struct SlowWait {
    since: Instant,
    /// When the next report is due.
    next: Instant,
    /// Reports made so far.
    reports: u32,
}

/// Environment variable with the default report threshold in milliseconds
/// (`off` for never).
#[cfg(not(loom))]
pub(crate) const REPORT_ENV: &str = "BLOCKGRAPH_LOCK_REPORT_MS";

/// The report threshold when [`REPORT_ENV`] does not say.
#[cfg(not(loom))]
const DEFAULT_REPORT_AFTER: Duration = Duration::from_secs(1);

/// The threshold from [`REPORT_ENV`], in the form `report_after` stores.
#[cfg(not(loom))]
fn report_after_from_env() -> u64 {
    match std::env::var(REPORT_ENV) {
        Ok(v) if v.trim().eq_ignore_ascii_case("off") => u64::MAX,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) => duration_nanos(Duration::from_millis(ms)),
            Err(_) => duration_nanos(DEFAULT_REPORT_AFTER),
        },
        Err(_) => duration_nanos(DEFAULT_REPORT_AFTER),
    }
}

#[cfg(not(loom))]
fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1)
}

impl Default for GraphLock {
    /// A lock in the mode [`FenceMode::detect`] picks (the
    /// `BLOCKGRAPH_LOCK_FENCE` override, else membarrier where available).
    fn default() -> Self {
        GraphLock::with_mode(FenceMode::detect())
    }
}

impl GraphLock {
    /// A lock in `mode`.
    ///
    /// [`FenceMode::Asymmetric`] is only sound once membarrier registration
    /// succeeded ([`membarrier::asymmetric_available`]); outside loom models
    /// a request for it without that falls back to symmetric.
    pub(crate) fn with_mode(mode: FenceMode) -> Self {
        #[cfg(not(loom))]
        let mode = match mode {
            FenceMode::Asymmetric if !membarrier::asymmetric_available() => FenceMode::Symmetric,
            m => m,
        };
        GraphLock {
            writer_active: CachePadded::new(AtomicBool::new(false)),
            mode,
            writers: AtomicUsize::new(0),
            writer_waker: AtomicWaker::new(),
            queued_readers: Mutex::new(Vec::new()),
            shards: Mutex::new(Vec::new()),
            #[cfg(not(loom))]
            report_after: std::sync::atomic::AtomicU64::new(report_after_from_env()),
            #[cfg(not(loom))]
            wait_tracked: std::sync::atomic::AtomicBool::new(false),
            #[cfg(not(loom))]
            slow_wait: std::sync::Mutex::new(None),
        }
    }

    /// Sets how long a writer waits for readers before it reports who holds
    /// them (`None`: never). See the module documentation. (Loom models make
    /// no reports.)
    pub(crate) fn set_report_after(&self, after: Option<std::time::Duration>) {
        #[cfg(not(loom))]
        self.report_after.store(
            after.map_or(u64::MAX, duration_nanos),
            std::sync::atomic::Ordering::Relaxed,
        );
        #[cfg(loom)]
        let _ = after;
    }

    /// The fence mode this lock runs in.
    #[cfg_attr(not(test), allow(dead_code))] // tests; no public accessor yet
    pub(crate) fn mode(&self) -> FenceMode {
        self.mode
    }

    /// Creates a shard for a new I/O context and registers it with the
    /// writer.
    #[cfg_attr(not(test), allow(dead_code))] // unit tests and loom models
    pub(crate) fn new_shard(&self) -> Arc<ReaderShard> {
        self.new_named_shard("")
    }

    /// [`GraphLock::new_shard`] for the context `name` (named in the
    /// slow-writer report).
    pub(crate) fn new_named_shard(&self, name: &str) -> Arc<ReaderShard> {
        let mut shards = lock(&self.shards);
        // The flag only changes under this mutex: the copies start right.
        let writer = self.writer_active.load(Ordering::Relaxed);
        let shard = Arc::new(ReaderShard::new(self.mode, writer, name));
        shards.push(shard.clone());
        shard
    }

    /// Number of shards the writer still has to look at.
    pub(crate) fn shard_count(&self) -> usize {
        let mut shards = lock(&self.shards);
        prune(&mut shards);
        shards.len()
    }

    /// The read fast path: enter if no writer is active.
    #[inline]
    pub(crate) fn try_read(&self, shard: &ReaderShard) -> bool {
        if !shard.update::<true>() {
            return true;
        }
        // Back off on the same thread, hence the same counter word.
        self.read_unlock(shard);
        false
    }

    /// Leaves a read section entered through `shard` (on any thread).
    #[inline]
    pub(crate) fn read_unlock(&self, shard: &ReaderShard) {
        if shard.update::<false>() {
            self.wake_writer();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_writer(&self) {
        // The writer re-sums on every wake-up; a reader cannot tell cheaply
        // whether it was the last one (the counts are split), and waking is
        // only paid while a writer waits.
        wake_catching(
            || self.writer_waker.wake(),
            "a reader leaving the graph lock",
        );
    }

    /// Enters a read section, parking the task while a writer is active.
    #[inline]
    pub(crate) fn poll_read(&self, shard: &ReaderShard, cx: &mut Context<'_>) -> Poll<()> {
        if self.try_read(shard) {
            return Poll::Ready(());
        }
        self.poll_read_slow(shard, cx)
    }

    #[cold]
    #[inline(never)]
    fn poll_read_slow(&self, shard: &ReaderShard, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.try_read(shard) {
                return Poll::Ready(());
            }
            let mut queue = lock(&self.queued_readers);
            if self.writer_active.load(Ordering::SeqCst) {
                if !queue.iter().any(|w| w.will_wake(cx.waker())) {
                    queue.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            // The writer left between our check and taking the queue: retry.
        }
    }

    /// Raises or lowers the flag and every shard's copy.
    ///
    /// Raising stores the lock's own flag first, lowering stores it last,
    /// with release (or `SeqCst`) stores of the copies in between: a reader
    /// that saw a raised copy and then finds the lock's flag down under the
    /// queue mutex also finds its copy down when it retries (it never spins
    /// on a stale copy).
    fn set_writer_flags(&self, up: bool) {
        let shards = lock(&self.shards);
        // Asymmetric: plain (release) stores, ordered before the counter
        // loads by the membarrier that follows. Symmetric: the stores are
        // half of the SeqCst Dekker pair.
        let order = match self.mode {
            FenceMode::Asymmetric => Ordering::Release,
            FenceMode::Symmetric => Ordering::SeqCst,
        };
        if up {
            self.writer_active.store(true, Ordering::SeqCst);
        }
        for shard in shards.iter() {
            shard.set_writer(up, order);
        }
        if !up {
            self.writer_active.store(false, Ordering::SeqCst);
        }
    }

    /// Announces a writer. Readers arriving from now on queue.
    ///
    /// Main-loop thread only; nested announcements count. O(contexts).
    pub(crate) fn write_announce(&self) {
        if self.writers.fetch_add(1, Ordering::Relaxed) == 0 {
            self.set_writer_flags(true);
            match self.mode {
                FenceMode::Asymmetric => membarrier::heavy_barrier(),
                FenceMode::Symmetric => seq_cst_point(),
            }
        }
    }

    /// Ready once no reader is inside the graph; otherwise arranges for the
    /// last reader out to wake `cx`. O(contexts).
    pub(crate) fn poll_readers_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        debug_assert!(self.writer_active(), "graph lock: waiting without a writer");
        register_waker(&self.writer_waker, cx.waker());
        if self.readers_for_writer() == 0 {
            #[cfg(not(loom))]
            if self.wait_tracked.load(std::sync::atomic::Ordering::Relaxed) {
                self.end_slow_wait(true);
            }
            Poll::Ready(())
        } else {
            #[cfg(not(loom))]
            self.writer_still_waiting(cx.waker());
            Poll::Pending
        }
    }

    /// Tracks a writer that found readers inside: arms the timer for the
    /// first report, or reports if one is due. Main-loop thread only.
    #[cfg(not(loom))]
    #[cold]
    #[inline(never)]
    fn writer_still_waiting(&self, waker: &Waker) {
        let after = self.report_after.load(std::sync::atomic::Ordering::Relaxed);
        if after == u64::MAX {
            return;
        }
        let after = Duration::from_nanos(after);
        let now = Instant::now();
        let mut slow = lock_std(&self.slow_wait);
        let due = match &mut *slow {
            None => {
                let next = now + after;
                *slow = Some(SlowWait {
                    since: now,
                    next,
                    reports: 0,
                });
                self.wait_tracked
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                next
            }
            Some(wait) if now >= wait.next => {
                self.report_slow_wait(now.duration_since(wait.since), now);
                wait.reports = wait.reports.saturating_add(1);
                // Twice the time waited so far: 1 s, 2 s, 4 s, ...
                let backoff = after.saturating_mul(1u32 << wait.reports.min(20));
                wait.next = now + backoff;
                wait.next
            }
            Some(_) => return,
        };
        drop(slow);
        report_timer::wake_at(due, waker.clone());
    }

    /// Forgets the writer's wait (it got in, or gave up); says so if the
    /// wait had been reported.
    #[cfg(not(loom))]
    #[cold]
    #[inline(never)]
    fn end_slow_wait(&self, entered: bool) {
        self.wait_tracked
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(wait) = lock_std(&self.slow_wait).take() {
            if wait.reports > 0 {
                tracing::warn!(
                    target: "blockgraph::graph_lock",
                    waited_ms = u64::try_from(wait.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    entered,
                    "blockgraph: the writer reported above {} after {:?}",
                    if entered { "got the write section" } else { "gave up" },
                    wait.since.elapsed(),
                );
            }
        }
    }

    /// The report: which contexts have readers inside, and (diagnostic
    /// builds) where each live guard was taken.
    #[cfg(not(loom))]
    fn report_slow_wait(&self, waited: Duration, now: Instant) {
        let (total, holders) = self.describe_readers(now);
        tracing::warn!(
            target: "blockgraph::graph_lock",
            waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            readers = total,
            "blockgraph: a writer (write section) has waited {waited:?} for {total} reader(s) to \
             leave the graph, and keeps waiting. Read guards held:{holders}\n\
             A task that holds a read guard while it waits for something that needs the lock \
             (another task's read lock, a drain, main-loop work) never lets the writer in: rules \
             9-11 hold per task, not across tasks (DESIGN §2.9)"
        );
    }

    /// Every context with readers inside, a line each, and (diagnostic
    /// builds) where each live guard was taken; with the number of readers.
    #[cfg(not(loom))]
    pub(crate) fn describe_readers(&self, now: Instant) -> (usize, String) {
        use std::fmt::Write;
        let mut holders = String::new();
        let mut total = 0usize;
        let mut shards = lock(&self.shards);
        prune(&mut shards);
        for shard in shards.iter() {
            let n = shard.readers();
            if n == 0 {
                continue;
            }
            total += n;
            let name: &str = if shard.name.is_empty() {
                "<unnamed>"
            } else {
                &shard.name
            };
            let _ = write!(holders, "\n  context '{name}': {n} reader(s) inside");
            shard.describe_guards(&mut holders, now);
        }
        (total, holders)
    }

    /// How long a wait on the main loop may last before it is reported
    /// (`None`: reports are off). Shared by writers and drains.
    #[cfg(not(loom))]
    pub(crate) fn report_threshold(&self) -> Option<Duration> {
        match self.report_after.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// Wakes `waker` at `at`, so a wait that nothing else wakes can report.
    #[cfg(not(loom))]
    pub(crate) fn wake_for_report(at: Instant, waker: &Waker) {
        report_timer::wake_at(at, waker.clone());
    }

    /// Ends a write section (or abandons a waiting writer) and resumes every
    /// queued reader once the outermost writer leaves.
    pub(crate) fn write_leave(&self) {
        let before = self.writers.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before > 0, "graph lock: writer count underflow");
        if before == 1 {
            #[cfg(not(loom))]
            if self.wait_tracked.load(std::sync::atomic::Ordering::Relaxed) {
                // Withdrawn while still waiting (a cancelled `MainTask::write`).
                self.end_slow_wait(false);
            }
            self.set_writer_flags(false);
            let queued = std::mem::take(&mut *lock(&self.queued_readers));
            wake_each(queued, "the graph writer leaving");
        }
    }

    /// Whether a writer is waiting or inside.
    pub(crate) fn writer_active(&self) -> bool {
        self.writer_active.load(Ordering::SeqCst)
    }

    /// Sum of readers over every registered shard (a diagnostic snapshot,
    /// see [`ReaderShard::readers`]).
    pub(crate) fn total_readers(&self) -> usize {
        let mut shards = lock(&self.shards);
        prune(&mut shards);
        shards.iter().map(|s| s.readers()).sum()
    }

    /// The writer's sum, after its flag stores and barrier: never short
    /// (see the module documentation), O(contexts).
    fn readers_for_writer(&self) -> usize {
        let mut shards = lock(&self.shards);
        prune(&mut shards);
        shards.iter().fold(0usize, |total, s| {
            let n = s.raw_sum();
            debug_assert!(
                (n as isize) >= 0,
                "graph lock: a shard's reader count went negative under a writer"
            );
            total.wrapping_add(n)
        })
    }
}

/// Drops shards nobody but the registry holds: no reader can enter through
/// them any more, and every reader that did has left (it held an `Arc`).
fn prune(shards: &mut Vec<Arc<ReaderShard>>) {
    shards.retain(|s| Arc::strong_count(s) > 1);
}

fn lock<T>(m: &Mutex<T>) -> impl std::ops::DerefMut<Target = T> + '_ {
    // A panic while holding these mutexes cannot leave the data half
    // updated (push, take, retain, flag stores), so poisoning carries no
    // information.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for the `std` mutexes of the diagnostics (never modelled by loom).
#[cfg(not(loom))]
fn lock_std<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wakes waiting writers when their report is due: one thread for the
/// process, started the first time a writer has to wait, asleep otherwise.
#[cfg(not(loom))]
mod report_timer {
    use std::sync::{Condvar, Mutex, Once};
    use std::task::Waker;
    use std::time::Instant;

    static QUEUE: Mutex<Vec<(Instant, Waker)>> = Mutex::new(Vec::new());
    static CHANGED: Condvar = Condvar::new();
    static START: Once = Once::new();

    /// Wakes `waker` at `at` (or soon after).
    pub(super) fn wake_at(at: Instant, waker: Waker) {
        START.call_once(|| {
            // Without the thread there are no reports, and nothing else.
            let _ = std::thread::Builder::new()
                .name("blockgraph-lock-report".into())
                .spawn(run);
        });
        super::lock_std(&QUEUE).push((at, waker));
        CHANGED.notify_one();
    }

    fn run() {
        let mut queue = super::lock_std(&QUEUE);
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            queue.retain(|(at, waker)| {
                if *at <= now {
                    due.push(waker.clone());
                    false
                } else {
                    true
                }
            });
            if !due.is_empty() {
                drop(queue);
                // A panicking waker must not end this thread, which every
                // later report in the process needs.
                crate::sync::wake::wake_each(due, "the lock report timer");
                queue = super::lock_std(&QUEUE);
                continue;
            }
            queue = match queue.iter().map(|(at, _)| *at).min() {
                None => CHANGED.wait(queue).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    CHANGED
                        .wait_timeout(queue, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}
