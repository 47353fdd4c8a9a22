//! A node's dirty bitmaps through its [`NodeRef`] (DESIGN §15): the
//! management verbs (add, remove, enable, disable, clear, merge, copy,
//! busy) are main-loop-only (`P: MainLoopProof`, QEMU's QMP commands under
//! the BQL); a job's data path (next dirty area, reset and set ranges)
//! needs an I/O proof (`P: IoProof`, QEMU's job coroutines under the graph
//! read lock); reading a bitmap is open to every proof.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::graph::dirty_bitmap::{
    granularity_bits, Bitmap, DirtyBitmapOptions, DirtyBitmapSnapshot, MAX_NAME_LEN,
};
use crate::graph::proof::node_ref::{IoProof, MainLoopProof, NodeRef, Proof};
use crate::types::{DirtyBitmapInfo, Error, Result};

/// Which states an operation refuses (QEMU's `BDRV_BITMAP_*` check flags).
#[derive(Clone, Copy)]
enum Check {
    /// Busy or inconsistent (QEMU's `BDRV_BITMAP_DEFAULT`).
    Default,
    /// Inconsistent only (a merge source, a job's own bitmap).
    Inconsistent,
}

fn check(b: &Bitmap, what: Check) -> Result<()> {
    if matches!(what, Check::Default) && b.busy.load(Ordering::Relaxed) {
        return Err(Error::BitmapBusy(b.name.clone()));
    }
    if b.inconsistent {
        return Err(Error::BitmapInconsistent(b.name.clone()));
    }
    Ok(())
}

impl<'a, P: Proof> NodeRef<'a, P> {
    fn bitmap(&self, name: &str) -> Result<Arc<Bitmap>> {
        self.inner()
            .bitmaps
            .find(name)
            .ok_or_else(|| Error::NoSuchBitmap {
                node: self.name().to_owned(),
                bitmap: name.to_owned(),
            })
    }

    fn usable(&self, name: &str, what: Check) -> Result<Arc<Bitmap>> {
        let b = self.bitmap(name)?;
        check(&b, what)?;
        Ok(b)
    }
}

/// Reading: under any proof.
impl<'a, P: Proof> NodeRef<'a, P> {
    /// The node's dirty bitmaps, in the order they were added (also in
    /// [`NodeInfo::dirty_bitmaps`](crate::NodeInfo::dirty_bitmaps)).
    pub fn dirty_bitmaps(&self) -> Vec<DirtyBitmapInfo> {
        self.inner().bitmaps.infos()
    }

    /// A copy of the bitmap `name`'s bits, to iterate over or store.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchBitmap`]; [`Error::BitmapInconsistent`] for a bitmap
    /// an image did not save cleanly.
    pub fn dirty_bitmap_snapshot(&self, name: &str) -> Result<DirtyBitmapSnapshot> {
        let b = self.usable(name, Check::Inconsistent)?;
        Ok(DirtyBitmapSnapshot::of(&b))
    }
}

