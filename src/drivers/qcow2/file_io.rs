//! Reading the image file: requests rounded out to the file's alignment,
//! zeroes past its end (QEMU's `bdrv_pread` on the file child, as the
//! qcow2 code uses it).

use crate::graph::proof::RequestRef;
use crate::types::{IoVecMut, Result};

/// Reads `len` bytes at `off` from the file, rounding the request out to
/// the file's alignment and reading zeroes past its end.
pub(super) async fn read_file(
    file: RequestRef<'_>,
    align: u64,
    file_len: u64,
    off: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let start = off / align * align;
    let end = (off + len as u64).div_ceil(align) * align;
    let avail_end = end.min(file_len.max(start));
    let mut buf = vec![0u8; (end - start) as usize];
    if avail_end > start {
        file.read(start, &mut buf[..(avail_end - start) as usize])
            .await?;
    }
    let skip = (off - start) as usize;
    buf.drain(..skip);
    buf.truncate(len);
    Ok(buf)
}

/// Reads guest data stored at `host`, zeroes past the end of the file.
pub(super) async fn read_data(
    file: RequestRef<'_>,
    file_len: u64,
    host: u64,
    buf: &mut [u8],
) -> Result<()> {
    read_data_v(file, file_len, host, IoVecMut::from(buf)).await
}

/// [`read_data`] into the regions of `iov`: the file reads straight into
/// them (its vectored read), past its end they are zeroed.
pub(super) async fn read_data_v(
    file: RequestRef<'_>,
    file_len: u64,
    host: u64,
    mut iov: IoVecMut<'_>,
) -> Result<()> {
    let len = iov.len();
    let avail = file_len.saturating_sub(host).min(len as u64) as usize;
    if avail > 0 {
        file.readv(host, iov.slice_mut(0, avail)).await?;
    }
    iov.slice_mut(avail, len - avail).fill(0);
    Ok(())
}
