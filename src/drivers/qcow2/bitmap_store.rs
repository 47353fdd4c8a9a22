//! Persistent dirty bitmaps as live bitmaps of the node (QEMU's
//! `qcow2-bitmap.c`): loaded at open, stored when the node is flushed to
//! close (`BlockDriver::flush_to_close`: `Drained::flush` before a removal
//! or a switch to read-only, `MainLoop::shutdown`).
//!
//! * **Load** (`load`, at open): every bitmap of a consistent directory
//!   becomes a bitmap of the node (added by `open`, the first callback
//!   with the node): enabled if its `auto` flag is set, persistent, with
//!   the bits the image stores. A bitmap flagged `in_use` (its writer did
//!   not store it) is added as *inconsistent*: no bits, refused by every
//!   operation but removal, kept in the image as it is (QEMU's rules).
//!   Every table entry and data cluster offset is checked; the memory the
//!   bits take is bounded ([`MAX_LOADED_BYTES`]).
//! * **Store** (`store`): the node's persistent bitmaps are written to
//!   fresh clusters (data clusters that hold a set bit, each bitmap's
//!   table, a new directory), the refcounts written back and flushed, then
//!   the first cluster is rewritten in one write with the bitmaps
//!   extension pointing at the new directory and auto-clear bit 0 set, and
//!   flushed; only then are the old directory, tables and data clusters
//!   freed. A crash at any point leaves the old bitmaps or the new ones,
//!   and at worst leaked clusters. Stored bitmaps are consistent (`in_use`
//!   clear); the next change to guest data marks them in use again first
//!   (`Qcow2Driver::before_change`), so a crash after it leaves them
//!   inconsistent, never stale-but-trusted. Nothing is written when the
//!   bitmaps did not change since they were loaded or stored (a writable
//!   open and close that changes nothing leaves the file byte-identical).
//!
//! The store holds `io_lock` exclusively: no guest write is between its
//! in-use check and its data (writes check under `io_lock` shared), and
//! every finished write has set its bits (qcow2 marks its node's bitmaps
//! before it lets `io_lock` go, `RequestRef::mark_dirty_now`), so the bits
//! stored cover every byte written before the store.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use crate::driver::require_child;
use crate::graph::proof::{CallbackRef, RequestRef};
use crate::types::{ChildRole, Error, Result};

use super::bitmap::{
    table_entry_valid, BitmapDir, BitmapEntry, LoadedBitmap, FLAG_AUTO, FLAG_IN_USE,
    TABLE_OFFSET_MASK,
};
use super::file_io::read_file;
use super::header::{
    be32, be64, invalid, unsupported, BitmapsExt, AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_END,
    MAX_BITMAPS, MAX_BITMAP_DIRECTORY, OFF_AUTOCLEAR, V2_HEADER_LEN,
};
use super::meta::Meta;
use super::state::Qcow2Driver;

/// Most memory the bits of the bitmaps loaded from one image may take
/// (QEMU bounds each bitmap's stored size by 512 MiB; a hostile image
/// could list thousands).
pub(crate) const MAX_LOADED_BYTES: u64 = 1 << 30;
/// QEMU's bounds on one bitmap: table entries and stored bytes.
const MAX_TABLE_SIZE: u64 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Header field offsets: backing name offset (u64) and size (u32), header
/// length (u32, version 3).
const OFF_BACKING_OFFSET: usize = 8;
const OFF_BACKING_SIZE: usize = 16;
const OFF_HEADER_LENGTH: usize = 100;

/// Bytes of stored bitmap data for `size` bytes at `gbits`.
fn data_bytes(size: u64, gbits: u32) -> u64 {
    size.div_ceil(1 << gbits).div_ceil(8)
}

/// The words of `size` bytes at `gbits`, bits past the last granule clear.
fn normalize(mut words: Vec<u64>, size: u64, gbits: u32) -> Vec<u64> {
    let granules = size.div_ceil(1 << gbits);
    words.resize(granules.div_ceil(64) as usize, 0);
    if granules % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (granules % 64)) - 1;
        }
    }
    words
}

