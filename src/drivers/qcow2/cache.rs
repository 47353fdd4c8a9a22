//! A small bounded write-back cache of metadata tables (L2 tables and
//! refcount blocks), least recently used first out.
//!
//! The cache only keeps tables and remembers which bytes changed; writing
//! them back, and in which order, is the caller's business (see
//! `meta.rs`), because the order is what keeps the image consistent.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for `u64` keys we choose ourselves (file offsets, cluster
/// indices): one multiply, instead of SipHash's resistance to chosen keys,
/// which these keys do not need (an image can only pick offsets inside
/// itself, and a cache lookup is bounded work either way).
#[derive(Default, Clone, Copy)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

/// Hash map/set state for [`OffsetHasher`].
pub(crate) type OffsetHash = BuildHasherDefault<OffsetHasher>;

/// A table kept in the cache.
pub(crate) trait Table {
    /// The on-disk bytes `start..end` of the table.
    fn bytes(&self, start: usize, end: usize) -> Vec<u8>;
}

/// An L2 table, decoded to native-endian entries.
impl Table for Vec<u64> {
    fn bytes(&self, start: usize, end: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(end - start);
        for e in &self[start / 8..end.div_ceil(8)] {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out
    }
}

/// A refcount block, kept as its on-disk bytes (entries may be narrower
/// than a byte).
#[derive(Debug, Clone)]
pub(crate) struct RawBlock(pub Vec<u8>);

impl Table for RawBlock {
    fn bytes(&self, start: usize, end: usize) -> Vec<u8> {
        self.0[start..end].to_vec()
    }
}

pub(crate) struct Slot<T> {
    /// Where the table lives in the image file.
    pub offset: u64,
    pub table: T,
    /// Bytes changed since the table was last written (start, end).
    pub dirty: Option<(usize, usize)>,
    last_used: u64,
}

pub(crate) struct TableCache<T> {
    slots: Vec<Slot<T>>,
    index: HashMap<u64, usize, OffsetHash>,
    capacity: usize,
    clock: u64,
}

impl<T: Table> TableCache<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            slots: Vec::new(),
            index: HashMap::default(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// The slot holding the table at `offset`, marked as just used.
    pub(crate) fn lookup(&mut self, offset: u64) -> Option<usize> {
        let i = *self.index.get(&offset)?;
        self.clock += 1;
        self.slots[i].last_used = self.clock;
        Some(i)
    }

    pub(crate) fn get(&self, i: usize) -> &Slot<T> {
        &self.slots[i]
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> &mut Slot<T> {
        &mut self.slots[i]
    }

    pub(crate) fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The slot to evict next: the least recently used clean one, else the
    /// least recently used dirty one.
    pub(crate) fn victim(&self) -> Option<usize> {
        let lru = |dirty: bool| {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.dirty.is_some() == dirty)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
        };
        lru(false).or_else(|| lru(true))
    }

    /// Drops slot `i` (the caller wrote it back if it was dirty).
    pub(crate) fn remove(&mut self, i: usize) -> Slot<T> {
        let slot = self.slots.swap_remove(i);
        self.index.remove(&slot.offset);
        if i < self.slots.len() {
            let moved = self.slots[i].offset;
            self.index.insert(moved, i);
        }
        slot
    }

    /// Adds a table; the caller made room first.
    pub(crate) fn insert(&mut self, offset: u64, table: T, dirty: Option<(usize, usize)>) -> usize {
        debug_assert!(!self.index.contains_key(&offset));
        self.clock += 1;
        self.slots.push(Slot {
            offset,
            table,
            dirty,
            last_used: self.clock,
        });
        let i = self.slots.len() - 1;
        self.index.insert(offset, i);
        i
    }

    /// Records that bytes `start..end` of slot `i` changed.
    pub(crate) fn mark_dirty(&mut self, i: usize, start: usize, end: usize) {
        let d = &mut self.slots[i].dirty;
        *d = Some(match *d {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }

    /// Slots with unwritten changes.
    pub(crate) fn dirty_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].dirty.is_some())
            .collect()
    }

    pub(crate) fn has_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty.is_some())
    }
}
