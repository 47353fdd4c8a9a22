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
    static LOCAL_SET: std::cell::RefCell<std::rc::Weak<tokio::task::LocalSet>> =
        const { std::cell::RefCell::new(std::rc::Weak::new()) };
}

/// Makes `set` this thread's task set, the one [`spawn_on_local_set`]
/// spawns on: an [`IoThread`](crate::graph::runtime::IoThread) registers
/// the `LocalSet` that runs its tasks, for as long as it lives.
pub(crate) fn set_local_set(set: std::rc::Weak<tokio::task::LocalSet>) {
    LOCAL_SET.with(|s| *s.borrow_mut() = set);
    LOCAL_SET_STOP.with(|s| *s.borrow_mut() = (false, Vec::new()));
}

thread_local! {
    /// Whether the thread's set is stopping, and who to wake when it does.
    static LOCAL_SET_STOP: std::cell::RefCell<(bool, Vec<std::task::Waker>)> =
        const { std::cell::RefCell::new((false, Vec::new())) };
}

/// Whether this thread's set has been told to stop taking work
/// ([`stop_local_set`]): a task that would otherwise wait for more (the
/// file driver's idle reaper) ends instead, so that the set can finish.
#[cfg_attr(not(feature = "io-uring"), allow(dead_code))] // used by the file driver's ring
pub(crate) fn local_set_stopping() -> bool {
    LOCAL_SET_STOP.try_with(|s| s.borrow().0).unwrap_or(true)
}

/// Wakes `waker` when this thread's set is told to stop (at once if it
/// has been). One entry per task however often it asks.
#[cfg_attr(not(feature = "io-uring"), allow(dead_code))] // used by the file driver's ring
pub(crate) fn wake_when_local_set_stops(waker: &std::task::Waker) {
    let stopping = LOCAL_SET_STOP
        .try_with(|s| {
            let mut s = s.borrow_mut();
            if !s.0 && !s.1.iter().any(|w| w.will_wake(waker)) {
                s.1.push(waker.clone());
            }
            s.0
        })
        .unwrap_or(true);
    if stopping {
        waker.wake_by_ref();
    }
}

/// Tells this thread's set to stop: wakes whoever waits for that
/// ([`wake_when_local_set_stops`]). The `IoThread` calls it once it takes
/// no more tasks, before it runs the ones left to their end.
pub(crate) fn stop_local_set() {
    let wakers = LOCAL_SET_STOP
        .try_with(|s| {
            let mut s = s.borrow_mut();
            s.0 = true;
            std::mem::take(&mut s.1)
        })
        .unwrap_or_default();
    wakers.into_iter().for_each(std::task::Waker::wake);
}

/// Spawns `future` on this thread's task set ([`set_local_set`]), whatever
/// task or set is running now; hands it back when the thread has none (or
/// it is gone). The spawn also wakes the set's own future (one more turn
/// of the runtime, which is why the file ring's reaper is spawned once and
/// stays); what the new task wakes later, from inside the set, goes
/// through the set's local queue.
#[cfg_attr(not(feature = "io-uring"), allow(dead_code))] // used by the file driver's ring
pub(crate) fn spawn_on_local_set<F>(future: F) -> Result<(), F>
where
    F: std::future::Future<Output = ()> + 'static,
{
    let set = LOCAL_SET.try_with(|s| s.borrow().upgrade()).ok().flatten();
    match set {
        Some(set) => {
            drop(set.spawn_local(future));
            Ok(())
        }
        None => Err(future),
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
    use std::rc::Rc;

    use super::{set_local_set, spawn_on_local_set};

    #[test]
    fn without_a_local_set_the_future_is_handed_back() {
        let back = spawn_on_local_set(async {});
        assert!(back.is_err());
    }

    #[test]
    fn spawns_on_the_registered_set_even_from_inside_another() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let ours = Rc::new(tokio::task::LocalSet::new());
        set_local_set(Rc::downgrade(&ours));
        let (tx, rx) = tokio::sync::oneshot::channel();
        // From inside another set, which is dropped before it runs
        // anything: the task lands on ours and runs there.
        let other = tokio::task::LocalSet::new();
        other.block_on(&runtime, async {
            assert!(spawn_on_local_set(async move {
                let _ = tx.send(());
            })
            .is_ok());
        });
        drop(other);
        ours.block_on(&runtime, async {
            tokio::time::timeout(std::time::Duration::from_secs(30), rx)
                .await
                .expect("watchdog: the task never ran on the registered set")
                .unwrap();
        });
        drop(ours);
        assert!(
            spawn_on_local_set(async {}).is_err(),
            "a set that is gone takes no tasks"
        );
    }
}
