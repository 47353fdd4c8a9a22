//! [`IoBuf`]: a request buffer that travels with the request.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`]: a page, enough for any `O_DIRECT` device.
pub const IO_BUF_ALIGN: usize = 4096;

/// A request buffer that the request owns: page-aligned heap memory that
/// is *moved* into [`BlockBackend::read_buf`](crate::BlockBackend::read_buf)
/// and [`write_buf`](crate::BlockBackend::write_buf) and comes back with
/// the result.
///
/// A borrowed buffer (`&mut [u8]`, the argument of
/// [`read`](crate::BlockBackend::read)) can only be lent to the kernel for
/// as long as the request's future lives, and safe code may drop or leak
/// that future while the kernel still writes into the memory; so the file
/// driver copies borrowed buffers through memory its ring owns. An
/// `IoBuf` does not have that problem: whoever holds it owns it, and while
/// an operation is in the kernel the operation holds it (a request
/// dropped half-way leaves the buffer to the operation, which frees it at
/// its completion). The file driver's io_uring path hands an `IoBuf`'s
/// memory to the kernel as it is, with no copy, where the request fits
/// the file's alignment (QEMU passes guest memory down the same way);
/// every other driver and path gets it as a plain slice.
///
/// The memory is zeroed when allocated, so every byte is initialised.
///
/// # Examples
///
/// ```
/// use blockgraph::{drivers::MemoryDriver, BackendOptions, IoBuf, MainLoop};
///
/// let main = MainLoop::new()?;
/// let blk = main.run(|bql| bql.write(|w| {
///     let disk = w.add_node("disk", MemoryDriver::new(1 << 20), &[])?;
///     w.add_backend("vda", &disk, BackendOptions::default())
/// }))?;
/// let io = main.new_io_thread("io0")?;
/// let read = io.spawn(move |mut cx| async move {
///     let mut buf = IoBuf::zeroed(4096);
///     buf.fill(0xab);
///     // Moved in, handed back: reuse it for the next request.
///     let buf = blk.write_buf(&mut cx, 0, buf).await?;
///     blk.read_buf(&mut cx, 4096, buf).await
/// }).join()?;
/// assert!(read.iter().all(|&b| b == 0)); // 4096.. was never written
/// # drop(io); main.shutdown();
/// # Ok::<(), blockgraph::Error>(())
/// ```
pub struct IoBuf {
    ptr: NonNull<u8>,
    /// Bytes in use: what requests read and write.
    len: usize,
    /// Bytes allocated (all initialised); `len <= cap`.
    cap: usize,
}

// SAFETY: `IoBuf` owns its allocation exclusively (like `Box<[u8]>`); the
// raw pointer is not shared with anyone while an `IoBuf` exists outside an
// operation, and shared access (`&IoBuf`) only reads.
unsafe impl Send for IoBuf {}
// SAFETY: see `Send`: `&IoBuf` gives only `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes, aligned to [`IO_BUF_ALIGN`].
    ///
    /// # Panics
    ///
    /// When `len` is too large for any allocation (more than `isize::MAX`
    /// less a page); when the allocator has no memory the process aborts,
    /// as for `vec![0; len]`.
    pub fn zeroed(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf {
                ptr: Self::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, cap: len }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes allocated: the most [`set_len`](Self::set_len) can give.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Makes the buffer `len` bytes long within its allocation, so one
    /// buffer serves requests of several sizes (a request covers the whole
    /// buffer). Bytes that come back into use hold what they held before
    /// (zeroes if never written).
    ///
    /// # Panics
    ///
    /// If `len` is more than [`capacity`](Self::capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len({len}) past its capacity ({})",
            self.cap
        );
        // INVARIANT: every byte below `cap` is initialised (zeroed at
        // allocation), so any `len <= cap` keeps `deref` sound.
        self.len = len;
    }

    /// The first byte's address, for handing the memory to the kernel; it
    /// is aligned to [`IO_BUF_ALIGN`] (dangling but aligned when empty).
    #[cfg_attr(not(feature = "io-uring"), allow(dead_code))]
    pub(crate) fn as_non_null(&self) -> NonNull<u8> {
        self.ptr
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_BUF_ALIGN).expect("IoBuf too large")
    }

    fn dangling() -> NonNull<u8> {
        // An aligned address that is never dereferenced (length 0).
        NonNull::new(IO_BUF_ALIGN as *mut u8).expect("non-zero")
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.cap != 0 {
            // SAFETY: allocated by `alloc_zeroed` with this layout (the
            // capacity never changes) in `zeroed`, the only constructor of
            // a buffer with a non-zero capacity; freed once, here.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` initialised bytes (zeroed at allocation)
        // owned by this buffer, or an aligned dangling pointer with length
        // 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> IoBuf {
        IoBuf::copy_from(self)
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

impl From<&[u8]> for IoBuf {
    fn from(data: &[u8]) -> IoBuf {
        IoBuf::copy_from(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_owned() {
        for len in [0, 1, 511, 4096, 65536 + 3] {
            let mut b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_non_null().as_ptr() as usize % IO_BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(7);
            let c = b.clone();
            assert_eq!(&*c, &*b);
            if len > 0 {
                assert_ne!(c.as_non_null(), b.as_non_null());
            }
        }
        assert_eq!(&*IoBuf::from(&b"abc"[..]), b"abc");
    }

    #[test]
    fn set_len_stays_within_the_allocation() {
        let mut b = IoBuf::zeroed(8192);
        b[100] = 9;
        b.set_len(64);
        assert_eq!((b.len(), b.capacity()), (64, 8192));
        b.set_len(8192);
        assert_eq!(b[100], 9, "bytes come back as they were");
        let r = std::panic::catch_unwind(move || b.set_len(8193));
        assert!(r.is_err(), "past the capacity panics");
        let mut e = IoBuf::zeroed(0);
        e.set_len(0);
        assert!(e.is_empty());
    }

    static_assertions::assert_impl_all!(IoBuf: Send, Sync);
}
