//! Image creation.
//!
//! Layout of a new image (cluster indices): 0 header (with extensions and
//! the backing file name), then the refcount table, the refcount blocks
//! covering all of that, and the L1 table. Every cluster of that area has
//! refcount 1; the rest of the file is free.
//!
//! With [`Preallocation`] other than `Off` (QEMU's `preallocation`), every
//! L2 table follows the L1 table, then every data cluster, in guest order:
//! each L1 and L2 entry points at its cluster with the copied flag, every
//! cluster has refcount 1 and the refcount blocks cover them all. The file
//! is then grown over the data clusters (`Metadata`: sparse, they read as
//! zeroes), which are also zeroed with `write_zeroes` (`Falloc`: the file
//! driver's `fallocate(FALLOC_FL_ZERO_RANGE)` allocates them) or written
//! with zeroes (`Full`). For an image whose tables fit one L2 table this is
//! the layout QEMU makes; for larger ones QEMU's `metadata` places each L2
//! table before its data clusters, which is only a different order.

use crate::drivers::Preallocation;
use crate::graph::proof::{IoRef, RequestRef};
use crate::types::{Error, Result};

use super::cache::Table;
use super::entry::{rc_set, COPIED};
use super::header::{l1_entries_for, NewHeader, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::options::Qcow2Limits;
use super::state::Qcow2Driver;

/// What [`Qcow2Driver::create`](super::Qcow2Driver::create) makes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 bytes to 2 MiB
    /// (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name stored in the image (resolved by the reader,
    /// relative to the image's directory).
    pub backing_file: Option<String>,
    /// The backing file's format (`"qcow2"`, `"raw"`), stored beside it.
    pub backing_format: Option<String>,
    /// Format version: 2 (QEMU's `compat=0.10`) or 3 (`compat=1.1`,
    /// default).
    pub version: u32,
    /// What is allocated up front (QEMU's `preallocation`; default
    /// [`Preallocation::Off`]). Not with a backing file: preallocated
    /// clusters would hide it (QEMU allows the combination only with
    /// extended L2 entries, which this driver does not make).
    ///
    /// `Falloc` zeroes the data clusters with the file node's
    /// `write_zeroes`, which the [`FileDriver`](crate::drivers::FileDriver)
    /// does with `fallocate(FALLOC_FL_ZERO_RANGE)`: the blocks are
    /// allocated, as QEMU's `posix_fallocate` allocates them. Where the host
    /// cannot do that (it then punches holes) they stay sparse, still
    /// reading zeroes; `Full` writes the zeroes instead.
    pub preallocation: Preallocation,
}

impl CreateOptions {
    /// A version 3 image of `size` bytes with 64 KiB clusters.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 64 << 10,
            backing_file: None,
            backing_format: None,
            version: 3,
            preallocation: Preallocation::Off,
        }
    }

    /// Sets the cluster size.
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// Sets the format version (2 or 3).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the preallocation mode (see [`Preallocation`]).
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Names a backing file and its format.
    pub fn backing(mut self, file: impl Into<String>, format: impl Into<String>) -> Self {
        self.backing_file = Some(file.into());
        self.backing_format = Some(format.into());
        self
    }
}

