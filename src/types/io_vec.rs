//! [`IoVec`] and [`IoVecMut`]: a request's data as a list of memory
//! regions (QEMU's `QEMUIOVector`), the shape in which a VMM holds a
//! guest's buffers (virtio descriptors).
//!
//! Both are views: they borrow an array of [`IoSlice`]s or
//! [`IoSliceMut`]s (which are ABI-compatible with `struct iovec`) and
//! cover a byte range of it. Cutting a view at any byte
//! ([`IoVecMut::slice_mut`], [`IoVecMut::split_at`], …) copies neither
//! data nor the array: it only moves the view's start into a segment and
//! its length, so a format driver can hand each cluster's share of a
//! request to its file without a bounce buffer.

use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::ptr::NonNull;

// `IoSlice` and `IoSliceMut` are documented to be ABI compatible with
// `struct iovec` on Unix; the views read the arrays they borrow as iovecs.
static_assertions::assert_eq_size!(IoSlice<'static>, libc::iovec);
static_assertions::assert_eq_size!(IoSliceMut<'static>, libc::iovec);
static_assertions::assert_eq_align!(IoSlice<'static>, libc::iovec);
static_assertions::assert_eq_align!(IoSliceMut<'static>, libc::iovec);

/// One memory region: its first byte and length.
#[derive(Clone, Copy)]
struct Seg {
    base: *mut u8,
    len: usize,
}

impl Seg {
    const EMPTY: Seg = Seg {
        base: NonNull::dangling().as_ptr(),
        len: 0,
    };
}

/// What both views are made of: the first segment (already cut to start
/// at the view's first byte; it may reach past the view's end), the
/// segments after it in the borrowed array, and the view's length in
/// bytes. Bytes past `len` are not part of the view.
///
/// Invariants, kept by every constructor and by [`Raw::slice`]:
/// `first` lies inside one segment of the borrowed memory; `rest` points
/// at `rest_count` readable `iovec`s (or is dangling with `rest_count ==
/// 0`); the segments, in order, hold at least `len` bytes.
#[derive(Clone, Copy)]
struct Raw {
    first: Seg,
    rest: *const libc::iovec,
    rest_count: usize,
    len: usize,
}

impl Raw {
    const EMPTY: Raw = Raw {
        first: Seg::EMPTY,
        rest: NonNull::<libc::iovec>::dangling().as_ptr(),
        rest_count: 0,
        len: 0,
    };

    fn single(base: *mut u8, len: usize) -> Raw {
        Raw {
            first: Seg { base, len },
            rest: NonNull::<libc::iovec>::dangling().as_ptr(),
            rest_count: 0,
            len,
        }
    }

    /// A view of a whole array of `count` iovecs at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` points at `count` readable iovecs (dangling when `count ==
    /// 0`), each describing memory valid for the view's lifetime.
    unsafe fn from_array(ptr: *const libc::iovec, count: usize) -> Raw {
        if count == 0 {
            return Raw::EMPTY;
        }
        // SAFETY: `count > 0` iovecs are readable at `ptr` (caller).
        let first = unsafe { *ptr };
        let mut len = 0usize;
        for i in 0..count {
            // SAFETY: `i < count`, readable (caller).
            let v = unsafe { *ptr.add(i) };
            len = len
                .checked_add(v.iov_len)
                .expect("an I/O vector longer than usize::MAX bytes");
        }
        Raw {
            first: Seg {
                base: first.iov_base.cast(),
                len: first.iov_len,
            },
            // SAFETY: one past the first of `count >= 1` elements.
            rest: unsafe { ptr.add(1) },
            rest_count: count - 1,
            len,
        }
    }

    /// Segment `i` of the view (0 is `first`), uncut at its end.
    fn seg(&self, i: usize) -> Seg {
        if i == 0 {
            return self.first;
        }
        debug_assert!(i <= self.rest_count);
        // SAFETY: `i - 1 < rest_count`, so the iovec is readable
        // (invariant of `Raw`).
        let v = unsafe { *self.rest.add(i - 1) };
        Seg {
            base: v.iov_base.cast(),
            len: v.iov_len,
        }
    }

    /// The view of bytes `start..start + len` of this one.
    ///
    /// # Panics
    ///
    /// If the range does not lie inside the view.
    #[track_caller]
    fn slice(&self, start: usize, len: usize) -> Raw {
        let in_range = start.checked_add(len).is_some_and(|end| end <= self.len);
        assert!(
            in_range,
            "range {start}+{len} out of bounds of an I/O vector of {} bytes",
            self.len
        );
        if len == 0 {
            return Raw::EMPTY;
        }
        let mut skip = start;
        let mut i = 0;
        loop {
            // The segments hold at least `self.len > start` bytes, so this
            // ends at a segment with `skip < seg.len` before `rest_count`.
            let s = self.seg(i);
            if skip < s.len {
                return Raw {
                    first: Seg {
                        // SAFETY: `skip < s.len`: inside the segment.
                        base: unsafe { s.base.add(skip) },
                        len: s.len - skip,
                    },
                    // SAFETY: `i <= rest_count`: in bounds or one past
                    // the end of the borrowed array.
                    rest: unsafe { self.rest.add(i) },
                    rest_count: self.rest_count - i,
                    len,
                };
            }
            skip -= s.len;
            i += 1;
        }
    }

    /// The non-empty segments of the view, cut to its length.
    fn segments(&self) -> RawSegments {
        RawSegments {
            raw: *self,
            next: 0,
            remaining: self.len,
        }
    }
}

/// Iterator over a view's non-empty segments, cut to the view's length.
#[derive(Clone)]
struct RawSegments {
    raw: Raw,
    next: usize,
    remaining: usize,
}

impl Iterator for RawSegments {
    type Item = Seg;

    fn next(&mut self) -> Option<Seg> {
        while self.remaining > 0 && self.next <= self.raw.rest_count {
            let s = self.raw.seg(self.next);
            self.next += 1;
            let n = s.len.min(self.remaining);
            if n > 0 {
                self.remaining -= n;
                return Some(Seg {
                    base: s.base,
                    len: n,
                });
            }
        }
        None
    }
}

/// The data a vectored write takes from: a list of memory regions read
/// in order, like `&[u8]` in pieces (QEMU's `QEMUIOVector`).
///
/// It borrows an array of [`IoSlice`]s (ABI-compatible with `struct
/// iovec`, so `pwritev(2)` and io_uring take them as they are) and covers
/// a byte range of it. `Copy`, like `&[u8]`; cutting it
/// ([`slice`](Self::slice), [`split_at`](Self::split_at)) copies nothing.
///
/// # Examples
///
/// ```
/// use std::io::IoSlice;
/// use blockgraph::IoVec;
///
/// let (a, b) = (*b"hello, ", *b"world");
/// let segs = [IoSlice::new(&a), IoSlice::new(&b)];
/// let iov = IoVec::new(&segs);
/// assert_eq!(iov.len(), 12);
/// assert_eq!(iov.slice(5, 4).to_vec(), b", wo");
/// assert_eq!(iov.segments().count(), 2);
/// let (head, tail) = iov.split_at(7);
/// assert_eq!((head.to_vec(), tail.as_contiguous()), (b"hello, ".to_vec(), Some(&b"world"[..])));
/// ```
#[derive(Clone, Copy)]
pub struct IoVec<'a> {
    raw: Raw,
    _data: PhantomData<&'a [u8]>,
}

// SAFETY: an `IoVec` only reads the memory it borrows, like the `&'a [u8]`
// (`Send + Sync`) it stands for, and reads its `iovec` array, which it
// borrows shared for `'a` as `&'a [IoSlice]` (`Send + Sync`).
unsafe impl Send for IoVec<'_> {}
// SAFETY: as for `Send`: shared access only.
unsafe impl Sync for IoVec<'_> {}

impl<'a> IoVec<'a> {
    /// The view of the whole of `segs`, in order.
    ///
    /// # Panics
    ///
    /// If the segments hold more than `usize::MAX` bytes together (only
    /// possible when they overlap).
    pub fn new(segs: &'a [IoSlice<'_>]) -> Self {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` (asserted
        // above); the array and each region it describes are borrowed
        // shared for `'a` (the regions for longer).
        let raw = unsafe { Raw::from_array(segs.as_ptr().cast(), segs.len()) };
        IoVec {
            raw,
            _data: PhantomData,
        }
    }

    /// A vector of no bytes.
    pub fn empty() -> Self {
        IoVec {
            raw: Raw::EMPTY,
            _data: PhantomData,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.raw.len
    }

    /// Whether it covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }

    /// Bytes `start..start + len`, without copying.
    ///
    /// # Panics
    ///
    /// If the range does not lie inside the vector (as slice indexing).
    #[track_caller]
    pub fn slice(&self, start: usize, len: usize) -> IoVec<'a> {
        IoVec {
            raw: self.raw.slice(start, len),
            _data: PhantomData,
        }
    }

    /// The bytes before `mid` and those from `mid` on.
    ///
    /// # Panics
    ///
    /// If `mid > self.len()`.
    #[track_caller]
    pub fn split_at(&self, mid: usize) -> (IoVec<'a>, IoVec<'a>) {
        assert!(
            mid <= self.len(),
            "split at {mid} past the end ({})",
            self.len()
        );
        (self.slice(0, mid), self.slice(mid, self.len() - mid))
    }

    /// Its non-empty segments, in order, cut to the vector's range.
    pub fn segments(&self) -> Segments<'a> {
        Segments {
            inner: self.raw.segments(),
            _data: PhantomData,
        }
    }

    /// How many non-empty segments it has.
    pub fn segment_count(&self) -> usize {
        self.raw.segments().count()
    }

    /// Its bytes as one slice, if they lie in one segment (or there are
    /// none).
    pub fn as_contiguous(&self) -> Option<&'a [u8]> {
        let mut segs = self.segments();
        match (segs.next(), segs.next()) {
            (None, _) => Some(&[]),
            (Some(s), None) => Some(s),
            _ => None,
        }
    }

    /// Copies its bytes to `dst`.
    ///
    /// # Panics
    ///
    /// If `dst.len() != self.len()`.
    #[track_caller]
    pub fn copy_to_slice(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len(), "copy_to_slice: lengths differ");
        let mut at = 0;
        for s in self.segments() {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
    }

    /// Its bytes in a new `Vec`.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len()];
        self.copy_to_slice(&mut v);
        v
    }

    /// Its segments as an array for `pwritev(2)` or io_uring's
    /// `IORING_OP_WRITEV` (a new array: the view may start or end inside a
    /// segment of the one it borrows).
    pub fn to_io_slices(&self) -> Vec<IoSlice<'a>> {
        self.segments().map(IoSlice::new).collect()
    }
}

