//! The graph read/write lock, QEMU's `block/graph-lock.c` redone.
//!
//! # Protocol
//!
//! Every I/O context owns a [`ReaderShard`]: one cache-padded counter of
//! readers inside the graph on that context. A reader bumps only its own
//! shard and then checks the single writer flag; no shared cache line is
//! written on the fast path. The writer raises the flag and waits until the
//! sum over all shards is zero.
//!
//! The two sides form a Dekker pair: the reader does *increment, then load the
//! flag*, the writer does *store the flag, then load the counters*. All four
//! accesses are `SeqCst`, so in the single total order at least one side sees
//! the other: either the reader sees the flag (and backs off) or the writer
//! sees the count (and waits). The increment is a locked read-modify-write,
//! which is also the full barrier the pattern needs on x86; no separate
//! `fence(SeqCst)` (an `mfence`) is ever issued.
//!
//! A reader leaving decrements its shard and, if that took the shard to zero
//! while the flag is up, wakes the writer. The writer registers its waker
//! *before* summing, so a decrement it did not see is followed by a wake-up
//! it will get: no lost wake-up. Readers that find the flag up park their
//! waker in a queue under a mutex and re-check the flag under that mutex; the
//! writer clears the flag *before* taking the mutex to drain the queue, so a
//! reader either sees the flag down or is in the queue when it is drained.
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

use super::primitives::{Arc, AtomicBool, AtomicUsize, AtomicWaker, Mutex, Ordering};

/// One I/O context's reader counter, on a cache line of its own.
#[derive(Debug, Default)]
pub(crate) struct ReaderShard {
    readers: CachePadded<AtomicUsize>,
}

impl ReaderShard {
    /// Number of readers currently inside the graph through this shard.
    pub(crate) fn readers(&self) -> usize {
        self.readers.load(Ordering::SeqCst)
    }
}

/// The graph lock shared by the main loop and every I/O context.
#[derive(Debug, Default)]
pub(crate) struct GraphLock {
    /// Raised while a writer is waiting or inside. Readers only ever load it.
    writer_active: CachePadded<AtomicBool>,
    /// Nesting depth of write sections. Only the main-loop thread changes it.
    writers: AtomicUsize,
    /// The (single, main-loop) writer waiting for readers to leave.
    writer_waker: AtomicWaker,
    /// Readers that found the writer flag raised.
    queued_readers: Mutex<Vec<Waker>>,
    /// Every shard that may still hold readers.
    shards: Mutex<Vec<Arc<ReaderShard>>>,
}

impl GraphLock {
    /// Creates a shard for a new I/O context and registers it with the
    /// writer.
    pub(crate) fn new_shard(&self) -> Arc<ReaderShard> {
        let shard = Arc::new(ReaderShard::default());
        lock(&self.shards).push(shard.clone());
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
        shard.readers.fetch_add(1, Ordering::SeqCst);
        if !self.writer_active.load(Ordering::SeqCst) {
            return true;
        }
        self.read_unlock(shard);
        false
    }

    /// Leaves a read section entered through `shard`.
    #[inline]
    pub(crate) fn read_unlock(&self, shard: &ReaderShard) {
        let before = shard.readers.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "graph lock: reader count underflow");
        if before == 1 && self.writer_active.load(Ordering::SeqCst) {
            self.writer_waker.wake();
        }
    }

    /// Enters a read section, parking the task while a writer is active.
    pub(crate) fn poll_read(&self, shard: &ReaderShard, cx: &mut Context<'_>) -> Poll<()> {
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

    /// Announces a writer. Readers arriving from now on queue.
    ///
    /// Main-loop thread only; nested announcements count.
    pub(crate) fn write_announce(&self) {
        if self.writers.fetch_add(1, Ordering::Relaxed) == 0 {
            self.writer_active.store(true, Ordering::SeqCst);
        }
    }

    /// Ready once no reader is inside the graph; otherwise arranges for the
    /// last reader out to wake `cx`.
    pub(crate) fn poll_readers_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.writer_waker.register(cx.waker());
        if self.total_readers() == 0 {
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
            self.writer_active.store(false, Ordering::SeqCst);
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

    /// Sum of readers over every registered shard.
    pub(crate) fn total_readers(&self) -> usize {
        let mut shards = lock(&self.shards);
        prune(&mut shards);
        shards
            .iter()
            .map(|s| s.readers.load(Ordering::SeqCst))
            .sum()
    }
}

/// Drops shards nobody but the registry holds: no reader can enter through
/// them any more, and every reader that did has left (it held an `Arc`).
fn prune(shards: &mut Vec<Arc<ReaderShard>>) {
    shards.retain(|s| Arc::strong_count(s) > 1);
}

fn lock<T>(m: &Mutex<T>) -> impl std::ops::DerefMut<Target = T> + '_ {
    // A panic while holding these mutexes cannot leave the data half
    // updated (push, take, retain), so poisoning carries no information.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
