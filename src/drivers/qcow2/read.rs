//! The read path (QEMU's `qcow2_co_preadv_part` and
//! `qcow2_get_host_offset`): guest offset to host mapping, reads from the
//! file, the backing node or a compressed cluster, and block status.

use std::sync::Arc;

use crate::driver::require_child;
use crate::graph::proof::RequestRef;
use crate::types::{BlockStatus, ChildRole, IoBuf, IoVecMut, Result};

use super::compressed::inflate_cluster;
use super::entry::{decode_l2, Entry};
use super::file_io::{read_data, read_data_v, read_file};
use super::header::invalid;
use super::meta::Meta;
use super::state::Qcow2Driver;

/// Where a guest range is stored (the first `n` bytes of a lookup).
#[derive(Debug, Clone, Copy)]
pub(super) enum Mapping {
    Unallocated,
    Zero,
    /// Host offset of the first byte.
    Data(u64),
    Compressed {
        offset: u64,
        bytes: u64,
    },
}

impl Qcow2Driver {
    /// Where guest byte `pos` is stored, and for how many bytes (at most
    /// `max`) the answer holds.
    pub(super) async fn lookup(
        &self,
        m: &mut Meta,
        file: RequestRef<'_>,
        pos: u64,
        max: u64,
    ) -> Result<(Mapping, u64)> {
        let g = &self.geo;
        let gc = pos >> g.cluster_bits;
        let in_cl = pos & (g.cs - 1);
        let l1i = gc / g.l2_entries;
        let Some(l2off) = m.l2_offset(l1i)? else {
            let table_end = (l1i + 1) * g.l2_entries * g.cs;
            return Ok((Mapping::Unallocated, max.min(table_end - pos)));
        };
        let s = m.l2_slot(file, l2off).await?;
        let table = &m.l2.get(s).table;
        let idx = (gc % g.l2_entries) as usize;
        let first = decode_l2(g, table[idx])?;
        let mut n = (g.cs - in_cl).min(max);
        let map = match first {
            Entry::Compressed { offset, bytes } => {
                return Ok((Mapping::Compressed { offset, bytes }, n))
            }
            Entry::Unallocated => Mapping::Unallocated,
            Entry::Zero { .. } => Mapping::Zero,
            Entry::Data { host, .. } => Mapping::Data(host + in_cl),
        };
        let mut k = 1usize;
        while n < max && idx + k < table.len() {
            let next = decode_l2(g, table[idx + k])?;
            let same = match (first, next) {
                (Entry::Unallocated, Entry::Unallocated) => true,
                (Entry::Zero { .. }, Entry::Zero { .. }) => true,
                (Entry::Data { host: h0, .. }, Entry::Data { host: h, .. }) => {
                    h == h0 + k as u64 * g.cs
                }
                _ => false,
            };
            if !same {
                break;
            }
            n += g.cs.min(max - n);
            k += 1;
        }
        Ok((map, n))
    }

    /// Reads guest range `pos..pos+buf.len()` from the backing node
    /// (zeroes where there is none, or past its end).
    async fn read_backing(
        backing: Option<RequestRef<'_>>,
        pos: u64,
        mut buf: IoVecMut<'_>,
    ) -> Result<()> {
        let Some(b) = backing else {
            buf.fill(0);
            return Ok(());
        };
        let len = buf.len();
        let blen = b.length().await?;
        let avail = blen.saturating_sub(pos).min(len as u64) as usize;
        if avail > 0 {
            b.readv(pos, buf.slice_mut(0, avail)).await?;
        }
        buf.slice_mut(avail, len - avail).fill(0);
        Ok(())
    }

