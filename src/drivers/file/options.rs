//! [`FileOptions`]: how to open a host file.

/// How to open a host file; see [`FileDriver::open`].
///
/// ```
/// use blockgraph::drivers::FileOptions;
/// let opts = FileOptions { read_only: true, ..FileOptions::default() };
/// assert!(opts.locking);
/// ```
///
/// [`FileDriver::open`]: super::FileDriver::open
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for reading only; writes fail with [`Error::ReadOnly`].
    ///
    /// [`Error::ReadOnly`]: crate::types::Error::ReadOnly
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`); requests are bounced as
    /// described on [`FileDriver`].
    ///
    /// [`FileDriver`]: super::FileDriver
    pub direct: bool,
    /// Take QEMU-compatible image locks (default `true`).
    pub locking: bool,
    /// Let other users write the file while we have it open (QEMU's
    /// `force-share` for readers, `share-rw` for writers). Default `false`.
    pub share_writes: bool,
    /// With `direct`: report the real alignment and refuse misaligned
    /// requests instead of bouncing them. Default `false`.
    pub strict_alignment: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            read_only: false,
            direct: false,
            locking: true,
            share_writes: false,
            strict_alignment: false,
        }
    }
}