pub(crate) async fn create(file: RequestRef<'_>, o: &CreateOptions) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if !o.cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&o.cluster_size.trailing_zeros())
    {
        return bad(format!(
            "cluster size {} is not a power of two from 512 bytes to 2 MiB",
            o.cluster_size
        ));
    }
    if o.version != 2 && o.version != 3 {
        return bad(format!("qcow2 version {} (must be 2 or 3)", o.version));
    }
    if o.backing_format.is_some() && o.backing_file.is_none() {
        return bad("a backing format without a backing file".into());
    }
    if let Some(f) = &o.backing_format {
        if f.is_empty() || f.len() > 32 || !f.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(format!(
                "backing format '{f}' is not a short printable name"
            ));
        }
    }
    let prealloc = o.preallocation != Preallocation::Off;
    if prealloc && o.backing_file.is_some() {
        return bad(format!(
            "preallocation={} with a backing file (preallocated clusters would hide it; \
             QEMU allows it only with extended L2 entries)",
            o.preallocation
        ));
    }
    let limits = Qcow2Limits::default();
    if o.size > limits.max_virtual_size {
        return bad(format!("size {} is too large", o.size));
    }
    let cb = o.cluster_size.trailing_zeros();
    let cs = o.cluster_size;
    let l1_size = l1_entries_for(o.size, cb);
    if l1_size * 8 > limits.max_l1_bytes {
        return bad(format!(
            "a {}-byte disk needs an L1 table larger than {} bytes with {cs}-byte clusters",
            o.size, limits.max_l1_bytes
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let order = 4u32;
    let rbe = (cs * 8) >> order;
    // Preallocated: one L2 table per L1 entry in use, one cluster per
    // guest cluster.
    let (data_clusters, l2_tables) = if prealloc {
        let data = o.size.div_ceil(cs);
        (data, data.div_ceil(cs / 8))
    } else {
        (0, 0)
    };
    let (mut rtc, mut nb) = (1u64, 1u64);
    loop {
        let total = 1 + rtc + nb + l1_clusters + l2_tables + data_clusters;
        let nb2 = total.div_ceil(rbe);
        let rtc2 = (nb2 * 8).div_ceil(cs);
        if nb2 <= nb && rtc2 <= rtc {
            break;
        }
        nb = nb.max(nb2);
        rtc = rtc.max(rtc2);
    }
    let rt_off = cs;
    let rb_off = (1 + rtc) * cs;
    let l1_off = (1 + rtc + nb) * cs;
    let l2_off = l1_off + l1_clusters * cs;
    let data_off = l2_off + l2_tables * cs;
    let end = data_off + data_clusters * cs;
    let total = end / cs;

    let header = NewHeader {
        version: o.version,
        cluster_bits: cb,
        size: o.size,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rtc as u32,
        backing_file: o.backing_file.as_deref(),
        backing_format: o.backing_format.as_deref(),
    }
    .to_cluster()?;

    // Refcount blocks: 1 for every metadata cluster.
    for b in 0..nb {
        let mut block = vec![0u8; cs as usize];
        for c in b * rbe..((b + 1) * rbe).min(total) {
            rc_set(&mut block, order, (c - b * rbe) as usize, 1);
        }
        file.write(rb_off + b * cs, &block).await?;
    }
    let mut rt = vec![0u64; (rtc * cs / 8) as usize];
    for (b, e) in rt.iter_mut().enumerate().take(nb as usize) {
        *e = rb_off + b as u64 * cs;
    }
    file.write(rt_off, &rt.bytes(0, (rtc * cs) as usize))
        .await?;
    let mut l1 = vec![0u64; (l1_clusters * cs / 8) as usize];
    for (t, e) in l1.iter_mut().enumerate().take(l2_tables as usize) {
        *e = (l2_off + t as u64 * cs) | COPIED;
    }
    for c in 0..l1_clusters {
        let at = (c * cs) as usize;
        file.write(l1_off + c * cs, &l1.bytes(at, at + cs as usize))
            .await?;
    }
    let l2e = cs / 8;
    for t in 0..l2_tables {
        let l2: Vec<u64> = (t * l2e..(t + 1) * l2e)
            .map(|k| {
                if k < data_clusters {
                    (data_off + k * cs) | COPIED
                } else {
                    0
                }
            })
            .collect();
        file.write(l2_off + t * cs, &l2.bytes(0, cs as usize))
            .await?;
    }
    if prealloc {
        preallocate_data(file, o.preallocation, data_off, end).await?;
    }
    file.flush().await?;
    // The header last: a half-created image is not mistaken for a valid one.
    file.write(0, &header).await?;
    file.flush().await?;
    Ok(())
}

/// Makes the file cover the data clusters `[start, end)` and, for `Falloc`
/// and `Full`, allocates them or writes zeroes over them.
async fn preallocate_data(
    file: RequestRef<'_>,
    mode: Preallocation,
    start: u64,
    end: u64,
) -> Result<()> {
    // Grown as QEMU grows it (a truncate of the file, sparse); formatting a
    // node already overwrites it, so no edge's resize permission applies.
    if file.length().await? < end {
        file.resize_checked(end).await?;
    }
    match mode {
        Preallocation::Off | Preallocation::Metadata => {}
        // The file driver zeroes with `FALLOC_FL_ZERO_RANGE`, which
        // allocates the blocks (unwritten, reading zeroes) as
        // `posix_fallocate` does.
        Preallocation::Falloc => file.write_zeroes(start, end - start).await?,
        Preallocation::Full => {
            const CHUNK: u64 = 1 << 20;
            let zeroes = vec![0u8; CHUNK.min(end - start) as usize];
            let mut off = start;
            while off < end {
                let n = CHUNK.min(end - off);
                file.write(off, &zeroes[..n as usize]).await?;
                off += n;
            }
        }
    }
    Ok(())
}

impl Qcow2Driver {
    /// Formats the node `file` as an empty qcow2 image (see
    /// [`CreateOptions`]). Whatever the file held is overwritten where the
    /// new metadata goes and is otherwise unreachable.
    /// Like [`Qcow2Driver::open`], one request entering at `file`.
    pub async fn create(file: IoRef<'_>, options: &CreateOptions) -> Result<()> {
        let (_request, file) = file.admit()?;
        create(file, options).await
    }
}
