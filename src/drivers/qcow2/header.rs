//! The qcow2 header: parsing with full validation, and the few in-place
//! updates we ever make to it.
//!
//! Every field of an untrusted header is checked here, before anything else
//! looks at it: version, cluster size, table offsets (aligned, inside the
//! file), table sizes (against the virtual size and the embedder's
//! [`Qcow2Limits`]), feature bits, header extensions and the backing file
//! name.

use crate::types::{Error, Result};

use super::options::Qcow2Limits;

/// `"QFI\xfb"`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size: 512 bytes.
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size: 2 MiB (QEMU's limit too).
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Header length of version 2 images.
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// Header length we write for version 3 images (up to `header_length`).
pub(crate) const V3_HEADER_LEN: u32 = 104;
/// Longest backing file name the format allows.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;
/// Longest backing format name we accept.
pub(crate) const MAX_BACKING_FORMAT: u32 = 32;
/// QEMU's limit on internal snapshots.
const MAX_SNAPSHOTS: u32 = 65536;

// Byte offsets of the fields we rewrite.
pub(crate) const OFF_SIZE: usize = 24;
pub(crate) const OFF_L1_SIZE: usize = 36;
pub(crate) const OFF_L1_TABLE: usize = 40;
pub(crate) const OFF_REFCOUNT_TABLE: usize = 48;
pub(crate) const OFF_INCOMPATIBLE: usize = 72;
pub(crate) const OFF_AUTOCLEAR: usize = 88;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

/// Auto-clear feature bit 0: the bitmaps extension is consistent.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Most bitmaps an image may have (QEMU's limit).
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (QEMU's limit: 1 KiB per bitmap).
pub(crate) const MAX_BITMAP_DIRECTORY: u64 = 1024 * MAX_BITMAPS as u64;

/// The bitmaps header extension (only kept when auto-clear bit 0 says
/// it is consistent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// Header extension types.
pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// A parsed, validated header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The bitmaps extension, when present and marked consistent.
    pub bitmaps: Option<BitmapsExt>,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidImage {
        format: "qcow2",
        reason: reason.into(),
    }
}

pub(crate) fn unsupported(feature: impl Into<String>) -> Error {
    Error::UnsupportedImage {
        format: "qcow2",
        feature: feature.into(),
    }
}

/// Whether `[offset, offset + len)` lies inside a file of `file_len` bytes.
fn inside(offset: u64, len: u64, file_len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= file_len)
}

/// Entries per L2 table (and bytes of guest data one L1 entry covers).
pub(crate) fn l2_entries(cluster_bits: u32) -> u64 {
    1 << (cluster_bits - 3)
}

/// L1 entries needed to map `size` bytes.
pub(crate) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let per_l1 = 1u128 << (cluster_bits + cluster_bits - 3);
    (u128::from(size).div_ceil(per_l1)) as u64
}

