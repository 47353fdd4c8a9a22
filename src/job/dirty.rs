//! The mirror job's own dirty map: one bit per granule of the device, set
//! by the mirror filter for every guest write, zero write or discard it
//! passes down, and cleared by the job as it copies (QEMU's
//! `BdrvDirtyBitmap` as `block/mirror.c` uses it).
//!
//! It is deliberately small and private to the mirror job: a lock-free
//! word array with a count of set bits and a wake-up for a job waiting on a
//! clean map. Its interface — [`DirtyMap::mark`], [`DirtyMap::next_dirty`],
//! [`DirtyMap::take`], [`DirtyMap::is_clean`] — is the subset of a
//! per-node dirty bitmap that mirror needs, so that it can be replaced by
//! the per-node `DirtyBitmap` the block layer is getting (guest writes
//! recorded on the request path) without touching the job's logic: the
//! filter would then stop marking, and the job would read the node's
//! bitmap instead (DESIGN §13, mirror).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// A per-granule dirty map of a device of fixed length.
#[derive(Debug)]
pub(crate) struct DirtyMap {
    granule: u64,
    len: u64,
    words: Vec<AtomicU64>,
    /// Granules set now.
    count: AtomicU64,
    /// Woken when the map goes from clean to dirty.
    pub(crate) became_dirty: Notify,
}

impl DirtyMap {
    /// A clean map of a `len`-byte device with `granule`-byte granules
    /// (rounded up to a power of two, at least 512).
    pub(crate) fn new(len: u64, granule: u64) -> Self {
        let granule = granule.max(512).next_power_of_two();
        let bits = len.div_ceil(granule);
        let words = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        DirtyMap {
            granule,
            len,
            words,
            count: AtomicU64::new(0),
            became_dirty: Notify::new(),
        }
    }

    /// The granule size in bytes.
    pub(crate) fn granule(&self) -> u64 {
        self.granule
    }

    fn bits(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.len);
        if range.start >= end {
            return 0..0;
        }
        range.start / self.granule..end.div_ceil(self.granule)
    }

    /// Marks every granule that `[offset, offset + len)` touches dirty.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        let mut added = 0;
        for bit in self.bits(offset..offset.saturating_add(len)) {
            let mask = 1u64 << (bit % 64);
            let old = self.words[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            if old & mask == 0 {
                added += 1;
            }
        }
        if added > 0 && self.count.fetch_add(added, Ordering::AcqRel) == 0 {
            self.became_dirty.notify_waiters();
        }
    }

    /// The first dirty granule at or after `from` (bytes), as the byte
    /// range of the dirty run starting there, at most `max` bytes long
    /// (rounded up to whole granules), clipped to the device.
    pub(crate) fn next_dirty(&self, from: u64, max: u64) -> Option<Range<u64>> {
        let nbits = self.len.div_ceil(self.granule);
        let mut bit = from / self.granule;
        while bit < nbits {
            let word = self.words[(bit / 64) as usize].load(Ordering::Acquire) >> (bit % 64);
            if word == 0 {
                bit = (bit / 64 + 1) * 64;
                continue;
            }
            bit += u64::from(word.trailing_zeros());
            if bit >= nbits {
                break;
            }
            let start = bit;
            let max_bits = max.div_ceil(self.granule).max(1);
            let mut end = start + 1;
            while end < nbits && end - start < max_bits && self.is_set(end) {
                end += 1;
            }
            return Some(start * self.granule..(end * self.granule).min(self.len));
        }
        None
    }

    fn is_set(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Clears every granule `range` touches and says how many were dirty
    /// (the job takes a range before it reads the source for it: a write
    /// that completes after the take marks it again).
    pub(crate) fn take(&self, range: Range<u64>) -> u64 {
        let mut cleared = 0;
        for bit in self.bits(range) {
            let mask = 1u64 << (bit % 64);
            let old = self.words[(bit / 64) as usize].fetch_and(!mask, Ordering::AcqRel);
            if old & mask != 0 {
                cleared += 1;
            }
        }
        self.count.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }

    /// Whether no granule is dirty.
    pub(crate) fn is_clean(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Bytes dirty now (whole granules).
    pub(crate) fn dirty_bytes(&self) -> u64 {
        self.count
            .load(Ordering::Acquire)
            .saturating_mul(self.granule)
    }
}

#[cfg(test)]
mod tests {
    use super::DirtyMap;

    #[test]
    fn mark_next_take() {
        let m = DirtyMap::new(1 << 20, 64 << 10);
        assert!(m.is_clean());
        m.mark(100, 10);
        m.mark(65536 * 3 + 1, 65536);
        assert_eq!(m.dirty_bytes(), 3 * 65536);
        assert_eq!(m.next_dirty(0, 1 << 20), Some(0..65536));
        assert_eq!(m.next_dirty(65536, 1 << 20), Some(3 * 65536..5 * 65536));
        assert_eq!(m.next_dirty(65536, 1), Some(3 * 65536..4 * 65536));
        assert_eq!(m.take(0..65536), 1);
        assert_eq!(m.take(0..65536), 0);
        assert_eq!(m.take(3 * 65536..5 * 65536), 2);
        assert!(m.is_clean());
        assert_eq!(m.next_dirty(0, 1 << 20), None);
        // The last, partial granule.
        let m = DirtyMap::new(1000, 512);
        m.mark(0, 1000);
        assert_eq!(m.next_dirty(0, 4096), Some(0..1000));
        m.mark(5000, 10); // past the end: nothing
        assert_eq!(m.take(0..1000), 2);
        assert!(m.is_clean());
    }
}
