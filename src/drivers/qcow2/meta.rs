//! The image's metadata as kept in memory (L1 table, cached L2 tables,
//! refcount table, cached refcount blocks), and the order in which it is
//! written back.
//!
//! # Write ordering (crash consistency)
//!
//! Data clusters are written straight to the file; metadata changes are
//! collected in the caches and written back by [`Meta::write_back`] (on
//! flush) or on eviction, always in this order:
//!
//! 1. refcount blocks (increments for newly allocated clusters),
//! 2. a flush of the file (refcounts and guest data are now durable),
//! 3. L2 tables (now pointing to those clusters),
//! 4. another flush, then the L1 table (now pointing to new L2 tables).
//!
//! So on disk a table never references a cluster whose refcount is not yet
//! durable, and never references data that was not flushed first.
//! Refcount *decrements* go the other way round: a freed cluster is only
//! queued ([`Meta::free_later`]) and its refcount drops after the tables that
//! referenced it are durable (see `Qcow2Driver::flush`). A crash at any
//! point therefore leaves at worst leaked clusters (refcount higher than
//! the references), which `qemu-img check -r leaks` repairs; flushed
//! writes are never lost. New refcount blocks and a moved refcount table
//! are written synchronously, each behind a flush, before anything uses
//! them.

use crate::graph::proof::RequestRef;
use crate::types::Result;

use super::bitmap::{BitmapDir, LoadedBitmap};
use super::cache::{RawBlock, Table, TableCache};
use super::entry::{decode_l1, decode_l2, decode_rt, rc_get, rc_max, rc_set, COPIED};
use super::geometry::Geo;
use super::header::{
    be64, invalid, AUTOCLEAR_BITMAPS, OFF_AUTOCLEAR, OFF_L1_SIZE, OFF_L1_TABLE, OFF_REFCOUNT_TABLE,
    OFF_SIZE,
};

/// Everything about the image that changes, behind the driver's
/// metadata lock.
pub(crate) struct Meta {
    pub geo: Geo,
    /// The first cluster as on disk (header, extensions, backing name).
    pub hdr: Vec<u8>,
    pub l1_offset: u64,
    pub l1: Vec<u64>,
    /// Changed bytes of the L1 table, not yet written.
    pub l1_dirty: Option<(usize, usize)>,
    pub l2: TableCache<Vec<u64>>,
    pub rt_offset: u64,
    pub rt: Vec<u64>,
    pub rb: TableCache<RawBlock>,
    /// No cluster below this index is free.
    pub free_hint: u64,
    /// What we know the file's length to be (grows as we allocate).
    pub file_len: u64,
    /// Freed clusters whose refcounts drop at the next flush.
    pub pending_frees: Vec<(u64, u64)>,
    /// The persistent dirty bitmaps' directory (when the image has a
    /// consistent bitmaps extension).
    pub bitmaps: Option<BitmapDir>,
    /// Bitmaps read at open, until `open` adds them to the node.
    pub loaded_bitmaps: Vec<LoadedBitmap>,
    /// A digest of the bitmaps as last loaded or stored: storing the same
    /// again writes nothing (`bitmap_store.rs`).
    pub bitmaps_fingerprint: Option<u64>,
    /// Set when metadata was found corrupt: writes are refused from then on.
    pub broken: Option<String>,
}

fn round_out(start: usize, end: usize, align: usize, limit: usize) -> (usize, usize) {
    let s = start / align * align;
    let e = end.div_ceil(align) * align;
    (s, e.min(limit.max(s)))
}

impl Meta {
    // ---- raw metadata I/O ----------------------------------------------

    async fn write_table<T: Table>(
        file: RequestRef<'_>,
        align: u64,
        table_len: usize,
        offset: u64,
        table: &T,
        (start, end): (usize, usize),
    ) -> Result<()> {
        let (s, e) = round_out(start, end, align as usize, table_len);
        let bytes = table.bytes(s, e);
        file.write(offset + s as u64, &bytes).await
    }

