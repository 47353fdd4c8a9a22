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