/// What the directory will hold for one bitmap.
enum Want {
    /// An inconsistent bitmap: its entry as it is on disk.
    Keep(BitmapEntry),
    /// A consistent bitmap with these bits.
    Bits {
        name: String,
        gbits: u32,
        auto: bool,
        words: Vec<u64>,
    },
}

impl Want {
    fn name(&self) -> &str {
        match self {
            Want::Keep(e) => &e.name,
            Want::Bits { name, .. } => name,
        }
    }
}

/// A digest of what would be stored, to tell whether anything changed.
fn fingerprint(want: &[Want]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for w in want {
        match w {
            Want::Keep(e) => (0u8, &e.name, e.table_offset, e.flags).hash(&mut h),
            Want::Bits {
                name,
                gbits,
                auto,
                words,
            } => (1u8, name, gbits, auto, words).hash(&mut h),
        }
    }
    h.finish()
}

impl Qcow2Driver {
    /// Adds the bitmaps loaded at open to the node (from `open`).
    pub(super) fn install_bitmaps(&self, node: CallbackRef<'_>) -> Result<()> {
        let loaded = match self.meta.try_lock() {
            Ok(mut m) => std::mem::take(&mut m.loaded_bitmaps),
            // Only `open` runs before the node can take requests.
            Err(_) => return Ok(()),
        };
        let size = self.size();
        for b in loaded {
            node.add_loaded_dirty_bitmap(
                &b.name,
                b.granularity_bits,
                size,
                b.enabled,
                b.words.as_deref(),
            )?;
        }
        Ok(())
    }

    /// Whether a new persistent bitmap can be stored here (QEMU's
    /// `qcow2_co_can_store_new_dirty_bitmap`).
    pub(super) fn can_store(&self, name: &str, granularity: u64) -> Result<()> {
        if self.geo.version < 3 {
            return Err(unsupported("persistent dirty bitmaps in a version 2 image"));
        }
        if self.is_read_only() {
            return Err(Error::ReadOnly(format!(
                "qcow2 image (cannot store bitmap '{name}')"
            )));
        }
        let gbits = granularity.trailing_zeros();
        let bytes = data_bytes(self.size(), gbits);
        if bytes > MAX_PHYS_SIZE || bytes.div_ceil(self.geo.cs) > MAX_TABLE_SIZE {
            return Err(Error::InvalidArgument(format!(
                "bitmap '{name}' would need {bytes} bytes in the image, more than qcow2 allows ({MAX_PHYS_SIZE}); use a larger granularity"
            )));
        }
        Ok(())
    }

    /// Flush, then store the persistent bitmaps
    /// ([`BlockDriver::flush_to_close`](crate::driver::BlockDriver::flush_to_close)).
    pub(super) async fn do_flush_to_close(&self, node: RequestRef<'_>) -> Result<()> {
        self.do_flush(node).await?;
        if self.is_read_only() {
            return Ok(());
        }
        self.store_bitmaps(node).await
    }

