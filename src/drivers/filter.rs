//! A pass-through filter: the simplest node with a child.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::driver::forward;
use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::RequestRef;
use crate::types::BlockStatus;
use crate::types::{ChildRole, Perm, Permissions};

/// Passes every request to its `Filtered` child unchanged and counts them.
///
/// It returns the child's own future instead of wrapping it, so the layer
/// costs a virtual call and a counter, not an allocation.
///
/// The skeleton of every filter (throttle, copy-on-read, a mirror's filter
/// node). By default it takes on its child exactly what its own users take;
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

impl BlockDriver for PassthroughFilter {
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

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        forward::length(node, ChildRole::Filtered)
    }

    fn request_alignment(&self, node: RequestRef<'_>) -> u32 {
        forward::request_alignment(node, ChildRole::Filtered)
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        self.count();
        forward::to_child(node, ChildRole::Filtered, |child| child.read(offset, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.count();
        forward::to_child(node, ChildRole::Filtered, |child| child.write(offset, buf))
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.count();
        forward::to_child(node, ChildRole::Filtered, |child| {
            child.write_zeroes(offset, len)
        })
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.count();
        forward::to_child(node, ChildRole::Filtered, |child| {
            child.discard(offset, len)
        })
    }

    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        self.count();
        forward::to_child(node, ChildRole::Filtered, |child| child.flush())
    }

    /// Passes the resize to the filtered child, through the check that
    /// this node's edge took the resize permission.
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        forward::truncate(node, ChildRole::Filtered, size)
    }

    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        forward::block_status(node, ChildRole::Filtered, offset, len)
    }
}
