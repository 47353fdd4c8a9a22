//! Resizing an image (QEMU's `qcow2_co_truncate`), reached through
//! [`BlockDriver::truncate`](crate::BlockDriver::truncate) only.
//!
//! # Growing
//!
//! 1. If the new size needs more L1 entries than the table has, the table
//!    moves to fresh clusters, larger (`Meta::grow_l1`, in the order
//!    described there); the allocator grows the refcount table on the way
//!    if it must, as for any allocation.
//! 2. The new area must read as zeroes. Two things could show through
//!    instead: bytes past the old end of the cluster the old end cuts
//!    through (a copy-on-write fills a partial last cluster from the
//!    backing file, or a shrink left them), and the backing file where it
//!    is longer than the old size (QEMU's `bdrv_co_truncate` asks for
//!    zeroes in that case too). The first is written with zeroes, the
//!    second becomes zero clusters (version 3) or zeroed data (version 2).
//! 3. Those changes are written back and flushed, then the header's size,
//!    flushed. A crash before the last write leaves the old size with a
//!    valid image (perhaps a larger L1 table and leaked clusters).
//!
//! # Shrinking
//!
//! Allowed only when nothing this image stores would be lost: every guest
//! cluster past the new end must be unallocated or a zero cluster, and the
//! part past the new end of a cluster it cuts through must read as zeroes.
//! Discard the area first. Otherwise the resize is refused with
//! [`Error::InvalidArgument`] and nothing changes. Only the header's size
//! changes: the tables and the file keep their length (clusters past the
//! end hold nothing; an L1 table longer than needed is valid), so a later
//! grow finds them still consistent.
//!
//! # Refused
//!
//! Images with internal snapshots (QEMU refuses too: the snapshots record
//! the old size), read-only images, sizes not a multiple of 512 bytes (as
//! QEMU) or beyond [`Qcow2Limits`](super::Qcow2Limits).
//!
//! The whole resize holds `io_lock` exclusively: requests in flight finish
//! first, later ones wait, and every request checks its range against the
//! size only once it holds the lock shared.

use std::sync::atomic::Ordering;

use crate::driver::require_child;
use crate::graph::proof::RequestRef;
use crate::types::ChildRole;
use crate::types::{Error, Result};

use super::file_io::read_data;
use super::header::{invalid, l1_entries_for};
use super::read::Mapping;
use super::state::Qcow2Driver;
use super::write::Src;

