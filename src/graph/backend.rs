//! A backend's graph side: its place in the graph, its drain state and its
//! counters ([`BlockBackend`](crate::BlockBackend) is the request path on
//! top).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Weak};

use crossbeam_utils::CachePadded;

use crate::graph::cell::GraphCell;
use crate::graph::node::NodeInner;
use crate::graph::GraphInner;
use crate::sync::WaitList;
use crate::types::{Perm, Permissions};

/// `length_cache` holds no length.
pub(crate) const NO_LENGTH: u64 = u64::MAX;
/// Lengths below this are cached (256 TiB); larger ones are asked for each
/// time.
pub(crate) const LENGTH_MASK: u64 = (1 << 48) - 1;
/// `alignment_cache` holds no alignment (an alignment is never 0).
pub(crate) const NO_ALIGNMENT: u64 = 0;

/// How a backend uses its root node.
#[derive(Debug, Clone, Copy)]
pub struct BackendOptions {
    /// What the backend takes and shares on its root (default: an exclusive
    /// writer, [`Permissions::EXCLUSIVE_WRITER`]).
    pub perms: Permissions,
    /// Keep this backend on its node when the node is replaced or a filter
    /// or overlay is inserted above it (QEMU's `stay_at_node`, used by block
    /// jobs' own users). Default `false`: the backend follows.
    pub stay_at_node: bool,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            perms: Permissions::EXCLUSIVE_WRITER,
            stay_at_node: false,
        }
    }
}

impl BackendOptions {
    /// Options with `perms`, following the node otherwise.
    pub fn with_perms(perms: Permissions) -> Self {
        BackendOptions {
            perms,
            ..Default::default()
        }
    }
}

pub(crate) struct BackendInner {
    pub(crate) name: String,
    pub(crate) root: GraphCell<Option<Arc<NodeInner>>>,
    pub(crate) perms: Permissions,
    pub(crate) stay_at_node: bool,
    pub(crate) graph: Weak<GraphInner>,
    /// Requests past the drain gate and not finished yet.
    pub(crate) in_flight: CachePadded<AtomicUsize>,
    /// Drain sections covering this backend (main loop only changes it).
    pub(crate) quiesce: AtomicU32,
    /// Raised while `quiesce > 0`: new requests queue.
    pub(crate) quiesced: AtomicBool,
    /// Requests queued while quiesced.
    pub(crate) resume: WaitList,
    /// Drains waiting for `in_flight` to reach zero.
    pub(crate) idle: WaitList,
    pub(crate) in_graph: AtomicBool,
    /// The graph's size epoch (see `GraphInner::size_epoch`).
    pub(crate) size_epoch: Arc<AtomicU64>,
    /// The root's length, tagged with the low 16 bits of the epoch it was
    /// read in: `tag << 48 | length`, or `NO_LENGTH`.
    pub(crate) length_cache: AtomicU64,
    /// The root's request alignment, tagged with the low 32 bits of the
    /// epoch it was asked in: `tag << 32 | alignment`, or `NO_ALIGNMENT`.
    pub(crate) alignment_cache: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) queued: AtomicU64,
    /// I/O counters for queries (QEMU's `BlockAcctStats`), on a line of
    /// their own.
    pub(crate) stats: CachePadded<BackendStats>,
}

/// A backend's I/O counters, each bumped once per finished request
/// (relaxed: they are statistics, read by queries).
#[derive(Default)]
pub(crate) struct BackendStats {
    pub(crate) reads: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) write_bytes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) discards: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl BackendStats {
    pub(crate) fn snapshot(&self) -> crate::types::IoStats {
        use std::sync::atomic::Ordering::Relaxed;
        crate::types::IoStats {
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            writes: self.writes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

impl BackendInner {
    pub(crate) fn new(
        name: &str,
        graph: &Arc<GraphInner>,
        options: BackendOptions,
        root: Arc<NodeInner>,
    ) -> Arc<Self> {
        Arc::new(BackendInner {
            name: name.to_owned(),
            root: GraphCell::new(Some(root)),
            perms: options.perms,
            stay_at_node: options.stay_at_node,
            graph: Arc::downgrade(graph),
            in_flight: CachePadded::new(AtomicUsize::new(0)),
            quiesce: AtomicU32::new(0),
            quiesced: AtomicBool::new(false),
            resume: WaitList::default(),
            idle: WaitList::default(),
            in_graph: AtomicBool::new(false),
            size_epoch: graph.size_epoch.clone(),
            length_cache: AtomicU64::new(NO_LENGTH),
            alignment_cache: AtomicU64::new(NO_ALIGNMENT),
            completed: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            stats: CachePadded::new(BackendStats::default()),
        })
    }
}

impl BackendOptions {
    /// An exclusive writer that may also resize the device
    /// ([`Permissions::EXCLUSIVE_WRITER`] plus [`Perm::RESIZE`]), for
    /// [`BlockBackend::truncate`](crate::BlockBackend::truncate). Like QEMU's `block_resize`, it needs every
    /// other user of the node to share the resize permission.
    pub fn resizable() -> Self {
        let w = Permissions::EXCLUSIVE_WRITER;
        BackendOptions::with_perms(Permissions {
            take: w.take | Perm::RESIZE,
            share: w.share,
        })
    }
}
