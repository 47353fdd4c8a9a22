//! Reading the image file: requests rounded out to the file's alignment,
//! zeroes past its end (QEMU's `bdrv_pread` on the file child, as the
//! qcow2 code uses it).

use crate::graph::proof::RequestRef;
use crate::types::Result;

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
    let avail = file_len.saturating_sub(host).min(buf.len() as u64) as usize;
    if avail > 0 {
        file.read(host, &mut buf[..avail]).await?;
    }
    buf[avail..].fill(0);
    Ok(())
}
