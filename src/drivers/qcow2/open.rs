//! Opening an image (QEMU's `qcow2_do_open`): the header read and
//! validated against the file and the [`Qcow2Limits`](super::Qcow2Limits),
//! the L1 and refcount tables loaded, a dirty image repaired, unknown
//! auto-clear bits cleared. The backing chain is hooked up in `chain.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex as StdMutex;

use tokio::sync::{Mutex, RwLock};

use crate::graph::proof::{IoRef, RequestRef};
use crate::types::Result;

use super::bitmap::BitmapDir;
use super::bitmap_store::load as load_bitmaps;
use super::cache::TableCache;
use super::check::check_meta;
use super::file_io::read_file;
use super::geometry::Geo;
use super::header::{
    be32, invalid, l2_entries, unsupported, Header, AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, OFF_INCOMPATIBLE,
};
use super::meta::Meta;
use super::options::Qcow2Options;
use super::state::{BackingName, Qcow2Driver};

impl Qcow2Driver {
    /// Opens the image held by `file` (a node already in the graph),
    /// validating the whole header and loading the L1 and refcount tables.
    ///
    /// Add the returned driver to the graph with `file` as its
    /// [`ChildRole::File`] child (and the backing node, if the image names
    /// one, as [`ChildRole::Backing`]). A writable open of an image whose
    /// dirty bit is set repairs its refcounts first; unknown auto-clear
    /// feature bits are cleared.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidImage`] for anything malformed or out of bounds,
    /// [`Error::UnsupportedImage`] for features we cannot honour
    /// (encryption, external data files, extended L2 entries, compression
    /// other than deflate, unknown incompatible features), and the file's
    /// own I/O errors. Images with internal snapshots are writable: what a write
    /// changes is copied first, so the snapshots keep their data.
    ///
    /// The whole open is one request entering the graph at `file` (counted
    /// by drains of it; refused with [`Error::Drained`] while it is drained).
    ///
    /// [`ChildRole::File`]: crate::types::ChildRole::File
    /// [`ChildRole::Backing`]: crate::types::ChildRole::Backing
    /// [`Error::InvalidImage`]: crate::types::Error::InvalidImage
    /// [`Error::UnsupportedImage`]: crate::types::Error::UnsupportedImage
    /// [`Error::Drained`]: crate::types::Error::Drained
    pub async fn open(file: IoRef<'_>, options: Qcow2Options) -> Result<Qcow2Driver> {
        let (_request, file) = file.admit()?;
        Self::open_in_request(file, options).await
    }

