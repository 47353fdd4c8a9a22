//! What a driver reports about a range: data, zeroes, or not stored here.

/// What [`BlockDriver::block_status`](crate::driver::BlockDriver::block_status) found at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockStatus {
    /// Data stored in this node.
    Data,
    /// Reads as zeroes, whatever is below.
    Zero,
    /// Not stored here: reads come from the backing node (or zeroes).
    Unallocated,
}
