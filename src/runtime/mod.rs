//! The threads: the main loop and the I/O threads.

mod io_thread;
mod main_loop;
mod task;

use std::cell::Cell;

pub use io_thread::IoThread;
pub use main_loop::MainLoop;
pub use task::TaskHandle;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThreadRole {
    Other,
    Main,
    Io,
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

/// Marks that a `Bql` is lent out on this thread. At most one at a time:
/// safe code cannot nest two (the closures are synchronous and the handles
/// that lend one are borrowed mutably), so a second one means a `MainCx`
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