impl<'a> From<&'a [u8]> for IoVec<'a> {
    fn from(buf: &'a [u8]) -> Self {
        IoVec {
            raw: Raw::single(buf.as_ptr().cast_mut(), buf.len()),
            _data: PhantomData,
        }
    }
}

impl<'a> From<&'a [IoSlice<'_>]> for IoVec<'a> {
    fn from(segs: &'a [IoSlice<'_>]) -> Self {
        IoVec::new(segs)
    }
}

impl Default for IoVec<'_> {
    fn default() -> Self {
        IoVec::empty()
    }
}

impl fmt::Debug for IoVec<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoVec")
            .field("len", &self.len())
            .field("segments", &self.segment_count())
            .finish()
    }
}

/// The memory a vectored read fills: a list of memory regions written in
/// order, like `&mut [u8]` in pieces (QEMU's `QEMUIOVector`).
///
/// It borrows an array of [`IoSliceMut`]s (ABI-compatible with `struct
/// iovec`, for `preadv(2)` and io_uring) uniquely and covers a byte range
/// of it. Cutting it copies nothing: [`slice_mut`](Self::slice_mut) and
/// [`reborrow`](Self::reborrow) lend a part for a shorter time (a driver
/// passing each piece of a request down in turn), while
/// [`split_at`](Self::split_at) and [`into_slice`](Self::into_slice)
/// consume the view and keep its lifetime. Views made from one another
/// never overlap while both are usable: the borrow checker sees to it as
/// it does for `&mut [u8]`.
///
/// # Examples
///
/// ```
/// use std::io::IoSliceMut;
/// use blockgraph::IoVecMut;
///
/// let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
/// let mut segs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
/// let mut iov = IoVecMut::new(&mut segs);
/// iov.copy_from_slice(b"abcdefgh");
/// iov.slice_mut(2, 2).fill(b'-'); // across the two segments
/// let (mut head, _tail) = iov.split_at(1);
/// head.fill(b'A');
/// assert_eq!((&a, &b), (b"Ab-", b"-efgh"));
/// ```
pub struct IoVecMut<'a> {
    raw: Raw,
    _data: PhantomData<&'a mut [u8]>,
}

