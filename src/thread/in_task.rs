//! Which I/O task the calling thread is polling (rule 17: an [`IoTask`] never
//! leaves the task it was made for).
//!
//! Every spawner of I/O tasks (`IoThread::spawn`, `IoContext::spawn_on`,
//! `IoContext::task`, the shutdown flusher) wraps the task's future in an
//! [`InTask`], which owns a [`TaskSlot`]: the task's id and the number of
//! read guards it holds. While the task is polled, a thread-local points at
//! the slot. An `IoTask` remembers the id of the task it was made for and
//! checks it against the thread-local before taking the read lock or calling
//! into the main loop: an `IoTask` sent to another task (or a plain thread)
//! cannot be used there, so no task ever holds two, and the borrow rules that
//! make rules 9–11 compile-time checks per `IoTask` hold per task.
//!
//! The guard count answers "does the task being polled here hold the read
//! lock?" for code that blocks the thread inside a poll (`block_in_place`):
//! `MainLoop::run`, `MainLoop::shutdown` and `TaskHandle::join` consult it.
//!
//! Cost on the read path: one look at a const-initialised thread-local (a
//! compare with the task's id and a plain increment of a counter in the
//! slot, which lives in the task's own future) when a guard is taken, the
//! same when it is dropped. No atomic operation, no shared cache line.
//! Measured (release build, x86-64, asymmetric fence mode, one uncontended
//! `try_read` + drop in a loop): 1.16 ns before, 1.37 ns with the check
//! alone, 1.90 ns with the check and the count.
//!
//! [`IoTask`]: crate::IoTask

use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// Names one I/O task: never 0 (0 is "no task"), never reused.
pub(crate) type TaskId = u64;

/// What a task records about itself while it runs.
#[derive(Debug)]
pub(crate) struct TaskSlot {
    id: TaskId,
    /// Read guards taken by this task (wrapping). The guards it holds are
    /// `taken - released`.
    taken: Cell<usize>,
    /// Read guards of this task dropped inside one of its polls (wrapping;
    /// see [`guard_released`]). Two counters, not one: a lock/unlock pair
    /// is then two independent increments instead of a chain of two
    /// read-modify-writes of one word (as for the shards' `entered`/`left`).
    released: Cell<usize>,
}

impl TaskSlot {
    fn guards(&self) -> usize {
        self.taken.get().wrapping_sub(self.released.get())
    }
}

/// The task being polled on this thread.
struct Current {
    id: Cell<TaskId>,
    /// Null exactly when `id` is 0. Points at the slot of the [`InTask`]
    /// being polled (or of the task whose closure is being called), which is
    /// borrowed for as long as the pointer is here: [`Entered`] puts the
    /// previous value back when that borrow ends, unwinding included.
    slot: Cell<*const TaskSlot>,
}

thread_local! {
    static CURRENT: Current = const {
        Current {
            id: Cell::new(0),
            slot: Cell::new(ptr::null()),
        }
    };
}

impl TaskSlot {
    /// A slot for a new task, with a fresh id.
    pub(crate) fn new() -> TaskSlot {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TaskSlot {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            taken: Cell::new(0),
            released: Cell::new(0),
        }
    }

    pub(crate) fn id(&self) -> TaskId {
        self.id
    }

    /// Marks this task as the one being polled on this thread until the
    /// result is dropped.
    pub(crate) fn enter(&self) -> Entered<'_> {
        CURRENT.with(|c| Entered {
            prev_id: c.id.replace(self.id),
            prev_slot: c.slot.replace(self),
            _slot: PhantomData,
        })
    }
}

/// Restores the previously polled task (if any) on drop.
pub(crate) struct Entered<'s> {
    prev_id: TaskId,
    prev_slot: *const TaskSlot,
    _slot: PhantomData<&'s TaskSlot>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| {
            c.id.set(self.prev_id);
            c.slot.set(self.prev_slot);
        });
    }
}

/// The id of the I/O task being polled on this thread, 0 outside any.
#[inline(always)]
pub(crate) fn current_task() -> TaskId {
    CURRENT.with(|c| c.id.get())
}

