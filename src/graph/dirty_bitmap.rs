//! Dirty bitmaps (QEMU's `BdrvDirtyBitmap`, `block/dirty-bitmap.c`): named
//! bitmaps per node, one bit per `granularity` bytes, set by every write,
//! zeroing and discard that completes on the node while the bitmap is
//! enabled (DESIGN §15).
//!
//! Storage: a node's bitmaps sit in a list behind a per-node `RwLock`; each
//! bitmap's bits are atomic words behind a lock of their own that is taken
//! shared to set or clear bits and exclusively only to change the number of
//! words (a resize, a write past the size the bitmap knew). So writers on
//! several I/O threads mark concurrently with one relaxed RMW per word they
//! change (none when the word is dirty already), and never wait for each
//! other. A node with no enabled bitmap pays one relaxed load per write
//! (`NodeBitmaps::recording`), nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::types::{DirtyBitmapInfo, Error, Result};

/// QEMU's default granularity (64 KiB), used when none is given.
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;
/// The smallest granularity (one sector, QEMU's limit).
pub const MIN_GRANULARITY: u64 = 512;
/// The largest granularity (2 GiB: QEMU's limit, and the largest a qcow2
/// bitmap can store).
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Longest bitmap name (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_LEN: usize = 1023;

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// How to create a dirty bitmap ([`NodeRef::add_dirty_bitmap`](crate::NodeRef::add_dirty_bitmap);
/// QEMU's `block-dirty-bitmap-add` arguments).
///
/// ```
/// use blockgraph::DirtyBitmapOptions;
///
/// let opts = DirtyBitmapOptions::new().granularity(4096).persistent(true);
/// assert_eq!(opts.granularity_or_default(), 4096);
/// assert_eq!(DirtyBitmapOptions::new().granularity_or_default(), 65536);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirtyBitmapOptions {
    granularity: Option<u64>,
    persistent: bool,
    disabled: bool,
}

impl DirtyBitmapOptions {
    /// Granularity 64 KiB, not persistent, enabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes one bit covers: a power of two from 512 bytes to 2 GiB.
    pub fn granularity(mut self, bytes: u64) -> Self {
        self.granularity = Some(bytes);
        self
    }

    /// Whether the node's driver stores the bitmap in the image when the
    /// node is closed (QEMU's `persistent`; qcow2 does).
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Whether the bitmap starts disabled (records nothing until enabled).
    pub fn disabled(mut self, disabled: bool) -> Self {
        self.disabled = disabled;
        self
    }

    /// The granularity asked for, or the default (64 KiB).
    pub fn granularity_or_default(&self) -> u64 {
        self.granularity.unwrap_or(DEFAULT_GRANULARITY)
    }

    pub(crate) fn has_granularity(&self) -> bool {
        self.granularity.is_some()
    }

    pub(crate) fn is_persistent(&self) -> bool {
        self.persistent
    }

    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled
    }
}

/// Checks a granularity and returns its log2.
pub(crate) fn granularity_bits(granularity: u64) -> Result<u32> {
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
    {
        return Err(Error::InvalidArgument(format!(
            "granularity must be a power of two between {MIN_GRANULARITY} and {MAX_GRANULARITY} bytes, not {granularity}"
        )));
    }
    Ok(granularity.trailing_zeros())
}

/// The words of one bitmap: bit `i` of word `w` is granule `64 w + i`.
struct Bits {
    words: Vec<AtomicU64>,
}

/// One dirty bitmap.
pub(crate) struct Bitmap {
    pub(crate) name: String,
    pub(crate) granularity_bits: u32,
    pub(crate) enabled: AtomicBool,
    pub(crate) busy: AtomicBool,
    pub(crate) persistent: AtomicBool,
    /// Loaded from an image that says it may be stale (qcow2's `in_use`):
    /// no bits, refused by every operation but removal (QEMU's rule).
    pub(crate) inconsistent: bool,
    /// The bytes the bitmap covers: the node's size when it was made,
    /// grown by writes past it and set by resizes.
    size: AtomicU64,
    bits: RwLock<Bits>,
}

