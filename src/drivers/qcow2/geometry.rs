//! The image's geometry, fixed at open: cluster size, entries per table,
//! refcount width, and the bounds host offsets and the refcount table keep.

/// Image geometry, fixed at open (the virtual size, which a resize
/// changes, lives in the driver).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geo {
    pub cluster_bits: u32,
    pub cs: u64,
    pub l2_entries: u64,
    pub version: u32,
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub rb_entries: u64,
    /// Metadata writes are rounded out to this (the file's alignment).
    pub align: u64,
    /// Host offsets must stay below this.
    pub max_host: u64,
    /// Largest refcount table, in bytes.
    pub max_rt_bytes: u64,
}
