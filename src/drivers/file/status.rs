//! Block status (QEMU's `raw_co_block_status`): data or hole, from
//! `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use crate::types::{BlockStatus, Result};

use super::host::blocking;
use super::state::FileDriver;

impl FileDriver {
    pub(super) async fn do_block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        let size = self.host.size.load(Ordering::SeqCst);
        if offset >= size || len == 0 {
            return Ok((BlockStatus::Zero, len));
        }
        if self.host.block_device {
            return Ok((BlockStatus::Data, len));
        }
        let host = self.host.clone();
        blocking(move || Ok(seek_status(&host.file, offset, len, size))).await
    }
}

/// Data or hole at `offset`, from `SEEK_DATA`/`SEEK_HOLE` (which read no
/// data and do not move anything we rely on: all I/O is positional).
fn seek_status(file: &File, offset: u64, len: u64, size: u64) -> (BlockStatus, u64) {
    let end = offset.saturating_add(len).min(size);
    let seek = |whence| -> Result<u64, Option<i32>> {
        let off = libc::off_t::try_from(offset).map_err(|_| None)?;
        // SAFETY: the descriptor belongs to `file`, alive for the call; the
        // call takes only integers.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        u64::try_from(r).map_err(|_| io::Error::last_os_error().raw_os_error())
    };
    match seek(libc::SEEK_DATA) {
        Ok(data) if data == offset => {
            let hole = seek(libc::SEEK_HOLE).unwrap_or(end).clamp(offset + 1, end);
            (BlockStatus::Data, hole - offset)
        }
        Ok(data) => (BlockStatus::Zero, (data.min(end) - offset).clamp(1, len)),
        // ENXIO: nothing but a hole up to the end of the file.
        Err(Some(libc::ENXIO)) => (BlockStatus::Zero, len),
        // No SEEK_DATA here: say data.
        Err(_) => (BlockStatus::Data, len),
    }
}
