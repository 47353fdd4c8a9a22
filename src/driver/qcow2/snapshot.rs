//! The internal snapshot table: read (never written) so that `check` can
//! account for every snapshot's L1 and L2 tables and data clusters.

use crate::error::Result;
use crate::proof::RequestRef;

use super::header::{be32, be64, invalid};
use super::read_file;

/// Fixed part of a snapshot table entry.
const ENTRY_LEN: u64 = 40;
/// QEMU's limits: extra data per entry, the whole table.
const MAX_EXTRA_DATA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 1024 * 65536;

/// What `check` needs of one snapshot.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotL1 {
    pub id: String,
    pub l1_offset: u64,
    pub l1_size: u32,
}

/// Reads the `nb` entries of the snapshot table at `offset`; returns them
/// and the table's size in bytes (QEMU's rules: bounded extra data, L1
/// offsets aligned, L1 tables no larger than `max_l1_bytes`, the table no
/// larger than 64 MiB and inside the file).
pub(crate) async fn read_table(
    file: RequestRef<'_>,
    align: u64,
    file_len: u64,
    cluster_size: u64,
    offset: u64,
    nb: u32,
    max_l1_bytes: u64,
) -> Result<(Vec<SnapshotL1>, u64)> {
    let mut out = Vec::new();
    let mut pos = offset;
    for i in 0..nb {
        if pos + ENTRY_LEN > file_len {
            return Err(invalid(format!(
                "snapshot table entry {i} lies past the end of the file"
            )));
        }
        let e = read_file(file, align, file_len, pos, ENTRY_LEN as usize).await?;
        let l1_offset = be64(&e, 0);
        let l1_size = be32(&e, 8);
        let id_len = u16::from_be_bytes([e[12], e[13]]);
        let name_len = u16::from_be_bytes([e[14], e[15]]);
        let extra = be32(&e, 36);
        if extra > MAX_EXTRA_DATA {
            return Err(invalid(format!(
                "snapshot {i}: {extra} bytes of extra data (at most {MAX_EXTRA_DATA})"
            )));
        }
        let id_at = pos + ENTRY_LEN + u64::from(extra);
        let id = read_file(file, align, file_len, id_at, id_len as usize).await?;
        let id = String::from_utf8_lossy(&id).into_owned();
        let len = (ENTRY_LEN + u64::from(extra) + u64::from(id_len) + u64::from(name_len))
            .div_ceil(8)
            * 8;
        pos += len;
        if pos - offset > MAX_TABLE_BYTES || pos > file_len {
            return Err(invalid(
                "the snapshot table is too large or runs past the end of the file",
            ));
        }
        if l1_offset % cluster_size != 0 {
            return Err(invalid(format!(
                "snapshot '{id}': L1 table offset {l1_offset:#x} is not cluster aligned"
            )));
        }
        if u64::from(l1_size) * 8 > max_l1_bytes {
            return Err(invalid(format!(
                "snapshot '{id}': L1 table of {l1_size} entries is too large"
            )));
        }
        out.push(SnapshotL1 {
            id,
            l1_offset,
            l1_size,
        });
    }
    Ok((out, pos - offset))
}