// SAFETY: an `IoVecMut` stands for the `&'a mut [u8]`s (`Send + Sync`) it
// was made from: no other view of the same bytes is usable while it is, and
// its `iovec` array is only ever read, never written.
unsafe impl Send for IoVecMut<'_> {}
// SAFETY: `&IoVecMut` gives only shared access to the bytes (`segments`,
// `copy_to_slice`), like `&&mut [u8]`.
unsafe impl Sync for IoVecMut<'_> {}

impl<'a> IoVecMut<'a> {
    /// The view of the whole of `segs`, in order.
    pub fn new(segs: &'a mut [IoSliceMut<'_>]) -> Self {
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` (asserted
        // above). The array is borrowed uniquely for `'a` and only read
        // through this pointer, so nothing changes an entry meanwhile; each
        // entry was made from a `&mut [u8]` that lives at least as long
        // (`IoSliceMut<'_>` outlives `'a`) and that nothing else can reach
        // while the array is borrowed, so the regions are disjoint and
        // writable through the entries' pointers. Their lengths add up to
        // at most `isize::MAX` (disjoint allocations), so no overflow.
        let raw = unsafe { Raw::from_array(segs.as_mut_ptr().cast_const().cast(), segs.len()) };
        IoVecMut {
            raw,
            _data: PhantomData,
        }
    }

    /// A vector of no bytes.
    pub fn empty() -> Self {
        IoVecMut {
            raw: Raw::EMPTY,
            _data: PhantomData,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.raw.len
    }

    /// Whether it covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }

    /// The same bytes, lent for a shorter time (as `&mut *buf`).
    pub fn reborrow(&mut self) -> IoVecMut<'_> {
        IoVecMut {
            raw: self.raw,
            _data: PhantomData,
        }
    }

    /// Bytes `start..start + len`, lent without copying.
    ///
    /// # Panics
    ///
    /// If the range does not lie inside the vector (as slice indexing).
    #[track_caller]
    pub fn slice_mut(&mut self, start: usize, len: usize) -> IoVecMut<'_> {
        IoVecMut {
            raw: self.raw.slice(start, len),
            _data: PhantomData,
        }
    }

    /// Bytes `start..start + len`, for the rest of `'a`.
    ///
    /// # Panics
    ///
    /// If the range does not lie inside the vector.
    #[track_caller]
    pub fn into_slice(self, start: usize, len: usize) -> IoVecMut<'a> {
        IoVecMut {
            raw: self.raw.slice(start, len),
            _data: PhantomData,
        }
    }

    /// The bytes before `mid` and those from `mid` on, as two views that
    /// can be used at the same time.
    ///
    /// # Panics
    ///
    /// If `mid > self.len()`.
    #[track_caller]
    pub fn split_at(self, mid: usize) -> (IoVecMut<'a>, IoVecMut<'a>) {
        assert!(
            mid <= self.len(),
            "split at {mid} past the end ({})",
            self.len()
        );
        let rest = self.len() - mid;
        // Disjoint byte ranges of `self`, which is consumed.
        (
            IoVecMut {
                raw: self.raw.slice(0, mid),
                _data: PhantomData,
            },
            IoVecMut {
                raw: self.raw.slice(mid, rest),
                _data: PhantomData,
            },
        )
    }

    /// A read-only view of the same bytes, for as long as it is borrowed.
    pub fn as_io_vec(&self) -> IoVec<'_> {
        IoVec {
            raw: self.raw,
            _data: PhantomData,
        }
    }

    /// Its non-empty segments, in order, cut to the vector's range.
    pub fn segments(&self) -> Segments<'_> {
        self.as_io_vec().segments()
    }

    /// Its non-empty segments, writable, in order.
    pub fn segments_mut(&mut self) -> SegmentsMut<'_> {
        SegmentsMut {
            inner: self.raw.segments(),
            _data: PhantomData,
        }
    }

    /// How many non-empty segments it has.
    pub fn segment_count(&self) -> usize {
        self.raw.segments().count()
    }

    /// Its bytes as one slice for the rest of `'a`, if they lie in one
    /// segment (or there are none); otherwise the vector back.
    pub fn into_contiguous(self) -> Result<&'a mut [u8], IoVecMut<'a>> {
        let mut segs = self.raw.segments();
        match (segs.next(), segs.next()) {
            (None, _) => Ok(&mut []),
            // SAFETY: the view's only bytes, uniquely borrowed for `'a`
            // (see `new`), and `self` is consumed.
            (Some(s), None) => Ok(unsafe { std::slice::from_raw_parts_mut(s.base, s.len) }),
            _ => Err(self),
        }
    }

    /// Its bytes as one slice, lent, if they lie in one segment (or there
    /// are none).
    pub fn as_contiguous_mut(&mut self) -> Option<&mut [u8]> {
        self.reborrow().into_contiguous().ok()
    }

    /// Copies `src` into it.
    ///
    /// # Panics
    ///
    /// If `src.len() != self.len()`.
    #[track_caller]
    pub fn copy_from_slice(&mut self, src: &[u8]) {
        assert_eq!(src.len(), self.len(), "copy_from_slice: lengths differ");
        let mut at = 0;
        for s in self.segments_mut() {
            let n = s.len();
            s.copy_from_slice(&src[at..at + n]);
            at += n;
        }
    }

    /// Copies its bytes to `dst`.
    ///
    /// # Panics
    ///
    /// If `dst.len() != self.len()`.
    #[track_caller]
    pub fn copy_to_slice(&self, dst: &mut [u8]) {
        self.as_io_vec().copy_to_slice(dst)
    }

    /// Sets every byte to `byte`.
    pub fn fill(&mut self, byte: u8) {
        for s in self.segments_mut() {
            s.fill(byte);
        }
    }

    /// Its bytes in a new `Vec`.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_io_vec().to_vec()
    }

    /// Its segments as an array for `preadv(2)` or io_uring's
    /// `IORING_OP_READV` (a new array: the view may start or end inside a
    /// segment of the one it borrows). The memory stays lent for as long
    /// as the array lives.
    pub fn to_io_slices_mut(&mut self) -> Vec<IoSliceMut<'_>> {
        self.segments_mut().map(IoSliceMut::new).collect()
    }
}

