//! Helpers for drivers that pass a call to one child unchanged (filters,
//! `raw` without a window). They are what [`Filter`](crate::driver::Filter)'s
//! defaults do; a filter that overrides a callback to do something first
//! (count, check, wait) ends it with the same helper.
//!
//! Each returns the child's own future instead of wrapping it in another
//! boxed `async` block, so a layer that only forwards costs a virtual call,
//! not an allocation per request.
//!
//! # Examples
//!
//! ```
//! use blockgraph::driver::forward;
//! use blockgraph::{driver::{BlockDriver, IoFuture}, ChildRole, RequestRef};
//!
//! /// A filter that does nothing: every call goes to the filtered child.
//! struct Nop;
//!
//! impl BlockDriver for Nop {
//!     fn format_name(&self) -> &'static str { "nop" }
//!     fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
//!         forward::length(node, ChildRole::Filtered)
//!     }
//!     fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
//!         forward::to_child(node, ChildRole::Filtered, |child| child.read(offset, buf))
//!     }
//!     fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
//!         forward::to_child(node, ChildRole::Filtered, |child| child.write(offset, buf))
//!     }
//! }
//! ```

use crate::driver::require_child;
use crate::graph::driver::IoFuture;
use crate::graph::proof::RequestRef;
use crate::types::BlockStatus;
use crate::types::ChildRole;
use crate::types::{IoBuf, IoVec, IoVecMut};

/// Runs `call` on the `role` child of `node` and returns its future, or a
/// ready [`Error::NoSuchChild`](crate::Error::NoSuchChild).
#[inline]
pub fn to_child<'a, T: Send + 'a, F: Into<IoFuture<'a, T>>>(
    node: RequestRef<'a>,
    role: ChildRole,
    call: impl FnOnce(RequestRef<'a>) -> F,
) -> IoFuture<'a, T> {
    match require_child(node, role) {
        Ok(child) => call(child).into(),
        Err(e) => failed(e),
    }
}

/// A request that fails at once with `error`, out of line (the cold end of
/// a forwarding call: see [`to_child`]).
#[cold]
#[inline(never)]
pub(crate) fn failed<'a, T: Send + 'a>(error: crate::Error) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(Err(error)))
}

/// Reads from the `role` child at the same offset.
pub fn read<'a>(
    node: RequestRef<'a>,
    role: ChildRole,
    offset: u64,
    buf: &'a mut [u8],
) -> IoFuture<'a, ()> {
    to_child(node, role, |child| child.read(offset, buf))
}

/// Writes to the `role` child at the same offset.
pub fn write<'a>(
    node: RequestRef<'a>,
    role: ChildRole,
    offset: u64,
    buf: &'a [u8],
) -> IoFuture<'a, ()> {
    to_child(node, role, |child| child.write(offset, buf))
}

/// Reads from the `role` child at the same offset into the same owned
/// buffer ([`BlockDriver::read_buf`](crate::driver::BlockDriver::read_buf)).
pub fn read_buf<'a>(
    node: RequestRef<'a>,
    role: ChildRole,
    offset: u64,
    buf: IoBuf,
) -> IoFuture<'a, IoBuf> {
    to_child(node, role, |child| child.read_buf(offset, buf))
}

/// Writes the same owned buffer to the `role` child at the same offset
/// ([`BlockDriver::write_buf`](crate::driver::BlockDriver::write_buf)).
pub fn write_buf<'a>(
    node: RequestRef<'a>,
    role: ChildRole,
    offset: u64,
    buf: IoBuf,
) -> IoFuture<'a, IoBuf> {
    to_child(node, role, |child| child.write_buf(offset, buf))
}

/// Reads from the `role` child at the same offset into the same regions
/// (no copy: the vector goes down as it is).
pub fn readv<'a>(
    node: RequestRef<'a>,
    role: ChildRole,
    offset: u64,
    iov: IoVecMut<'a>,
) -> IoFuture<'a, ()> {
    to_child(node, role, |child| child.readv(offset, iov))
}

/// Writes the same regions to the `role` child at the same offset.
pub fn writev<'a>(
    node: RequestRef<'a>,
    role: ChildRole,
    offset: u64,
    iov: IoVec<'a>,
) -> IoFuture<'a, ()> {
    to_child(node, role, |child| child.writev(offset, iov))
}

/// Zeroes the same range of the `role` child.
pub fn write_zeroes(
    node: RequestRef<'_>,
    role: ChildRole,
    offset: u64,
    len: u64,
) -> IoFuture<'_, ()> {
    to_child(node, role, |child| child.write_zeroes(offset, len))
}

/// Discards the same range of the `role` child.
pub fn discard(node: RequestRef<'_>, role: ChildRole, offset: u64, len: u64) -> IoFuture<'_, ()> {
    to_child(node, role, |child| child.discard(offset, len))
}

/// The `role` child's length.
pub fn length(node: RequestRef<'_>, role: ChildRole) -> IoFuture<'_, u64> {
    to_child(node, role, |child| child.length())
}

/// Flushes the `role` child.
pub fn flush(node: RequestRef<'_>, role: ChildRole) -> IoFuture<'_, ()> {
    to_child(node, role, |child| child.flush())
}

/// Flushes the `role` child as for closing it
/// ([`BlockDriver::flush_to_close`](crate::driver::BlockDriver::flush_to_close)).
pub fn flush_to_close(node: RequestRef<'_>, role: ChildRole) -> IoFuture<'_, ()> {
    to_child(node, role, |child| child.flush_to_close())
}

/// The `role` child's block status at `offset`.
pub fn block_status(
    node: RequestRef<'_>,
    role: ChildRole,
    offset: u64,
    len: u64,
) -> IoFuture<'_, (BlockStatus, u64)> {
    to_child(node, role, |child| child.block_status(offset, len))
}

/// The `role` child's request alignment (1 without such a child).
pub fn request_alignment(node: RequestRef<'_>, role: ChildRole) -> u32 {
    node.child(role)
        .map_or(1, |child| child.request_alignment())
}

/// Resizes the `role` child, through the check that this node's edge to it
/// took [`Perm::RESIZE`](crate::Perm::RESIZE) (see
/// [`NodeRef::truncate_child`](crate::NodeRef::truncate_child)).
pub fn truncate(node: RequestRef<'_>, role: ChildRole, size: u64) -> IoFuture<'_, ()> {
    node.truncate_child(role, size)
}
