//! The `file` protocol driver: positional I/O on a host file or block
//! device (QEMU's `file` / `host_device`).
//!
//! See [`FileDriver`] for threads, buffers, `O_DIRECT`, locking and resizing.
//!
//! # Where things are
//!
//! Bottom to top: `options.rs` ([`FileOptions`]); `host.rs` (what runs on
//! the blocking pool: the shared `Host`, aligned buffers, `blocking`, the
//! host calls); `lock.rs` (QEMU's OFD lock bytes); `state.rs` (the
//! [`FileDriver`] struct); then its operations, each an `impl FileDriver`
//! block: `open.rs`, `io.rs` (read, write, zeroes, discard, flush),
//! `status.rs` (`SEEK_DATA`/`SEEK_HOLE`), `resize.rs`, `reopen.rs`
//! (read-only ↔ read-write); `uring.rs` is the io_uring path's ring (one per
//! I/O thread, with the `io-uring` feature), which `io.rs` uses when the
//! node's [`Aio`] says so. This file: the
//! [`BlockDriver`] implementation, which dispatches to those.

mod host;
mod io;
mod lock;
mod open;
mod options;
mod reopen;
mod resize;
mod state;
mod status;
#[cfg(all(test, feature = "io-uring"))]
mod tests;
#[cfg(feature = "io-uring")]
mod uring;

use std::sync::atomic::Ordering;

use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::{BlockStatus, DriverInfo, IoBuf, IoVec, IoVecMut, Result};

use lock::unlock_image;

pub use options::{Aio, FileOptions};
pub use state::FileDriver;

impl BlockDriver for FileDriver {
    /// Releases the image locks as the node leaves the graph (QEMU drops
    /// them in `raw_close`), so the image can be opened again at once even
    /// if a handle, a drain section or a finishing host call keeps the
    /// driver (and its descriptor) alive a little longer.
    fn close(&self, _node: CallbackRef<'_>) {
        if !self.is_locked() {
            return;
        }
        unlock_image(&self.host.file);
    }

    fn is_read_only(&self) -> bool {
        FileDriver::is_read_only(self)
    }

    /// Reopens the file with the new access mode and moves the image locks
    /// to it (see `reopen.rs`); [`Error::Locked`] if another process holds
    /// what read-write needs, the file unchanged.
    ///
    /// [`Error::Locked`]: crate::types::Error::Locked
    fn set_read_only(&self, _node: CallbackRef<'_>, read_only: bool) -> Result<()> {
        self.switch_read_only(read_only)
    }

    fn info(&self) -> DriverInfo {
        DriverInfo::new()
            .filename(self.path.display().to_string())
            .size(self.host.size.load(Ordering::SeqCst))
            .specific("aio", self.aio)
    }

    fn format_name(&self) -> &'static str {
        if self.host.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn describe(&self) -> String {
        let mut s = format!("{} {}", self.format_name(), self.path.display());
        if self.is_read_only() {
            s.push_str(", read-only");
        }
        if let Some(a) = self.direct_alignment() {
            s.push_str(&format!(", direct ({a}-byte blocks)"));
        }
        if self.is_locked() {
            s.push_str(", locked");
        }
        if self.options.no_flush {
            s.push_str(", no-flush");
        }
        s.push_str(&format!(", aio={}", self.aio));
        s
    }

    fn request_alignment(&self, _node: RequestRef<'_>) -> u32 {
        if self.options.strict_alignment {
            u32::try_from(self.host.align).unwrap_or(u32::MAX)
        } else {
            1
        }
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.host.size.load(Ordering::SeqCst)) })
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_read(offset, buf))
    }

    fn write<'a>(&'a self, _node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(self.do_write(offset, buf))
    }

    fn readv<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_readv(offset, iov))
    }

    fn writev<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        iov: IoVec<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_writev(offset, iov))
    }

    /// Straight into `buf` where the range needs no alignment fix-up
    /// (no copy; see [`IoBuf`]).
    fn read_buf<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.do_read_buf(offset, buf))
    }

    /// Straight from `buf` where the range needs no alignment fix-up.
    fn write_buf<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.do_write_buf(offset, buf))
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_write_zeroes(offset, len))
    }

    fn discard<'a>(&'a self, _node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(self.do_discard(offset, len))
    }

    fn flush<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(self.do_flush())
    }

    /// Resizes the file (see [`FileDriver`]'s section on resizing).
    /// [`Error::ReadOnly`] on a read-only file, [`Error::Unsupported`] on a
    /// block device, [`Error::Io`] when the host refuses.
    ///
    /// [`Error::ReadOnly`]: crate::types::Error::ReadOnly
    /// [`Error::Unsupported`]: crate::types::Error::Unsupported
    /// [`Error::Io`]: crate::types::Error::Io
    fn truncate<'a>(
        &'a self,
        _node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_truncate(size))
    }

    fn block_status<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(self.do_block_status(offset, len))
    }
}
