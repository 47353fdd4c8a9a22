//! Internal snapshots: listing, creating, applying and deleting them, as
//! `qemu-img snapshot -l/-c/-a/-d` does, on an image nobody else uses.
//!
//! A snapshot is a copy of the L1 table plus an entry in the snapshot
//! table (id, name, date, sizes). Every cluster reachable from an L1 table
//! holds one reference per path to it, so creating a snapshot adds one to
//! each L2 table and data cluster the active table reaches, and deleting
//! one takes them away again; the copied flags of the active tables are
//! then recomputed (set exactly where the refcount is one), as QEMU's
//! `qcow2_update_snapshot_refcount` does. Copied flags in snapshot tables
//! mean nothing (the format says they are accurate only in the active
//! table) and are left as they are.
//!
//! Order on disk, each step flushed before the next, so that a crash
//! leaves at worst leaked clusters:
//! * create: the L1 copy and the new refcounts, then the new snapshot table
//!   and the header pointing to it, then the old table is freed;
//! * delete: the snapshot table without the entry and the header, then the
//!   refcounts drop;
//! * apply: the snapshot's clusters gain a reference, the active L1 table
//!   is overwritten with the snapshot's, then the old active clusters lose
//!   theirs.
//!
//! The image is opened for the operation and closed again: the
//! operations need the image to themselves.
//!
//! Guest writes to an image with snapshots copy what they change: a data
//! cluster without the copied flag is never written in place (the write
//! path allocates a new one and drops a reference to the old), and an L2
//! table without it is first copied by [`Meta::cow_l2`] (in `meta.rs`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::graph::proof::{IoRef, RequestRef};
use crate::types::{Error, Result};

use super::entry::{decode_l1, decode_l2, rc_max, Entry, COPIED, OFFSET_MASK};
use super::file_io::read_file;
use super::header::{be32, be64, invalid};
use super::meta::Meta;
use super::options::Qcow2Options;
use super::state::Qcow2Driver;

/// Header fields: number of snapshots (u32) and table offset (u64).
const OFF_NB_SNAPSHOTS: usize = 60;
/// QEMU's limits: snapshot table size, extra data per entry, names.
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA: u32 = 1024;
const MAX_SNAPSHOTS: usize = 65536;

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Unique id (a decimal number when QEMU or we made it).
    pub id: String,
    /// The name ("tag") given at creation.
    pub name: String,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time: seconds since the Unix epoch, and nanoseconds.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// The guest's clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The virtual disk size when taken (absent in old version 2 entries).
    pub disk_size: Option<u64>,
    /// Instructions executed (record/replay), if recorded.
    pub icount: Option<u64>,
}

/// A snapshot table entry with what the format keeps beside the info.
#[derive(Debug, Clone)]
struct Snap {
    info: SnapshotInfo,
    l1_offset: u64,
    l1_size: u32,
    /// The extra data as stored (rewritten verbatim).
    extra: Vec<u8>,
}

