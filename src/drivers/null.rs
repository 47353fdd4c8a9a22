//! The `null` driver: accepts everything, stores nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::graph::driver::{BlockDriver, IoFuture};
use crate::graph::proof::RequestRef;
use crate::types::BlockStatus;
use crate::types::{IoVec, IoVecMut};

/// A device of a given size that reads zeroes (or leaves the buffer alone)
/// and forgets what is written (QEMU's `null-co`). For benchmarks and tests.
///
/// With [`NullDriver::with_delay`], every request takes that long (sleeping
/// on the I/O thread's timer, never blocking it), which keeps requests in
/// flight long enough for drain tests to see them.
#[derive(Debug)]
pub struct NullDriver {
    size: u64,
    delay: Option<Duration>,
    read_zeroes: bool,
    requests: AtomicU64,
}

impl NullDriver {
    /// A `size`-byte null device whose reads fill the buffer with zeroes.
    pub fn new(size: u64) -> Self {
        NullDriver {
            size,
            delay: None,
            read_zeroes: true,
            requests: AtomicU64::new(0),
        }
    }

    /// Every request takes `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay).filter(|d| !d.is_zero());
        self
    }

    /// Whether reads zero the buffer (`true`) or leave it as it is (QEMU's
    /// `read-zeroes=off`, the fastest possible read). Block status says
    /// what reads return: zeroes with `true`, data (whatever the buffer
    /// held) with `false`, as QEMU's `null-co` does.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{driver::BlockStatus, drivers::NullDriver, BackendOptions, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let blk = main.run(|bql| bql.write(|w| {
    ///     let disk = w.add_node("null0", NullDriver::new(1 << 20).with_read_zeroes(false), &[])?;
    ///     w.add_backend("vda", &disk, BackendOptions::default())
    /// }))?;
    /// let io = main.new_io_thread("io0")?;
    /// let status = io.spawn(move |mut cx| async move {
    ///     blk.block_status(&mut cx, 0, 4096).await
    /// }).join()?;
    /// assert_eq!(status, (BlockStatus::Data, 4096));
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn with_read_zeroes(mut self, zeroes: bool) -> Self {
        self.read_zeroes = zeroes;
        self
    }

    /// Requests this node has received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn delay(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null"
    }

    fn describe(&self) -> String {
        match self.delay {
            Some(d) => format!("null, {} bytes, {d:?} per request", self.size),
            None => format!("null, {} bytes", self.size),
        }
    }

    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { Ok(self.size) })
    }

    fn read<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            if self.read_zeroes {
                buf.fill(0);
            }
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        _buf: &'a [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn readv<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        mut iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            if self.read_zeroes {
                iov.fill(0);
            }
            Ok(())
        })
    }

    fn writev<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        _iov: IoVec<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        _len: u64,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn block_status<'a>(
        &'a self,
        _node: RequestRef<'a>,
        _offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        // Reads that leave the buffer alone do not read as zeroes: data,
        // as QEMU's null-co answers with `read-zeroes=off`.
        let status = if self.read_zeroes {
            BlockStatus::Zero
        } else {
            BlockStatus::Data
        };
        Box::pin(async move { Ok((status, len)) })
    }
}