    pub(super) async fn open_in_request(
        file: RequestRef<'_>,
        options: Qcow2Options,
    ) -> Result<Qcow2Driver> {
        let file_len = file.length().await?;
        let align = u64::from(file.request_alignment().max(1));
        let limits = options.limits.clone();
        // The cluster size is at bytes 20..24; read enough to see it.
        let peek = read_file(file, align, file_len, 0, 104.min(file_len as usize)).await?;
        let cs = if peek.len() >= 24 {
            let bits = be32(&peek, 20);
            if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
                1u64 << bits
            } else {
                512
            }
        } else {
            512
        };
        let first_len = cs.min(file_len) as usize;
        let first = read_file(file, align, file_len, 0, first_len).await?;
        let h = Header::parse(&first, file_len, &limits)?;
        let cs = h.cluster_size();
        if align > cs {
            return Err(unsupported(format!(
                "{cs}-byte clusters on a file that needs {align}-byte alignment"
            )));
        }
        let read_only = options.read_only;
        if !read_only && h.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(invalid(
                "the image is marked corrupt; open it read-only or repair it with qemu-img check -r all",
            ));
        }

        let geo = Geo {
            cluster_bits: h.cluster_bits,
            cs,
            l2_entries: l2_entries(h.cluster_bits),
            version: h.version,
            refcount_order: h.refcount_order,
            rb_entries: (cs * 8) >> h.refcount_order,
            align,
            max_host: limits.max_file_size.min(1 << 56),
            max_rt_bytes: limits.max_refcount_table_bytes,
        };

        let l1_bytes = read_file(
            file,
            align,
            file_len,
            h.l1_table_offset,
            h.l1_size as usize * 8,
        )
        .await?;
        let l1: Vec<u64> = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let rt_len = (u64::from(h.refcount_table_clusters) * cs) as usize;
        let rt_bytes = read_file(file, align, file_len, h.refcount_table_offset, rt_len).await?;
        let rt: Vec<u64> = rt_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut hdr = first;
        hdr.resize(cs as usize, 0);
        let bitmaps = match h.bitmaps {
            None => None,
            Some(ext) => {
                let len = ext.directory_size.div_ceil(cs) * cs;
                let raw =
                    read_file(file, align, file_len, ext.directory_offset, len as usize).await?;
                Some(BitmapDir::parse(ext, raw, cs, h.size)?)
            }
        };
        let (loaded_bitmaps, bitmaps_fingerprint) = match &bitmaps {
            Some(dir) => {
                let (loaded, fp) = load_bitmaps(file, dir, h.size, cs, align, file_len).await?;
                (loaded, Some(fp))
            }
            None => (Vec::new(), None),
        };

        let l2_cap = (options.l2_cache_bytes / cs).max(2) as usize;
        let rb_cap = (options.refcount_cache_bytes / cs).max(2) as usize;
        let mut meta = Meta {
            geo,
            hdr,
            l1_offset: h.l1_table_offset,
            l1,
            l1_dirty: None,
            l2: TableCache::new(l2_cap),
            rt_offset: h.refcount_table_offset,
            rt,
            rb: TableCache::new(rb_cap),
            free_hint: 0,
            file_len,
            pending_frees: Vec::new(),
            bitmaps,
            loaded_bitmaps,
            bitmaps_fingerprint,
            broken: None,
        };

        if !read_only {
            if h.incompatible & INCOMPAT_DIRTY != 0 {
                let report = check_meta(
                    &mut meta,
                    file,
                    true,
                    &limits,
                    (h.nb_snapshots > 0).then_some((h.snapshots_offset, h.nb_snapshots)),
                )
                .await?;
                if report.corruptions > report.repaired_corruptions {
                    return Err(invalid(format!(
                        "the image is dirty and its refcounts could not be repaired: {}",
                        report.messages.join("; ")
                    )));
                }
                meta.write_back(file).await?;
                file.flush().await?;
                let inc = h.incompatible & !INCOMPAT_DIRTY;
                meta.hdr[OFF_INCOMPATIBLE..OFF_INCOMPATIBLE + 8]
                    .copy_from_slice(&inc.to_be_bytes());
                meta.write_header(file, OFF_INCOMPATIBLE, OFF_INCOMPATIBLE + 8)
                    .await?;
                file.flush().await?;
            }
            // Auto-clear bits we do not maintain are cleared before the
            // first write, as the spec requires. Bit 0 (bitmaps consistent)
            // we keep where there are bitmaps: they stay valid until guest
            // data changes, and then we mark them in use (see
            // `bitmap.rs`). Clearing it would make QEMU drop them.
            let keep = if meta.bitmaps.is_some() {
                AUTOCLEAR_BITMAPS
            } else {
                0
            };
            if h.autoclear & !keep != 0 {
                meta.set_autoclear(file, h.autoclear & keep).await?;
                file.flush().await?;
            }
        }

        let bitmap_infos = meta
            .bitmaps
            .as_ref()
            .map(BitmapDir::infos)
            .unwrap_or_default();
        let bitmaps_to_mark = meta.bitmaps.as_ref().is_some_and(BitmapDir::any_consistent);
        Ok(Qcow2Driver {
            geo,
            size: AtomicU64::new(h.size),
            read_only: AtomicBool::new(read_only),
            nb_snapshots: h.nb_snapshots,
            snapshots_offset: h.snapshots_offset,
            backing: StdMutex::new(BackingName {
                file: h.backing_file,
                format: h.backing_format,
            }),
            file_node: file.name().to_owned(),
            require_backing: options.require_backing,
            limits,
            meta: Mutex::new(meta),
            io_lock: RwLock::new(()),
            inflight: StdMutex::new(HashSet::default()),
            alloc_done: crate::sync::WaitList::default(),
            last_inflated: StdMutex::new(None),
            bitmap_infos: StdMutex::new(bitmap_infos),
            bitmaps_to_mark: AtomicBool::new(bitmaps_to_mark),
        })
    }
}