    async fn store_bitmaps(&self, node: RequestRef<'_>) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let _excl = self.io_lock.write().await;
        let mut m = self.meta.lock().await;
        if let Some(why) = &m.broken {
            return Err(invalid(format!("image found corrupt earlier: {why}")));
        }
        let size = self.size();
        let mut want = Vec::new();
        for info in node.dirty_bitmaps() {
            if !info.persistent {
                continue;
            }
            if info.inconsistent {
                // Kept as the image has it (QEMU keeps it until removed).
                if let Some(e) = m
                    .bitmaps
                    .as_ref()
                    .and_then(|d| d.entries.iter().find(|e| e.name == info.name))
                {
                    want.push(Want::Keep(e.clone()));
                }
                continue;
            }
            let snap = node.dirty_bitmap_snapshot(&info.name)?;
            let gbits = snap.granularity().trailing_zeros();
            want.push(Want::Bits {
                name: info.name,
                gbits,
                auto: info.enabled,
                words: normalize(snap.words().to_vec(), size, gbits),
            });
        }
        if want.is_empty() && m.bitmaps.is_none() {
            return Ok(());
        }
        let fp = fingerprint(&want);
        if m.bitmaps_fingerprint == Some(fp) && self.on_disk_matches(&m, &want) {
            return Ok(());
        }
        if self.geo.version < 3 {
            return Err(unsupported("persistent dirty bitmaps in a version 2 image"));
        }
        if want.len() > MAX_BITMAPS as usize {
            return Err(Error::InvalidArgument(format!(
                "{} persistent bitmaps; qcow2 stores at most {MAX_BITMAPS}",
                want.len()
            )));
        }
        store(&mut m, file, &want, size).await?;
        m.bitmaps_fingerprint = Some(fp);
        let infos = m.bitmaps.as_ref().map(BitmapDir::infos).unwrap_or_default();
        let to_mark = m.bitmaps.as_ref().is_some_and(BitmapDir::any_consistent);
        *self.bitmap_infos.lock().unwrap_or_else(|e| e.into_inner()) = infos;
        self.bitmaps_to_mark
            .store(to_mark, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether the directory on disk already says what `want` would: the
    /// same bitmaps in the same order with the same flags, consistent ones
    /// not marked in use.
    fn on_disk_matches(&self, m: &Meta, want: &[Want]) -> bool {
        let entries = m.bitmaps.as_ref().map_or(&[][..], |d| &d.entries[..]);
        entries.len() == want.len()
            && entries.iter().zip(want).all(|(e, w)| match w {
                Want::Keep(k) => e.name == k.name && e.table_offset == k.table_offset,
                Want::Bits {
                    name, gbits, auto, ..
                } => {
                    e.name == *name
                        && u32::from(e.granularity_bits) == *gbits
                        && e.flags & FLAG_IN_USE == 0
                        && (e.flags & FLAG_AUTO != 0) == *auto
                }
            })
    }
}

/// Reads the bits of every consistent bitmap of `dir` (at open). Every
/// offset is checked against the file and the table entries against the
/// spec; an image that breaks the rules is refused, as QEMU refuses to
/// open it.
pub(crate) async fn load(
    file: RequestRef<'_>,
    dir: &BitmapDir,
    size: u64,
    cs: u64,
    align: u64,
    file_len: u64,
) -> Result<(Vec<LoadedBitmap>, u64)> {
    let mut out = Vec::with_capacity(dir.entries.len());
    let mut budget = MAX_LOADED_BYTES;
    for e in &dir.entries {
        let gbits = u32::from(e.granularity_bits);
        let enabled = e.flags & FLAG_AUTO != 0;
        if e.flags & FLAG_IN_USE != 0 {
            out.push(LoadedBitmap {
                name: e.name.clone(),
                granularity_bits: gbits,
                enabled: false,
                words: None,
            });
            continue;
        }
        let bytes = data_bytes(size, gbits);
        let clusters = bytes.div_ceil(cs);
        if u64::from(e.table_size) < clusters {
            return Err(invalid(format!(
                "bitmap '{}': its table has {} entries, the disk needs {clusters}",
                e.name, e.table_size
            )));
        }
        let words_bytes = bytes.div_ceil(8) * 8;
        if words_bytes > budget {
            return Err(unsupported(format!(
                "persistent bitmaps needing more than {MAX_LOADED_BYTES} bytes of memory"
            )));
        }
        budget -= words_bytes;
        let table_bytes = clusters * 8;
        if e.table_offset
            .checked_add(table_bytes)
            .is_none_or(|end| end > file_len)
        {
            return Err(invalid(format!(
                "the table of bitmap '{}' lies past the end of the file",
                e.name
            )));
        }
        let table = read_file(file, align, file_len, e.table_offset, table_bytes as usize).await?;
        let mut data = vec![0u8; words_bytes as usize];
        for (i, chunk) in table.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            if !table_entry_valid(entry, cs) {
                return Err(invalid(format!(
                    "bitmap '{}': table entry {i} ({entry:#018x}) is invalid",
                    e.name
                )));
            }
            let at = i as u64 * cs;
            let n = (bytes - at).min(cs) as usize;
            let dst = &mut data[at as usize..at as usize + n];
            let off = entry & TABLE_OFFSET_MASK;
            if off == 0 {
                if entry & 1 != 0 {
                    dst.fill(0xff);
                }
                continue;
            }
            if off.checked_add(cs).is_none_or(|end| end > file_len) {
                return Err(invalid(format!(
                    "bitmap '{}': data cluster {off:#x} lies past the end of the file",
                    e.name
                )));
            }
            let cluster = read_file(file, align, file_len, off, n).await?;
            dst.copy_from_slice(&cluster);
        }
        let words = data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        out.push(LoadedBitmap {
            name: e.name.clone(),
            granularity_bits: gbits,
            enabled,
            words: Some(normalize(words, size, gbits)),
        });
    }
    let want: Vec<Want> = out
        .iter()
        .zip(&dir.entries)
        .map(|(b, e)| match &b.words {
            None => Want::Keep(e.clone()),
            Some(words) => Want::Bits {
                name: b.name.clone(),
                gbits: b.granularity_bits,
                auto: b.enabled,
                words: words.clone(),
            },
        })
        .collect();
    Ok((out, fingerprint(&want)))
}

/// Writes `want` as the image's bitmaps, in the order the module docs give.
async fn store(m: &mut Meta, file: RequestRef<'_>, want: &[Want], size: u64) -> Result<()> {
    let cs = m.geo.cs;
    // Check everything before the first allocation: a refusal changes
    // nothing.
    let mut dir_len = 0u64;
    for w in want {
        if let Want::Bits { name, gbits, .. } = w {
            let bytes = data_bytes(size, *gbits);
            if bytes > MAX_PHYS_SIZE || bytes.div_ceil(cs) > MAX_TABLE_SIZE {
                return Err(Error::InvalidArgument(format!(
                    "bitmap '{name}' is too large for a qcow2 image"
                )));
            }
        }
        dir_len += (24 + w.name().len() as u64).div_ceil(8) * 8;
    }
    if dir_len > MAX_BITMAP_DIRECTORY {
        return Err(Error::InvalidArgument(
            "the bitmap directory would be larger than qcow2 allows".to_owned(),
        ));
    }
    let new_hdr = if want.is_empty() {
        with_bitmaps_ext(&m.hdr, None)?
    } else {
        // The offset is filled in below; the size of the cluster is what
        // matters here (the extension must fit).
        with_bitmaps_ext(
            &m.hdr,
            Some(BitmapsExt {
                nb_bitmaps: want.len() as u32,
                directory_size: dir_len,
                directory_offset: 0,
            }),
        )?
    };
    drop(new_hdr);

    // 1. Data clusters and tables, then the directory, in fresh clusters.
    let mut raw = Vec::with_capacity(dir_len as usize);
    let mut entries = Vec::with_capacity(want.len());
    for w in want {
        let pos = raw.len();
        let (table_offset, table_size, flags, gbits, name) = match w {
            Want::Keep(e) => (
                e.table_offset,
                e.table_size,
                e.flags,
                u32::from(e.granularity_bits),
                e.name.clone(),
            ),
            Want::Bits {
                name,
                gbits,
                auto,
                words,
            } => {
                let bytes = data_bytes(size, *gbits);
                let mut data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                data.resize(bytes as usize, 0);
                let clusters = bytes.div_ceil(cs).max(1);
                let mut table = vec![0u8; (clusters * 8).div_ceil(cs) as usize * cs as usize];
                for (i, chunk) in data.chunks(cs as usize).enumerate() {
                    if chunk.iter().all(|&b| b == 0) {
                        continue;
                    }
                    let mut cluster = chunk.to_vec();
                    cluster.resize(cs as usize, 0);
                    let off = m.alloc(file, 1).await?;
                    file.write(off, &cluster).await?;
                    table[i * 8..i * 8 + 8].copy_from_slice(&off.to_be_bytes());
                }
                let table_clusters = table.len() as u64 / cs;
                let toff = m.alloc(file, table_clusters.max(1)).await?;
                if table.is_empty() {
                    table.resize(cs as usize, 0);
                }
                file.write(toff, &table).await?;
                let flags = if *auto { FLAG_AUTO } else { 0 };
                (toff, clusters as u32, flags, *gbits, name.clone())
            }
        };
        raw.extend_from_slice(&table_offset.to_be_bytes());
        raw.extend_from_slice(&table_size.to_be_bytes());
        raw.extend_from_slice(&flags.to_be_bytes());
        raw.push(TYPE_DIRTY_TRACKING);
        raw.push(gbits as u8);
        raw.extend_from_slice(&(name.len() as u16).to_be_bytes());
        raw.extend_from_slice(&0u32.to_be_bytes());
        raw.extend_from_slice(name.as_bytes());
        raw.resize(raw.len().div_ceil(8) * 8, 0);
        entries.push(BitmapEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits: gbits as u8,
            name,
            pos,
        });
    }
    let dir_clusters = (raw.len() as u64).div_ceil(cs);
    let ext = if want.is_empty() {
        None
    } else {
        let dir_off = m.alloc(file, dir_clusters).await?;
        let mut padded = raw.clone();
        padded.resize((dir_clusters * cs) as usize, 0);
        file.write(dir_off, &padded).await?;
        Some(BitmapsExt {
            nb_bitmaps: want.len() as u32,
            directory_size: raw.len() as u64,
            directory_offset: dir_off,
        })
    };
    // The new clusters' refcounts, durable before anything points at them.
    m.write_back(file).await?;
    file.flush().await?;

