//! The `raw` format driver: the guest sees its `File` child's bytes as they
//! are, optionally through an offset/size window.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::driver::{forward, require_child, Filter};
use crate::graph::driver::{IoFuture, ResizePermit};
use crate::graph::proof::{CallbackRef, NodeRequest, RequestRef};
use crate::types::BlockStatus;
use crate::types::{ChildRole, Perm, Permissions};
use crate::types::{Error, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

/// Passes requests to its [`ChildRole::File`] child, shifted by `offset`
/// and, with a `size`, confined to `[offset, offset + size)` of the child
/// (QEMU's `raw` with `offset=`/`size=`).
///
/// The window is checked against the child's length on the first request
/// after the node is opened or drained (graph changes happen under a
/// drain): a window reaching past the child's end fails that request with
/// [`Error::InvalidArgument`]. With a `size`, requests outside the window
/// fail with [`Error::OutOfRange`] against the window's size; without one,
/// the node is as long as the child minus `offset`, and writes past the end
/// go through (a file child grows), as with QEMU's raw.
///
/// ```
/// use blockgraph::drivers::RawDriver;
/// let raw = RawDriver::with_window(4096, Some(1 << 20))?;
/// assert_eq!((raw.offset(), raw.size()), (4096, Some(1 << 20)));
/// assert!(RawDriver::with_window(0, Some(0)).is_err());
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct RawDriver {
    offset: u64,
    size: Option<u64>,
    /// The window has been checked against the current child.
    checked: AtomicBool,
}

impl RawDriver {
    /// The whole child, unchanged.
    pub fn new() -> Self {
        Self::default()
    }

    /// The child's bytes from `offset`, `size` of them (`None`: up to the
    /// child's end).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a zero size or a window whose end
    /// overflows.
    pub fn with_window(offset: u64, size: Option<u64>) -> Result<Self> {
        if size == Some(0) {
            return Err(Error::InvalidArgument(
                "raw: the window size must be positive (leave it unset for the whole child)".into(),
            ));
        }
        if let Some(size) = size {
            if offset.checked_add(size).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "raw: window offset {offset} + size {size} overflows"
                )));
            }
        }
        Ok(RawDriver {
            offset,
            size,
            checked: AtomicBool::new(false),
        })
    }

    /// Parses `offset=N,size=N` options (sizes accept `k`, `M`, `G`, `T`
    /// suffixes, powers of 1024).
    pub fn from_options(options: &[(&str, &str)]) -> Result<Self> {
        let mut offset = 0;
        let mut size = None;
        for (key, value) in options {
            match *key {
                "offset" => offset = parse_size("raw", key, value)?,
                "size" => size = Some(parse_size("raw", key, value)?),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "raw: unknown option '{key}' (known: offset, size)"
                    )))
                }
            }
        }
        Self::with_window(offset, size)
    }

    /// Where the window starts in the child.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The window's size, if fixed.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The child and this node's length, checking the window.
    async fn window<'a>(&self, node: RequestRef<'a>) -> Result<(RequestRef<'a>, u64)> {
        let child = require_child(node, ChildRole::File)?;
        match self.size {
            Some(size) if self.checked.load(Ordering::Acquire) => Ok((child, size)),
            Some(size) => {
                let child_len = child.length().await?;
                if self.offset + size > child_len {
                    return Err(Error::InvalidArgument(format!(
                        "raw node '{}': window [{}, {}) reaches past the end of '{}' ({child_len} bytes)",
                        node.name(),
                        self.offset,
                        self.offset + size,
                        child.name()
                    )));
                }
                let align = u64::from(child.request_alignment().max(1));
                if self.offset % align != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "raw node '{}': window offset {} is not a multiple of '{}''s {align}-byte alignment",
                        node.name(),
                        self.offset,
                        child.name()
                    )));
                }
                self.checked.store(true, Ordering::Release);
                Ok((child, size))
            }
            None => {
                let child_len = child.length().await?;
                let len = child_len.checked_sub(self.offset).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "raw node '{}': offset {} is past the end of '{}' ({child_len} bytes)",
                        node.name(),
                        self.offset,
                        child.name()
                    ))
                })?;
                Ok((child, len))
            }
        }
    }

    /// No window: the node is its child, byte for byte.
    fn whole_child(&self) -> bool {
        self.size.is_none() && self.offset == 0
    }

    /// Hands a request of `len` bytes at `offset` to the child with
    /// `call(child, child_offset)`: the child's own future when there is no
    /// window (nothing to check or shift, no allocation of ours), else
    /// after [`map`](Self::map) checks and shifts it. What `read`, `write`
    /// and their vectored and owned-buffer forms share.
    #[inline]
    fn pass_on<'a, T: Send + 'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
        call: impl FnOnce(RequestRef<'a>, u64) -> NodeRequest<'a, T> + Send + 'a,
    ) -> IoFuture<'a, T> {
        if self.whole_child() {
            return forward::to_child(node, Self::CHILD, |child| call(child, offset));
        }
        self.pass_on_windowed(node, offset, len, call)
    }

    /// [`pass_on`](Self::pass_on) with a window: checked and shifted.
    /// Out of line, so that the call that only forwards stays short.
    #[inline(never)]
    fn pass_on_windowed<'a, T: Send + 'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
        call: impl FnOnce(RequestRef<'a>, u64) -> NodeRequest<'a, T> + Send + 'a,
    ) -> IoFuture<'a, T> {
        Box::pin(async move {
            let (child, at) = self.map(node, offset, len).await?;
            call(child, at).await
        })
    }

    /// The child and the child offset for a request of `len` bytes at
    /// `offset`, checked against the window.
    async fn map<'a>(
        &self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> Result<(RequestRef<'a>, u64)> {
        if self.whole_child() {
            // The whole child: nothing to check or shift.
            return Ok((require_child(node, ChildRole::File)?, offset));
        }
        let (child, size) = self.window(node).await?;
        let end = offset.checked_add(len);
        if self.size.is_some() && end.is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        let shifted = offset
            .checked_add(self.offset)
            .filter(|s| s.checked_add(len).is_some())
            .ok_or(Error::OutOfRange {
                offset,
                len,
                size: u64::MAX - self.offset,
            })?;
        Ok((child, shifted))
    }
}