    /// Reads a cluster-sized table at `offset` (inside the file: checked by
    /// the caller).
    async fn read_cluster(&self, file: RequestRef<'_>, offset: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.geo.cs as usize];
        file.read(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Writes bytes `start..end` of the in-memory header cluster.
    pub(crate) async fn write_header(
        &self,
        file: RequestRef<'_>,
        start: usize,
        end: usize,
    ) -> Result<()> {
        let (s, e) = round_out(start, end, self.geo.align as usize, self.hdr.len());
        file.write(s as u64, &self.hdr[s..e]).await
    }

    // ---- L2 tables -----------------------------------------------------

    /// The cache slot holding the L2 table at `offset`, loading it.
    pub(crate) async fn l2_slot(&mut self, file: RequestRef<'_>, offset: u64) -> Result<usize> {
        if let Some(i) = self.l2.lookup(offset) {
            return Ok(i);
        }
        while self.l2.is_full() {
            Box::pin(self.evict_l2(file)).await?;
        }
        let raw = self.read_cluster(file, offset).await?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(self.l2.insert(offset, table, None))
    }

    async fn evict_l2(&mut self, file: RequestRef<'_>) -> Result<()> {
        let Some(v) = self.l2.victim() else {
            return Ok(());
        };
        if self.l2.get(v).dirty.is_some() {
            // The table may point to clusters whose refcounts are still in
            // the cache: those go first, behind a flush.
            if self.rb.has_dirty() {
                self.write_refblocks(file).await?;
                file.flush().await?;
            }
            self.write_l2(file, v).await?;
        }
        self.l2.remove(v);
        Ok(())
    }

    async fn write_l2(&mut self, file: RequestRef<'_>, i: usize) -> Result<()> {
        Self::write_slot(file, self.geo.align, self.geo.cs as usize, &mut self.l2, i).await
    }

    /// Writes back the dirty part of cache slot `i` (an L2 table or a
    /// refcount block) and marks it clean.
    async fn write_slot<T: Table>(
        file: RequestRef<'_>,
        align: u64,
        table_len: usize,
        cache: &mut TableCache<T>,
        i: usize,
    ) -> Result<()> {
        let slot = cache.get(i);
        if let Some(range) = slot.dirty {
            Self::write_table(file, align, table_len, slot.offset, &slot.table, range).await?;
            cache.get_mut(i).dirty = None;
        }
        Ok(())
    }

    /// The L2 table offset for L1 index `l1i` (`None`: not allocated).
    pub(crate) fn l2_offset(&self, l1i: u64) -> Result<Option<u64>> {
        let raw = *self
            .l1
            .get(l1i as usize)
            .ok_or_else(|| invalid(format!("L1 index {l1i} beyond the L1 table")))?;
        decode_l1(&self.geo, raw, self.file_len)
    }

    /// The raw L2 entry for guest cluster `gc` (0 when its table is missing).
    pub(crate) async fn l2_entry(&mut self, file: RequestRef<'_>, gc: u64) -> Result<u64> {
        let l1i = gc / self.geo.l2_entries;
        match self.l2_offset(l1i)? {
            None => Ok(0),
            Some(off) => {
                let s = self.l2_slot(file, off).await?;
                Ok(self.l2.get(s).table[(gc % self.geo.l2_entries) as usize])
            }
        }
    }

    /// Makes sure guest cluster `gc` has an L2 table, allocating an empty one.
    pub(crate) async fn ensure_l2(&mut self, file: RequestRef<'_>, gc: u64) -> Result<u64> {
        let l1i = gc / self.geo.l2_entries;
        if let Some(off) = self.l2_offset(l1i)? {
            if self.l1[l1i as usize] & COPIED == 0 {
                // Shared with a snapshot: copy on write (`cow_l2`).
                return self.cow_l2(file, l1i, off).await;
            }
            return Ok(off);
        }
        let off = self.alloc(file, 1).await?;
        while self.l2.is_full() {
            self.evict_l2(file).await?;
        }
        let entries = self.geo.l2_entries as usize;
        // Dirty as a whole: the cluster on disk holds garbage until written.
        self.l2
            .insert(off, vec![0u64; entries], Some((0, self.geo.cs as usize)));
        self.l1[l1i as usize] = off | COPIED;
        self.mark_l1(l1i as usize);
        Ok(off)
    }

    /// Gives L1 entry `l1i`, whose L2 table at `old` is shared (no copied
    /// flag), a copy of its own, and returns the copy's offset.
    ///
    /// The clusters the table references keep their refcounts: a
    /// reference is a path from an L1 table, and the active table's paths
    /// only move from the old L2 table to the copy (QEMU's `l2_allocate`
    /// does the same). The copy's own refcount is durable, and the copy is
    /// written and durable, before the L1 entry points to it (written back
    /// with the L1 table); the old table loses the active table's
    /// reference only after that, as any freed cluster does
    /// ([`Meta::free_later`]). A crash leaks at worst. The copy's entries
    /// have no copied flag: everything it references is still shared.
    pub(crate) async fn cow_l2(&mut self, file: RequestRef<'_>, l1i: u64, old: u64) -> Result<u64> {
        let g = self.geo;
        let s = self.l2_slot(file, old).await?;
        let mut table = self.l2.get(s).table.clone();
        for raw in table.iter_mut() {
            decode_l2(&g, *raw)?;
            *raw &= !COPIED;
        }
        let new = self.alloc(file, 1).await?;
        self.write_refblocks(file).await?;
        file.flush().await?;
        let mut bytes = Vec::with_capacity(g.cs as usize);
        for e in &table {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        file.write(new, &bytes).await?;
        file.flush().await?;
        self.l1[l1i as usize] = new | COPIED;
        let (a, b) = (l1i as usize * 8, l1i as usize * 8 + 8);
        self.l1_dirty = Some(match self.l1_dirty {
            Some((x, y)) => (x.min(a), y.max(b)),
            None => (a, b),
        });
        self.free_later(old / g.cs, 1);
        Ok(new)
    }

    fn mark_l1(&mut self, i: usize) {
        let (s, e) = (i * 8, i * 8 + 8);
        self.l1_dirty = Some(match self.l1_dirty {
            Some((a, b)) => (a.min(s), b.max(e)),
            None => (s, e),
        });
    }

    /// Sets the L2 entry of guest cluster `gc` (its table must exist).
    pub(crate) async fn set_l2_entry(
        &mut self,
        file: RequestRef<'_>,
        gc: u64,
        raw: u64,
    ) -> Result<()> {
        let l1i = gc / self.geo.l2_entries;
        let off = self
            .l2_offset(l1i)?
            .ok_or_else(|| invalid("internal: L2 table vanished"))?;
        let s = self.l2_slot(file, off).await?;
        let idx = (gc % self.geo.l2_entries) as usize;
        self.l2.get_mut(s).table[idx] = raw;
        self.l2.mark_dirty(s, idx * 8, idx * 8 + 8);
        Ok(())
    }

    // ---- refcounts -----------------------------------------------------

    async fn evict_rb(&mut self, file: RequestRef<'_>) -> Result<()> {
        let Some(v) = self.rb.victim() else {
            return Ok(());
        };
        // Refcount blocks only ever hold increments that may go out early,
        // and decrements whose references are already gone from disk.
        self.write_rb(file, v).await?;
        self.rb.remove(v);
        Ok(())
    }

    async fn write_rb(&mut self, file: RequestRef<'_>, i: usize) -> Result<()> {
        Self::write_slot(file, self.geo.align, self.geo.cs as usize, &mut self.rb, i).await
    }

    pub(crate) async fn write_refblocks(&mut self, file: RequestRef<'_>) -> Result<()> {
        for i in self.rb.dirty_slots() {
            self.write_rb(file, i).await?;
        }
        Ok(())
    }

    /// The cache slot of refcount block `ti` (`None`: not allocated).
    async fn rb_slot(&mut self, file: RequestRef<'_>, ti: u64) -> Result<Option<usize>> {
        let Some(&raw) = self.rt.get(ti as usize) else {
            return Ok(None);
        };
        let Some(off) = decode_rt(&self.geo, raw, self.file_len)? else {
            return Ok(None);
        };
        if let Some(i) = self.rb.lookup(off) {
            return Ok(Some(i));
        }
        while self.rb.is_full() {
            self.evict_rb(file).await?;
        }
        let raw = self.read_cluster(file, off).await?;
        Ok(Some(self.rb.insert(off, RawBlock(raw), None)))
    }

    /// A copy of the refcount block at `off`, through the cache.
    pub(crate) async fn read_block(&mut self, file: RequestRef<'_>, off: u64) -> Result<Vec<u8>> {
        if let Some(i) = self.rb.lookup(off) {
            return Ok(self.rb.get(i).table.0.clone());
        }
        self.read_cluster(file, off).await
    }

    /// The refcount of host cluster `c`.
    pub(crate) async fn refcount(&mut self, file: RequestRef<'_>, c: u64) -> Result<u64> {
        let (ti, i) = (c / self.geo.rb_entries, c % self.geo.rb_entries);
        Ok(match self.rb_slot(file, ti).await? {
            None => 0,
            Some(s) => rc_get(&self.rb.get(s).table.0, self.geo.refcount_order, i as usize),
        })
    }

    /// Sets the refcount of host cluster `c`, whose refcount block exists.
    pub(crate) async fn set_refcount(
        &mut self,
        file: RequestRef<'_>,
        c: u64,
        v: u64,
    ) -> Result<()> {
        if v > rc_max(self.geo.refcount_order) {
            return Err(invalid(format!("refcount of cluster {c} would overflow")));
        }
        let (ti, i) = (c / self.geo.rb_entries, c % self.geo.rb_entries);
        let s = self
            .rb_slot(file, ti)
            .await?
            .ok_or_else(|| invalid(format!("no refcount block for cluster {c}")))?;
        let order = self.geo.refcount_order;
        let (a, b) = rc_set(&mut self.rb.get_mut(s).table.0, order, i as usize, v);
        self.rb.mark_dirty(s, a, b);
        Ok(())
    }

    /// Drops one reference to each of `n` clusters from `c`, now.
    pub(crate) async fn decref(&mut self, file: RequestRef<'_>, c: u64, n: u64) -> Result<()> {
        for c in c..c + n {
            let v = self.refcount(file, c).await?;
            if v == 0 {
                return Err(invalid(format!(
                    "refcount of cluster {c} would drop below zero"
                )));
            }
            self.set_refcount(file, c, v - 1).await?;
            if v == 1 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    /// Queues `n` clusters from `c` to lose a reference once the tables that
    /// stopped referencing them are durable.
    pub(crate) fn free_later(&mut self, c: u64, n: u64) {
        if let Some(last) = self.pending_frees.last_mut() {
            if last.0 + last.1 == c {
                last.1 += n;
                return;
            }
        }
        self.pending_frees.push((c, n));
    }

    /// The first run of `n` free clusters at or after the free hint.
    async fn find_free_run(&mut self, file: RequestRef<'_>, n: u64) -> Result<u64> {
        let rbe = self.geo.rb_entries;
        let mut c = self.free_hint;
        let mut start = c;
        let mut len = 0;
        while len < n {
            let ti = c / rbe;
            let slot = self.rb_slot(file, ti).await?;
            match slot {
                None => {
                    // No block: the whole range it would cover is free.
                    let take = (n - len).min((ti + 1) * rbe - c);
                    len += take;
                    c += take;
                }
                Some(s) => {
                    let v = rc_get(
                        &self.rb.get(s).table.0,
                        self.geo.refcount_order,
                        (c % rbe) as usize,
                    );
                    if v == 0 {
                        len += 1;
                    } else {
                        if c == self.free_hint {
                            self.free_hint = c + 1;
                        }
                        len = 0;
                        start = c + 1;
                    }
                    c += 1;
                }
            }
            if c.checked_mul(self.geo.cs)
                .is_none_or(|e| e > self.geo.max_host)
            {
                return Err(invalid(format!(
                    "image would grow past the host offset limit of {} bytes",
                    self.geo.max_host
                )));
            }
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1); returns the offset
    /// of the first.
    ///
    /// Refcount blocks missing for the run are allocated with it, right
    /// after it, so that the run and its metadata form one area whose
    /// every cluster is described by a block of the area or an existing
    /// one. (Placing a block inside the range it covers, as QEMU often
    /// does, can split every candidate run when blocks cover few clusters.)
    pub(crate) async fn alloc(&mut self, file: RequestRef<'_>, n: u64) -> Result<u64> {
        let rbe = self.geo.rb_entries;
        let cs = self.geo.cs;
        let mut nb = 0u64;
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 64 {
                return Err(invalid("internal: cluster allocation did not converge"));
            }
            let start = self.find_free_run(file, n + nb).await?;
            let end = start + n + nb;
            let last_ti = (end - 1) / rbe;
            if last_ti >= self.rt.len() as u64 {
                Box::pin(self.grow_table(file, last_ti)).await?;
                continue;
            }
            let missing: Vec<u64> = (start / rbe..=last_ti)
                .filter(|&t| self.rt[t as usize] == 0)
                .collect();
            if missing.first() == Some(&0) {
                return Err(invalid("refcount block 0 is missing"));
            }
            if missing.len() as u64 > nb {
                nb = missing.len() as u64;
                continue;
            }
            // Clusters that become used: the run, then one block per
            // missing range (spare clusters after them stay free).
            let used_end = start + n + missing.len() as u64;
            let mut blocks: Vec<Vec<u8>> = missing.iter().map(|_| vec![0u8; cs as usize]).collect();
            for c in start..used_end {
                let t = c / rbe;
                if let Some(j) = missing.iter().position(|&x| x == t) {
                    rc_set(
                        &mut blocks[j],
                        self.geo.refcount_order,
                        (c % rbe) as usize,
                        1,
                    );
                } else {
                    self.set_refcount(file, c, 1).await?;
                }
            }
            if !blocks.is_empty() {
                // New blocks are durable before the table points to them.
                for (j, block) in blocks.iter().enumerate() {
                    file.write((start + n + j as u64) * cs, block).await?;
                }
                file.flush().await?;
                for (j, &t) in missing.iter().enumerate() {
                    self.rt[t as usize] = (start + n + j as u64) * cs;
                }
                let lo = missing[0] as usize * 8;
                let hi = *missing.last().expect("not empty") as usize * 8 + 8;
                let rt = std::mem::take(&mut self.rt);
                let r = Self::write_table(
                    file,
                    self.geo.align,
                    rt.len() * 8,
                    self.rt_offset,
                    &rt,
                    (lo, hi),
                )
                .await;
                self.rt = rt;
                r?;
                for (j, block) in blocks.into_iter().enumerate() {
                    while self.rb.is_full() {
                        self.evict_rb(file).await?;
                    }
                    self.rb
                        .insert((start + n + j as u64) * cs, RawBlock(block), None);
                }
            }
            if start == self.free_hint {
                self.free_hint = used_end;
            }
            self.file_len = self.file_len.max(used_end * cs);
            return Ok(start * cs);
        }
    }

    /// Replaces the refcount table by a larger one that has an entry `ti`.
    async fn grow_table(&mut self, file: RequestRef<'_>, ti: u64) -> Result<()> {
        let cs = self.geo.cs;
        let rbe = self.geo.rb_entries;
        let per_cluster = cs / 8;
        let old_len = self.rt.len() as u64;
        let mut entries = (ti + 1)
            .max(old_len + old_len / 2 + 1)
            .div_ceil(per_cluster)
            * per_cluster;
        let mut nblocks = 0u64;
        let mut rounds = 0;
        let (p, tc, need) = loop {
            rounds += 1;
            if entries * 8 > self.geo.max_rt_bytes {
                return Err(invalid(format!(
                    "refcount table would exceed the limit of {} bytes",
                    self.geo.max_rt_bytes
                )));
            }
            let tc = entries * 8 / cs;
            let k = nblocks + tc;
            let p = self.find_free_run(file, k).await?;
            let mut need: Vec<u64> = (p / rbe..=(p + k - 1) / rbe)
                .filter(|&t| t >= old_len || self.rt[t as usize] == 0)
                .collect();
            if !need.contains(&ti) {
                need.push(ti);
                need.sort_unstable();
            }
            let max_ti = *need.last().expect("ti is needed");
            let want = (max_ti + 1).div_ceil(per_cluster) * per_cluster;
            if want > entries {
                entries = want;
                continue;
            }
            if need.len() as u64 > nblocks {
                nblocks = need.len() as u64;
                continue;
            }
            if rounds > 64 {
                return Err(invalid("internal: refcount table growth did not converge"));
            }
            break (p, tc, need);
        };
        let table_start = p + nblocks;
        let mut new_rt = self.rt.clone();
        new_rt.resize(entries as usize, 0);
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (j, &t) in need.iter().enumerate() {
            let c = p + j as u64;
            new_rt[t as usize] = c * cs;
            blocks.push((t, vec![0u8; cs as usize]));
        }
        let used: Vec<u64> = (p..p + need.len() as u64)
            .chain(table_start..table_start + tc)
            .collect();
        for &u in &used {
            let t = u / rbe;
            if let Some(j) = need.iter().position(|&x| x == t) {
                rc_set(
                    &mut blocks[j].1,
                    self.geo.refcount_order,
                    (u % rbe) as usize,
                    1,
                );
            } else {
                self.set_refcount(file, u, 1).await?;
            }
        }
        // Refcounts, new blocks, new table: durable before the header
        // switches to the new table.
        self.write_refblocks(file).await?;
        for (j, (_, block)) in blocks.iter().enumerate() {
            file.write((p + j as u64) * cs, block).await?;
        }
        let bytes = new_rt.bytes(0, (tc * cs) as usize);
        file.write(table_start * cs, &bytes).await?;
        file.flush().await?;
        let old_off = self.rt_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.hdr[OFF_REFCOUNT_TABLE..OFF_REFCOUNT_TABLE + 8]
            .copy_from_slice(&(table_start * cs).to_be_bytes());
        self.hdr[OFF_REFCOUNT_TABLE + 8..OFF_REFCOUNT_TABLE + 12]
            .copy_from_slice(&(tc as u32).to_be_bytes());
        self.write_header(file, OFF_REFCOUNT_TABLE, OFF_REFCOUNT_TABLE + 12)
            .await?;
        file.flush().await?;
        self.rt = new_rt;
        self.rt_offset = table_start * cs;
        self.file_len = self.file_len.max((table_start + tc) * cs);
        for (j, (_, block)) in blocks.into_iter().enumerate() {
            while self.rb.is_full() {
                self.evict_rb(file).await?;
            }
            self.rb.insert((p + j as u64) * cs, RawBlock(block), None);
        }
        // The old table is no longer referenced on disk.
        self.decref(file, old_off / cs, old_clusters).await?;
        Ok(())
    }

    // ---- resizing --------------------------------------------------------

    /// Replaces the L1 table by one of `entries` entries (more than now) in
    /// fresh clusters, as QEMU's `qcow2_grow_l1_table` does.
    ///
    /// Order (each step durable before the next, so a crash leaves either
    /// the old table or the new one, and at worst leaked clusters):
    /// 1. every cached change is written back and flushed, so the old table
    ///    on disk says what the one in memory says;
    /// 2. clusters for the new table are allocated (refcount 1; the
    ///    refcount table grows first if it must), their refcounts written,
    ///    the new table written (old entries, then zeroes) and flushed;
    /// 3. the header's L1 size and offset (adjacent fields, one write of 12
    ///    bytes inside the first sector) switch to it, flushed;
    /// 4. the old table's clusters lose their reference.
    ///
    /// The header's virtual size is not changed here: an L1 table larger
    /// than the size needs is valid.
    pub(crate) async fn grow_l1(&mut self, file: RequestRef<'_>, entries: u64) -> Result<()> {
        let cs = self.geo.cs;
        let old_len = self.l1.len() as u64;
        debug_assert!(entries > old_len);
        let entries_u32 = u32::try_from(entries)
            .map_err(|_| invalid(format!("an L1 table of {entries} entries")))?;
        self.write_back(file).await?;
        file.flush().await?;

        let clusters = (entries * 8).div_ceil(cs);
        let new_off = self.alloc(file, clusters).await?;
        self.write_refblocks(file).await?;
        let mut table = self.l1.clone();
        table.resize((clusters * cs / 8) as usize, 0);
        file.write(new_off, &table.bytes(0, (clusters * cs) as usize))
            .await?;
        file.flush().await?;

        self.hdr[OFF_L1_SIZE..OFF_L1_SIZE + 4].copy_from_slice(&entries_u32.to_be_bytes());
        self.hdr[OFF_L1_TABLE..OFF_L1_TABLE + 8].copy_from_slice(&new_off.to_be_bytes());
        self.write_header(file, OFF_L1_SIZE, OFF_L1_TABLE + 8)
            .await?;
        file.flush().await?;

        let old_off = self.l1_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        table.truncate(entries as usize);
        self.l1 = table;
        self.l1_offset = new_off;
        self.l1_dirty = None;
        if old_clusters > 0 {
            // Nothing reads the old table again: the one in memory is the
            // new one, and on disk the header no longer points to it.
            self.decref(file, old_off / cs, old_clusters).await?;
        }
        Ok(())
    }

    /// Writes the virtual size into the header (not flushed).
    pub(crate) async fn write_size(&mut self, file: RequestRef<'_>, size: u64) -> Result<()> {
        self.hdr[OFF_SIZE..OFF_SIZE + 8].copy_from_slice(&size.to_be_bytes());
        self.write_header(file, OFF_SIZE, OFF_SIZE + 8).await
    }

    // ---- write-back ------------------------------------------------------

    /// Writes every cached change back, in the order described in the
    /// module docs. Does not flush at the end.
    pub(crate) async fn write_back(&mut self, file: RequestRef<'_>) -> Result<()> {
        self.write_refblocks(file).await?;
        let l2_dirty = self.l2.has_dirty();
        if l2_dirty || self.l1_dirty.is_some() {
            file.flush().await?;
        }
        if l2_dirty {
            for i in self.l2.dirty_slots() {
                self.write_l2(file, i).await?;
            }
        }
        if let Some(range) = self.l1_dirty {
            if l2_dirty {
                file.flush().await?;
            }
            let table_len =
                ((self.l1.len() as u64 * 8).div_ceil(self.geo.cs) * self.geo.cs) as usize;
            let (s, e) = round_out(range.0, range.1, self.geo.align as usize, table_len);
            let mut bytes = vec![0u8; e - s];
            for (k, chunk) in bytes.chunks_exact_mut(8).enumerate() {
                let idx = s / 8 + k;
                if let Some(v) = self.l1.get(idx) {
                    chunk.copy_from_slice(&v.to_be_bytes());
                }
            }
            file.write(self.l1_offset + s as u64, &bytes).await?;
            self.l1_dirty = None;
        }
        Ok(())
    }

    /// Whether anything is waiting to be written back.
    pub(crate) fn is_dirty(&self) -> bool {
        self.l1_dirty.is_some()
            || self.l2.has_dirty()
            || self.rb.has_dirty()
            || !self.pending_frees.is_empty()
    }

    // ---- persistent bitmaps and auto-clear bits ---------------------------

    /// Marks every bitmap in use (possibly inconsistent), durably, before
    /// guest data changes: we do not record dirty regions, so from the
    /// first change on the bitmaps no longer describe the disk.
    ///
    /// The directory is updated in place the way QEMU does it: auto-clear
    /// bit 0 is cleared first (so a crash while the directory is half
    /// written leaves an extension every reader ignores, never a torn one
    /// that claims to be consistent), then the directory is written, then
    /// the bit is set again; each step is flushed before the next.
    pub(crate) async fn mark_bitmaps_in_use(&mut self, file: RequestRef<'_>) -> Result<()> {
        let Some(dir) = self.bitmaps.as_ref() else {
            return Ok(());
        };
        if !dir.any_consistent() {
            return Ok(());
        }
        // Changed in a copy, kept only once durable: after a failure the
        // next write tries again (the bit is set again in every case).
        let mut dir = dir.clone();
        let (s, e) = dir.set_all_in_use();
        let offset = dir.ext.directory_offset;
        let align = self.geo.align as usize;
        let (s, e) = (s / align * align, e.div_ceil(align) * align);
        let e = e.min(dir.raw.len());

        let autoclear = be64(&self.hdr, OFF_AUTOCLEAR);
        self.set_autoclear(file, autoclear & !AUTOCLEAR_BITMAPS)
            .await?;
        file.flush().await?;
        file.write(offset + s as u64, &dir.raw[s..e]).await?;
        file.flush().await?;
        self.set_autoclear(file, autoclear | AUTOCLEAR_BITMAPS)
            .await?;
        file.flush().await?;
        self.bitmaps = Some(dir);
        Ok(())
    }

    /// Writes the auto-clear feature bits into the header (not flushed).
    pub(crate) async fn set_autoclear(&mut self, file: RequestRef<'_>, v: u64) -> Result<()> {
        self.hdr[OFF_AUTOCLEAR..OFF_AUTOCLEAR + 8].copy_from_slice(&v.to_be_bytes());
        self.write_header(file, OFF_AUTOCLEAR, OFF_AUTOCLEAR + 8)
            .await
    }
}
