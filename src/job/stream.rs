//! `block-stream`: copy what the intermediate images of a backing chain
//! store up into the top image, then drop them from the chain (QEMU's
//! `block/stream.c`).
//!
//! What it does, step by step: see [`stream`].

use crate::backend::BlockBackend;
use crate::drivers::qcow2::Qcow2Driver;
use crate::drivers::CopyOnRead;
use crate::graph::proof::{Bql, NodeHandle};
use crate::graph::runtime::{IoTask, IoThreadHandle};
use crate::types::{BlockStatus, Error, Perm, Result};

use super::copy::{copy_range, ChunkError, CopyChunks, CopyOptions};
use super::driver::{JobCx, JobDriver};
use super::filter::JobFilter;
use super::handle::{Job, JobOptions};
use super::setup::{dropped_with_their_files, job_backend, launch, remove_unused, ChainOptions};
use super::status::JobType;

/// What to stream (QEMU's `block-stream` arguments).
#[derive(Debug, Clone)]
pub struct StreamOptions {
    chain: ChainOptions,
}

impl StreamOptions {
    /// Stream into `top` everything its backing chain stores (no base: the
    /// chain below `top` goes away entirely).
    pub fn new(top: &NodeHandle) -> Self {
        StreamOptions {
            chain: ChainOptions::new(top),
        }
    }

    chain_option_setters!(
        chain,
        base:
        /// Stream only what the nodes above `base` store; `base` becomes
        /// `top`'s backing.
        ,
        backing_file:
        /// The backing file name and format to write into `top`'s header
        /// (QEMU's `backing-file`). Default: with a base, the name the lowest
        /// intermediate image stores for it (right when the intermediate and
        /// `top` are in one directory, the usual layout); without one, none.
    );

    common_option_setters!(
        chain.common,
        "stream",
        /// Chunk size and requests in flight of the copy.
    );
}

/// What goes into `top`'s header at the end.
#[derive(Debug, Clone)]
enum Header {
    /// `top` is not a qcow2 image: it has no header to rewrite.
    Skip,
    Write(Option<(String, String)>),
}

/// Starts a stream job (QEMU's `block-stream`) on this main loop, doing
/// its I/O on `io`'s thread ([`Job`] has an example).
///
/// ```text
///  before:  vda → top → mid1 → mid2 → base      (stream top, base = base)
///  during:  vda → stream filter (copy-on-read) → top → mid1 → mid2 → base
///           job backend ↗
///  after:   vda → top → base   (top's header names base)
/// ```
///
/// * **Setup** (main loop, this function): a drain of `top` and one write
///   section insert a copy-on-read filter above `top` (the guest's backend
///   moves onto it, so guest writes and copy-ups exclude each other range
///   by range) and add the job's own backend on it (`stay_at_node`).
/// * **Run** (the job's I/O task): the copy engine walks the device; for
///   each range, [`BlockBackend::block_status_above`] (one request each,
///   under the read lock) says whether `top` already stores it and whether
///   the intermediates (above `base`) do; a range they store is read
///   through the job's backend, and the filter copies it up into `top`.
/// * **Prepare** (finalization): on the main loop, drains of the filter,
///   `top` and every intermediate, and one write section that removes the
///   job's backend and the filter, makes `base` `top`'s backing and
///   removes the intermediates and their file nodes that nobody else
///   uses (as commit does), all in one transaction; then, in the I/O task,
///   under the read lock, the new backing file name is written into
///   `top`'s qcow2 header ([`Qcow2Driver::change_backing_file`], after a
///   flush). The graph changes before the header, as in QEMU; both orders
///   are safe, because after the copy `top` + any of the old backings
///   reads the same as `top` + `base`.
/// * **Clean** (either way): whatever of the filter and the job's backend
///   is still there is removed (a cancelled or failed stream leaves the
///   chain as it was; what it copied stays in `top`, where it is correct).
///
/// # Errors
///
/// An invalid or duplicate job id; `top` removed or of another graph;
/// `base` not below `top`; no backing file name to write (see
/// [`StreamOptions::backing_file`]); the filter node's name taken; a
/// permission conflict with another user of `top`. Nothing is changed
/// then.
pub fn stream(
    bql: &mut Bql,
    io: &IoThreadHandle,
    options: JobOptions,
    stream: StreamOptions,
) -> Result<Job> {
    launch(bql, io, JobType::Stream, &options, |bql, job| {
        set_up(bql, job, &stream.chain)
    })
}