    pub(super) async fn inflate(
        &self,
        file: RequestRef<'_>,
        file_len: u64,
        offset: u64,
        bytes: u64,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some((o, data)) = &*self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) {
            if *o == offset {
                return Ok(data.clone());
            }
        }
        if offset >= file_len {
            return Err(invalid(format!(
                "compressed cluster at {offset:#x} lies outside the {file_len}-byte file"
            )));
        }
        // The last sector may reach past the end of the file.
        let len = bytes.min(file_len - offset) as usize;
        let raw = read_file(file, self.geo.align, file_len, offset, len).await?;
        let data =
            std::sync::Arc::new(inflate_off_thread(raw, self.geo.cs as usize, offset).await?);
        *self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((offset, data.clone()));
        Ok(data)
    }

    /// Fills `buf` (one cluster) with what guest cluster `gc` holds
    /// according to `old`.
    pub(super) async fn old_content(
        &self,
        file: RequestRef<'_>,
        backing: Option<RequestRef<'_>>,
        file_len: u64,
        gc: u64,
        old: Entry,
        buf: &mut [u8],
    ) -> Result<()> {
        match old {
            Entry::Unallocated => {
                Self::read_backing(backing, gc * self.geo.cs, IoVecMut::from(buf)).await
            }
            Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Entry::Data { host, .. } => read_data(file, file_len, host, buf).await,
            Entry::Compressed { offset, bytes } => {
                let data = self.inflate(file, file_len, offset, bytes).await?;
                buf.copy_from_slice(&data);
                Ok(())
            }
        }
    }

    /// [`BlockDriver::readv`](crate::graph::driver::BlockDriver::readv)
    /// (and `read`, with one segment): each run of clusters that the
    /// mapping stores alike gets its share of `buf` as a view, without a
    /// copy, and hands it to the file or the backing node; only
    /// compressed clusters are inflated into a buffer of their own first.
    pub(super) async fn do_read(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        mut buf: IoVecMut<'_>,
    ) -> Result<()> {
        let file = require_child(node, ChildRole::File)?;
        let backing = node.child(ChildRole::Backing);
        let _io = self.io_lock.read().await;
        // Under the lock, so no resize runs between the check and the read.
        self.check_request(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (map, n, file_len) = {
                let mut m = self.meta.lock().await;
                let (map, n) = self
                    .lookup(&mut m, file, pos, (buf.len() - done) as u64)
                    .await?;
                (map, n as usize, m.file_len)
            };
            let mut chunk = buf.slice_mut(done, n);
            match map {
                Mapping::Unallocated => Self::read_backing(backing, pos, chunk).await?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Data(host) => read_data_v(file, file_len, host, chunk).await?,
                Mapping::Compressed { offset, bytes } => {
                    let data = self.inflate(file, file_len, offset, bytes).await?;
                    let at = (pos & (self.geo.cs - 1)) as usize;
                    chunk.copy_from_slice(&data[at..at + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// [`BlockDriver::read_buf`](crate::graph::driver::BlockDriver::read_buf):
    /// a request that lies in one run of data clusters stored one after the
    /// other inside the file goes to the file as the caller's buffer (no
    /// copy where the file can take it); anything else (unallocated, zero,
    /// compressed, several runs, past the file's end) is read by
    /// [`do_read`](Self::do_read) into the buffer, lent.
    pub(super) async fn do_read_buf(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        mut buf: IoBuf,
    ) -> Result<IoBuf> {
        let file = require_child(node, ChildRole::File)?;
        if !buf.is_empty() {
            let _io = self.io_lock.read().await;
            self.check_request(offset, buf.len() as u64)?;
            let len = buf.len() as u64;
            let (map, n, file_len) = {
                let mut m = self.meta.lock().await;
                let (map, n) = self.lookup(&mut m, file, offset, len).await?;
                (map, n, m.file_len)
            };
            if let Mapping::Data(host) = map {
                if n == len && host.checked_add(len).is_some_and(|end| end <= file_len) {
                    return file.read_buf(host, buf).await;
                }
            }
        }
        self.do_read(node, offset, IoVecMut::from(&mut buf[..]))
            .await?;
        Ok(buf)
    }

    /// [`BlockDriver::block_status`](crate::graph::driver::BlockDriver::block_status).
    pub(super) async fn do_block_status(
        &self,
        node: RequestRef<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, u64)> {
        let file = require_child(node, ChildRole::File)?;
        let _io = self.io_lock.read().await;
        self.check_request(offset, len)?;
        let mut m = self.meta.lock().await;
        let (map, n) = self.lookup(&mut m, file, offset, len).await?;
        Ok((
            match map {
                Mapping::Unallocated => BlockStatus::Unallocated,
                Mapping::Zero => BlockStatus::Zero,
                Mapping::Data(_) | Mapping::Compressed { .. } => BlockStatus::Data,
            },
            n,
        ))
    }
}

/// Inflates a compressed cluster on the runtime's blocking pool, as QEMU
/// decompresses on its thread pool: the I/O thread goes on serving other
/// requests meanwhile, and a copy that reads many compressed clusters
/// (`img convert` of a compressed image) inflates them on every CPU. Inline
/// where no runtime runs the request. The task owns its input and output,
/// so a request dropped meanwhile leaves nothing pointing into it.
async fn inflate_off_thread(raw: Vec<u8>, cluster_size: usize, at: u64) -> Result<Vec<u8>> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(move || inflate_cluster(&raw, cluster_size, at))
            .await
            .map_err(|_| {
                crate::types::Error::Io(std::io::Error::other(
                    "the decompression worker panicked or was cancelled",
                ))
            })?,
        Err(_) => inflate_cluster(&raw, cluster_size, at),
    }
}
