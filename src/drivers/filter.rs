//! A pass-through filter: the simplest node with a child.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::driver::{forward, Filter};
use crate::graph::driver::IoFuture;
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::Result;
use crate::types::{ChildRole, Perm, Permissions};
use crate::types::{IoBuf, IoVec, IoVecMut};

/// Passes every request to its `Filtered` child unchanged and counts them.
///
/// It returns the child's own future instead of wrapping it, so the layer
/// costs a virtual call and a counter, not an allocation.
///
/// The simplest [`Filter`](crate::driver::Filter): it overrides only the
/// calls it counts (and lets a node join the graph before its child).
///
/// By default it takes on its child exactly what its own users take;
/// [`PassthroughFilter::exclusive_writer`] makes it take write permission
/// and share only reads, like a block job that must own the writes to a
/// node.
#[derive(Debug, Default)]
pub struct PassthroughFilter {
    exclusive_writer: bool,
    requests: AtomicU64,
}

impl PassthroughFilter {
    /// A filter that takes what its users take.
    pub fn new() -> Self {
        Self::default()
    }

    /// A filter that takes write permission on its child and lets others
    /// only read.
    pub fn exclusive_writer() -> Self {
        PassthroughFilter {
            exclusive_writer: true,
            ..Self::default()
        }
    }

    /// Requests this node has passed down.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

impl Filter for PassthroughFilter {
    fn format_name(&self) -> &'static str {
        "filter"
    }

    fn describe(&self) -> String {
        if self.exclusive_writer {
            "filter (exclusive writer)".to_owned()
        } else {
            "filter".to_owned()
        }
    }

    /// The bare skeleton may join the graph before its child (the kit's
    /// default would refuse).
    fn open(&self, _node: CallbackRef<'_>) -> Result<()> {
        Ok(())
    }

    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        match (role, self.exclusive_writer) {
            (ChildRole::Filtered, true) => Permissions {
                take: users.take | Perm::CONSISTENT_READ | Perm::WRITE,
                share: Perm::CONSISTENT_READ,
            },
            (ChildRole::Filtered, false) => users,
            _ => Permissions::UNRESTRICTED,
        }
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.count();
        forward::read(node, Self::CHILD, offset, buf)
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.count();
        forward::write(node, Self::CHILD, offset, buf)
    }

    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        self.count();
        forward::readv(node, Self::CHILD, offset, iov)
    }

    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        self.count();
        forward::writev(node, Self::CHILD, offset, iov)
    }

    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        self.count();
        forward::read_buf(node, Self::CHILD, offset, buf)
    }

    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        self.count();
        forward::write_buf(node, Self::CHILD, offset, buf)
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.count();
        forward::write_zeroes(node, Self::CHILD, offset, len)
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.count();
        forward::discard(node, Self::CHILD, offset, len)
    }

    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        self.count();
        forward::flush(node, Self::CHILD)
    }
}
