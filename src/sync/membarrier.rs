//! The asymmetric fence of the graph lock: Linux `membarrier(2)`.
//!
//! The read fast path needs its counter update ordered before its load of
//! the writer flag (a StoreLoad ordering, the one thing x86 does not give
//! for free). A symmetric lock pays for it on every read with a locked
//! read-modify-write. With `MEMBARRIER_CMD_PRIVATE_EXPEDITED` the cost moves
//! to the rare writer: the kernel runs a full memory barrier on every CPU
//! that is running a thread of this process at that moment (and a thread
//! that is not running passes one when it is scheduled in), so a reader's
//! compiler fence acts as if it had been a full fence whenever it matters.
//!
//! This file depends on nothing else in the crate (only `std`, `rustix` and,
//! under `--cfg loom`, `loom`).

/// How the graph lock orders a reader's counter update before its load of
/// the writer flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FenceMode {
    /// Readers on their context's owner thread: plain load and store of the
    /// counter plus a compiler fence. The writer issues
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` after raising its flag.
    Asymmetric,
    /// Readers: one locked read-modify-write on the counter (the StoreLoad
    /// barrier on x86, never an `mfence`). The writer needs nothing extra.
    Symmetric,
}

/// Environment variable that forces a mode for graph locks created from
/// then on: `symmetric` (or `fallback`) forces the locked-RMW path;
/// anything else, or unset, picks [`FenceMode::Asymmetric`] when the kernel
/// grants `membarrier` private expedited and the symmetric path otherwise.
pub(crate) const FENCE_ENV: &str = "BLOCKGRAPH_LOCK_FENCE";

impl FenceMode {
    /// The mode for a new lock: the environment override, else the best the
    /// system supports.
    pub(crate) fn detect() -> FenceMode {
        let forced = std::env::var_os(FENCE_ENV);
        Self::choose(
            forced.as_deref().and_then(|v| v.to_str()),
            asymmetric_available,
        )
    }

    /// `setting` is the value of [`FENCE_ENV`]; `available` is asked only
    /// when the setting does not force the symmetric mode.
    pub(crate) fn choose(setting: Option<&str>, available: impl FnOnce() -> bool) -> FenceMode {
        let forced_symmetric = setting.is_some_and(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("symmetric") || v.eq_ignore_ascii_case("fallback")
        });
        if !forced_symmetric && available() {
            FenceMode::Asymmetric
        } else {
            FenceMode::Symmetric
        }
    }
}

/// Whether this process may use [`FenceMode::Asymmetric`]: registers for
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` on the first call (the registration is
/// process-wide and covers threads started later as well as earlier) and
/// checks that one barrier goes through. The answer is cached.
pub(crate) fn asymmetric_available() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(register)
}

#[cfg(all(target_os = "linux", not(loom)))]
fn register() -> bool {
    use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
    let supported = membarrier_query();
    supported.contains_command(MembarrierCommand::PrivateExpedited)
        && supported.contains_command(MembarrierCommand::RegisterPrivateExpedited)
        && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
        && membarrier(MembarrierCommand::PrivateExpedited).is_ok()
}

#[cfg(any(not(target_os = "linux"), loom))]
fn register() -> bool {
    // No asymmetric fence we trust elsewhere; under loom the model picks the
    // mode explicitly.
    false
}

/// The writer's side of the asymmetric fence: returns once every thread of
/// this process has executed a full memory barrier after this call began.
///
/// Only called by locks in [`FenceMode::Asymmetric`], which exist only after
/// [`asymmetric_available`] returned `true`.
///
/// # Aborts
///
/// If the kernel refuses the barrier after having accepted the registration
/// (the documented errors are "not registered" and "not supported", both
/// ruled out by then). The lock cannot order its readers without it, and a
/// panic here would not be safe: the writer count is already raised, so a
/// later writer would skip the barrier and could enter with a reader still
/// inside. The process prints why and aborts.
#[inline]
pub(crate) fn heavy_barrier() {
    #[cfg(loom)]
    {
        // Loom cannot express membarrier; it stands for what membarrier
        // promises: a full barrier here, paired with one at each reader's
        // compiler fence (see `light_barrier`).
        loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
    #[cfg(all(target_os = "linux", not(loom)))]
    {
        use rustix::thread::{membarrier, MembarrierCommand};
        if let Err(err) = membarrier(MembarrierCommand::PrivateExpedited) {
            eprintln!(
                "blockgraph: membarrier(PRIVATE_EXPEDITED) failed after registration ({err}); \
                 the graph lock cannot order its readers without it, aborting"
            );
            std::process::abort();
        }
    }
    #[cfg(all(not(target_os = "linux"), not(loom)))]
    {
        unreachable!("blockgraph: asymmetric fence mode exists only on Linux");
    }
}

/// The reader's side of the asymmetric fence: a compiler fence, so the
/// compiler keeps the counter store before the flag load; the CPU may still
/// reorder them, which [`heavy_barrier`] repairs when a writer comes.
#[inline(always)]
pub(crate) fn light_barrier() {
    #[cfg(loom)]
    loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(not(loom))]
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}