impl Snap {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let i = &self.info;
        out.extend_from_slice(&self.l1_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(i.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(i.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&i.date_sec.to_be_bytes());
        out.extend_from_slice(&i.date_nsec.to_be_bytes());
        out.extend_from_slice(&i.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(i.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(i.id.as_bytes());
        out.extend_from_slice(i.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
}

/// Where the snapshot table is, from the in-memory header.
fn table_location(m: &Meta) -> (u32, u64) {
    (
        be32(&m.hdr, OFF_NB_SNAPSHOTS),
        be64(&m.hdr, OFF_NB_SNAPSHOTS + 4),
    )
}

/// Reads and validates the snapshot table.
async fn read_table(m: &Meta, file: RequestRef<'_>, max_l1_bytes: u64) -> Result<Vec<Snap>> {
    let (nb, mut off) = table_location(m);
    let (align, file_len, cs) = (m.geo.align, m.file_len, m.geo.cs);
    if nb == 0 {
        return Ok(Vec::new());
    }
    if nb as usize > MAX_SNAPSHOTS {
        return Err(invalid(format!("{nb} snapshots")));
    }
    let start = off;
    let mut snaps = Vec::with_capacity(nb as usize);
    for n in 0..nb {
        let bad = |what: String| invalid(format!("snapshot table entry {n}: {what}"));
        if off + 40 > file_len || off + 40 - start > MAX_TABLE_BYTES {
            return Err(bad("lies outside the file".into()));
        }
        let h = read_file(file, align, file_len, off, 40).await?;
        let l1_offset = be64(&h, 0);
        let l1_size = be32(&h, 8);
        let id_len = u64::from(u16::from_be_bytes([h[12], h[13]]));
        let name_len = u64::from(u16::from_be_bytes([h[14], h[15]]));
        let extra_len = be32(&h, 36);
        if extra_len > MAX_EXTRA {
            return Err(bad(format!("{extra_len} bytes of extra data")));
        }
        let rest = u64::from(extra_len) + id_len + name_len;
        let end = off + 40 + rest;
        if end > file_len || end - start > MAX_TABLE_BYTES {
            return Err(bad("lies outside the file".into()));
        }
        let body = read_file(file, align, file_len, off + 40, rest as usize).await?;
        let (extra, names) = body.split_at(extra_len as usize);
        let (id, name) = names.split_at(id_len as usize);
        if u64::from(l1_size) * 8 > max_l1_bytes {
            return Err(bad(format!("an L1 table of {l1_size} entries")));
        }
        if l1_offset % cs != 0
            || (l1_size > 0
                && (l1_offset == 0
                    || l1_offset
                        .checked_add(u64::from(l1_size) * 8)
                        .is_none_or(|e| e > file_len)))
        {
            return Err(bad(format!(
                "L1 table at {l1_offset:#x} is misaligned or outside the file"
            )));
        }
        let large = (extra.len() >= 8).then(|| be64(extra, 0));
        let vm_state_size = large.unwrap_or(u64::from(be32(&h, 32)));
        let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
        let icount = (extra.len() >= 24)
            .then(|| be64(extra, 16))
            .filter(|&v| v != u64::MAX);
        snaps.push(Snap {
            info: SnapshotInfo {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                vm_state_size,
                date_sec: be32(&h, 16),
                date_nsec: be32(&h, 20),
                vm_clock_nsec: be64(&h, 24),
                disk_size,
                icount,
            },
            l1_offset,
            l1_size,
            extra: extra.to_vec(),
        });
        off = end.div_ceil(8) * 8;
    }
    Ok(snaps)
}

/// Reads an L1 table of `entries` entries at `offset` (validated by
/// [`read_table`]).
async fn read_l1(m: &Meta, file: RequestRef<'_>, offset: u64, entries: u32) -> Result<Vec<u64>> {
    let bytes = read_file(file, m.geo.align, m.file_len, offset, entries as usize * 8).await?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Adds `addend` (+1, -1 or 0) to the refcount of host cluster `c` and
/// returns the new refcount.
async fn add_ref(m: &mut Meta, file: RequestRef<'_>, c: u64, addend: i64) -> Result<u64> {
    let v = m.refcount(file, c).await?;
    match addend {
        0 => Ok(v),
        a if a > 0 => {
            m.set_refcount(file, c, v + 1).await?;
            Ok(v + 1)
        }
        _ => {
            m.decref(file, c, 1).await?;
            Ok(v - 1)
        }
    }
}

/// QEMU's `qcow2_update_snapshot_refcount`: adds `addend` to every L2
/// table and host cluster `l1` reaches, and recomputes the copied flags of
/// the entries (in `l1` itself and in its L2 tables, through the cache;
/// tables whose refcount drops to zero are left alone).
async fn update_refcounts(
    m: &mut Meta,
    file: RequestRef<'_>,
    l1: &mut [u64],
    addend: i64,
) -> Result<()> {
    let g = m.geo;
    for e in l1.iter_mut() {
        let Some(l2_off) = decode_l1(&g, *e, m.file_len)? else {
            continue;
        };
        let l2_rc = add_ref(m, file, l2_off / g.cs, addend).await?;
        let s = m.l2_slot(file, l2_off).await?;
        let table = m.l2.get(s).table.clone();
        let mut changed: Vec<(usize, u64)> = Vec::new();
        for (idx, &raw) in table.iter().enumerate() {
            let entry = decode_l2(&g, raw)?;
            let rc = match entry {
                Entry::Compressed { .. } => {
                    if let Some((c, n)) = entry.host_clusters(&g) {
                        for c in c..c + n {
                            add_ref(m, file, c, addend).await?;
                        }
                    }
                    continue;
                }
                Entry::Data { host, .. }
                | Entry::Zero {
                    host: Some(host), ..
                } => add_ref(m, file, host / g.cs, addend).await?,
                Entry::Zero { host: None, .. } | Entry::Unallocated => 0,
            };
            let new = if rc == 1 { raw | COPIED } else { raw & !COPIED };
            if new != raw {
                changed.push((idx, new));
            }
        }
        if l2_rc > 0 && !changed.is_empty() {
            let s = m.l2_slot(file, l2_off).await?;
            for (idx, new) in changed {
                m.l2.get_mut(s).table[idx] = new;
                m.l2.mark_dirty(s, idx * 8, idx * 8 + 8);
            }
        }
        let flags = if l2_rc == 1 { COPIED } else { 0 };
        *e = (*e & OFFSET_MASK) | flags;
    }
    Ok(())
}

/// Fails, changing nothing, if some cluster `l1` reaches could not take
/// one more reference (1-bit refcounts always; narrow ones at their
/// maximum). QEMU finds out half way and leaks; we look first.
async fn check_room(m: &mut Meta, file: RequestRef<'_>, l1: &[u64]) -> Result<()> {
    let g = m.geo;
    let max = rc_max(g.refcount_order);
    let full = |c: u64| {
        Error::InvalidArgument(format!(
            "cluster {c} already has the most references {}-bit refcounts can count",
            1u32 << g.refcount_order
        ))
    };
    for &e in l1 {
        let Some(l2_off) = decode_l1(&g, e, m.file_len)? else {
            continue;
        };
        if m.refcount(file, l2_off / g.cs).await? >= max {
            return Err(full(l2_off / g.cs));
        }
        let s = m.l2_slot(file, l2_off).await?;
        let table = m.l2.get(s).table.clone();
        for raw in table {
            if let Some((c, n)) = decode_l2(&g, raw)?.host_clusters(&g) {
                for c in c..c + n {
                    if m.refcount(file, c).await? >= max {
                        return Err(full(c));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs [`update_refcounts`] on the active L1 table and marks it for
/// writing back.
async fn update_active(m: &mut Meta, file: RequestRef<'_>, addend: i64) -> Result<()> {
    let mut l1 = std::mem::take(&mut m.l1);
    let r = update_refcounts(m, file, &mut l1, addend).await;
    let len = l1.len() * 8;
    m.l1 = l1;
    if len > 0 {
        m.l1_dirty = Some((0, len));
    }
    r
}

/// Writes every cached change back and flushes.
async fn sync(m: &mut Meta, file: RequestRef<'_>) -> Result<()> {
    m.write_back(file).await?;
    file.flush().await
}

/// Writes `snaps` as the new snapshot table in fresh clusters, switches the
/// header to it and frees the old one.
async fn write_table(m: &mut Meta, file: RequestRef<'_>, snaps: &[Snap]) -> Result<()> {
    let cs = m.geo.cs;
    let (old_nb, old_off) = table_location(m);
    let mut bytes = Vec::new();
    for s in snaps {
        s.encode(&mut bytes);
    }
    if bytes.len() as u64 > MAX_TABLE_BYTES {
        return Err(Error::InvalidArgument(
            "the snapshot table would exceed 64 MiB".into(),
        ));
    }
    let new_off = if bytes.is_empty() {
        0
    } else {
        let clusters = (bytes.len() as u64).div_ceil(cs);
        let off = m.alloc(file, clusters).await?;
        bytes.resize((clusters * cs) as usize, 0);
        m.write_refblocks(file).await?;
        file.write(off, &bytes).await?;
        file.flush().await?;
        off
    };
    let old_len = if old_nb == 0 {
        0
    } else {
        let old = read_table_len(m, file, old_nb, old_off).await?;
        old.div_ceil(cs)
    };
    m.hdr[OFF_NB_SNAPSHOTS..OFF_NB_SNAPSHOTS + 4]
        .copy_from_slice(&(snaps.len() as u32).to_be_bytes());
    m.hdr[OFF_NB_SNAPSHOTS + 4..OFF_NB_SNAPSHOTS + 12].copy_from_slice(&new_off.to_be_bytes());
    m.write_header(file, OFF_NB_SNAPSHOTS, OFF_NB_SNAPSHOTS + 12)
        .await?;
    file.flush().await?;
    if old_len > 0 {
        m.decref(file, old_off / cs, old_len).await?;
        m.write_refblocks(file).await?;
        file.flush().await?;
    }
    Ok(())
}

/// The byte length of the snapshot table on disk (entries padded to 8).
async fn read_table_len(m: &Meta, file: RequestRef<'_>, nb: u32, start: u64) -> Result<u64> {
    let mut off = start;
    for _ in 0..nb {
        let h = read_file(file, m.geo.align, m.file_len, off, 40).await?;
        let rest = u64::from(be32(&h, 36))
            + u64::from(u16::from_be_bytes([h[12], h[13]]))
            + u64::from(u16::from_be_bytes([h[14], h[15]]));
        off = (off + 40 + rest).div_ceil(8) * 8;
    }
    Ok(off - start)
}

/// The index of the snapshot whose id, or else whose name, is `key`.
fn find(snaps: &[Snap], key: &str) -> Result<usize> {
    snaps
        .iter()
        .position(|s| s.info.id == key)
        .or_else(|| snaps.iter().position(|s| s.info.name == key))
        .ok_or_else(|| Error::InvalidArgument(format!("no snapshot with id or name '{key}'")))
}

impl Qcow2Driver {
    /// Opens the image on `file` for a snapshot operation: writable when
    /// `write`, internal snapshots allowed.
    async fn open_for_snapshots(
        file: RequestRef<'_>,
        mut options: Qcow2Options,
        write: bool,
    ) -> Result<Qcow2Driver> {
        options.read_only = !write;
        Self::open_in_request(file, options).await
    }

    /// The image's internal snapshots, in table order.
    ///
    /// One request entering the graph at `node`, this driver's node.
    pub async fn snapshots(&self, node: IoRef<'_>) -> Result<Vec<SnapshotInfo>> {
        self.own_node(node)?;
        let (_request, node) = node.admit()?;
        let file = crate::driver::require_child(node, crate::ChildRole::File)?;
        let m = self.meta.lock().await;
        let snaps = read_table(&m, file, self.limits.max_l1_bytes).await?;
        Ok(snaps.into_iter().map(|s| s.info).collect())
    }

    /// Lists the internal snapshots of the qcow2 image held by `file` (a
    /// node nobody else uses), like `qemu-img snapshot -l`.
    ///
    /// One request entering the graph at `file`.
    pub async fn list_snapshots(
        file: IoRef<'_>,
        options: Qcow2Options,
    ) -> Result<Vec<SnapshotInfo>> {
        let (_request, file) = file.admit()?;
        let drv = Self::open_for_snapshots(file, options, false).await?;
        let m = drv.meta.lock().await;
        let snaps = read_table(&m, file, drv.limits.max_l1_bytes).await?;
        Ok(snaps.into_iter().map(|s| s.info).collect())
    }

    /// Creates internal snapshot `name` of the image held by `file` (a
    /// writable node nobody else uses), like `qemu-img snapshot -c`. Its
    /// id is one more than the largest numeric id. Names must be unique
    /// (QEMU only insists on unique ids; a second snapshot of the same
    /// name would make `-a NAME` ambiguous).
    ///
    /// One request entering the graph at `file`.
    pub async fn create_snapshot(
        file: IoRef<'_>,
        options: Qcow2Options,
        name: &str,
    ) -> Result<SnapshotInfo> {
        let (_request, file) = file.admit()?;
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::InvalidArgument(
                "a snapshot name must be 1 to 1023 bytes".into(),
            ));
        }
        let drv = Self::open_for_snapshots(file, options, true).await?;
        let size = drv.size();
        let mut m = drv.meta.lock().await;
        let mut snaps = read_table(&m, file, drv.limits.max_l1_bytes).await?;
        if snaps.iter().any(|s| s.info.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named '{name}' already exists"
            )));
        }
        if snaps.len() >= MAX_SNAPSHOTS {
            return Err(Error::InvalidArgument("too many snapshots".into()));
        }
        let id = snaps
            .iter()
            .filter_map(|s| s.info.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        sync(&mut m, file).await?;
        let active = m.l1.clone();
        check_room(&mut m, file, &active).await?;

        // The copy of the active L1 table.
        let cs = m.geo.cs;
        let l1_size = m.l1.len() as u32;
        let l1_offset = if l1_size == 0 {
            0
        } else {
            let clusters = (u64::from(l1_size) * 8).div_ceil(cs);
            let off = m.alloc(file, clusters).await?;
            let mut bytes = Vec::with_capacity((clusters * cs) as usize);
            for e in &m.l1 {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            bytes.resize((clusters * cs) as usize, 0);
            file.write(off, &bytes).await?;
            off
        };
        // One more reference to everything it reaches; the active tables'
        // copied flags drop where clusters are now shared.
        update_active(&mut m, file, 1).await?;
        sync(&mut m, file).await?;

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let info = SnapshotInfo {
            id: id.to_string(),
            name: name.to_owned(),
            vm_state_size: 0,
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            disk_size: Some(size),
            // What qemu-img records (it has no replay clock).
            icount: Some(0),
        };
        let mut extra = Vec::with_capacity(24);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&size.to_be_bytes());
        extra.extend_from_slice(&0u64.to_be_bytes());
        snaps.push(Snap {
            info: info.clone(),
            l1_offset,
            l1_size,
            extra,
        });
        write_table(&mut m, file, &snaps).await?;
        Ok(info)
    }

    /// Deletes the internal snapshot whose id (or else name) is `key`, like
    /// `qemu-img snapshot -d`, releasing the clusters only it used.
    ///
    /// One request entering the graph at `file` (writable, not in use).
    pub async fn delete_snapshot(file: IoRef<'_>, options: Qcow2Options, key: &str) -> Result<()> {
        let (_request, file) = file.admit()?;
        let drv = Self::open_for_snapshots(file, options, true).await?;
        let mut m = drv.meta.lock().await;
        let mut snaps = read_table(&m, file, drv.limits.max_l1_bytes).await?;
        let sn = snaps.remove(find(&snaps, key)?);
        let mut l1 = read_l1(&m, file, sn.l1_offset, sn.l1_size).await?;
        sync(&mut m, file).await?;
        // Gone from the table first: a crash after this leaks at worst.
        write_table(&mut m, file, &snaps).await?;
        update_refcounts(&mut m, file, &mut l1, -1).await?;
        if sn.l1_size > 0 {
            let cs = m.geo.cs;
            m.decref(
                file,
                sn.l1_offset / cs,
                (u64::from(sn.l1_size) * 8).div_ceil(cs),
            )
            .await?;
        }
        update_active(&mut m, file, 0).await?;
        sync(&mut m, file).await
    }

    /// Makes the disk read as it did when the snapshot whose id (or else
    /// name) is `key` was taken, like `qemu-img snapshot -a`: the active
    /// L1 table becomes a copy of the snapshot's (the virtual size too,
    /// where it differs). What the active layer held and no snapshot
    /// shares is released.
    ///
    /// One request entering the graph at `file` (writable, not in use).
    pub async fn apply_snapshot(file: IoRef<'_>, options: Qcow2Options, key: &str) -> Result<()> {
        let (_request, file) = file.admit()?;
        let drv = Self::open_for_snapshots(file, options, true).await?;
        // Applying changes guest data: persistent bitmaps stop describing
        // it (marked in use first, as guest writes do).
        drv.before_change(file).await?;
        let mut m = drv.meta.lock().await;
        let snaps = read_table(&m, file, drv.limits.max_l1_bytes).await?;
        let sn = &snaps[find(&snaps, key)?];
        let mut sn_l1 = read_l1(&m, file, sn.l1_offset, sn.l1_size).await?;
        sync(&mut m, file).await?;
        check_room(&mut m, file, &sn_l1).await?;
        if sn_l1.len() > m.l1.len() {
            m.grow_l1(file, sn_l1.len() as u64).await?;
        }
        // The snapshot's clusters gain the active table's reference first.
        update_refcounts(&mut m, file, &mut sn_l1, 1).await?;
        sync(&mut m, file).await?;
        sn_l1.resize(m.l1.len(), 0);
        let old = std::mem::replace(&mut m.l1, sn_l1);
        m.l1_dirty = Some((0, m.l1.len() * 8));
        sync(&mut m, file).await?;
        // The on-disk active table is the snapshot's now: the old one's
        // clusters lose their reference.
        let mut old = old;
        update_refcounts(&mut m, file, &mut old, -1).await?;
        update_active(&mut m, file, 0).await?;
        if let Some(size) = sn.info.disk_size {
            if size != drv.size() {
                m.write_size(file, size).await?;
            }
        }
        sync(&mut m, file).await
    }
}