    // 2. The first cluster in one write: the extension and auto-clear bit 0.
    let mut hdr = with_bitmaps_ext(&m.hdr, ext)?;
    let autoclear = be64(&hdr, OFF_AUTOCLEAR);
    let autoclear = if ext.is_some() {
        autoclear | AUTOCLEAR_BITMAPS
    } else {
        autoclear & !AUTOCLEAR_BITMAPS
    };
    hdr[OFF_AUTOCLEAR..OFF_AUTOCLEAR + 8].copy_from_slice(&autoclear.to_be_bytes());
    let old_hdr = std::mem::replace(&mut m.hdr, hdr);
    let len = m.hdr.len();
    if let Err(e) = m.write_header(file, 0, len).await {
        m.hdr = old_hdr;
        return Err(e);
    }
    file.flush().await?;
    let old = std::mem::replace(
        &mut m.bitmaps,
        ext.map(|ext| {
            let mut r = raw.clone();
            r.resize((dir_clusters * cs) as usize, 0);
            BitmapDir {
                ext,
                raw: r,
                entries,
            }
        }),
    );

    // 3. Free what only the old directory used. A failure here leaks
    // clusters at worst (the header no longer points at them).
    if let Some(old) = old {
        let kept: BTreeSet<u64> = want
            .iter()
            .filter_map(|w| match w {
                Want::Keep(e) => Some(e.table_offset),
                Want::Bits { .. } => None,
            })
            .collect();
        let mut free: BTreeSet<u64> = BTreeSet::new();
        let dir_off = old.ext.directory_offset;
        for c in 0..old.ext.directory_size.div_ceil(cs) {
            free.insert(dir_off / cs + c);
        }
        for e in old
            .entries
            .iter()
            .filter(|e| !kept.contains(&e.table_offset))
        {
            let bytes = u64::from(e.table_size) * 8;
            if e.table_offset
                .checked_add(bytes)
                .is_none_or(|end| end > m.file_len)
            {
                continue;
            }
            for c in 0..bytes.div_ceil(cs) {
                free.insert(e.table_offset / cs + c);
            }
            let align = m.geo.align;
            let table = read_file(file, align, m.file_len, e.table_offset, bytes as usize).await?;
            for chunk in table.chunks_exact(8) {
                let entry = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
                let off = entry & TABLE_OFFSET_MASK;
                if table_entry_valid(entry, cs) && off != 0 && off < m.file_len {
                    free.insert(off / cs);
                }
            }
        }
        for c in free {
            // Never below zero, whatever a hostile image shared.
            if m.refcount(file, c).await? > 0 {
                m.decref(file, c, 1).await?;
            }
        }
        m.write_refblocks(file).await?;
        file.flush().await?;
    }
    Ok(())
}