impl Header {
    /// Parses and validates the header found in `buf`: the start of the
    /// file, at least the first cluster (or the whole file if shorter).
    pub(crate) fn parse(buf: &[u8], file_len: u64, limits: &Qcow2Limits) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(invalid(format!(
                "file is {} bytes, too short for a qcow2 header",
                buf.len()
            )));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(invalid(format!(
                "bad magic {magic:#010x} (expected {MAGIC:#010x})"
            )));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let header_cluster_len = cluster_size.min(file_len) as usize;
        if buf.len() < header_cluster_len {
            return Err(invalid("internal: header cluster not fully read"));
        }
        let buf = &buf[..header_cluster_len];

        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
        };
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let crypt_method = be32(buf, 32);
        let snapshots_offset = h.snapshots_offset;

        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(invalid("file too short for a version 3 header"));
            }
            h.incompatible = be64(buf, 72);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN
                || h.header_length % 8 != 0
                || u64::from(h.header_length) > cluster_size
                || h.header_length as usize > buf.len()
            {
                return Err(invalid(format!(
                    "header_length {} must be a multiple of 8 between {V3_HEADER_LEN} and the cluster size",
                    h.header_length
                )));
            }
            // A compression type byte other than zlib's without the feature
            // bit violates the spec; QEMU refuses it too.
            if h.header_length > V3_HEADER_LEN
                && buf[104] != 0
                && h.incompatible & INCOMPAT_COMPRESSION == 0
            {
                return Err(invalid(format!(
                    "compression type {} without the compression type feature bit",
                    buf[104]
                )));
            }
            if h.refcount_order > 6 {
                return Err(invalid(format!(
                    "refcount_order {} is larger than 6",
                    h.refcount_order
                )));
            }
        }

        // Header extensions: needed before judging feature bits, for the
        // feature name table. They end where the backing file name starts.
        if backing_file_offset != 0 && backing_file_offset < u64::from(h.header_length) {
            return Err(invalid(format!(
                "backing file name offset {backing_file_offset} lies inside the header"
            )));
        }
        let ext_limit = if backing_file_offset != 0 {
            backing_file_offset.min(buf.len() as u64) as usize
        } else {
            buf.len()
        };
        let mut feature_names: Vec<(u8, u8, String)> = Vec::new();
        let mut pos = h.header_length as usize;
        while pos + 8 <= ext_limit {
            let ty = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            pos += 8;
            // Checked before the end marker, as QEMU does ("Header
            // extension too large"): an end marker whose length runs past
            // the extension area is malformed too.
            if len > ext_limit - pos {
                return Err(invalid(format!(
                    "header extension {ty:#010x} of {len} bytes is too large (runs past the extension area)"
                )));
            }
            if ty == EXT_END {
                break;
            }
            let data = &buf[pos..pos + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    if len as u32 > MAX_BACKING_FORMAT {
                        return Err(invalid(format!("backing format name of {len} bytes")));
                    }
                    let name = std::str::from_utf8(data)
                        .ok()
                        .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
                        .ok_or_else(|| invalid("backing format name is not printable ASCII"))?;
                    h.backing_format = Some(name.to_owned());
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let raw = &entry[2..48];
                        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        let name = String::from_utf8_lossy(&raw[..end])
                            .chars()
                            .filter(|c| !c.is_control())
                            .collect();
                        feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(invalid(format!(
                            "bitmaps extension of {len} bytes (expected 24)"
                        )));
                    }
                    // Without auto-clear bit 0 a program that does not know
                    // bitmaps wrote the image: the extension is stale and
                    // ignored, as QEMU does.
                    if h.autoclear & AUTOCLEAR_BITMAPS != 0 {
                        h.bitmaps = Some(parse_bitmaps_ext(data, cluster_size, file_len)?);
                    }
                }
                EXT_CRYPTO if crypt_method != 2 => {
                    // The spec: present if and only if LUKS is used.
                    return Err(invalid("crypto header extension without LUKS encryption"));
                }
                EXT_CRYPTO | EXT_DATA_FILE => {} // judged by header fields below
                _ => {}                          // unknown: safe to ignore
            }
            pos += len.div_ceil(8) * 8;
        }

        // Features we cannot honour: refuse rather than misread.
        if crypt_method != 0 {
            return Err(unsupported(match crypt_method {
                1 => "AES encryption".to_owned(),
                2 => "LUKS encryption".to_owned(),
                m => format!("encryption method {m}"),
            }));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && u32::from(*bit) == b)
                        .map(|(_, _, n)| format!("bit {b} ({n})"))
                        .unwrap_or_else(|| format!("bit {b}"))
                })
                .collect();
            return Err(unsupported(format!(
                "unknown incompatible features: {}",
                names.join(", ")
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("an external data file"));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)"));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            let ty = if h.header_length > 104 { buf[104] } else { 0 };
            return Err(unsupported(match ty {
                1 => "zstd compression".to_owned(),
                0 => "compression type bit without a compression type".to_owned(),
                t => format!("compression type {t}"),
            }));
        }

        // Virtual size and L1 table.
        if h.size > limits.max_virtual_size {
            return Err(invalid(format!(
                "virtual size {} exceeds the limit of {} bytes",
                h.size, limits.max_virtual_size
            )));
        }
        let needed_l1 = l1_entries_for(h.size, cluster_bits);
        if u64::from(h.l1_size) < needed_l1 {
            return Err(invalid(format!(
                "L1 table has {} entries but the {}-byte disk needs {needed_l1}",
                h.l1_size, h.size
            )));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > limits.max_l1_bytes {
            return Err(invalid(format!(
                "L1 table of {l1_bytes} bytes exceeds the limit of {} bytes",
                limits.max_l1_bytes
            )));
        }
        check_table(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
        )?;

        // Refcount table.
        if h.refcount_table_clusters == 0 {
            return Err(invalid("refcount table has no clusters"));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) << cluster_bits;
        if rt_bytes > limits.max_refcount_table_bytes {
            return Err(invalid(format!(
                "refcount table of {rt_bytes} bytes exceeds the limit of {} bytes",
                limits.max_refcount_table_bytes
            )));
        }
        check_table(
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
        )?;

        // Snapshots: validated, not read (we only use the active L1).
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(format!("{} snapshots", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 {
            // Each entry is at least 40 bytes.
            check_table(
                "snapshot table",
                snapshots_offset,
                u64::from(h.nb_snapshots) * 40,
                cluster_size,
                file_len,
            )?;
        }

        // Backing file name: inside the first cluster, after the extensions.
        if backing_file_offset != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(invalid(format!(
                    "backing file name length {backing_file_size} exceeds {MAX_BACKING_NAME}"
                )));
            }
            let start = backing_file_offset;
            let end = start + u64::from(backing_file_size);
            if end > buf.len() as u64 {
                return Err(invalid(format!(
                    "backing file name at {start}..{end} lies outside the first cluster"
                )));
            }
            let name = &buf[start as usize..end as usize];
            let name =
                std::str::from_utf8(name).map_err(|_| invalid("backing file name is not UTF-8"))?;
            if name.is_empty() || name.contains('\0') {
                return Err(invalid("backing file name is empty or contains NUL"));
            }
            h.backing_file = Some(name.to_owned());
        } else if h.backing_format.is_some() {
            // A format without a file: harmless, but say nothing about it.
            h.backing_format = None;
        }
        Ok(h)
    }

    /// Bytes in a cluster.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// Validates the 24 bytes of a bitmaps extension (QEMU's rules).
