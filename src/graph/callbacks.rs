//! The only places the crate calls a driver's main-loop callbacks.
//!
//! Each function takes a [`ReadAccess`]: the witness that no `&mut` into
//! graph state is alive while user code runs (rule 19). A transaction holds
//! the graph's [`WriteAccess`](super::cell::WriteAccess); to call a
//! callback it must lend a read token from it, which the borrow checker
//! refuses while any `&mut` it opened is still in use. So "compute, release,
//! then call" is not a convention here but the only order that compiles.
//!
//! I/O callbacks are called by the request path (`NodeRef`'s I/O methods),
//! whose `RequestRef` carries a `ReadAccess` too.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::graph::cell::ReadAccess;
use crate::graph::node::NodeInner;
use crate::graph::proof::{CallbackRef, NodeRef};
use crate::types::Result;
use crate::types::{ChildRole, Permissions};

/// The `CallbackRef` a main-loop callback of `node`'s own driver gets.
///
/// # Safety
///
/// On `node`'s graph's main-loop thread, `access` minted for that graph.
unsafe fn gs<'a>(node: &'a Arc<NodeInner>, access: ReadAccess<'a>) -> CallbackRef<'a> {
    // SAFETY: by the caller's contract.
    unsafe { NodeRef::new(node, access) }
}

/// `BlockDriver::child_permissions`.
pub(crate) fn child_permissions(
    node: &NodeInner,
    role: ChildRole,
    users: Permissions,
    _access: ReadAccess<'_>,
) -> Permissions {
    node.driver.child_permissions(role, users)
}

/// `BlockDriver::open`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn open(node: &Arc<NodeInner>, access: ReadAccess<'_>) -> Result<()> {
    // SAFETY: by the caller's contract.
    node.driver.open(unsafe { gs(node, access) })
}

/// `BlockDriver::close`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn close(node: &Arc<NodeInner>, access: ReadAccess<'_>) {
    // SAFETY: by the caller's contract.
    node.driver.close(unsafe { gs(node, access) })
}

/// `BlockDriver::reopen`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn reopen(
    node: &Arc<NodeInner>,
    access: ReadAccess<'_>,
    options: &[(&str, &str)],
) -> Result<()> {
    // SAFETY: by the caller's contract.
    node.driver.reopen(unsafe { gs(node, access) }, options)
}

/// `BlockDriver::reopen_commit`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn reopen_commit(node: &Arc<NodeInner>, access: ReadAccess<'_>) {
    // SAFETY: by the caller's contract.
    node.driver.reopen_commit(unsafe { gs(node, access) })
}

/// `BlockDriver::reopen_abort`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn reopen_abort(node: &Arc<NodeInner>, access: ReadAccess<'_>) {
    // SAFETY: by the caller's contract.
    node.driver.reopen_abort(unsafe { gs(node, access) })
}

/// `BlockDriver::is_read_only`.
pub(crate) fn is_read_only(node: &NodeInner, _access: ReadAccess<'_>) -> bool {
    node.driver.is_read_only()
}

/// `BlockDriver::set_read_only`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn set_read_only(
    node: &Arc<NodeInner>,
    access: ReadAccess<'_>,
    read_only: bool,
) -> Result<()> {
    // SAFETY: by the caller's contract.
    node.driver
        .set_read_only(unsafe { gs(node, access) }, read_only)
}

/// `BlockDriver::drained_begin`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn drained_begin(node: &Arc<NodeInner>, access: ReadAccess<'_>) {
    // SAFETY: by the caller's contract.
    node.driver.drained_begin(unsafe { gs(node, access) })
}

/// `BlockDriver::drained_end`.
///
/// # Safety
///
/// As for [`gs`].
pub(crate) unsafe fn drained_end(node: &Arc<NodeInner>, access: ReadAccess<'_>) {
    // SAFETY: by the caller's contract.
    node.driver.drained_end(unsafe { gs(node, access) })
}

/// Runs every call in `calls`, even when one panics, then resumes the first
/// panic (rule 20: the crate's bookkeeping is finished before a user panic
/// unwinds through it). While the thread is already unwinding, a further
/// panic is reported on stderr instead of aborting the process.
pub(crate) fn run_all<T>(items: impl IntoIterator<Item = T>, mut call: impl FnMut(T)) {
    let mut first: Option<Box<dyn Any + Send>> = None;
    for item in items {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| call(item))) {
            first.get_or_insert(panic);
        }
    }
    if let Some(panic) = first {
        if std::thread::panicking() {
            eprintln!(
                "blockgraph: a driver callback panicked during unwinding; the panic is dropped"
            );
        } else {
            resume_unwind(panic);
        }
    }
}