impl Qcow2Driver {
    pub(super) async fn do_truncate(&self, node: RequestRef<'_>, new: u64) -> Result<()> {
        if self.nb_snapshots > 0 {
            // QEMU refuses too: the snapshots' tables describe the old size.
            return Err(Error::Unsupported {
                driver: "qcow2",
                operation: "resizing an image with internal snapshots (delete them first)",
            });
        }
        self.check_writable(node)?;
        if new % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "qcow2: the new size {new} is not a multiple of 512 bytes"
            )));
        }
        if new > self.limits.max_virtual_size {
            return Err(Error::InvalidArgument(format!(
                "qcow2: the new size {new} exceeds the limit of {} bytes",
                self.limits.max_virtual_size
            )));
        }
        let g = self.geo;
        let needed = l1_entries_for(new, g.cluster_bits);
        if needed * 8 > self.limits.max_l1_bytes {
            return Err(Error::InvalidArgument(format!(
                "qcow2: {new} bytes need an L1 table larger than the limit of {} bytes with {}-byte clusters",
                self.limits.max_l1_bytes, g.cs
            )));
        }
        let file = require_child(node, ChildRole::File)?;
        let backing_len = match node.child(ChildRole::Backing) {
            Some(b) => Some(b.length().await?),
            None => None,
        };
        let _excl = self.io_lock.write().await;
        if new != self.size() {
            // The bitmaps no longer match the disk (in use, as QEMU treats
            // a bitmap not saved after a resize). Under `io_lock`, so a
            // bitmap store is wholly before or after.
            self.before_change(file).await?;
        }
        if let Some(why) = &self.meta.lock().await.broken {
            return Err(invalid(format!("image found corrupt earlier: {why}")));
        }
        let old = self.size();
        if new < old {
            self.shrink(node, file, old, new).await
        } else if new > old {
            self.grow(node, file, backing_len, old, new).await
        } else {
            Ok(())
        }
    }

    async fn grow(
        &self,
        node: RequestRef<'_>,
        file: RequestRef<'_>,
        backing_len: Option<u64>,
        old: u64,
        new: u64,
    ) -> Result<()> {
        {
            let mut m = self.meta.lock().await;
            let needed = l1_entries_for(new, self.geo.cluster_bits);
            if needed > m.l1.len() as u64 {
                m.grow_l1(file, needed).await?;
            }
        }
        // In memory first: zeroing the new area works on guest offsets up
        // to the new end. No request looks meanwhile (`io_lock`).
        self.size.store(new, Ordering::Release);
        let result = async {
            self.zero_new_area(node, file, backing_len, old, new)
                .await?;
            let mut m = self.meta.lock().await;
            m.write_back(file).await?;
            file.flush().await?;
            m.write_size(file, new).await?;
            file.flush().await
        }
        .await;
        if result.is_err() {
            // The header may still say the old size: so does the node.
            self.size.store(old, Ordering::Release);
        }
        result
    }

    /// Makes guest bytes `old..new` read as zeroes where something else
    /// could show through (see the module docs). The size is `new` already.
    async fn zero_new_area(
        &self,
        node: RequestRef<'_>,
        file: RequestRef<'_>,
        backing_len: Option<u64>,
        old: u64,
        new: u64,
    ) -> Result<()> {
        let cs = self.geo.cs;
        let backing_beyond = backing_len.is_some_and(|b| b > old);
        let head_end = old.next_multiple_of(cs).min(new);
        if head_end > old {
            let map = {
                let mut m = self.meta.lock().await;
                self.lookup(&mut m, file, old, head_end - old).await?.0
            };
            let stale = match map {
                Mapping::Data(_) | Mapping::Compressed { .. } => true,
                Mapping::Unallocated => backing_beyond,
                Mapping::Zero => false,
            };
            if stale {
                self.write_range(node, old, head_end - old, Src::Zeroes)
                    .await?;
            }
        }
        if let Some(blen) = backing_len.filter(|_| backing_beyond) {
            let end = blen
                .checked_next_multiple_of(cs)
                .unwrap_or(u64::MAX)
                .min(new);
            if end > head_end {
                self.zero_or_discard_locked(node, head_end, end - head_end, false)
                    .await?;
            }
        }
        Ok(())
    }

    async fn shrink(
        &self,
        node: RequestRef<'_>,
        file: RequestRef<'_>,
        old: u64,
        new: u64,
    ) -> Result<()> {
        let cs = self.geo.cs;
        let mut m = self.meta.lock().await;
        let cut_end = new.next_multiple_of(cs).min(old);
        let mut pos = new;
        while pos < old {
            let (map, n) = self.lookup(&mut m, file, pos, old - pos).await?;
            let stored = match map {
                Mapping::Unallocated | Mapping::Zero => false,
                Mapping::Data(_) | Mapping::Compressed { .. } if pos < cut_end => {
                    // The cluster the new end cuts through: what is cut
                    // off may go if it is all zeroes.
                    let len = (cut_end - pos) as usize;
                    let mut buf = vec![0u8; len];
                    match map {
                        Mapping::Data(host) => read_data(file, m.file_len, host, &mut buf).await?,
                        Mapping::Compressed { offset, bytes } => {
                            let data = self.inflate(file, m.file_len, offset, bytes).await?;
                            let at = (pos % cs) as usize;
                            buf.copy_from_slice(&data[at..at + len]);
                        }
                        _ => unreachable!("matched above"),
                    }
                    if buf.iter().all(|&b| b == 0) {
                        pos = cut_end;
                        continue;
                    }
                    true
                }
                Mapping::Data(_) | Mapping::Compressed { .. } => true,
            };
            if stored {
                return Err(Error::InvalidArgument(format!(
                    "qcow2 node '{}': shrinking from {old} to {new} bytes would drop data stored at \
                     guest offset {pos}; discard everything past the new end first",
                    node.name()
                )));
            }
            pos += n;
        }
        m.write_size(file, new).await?;
        file.flush().await?;
        self.size.store(new, Ordering::Release);
        Ok(())
    }
}
