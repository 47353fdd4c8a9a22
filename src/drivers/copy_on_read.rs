//! The `copy-on-read` filter: reads populate the image below it from its
//! backing chain (QEMU's `copy-on-read` driver).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::driver::range_lock::RangeLock;
use crate::driver::{forward, require_child, Filter};
use crate::graph::driver::{IoFuture, ResizePermit};
use crate::graph::proof::{NodeRequest, RequestRef};
use crate::types::BlockStatus;
use crate::types::Result;
use crate::types::{ChildRole, Perm, Permissions};
use crate::types::{IoVec, IoVecMut};

/// Sits above an image with a backing chain (its [`ChildRole::Filtered`]
/// child, typically a qcow2 overlay). A read of a range that the image does
/// not store itself ([`BlockStatus::Unallocated`]) but that some node of
/// its backing chain does is *copied up*: read through the image (which
/// reads the backing chain) and written back to the image, so the next read
/// is served from the image alone. Ranges no node of the chain stores read
/// as zeroes and are not copied.
///
/// The copy-up writes data that the guest already sees, so the filter takes
/// [`Perm::WRITE_UNCHANGED`] on its child (and does not let other users
/// outside the filter write it, as their writes could race with a
/// copy-up). A copy-up holds a serialising range lock while it reads and
/// writes, and writes through the filter take a plain lock on their range:
/// a guest write can never be overwritten by the stale data of a copy-up
/// that read before it. A copy-up that fails fails the read (as QEMU does;
/// the guest's data is not at risk, but a deliberate copy-on-read should
/// not hide the error).
#[derive(Debug, Default)]
pub struct CopyOnRead {
    ranges: RangeLock,
    copied: AtomicU64,
    /// The node of the backing chain at which copying stops (QEMU's
    /// `bottom`, one node lower): what it and the nodes below it store is
    /// read but not copied.
    base: Option<String>,
}

impl CopyOnRead {
    /// A copy-on-read filter.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy-on-read filter that copies up only what the nodes of the
    /// backing chain *above* the node named `base` store (QEMU's `bottom`
    /// option, used by stream with a base): ranges that only `base` or
    /// nodes below it store are read through but not copied.
    pub fn above_base(base: impl Into<String>) -> Self {
        CopyOnRead {
            base: Some(base.into()),
            ..Self::default()
        }
    }

    /// Bytes copied up so far.
    pub fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Copies bytes at `offset` up into `image`, filling the start of `buf`
    /// with them, and returns how many it handled (less than `buf.len()`
    /// when part of the range was filled meanwhile).
    async fn copy_up(&self, image: RequestRef<'_>, offset: u64, buf: &mut [u8]) -> Result<u64> {
        let len = buf.len() as u64;
        let _serialised = self.ranges.lock(offset, offset + len, true).await;
        // Someone may have filled (part of) it while we waited: only the
        // part still unallocated is copied, the rest is just read.
        let (status, n) = image.block_status(offset, len).await?;
        let n = n.clamp(1, len) as usize;
        image.read(offset, &mut buf[..n]).await?;
        if status == BlockStatus::Unallocated {
            image.write(offset, &buf[..n]).await?;
            self.copied.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n as u64)
    }
}

impl CopyOnRead {
    /// Runs `op` on the image with a plain lock on `[offset, offset +
    /// len)`: no copy-up writes older data over it meanwhile.
    fn locked<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
        op: impl FnOnce(RequestRef<'a>) -> NodeRequest<'a, ()> + Send + 'a,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let image = require_child(node, Self::CHILD)?;
            let _range = self
                .ranges
                .lock(offset, offset.saturating_add(len), false)
                .await;
            op(image).await
        })
    }
}

/// Whether some node below `image` (and above `base`, if named) stores
/// the start of `[offset, offset + len)`, and for how many bytes that
/// answer holds.
async fn stored_below(
    image: RequestRef<'_>,
    base: Option<&str>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut len = len;
    let mut below = image.backing();
    while let Some(node) = below {
        if Some(node.name()) == base {
            break;
        }
        if offset < node.length().await? {
            let (status, n) = node.block_status(offset, len).await?;
            let n = n.clamp(1, len);
            if status != BlockStatus::Unallocated {
                return Ok((true, n));
            }
            len = n;
        }
        below = node.backing();
    }
    Ok((false, len))
}

/// On the driver kit: length, alignment, flush and block status are the
/// child's, and the node refuses to join the graph without its child.
impl Filter for CopyOnRead {
    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn describe(&self) -> String {
        format!("copy-on-read, {} bytes copied", self.bytes_copied())
    }

    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        match role {
            ChildRole::Filtered => Permissions {
                take: users.take | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
                share: users.share & (Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED),
            },
            _ => Permissions::UNRESTRICTED,
        }
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Filter::readv(self, node, offset, IoVecMut::from(buf))
    }

    /// Reads what the image stores straight into `iov`; a part to copy up
    /// goes through the image in one buffer of its own when `iov` has
    /// several segments (QEMU bounces copy-on-read too): what is written
    /// to the image must be what was read, not what the owner of the
    /// regions may have changed since.
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        mut iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let image = require_child(node, Self::CHILD)?;
            let len = iov.len() as u64;
            let mut done = 0u64;
            while done < len {
                let pos = offset + done;
                let (status, n) = image.block_status(pos, len - done).await?;
                let mut n = n.clamp(1, len - done);
                let mut copy = false;
                if status == BlockStatus::Unallocated {
                    let (stored, m) = stored_below(image, self.base.as_deref(), pos, n).await?;
                    copy = stored;
                    n = m.clamp(1, n);
                }
                let mut part = iov.slice_mut(done as usize, n as usize);
                if copy {
                    // May handle less than asked if the range filled
                    // meanwhile; the loop picks up the rest.
                    n = match part.as_contiguous_mut() {
                        Some(part) => self.copy_up(image, pos, part).await?,
                        None => {
                            let mut bounce = vec![0u8; part.len()];
                            let m = self.copy_up(image, pos, &mut bounce).await?;
                            part.slice_mut(0, m as usize)
                                .copy_from_slice(&bounce[..m as usize]);
                            m
                        }
                    };
                } else {
                    image.readv(pos, part).await?;
                }
                done += n;
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        self.locked(node, offset, buf.len() as u64, move |image| {
            image.write(offset, buf)
        })
    }

    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        self.locked(node, offset, iov.len() as u64, move |image| {
            image.writev(offset, iov)
        })
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.locked(node, offset, len, move |image| {
            image.write_zeroes(offset, len)
        })
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        self.locked(node, offset, len, move |image| image.discard(offset, len))
    }

    /// Passes the resize to the filtered child, through the check that
    /// this node's edge took the resize permission. Serialised against
    /// copy-ups past the new end.
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            // No copy-up may write past a new, smaller end meanwhile.
            let _range = self.ranges.lock(size, u64::MAX, true).await;
            forward::truncate(node, Self::CHILD, size).await
        })
    }
}