/// The first cluster `hdr` with its bitmaps extension replaced by `ext`
/// (removed with `None`); every other extension and the backing file name
/// kept as they are (the name moves if the extensions grow or shrink).
pub(crate) fn with_bitmaps_ext(hdr: &[u8], ext: Option<BitmapsExt>) -> Result<Vec<u8>> {
    let cs = hdr.len();
    let version = be32(hdr, 4);
    let header_len = if version >= 3 {
        be32(hdr, OFF_HEADER_LENGTH) as usize
    } else {
        V2_HEADER_LEN as usize
    };
    let name_at = be64(hdr, OFF_BACKING_OFFSET) as usize;
    let name_len = be32(hdr, OFF_BACKING_SIZE) as usize;
    let ext_limit = if name_at != 0 { name_at.min(cs) } else { cs };
    if header_len > ext_limit || (name_at != 0 && name_at + name_len > cs) {
        return Err(invalid("the header changed under us"));
    }
    let mut kept: Vec<(u32, &[u8])> = Vec::new();
    let mut pos = header_len;
    while pos + 8 <= ext_limit {
        let ty = be32(hdr, pos);
        let len = be32(hdr, pos + 4) as usize;
        if ty == EXT_END {
            break;
        }
        let end = pos + 8 + len;
        if end > ext_limit {
            return Err(invalid(format!(
                "header extension {ty:#010x} runs past the extension area"
            )));
        }
        if ty != EXT_BITMAPS {
            kept.push((ty, &hdr[pos + 8..end]));
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
    let mut data = [0u8; 24];
    if let Some(e) = ext {
        data[0..4].copy_from_slice(&e.nb_bitmaps.to_be_bytes());
        data[8..16].copy_from_slice(&e.directory_size.to_be_bytes());
        data[16..24].copy_from_slice(&e.directory_offset.to_be_bytes());
        kept.push((EXT_BITMAPS, &data));
    }
    let mut out = vec![0u8; cs];
    out[..header_len].copy_from_slice(&hdr[..header_len]);
    let mut at = header_len;
    let too_big = || {
        Error::InvalidArgument(format!(
            "the header extensions and backing file name do not fit in the {cs}-byte first cluster"
        ))
    };
    for (ty, d) in kept {
        let padded = d.len().div_ceil(8) * 8;
        if at + 8 + padded > cs {
            return Err(too_big());
        }
        out[at..at + 4].copy_from_slice(&ty.to_be_bytes());
        out[at + 4..at + 8].copy_from_slice(&(d.len() as u32).to_be_bytes());
        out[at + 8..at + 8 + d.len()].copy_from_slice(d);
        at += 8 + padded;
    }
    // The end marker (zeroes, already there).
    at += 8;
    if name_at != 0 {
        if at + name_len > cs {
            return Err(too_big());
        }
        out[at..at + name_len].copy_from_slice(&hdr[name_at..name_at + name_len]);
        out[OFF_BACKING_OFFSET..OFF_BACKING_OFFSET + 8].copy_from_slice(&(at as u64).to_be_bytes());
    } else if at > cs {
        return Err(too_big());
    }
    Ok(out)
}
