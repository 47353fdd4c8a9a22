//! The write path (QEMU's `qcow2_co_pwritev_part` with the allocation side
//! of `qcow2-cluster.c`, `qcow2_co_pwrite_zeroes`, `qcow2_co_pdiscard`):
//! rewrites in place, cluster allocation with copy-on-write of partial
//! clusters, clusters in flight, zeroing and discarding, compressed writes,
//! and the marking of persistent bitmaps before the first change.

use std::sync::atomic::Ordering;

use tokio::sync::MutexGuard;

use crate::driver::require_child;
use crate::graph::proof::{IoRef, RequestRef};
use crate::types::{ChildRole, Error, IoBuf, IoVec, Result};

use super::bitmap::BitmapDir;
use super::compressed::deflate_cluster;
use super::entry::{decode_l2, Entry, COMPRESSED, COPIED, ZERO};
use super::header::invalid;
use super::meta::Meta;
use super::state::Qcow2Driver;

/// What a write stores.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    /// The request's data, in as many regions as it came in: each run of
    /// clusters written in place gets its share as a view, not a copy.
    Buf(IoVec<'a>),
    Zeroes,
}

impl Src<'_> {
    fn copy_to(&self, from: usize, dst: &mut [u8]) {
        match self {
            Src::Buf(b) => b.slice(from, dst.len()).copy_to_slice(dst),
            Src::Zeroes => dst.fill(0),
        }
    }
}

/// Removes guest clusters from the in-flight set when an allocation ends,
/// however it ends (also when the request is cancelled).
struct InflightGuard<'a> {
    drv: &'a Qcow2Driver,
    first: u64,
    count: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.drv.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for c in self.first..self.first + self.count {
            set.remove(&c);
        }
        drop(set);
        self.drv.alloc_done.wake_all();
    }
}

/// Host clusters taken for an allocating write, in flight until
/// [`Qcow2Driver::commit_run`] (or dropped: the guard ends that too).
struct Reserved<'a> {
    host: u64,
    /// The first cluster's own zero cluster, not a new allocation.
    reused: bool,
    /// The entries the new clusters replace.
    olds: Vec<Entry>,
    _guard: InflightGuard<'a>,
}

impl Reserved<'_> {
    fn count(&self) -> u64 {
        self.olds.len() as u64
    }
}

impl Qcow2Driver {
    /// [`BlockDriver::writev`](crate::graph::driver::BlockDriver::writev)
    /// (and `write`, with one segment).
    pub(super) async fn do_write(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        buf: IoVec<'_>,
    ) -> Result<()> {
        self.check_writable(node)?;
        let file = require_child(node, ChildRole::File)?;
        // Under `io_lock`: a store of the bitmaps (which holds it
        // exclusively) is wholly before or after this write.
        let _io = self.io_lock.read().await;
        self.before_change(file).await?;
        self.check_request(offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let result = self.write_range(node, offset, len, Src::Buf(buf)).await;
        if result.is_ok() {
            // Before `io_lock` goes: a bitmap store sees this write's bits.
            node.mark_dirty_now(offset, len);
        }
        result
    }

    /// [`BlockDriver::write_buf`](crate::graph::driver::BlockDriver::write_buf):
    /// a request that lies in one run of clusters rewritten in place (the
    /// run [`write_range`](Self::write_range) would write in one go), or
    /// that covers whole clusters which one allocating write takes
    /// together (no old content to merge), goes to the file as the
    /// caller's buffer; anything else (copy-on-write of partial clusters,
    /// several runs) is written by [`do_write`](Self::do_write) from the
    /// buffer, lent.
    pub(super) async fn do_write_buf(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        mut buf: IoBuf,
    ) -> Result<IoBuf> {
        self.check_writable(node)?;
        let file = require_child(node, ChildRole::File)?;
        let len = buf.len() as u64;
        if len > 0 {
            // As in `do_write`: under `io_lock`, marked after.
            let _io = self.io_lock.read().await;
            self.before_change(file).await?;
            self.check_request(offset, len)?;
            if let Some(host) = self.in_place_run(file, offset, len).await? {
                let buf = file.write_buf(host, buf).await?;
                node.mark_dirty_now(offset, len);
                return Ok(buf);
            }
            match self.allocate_whole_run(file, offset, buf).await? {
                Ok(buf) => {
                    node.mark_dirty_now(offset, len);
                    return Ok(buf);
                }
                Err(back) => buf = back,
            }
        }
        self.do_write(node, offset, IoVec::from(&buf[..])).await?;
        Ok(buf)
    }

    /// An allocating write of `buf` at `offset` when it covers whole
    /// clusters that one allocating write takes together: new host
    /// clusters, the buffer written there as it is, then the L2 entries
    /// (as [`write_allocating`](Self::write_allocating) does with a lent
    /// buffer). `Err(buf)` hands the buffer back, untouched, when the
    /// request is not such a run (nothing was allocated).
    async fn allocate_whole_run(
        &self,
        file: RequestRef<'_>,
        offset: u64,
        buf: IoBuf,
    ) -> Result<std::result::Result<IoBuf, IoBuf>> {
        let g = self.geo;
        let len = buf.len() as u64;
        if offset % g.cs != 0 || len % g.cs != 0 {
            return Ok(Err(buf));
        }
        let gc = offset >> g.cluster_bits;
        let m = self.meta.lock().await;
        let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
            return Ok(Err(buf));
        };
        if m.broken.is_some() {
            return Ok(Err(buf));
        }
        let first = decode_l2(&g, m.l2_entry(file, gc).await?)?;
        if matches!(first, Entry::Data { copied: true, .. }) {
            return Ok(Err(buf));
        }
        let olds = self
            .allocating_run(&mut m, file, gc, first, offset + len)
            .await?;
        if olds.len() as u64 != len / g.cs {
            return Ok(Err(buf));
        }
        let run = self.reserve_run(&mut m, file, gc, olds).await?;
        drop(m);
        let (host, mut back) = (run.host, None);
        let res = match file.write_buf(host, buf).await {
            Ok(b) => {
                back = Some(b);
                Ok(())
            }
            Err(e) => Err(e),
        };
        self.commit_run(file, gc, run, res).await?;
        Ok(Ok(back.expect("the write succeeded")))
    }

