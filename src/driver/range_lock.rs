//! Byte-range serialisation between requests of one node (QEMU's
//! "serialising" tracked requests).
//!
//! A read-modify-write (the file driver bouncing an unaligned `O_DIRECT`
//! write) or a copy-up (the copy-on-read filter writing what it just read)
//! must not interleave with another write to the same bytes, or one of the
//! two writes is lost. Such operations take a *serialising* range; ordinary
//! writes take a plain range. Two ranges conflict when they overlap and at
//! least one of them is serialising, so plain writes never wait for each
//! other.
//!
//! Guards are `'static` and `Send`: the file driver moves its guard into the
//! blocking closure that does the I/O, so the range stays locked until the
//! host I/O has really finished, even if the request's future was dropped.
//!
//! Waiters park in a [`WaitList`], which wakes every one of them even if a
//! waiter's waker panics (`sync::wake`): the guard is dropped by whichever
//! request or reaper finishes the I/O, which must not unwind because of
//! another request's waker, nor may the other waiters lose their wake-up
//! (tokio's `Notify`, used here before, lets both happen).

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::WaitList;

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Entry {
    fn conflicts(&self, start: u64, end: u64, serialising: bool) -> bool {
        (self.serialising || serialising) && self.start < end && start < self.end
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    released: WaitList,
}

/// The set of ranges currently locked on one node.
#[derive(Debug, Default, Clone)]
pub(crate) struct RangeLock {
    inner: Arc<Inner>,
}

/// A locked range; unlocked (and waiters woken) on drop, on any thread.
#[derive(Debug)]
pub(crate) struct RangeGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl RangeLock {
    /// Locks `[start, end)`, waiting (asynchronously) while a conflicting
    /// range is locked. Cancel safe: a dropped waiter holds nothing.
    pub(crate) async fn lock(&self, start: u64, end: u64, serialising: bool) -> RangeGuard {
        poll_fn(|cx| {
            self.inner
                .released
                .poll_until(cx, || self.try_lock(start, end, serialising))
        })
        .await
    }

    fn try_lock(&self, start: u64, end: u64, serialising: bool) -> Option<RangeGuard> {
        let mut entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.iter().any(|e| e.conflicts(start, end, serialising)) {
            return None;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        entries.push(Entry {
            id,
            start,
            end,
            serialising,
        });
        Some(RangeGuard {
            inner: self.inner.clone(),
            id,
        })
    }

    /// Ranges locked right now.
    #[cfg(test)]
    pub(crate) fn locked(&self) -> usize {
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|e| e.id != self.id);
        self.inner.released.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn plain_ranges_do_not_wait_for_each_other() {
        let lock = RangeLock::default();
        let a = lock.lock(0, 100, false).now_or_never();
        let b = lock.lock(50, 150, false).now_or_never();
        assert!(a.is_some() && b.is_some());
        assert_eq!(lock.locked(), 2);
    }

    #[test]
    fn serialising_range_waits_for_overlap_only() {
        let lock = RangeLock::default();
        let plain = lock.lock(0, 100, false).now_or_never().unwrap();
        assert!(lock.lock(99, 200, true).now_or_never().is_none());
        let disjoint = lock.lock(100, 200, true).now_or_never();
        assert!(disjoint.is_some(), "touching but not overlapping");
        drop(disjoint);
        let mut waiting = Box::pin(lock.lock(50, 60, true));
        assert!((&mut waiting).now_or_never().is_none());
        drop(plain);
        assert!(waiting.now_or_never().is_some(), "released after the drop");
        assert_eq!(lock.locked(), 0, "the finished guard was dropped too");
    }

    /// A waiter whose waker panics: the guard's drop does not unwind, and
    /// the waiter parked after it is woken and gets the range.
    #[test]
    fn a_panicking_waiter_costs_the_releaser_and_other_waiters_nothing() {
        use std::future::Future;
        use std::sync::atomic::Ordering;
        use std::task::Context;

        use crate::sync::wake::{counting_waker, panicking_waker};

        let lock = RangeLock::default();
        let held = lock.lock(0, 100, true).now_or_never().unwrap();
        let mut hostile = Box::pin(lock.lock(0, 10, true));
        let panicking = panicking_waker();
        let polled = hostile.as_mut().poll(&mut Context::from_waker(&panicking));
        assert!(polled.is_pending());
        let mut waiter = Box::pin(lock.lock(50, 60, true));
        let (woken, waker) = counting_waker();
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        drop(held);
        assert_eq!(
            woken.load(Ordering::SeqCst),
            1,
            "the second waiter's wake-up was lost"
        );
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready());
        assert!(
            hostile.now_or_never().is_some(),
            "the hostile waiter gets its range too"
        );
    }
}
