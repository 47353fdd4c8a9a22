//! The copy engine every copying job uses (stream now; mirror, commit and
//! backup next): a range copied in chunks by several worker tasks, each
//! with one request in flight, with the job's rate limit, progress, pause
//! points between chunks, and a per-chunk hook that says what needs
//! copying (`block_status`) and copies it.
//!
//! # Which proof each step holds
//!
//! The workers are tasks of the job's I/O context, made with
//! [`IoContext::task`](crate::IoContext::task) and polled by the job's task
//! while it holds no read guard (so none of them is a nested read lock of
//! it). Each has its own [`IoTask`], and the hook gets it as `&mut`: every
//! request the hook makes takes the read lock for itself (a
//! [`BlockBackend`] call, or an [`IoTask::read`] guard the hook drops
//! before returning), so no worker holds the lock across a pause point, a
//! rate-limit sleep or a wait for the main loop, and a hook that returned
//! with a guard would not compile (the guard borrows the `IoTask` it was given
//! for the call).

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::driver::{JobCx, JobRunner};
use super::events::{ErrorAction, IoOperation};
use crate::backend::BlockBackend;
use crate::graph::runtime::IoTask;
use crate::types::{BlockStatus, Error, Result};

/// How the engine copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    /// Bytes per chunk: the unit of work a worker claims, checks and
    /// copies (default 512 KiB, QEMU's stream chunk). At least 1.
    pub chunk_size: u64,
    /// Workers, hence requests in flight at once (default 4). At least 1.
    pub in_flight: usize,
    /// Every copy starts and ends on a multiple of this (the source's and
    /// target's request alignment; default 1), except at the range's end.
    pub alignment: u64,
}

impl CopyOptions {
    /// These options with the alignment raised to at least `alignment`
    /// (the backends' request alignment).
    pub(super) fn aligned_to(self, alignment: u64) -> Self {
        CopyOptions {
            alignment: alignment.max(self.alignment),
            ..self
        }
    }
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            chunk_size: 512 << 10,
            in_flight: 4,
            alignment: 1,
        }
    }
}

/// A failed copy: which half failed (for the error policy) and why.
#[derive(Debug)]
pub struct ChunkError {
    /// Reading the source or writing the target.
    pub operation: IoOperation,
    /// The error.
    pub error: Error,
}

impl ChunkError {
    /// Reading failed.
    pub fn read(error: Error) -> Self {
        ChunkError {
            operation: IoOperation::Read,
            error,
        }
    }

    /// Writing failed.
    pub fn write(error: Error) -> Self {
        ChunkError {
            operation: IoOperation::Write,
            error,
        }
    }
}

/// The per-chunk hook: what a job copies, and how (QEMU's per-job
/// iteration: stream populates through copy-on-read, mirror reads the
/// source and writes the target, backup copies before writes).
///
/// Each call gets the calling worker's [`IoTask`]: take the read lock
/// through it (a [`BlockBackend`] call does) and drop any guard before
/// returning.
pub trait CopyChunks: Sync {
    /// Whether `[offset, offset + len)` starting at `offset` needs copying,
    /// and for how many bytes (at least 1, at most `len`) that answer
    /// holds. A failure goes through the job's error policy as a read.
    fn needs_copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(bool, u64)>>;

    /// Copies `buf.len()` bytes at `offset`; `buf` is scratch space of that
    /// size.
    fn copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        buf: &mut [u8],
    ) -> impl Future<Output = std::result::Result<(), ChunkError>>;
}

/// The plain copy: read `source`, write `target` at the same offset,
/// skipping what `source` does not store ([`BlockBackend::block_status`]
/// says `Zero` or `Unallocated`); the target must read as zeroes there
/// already (a new image). What mirror and backup start from.
#[derive(Debug, Clone)]
pub struct BackendCopy {
    /// Read from here.
    pub source: BlockBackend,
    /// Written here.
    pub target: BlockBackend,
}

impl CopyChunks for BackendCopy {
    async fn needs_copy(&self, io: &mut IoTask, offset: u64, len: u64) -> Result<(bool, u64)> {
        let (status, n) = self.source.block_status(io, offset, len).await?;
        Ok((status == BlockStatus::Data, n))
    }

    async fn copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), ChunkError> {
        read_then_write(io, &self.source, &self.target, offset, buf).await
    }
}

/// Reads `buf.len()` bytes at `offset` from `source` into `buf` and writes
/// them to `target` at the same offset: the copy of every job that reads
/// one backend and writes another.
pub(super) async fn read_then_write(
    io: &mut IoTask,
    source: &BlockBackend,
    target: &BlockBackend,
    offset: u64,
    buf: &mut [u8],
) -> std::result::Result<(), ChunkError> {
    source
        .read(io, offset, buf)
        .await
        .map_err(ChunkError::read)?;
    target
        .write(io, offset, buf)
        .await
        .map_err(ChunkError::write)
}