/// The management verbs: main loop only (QEMU's `block-dirty-bitmap-*`).
impl<'a, P: Proof> NodeRef<'a, P> {
    /// Adds a dirty bitmap called `name` (QEMU's `block-dirty-bitmap-add`):
    /// from now on, unless `options` says disabled, every write, zeroing
    /// and discard that completes on this node sets the bits of the
    /// granules it touched, whoever issued it (a backend, a job, a parent
    /// node passing a request down).
    ///
    /// Requests already in flight when the bitmap is added may or may not
    /// be recorded; add it inside a drain section of the node to record
    /// exactly from one instant (what QEMU's transactions do).
    ///
    /// A persistent bitmap is stored in the image by the node's driver
    /// when the node is closed, which the driver must agree to
    /// ([`BlockDriver::can_store_dirty_bitmap`](crate::driver::BlockDriver::can_store_dirty_bitmap)).
    ///
    /// # Errors
    ///
    /// [`Error::BitmapExists`]; [`Error::InvalidArgument`] for an empty
    /// name, one longer than 1023 bytes, or a granularity that is not a
    /// power of two from 512 bytes to 2 GiB; whatever the driver says
    /// against a persistent bitmap.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::{drivers::MemoryDriver, DirtyBitmapOptions, Error, MainLoop};
    ///
    /// let main = MainLoop::new()?;
    /// let io = main.new_io_thread("io")?;
    /// let disk = main.run(|bql| -> blockgraph::Result<_> {
    ///     let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(1 << 20), &[]))?;
    ///     disk.gs(bql).add_dirty_bitmap("b0", DirtyBitmapOptions::new())?;
    ///     Ok(disk)
    /// })?;
    /// // A write on an I/O thread (through a backend it would be the same).
    /// let d = disk.clone();
    /// io.spawn(move |mut cx| async move {
    ///     let g = cx.read().await;
    ///     d.io(&g).write(130_000, &[1; 4096]).await
    /// }).join()?;
    /// main.run(move |bql| -> blockgraph::Result<()> {
    ///     let node = disk.gs(bql);
    ///     let info = &node.dirty_bitmaps()[0];
    ///     assert_eq!((info.name.as_str(), info.granularity), ("b0", 65536));
    ///     assert_eq!(info.count, 2 * 65536, "the write touched two granules");
    ///     // A job takes it: it cannot be changed meanwhile.
    ///     node.set_dirty_bitmap_busy("b0", true)?;
    ///     assert!(matches!(node.clear_dirty_bitmap("b0"), Err(Error::BitmapBusy(_))));
    ///     node.set_dirty_bitmap_busy("b0", false)?;
    ///     node.clear_dirty_bitmap("b0")?;
    ///     node.remove_dirty_bitmap("b0")
    /// })?;
    /// # drop(io); main.shutdown();
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn add_dirty_bitmap(&self, name: &str, options: DirtyBitmapOptions) -> Result<()>
    where
        P: MainLoopProof,
    {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidArgument(format!(
                "a bitmap name must be 1 to {MAX_NAME_LEN} bytes"
            )));
        }
        let granularity = options.granularity_or_default();
        let gbits = granularity_bits(granularity)?;
        let node = self.inner();
        if node.bitmaps.find(name).is_some() {
            return Err(Error::BitmapExists {
                node: node.name.clone(),
                bitmap: name.to_owned(),
            });
        }
        if options.is_persistent() {
            node.driver.can_store_dirty_bitmap(name, granularity)?;
        }
        let size = node.driver.info().size.unwrap_or(0);
        node.bitmaps
            .add(
                &node.name,
                Bitmap::new(
                    name,
                    gbits,
                    size,
                    !options.is_disabled(),
                    options.is_persistent(),
                    false,
                ),
            )
            .map(drop)
    }

    /// Adds a bitmap a driver loaded from its image (crate-internal: qcow2
    /// at open). `words` are its bits; `None` makes it inconsistent.
    pub(crate) fn add_loaded_dirty_bitmap(
        &self,
        name: &str,
        granularity_bits: u32,
        size: u64,
        enabled: bool,
        words: Option<&[u64]>,
    ) -> Result<()>
    where
        P: MainLoopProof,
    {
        let node = self.inner();
        let b = Bitmap::new(name, granularity_bits, size, enabled, true, words.is_none());
        if let Some(words) = words {
            b.or_words(words);
        }
        node.bitmaps.add(&node.name, b).map(drop)
    }

    /// Removes the bitmap `name` (QEMU's `block-dirty-bitmap-remove`); a
    /// persistent one leaves the image when the driver next stores its
    /// bitmaps. Inconsistent bitmaps can be removed; busy ones cannot.
    pub fn remove_dirty_bitmap(&self, name: &str) -> Result<()>
    where
        P: MainLoopProof,
    {
        let node = self.inner();
        let removed = node.bitmaps.remove(name, |b| {
            if b.busy.load(Ordering::Relaxed) {
                return Err(Error::BitmapBusy(b.name.clone()));
            }
            Ok(())
        });
        match removed {
            None => Err(Error::NoSuchBitmap {
                node: node.name.clone(),
                bitmap: name.to_owned(),
            }),
            Some(r) => r.map(drop),
        }
    }

    /// Starts recording writes (QEMU's `block-dirty-bitmap-enable`).
    pub fn enable_dirty_bitmap(&self, name: &str) -> Result<()>
    where
        P: MainLoopProof,
    {
        let b = self.usable(name, Check::Default)?;
        self.inner().bitmaps.set_enabled(&b, true);
        Ok(())
    }

    /// Stops recording writes (QEMU's `block-dirty-bitmap-disable`); the
    /// bits stay.
    pub fn disable_dirty_bitmap(&self, name: &str) -> Result<()>
    where
        P: MainLoopProof,
    {
        let b = self.usable(name, Check::Default)?;
        self.inner().bitmaps.set_enabled(&b, false);
        Ok(())
    }

    /// Clears every bit (QEMU's `block-dirty-bitmap-clear`).
    pub fn clear_dirty_bitmap(&self, name: &str) -> Result<()>
    where
        P: MainLoopProof,
    {
        self.usable(name, Check::Default)?.clear();
        Ok(())
    }

    /// Sets in bitmap `target` every byte dirty in bitmap `source_name` of
    /// `source` (this node or another; QEMU's `block-dirty-bitmap-merge`).
    /// Granularities may differ: a dirty source granule dirties every
    /// target granule it touches.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchBitmap`]; [`Error::BitmapBusy`] or
    /// [`Error::BitmapInconsistent`] for the target;
    /// [`Error::BitmapInconsistent`] for the source (a busy source may be
    /// read, as in QEMU).
    pub fn merge_dirty_bitmap(
        &self,
        target: &str,
        source: &NodeRef<'_, P>,
        source_name: &str,
    ) -> Result<()>
    where
        P: MainLoopProof,
    {
        let dst = self.usable(target, Check::Default)?;
        let src = source.usable(source_name, Check::Inconsistent)?;
        dst.merge_from(&src);
        Ok(())
    }

    /// Adds a bitmap `target` holding the same bits as `source` (QEMU's
    /// idiom `block-dirty-bitmap-add` + `merge`): `options` as for
    /// [`add_dirty_bitmap`](Self::add_dirty_bitmap), the granularity the
    /// source's unless `options` sets one.
    pub fn copy_dirty_bitmap(
        &self,
        source: &str,
        target: &str,
        options: DirtyBitmapOptions,
    ) -> Result<()>
    where
        P: MainLoopProof,
    {
        let src = self.usable(source, Check::Inconsistent)?;
        let options = if options.has_granularity() {
            options
        } else {
            options.granularity(src.granularity())
        };
        self.add_dirty_bitmap(target, options)?;
        self.bitmap(target)?.merge_from(&src);
        Ok(())
    }

    /// Marks the bitmap as used by an operation (a block job) or frees it
    /// (QEMU's `bdrv_dirty_bitmap_set_busy`): a busy bitmap cannot be
    /// removed, enabled, disabled, cleared or merged into, and cannot be
    /// taken by another operation.
    ///
    /// # Errors
    ///
    /// [`Error::BitmapBusy`] when `busy` and the bitmap is busy already;
    /// [`Error::BitmapInconsistent`].
    pub fn set_dirty_bitmap_busy(&self, name: &str, busy: bool) -> Result<()>
    where
        P: MainLoopProof,
    {
        let b = self.usable(name, Check::Inconsistent)?;
        if busy && b.busy.swap(true, Ordering::Relaxed) {
            return Err(Error::BitmapBusy(name.to_owned()));
        }
        b.busy.store(busy, Ordering::Relaxed);
        Ok(())
    }
}

