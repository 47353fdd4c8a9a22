//! What the caller chooses when opening an image: [`Qcow2Options`], and the
//! [`Qcow2Limits`] that bound what an untrusted image may make us allocate.

/// Bounds on what an untrusted image may make us allocate or address.
///
/// Every table size in a header is checked against these before any memory
/// is allocated for it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Qcow2Limits {
    /// Largest virtual disk size accepted, in bytes.
    pub max_virtual_size: u64,
    /// Largest L1 table, in bytes (QEMU: 32 MiB).
    pub max_l1_bytes: u64,
    /// Largest refcount table, in bytes (QEMU: 8 MiB).
    pub max_refcount_table_bytes: u64,
    /// Host offsets (the image file's size) stay below this.
    pub max_file_size: u64,
    /// Most host clusters [`Qcow2Driver::check`](super::Qcow2Driver::check) will account for.
    pub max_check_clusters: u64,
}

impl Default for Qcow2Limits {
    fn default() -> Self {
        Qcow2Limits {
            max_virtual_size: 1 << 56,
            max_l1_bytes: 32 << 20,
            max_refcount_table_bytes: 8 << 20,
            max_file_size: 1 << 56,
            max_check_clusters: 1 << 28,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Qcow2Options {
    /// Refuse writes and never touch the file.
    pub read_only: bool,
    /// Bounds for untrusted images.
    pub limits: Qcow2Limits,
    /// Memory for cached L2 tables (at least two tables are kept).
    pub l2_cache_bytes: u64,
    /// Memory for cached refcount blocks (at least two are kept).
    pub refcount_cache_bytes: u64,
    /// Whether [`BlockDriver::open`] insists on a backing child when the
    /// image names a backing file (default `true`: without it, unallocated
    /// clusters would silently read as zeroes).
    ///
    /// [`BlockDriver::open`]: crate::graph::driver::BlockDriver::open
    pub require_backing: bool,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            read_only: false,
            limits: Qcow2Limits::default(),
            l2_cache_bytes: 1 << 20,
            refcount_cache_bytes: 256 << 10,
            require_backing: true,
        }
    }
}

impl Qcow2Options {
    /// Default options, read-only.
    pub fn read_only() -> Self {
        Qcow2Options {
            read_only: true,
            ..Self::default()
        }
    }
}