/// What a copy did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct CopyReport {
    /// Bytes copied.
    pub copied: u64,
    /// Bytes that needed no copy.
    pub skipped: u64,
    /// The first error the `ignore` policy let pass (its range was not
    /// copied); what that means is the job's rule.
    pub ignored: Option<Error>,
}

struct Engine {
    next: Mutex<u64>,
    end: u64,
    chunk: u64,
    align: u64,
    stop: AtomicBool,
    failure: Mutex<Option<Error>>,
    ignored: Mutex<Option<Error>>,
    copied: AtomicU64,
    skipped: AtomicU64,
}

enum Flow {
    Retry,
    Skip,
    Fail,
}

impl Engine {
    fn claim(&self) -> Option<(u64, u64)> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if *next >= self.end {
            return None;
        }
        let start = *next;
        let len = self.chunk.min(self.end - start);
        *next += len;
        Some((start, len))
    }

    fn on_error(&self, runner: &JobRunner, error: Error, operation: IoOperation) -> Flow {
        match runner.error_action(&error, operation) {
            ErrorAction::Stop => Flow::Retry,
            ErrorAction::Ignore => {
                self.ignored
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(error);
                Flow::Skip
            }
            ErrorAction::Report => {
                self.failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(error);
                self.stop.store(true, Ordering::SeqCst);
                Flow::Fail
            }
        }
    }

    /// Rounds a length up to the alignment, within `room`.
    fn aligned(&self, n: u64, room: u64) -> u64 {
        n.div_ceil(self.align)
            .saturating_mul(self.align)
            .clamp(1, room)
    }
}

/// Copies `range` with `chunks`, as the job `cx` belongs to: sets the
/// job's remaining work to the range's length and counts every byte
/// copied or skipped as progress; checks the job's pause points between
/// chunks and its rate limit before each copy (bytes skipped are not
/// limited); applies its error policy to each failure. Returns when every
/// chunk is done, or with the first error the policy reports, or with
/// [`Error::JobCancelled`].
pub async fn copy_range<C: CopyChunks>(
    cx: &mut JobCx<'_>,
    chunks: &C,
    range: Range<u64>,
    options: &CopyOptions,
) -> Result<CopyReport> {
    let runner = cx.runner().clone();
    runner.set_remaining(range.end.saturating_sub(range.start));
    let engine = Engine {
        next: Mutex::new(range.start),
        end: range.end,
        chunk: options.chunk_size.max(1),
        align: options.alignment.max(1),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        ignored: Mutex::new(None),
        copied: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
    };
    let context = cx.io().context();
    let results = {
        // The job's task only waits for its workers now.
        let _idle = runner.idle();
        let workers = (0..options.in_flight.max(1)).map(|_| {
            let (engine, runner) = (&engine, &runner);
            context.task(move |io| worker(io, chunks, engine, runner))
        });
        futures::future::join_all(workers).await
    };
    if let Some(error) = engine
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        return Err(error);
    }
    for r in results {
        r?;
    }
    let ignored = engine
        .ignored
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Ok(CopyReport {
        copied: engine.copied.load(Ordering::Relaxed),
        skipped: engine.skipped.load(Ordering::Relaxed),
        ignored,
    })
}

async fn worker<C: CopyChunks>(
    mut io: IoTask,
    chunks: &C,
    engine: &Engine,
    runner: &JobRunner,
) -> Result<()> {
    let _busy = runner.busy();
    let mut buf = Vec::new();
    loop {
        runner.pause_point(&mut io).await?;
        if engine.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some((start, len)) = engine.claim() else {
            return Ok(());
        };
        let end = start + len;
        let mut pos = start;
        while pos < end {
            if engine.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let room = end - pos;
            let (copy, n) = match chunks.needs_copy(&mut io, pos, room).await {
                Ok((copy, n)) => (copy, engine.aligned(n, room)),
                Err(e) => match engine.on_error(runner, e, IoOperation::Read) {
                    Flow::Retry => {
                        runner.pause_point(&mut io).await?;
                        continue;
                    }
                    Flow::Skip => {
                        runner.add_progress(room);
                        pos = end;
                        continue;
                    }
                    Flow::Fail => return Ok(()),
                },
            };
            if copy {
                runner.throttle(&mut io, n).await?;
                buf.resize(n as usize, 0);
                match chunks.copy(&mut io, pos, &mut buf[..n as usize]).await {
                    Ok(()) => {
                        engine.copied.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(ChunkError { operation, error }) => {
                        match engine.on_error(runner, error, operation) {
                            Flow::Retry => {
                                runner.pause_point(&mut io).await?;
                                continue;
                            }
                            Flow::Skip => {}
                            Flow::Fail => return Ok(()),
                        }
                    }
                }
            } else {
                engine.skipped.fetch_add(n, Ordering::Relaxed);
            }
            runner.add_progress(n);
            pos += n;
        }
    }
}
