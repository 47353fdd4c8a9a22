//! The `memory` driver: a RAM-backed device whose contents tests can check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::graph::driver::{BlockDriver, IoFuture, ResizePermit};
use crate::graph::proof::RequestRef;
use crate::types::{Error, Result};
use crate::types::{IoVec, IoVecMut};

/// A device stored in memory. Reads see exactly what was written.
///
/// Requests past the end fail: it does not grow on writes, only when
/// resized ([`BlockBackend::truncate`](crate::BlockBackend::truncate)).
///
/// Each request copies under a short lock (never held across an `.await`),
/// so concurrent requests from several I/O threads are safe and each one is
/// atomic.
#[derive(Debug)]
pub struct MemoryDriver {
    data: RwLock<Vec<u8>>,
    requests: AtomicU64,
}

impl MemoryDriver {
    /// A zero-filled device of `size` bytes.
    ///
    /// # Panics
    ///
    /// If `size` does not fit in memory addresses (`usize`).
    pub fn new(size: u64) -> Self {
        let size = usize::try_from(size).expect("memory driver size exceeds the address space");
        Self::from_bytes(vec![0; size])
    }

    /// A device holding `data`.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        MemoryDriver {
            data: RwLock::new(data),
            requests: AtomicU64::new(0),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests this node has received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn range(&self, len_total: usize, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| s.checked_add(len).map(|e| (s, e))) {
            Some((s, e)) if e <= len_total => Ok(s..e),
            _ => Err(Error::OutOfRange {
                offset,
                len: len as u64,
                size: len_total as u64,
            }),
        }
    }

    fn fill_zero(&self, offset: u64, len: u64) -> Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let len =
            usize::try_from(len).map_err(|_| Error::InvalidArgument("length too large".into()))?;
        let r = self.range(data.len(), offset, len)?;
        data[r].fill(0);
        Ok(())
    }
}

impl BlockDriver for MemoryDriver {
    fn format_name(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        format!(
            "memory, {} bytes",
            self.data.read().unwrap_or_else(|e| e.into_inner()).len()
        )
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(
            async move { Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64) },
        )
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let data = self.data.read().unwrap_or_else(|e| e.into_inner());
            let r = self.range(data.len(), offset, buf.len())?;
            buf.copy_from_slice(&data[r]);
            Ok(())
        })
    }

    fn write<'a>(&'a self, _node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
            let r = self.range(data.len(), offset, buf.len())?;
            data[r].copy_from_slice(buf);
            Ok(())
        })
    }

    /// Copies straight from the store into each region.
    fn readv<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        mut iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let data = self.data.read().unwrap_or_else(|e| e.into_inner());
            let r = self.range(data.len(), offset, iov.len())?;
            iov.copy_from_slice(&data[r]);
            Ok(())
        })
    }

    /// Copies each region straight into the store.
    fn writev<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        iov: IoVec<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
            let r = self.range(data.len(), offset, iov.len())?;
            iov.copy_to_slice(&mut data[r]);
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move { self.fill_zero(offset, len) })
    }

    /// Grows with zeroes or drops the tail. A size past the address space
    /// is [`Error::InvalidArgument`].
    fn truncate<'a>(
        &'a self,
        _node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let size = usize::try_from(size).map_err(|_| {
                Error::InvalidArgument(format!("memory: {size} bytes exceed the address space"))
            })?;
            let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
            let grow = size.saturating_sub(data.len());
            if grow > 0 {
                data.try_reserve_exact(grow).map_err(|_| {
                    Error::InvalidArgument(format!("memory: cannot allocate {size} bytes"))
                })?;
            }
            data.resize(size, 0);
            Ok(())
        })
    }

    fn discard<'a>(&'a self, _node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        // Discarded memory reads as zeroes, as a thin-provisioned device would.
        Box::pin(async move { self.fill_zero(offset, len) })
    }
}
