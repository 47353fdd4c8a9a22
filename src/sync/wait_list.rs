//! A list of parked tasks woken all at once.

use std::task::{Context, Poll, Waker};

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

    /// Polls `attempt` under the list's rule: ready at once if it
    /// succeeds; otherwise parks `cx`'s task and attempts once more, so
    /// that a [`wake_all`](Self::wake_all) between the two attempts is not
    /// missed. A task that found its condition true the first time is not
    /// parked at all.
    pub(crate) fn poll_until<T>(
        &self,
        cx: &mut Context<'_>,
        mut attempt: impl FnMut() -> Option<T>,
    ) -> Poll<T> {
        if let Some(value) = attempt() {
            return Poll::Ready(value);
        }
        self.register(cx.waker());
        match attempt() {
            Some(value) => Poll::Ready(value),
            None => Poll::Pending,
        }
    }

    /// Wakes every parked task.
    pub(crate) fn wake_all(&self) {
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        super::wake::wake_each(wakers, "a wait list");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::sync::wake::{counting_waker, panicking_waker};

    /// A parked task whose waker panics: the others are woken all the same
    /// (drain ends and in-flight counts reaching zero wake through here).
    #[test]
    fn a_panicking_waker_costs_no_other_task_its_wake_up() {
        let list = WaitList::default();
        list.register(&panicking_waker());
        let (count, waker) = counting_waker();
        list.register(&waker);
        list.wake_all();
        assert_eq!(count.load(Ordering::SeqCst), 1, "a wake-up was lost");
        // The list is empty again and still works.
        list.register(&waker);
        list.wake_all();
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
