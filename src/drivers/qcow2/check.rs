//! Consistency check (like `qemu-img check`): walk every table, count the
//! references to each host cluster, and compare with the refcounts.

use crate::graph::proof::RequestRef;
use crate::types::Result;

use super::bitmap::{table_entry_valid, TABLE_OFFSET_MASK};
use super::entry::{
    decode_l1, decode_l2, decode_rt, l1_copied_without_table, rc_get, Entry, COPIED,
};
use super::header::{be32, be64, invalid};
use super::meta::Meta;
use super::options::Qcow2Limits;

/// Most messages a report keeps.
const MAX_MESSAGES: usize = 100;

/// What [`Qcow2Driver::check`](super::Qcow2Driver::check) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Errors: refcounts lower than the references, wrong copied flags,
    /// invalid table entries.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// How many corruptions were repaired.
    pub repaired_corruptions: u64,
    /// How many leaks were repaired.
    pub repaired_leaks: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// End of the last host cluster in use (as `qemu-img check` reports
    /// "Image end offset").
    pub image_end_offset: u64,
    /// Human-readable findings (the first hundred).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is wrong (or everything found was repaired).
    pub fn is_clean(&self) -> bool {
        self.corruptions == self.repaired_corruptions && self.leaks == self.repaired_leaks
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

/// Reference counts computed from the tables, one per host cluster.
struct Refs {
    counts: Vec<u32>,
    limit: u64,
}

impl Refs {
    /// Counts a reference to `n` clusters from `first`; `false` (nothing
    /// counted) when they lie past the end of the file or the limit.
    fn add(&mut self, first: u64, n: u64) -> bool {
        let Some(end) = first.checked_add(n).filter(|&e| e <= self.limit) else {
            return false;
        };
        if end as usize > self.counts.len() {
            self.counts.resize(end as usize, 0);
        }
        for c in first..end {
            let r = &mut self.counts[c as usize];
            *r = r.saturating_add(1);
        }
        true
    }

    fn get(&self, c: u64) -> u64 {
        self.counts.get(c as usize).map_or(0, |&r| u64::from(r))
    }
}

/// Checks `m`; `snapshots` is the snapshot table's offset and entry
/// count, when the image has internal snapshots.
pub(crate) async fn check_meta(
    m: &mut Meta,
    file: RequestRef<'_>,
    repair: bool,
    limits: &Qcow2Limits,
    snapshots: Option<(u64, u32)>,
) -> Result<CheckReport> {
    let g = m.geo;
    let cs = g.cs;
    let mut r = CheckReport::default();
    // Memory is bounded by the file's size (nothing valid lies past it)
    // and by the embedder's limit.
    let mut refs = Refs {
        counts: Vec::new(),
        limit: limits.max_check_clusters.min(m.file_len.div_ceil(cs)),
    };
    let outside = |r: &mut CheckReport, what: String| {
        r.corruptions += 1;
        r.note(format!("{what} lies past the end of the file"));
    };

    // Fixed metadata (validated at open: inside the file).
    refs.add(0, 1);
    refs.add(m.l1_offset / cs, (m.l1.len() as u64 * 8).div_ceil(cs));
    refs.add(m.rt_offset / cs, (m.rt.len() as u64 * 8).div_ceil(cs));
    for ti in 0..m.rt.len() {
        match decode_rt(&g, m.rt[ti], m.file_len) {
            Ok(Some(off)) => {
                refs.add(off / cs, 1);
            }
            Ok(None) => {}
            Err(e) => {
                r.corruptions += 1;
                r.note(format!("refcount table entry {ti}: {e}"));
            }
        }
    }

    // Persistent dirty bitmaps: the directory, each bitmap's table and
    // the data clusters the tables point to (QEMU counts them the same
    // way; without them they would look leaked, and a repair would free
    // them).
    bitmap_refs(m, file, &mut refs, &mut r).await?;

    // Internal snapshots: the table, each snapshot's L1 table, and what
    // that table references, counted once per L1 table that references it
    // (QEMU's refcount model: a snapshot adds one to each of its L2 tables
    // and to each cluster those tables map).
    if let Some((offset, nb)) = snapshots {
        let (snaps, bytes) = read_snapshot_table(
            file,
            g.align,
            m.file_len,
            cs,
            offset,
            nb,
            limits.max_l1_bytes,
        )
        .await?;
        if !refs.add(offset / cs, bytes.div_ceil(cs)) {
            outside(&mut r, "the snapshot table".to_owned());
        }
        for sn in snaps {
            let l1_bytes = u64::from(sn.l1_size) * 8;
            if l1_bytes == 0 {
                continue;
            }
            if sn.l1_offset == 0 {
                r.corruptions += 1;
                r.note(format!(
                    "the L1 table of snapshot '{}' is at offset 0 (the header)",
                    sn.id
                ));
                continue;
            }
            if !refs.add(sn.l1_offset / cs, l1_bytes.div_ceil(cs)) {
                outside(&mut r, format!("the L1 table of snapshot '{}'", sn.id));
                continue;
            }
            let raw = super::file_io::read_file(
                file,
                g.align,
                m.file_len,
                sn.l1_offset,
                l1_bytes as usize,
            )
            .await?;
            let l1: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let label = format!("snapshot '{}'", sn.id);
            walk_l1(m, file, &mut refs, &mut r, &l1, &label, false).await?;
        }
    }

    // The active mapping tables.
    let l1 = std::mem::take(&mut m.l1);
    let walked = walk_l1(m, file, &mut refs, &mut r, &l1, "active", true).await;
    m.l1 = l1;
    let l2_tables = walked?;

    // Compare with the refcounts, block by block.
    let rbe = g.rb_entries;
    let blocks = (m.rt.len() as u64).max((refs.counts.len() as u64).div_ceil(rbe));
    let mut last_used = 0u64;
    let file_clusters = m.file_len.div_ceil(cs);
    let mut fixes: Vec<(u64, u64)> = Vec::new();
    for ti in 0..blocks {
        let block = match m
            .rt
            .get(ti as usize)
            .map(|&raw| decode_rt(&g, raw, m.file_len))
        {
            Some(Ok(Some(off))) => Some(m.read_block(file, off).await?),
            _ => None,
        };
        let base = ti * rbe;
        if block.is_none() && base >= refs.counts.len() as u64 {
            continue;
        }
        for i in 0..rbe {
            let c = base + i;
            let want = refs.get(c);
            if c >= file_clusters && want == 0 {
                // Past the end of the file and unreferenced: QEMU's check
                // does not look there either (nothing lies there to leak;
                // the allocator merely skips such clusters).
                continue;
            }
            let rc = block
                .as_ref()
                .map_or(0, |b| rc_get(b, g.refcount_order, i as usize));
            if rc == want {
                if rc > 0 {
                    last_used = c + 1;
                }
                continue;
            }
            last_used = c + 1;
            if rc > want {
                r.leaks += 1;
                if want == 0 {
                    r.note(format!("leaked cluster {c} (refcount {rc})"));
                } else {
                    r.note(format!("cluster {c}: refcount {rc}, references {want}"));
                }
                if repair {
                    fixes.push((c, want));
                    r.repaired_leaks += 1;
                }
            } else {
                r.corruptions += 1;
                r.note(format!("cluster {c}: refcount {rc} but {want} references"));
                if repair && block.is_some() {
                    fixes.push((c, want));
                    r.repaired_corruptions += 1;
                }
            }
        }
    }
    for (c, v) in fixes {
        m.set_refcount(file, c, v).await?;
        if v == 0 && c < m.free_hint {
            m.free_hint = c;
        }
    }
    r.image_end_offset = last_used * cs;

    // Copied flags: set exactly when the refcount is one.
    for &(l1i, off) in &l2_tables {
        let rc = m.refcount(file, off / cs).await?;
        if (m.l1[l1i] & COPIED != 0) != (rc == 1) {
            r.corruptions += 1;
            r.note(format!(
                "L1 entry {l1i}: copied flag does not match refcount {rc} of its L2 table"
            ));
        }
        let s = m.l2_slot(file, off).await?;
        let table = m.l2.get(s).table.clone();
        for (idx, raw) in table.into_iter().enumerate() {
            let (host, copied) = match decode_l2(&g, raw) {
                Ok(Entry::Data { host, copied })
                | Ok(Entry::Zero {
                    host: Some(host),
                    copied,
                }) => (host, copied),
                _ => continue,
            };
            let rc = m.refcount(file, host / cs).await?;
            if copied != (rc == 1) {
                r.corruptions += 1;
                r.note(format!(
                    "L2 entry {idx} for L1 entry {l1i}: copied flag does not match refcount {rc} of cluster {:#x}",
                    host
                ));
            }
        }
    }
    Ok(r)
}

/// Counts the clusters of the persistent dirty bitmaps. Tables are read
/// one cluster at a time, so memory stays bounded whatever they claim.
async fn bitmap_refs(
    m: &mut Meta,
    file: RequestRef<'_>,
    refs: &mut Refs,
    r: &mut CheckReport,
) -> Result<()> {
    let Some(dir) = &m.bitmaps else {
        return Ok(());
    };
    let cs = m.geo.cs;
    let file_len = m.file_len;
    let ext = dir.ext;
    let tables: Vec<(String, u64, u32)> = dir
        .entries
        .iter()
        .map(|e| (e.name.clone(), e.table_offset, e.table_size))
        .collect();
    if !refs.add(ext.directory_offset / cs, ext.directory_size.div_ceil(cs)) {
        r.corruptions += 1;
        r.note("the bitmap directory lies past the end of the file".to_owned());
    }
    for (name, offset, size) in tables {
        let bytes = u64::from(size) * 8;
        if !refs.add(offset / cs, bytes.div_ceil(cs)) {
            r.corruptions += 1;
            r.note(format!(
                "the table of bitmap '{name}' lies past the end of the file"
            ));
            continue;
        }
        let mut buf = vec![0u8; cs as usize];
        let mut done = 0u64;
        while done < bytes {
            let n = (bytes - done).min(cs);
            super::file_io::read_data(file, file_len, offset + done, &mut buf[..n as usize])
                .await?;
            for (k, chunk) in buf[..n as usize].chunks_exact(8).enumerate() {
                let entry = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
                let idx = done / 8 + k as u64;
                if !table_entry_valid(entry, cs) {
                    r.corruptions += 1;
                    r.note(format!(
                        "bitmap '{name}': table entry {idx} ({entry:#018x}) is invalid"
                    ));
                    continue;
                }
                let data = entry & TABLE_OFFSET_MASK;
                if data != 0 && !refs.add(data / cs, 1) {
                    r.corruptions += 1;
                    r.note(format!(
                        "bitmap '{name}': data cluster {data:#x} lies past the end of the file"
                    ));
                }
            }
            done += n;
        }
    }
    Ok(())
}

/// Counts the references of one L1 table (`l1`): its L2 tables and the
/// clusters they map. `active`: the image's own table (its guest clusters
/// are counted as allocated). Returns the L2 tables found, as (L1 index,
/// offset).
async fn walk_l1(
    m: &mut Meta,
    file: RequestRef<'_>,
    refs: &mut Refs,
    r: &mut CheckReport,
    l1: &[u64],
    label: &str,
    active: bool,
) -> Result<Vec<(usize, u64)>> {
    let g = m.geo;
    let cs = g.cs;
    let mut l2_tables: Vec<(usize, u64)> = Vec::new();
    for (l1i, &raw) in l1.iter().enumerate() {
        match decode_l1(&g, raw, m.file_len) {
            Ok(Some(off)) => {
                refs.add(off / cs, 1);
                l2_tables.push((l1i, off));
            }
            Ok(None) => {
                if l1_copied_without_table(raw) {
                    r.corruptions += 1;
                    r.note(format!(
                        "{label} L1 entry {l1i}: copied flag without an L2 table"
                    ));
                }
            }
            Err(e) => {
                r.corruptions += 1;
                r.note(format!("{label} L1 entry {l1i}: {e}"));
            }
        }
    }
    for &(l1i, off) in &l2_tables {
        let s = m.l2_slot(file, off).await?;
        for (idx, &raw) in m.l2.get(s).table.iter().enumerate() {
            match decode_l2(&g, raw) {
                Ok(e) => {
                    if let Some((c, n)) = e.host_clusters(&g) {
                        if !refs.add(c, n) {
                            r.corruptions += 1;
                            r.note(format!(
                                "cluster {c} ({label} L2 entry {idx} for L1 entry {l1i}) lies past the end of the file"
                            ));
                        }
                    }
                    if active && matches!(e, Entry::Data { .. } | Entry::Compressed { .. }) {
                        r.allocated_clusters += 1;
                    }
                }
                Err(e) => {
                    r.corruptions += 1;
                    r.note(format!(
                        "{label} L2 entry {idx} of the table for L1 entry {l1i} at {off:#x}: {e}"
                    ));
                }
            }
        }
    }
    Ok(l2_tables)
}

// ---- the internal snapshot table (read only for the check) ---------------

/// Fixed part of a snapshot table entry.
const SN_ENTRY_LEN: u64 = 40;
/// QEMU's limits: extra data per entry, the whole table.
const SN_MAX_EXTRA_DATA: u32 = 1024;
const SN_MAX_TABLE_BYTES: u64 = 1024 * 65536;

/// What `check` needs of one snapshot.
#[derive(Debug, Clone)]
struct SnapshotL1 {
    id: String,
    l1_offset: u64,
    l1_size: u32,
}

/// Reads the `nb` entries of the snapshot table at `offset`; returns them
/// and the table's size in bytes (QEMU's rules: bounded extra data, L1
/// offsets aligned, L1 tables no larger than `max_l1_bytes`, the table no
/// larger than 64 MiB and inside the file).
async fn read_snapshot_table(
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
        if pos + SN_ENTRY_LEN > file_len {
            return Err(invalid(format!(
                "snapshot table entry {i} lies past the end of the file"
            )));
        }
        let e =
            super::file_io::read_file(file, align, file_len, pos, SN_ENTRY_LEN as usize).await?;
        let l1_offset = be64(&e, 0);
        let l1_size = be32(&e, 8);
        let id_len = u16::from_be_bytes([e[12], e[13]]);
        let name_len = u16::from_be_bytes([e[14], e[15]]);
        let extra = be32(&e, 36);
        if extra > SN_MAX_EXTRA_DATA {
            return Err(invalid(format!(
                "snapshot {i}: {extra} bytes of extra data (at most {SN_MAX_EXTRA_DATA})"
            )));
        }
        let id_at = pos + SN_ENTRY_LEN + u64::from(extra);
        let id = super::file_io::read_file(file, align, file_len, id_at, id_len as usize).await?;
        let id = String::from_utf8_lossy(&id).into_owned();
        let len = (SN_ENTRY_LEN + u64::from(extra) + u64::from(id_len) + u64::from(name_len))
            .div_ceil(8)
            * 8;
        pos += len;
        if pos - offset > SN_MAX_TABLE_BYTES || pos > file_len {
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
