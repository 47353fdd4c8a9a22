//! What runs on this thread now: its role (main loop, I/O thread, other),
//! whether the `Bql` is lent out here, and which I/O task is being polled
//! (rule 17). The bottom of the run-time checks; imports nothing else from
//! the crate.

mod in_task;

use std::cell::Cell;

pub(crate) use in_task::{
    current_task, current_task_guards, guard_released, guard_taken, InTask, TaskId,
};

/// Makes a type `!Send` and `!Sync` with a name that says why: a field of
/// type `PhantomData<dyn MainLoopThreadOnly>` puts "`dyn MainLoopThreadOnly`
/// cannot be sent between threads safely" at the top of the compile error
/// when a main-loop proof is moved to another thread.
pub(crate) trait MainLoopThreadOnly {}

/// The marker field itself.
pub(crate) type NotSend = std::marker::PhantomData<dyn MainLoopThreadOnly>;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThreadRole {
    Other,
    Main,
    Io,
    /// A thread of an [`IoThread`]'s blocking pool (`spawn_blocking` from
    /// one of its tasks): the task that spawned the work may hold the read
    /// lock while it waits for it.
    #[cfg_attr(loom, allow(dead_code))] // set by a tokio hook loom builds lack
    IoBlocking,
}

thread_local! {
    static ROLE: Cell<ThreadRole> = const { Cell::new(ThreadRole::Other) };
    static BQL_LENT: Cell<bool> = const { Cell::new(false) };
}

pub(crate) fn thread_role() -> ThreadRole {
    ROLE.with(|r| r.get())
}

pub(crate) fn set_thread_role(role: ThreadRole) {
    ROLE.with(|r| r.set(role));
}

thread_local! {
    static IN_LOCAL_SET: Cell<bool> = const { Cell::new(false) };
}

/// Whether the code running now is a task of this thread's `LocalSet` (an
/// [`IoThread`](crate::graph::runtime::IoThread)'s tasks), so that
/// `tokio::task::spawn_local` works here. False in plain tokio tasks on the
/// same runtime, which run outside the `LocalSet`.
#[cfg_attr(not(feature = "io-uring"), allow(dead_code))] // read by the file driver's ring
pub(crate) fn in_local_set() -> bool {
    IN_LOCAL_SET.with(Cell::get)
}

pin_project_lite::pin_project! {
    /// A future polled as a task of the thread's `LocalSet`: marks the
    /// thread as such for the length of each poll ([`in_local_set`]).
    pub(crate) struct LocalSetTask<F> {
        #[pin]
        future: F,
    }
}

impl<F> LocalSetTask<F> {
    /// Wraps `future`, which is to be spawned with `spawn_local` and nowhere
    /// else.
    pub(crate) fn new(future: F) -> Self {
        LocalSetTask { future }
    }
}

impl<F: std::future::Future> std::future::Future for LocalSetTask<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        /// Puts the previous mark back, also when the poll unwinds.
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                IN_LOCAL_SET.with(|m| m.set(self.0));
            }
        }
        let _restore = Restore(IN_LOCAL_SET.with(|m| m.replace(true)));
        self.project().future.poll(cx)
    }
}

/// Panics if the I/O task being polled on this thread holds a read guard:
/// `what` would block the thread until something happens that may need the
/// writer, and the writer waits for that guard.
#[track_caller]
pub(crate) fn refuse_under_guard(what: &str) {
    let guards = current_task_guards();
    if guards != 0 {
        panic!(
            "blockgraph: {what} called while this task holds a read guard ({guards} held) (rules \
             9/10/11: a task never waits for a drain, a write section, main-loop work or another \
             task while it holds the graph read lock; that wait may need the writer, which waits \
             for this guard). Drop the guard first; from an I/O task use IoTask::run_on_main_loop"
        );
    }
}

/// Marks that a `Bql` is lent out on this thread. At most one at a time:
/// safe code cannot nest two (the closures are synchronous and the handles
/// that lend one are borrowed mutably), so a second one means a `MainTask`
/// was smuggled somewhere it must not run, and we stop before it could
/// mutate the graph under a live `GsRef`.
pub(crate) struct BqlScope {
    owned: bool,
}

impl BqlScope {
    /// # Panics
    ///
    /// If a `Bql` is already lent out on this thread.
    pub(crate) fn enter() -> Self {
        BQL_LENT.with(|lent| {
            assert!(
                !lent.get(),
                "blockgraph: the Bql is already lent out on this thread (nested main-loop entry)"
            );
            lent.set(true);
        });
        BqlScope { owned: true }
    }

    /// Enters the scope unless it is already entered (for internal callback
    /// sites that run both inside and outside a `Bql` closure).
    pub(crate) fn enter_if_idle() -> Self {
        let owned = BQL_LENT.with(|lent| !lent.replace(true));
        BqlScope { owned }
    }
}

impl Drop for BqlScope {
    fn drop(&mut self) {
        if self.owned {
            BQL_LENT.with(|lent| lent.set(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::{in_local_set, LocalSetTask};

    #[test]
    fn a_local_set_task_is_marked_only_while_it_is_polled() {
        let mut seen = None;
        let mut task = pin!(LocalSetTask::new(async {
            seen = Some(in_local_set());
        }));
        assert!(!in_local_set());
        let poll = task.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(poll.is_ready());
        assert_eq!(seen, Some(true));
        assert!(!in_local_set(), "the mark outlived the poll");
    }

    #[test]
    fn a_panicking_local_set_task_leaves_no_mark() {
        let caught = std::panic::catch_unwind(|| {
            let mut task = pin!(LocalSetTask::new(async {
                panic!("a task panics");
            }));
            let _: Poll<()> = task.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        });
        assert!(caught.is_err());
        assert!(!in_local_set(), "the mark outlived the unwinding poll");
    }
}
