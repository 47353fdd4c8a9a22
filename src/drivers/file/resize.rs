//! Resizing (QEMU's `raw_co_truncate`): `ftruncate` on the blocking pool,
//! serialised against read-modify-writes of the blocks it cuts or extends.

use std::sync::atomic::Ordering;

use crate::types::{Error, Result};

use super::host::blocking;
use super::state::FileDriver;

impl FileDriver {
    pub(super) async fn do_truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        if self.host.block_device {
            return Err(Error::Unsupported {
                driver: "host_device",
                operation: "resizing a block device",
            });
        }
        let host = self.host.clone();
        // Serialised against read-modify-writes of the blocks from the
        // smaller end on (direct files only), so none of them puts old
        // bytes back past a shrink or reads half a resize.
        let from = size.min(self.host.size.load(Ordering::SeqCst));
        let from = from - from % self.host.align;
        let guard = self.lock_blocks(from, u64::MAX, true).await;
        blocking(move || {
            let _guard = guard;
            host.file.set_len(size)?;
            host.size.store(size, Ordering::SeqCst);
            Ok(())
        })
        .await
    }
}