impl<'a> From<&'a mut [u8]> for IoVecMut<'a> {
    fn from(buf: &'a mut [u8]) -> Self {
        IoVecMut {
            raw: Raw::single(buf.as_mut_ptr(), buf.len()),
            _data: PhantomData,
        }
    }
}

impl<'a> From<&'a mut [IoSliceMut<'_>]> for IoVecMut<'a> {
    fn from(segs: &'a mut [IoSliceMut<'_>]) -> Self {
        IoVecMut::new(segs)
    }
}

impl Default for IoVecMut<'_> {
    fn default() -> Self {
        IoVecMut::empty()
    }
}

impl fmt::Debug for IoVecMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoVecMut")
            .field("len", &self.len())
            .field("segments", &self.segment_count())
            .finish()
    }
}

/// The segments of an [`IoVec`] (or of a borrowed [`IoVecMut`]), from
/// [`IoVec::segments`].
#[derive(Clone)]
pub struct Segments<'a> {
    inner: RawSegments,
    _data: PhantomData<&'a [u8]>,
}

// SAFETY: yields `&'a [u8]`s only, as an iterator over `&'a [u8]`s would.
unsafe impl Send for Segments<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for Segments<'_> {}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // SAFETY: a region of the view, readable for `'a` (the view's
        // borrow, shared: `IoVec` or `&IoVecMut`).
        self.inner
            .next()
            .map(|s| unsafe { std::slice::from_raw_parts(s.base.cast_const(), s.len) })
    }
}

impl fmt::Debug for Segments<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segments").finish_non_exhaustive()
    }
}

/// The writable segments of an [`IoVecMut`], from
/// [`IoVecMut::segments_mut`].
pub struct SegmentsMut<'a> {
    inner: RawSegments,
    _data: PhantomData<&'a mut [u8]>,
}

// SAFETY: yields disjoint `&'a mut [u8]`s, as `IterMut` over them would.
unsafe impl Send for SegmentsMut<'_> {}
// SAFETY: `&SegmentsMut` gives access to nothing.
unsafe impl Sync for SegmentsMut<'_> {}

