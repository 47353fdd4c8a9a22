//! Waking parked tasks so that a waker's panic costs no other task its
//! wake-up.
//!
//! A [`Waker`] runs code of whoever polled the future: an executor's, or
//! any `Wake` implementation a caller wrote. If that code panics inside a
//! loop that wakes several tasks, the tasks after it in the loop are never
//! woken and wait forever; and the panic unwinds into the code that woke
//! them, which is not at fault (the graph writer leaving its section, the
//! file ring's reaper, librbd's completion thread) and may be inside a
//! `Drop` already running for another panic, where a second one aborts.
//!
//! So every site that wakes tasks it does not own wakes them through
//! [`wake_each`] or [`wake_catching`]. A waker's panic is caught; the panic
//! hook has already reported it (with its message and location) when it
//! was raised, and this module adds one `tracing` error that names the
//! site. The waking code then carries on as if the wake-up had returned,
//! which it would have had the waker been correct: the task it was meant
//! for has been told as far as its own waker allows.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::Waker;

/// Wakes every waker in `wakers`, in order, even if some of them panic
/// (see the module documentation); `site` names the waking code in the
/// report.
pub(crate) fn wake_each(wakers: impl IntoIterator<Item = Waker>, site: &'static str) {
    for waker in wakers {
        wake_catching(|| waker.wake(), site);
    }
}

/// Runs `wake` (a wake-up of a task this code does not own: `Waker::wake`,
/// `AtomicWaker::wake`) and catches a panic it raises (see the module
/// documentation); `site` names the waking code in the report.
pub(crate) fn wake_catching(wake: impl FnOnce(), site: &'static str) {
    // `AssertUnwindSafe`: the closure is a wake-up only; the state the
    // caller updated before it is complete, and nothing the closure
    // borrows is left half-changed by a panic in foreign code.
    if let Err(payload) = catch_unwind(AssertUnwindSafe(wake)) {
        tracing::error!(
            site,
            "a task's waker panicked when it was woken; the panic was caught so that the \
             other tasks woken here are woken too"
        );
        discard(payload);
    }
}

/// Drops a caught panic's payload, which is foreign too: if its own `Drop`
/// panics, that payload is leaked rather than unwound.
fn discard(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// A waker whose wake-up panics, for the tests of the sites that wake
/// through this module.
#[cfg(test)]
pub(crate) fn panicking_waker() -> Waker {
    struct PanickingWaker;

    impl std::task::Wake for PanickingWaker {
        fn wake(self: std::sync::Arc<Self>) {
            panic!("test waker: panics when woken (expected)");
        }
    }

    Waker::from(std::sync::Arc::new(PanickingWaker))
}

/// A waker that counts its wake-ups, and the count, for the same tests.
#[cfg(test)]
pub(crate) fn counting_waker() -> (std::sync::Arc<std::sync::atomic::AtomicUsize>, Waker) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counting(Arc<AtomicUsize>);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    let count = Arc::new(AtomicUsize::new(0));
    (count.clone(), Waker::from(Arc::new(Counting(count))))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// A payload whose `Drop` panics.
    struct PanicsWhenDropped;

    impl Drop for PanicsWhenDropped {
        fn drop(&mut self) {
            panic!("test payload: panics when dropped (expected)");
        }
    }

    #[test]
    fn every_waker_is_woken_around_the_ones_that_panic() {
        let counting: Vec<_> = (0..3).map(|_| counting_waker()).collect();
        let wakers = vec![
            panicking_waker(),
            counting[0].1.clone(),
            panicking_waker(),
            counting[1].1.clone(),
            counting[2].1.clone(),
            panicking_waker(),
        ];
        wake_each(wakers, "the test");
        for (count, _) in &counting {
            assert_eq!(count.load(Ordering::SeqCst), 1, "a wake-up was lost");
        }
    }

    #[test]
    fn a_panic_whose_payload_panics_when_dropped_does_not_unwind() {
        wake_catching(
            || std::panic::panic_any(PanicsWhenDropped),
            "the payload test",
        );
    }
}
