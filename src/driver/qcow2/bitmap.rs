//! Persistent dirty bitmaps (the bitmaps header extension): parsed so that
//! their clusters are accounted for and kept, and so that writes by us keep
//! QEMU's rules for them. We do not track dirty regions ourselves.

/// One persistent dirty bitmap stored in the image, as listed in its
/// bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// The `in_use` flag: the bitmap may be inconsistent (its writer did
    /// not save it, or a program that does not track dirty regions, such as
    /// this one, wrote guest data).
    pub in_use: bool,
    /// The `auto` flag: QEMU enables the bitmap (tracks writes) on open.
    pub auto: bool,
}
