//! Flush (QEMU's `qcow2_co_flush_to_os`): cached metadata written back in
//! the order that keeps the image consistent, then the clusters freed
//! meanwhile released once no request can still read them.

use crate::driver::require_child;
use crate::graph::proof::RequestRef;
use crate::types::{ChildRole, Result};

use super::state::Qcow2Driver;

impl Qcow2Driver {
    /// Whether metadata changes are waiting for a flush (flush before
    /// removing the node: its `close` callback cannot do I/O).
    pub async fn has_unflushed_metadata(&self) -> bool {
        self.meta.lock().await.is_dirty()
    }

    pub(super) async fn do_flush(&self, node: RequestRef<'_>) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        if self.is_read_only() {
            return Ok(());
        }
        let frees = {
            let mut m = self.meta.lock().await;
            let frees = std::mem::take(&mut m.pending_frees);
            if let Err(e) = m.write_back(file).await {
                m.pending_frees.extend(frees);
                return Err(e);
            }
            file.flush().await?;
            frees
        };
        if !frees.is_empty() {
            // The tables no longer reference these clusters on disk; wait
            // until no request can still be reading them, then let them go.
            let _excl = self.io_lock.write().await;
            let mut m = self.meta.lock().await;
            // A freed compressed cluster's place may be reused.
            *self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) = None;
            for (c, n) in frees {
                m.decref(file, c, n).await?;
            }
            // Decrements may go out at any time; writing them now leaves a
            // flushed image without leaks.
            m.write_refblocks(file).await?;
            file.flush().await?;
        }
        Ok(())
    }
}
