//! Setting up our lock for the kernels: main loops in either fence mode,
//! sync code inside a task, one lock/unlock pair, thread pinning.

use blockgraph::{IoContext, IoTask, MainLoop};

/// The environment variable that forces the graph lock's fence mode
/// (documented in `benches/README.md`; read when a main loop is created).
const FENCE_ENV: &str = "BLOCKGRAPH_LOCK_FENCE";

/// A main loop whose graph lock runs in `symmetric` or the default mode.
pub fn main_loop(symmetric: bool) -> MainLoop {
    if symmetric {
        std::env::set_var(FENCE_ENV, "symmetric");
    }
    let main = MainLoop::new().expect("main loop");
    std::env::remove_var(FENCE_ENV);
    main
}

/// The fence mode a lock made now picks, for the report. The library does
/// not expose its lock's mode, so this asks the same questions it does: the
/// override in [`FENCE_ENV`], then whether this process can register for
/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` and issue one barrier
/// (registration is process-wide and idempotent, so asking changes
/// nothing for the lock).
pub fn default_fence_mode() -> &'static str {
    let forced_symmetric = std::env::var(FENCE_ENV).is_ok_and(|v| {
        let v = v.trim();
        v.eq_ignore_ascii_case("symmetric") || v.eq_ignore_ascii_case("fallback")
    });
    if !forced_symmetric && membarrier_available() {
        "asymmetric (membarrier private expedited)"
    } else {
        "symmetric (one locked RMW per side)"
    }
}

#[cfg(target_os = "linux")]
fn membarrier_available() -> bool {
    use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
    let supported = membarrier_query();
    supported.contains_command(MembarrierCommand::PrivateExpedited)
        && supported.contains_command(MembarrierCommand::RegisterPrivateExpedited)
        && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
        && membarrier(MembarrierCommand::PrivateExpedited).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn membarrier_available() -> bool {
    false
}

/// Runs synchronous code `f` as a task of `ctx` on the calling thread: an
/// `IoTask` works only inside its own task (rule 17), so the sync kernels run
/// inside one. The task is polled once, directly (no executor, so `op` may
/// still block on a read future inside it); its set-up is outside the
/// timed loops or amortised over them.
pub fn in_task<R>(ctx: &IoContext, f: impl FnOnce(&mut IoTask) -> R) -> R {
    use std::future::Future as _;
    let task = std::pin::pin!(ctx.task(|mut cx| async move { f(&mut cx) }));
    match task.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => unexpected("a synchronous task was pending"),
    }
}

#[cold]
#[inline(never)]
pub fn unexpected(what: &str) -> ! {
    panic!("benchmark invariant broken: {what}")
}

/// One uncontended lock + unlock pair.
#[inline(always)]
pub fn pair(cx: &mut IoTask) {
    let guard = cx.try_read();
    if guard.is_none() {
        unexpected("read lock refused without a writer");
    }
    drop(guard);
}

/// One reader op that also copes with a writer: try, else wait (parks the
/// thread on the lock's waker). Whether it had to wait.
#[inline(always)]
pub fn op(cx: &mut IoTask) -> bool {
    let entered = cx.try_read().is_some();
    if !entered {
        drop(futures::executor::block_on(cx.read()));
    }
    !entered
}

#[cfg(target_os = "linux")]
pub fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

#[cfg(not(target_os = "linux"))]
pub fn pin_to(_cpu: usize) {}