fn parse_bitmaps_ext(data: &[u8], cluster_size: u64, file_len: u64) -> Result<BitmapsExt> {
    let e = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        directory_size: be64(data, 8),
        directory_offset: be64(data, 16),
    };
    if be32(data, 4) != 0 {
        return Err(invalid("bitmaps extension: reserved field is not zero"));
    }
    if e.nb_bitmaps == 0 || e.nb_bitmaps > MAX_BITMAPS {
        return Err(invalid(format!(
            "bitmaps extension: {} bitmaps (1..={MAX_BITMAPS} allowed)",
            e.nb_bitmaps
        )));
    }
    if e.directory_size == 0 || e.directory_size > MAX_BITMAP_DIRECTORY {
        return Err(invalid(format!(
            "bitmaps extension: directory of {} bytes",
            e.directory_size
        )));
    }
    check_table(
        "bitmap directory",
        e.directory_offset,
        e.directory_size,
        cluster_size,
        file_len,
    )?;
    Ok(e)
}

/// A cluster-aligned table of `len` bytes at `offset` inside the file.
fn check_table(what: &str, offset: u64, len: u64, cluster_size: u64, file_len: u64) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(invalid(format!(
            "{what} offset {offset:#x} is not aligned to the {cluster_size}-byte cluster size"
        )));
    }
    if len == 0 {
        return Ok(());
    }
    if offset == 0 {
        return Err(invalid(format!("{what} overlaps the header")));
    }
    if !inside(offset, len, file_len) {
        return Err(invalid(format!(
            "{what} at {offset:#x} ({len} bytes) lies outside the {file_len}-byte file"
        )));
    }
    Ok(())
}

/// Layout of a header we write (see `create.rs`).
#[derive(Debug, Clone)]
pub(crate) struct NewHeader<'a> {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub backing_file: Option<&'a str>,
    pub backing_format: Option<&'a str>,
}

impl NewHeader<'_> {
    /// Serializes into a cluster-sized buffer: header, extensions, backing
    /// file name.
    pub(crate) fn to_cluster(&self) -> Result<Vec<u8>> {
        let cs = 1usize << self.cluster_bits;
        let mut b = vec![0u8; cs];
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        let header_len = if self.version == 3 {
            put32(&mut b, 96, 4); // refcount_order: 16-bit refcounts
            put32(&mut b, 100, V3_HEADER_LEN);
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        } as usize;
        let mut pos = header_len;
        let ext = |b: &mut [u8], pos: &mut usize, ty: u32, data: &[u8]| -> Result<()> {
            let padded = data.len().div_ceil(8) * 8;
            if *pos + 8 + padded + 8 > cs {
                return Err(Error::InvalidArgument(
                    "header extensions do not fit in the first cluster".into(),
                ));
            }
            put32(b, *pos, ty);
            put32(b, *pos + 4, data.len() as u32);
            b[*pos + 8..*pos + 8 + data.len()].copy_from_slice(data);
            *pos += 8 + padded;
            Ok(())
        };
        if let Some(fmt) = self.backing_format {
            ext(&mut b, &mut pos, EXT_BACKING_FORMAT, fmt.as_bytes())?;
        }
        if self.version == 3 {
            // Name our features, as QEMU does, so old readers can explain.
            let mut table = Vec::new();
            for (ty, bit, name) in [
                (0u8, 0u8, "dirty bit"),
                (0, 1, "corrupt bit"),
                (0, 2, "external data file"),
                (0, 3, "compression type"),
                (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"),
            ] {
                let mut e = [0u8; 48];
                e[0] = ty;
                e[1] = bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&e);
            }
            if pos + 8 + table.len() + 8 <= cs / 2 {
                ext(&mut b, &mut pos, EXT_FEATURE_TABLE, &table)?;
            }
        }
        // End-of-extensions marker (8 zero bytes) is already there.
        pos += 8;
        if let Some(name) = self.backing_file {
            let len = name.len();
            if len == 0 || len as u32 > MAX_BACKING_NAME || name.contains('\0') {
                return Err(Error::InvalidArgument(format!(
                    "backing file name must be 1..={MAX_BACKING_NAME} bytes without NUL"
                )));
            }
            if pos + len > cs {
                return Err(Error::InvalidArgument(format!(
                    "backing file name of {len} bytes does not fit in a {cs}-byte cluster"
                )));
            }
            b[pos..pos + len].copy_from_slice(name.as_bytes());
            put64(&mut b, 8, pos as u64);
            put32(&mut b, 16, len as u32);
        }
        Ok(b)
    }
}
