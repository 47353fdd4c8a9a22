//! The graph read/write lock, QEMU's `block/graph-lock.c` redone.
//!
//! # Protocol
//!
//! Every I/O context owns a [`ReaderShard`]: counters of the readers inside
//! the graph through that context, on cache lines of their own, each line
//! with a copy of the writer flag. A reader bumps only its own shard and
//! then checks the flag copy on the line it just wrote; no shared cache line
//! is written (or even read) on the fast path. The writer raises the flag
//! (the lock's own and every shard's copy, under the shard registry's
//! mutex, which also initialises the copies of a shard created meanwhile)
//! and waits until the sum over all shards is zero.
//!
//! The two sides form a Dekker pair: the reader does *update its counter,
//! then load the flag*, the writer does *store the flag, then load the
//! counters*. With a StoreLoad barrier on both sides at least one sees the
//! other: either the reader sees the flag (and backs off) or the writer sees
//! the count (and waits). How the reader's barrier is paid for is the
//! [`FenceMode`]:
//!
//! * **Asymmetric** (Linux `membarrier`, the default where the kernel grants
//!   it): the reader's barrier is a compiler fence; the writer, after raising
//!   the flag, calls `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which
//!   runs a full barrier on every CPU currently running one of our threads.
//!   For any reader, that barrier lands somewhere in its program order: if
//!   it lands before the reader's flag load, the load comes after the
//!   writer's flag store and sees it; if it lands after the flag load, it is
//!   also after the counter store (the compiler fence keeps program order),
//!   which is then visible to every counter load the writer makes after
//!   `membarrier` returns. Either way one side sees the other, exactly as if
//!   the compiler fence had been a full fence.
//! * **Symmetric** (fallback, or forced with `BLOCKGRAPH_LOCK_FENCE=symmetric`):
//!   the counter update is one `SeqCst` read-modify-write (`lock xadd` on
//!   x86, itself the StoreLoad barrier) and all four accesses (per shard:
//!   the reader's update and flag-copy load, the writer's flag-copy store
//!   and counter load) are `SeqCst`, so the single total order of `SeqCst`
//!   operations puts the reader's flag load after the writer's flag store or
//!   the writer's counter load after the reader's update. No `fence(SeqCst)`
//!   (an `mfence`) is ever issued on the read side.
//!
//! # Who may write a counter without a locked instruction
//!
//! A plain load-and-store increment is only atomic if no other thread writes
//! the same word meanwhile. A context's tasks may run on several threads
//! (an embedder's multi-thread runtime) and a guard may be dropped on a
//! thread other than the one that took it. So each shard has two counters:
//!
//! * `owned`, written *only* by the shard's owner thread, with a plain
//!   `Relaxed` load and store: a single writer, so no update is lost; other
//!   threads only load it. The owner is the first thread that takes a read
//!   lock through the shard in asymmetric mode (claimed once with a
//!   compare-exchange; thread ids are never reused, so a dead owner's counter
//!   is simply never written again). An I/O thread's context is owned by
//!   that thread.
//! * `foreign`, updated with a `SeqCst` read-modify-write by every other
//!   thread (and by everyone in symmetric mode), on a line of its own with
//!   its own flag copy, so foreign readers never touch the owner's line.
//!
//! A guard taken on the owner thread and dropped elsewhere adds one to
//! `owned` and subtracts one from `foreign` (wrapping): only the *sum* of a
//! shard's words, and of all shards, is the number of readers inside. That
//! sum is never short while the writer waits: every reader that entered made
//! its increment visible to the writer (the Dekker argument above), so each
//! reader contributes one, or zero once its decrement is visible too; a
//! reader that arrives after the flag backs off on the *same* word it
//! incremented (same thread), contributing zero or one. No read order of the
//! two words can therefore produce a false zero.
//!
//! A reader leaving updates the counter it is allowed to (by the thread it
//! is on), orders that before a load of the flag the same way as entering,
//! and wakes the writer if the flag is up. The writer registers its waker
//! *before* summing, so a decrement it did not see is followed by a wake-up
//! it will get: no lost wake-up. Readers that find the flag up park their
//! waker in a queue under a mutex and re-check the flag under that mutex; the
//! writer clears the flag (and every copy) *before* taking the mutex to
//! drain the queue, so a reader either sees the flag down or is in the
//! queue when it is drained.
//!
//! # Contexts that go away
//!
//! The registry of shards holds an `Arc` to each. A shard leaves the registry
//! only when the registry's `Arc` is the last one. Every reader holds an
//! `Arc` to its shard (through its [`crate::IoCx`]) for as long as it may
//! be inside the graph, so a count can never vanish from the writer's sum
//! while a reader it counts is still inside: removing a context with active
//! readers loses nothing.

use std::task::{Context, Poll, Waker};

use crossbeam_utils::CachePadded;

use super::membarrier::{self, FenceMode};
use super::primitives::{
    register_waker, seq_cst_point, thread_id, thread_id_if_assigned, Arc, AtomicBool, AtomicU64,
    AtomicUsize, AtomicWaker, Mutex, Ordering,
};

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
}

impl ReaderShard {
    fn new(mode: FenceMode, writer: bool) -> Self {
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
        }
    }

    /// The fence mode this lock runs in.
    #[cfg_attr(not(test), allow(dead_code))] // tests; no public accessor yet
    pub(crate) fn mode(&self) -> FenceMode {
        self.mode
    }

    /// Creates a shard for a new I/O context and registers it with the
    /// writer.
    pub(crate) fn new_shard(&self) -> Arc<ReaderShard> {
        let mut shards = lock(&self.shards);
        // The flag only changes under this mutex: the copies start right.
        let writer = self.writer_active.load(Ordering::Relaxed);
        let shard = Arc::new(ReaderShard::new(self.mode, writer));
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
        self.writer_waker.wake();
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
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Ends a write section (or abandons a waiting writer) and resumes every
    /// queued reader once the outermost writer leaves.
    pub(crate) fn write_leave(&self) {
        let before = self.writers.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before > 0, "graph lock: writer count underflow");
        if before == 1 {
            self.set_writer_flags(false);
            let queued = std::mem::take(&mut *lock(&self.queued_readers));
            for waker in queued {
                waker.wake();
            }
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