/// Whether guards are counted per task: in debug builds and with the
/// `lock-diagnostics` feature. Release builds keep the read fast path to
/// the rule-17 check alone (one thread-local load and a compare; counting
/// cost another ~0.5 ns per lock/unlock pair, a third of the pair); the
/// misuses only the count can see (`TaskHandle::join` or an inline task
/// poll while the task holds a guard) are then left to the slow-writer and
/// slow-drain reports.
pub(crate) const COUNT_GUARDS: bool = cfg!(any(debug_assertions, feature = "lock-diagnostics"));

/// Read guards held by the I/O task being polled on this thread (0 outside
/// any task, and always 0 where guards are not counted: [`COUNT_GUARDS`]).
pub(crate) fn current_task_guards() -> usize {
    if !COUNT_GUARDS {
        return 0;
    }
    CURRENT.with(|c| {
        let slot = c.slot.get();
        if slot.is_null() {
            0
        } else {
            // SAFETY: a non-null `slot` is borrowed by the `Entered` that
            // set it, which is still alive (see `Current::slot`).
            unsafe { (*slot).guards() }
        }
    })
}

/// The read path's one look at the thread-local: if the calling thread is
/// polling `task`, counts a guard for it (the caller is about to take the
/// lock, and calls [`guard_released`] if it does not get it) and returns
/// `true`; otherwise changes nothing and returns `false`.
#[inline(always)]
pub(crate) fn guard_taken(task: TaskId) -> bool {
    if COUNT_GUARDS {
        count(task, |slot| &slot.taken)
    } else {
        current_task() == task
    }
}

/// Uncounts a guard of `task` dropped while `task` is being polled here.
///
/// A guard dropped anywhere else (its task's future being dropped, or a
/// guard of a leaked `IoTask` sent away) changes no count: in the first case
/// the slot goes with the future, in the second the owning task keeps
/// counting it, which only makes its blocking calls refuse more.
#[inline(always)]
pub(crate) fn guard_released(task: TaskId) {
    if COUNT_GUARDS {
        count(task, |slot| &slot.released);
    }
}

/// Increments `counter` of `task`'s slot if `task` is being polled here;
/// whether it is.
#[inline(always)]
fn count(task: TaskId, counter: impl FnOnce(&TaskSlot) -> &Cell<usize>) -> bool {
    CURRENT.with(|c| {
        if c.id.get() != task {
            return false;
        }
        let slot = c.slot.get();
        // SAFETY: `id` is `task`, non-zero (tasks never have id 0), so
        // `slot` is set and borrowed by a live `Entered` (see
        // `Current::slot`).
        let counter = counter(unsafe { &*slot });
        counter.set(counter.get().wrapping_add(1));
        true
    })
}

pin_project_lite::pin_project! {
    /// An I/O task's future: marks the task as current on the thread while
    /// it is polled.
    pub(crate) struct InTask<F> {
        slot: TaskSlot,
        #[pin]
        future: F,
    }
}

impl<F> InTask<F> {
    /// Makes a task's future: `make` gets the task's id and is called as if
    /// inside the task (so what it does with the task's `IoTask` counts as
    /// the task's).
    pub(crate) fn new(make: impl FnOnce(TaskId) -> F) -> InTask<F> {
        let slot = TaskSlot::new();
        let future = {
            let _entered = slot.enter();
            make(slot.id())
        };
        InTask { slot, future }
    }
}

impl<F: Future> Future for InTask<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let slot: &TaskSlot = this.slot;
        if current_task_guards() != 0 {
            nested_under_guard();
        }
        let _entered = slot.enter();
        this.future.poll(cx)
    }
}

/// An `InTask` polled from inside another task's poll (an embedder awaiting
/// `IoContext::task(..)` inline) while that task holds a guard: the inner
/// task's read lock would be a nested read lock of the outer one.
#[cold]
#[inline(never)]
fn nested_under_guard() -> ! {
    panic!(
        "blockgraph: an I/O task was polled inside another I/O task that holds a read guard \
         (rule 11: a task never takes the read lock twice; a nested read lock deadlocks behind \
         a queued writer). Spawn the inner task and await it after dropping the guard"
    )
}