fn set_up(bql: &mut Bql, job: &Job, o: &ChainOptions) -> Result<StreamJob> {
    let (intermediates, header) = {
        let top = o.top.gs(bql);
        if !top.is_in_graph() {
            return Err(Error::NodeRemoved(top.name().to_owned()));
        }
        let below = top.backing().map(|b| b.backing_chain()).unwrap_or_default();
        let base_at = match &o.base {
            None => below.len(),
            Some(base) => below
                .iter()
                .position(|n| n.name() == base.name())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "'{}' is not in the backing chain below '{}'",
                        base.name(),
                        top.name()
                    ))
                })?,
        };
        let intermediates: Vec<NodeHandle> =
            below[..base_at].iter().map(|n| n.to_handle()).collect();
        let header = if top.driver_as::<Qcow2Driver>().is_none() {
            Header::Skip
        } else if let Some(explicit) = &o.backing_file {
            Header::Write(Some(explicit.clone()))
        } else if let Some(base) = &o.base {
            let lowest = below[..base_at].last();
            let named = lowest
                .and_then(|n| n.driver_as::<Qcow2Driver>())
                .and_then(|q| {
                    let format = q
                        .backing_format()
                        .unwrap_or_else(|| below[base_at].driver_name().to_owned());
                    q.backing_file().map(|f| (f, format))
                });
            match (lowest, named) {
                // Nothing between top and base: top's header stays.
                (None, _) => Header::Skip,
                (Some(_), Some(name)) => Header::Write(Some(name)),
                (Some(n), None) => {
                    return Err(Error::InvalidArgument(format!(
                        "stream: '{}' stores no backing file name for '{}'; say which to \
                         write into '{}' (StreamOptions::backing_file)",
                        n.name(),
                        base.name(),
                        top.name()
                    )))
                }
            }
        } else {
            Header::Write(None)
        };
        (intermediates, header)
    };

    let filter_name = o.common.filter_name(job, "stream");
    let cor = match &o.base {
        Some(base) => CopyOnRead::above_base(base.name()),
        None => CopyOnRead::new(),
    };
    // The job only reads (the filter writes what it copies up, with the
    // permission to write unchanged data) and lets the guest do anything.
    let job_backend = job_backend(Perm::CONSISTENT_READ, Perm::ALL);
    let drained = bql.drain(&o.top);
    let mut filter = None;
    let added = bql.write(|w| {
        let f = w.insert_filter(&drained, &filter_name, JobFilter::new(cor, job.clone()))?;
        filter = Some(f.clone());
        w.add_backend(&format!("{}-stream-blk", job.id()), &f, job_backend)
    });
    drop(drained);
    match (added, filter) {
        (Ok(blk), Some(filter)) => Ok(StreamJob {
            top: o.top.clone(),
            base: o.base.clone(),
            intermediates,
            filter,
            blk,
            header,
            copy: o.common.copy,
        }),
        (Err(e), Some(filter)) => {
            let d = bql.drain(&filter);
            let _ = bql.write(|w| w.remove_filter(&d));
            Err(e)
        }
        (Err(e), None) => Err(e),
        (Ok(blk), None) => {
            // Unreachable: the backend was added on the filter.
            let _ = bql.write(|w| w.remove_backend(&blk));
            Err(Error::InvalidArgument("stream: no filter".into()))
        }
    }
}

