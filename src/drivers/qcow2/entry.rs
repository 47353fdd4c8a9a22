//! Decoding (and validating) L1, L2 and refcount table entries.

use crate::types::Result;

use super::geometry::Geo;
use super::header::invalid;

/// Bit 63 of L1/L2 entries: the refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries: reads as zeroes (version 3).
pub(crate) const ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (1-8 and 56-62; bit 0 is reserved too).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry (0-8).
const RT_RESERVED: u64 = 0x1ff;

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Not stored here: backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster, if any.
    Zero { host: Option<u64>, copied: bool },
    /// Stored at `host`.
    Data { host: u64, copied: bool },
    /// Deflate-compressed: `bytes` bytes at `offset` (not aligned).
    Compressed { offset: u64, bytes: u64 },
}

impl Entry {
    /// The host clusters this entry holds a reference to, as
    /// (first cluster index, count).
    pub(crate) fn host_clusters(&self, geo: &Geo) -> Option<(u64, u64)> {
        match *self {
            Entry::Unallocated | Entry::Zero { host: None, .. } => None,
            Entry::Zero { host: Some(h), .. } | Entry::Data { host: h, .. } => {
                Some((h >> geo.cluster_bits, 1))
            }
            Entry::Compressed { offset, bytes } => {
                // Counted like QEMU does: every cluster the whole 512-byte
                // sectors touch.
                let start = offset & !511;
                let end = (offset + bytes).div_ceil(512) * 512;
                let first = start >> geo.cluster_bits;
                let last = (end - 1) >> geo.cluster_bits;
                Some((first, last - first + 1))
            }
        }
    }
}

/// The L2 table offset in an L1 entry (`None`: no table). An entry with
/// only the copied flag has no table (as QEMU reads it); `check` reports
/// it, see [`l1_copied_without_table`].
pub(crate) fn decode_l1(geo: &Geo, raw: u64, file_len: u64) -> Result<Option<u64>> {
    if raw & L1_RESERVED != 0 {
        return Err(invalid(format!(
            "L1 entry {raw:#018x} has reserved bits set"
        )));
    }
    let off = raw & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off & (geo.cs - 1) != 0 {
        return Err(invalid(format!(
            "L2 table offset {off:#x} is not cluster aligned"
        )));
    }
    if off.checked_add(geo.cs).is_none_or(|e| e > file_len) {
        return Err(invalid(format!(
            "L2 table at {off:#x} lies outside the {file_len}-byte file"
        )));
    }
    Ok(Some(off))
}

/// An L1 entry with the copied flag but no L2 table offset: malformed (the
/// flag describes a table's refcount). QEMU's check walks it as a table at
/// offset 0 (the header) and reports corruption; so do we, without the walk.
pub(crate) fn l1_copied_without_table(raw: u64) -> bool {
    raw & COPIED != 0 && raw & OFFSET_MASK == 0
}

/// Decodes one L2 entry.
pub(crate) fn decode_l2(geo: &Geo, raw: u64) -> Result<Entry> {
    if raw & COMPRESSED != 0 {
        if raw & COPIED != 0 {
            return Err(invalid(format!(
                "compressed L2 entry {raw:#018x} has the copied flag"
            )));
        }
        let x = 62 - (geo.cluster_bits - 8);
        let offset = raw & ((1u64 << x) - 1);
        if offset >= 1 << 56 {
            return Err(invalid(format!(
                "compressed cluster offset {offset:#x} is too large"
            )));
        }
        let nsec = ((raw >> x) & ((1u64 << (geo.cluster_bits - 8)) - 1)) + 1;
        let bytes = nsec * 512 - (offset & 511);
        return Ok(Entry::Compressed { offset, bytes });
    }
    if raw & L2_RESERVED != 0 {
        return Err(invalid(format!(
            "L2 entry {raw:#018x} has reserved bits set"
        )));
    }
    let copied = raw & COPIED != 0;
    let host = raw & OFFSET_MASK;
    if host & (geo.cs - 1) != 0 {
        return Err(invalid(format!(
            "data cluster offset {host:#x} is not cluster aligned"
        )));
    }
    if raw & ZERO != 0 {
        if geo.version < 3 {
            return Err(invalid("zero flag set in a version 2 image"));
        }
        return Ok(Entry::Zero {
            host: (host != 0).then_some(host),
            copied,
        });
    }
    if host == 0 {
        // The copied flag on an entry without a cluster means nothing
        // (images with an external data file, where it would, are refused
        // at open): unallocated, as QEMU reads it.
        return Ok(Entry::Unallocated);
    }
    Ok(Entry::Data { host, copied })
}

/// The refcount block offset in a refcount table entry (`None`: no block).
pub(crate) fn decode_rt(geo: &Geo, raw: u64, file_len: u64) -> Result<Option<u64>> {
    if raw & RT_RESERVED != 0 {
        return Err(invalid(format!(
            "refcount table entry {raw:#018x} has reserved bits set"
        )));
    }
    if raw == 0 {
        return Ok(None);
    }
    if raw & (geo.cs - 1) != 0 {
        return Err(invalid(format!(
            "refcount block offset {raw:#x} is not cluster aligned"
        )));
    }
    if raw.checked_add(geo.cs).is_none_or(|e| e > file_len) {
        return Err(invalid(format!(
            "refcount block at {raw:#x} lies outside the {file_len}-byte file"
        )));
    }
    Ok(Some(raw))
}

/// Entry `i` of a refcount block with `1 << order`-bit entries.
pub(crate) fn rc_get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            let shift = (i % per_byte) * bits;
            u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * i..4 * i + 4].try_into().expect("4 bytes"),
        )),
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().expect("8 bytes")),
    }
}

/// Sets entry `i`; returns the byte range that changed.
pub(crate) fn rc_set(block: &mut [u8], order: u32, i: usize, v: u64) -> (usize, usize) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let mask = ((1u16 << bits) - 1) as u8;
            let shift = (i % per_byte) * bits;
            let b = &mut block[i / per_byte];
            *b = (*b & !(mask << shift)) | (((v as u8) & mask) << shift);
            (i / per_byte, i / per_byte + 1)
        }
        3 => {
            block[i] = v as u8;
            (i, i + 1)
        }
        4 => {
            block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes());
            (2 * i, 2 * i + 2)
        }
        5 => {
            block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes());
            (4 * i, 4 * i + 4)
        }
        _ => {
            block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
            (8 * i, 8 * i + 8)
        }
    }
}

/// Largest refcount an entry of this order can hold.
pub(crate) fn rc_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}