/// Parses a byte count with an optional binary suffix (`512`, `64k`, `1M`,
/// `2G`, `1T`).
pub(crate) fn parse_size(driver: &str, key: &str, value: &str) -> Result<u64> {
    let bad = || {
        Error::InvalidArgument(format!(
            "{driver}: option '{key}': '{value}' is not a size (a number with an optional k/M/G/T suffix)"
        ))
    };
    let v = value.trim();
    let (digits, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(bad()),
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// On the driver kit, with its `File` child as the filtered one: alignment
/// and flushes are the file's; the rest shifts and checks the window (and
/// is the file's own, unchanged, without one).
impl Filter for RawDriver {
    const CHILD: ChildRole = ChildRole::File;

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn describe(&self) -> String {
        match (self.offset, self.size) {
            (0, None) => "raw".to_owned(),
            (off, None) => format!("raw, from offset {off}"),
            (off, Some(size)) => format!("raw, {size} bytes at offset {off}"),
        }
    }

    fn open(&self, node: CallbackRef<'_>) -> Result<()> {
        require_child(node, Self::CHILD)?;
        self.checked.store(false, Ordering::Release);
        Ok(())
    }

    /// Without a window, what its users take and share (QEMU's raw is a
    /// filter then). With one, nobody may resize the file either (the
    /// window was checked against its length; QEMU's raw with
    /// `offset`/`size` does the same), and a fixed `size` needs no resize
    /// permission of its own since [`truncate`](Filter::truncate)
    /// refuses.
    fn child_permissions(&self, role: ChildRole, users: Permissions) -> Permissions {
        if role != ChildRole::File || self.whole_child() {
            return users;
        }
        let take = if self.size.is_some() {
            users.take & !Perm::RESIZE
        } else {
            users.take
        };
        Permissions {
            take,
            share: users.share & !Perm::RESIZE,
        }
    }

    fn drained_begin(&self, _node: CallbackRef<'_>) {
        // The child may be replaced or resized while drained: check again.
        self.checked.store(false, Ordering::Release);
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { self.window(node).await.map(|(_, len)| len) })
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        let len = buf.len() as u64;
        self.pass_on(node, offset, len, move |child, at| child.read(at, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        let len = buf.len() as u64;
        self.pass_on(node, offset, len, move |child, at| child.write(at, buf))
    }

    /// Checked against the window and shifted like [`read`](Filter::read);
    /// the vector goes to the file as it is.
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        let len = iov.len() as u64;
        self.pass_on(node, offset, len, move |child, at| child.readv(at, iov))
    }

    /// Checked and shifted like [`write`](Filter::write).
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        let len = iov.len() as u64;
        self.pass_on(node, offset, len, move |child, at| child.writev(at, iov))
    }

    /// Checked and shifted like [`read`](Filter::read); the buffer goes to
    /// the file as it is.
    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        let len = buf.len() as u64;
        self.pass_on(node, offset, len, move |child, at| child.read_buf(at, buf))
    }

    /// Checked and shifted like [`write`](Filter::write).
    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        let len = buf.len() as u64;
        self.pass_on(node, offset, len, move |child, at| child.write_buf(at, buf))
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let (child, at) = self.map(node, offset, len).await?;
            child.write_zeroes(at, len).await
        })
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let (child, at) = self.map(node, offset, len).await?;
            child.discard(at, len).await
        })
    }

    /// Without a `size`, resizes the file to `offset + size` through the
    /// checked edge (QEMU's `raw_co_truncate`); with one, the window is
    /// fixed and the resize is refused.
    fn truncate<'a>(
        &'a self,
        node: RequestRef<'a>,
        size: u64,
        _permit: ResizePermit<'a>,
    ) -> IoFuture<'a, ()> {
        if self.size.is_some() {
            return Box::pin(std::future::ready(Err(Error::Unsupported {
                driver: "raw",
                operation: "resizing a node whose window has a fixed size",
            })));
        }
        match size.checked_add(self.offset) {
            Some(end) => forward::truncate(node, Self::CHILD, end),
            None => Box::pin(std::future::ready(Err(Error::InvalidArgument(format!(
                "raw: size {size} past window offset {} overflows",
                self.offset
            ))))),
        }
    }

    fn block_status<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, (BlockStatus, u64)> {
        Box::pin(async move {
            let len = match self.size {
                Some(size) => len.min(size.saturating_sub(offset)),
                None => len,
            };
            let (child, at) = self.map(node, offset, len).await?;
            child.block_status(at, len).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("t", "k", "512").unwrap(), 512);
        assert_eq!(parse_size("t", "k", "64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("t", "k", "3M").unwrap(), 3 << 20);
        assert_eq!(parse_size("t", "k", "2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("t", "k", "1T").unwrap(), 1 << 40);
        for bad in [
            "",
            "k",
            "1.5M",
            "-1",
            "1Q",
            "99999999999999999999",
            "16777216T",
        ] {
            let err = parse_size("raw", "size", bad).unwrap_err().to_string();
            assert!(err.contains("'size'"), "{bad}: {err}");
        }
    }
}