/// A job's data path: under the read lock (or inside a request).
impl<'a, P: Proof> NodeRef<'a, P> {
    /// The first dirty area of bitmap `name` at or after `offset`, as
    /// `(start, len)`: whole granules clipped to `offset` and to the size
    /// the bitmap covers (QEMU's `bdrv_dirty_bitmap_next_dirty_area`).
    /// Busy bitmaps can be read: the job that holds one is their user.
    pub fn next_dirty(&self, name: &str, offset: u64) -> Result<Option<(u64, u64)>>
    where
        P: IoProof,
    {
        Ok(self.usable(name, Check::Inconsistent)?.next_dirty(offset))
    }

    /// Clears the granules of bitmap `name` that lie wholly inside
    /// `[offset, offset + len)` (QEMU's `bdrv_reset_dirty_bitmap`): what a
    /// job does once it has copied them. A granule only partly inside
    /// stays dirty, so a reset never forgets bytes that were not copied.
    pub fn reset_dirty(&self, name: &str, offset: u64, len: u64) -> Result<()>
    where
        P: IoProof,
    {
        self.usable(name, Check::Inconsistent)?.reset(offset, len);
        Ok(())
    }

    /// Marks `[offset, offset + len)` in the node's enabled bitmaps now,
    /// as a successful write's completion will (crate-internal: qcow2 does
    /// it before it lets its I/O lock go, so that a bitmap store holding
    /// the lock exclusively sees every finished write; and for writes that
    /// entered with `admit`, outside the request path).
    pub(crate) fn mark_dirty_now(&self, offset: u64, len: u64)
    where
        P: IoProof,
    {
        let bitmaps = &self.inner().bitmaps;
        if bitmaps.recording() {
            bitmaps.mark(offset, len);
        }
    }

    /// Sets the granules of bitmap `name` touched by `[offset, offset +
    /// len)` (QEMU's `bdrv_set_dirty_bitmap`): what a job does when a copy
    /// failed and the range must be tried again.
    pub fn set_dirty(&self, name: &str, offset: u64, len: u64) -> Result<()>
    where
        P: IoProof,
    {
        self.usable(name, Check::Inconsistent)?.set(offset, len);
        Ok(())
    }
}
