//! A list of parked tasks woken all at once.

use std::task::Waker;

use super::primitives::Mutex;

/// Tasks waiting for a condition that another thread makes true.
///
/// The waiting side pushes its waker *and then* re-checks the condition; the
/// waking side makes the condition true *and then* drains the list. Because
/// the list is a mutex, a waiter that checked too early is always in the
/// list when it is drained: no lost wake-up.
#[derive(Debug, Default)]
pub(crate) struct WaitList {
    wakers: Mutex<Vec<Waker>>,
}

impl WaitList {
    /// Parks `waker` (once, however often the same task polls).
    pub(crate) fn register(&self, waker: &Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Wakes every parked task.
    pub(crate) fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in wakers {
            waker.wake();
        }
    }
}