impl<'a> Iterator for SegmentsMut<'a> {
    type Item = &'a mut [u8];

    fn next(&mut self) -> Option<&'a mut [u8]> {
        // SAFETY: each segment is yielded once and the segments are
        // disjoint regions of the view, which is borrowed uniquely for
        // `'a` (`&'a mut IoVecMut`).
        self.inner
            .next()
            .map(|s| unsafe { std::slice::from_raw_parts_mut(s.base, s.len) })
    }
}

impl fmt::Debug for SegmentsMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentsMut").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cross_segments_and_skip_empty_ones() {
        let (mut a, mut b, mut c) = ([1u8; 3], [0u8; 0], [2u8; 4]);
        let mut segs = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        let mut iov = IoVecMut::new(&mut segs);
        assert_eq!(iov.len(), 7);
        assert_eq!(iov.segment_count(), 2);
        assert_eq!(iov.slice_mut(2, 3).to_vec(), [1, 2, 2]);
        assert_eq!(iov.slice_mut(3, 4).segment_count(), 1);
        assert_eq!(iov.slice_mut(7, 0).len(), 0);
        let (x, y) = iov.split_at(3);
        assert!(x.into_contiguous().is_ok());
        assert_eq!(y.into_contiguous().map(|s| s.len()).ok(), Some(4));
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn slice_past_the_end_panics() {
        let buf = [0u8; 4];
        let _ = IoVec::from(&buf[..]).slice(3, 2);
    }

    #[test]
    fn overflowing_range_panics_instead_of_wrapping() {
        let buf = [0u8; 4];
        let r = std::panic::catch_unwind(|| IoVec::from(&buf[..]).slice(usize::MAX, 2));
        assert!(r.is_err());
    }
}