struct StreamJob {
    top: NodeHandle,
    base: Option<NodeHandle>,
    intermediates: Vec<NodeHandle>,
    filter: NodeHandle,
    blk: BlockBackend,
    header: Header,
    copy: CopyOptions,
}

/// Stream's hook for the copy engine.
struct StreamChunks {
    blk: BlockBackend,
    /// `top`'s backing when the job started: the walk above it asks
    /// whether `top` itself stores a range.
    first: NodeHandle,
    base: Option<NodeHandle>,
}

impl CopyChunks for StreamChunks {
    async fn needs_copy(&self, io: &mut IoTask, offset: u64, len: u64) -> Result<(bool, u64)> {
        // Stored in top (through the filter) already: nothing to do.
        let (status, n) = self
            .blk
            .block_status_above(io, Some(&self.first), offset, len)
            .await?;
        if status != BlockStatus::Unallocated {
            return Ok((false, n));
        }
        // Stored by an intermediate (above base): copy it up.
        let (status, n) = self
            .blk
            .block_status_above(io, self.base.as_ref(), offset, n)
            .await?;
        Ok((status != BlockStatus::Unallocated, n))
    }

    async fn copy(
        &self,
        io: &mut IoTask,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), ChunkError> {
        // Reading through the copy-on-read filter writes the data into
        // top (QEMU's stream_populate).
        self.blk
            .read(io, offset, buf)
            .await
            .map_err(ChunkError::read)
    }
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    async fn run(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let Some(first) = self.intermediates.first().cloned() else {
            cx.runner().set_remaining(0);
            return Ok(());
        };
        let len = self.blk.length(cx.io()).await?;
        let alignment = u64::from(self.blk.request_alignment(cx.io()).await?);
        let options = self.copy.aligned_to(alignment);
        let chunks = StreamChunks {
            blk: self.blk.clone(),
            first,
            base: self.base.clone(),
        };
        let report = copy_range(cx, &chunks, 0..len, &options).await?;
        // QEMU: "Do not remove the backing file if an error was there but
        // ignored."
        match report.ignored {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn prepare(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let (top, base, filter, blk) = (
            self.top.clone(),
            self.base.clone(),
            self.filter.clone(),
            self.blk.clone(),
        );
        let intermediates = self.intermediates.clone();
        cx.on_main_loop(move |bql| {
            // The dropped images and their files, each drained.
            let doomed = dropped_with_their_files(bql, &intermediates);
            let filter_drained = bql.drain(&filter);
            let top_drained = bql.drain(&top);
            let drained: Vec<_> = doomed.iter().map(|n| bql.drain(n)).collect();
            // One transaction: a failure leaves the chain, the filter and
            // the job's backend as they were, for `clean`.
            bql.write(|w| {
                w.transaction(|w| {
                    w.remove_backend(&blk)?;
                    w.remove_filter(&filter_drained)?;
                    w.set_backing(&top_drained, base.as_ref())?;
                    remove_unused(w, &drained)
                })
            })
        })
        .await??;
        if let Header::Write(name) = &self.header {
            let guard = cx.io().read().await;
            let node = self.top.try_io(&guard)?;
            let q = node.driver_as::<Qcow2Driver>().ok_or_else(|| {
                Error::InvalidArgument(format!("'{}' is no longer a qcow2 image", node.name()))
            })?;
            q.change_backing_file(node, name.as_ref().map(|(f, t)| (f.as_str(), t.as_str())))
                .await?;
        }
        Ok(())
    }

    async fn clean(&mut self, cx: &mut JobCx<'_>) {
        let (filter, blk) = (self.filter.clone(), self.blk.clone());
        let _ = cx
            .on_main_loop(move |bql| {
                let _ = bql.write(|w| w.remove_backend(&blk));
                if filter.gs(bql).is_in_graph() {
                    let d = bql.drain(&filter);
                    let _ = bql.write(|w| w.remove_filter(&d));
                }
            })
            .await;
    }
}
