//! The driver's state (QEMU's `BDRVQcow2State`): the [`Qcow2Driver`]
//! struct, its accessors, and the checks every request makes first.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;

use tokio::sync::{Mutex, RwLock};

use crate::graph::proof::{IoRef, RequestRef};
use crate::types::{Error, Result};

use super::bitmap::BitmapInfo;
use super::cache::OffsetHash;
use super::geometry::Geo;
use super::meta::Meta;
use super::options::Qcow2Limits;

/// A qcow2 image: a [`BlockDriver`](crate::graph::driver::BlockDriver)
/// for the node whose `File` child holds it.
pub struct Qcow2Driver {
    pub(super) geo: Geo,
    /// The virtual size in bytes. Changed only by a resize, which holds
    /// `io_lock` exclusively; requests check against it after taking
    /// `io_lock` shared, so none sees it change half way.
    pub(super) size: AtomicU64,
    /// The current mode (a reopen may switch it).
    pub(super) read_only: AtomicBool,
    pub(super) nb_snapshots: u32,
    pub(super) snapshots_offset: u64,
    /// The backing file name and format the header stores: read at open,
    /// replaced by [`change_backing_file`](Qcow2Driver::change_backing_file)
    /// once its header write succeeded.
    pub(super) backing: StdMutex<BackingName>,
    pub(super) file_node: String,
    pub(super) require_backing: bool,
    pub(super) limits: Qcow2Limits,
    pub(super) meta: Mutex<Meta>,
    /// Shared by every request while it may touch host clusters; exclusive
    /// while freed clusters become reusable.
    pub(super) io_lock: RwLock<()>,
    /// Guest clusters being allocated right now.
    pub(super) inflight: StdMutex<HashSet<u64, OffsetHash>>,
    /// Wakes the writes waiting for an overlapping allocation whenever one
    /// finishes (a wait list: a waiter's panicking waker must not unwind
    /// into the write that finished).
    pub(super) alloc_done: crate::sync::WaitList,
    /// The last cluster decompressed: (its L2 entry offset, data).
    pub(super) last_inflated: StdMutex<Option<(u64, std::sync::Arc<Vec<u8>>)>>,
    /// The persistent dirty bitmaps, as last written to the directory.
    pub(super) bitmap_infos: StdMutex<Vec<BitmapInfo>>,
    /// Some bitmap is still marked consistent: the first change to the
    /// image must mark them in use first.
    pub(super) bitmaps_to_mark: AtomicBool,
}

/// The backing file name and format stored in the header.
#[derive(Debug, Clone, Default)]
pub(super) struct BackingName {
    pub(super) file: Option<String>,
    pub(super) format: Option<String>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("version", &self.geo.version)
            .field("cluster_size", &self.geo.cs)
            .field("size", &self.size())
            .field("backing_file", &self.backing_file())
            .field("read_only", &self.is_read_only())
            .finish_non_exhaustive()
    }
}

impl Qcow2Driver {
    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size()
    }

    pub(super) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cs
    }

    /// The image's format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.geo.version
    }

    /// The backing file name stored in the image, unresolved: the one it
    /// was opened with, or the last one
    /// [`change_backing_file`](Qcow2Driver::change_backing_file) wrote.
    pub fn backing_file(&self) -> Option<String> {
        self.backing_name().file
    }

    /// The backing file's format stored in the image, if any (as
    /// [`backing_file`](Qcow2Driver::backing_file), the current one).
    pub fn backing_format(&self) -> Option<String> {
        self.backing_name().format
    }

    pub(super) fn backing_name(&self) -> BackingName {
        self.backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The persistent dirty bitmaps stored in the image (name, granularity,
    /// flags), in directory order; empty when it has none.
    ///
    /// This is the image's bitmap directory as it stands on disk (read at
    /// open, updated when a write marks it in use and when the bitmaps are
    /// stored), not the live bitmaps: those are the node's ([`NodeRef::dirty_bitmaps`]),
    /// which track writes from the open on and are stored back at the
    /// flush to close ([`BlockDriver::flush_to_close`], DESIGN §15). The
    /// first change to guest data after a load or a store marks every
    /// bitmap here `in_use` on disk, so a crash before the next store
    /// leaves them inconsistent, as QEMU would.
    ///
    /// Only a consistent bitmaps extension (auto-clear bit 0 set) is
    /// listed: without the bit, a program that does not know bitmaps wrote
    /// the image and QEMU ignores them too.
    ///
    /// [`NodeRef::dirty_bitmaps`]: crate::NodeRef::dirty_bitmaps
    /// [`BlockDriver::flush_to_close`]: crate::driver::BlockDriver::flush_to_close
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.bitmap_infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the image is read-only now.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(super) fn own_node(&self, node: IoRef<'_>) -> Result<()> {
        match node.driver_as::<Qcow2Driver>() {
            Some(d) if std::ptr::eq(d, self) => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "node '{}' is not this qcow2 image",
                node.name()
            ))),
        }
    }

    pub(super) fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    pub(super) fn check_writable(&self, node: RequestRef<'_>) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly(node.name().to_owned()));
        }
        Ok(())
    }
}
