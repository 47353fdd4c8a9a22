//! Structured answers to queries about the graph (QEMU's `query-named-block-nodes`,
//! `query-block`, `query-blockstats`): plain values, detached from the graph,
//! that serialise with `serde` when the `serde` cargo feature is on.

#[cfg(feature = "serde")]
use serde::Serialize;

/// What a driver reports about its node (QEMU's `bdrv_get_info` and
/// `ImageInfoSpecific`), through [`BlockDriver::info`](crate::driver::BlockDriver::info).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct DriverInfo {
    /// The host file the node reads and writes, for protocol nodes (`file`).
    pub filename: Option<String>,
    /// The node's size in bytes, when the driver knows it without I/O
    /// (a file's length, an image's virtual size).
    pub size: Option<u64>,
    /// The backing file name stored in the image (unresolved), for formats
    /// that store one.
    pub backing_file: Option<String>,
    /// The backing file's format stored in the image.
    pub backing_format: Option<String>,
    /// The cluster size in bytes, for formats with clusters.
    pub cluster_size: Option<u64>,
    /// Format-specific facts as name/value pairs (qcow2: `compat`, …).
    pub format_specific: Vec<(String, String)>,
}

impl DriverInfo {
    /// An empty report: nothing beyond the format name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the host file name.
    pub fn filename(mut self, name: impl Into<String>) -> Self {
        self.filename = Some(name.into());
        self
    }

    /// Sets the size.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// Sets the stored backing file name and format.
    pub fn backing(mut self, file: Option<String>, format: Option<String>) -> Self {
        self.backing_file = file;
        self.backing_format = format;
        self
    }

    /// Sets the cluster size.
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = Some(bytes);
        self
    }

    /// Adds a format-specific fact.
    pub fn specific(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.format_specific.push((name.into(), value.to_string()));
        self
    }
}

/// One edge below a node, as [`NodeInfo::children`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct ChildInfo {
    /// The child's role (`file`, `backing`, `data`, `filtered`).
    pub role: String,
    /// The child node's name.
    pub node: String,
    /// What the edge takes on the child (`read|write`, …).
    pub take: String,
    /// What the edge lets other users of the child take.
    pub share: String,
}

/// One node of the graph (QEMU's `BlockDeviceInfo` from
/// `query-named-block-nodes`), from [`Bql::query_nodes`](crate::Bql::query_nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct NodeInfo {
    /// The node's name (QEMU's `node-name`).
    pub name: String,
    /// The driver's format name (`file`, `qcow2`, `raw`, …).
    pub driver: String,
    /// The driver's one-line description, as in graph dumps.
    pub description: String,
    /// The node's size in bytes, when known without I/O (protocol and
    /// format drivers report it; `None` for filters, whose size is their
    /// child's).
    pub size: Option<u64>,
    /// Whether the node refuses writes.
    pub read_only: bool,
    /// The names of the nodes below it through `backing` edges, nearest
    /// first (QEMU's `backing_file_depth` is its length).
    pub backing_chain: Vec<String>,
    /// Its edges, in the order they were attached.
    pub children: Vec<ChildInfo>,
    /// Its users: `node 'x'` or `backend 'y'`.
    pub parents: Vec<String>,
    /// Requests that entered the graph at this node (through an `IoRef`)
    /// and have not finished.
    pub in_flight: usize,
    /// How many drain sections cover it.
    pub drain_count: u32,
    /// What the driver reports about itself.
    pub driver_info: DriverInfo,
    /// Its dirty bitmaps, in the order they were added (QEMU's
    /// `dirty-bitmaps`).
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

/// One dirty bitmap of a node (QEMU's `BlockDirtyInfo`), from
/// [`NodeInfo::dirty_bitmaps`] or [`NodeRef::dirty_bitmaps`](crate::NodeRef::dirty_bitmaps).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct DirtyBitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes one bit covers.
    pub granularity: u64,
    /// Dirty bytes: dirty granules × granularity (QEMU's `count`).
    pub count: u64,
    /// Whether it records writes (QEMU's `recording`).
    pub enabled: bool,
    /// Whether the node's driver stores it in the image on close.
    pub persistent: bool,
    /// Loaded from an image that did not save it cleanly: unusable, only
    /// removable.
    pub inconsistent: bool,
    /// A block job uses it: it cannot be changed.
    pub busy: bool,
}

/// I/O statistics of a backend (QEMU's `BlockDeviceStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct IoStats {
    /// Read requests completed successfully.
    pub reads: u64,
    /// Bytes those reads returned.
    pub read_bytes: u64,
    /// Write requests (writes, zeroing) completed successfully.
    pub writes: u64,
    /// Bytes those writes covered.
    pub write_bytes: u64,
    /// Flushes completed successfully.
    pub flushes: u64,
    /// Discards completed successfully.
    pub discards: u64,
    /// Requests that failed, any kind.
    pub errors: u64,
}

/// One backend (QEMU's `BlockInfo` from `query-block`, with
/// `query-blockstats`' counters), from [`Bql::query_backends`](crate::Bql::query_backends).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[non_exhaustive]
pub struct BackendInfo {
    /// The backend's name.
    pub name: String,
    /// Its root node, if it has one.
    pub root: Option<String>,
    /// What it takes on its root.
    pub take: String,
    /// What it lets other users of its root take.
    pub share: String,
    /// Whether a drain holds it (new requests queue).
    pub quiesced: bool,
    /// Requests past its drain gate and not finished yet.
    pub in_flight: usize,
    /// Requests that waited at its drain gate, ever.
    pub queued_requests: u64,
    /// Its I/O counters.
    pub stats: IoStats,
}