fn words_for(size: u64, gbits: u32) -> usize {
    let granules = size.div_ceil(1u64 << gbits);
    granules.div_ceil(64) as usize
}

impl Bitmap {
    pub(crate) fn new(
        name: &str,
        gbits: u32,
        size: u64,
        enabled: bool,
        persistent: bool,
        inconsistent: bool,
    ) -> Bitmap {
        let n = if inconsistent {
            0
        } else {
            words_for(size, gbits)
        };
        Bitmap {
            name: name.to_owned(),
            granularity_bits: gbits,
            enabled: AtomicBool::new(enabled && !inconsistent),
            busy: AtomicBool::new(false),
            persistent: AtomicBool::new(persistent),
            inconsistent,
            size: AtomicU64::new(size),
            bits: RwLock::new(Bits {
                words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    pub(crate) fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// The granules `[first, last]` that `[offset, offset + len)` touches.
    fn granules(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let end = offset.saturating_add(len);
        Some((
            offset >> self.granularity_bits,
            (end - 1) >> self.granularity_bits,
        ))
    }

    /// Sets the bits of `[offset, offset + len)`, growing the bitmap if the
    /// range ends past it.
    pub(crate) fn set(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.granules(offset, len) else {
            return;
        };
        let need = (last / 64 + 1) as usize;
        let bits = read(&self.bits);
        if bits.words.len() >= need {
            set_words(&bits.words, first, last);
        } else {
            drop(bits);
            let mut bits = write(&self.bits);
            if bits.words.len() < need {
                bits.words.resize_with(need, || AtomicU64::new(0));
            }
            set_words(&bits.words, first, last);
        }
        // Past the size the bitmap knew (a node whose driver does not
        // report its size when the bitmap is made): grow to the end of the
        // granule, so the bits read back as whole granules.
        let end = offset.saturating_add(len);
        if end > self.size() {
            let g = self.granularity();
            self.size
                .fetch_max(end.div_ceil(g).saturating_mul(g), Ordering::Relaxed);
        }
    }

    /// Clears the bits of the granules that lie wholly inside
    /// `[offset, offset + len)` (a range ending at the bitmap's size counts
    /// as reaching the end of its last granule).
    pub(crate) fn reset(&self, offset: u64, len: u64) {
        let g = self.granularity();
        let end = offset.saturating_add(len);
        let first = offset.div_ceil(g);
        let end_g = if end >= self.size() {
            end.div_ceil(g)
        } else {
            end / g
        };
        if end_g <= first {
            return;
        }
        let bits = read(&self.bits);
        let n = bits.words.len() as u64 * 64;
        if n == 0 {
            return; // nothing set yet (a bitmap made before its node's size was known)
        }
        let last = (end_g - 1).min(n - 1);
        if first > last {
            return;
        }
        for w in first / 64..=last / 64 {
            let m = mask(w, first, last);
            bits.words[w as usize].fetch_and(!m, Ordering::Relaxed);
        }
    }

    /// Clears every bit.
    pub(crate) fn clear(&self) {
        for w in &read(&self.bits).words {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Dirty granules × granularity (QEMU's `bdrv_get_dirty_count`).
    pub(crate) fn count(&self) -> u64 {
        let set: u64 = read(&self.bits)
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        set << self.granularity_bits
    }

    /// The first dirty area at or after `offset` (see
    /// [`DirtyBitmapSnapshot::next_dirty`]), read in place.
    pub(crate) fn next_dirty(&self, offset: u64) -> Option<(u64, u64)> {
        let bits = read(&self.bits);
        next_dirty_by(
            |i| bits.words[i].load(Ordering::Relaxed),
            bits.words.len(),
            self.granularity_bits,
            self.size(),
            offset,
        )
    }

    /// A copy of the words.
    pub(crate) fn words(&self) -> Vec<u64> {
        read(&self.bits)
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    /// ORs `words` (same granularity) into this bitmap.
    pub(crate) fn or_words(&self, words: &[u64]) {
        let mut bits = write(&self.bits);
        if bits.words.len() < words.len() {
            bits.words.resize_with(words.len(), || AtomicU64::new(0));
        }
        for (w, v) in bits.words.iter().zip(words) {
            w.fetch_or(*v, Ordering::Relaxed);
        }
    }

    /// Adds every dirty byte of `src` to this bitmap (any granularities:
    /// a source granule sets every granule of ours it touches).
    pub(crate) fn merge_from(&self, src: &Bitmap) {
        if src.granularity_bits == self.granularity_bits {
            self.or_words(&src.words());
        } else {
            let snap = DirtyBitmapSnapshot::of(src);
            for (off, len) in snap.dirty_ranges() {
                self.set(off, len);
            }
        }
        self.size.fetch_max(src.size(), Ordering::Relaxed);
    }

    /// Follows a resize of the node from `old` (when known) to `size`
    /// bytes (QEMU's `bdrv_dirty_bitmap_truncate`): bits past the new end
    /// go, and a grown area is dirty if the bitmap is enabled (QEMU marks
    /// it like a write).
    pub(crate) fn truncate(&self, old: Option<u64>, size: u64) {
        if self.inconsistent {
            self.size.store(size, Ordering::Relaxed);
            return;
        }
        {
            let mut bits = write(&self.bits);
            let n = words_for(size, self.granularity_bits);
            bits.words.resize_with(n, || AtomicU64::new(0));
            // Granules wholly past the new end.
            let keep = size.div_ceil(self.granularity());
            if let Some(last) = bits.words.last() {
                let tail = keep % 64;
                if tail != 0 {
                    last.fetch_and((1u64 << tail) - 1, Ordering::Relaxed);
                }
            }
        }
        self.size.store(size, Ordering::Relaxed);
        if let Some(old) = old {
            if size > old && self.enabled.load(Ordering::Relaxed) {
                self.set(old, size - old);
            }
        }
    }

    pub(crate) fn info(&self) -> DirtyBitmapInfo {
        DirtyBitmapInfo {
            name: self.name.clone(),
            granularity: self.granularity(),
            count: self.count(),
            enabled: self.enabled.load(Ordering::Relaxed),
            persistent: self.persistent.load(Ordering::Relaxed),
            inconsistent: self.inconsistent,
            busy: self.busy.load(Ordering::Relaxed),
        }
    }
}

/// The bits of granules `first..=last` that fall in word `w`.
fn mask(w: u64, first: u64, last: u64) -> u64 {
    let lo = if first / 64 == w { first % 64 } else { 0 };
    let hi = if last / 64 == w { last % 64 } else { 63 };
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

fn set_words(words: &[AtomicU64], first: u64, last: u64) {
    for w in first / 64..=last / 64 {
        let m = mask(w, first, last);
        let word = &words[w as usize];
        // A word that is dirty already is not written: repeated writes to
        // a hot area do not bounce its cache line between threads.
        if word.load(Ordering::Relaxed) & m != m {
            word.fetch_or(m, Ordering::Relaxed);
        }
    }
}

/// A node's dirty bitmaps.
#[derive(Default)]
pub(crate) struct NodeBitmaps {
    /// Some bitmap is enabled: the one relaxed load a write pays.
    recording: AtomicBool,
    list: RwLock<Vec<Arc<Bitmap>>>,
}

impl NodeBitmaps {
    /// Whether a completed write must mark bitmaps (one relaxed load).
    #[inline]
    pub(crate) fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// Marks `[offset, offset + len)` in every enabled bitmap (a write,
    /// zeroing or discard completed; QEMU's `bdrv_set_dirty`).
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        for b in read(&self.list).iter() {
            if b.enabled.load(Ordering::Relaxed) {
                b.set(offset, len);
            }
        }
    }

    /// Whether the node has any bitmap.
    pub(crate) fn any(&self) -> bool {
        !read(&self.list).is_empty()
    }

    /// The node was resized from `old` (if known) to `size` bytes.
    pub(crate) fn truncate(&self, old: Option<u64>, size: u64) {
        for b in read(&self.list).iter() {
            b.truncate(old, size);
        }
    }

    fn update_recording(&self, list: &[Arc<Bitmap>]) {
        let any = list.iter().any(|b| b.enabled.load(Ordering::Relaxed));
        self.recording.store(any, Ordering::Relaxed);
    }

    pub(crate) fn find(&self, name: &str) -> Option<Arc<Bitmap>> {
        read(&self.list).iter().find(|b| b.name == name).cloned()
    }

    pub(crate) fn infos(&self) -> Vec<DirtyBitmapInfo> {
        read(&self.list).iter().map(|b| b.info()).collect()
    }

    /// Adds `bitmap`; fails if the name is taken.
    pub(crate) fn add(&self, node: &str, bitmap: Bitmap) -> Result<Arc<Bitmap>> {
        let mut list = write(&self.list);
        if list.iter().any(|b| b.name == bitmap.name) {
            return Err(Error::BitmapExists {
                node: node.to_owned(),
                bitmap: bitmap.name,
            });
        }
        let b = Arc::new(bitmap);
        list.push(b.clone());
        self.update_recording(&list);
        Ok(b)
    }

    /// Removes the bitmap called `name`, after `check` accepts it.
    pub(crate) fn remove(
        &self,
        name: &str,
        check: impl FnOnce(&Bitmap) -> Result<()>,
    ) -> Option<Result<Arc<Bitmap>>> {
        let mut list = write(&self.list);
        let i = list.iter().position(|b| b.name == name)?;
        if let Err(e) = check(&list[i]) {
            return Some(Err(e));
        }
        let b = list.remove(i);
        self.update_recording(&list);
        Some(Ok(b))
    }

    /// Enables or disables the bitmap called `name`.
    pub(crate) fn set_enabled(&self, b: &Bitmap, enabled: bool) {
        let list = write(&self.list);
        b.enabled.store(enabled, Ordering::Relaxed);
        self.update_recording(&list);
    }
}

/// A copy of a dirty bitmap's bits, detached from the node: what a job
/// iterates over (QEMU's backup copies its bitmap the same way), and what
/// a format driver writes into an image.
///
/// ```
/// # use blockgraph::{drivers::MemoryDriver, DirtyBitmapOptions, MainLoop};
/// let main = MainLoop::new()?;
/// let io = main.new_io_thread("io")?;
/// let disk = main.run(|bql| -> blockgraph::Result<_> {
///     let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(1 << 20), &[]))?;
///     disk.gs(bql).add_dirty_bitmap("b0", DirtyBitmapOptions::new().granularity(4096))?;
///     Ok(disk)
/// })?;
/// let d = disk.clone();
/// io.spawn(move |mut cx| async move {
///     let g = cx.read().await;
///     d.io(&g).write(8192, &[1; 100]).await
/// }).join()?;
/// let snap = main.run(move |bql| disk.gs(bql).dirty_bitmap_snapshot("b0"))?;
/// assert_eq!(snap.dirty_ranges(), vec![(8192, 4096)]);
/// assert_eq!(snap.count(), 4096);
/// # drop(io); main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmapSnapshot {
    granularity_bits: u32,
    size: u64,
    words: Vec<u64>,
}

impl DirtyBitmapSnapshot {
    pub(crate) fn of(b: &Bitmap) -> Self {
        DirtyBitmapSnapshot {
            granularity_bits: b.granularity_bits,
            size: b.size(),
            words: b.words(),
        }
    }

    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// The bytes the bitmap covers (the node's size, as the bitmap knows
    /// it).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Dirty granules × granularity.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            << self.granularity_bits
    }

    /// Whether the granule holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let g = offset >> self.granularity_bits;
        self.words
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// The granules as bits, granule `i` at bit `i % 64` of word `i / 64`
    /// (QEMU's serialisation, with each word little-endian, is this).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The first dirty area at or after `offset`: `(start, len)`, whole
    /// granules clipped to `offset` and to [`size`](Self::size) (QEMU's
    /// `bdrv_dirty_bitmap_next_dirty_area`).
    pub fn next_dirty(&self, offset: u64) -> Option<(u64, u64)> {
        next_dirty_in(&self.words, self.granularity_bits, self.size, offset)
    }

    /// Every dirty area, in order, adjacent granules joined.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((s, l)) = self.next_dirty(at) {
            out.push((s, l));
            at = s + l;
        }
        out
    }
}

/// The first run of set bits at or after `offset`, as bytes clipped to
/// `[offset, size)`.
fn next_dirty_in(words: &[u64], gbits: u32, size: u64, offset: u64) -> Option<(u64, u64)> {
    next_dirty_by(|i| words[i], words.len(), gbits, size, offset)
}

fn next_dirty_by(
    word: impl Fn(usize) -> u64,
    nwords: usize,
    gbits: u32,
    size: u64,
    offset: u64,
) -> Option<(u64, u64)> {
    if offset >= size {
        return None;
    }
    let nbits = nwords as u64 * 64;
    let find = |from: u64, set: bool| -> u64 {
        let mut g = from;
        while g < nbits {
            let w = word((g / 64) as usize);
            let v = if set { w } else { !w } >> (g % 64);
            if v != 0 {
                return g + u64::from(v.trailing_zeros());
            }
            g = (g / 64 + 1) * 64;
        }
        nbits
    };
    let start_g = find(offset >> gbits, true);
    if start_g >= nbits {
        return None;
    }
    let end_g = find(start_g, false);
    let start = (start_g << gbits).max(offset);
    let end = end_g.saturating_mul(1 << gbits).min(size);
    (start < end).then(|| (start, end - start))
}

#[cfg(test)]
mod tests {
    use crate::graph::dirty_bitmap::*;

    #[test]
    fn set_reset_count_and_ranges() {
        let b = Bitmap::new("b", 9, 1 << 20, true, false, false);
        b.set(0, 1);
        b.set(1000, 1000); // granules 1..=3
        b.set(64 * 512 - 1, 2); // granules 63, 64: across a word
        assert_eq!(b.count(), 6 * 512);
        let s = DirtyBitmapSnapshot::of(&b);
        assert_eq!(
            s.dirty_ranges(),
            vec![(0, 2048), (63 * 512, 1024)],
            "{:?}",
            s.words()
        );
        assert_eq!(s.next_dirty(100), Some((100, 1948)));
        b.reset(512, 512); // granule 1 only
        b.reset(63 * 512 + 1, 1000); // no granule wholly inside: nothing
        assert_eq!(b.count(), 5 * 512);
        b.clear();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn resetting_a_bitmap_with_no_words_yet_does_nothing() {
        // Made before its node's size was known: no words until a write.
        let b = Bitmap::new("b", 16, 0, true, false, false);
        b.reset(0, 1 << 20);
        assert_eq!(b.count(), 0);
        b.set(0, 1);
        b.reset(0, 1 << 16);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn growing_and_shrinking() {
        let b = Bitmap::new("b", 16, 1 << 16, true, false, false);
        b.set(10 << 20, 1); // past the end: grows, to the granule's end
        assert_eq!(b.size(), (10 << 20) + (1 << 16));
        assert_eq!(b.count(), 1 << 16);
        b.truncate(None, 1 << 20);
        assert_eq!(b.count(), 0);
        b.truncate(Some(1 << 20), 2 << 20);
        assert_eq!(b.count(), 1 << 20, "the grown area is dirty");
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0, 0, 63), u64::MAX);
        assert_eq!(mask(0, 3, 3), 1 << 3);
        assert_eq!(mask(1, 3, 70), (1 << 7) - 1);
        assert_eq!(mask(0, 3, 70), u64::MAX << 3);
    }

    #[test]
    fn granularity_rules() {
        assert!(granularity_bits(511).is_err());
        assert!(granularity_bits(3000).is_err());
        assert!(granularity_bits(1 << 32).is_err());
        assert_eq!(granularity_bits(65536).unwrap(), 16);
    }
}
