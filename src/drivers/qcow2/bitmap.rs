//! Persistent dirty bitmaps (the bitmaps header extension): the directory
//! parsed with QEMU's rules, so that their clusters are accounted for and
//! kept and writes by us keep QEMU's `in_use` rules. Their bits are loaded
//! into, and stored from, the node's live dirty bitmaps by
//! `bitmap_store.rs` (DESIGN §15).

use crate::types::Result;

use super::header::{be32, be64, invalid, BitmapsExt};

/// One persistent dirty bitmap stored in the image, as listed in its
/// bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// The `in_use` flag: the bitmap may be inconsistent (its writer did
    /// not save it, or a program that does not track dirty regions, such as
    /// this one, wrote guest data).
    pub in_use: bool,
    /// The `auto` flag: QEMU enables the bitmap (tracks writes) on open.
    pub auto: bool,
}

/// A bitmap read from the image at open, waiting for `open` to add it to
/// the node.
#[derive(Debug, Clone)]
pub(crate) struct LoadedBitmap {
    pub name: String,
    pub granularity_bits: u32,
    pub enabled: bool,
    /// `None`: flagged in use (inconsistent).
    pub words: Option<Vec<u64>>,
}

/// Bitmap directory entry flag: the bitmap may be inconsistent.
pub(crate) const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap directory entry flag: enabled on open.
pub(crate) const FLAG_AUTO: u32 = 1 << 1;
const FLAGS_RESERVED: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// Bitmap type: dirty tracking (the only one defined).
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bounds on directory entries (QEMU's).
const MAX_TABLE_SIZE: u32 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: u16 = 1023;
/// Fixed part of a directory entry.
const ENTRY_LEN: usize = 24;

/// Bitmap table entries: reserved bits 1-8 and 56-63, the data cluster
/// offset, and bit 0 ("all ones", only without an offset).
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
pub(crate) const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;

/// One parsed directory entry.
#[derive(Debug, Clone)]
pub(crate) struct BitmapEntry {
    pub table_offset: u64,
    /// Entries (8 bytes each) in the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
    /// Where the entry starts in the directory.
    pub pos: usize,
}

/// The bitmap directory as read at open.
#[derive(Debug, Clone)]
pub(crate) struct BitmapDir {
    pub ext: BitmapsExt,
    /// The directory's clusters as on disk (at least `ext.directory_size`
    /// bytes).
    pub raw: Vec<u8>,
    pub entries: Vec<BitmapEntry>,
}

impl BitmapDir {
    /// Parses and validates the directory in `raw` (QEMU's rules: exactly
    /// `nb_bitmaps` entries filling `directory_size` bytes, no extra data,
    /// every entry within the limits QEMU accepts).
    pub(crate) fn parse(
        ext: BitmapsExt,
        raw: Vec<u8>,
        cluster_size: u64,
        virtual_size: u64,
    ) -> Result<BitmapDir> {
        let size = ext.directory_size as usize;
        let dir = &raw[..size];
        let mut entries = Vec::new();
        let mut pos = 0usize;
        while pos < size {
            if size - pos < ENTRY_LEN {
                return Err(invalid("broken bitmap directory"));
            }
            if entries.len() as u32 >= ext.nb_bitmaps {
                return Err(invalid(
                    "more bitmaps in the directory than the bitmaps extension says",
                ));
            }
            let e = &dir[pos..];
            let table_offset = be64(e, 0);
            let table_size = be32(e, 8);
            let flags = be32(e, 12);
            let ty = e[16];
            let granularity_bits = e[17];
            let name_size = u16::from_be_bytes([e[18], e[19]]);
            let extra = be32(e, 20);
            let len = (ENTRY_LEN as u64 + u64::from(name_size) + u64::from(extra)).div_ceil(8) * 8;
            if len > (size - pos) as u64 {
                return Err(invalid("broken bitmap directory"));
            }
            if extra != 0 {
                return Err(unsupported_extra());
            }
            let raw_name = &e[ENTRY_LEN..ENTRY_LEN + name_size as usize];
            let end = raw_name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(raw_name.len());
            let name = String::from_utf8_lossy(&raw_name[..end]).into_owned();
            let phys = u64::from(table_size) * cluster_size;
            let bad = table_size == 0
                || table_offset == 0
                || table_offset % cluster_size != 0
                || table_size > MAX_TABLE_SIZE
                || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits)
                || flags & FLAGS_RESERVED != 0
                || name_size > MAX_NAME_SIZE
                || ty != TYPE_DIRTY_TRACKING
                || phys > MAX_PHYS_SIZE
                // A consistent bitmap must cover the whole disk (one that
                // is in use may be stale, e.g. after a resize).
                || (flags & FLAG_IN_USE == 0
                    && u128::from(virtual_size)
                        > (u128::from(phys) * 8) << granularity_bits);
            if bad {
                return Err(invalid(format!(
                    "bitmap '{name}' does not satisfy the constraints"
                )));
            }
            entries.push(BitmapEntry {
                table_offset,
                table_size,
                flags,
                granularity_bits,
                name,
                pos,
            });
            pos += len as usize;
        }
        if entries.len() as u32 != ext.nb_bitmaps {
            return Err(invalid(
                "fewer bitmaps in the directory than the bitmaps extension says",
            ));
        }
        Ok(BitmapDir { ext, raw, entries })
    }

    /// The entries as the public API lists them.
    pub(crate) fn infos(&self) -> Vec<BitmapInfo> {
        self.entries
            .iter()
            .map(|e| BitmapInfo {
                name: e.name.clone(),
                granularity: 1u64 << e.granularity_bits,
                in_use: e.flags & FLAG_IN_USE != 0,
                auto: e.flags & FLAG_AUTO != 0,
            })
            .collect()
    }

    /// Whether some bitmap is still marked consistent.
    pub(crate) fn any_consistent(&self) -> bool {
        self.entries.iter().any(|e| e.flags & FLAG_IN_USE == 0)
    }

    /// Sets the in-use flag of every entry in `raw` (and the parsed
    /// entries); returns the byte range of the directory that changed.
    pub(crate) fn set_all_in_use(&mut self) -> (usize, usize) {
        let mut range = (usize::MAX, 0);
        for e in &mut self.entries {
            e.flags |= FLAG_IN_USE;
            let at = e.pos + 12;
            self.raw[at..at + 4].copy_from_slice(&e.flags.to_be_bytes());
            range = (range.0.min(at), range.1.max(at + 4));
        }
        range
    }
}

fn unsupported_extra() -> crate::types::Error {
    super::header::unsupported("bitmap directory entries with extra data")
}

/// Whether a bitmap table entry is valid (QEMU's rules); its data cluster
/// offset is `entry & TABLE_OFFSET_MASK` (0: none).
pub(crate) fn table_entry_valid(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_RESERVED != 0 {
        return false;
    }
    let off = entry & TABLE_OFFSET_MASK;
    off == 0 || (entry & TABLE_ALL_ONES == 0 && off % cluster_size == 0)
}
