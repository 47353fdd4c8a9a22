//! Switching between read-only and read-write (QEMU's
//! `qcow2_reopen_prepare` for `read-only`).
//!
//! * **To read-only:** the image's cached metadata must already be on disk,
//!   because a read-only image never writes again and a main-loop callback
//!   cannot do I/O. QEMU flushes in `bdrv_reopen_prepare`, inside the
//!   drained section; here the caller flushes first ([`Drained::flush`]
//!   does it inside the section, which is what
//!   [`GraphWriter::set_read_only`]'s callers and the live snapshot do).
//!   Metadata still waiting is refused with [`Error::InvalidArgument`]
//!   and nothing changes.
//! * **To read-write:** what a read-write open does before the first
//!   write must hold. Persistent bitmaps are marked in use before the first
//!   change to guest data, as after any writable open (`bitmaps_to_mark`
//!   was computed at open whatever the mode). The repairs a writable open
//!   makes need I/O, so an image that would need one — its dirty bit set,
//!   marked corrupt, or auto-clear bits we do not maintain — is refused
//!   with [`Error::Unsupported`]; open it again writable instead. No
//!   header change is needed otherwise: we keep no dirty bit of our own
//!   (no lazy refcounts), and the metadata loaded read-only is the same as
//!   a writable open loads.
//!
//! [`Drained::flush`]: crate::Drained::flush
//! [`GraphWriter::set_read_only`]: crate::GraphWriter::set_read_only
//! [`Error::InvalidArgument`]: crate::types::Error::InvalidArgument
//! [`Error::Unsupported`]: crate::types::Error::Unsupported

use std::sync::atomic::Ordering;

use crate::types::{Error, Result};

use super::header::{
    AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_AUTOCLEAR, OFF_INCOMPATIBLE,
};
use super::state::Qcow2Driver;

impl Qcow2Driver {
    pub(super) fn switch_read_only(&self, node: &str, read_only: bool) -> Result<()> {
        if read_only == self.is_read_only() {
            return Ok(());
        }
        // No request is in flight (the caller holds the write section), so
        // the metadata lock is free; if it is not, something is wrong and
        // we refuse rather than wait on the main loop.
        let meta = self.meta.try_lock().map_err(|_| {
            Error::InvalidArgument(format!(
                "qcow2 node '{node}' is busy; reopen it when no request is in flight"
            ))
        })?;
        if read_only {
            if meta.is_dirty() {
                return Err(Error::InvalidArgument(format!(
                    "qcow2 node '{node}' has metadata not yet written back; flush it \
                     (Drained::flush) before making it read-only"
                )));
            }
        } else {
            let field = |off: usize| {
                meta.hdr
                    .get(off..off + 8)
                    .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            };
            if self.geo.version >= 3 {
                let incompatible = field(OFF_INCOMPATIBLE);
                let autoclear = field(OFF_AUTOCLEAR);
                let keep = if meta.bitmaps.is_some() {
                    AUTOCLEAR_BITMAPS
                } else {
                    0
                };
                let refused = if incompatible & INCOMPAT_CORRUPT != 0 {
                    Some("making a corrupt image read-write (repair it first)")
                } else if incompatible & INCOMPAT_DIRTY != 0 {
                    Some("making a dirty image read-write without a repair (open it writable)")
                } else if autoclear & !keep != 0 {
                    Some("making read-write an image with foreign auto-clear bits (open it writable)")
                } else {
                    None
                };
                if let Some(operation) = refused {
                    return Err(Error::Unsupported {
                        driver: "qcow2",
                        operation,
                    });
                }
            }
        }
        drop(meta);
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }
}
