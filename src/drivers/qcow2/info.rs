//! What `qemu-img info` reports about an image beyond its geometry (QEMU's
//! `qcow2_get_specific_info`): feature bits, refcount width, snapshot count.

use super::header::{be64, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2};
use super::state::Qcow2Driver;

/// What `qemu-img info` reports about a qcow2 image beyond its geometry
/// (its "format-specific" data and dirty flag), read from the header as
/// it is now.
impl Qcow2Driver {
    /// Bits per refcount entry (QEMU's `refcount_bits`: 1 to 64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.geo.refcount_order
    }

    /// The header's feature words: (incompatible, compatible), zero for
    /// version 2 images, which have none.
    async fn feature_words(&self) -> (u64, u64) {
        if self.geo.version < 3 {
            return (0, 0);
        }
        let m = self.meta.lock().await;
        (be64(&m.hdr, 72), be64(&m.hdr, 80))
    }

    /// Whether the image uses lazy refcounts (compatible feature bit 0).
    pub async fn lazy_refcounts(&self) -> bool {
        self.feature_words().await.1 & 1 != 0
    }

    /// Whether the image was not closed cleanly (the dirty bit).
    pub async fn is_dirty(&self) -> bool {
        self.feature_words().await.0 & INCOMPAT_DIRTY != 0
    }

    /// Whether the image is marked corrupt (the corrupt bit).
    pub async fn is_corrupt(&self) -> bool {
        self.feature_words().await.0 & INCOMPAT_CORRUPT != 0
    }

    /// Whether the image uses extended L2 entries (subclusters).
    pub async fn extended_l2(&self) -> bool {
        self.feature_words().await.0 & INCOMPAT_EXTL2 != 0
    }

    /// The compression type's name, as QEMU spells it (`zlib`: images
    /// using another are refused at open).
    pub fn compression_type(&self) -> &'static str {
        "zlib"
    }

    /// How many internal snapshots the image has.
    pub fn snapshot_count(&self) -> u32 {
        self.nb_snapshots
    }
}