    /// Where `[offset, offset + len)` is stored in the file if all of it
    /// is one run that [`write_range`](Self::write_range) would rewrite in
    /// place (allocated clusters, ours alone, stored one after the other,
    /// within one L2 table, none being allocated); `None` otherwise.
    async fn in_place_run(
        &self,
        file: RequestRef<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        let g = self.geo;
        let gc = offset >> g.cluster_bits;
        let in_cl = offset & (g.cs - 1);
        let m = self.meta.lock().await;
        let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
            return Ok(None);
        };
        if m.broken.is_some() {
            // `do_write` reports it.
            return Ok(None);
        }
        let Entry::Data { host, copied: true } = decode_l2(&g, m.l2_entry(file, gc).await?)? else {
            return Ok(None);
        };
        let mut n = (g.cs - in_cl).min(len);
        let mut c = gc + 1;
        while n < len && c % g.l2_entries != 0 {
            match decode_l2(&g, m.l2_entry(file, c).await?)? {
                Entry::Data {
                    host: h,
                    copied: true,
                } if h == host + (c - gc) * g.cs => {
                    n += g.cs.min(len - n);
                    c += 1;
                }
                _ => break,
            }
        }
        Ok((n == len).then_some(host + in_cl))
    }

    /// Called before anything changes guest data or the virtual size:
    /// marks the persistent bitmaps in use, durably, the first time.
    pub(super) async fn before_change(&self, file: RequestRef<'_>) -> Result<()> {
        if !self.bitmaps_to_mark.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        if !self.bitmaps_to_mark.load(Ordering::Acquire) {
            return Ok(());
        }
        m.mark_bitmaps_in_use(file).await?;
        let infos = m.bitmaps.as_ref().map(BitmapDir::infos).unwrap_or_default();
        *self.bitmap_infos.lock().unwrap_or_else(|e| e.into_inner()) = infos;
        self.bitmaps_to_mark.store(false, Ordering::Release);
        Ok(())
    }

    /// Waits until guest clusters `gc..gc + count` are not being
    /// allocated. Call with the metadata lock held; returns it when there
    /// was nothing to wait for, and `None` if it had to wait (the lock was
    /// dropped: look again).
    async fn wait_inflight<'s>(
        &'s self,
        m: MutexGuard<'s, Meta>,
        gc: u64,
        count: u64,
    ) -> Option<MutexGuard<'s, Meta>> {
        let allocating = || {
            let set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            (gc..gc + count).any(|c| set.contains(&c))
        };
        if !allocating() {
            return Some(m);
        }
        drop(m);
        std::future::poll_fn(|cx| {
            self.alloc_done
                .poll_until(cx, || (!allocating()).then_some(()))
        })
        .await;
        None
    }

    /// Writes `len` bytes from `src` at guest offset `offset`. The caller
    /// holds `io_lock` shared.
    pub(super) async fn write_range(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        src: Src<'_>,
    ) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let backing = node.child(ChildRole::Backing);
        let g = self.geo;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let gc = pos >> g.cluster_bits;
            let in_cl = pos & (g.cs - 1);
            let m = self.meta.lock().await;
            let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
                continue;
            };
            if let Some(why) = &m.broken {
                return Err(invalid(format!("image found corrupt earlier: {why}")));
            }
            let first = decode_l2(&g, m.l2_entry(file, gc).await?)?;
            if let Entry::Data { host, copied: true } = first {
                // Rewrite in place, extending over the following clusters
                // that are stored right after this one (and also ours alone).
                let mut n = (g.cs - in_cl).min(len - done);
                let mut c = gc + 1;
                while done + n < len && c % g.l2_entries != 0 {
                    match decode_l2(&g, m.l2_entry(file, c).await?)? {
                        Entry::Data {
                            host: h,
                            copied: true,
                        } if h == host + (c - gc) * g.cs => {
                            n += g.cs.min(len - done - n);
                            c += 1;
                        }
                        _ => break,
                    }
                }
                drop(m);
                self.write_in_place(file, host + in_cl, done as usize, n as usize, src)
                    .await?;
                done += n;
                continue;
            }

            // Allocating write (the slow path, boxed so that the common
            // path's future stays small).
            let n = Box::pin(
                self.write_allocating(file, backing, m, gc, first, offset, len, done, src),
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Writes a run of clusters that all need a new host cluster, none of
    /// them in flight, within one L2 table, starting at guest cluster `gc`
    /// (entry `first`) at request byte `done`. Returns the bytes written.
    #[allow(clippy::too_many_arguments)]
    async fn write_allocating(
        &self,
        file: RequestRef<'_>,
        backing: Option<RequestRef<'_>>,
        mut m: MutexGuard<'_, Meta>,
        gc: u64,
        first: Entry,
        offset: u64,
        len: u64,
        done: u64,
        src: Src<'_>,
    ) -> Result<u64> {
        let g = self.geo;
        let pos = offset + done;
        let end = offset + len;
        let olds = self.allocating_run(&mut m, file, gc, first, end).await?;
        let run = self.reserve_run(&mut m, file, gc, olds).await?;
        let file_len = m.file_len;
        drop(m);

        let run_end = ((gc + run.count()) * g.cs).min(end);
        let n = run_end - pos;
        let res = self
            .write_new_clusters(
                file,
                backing,
                file_len,
                gc,
                run.host,
                &run.olds,
                pos,
                n,
                done as usize,
                src,
            )
            .await;
        self.commit_run(file, gc, run, res).await?;
        Ok(n)
    }

    /// The entries of the clusters from `gc` (entry `first`, its L2 table
    /// loaded) that one allocating write up to guest byte `end` takes: up
    /// to the end of the request or of the L2 table, stopping at a
    /// cluster that is in flight or already ours (at most 1024).
    async fn allocating_run(
        &self,
        m: &mut Meta,
        file: RequestRef<'_>,
        gc: u64,
        first: Entry,
        end: u64,
    ) -> Result<Vec<Entry>> {
        let g = self.geo;
        m.ensure_l2(file, gc).await?;
        let last_gc = (end - 1) >> g.cluster_bits;
        let table_last = (gc / g.l2_entries + 1) * g.l2_entries - 1;
        let mut olds = vec![first];
        let mut c = gc + 1;
        while c <= last_gc.min(table_last) && olds.len() < 1024 {
            if self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&c)
            {
                break;
            }
            let e = decode_l2(&g, m.l2_entry(file, c).await?)?;
            if matches!(e, Entry::Data { copied: true, .. }) {
                break;
            }
            olds.push(e);
            c += 1;
        }
        Ok(olds)
    }

    /// Takes host clusters for the run `olds` from guest cluster `gc` (the
    /// first one's own zero cluster when the run is that one cluster, else
    /// newly allocated ones) and marks the run in flight until
    /// [`commit_run`](Self::commit_run).
    async fn reserve_run<'s>(
        &'s self,
        m: &mut Meta,
        file: RequestRef<'_>,
        gc: u64,
        olds: Vec<Entry>,
    ) -> Result<Reserved<'s>> {
        let k = olds.len() as u64;
        let reuse = match olds[0] {
            Entry::Zero {
                host: Some(h),
                copied: true,
            } if k == 1 => Some(h),
            _ => None,
        };
        let host = match reuse {
            Some(h) => h,
            None => m.alloc(file, k).await?,
        };
        let guard = {
            let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for c in gc..gc + k {
                set.insert(c);
            }
            InflightGuard {
                drv: self,
                first: gc,
                count: k,
            }
        };
        Ok(Reserved {
            host,
            reused: reuse.is_some(),
            olds,
            _guard: guard,
        })
    }

    /// Ends an allocating write of `run` from guest cluster `gc` whose data
    /// write gave `res`: on success points the L2 entries at the new
    /// clusters (and frees what they replaced, later); on failure frees
    /// the new clusters. Either way the run leaves the in-flight set.
    async fn commit_run(
        &self,
        file: RequestRef<'_>,
        gc: u64,
        run: Reserved<'_>,
        res: Result<()>,
    ) -> Result<()> {
        let g = self.geo;
        let k = run.count();
        let mut m = self.meta.lock().await;
        if let Err(e) = res {
            if !run.reused {
                // Nothing references the new clusters: free them now.
                let _ = m.decref(file, run.host / g.cs, k).await;
            }
            return Err(e);
        }
        for (j, old) in run.olds.iter().enumerate() {
            let j = j as u64;
            m.set_l2_entry(file, gc + j, (run.host + j * g.cs) | COPIED)
                .await?;
            if !run.reused {
                if let Some((c, cnt)) = old.host_clusters(&g) {
                    m.free_later(c, cnt);
                }
            }
        }
        drop(m);
        Ok(())
    }

    async fn write_in_place(
        &self,
        file: RequestRef<'_>,
        host: u64,
        from: usize,
        n: usize,
        src: Src<'_>,
    ) -> Result<()> {
        match src {
            Src::Buf(b) => file.writev(host, b.slice(from, n)).await,
            Src::Zeroes => {
                let chunk = n.min(1 << 20);
                let zeroes = vec![0u8; chunk];
                let mut off = 0;
                while off < n {
                    let m = chunk.min(n - off);
                    file.write(host + off as u64, &zeroes[..m]).await?;
                    off += m;
                }
                Ok(())
            }
        }
    }

    /// Writes guest bytes `pos..pos+n` into the fresh host clusters at
    /// `host` (one per entry of `olds`), filling the rest of partially
    /// written clusters with their old content.
    #[allow(clippy::too_many_arguments)]
    async fn write_new_clusters(
        &self,
        file: RequestRef<'_>,
        backing: Option<RequestRef<'_>>,
        file_len: u64,
        gc: u64,
        host: u64,
        olds: &[Entry],
        pos: u64,
        n: u64,
        src_from: usize,
        src: Src<'_>,
    ) -> Result<()> {
        let cs = self.geo.cs;
        let end = pos + n;
        let mut j = 0usize;
        while j < olds.len() {
            let c_start = (gc + j as u64) * cs;
            let a = pos.max(c_start);
            let b = end.min(c_start + cs);
            if a == c_start && b == c_start + cs {
                // A run of whole clusters: straight from the source.
                let mut k = j;
                while k < olds.len() && (gc + k as u64 + 1) * cs <= end {
                    k += 1;
                }
                let from = src_from + (c_start - pos) as usize;
                let len = (k - j) as u64 * cs;
                self.write_in_place(file, host + j as u64 * cs, from, len as usize, src)
                    .await?;
                j = k;
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            self.old_content(file, backing, file_len, gc + j as u64, olds[j], &mut buf)
                .await?;
            let from = src_from + (a - pos) as usize;
            src.copy_to(
                from,
                &mut buf[(a - c_start) as usize..(b - c_start) as usize],
            );
            file.write(host + j as u64 * cs, &buf).await?;
            j += 1;
        }
        Ok(())
    }

    /// Makes whole clusters read as zeroes (`discard == false`) or drops
    /// them (`discard == true`); partial clusters are written with zeroes,
    /// or left alone for a discard.
    pub(super) async fn zero_or_discard(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<()> {
        self.check_writable(node)?;
        let file = require_child(node, ChildRole::File)?;
        let _io = self.io_lock.read().await;
        self.before_change(file).await?;
        self.check_request(offset, len)?;
        let result = self
            .zero_or_discard_locked(node, offset, len, discard)
            .await;
        if result.is_ok() {
            node.mark_dirty_now(offset, len);
        }
        result
    }

    /// [`Self::zero_or_discard`] for a caller that holds `io_lock` (shared
    /// or exclusive) and checked the request.
    pub(super) async fn zero_or_discard_locked(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
        discard: bool,
    ) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let has_backing = node.child(ChildRole::Backing).is_some();
        let g = self.geo;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            let c_start = gc * g.cs;
            let c_end = (c_start + g.cs).min(self.size());
            let piece_end = end.min(c_start + g.cs);
            let whole = pos == c_start && piece_end >= c_end;
            if !whole {
                if !discard {
                    self.write_range(node, pos, piece_end - pos, Src::Zeroes)
                        .await?;
                }
                pos = piece_end;
                continue;
            }
            let m = self.meta.lock().await;
            let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
                continue;
            };
            let raw = m.l2_entry(file, gc).await?;
            let old = decode_l2(&g, raw)?;
            let new = if discard {
                if g.version >= 3 && has_backing {
                    Some(ZERO)
                } else {
                    Some(0)
                }
            } else if g.version >= 3 {
                if old == Entry::Unallocated && !has_backing {
                    None
                } else {
                    Some(ZERO)
                }
            } else if !has_backing {
                Some(0)
            } else {
                // Version 2 over a backing file: zeroes must be stored.
                drop(m);
                self.write_range(node, pos, piece_end - pos, Src::Zeroes)
                    .await?;
                pos = piece_end;
                continue;
            };
            if let Some(new) = new {
                if new != raw {
                    let has_table = m.l2_offset(gc / g.l2_entries)?.is_some();
                    if new != 0 || has_table {
                        m.ensure_l2(file, gc).await?;
                        m.set_l2_entry(file, gc, new).await?;
                        if let Some((c, n)) = old.host_clusters(&g) {
                            m.free_later(c, n);
                        }
                    }
                }
            }
            drop(m);
            pos = piece_end;
        }
        Ok(())
    }

    /// Writes one whole cluster compressed (what `qemu-img convert -c`
    /// produces). `offset` must be cluster aligned and `buf` one cluster
    /// long, or reach exactly the end of the disk. Data that deflate cannot
    /// shrink by at least a sector is stored uncompressed. `node` is this
    /// driver's node.
    ///
    /// One request entering the graph at `node` (see [`IoRef`]).
    pub async fn write_compressed(&self, node: IoRef<'_>, offset: u64, buf: &[u8]) -> Result<()> {
        self.own_node(node)?;
        let (_request, node) = node.admit()?;
        self.check_writable(node)?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        let g = self.geo;
        if offset % g.cs != 0 || (len != g.cs && offset + len != self.size()) || len > g.cs {
            return Err(Error::InvalidArgument(format!(
                "compressed writes cover one whole {}-byte cluster (got {len} bytes at {offset})",
                g.cs
            )));
        }
        let mut data = buf.to_vec();
        data.resize(g.cs as usize, 0);
        let Some(z) = deflate_cluster(&data) else {
            return self.do_write(node, offset, IoVec::from(buf)).await;
        };
        let file = require_child(node, ChildRole::File)?;
        let _io = self.io_lock.read().await;
        self.before_change(file).await?;
        // Again under the lock: a resize may have run meanwhile.
        self.check_request(offset, len)?;
        let gc = offset >> g.cluster_bits;
        loop {
            let m = self.meta.lock().await;
            let Some(mut m) = self.wait_inflight(m, gc, 1).await else {
                continue;
            };
            if let Some(why) = &m.broken {
                return Err(invalid(format!("image found corrupt earlier: {why}")));
            }
            let old = decode_l2(&g, m.l2_entry(file, gc).await?)?;
            m.ensure_l2(file, gc).await?;
            let host = m.alloc(file, 1).await?;
            let x = 62 - (g.cluster_bits - 8);
            if host >= 1 << x {
                m.decref(file, host / g.cs, 1).await?;
                return Err(invalid(format!(
                    "host offset {host:#x} is too large for a compressed cluster"
                )));
            }
            let guard = {
                let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                set.insert(gc);
                InflightGuard {
                    drv: self,
                    first: gc,
                    count: 1,
                }
            };
            drop(m);
            let mut out = z.clone();
            out.resize(g.cs as usize, 0);
            let res = file.write(host, &out).await;
            let mut m = self.meta.lock().await;
            if let Err(e) = res {
                let _ = m.decref(file, host / g.cs, 1).await;
                return Err(e);
            }
            let nsec = (z.len() as u64).div_ceil(512);
            m.set_l2_entry(file, gc, COMPRESSED | ((nsec - 1) << x) | host)
                .await?;
            if let Some((c, n)) = old.host_clusters(&g) {
                m.free_later(c, n);
            }
            drop(m);
            drop(guard);
            // Entered with `admit`, not through the request path: the
            // node's dirty bitmaps are marked here.
            node.mark_dirty_now(offset, len);
            return Ok(());
        }
    }
}
