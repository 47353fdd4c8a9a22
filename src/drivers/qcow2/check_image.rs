//! `qemu-img check [-r all]` as the driver offers it: [`Qcow2Driver::check`]
//! on an open image, [`Qcow2Driver::check_image`] straight from the file.
//! The walk itself is in `check.rs`.

use crate::driver::require_child;
use crate::graph::proof::IoRef;
use crate::types::{ChildRole, Error, Result};

use super::check::{check_meta, CheckReport};
use super::header::{be64, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_INCOMPATIBLE};
use super::options::Qcow2Options;
use super::state::Qcow2Driver;

impl Qcow2Driver {
    /// Checks the image's metadata: every cluster's refcount against the
    /// references found by walking the tables, and the copied flags.
    /// `node` is this driver's node. With `repair`, leaks and refcounts
    /// that are too low are corrected (where a refcount block exists).
    ///
    /// A writable image is flushed first, so that what is checked is what
    /// is on disk. Requests wait while the check runs.
    ///
    /// One request entering the graph at `node` (see [`IoRef`]).
    pub async fn check(&self, node: IoRef<'_>, repair: bool) -> Result<CheckReport> {
        self.own_node(node)?;
        let (_request, node) = node.admit()?;
        if repair && self.is_read_only() {
            return Err(Error::ReadOnly(node.name().to_owned()));
        }
        let file = require_child(node, ChildRole::File)?;
        if !self.is_read_only() {
            self.do_flush(node).await?;
        }
        let _excl = self.io_lock.write().await;
        let mut m = self.meta.lock().await;
        let snapshots =
            (self.nb_snapshots > 0).then_some((self.snapshots_offset, self.nb_snapshots));
        let report = check_meta(&mut m, file, repair, &self.limits, snapshots).await?;
        if repair {
            *self.last_inflated.lock().unwrap_or_else(|e| e.into_inner()) = None;
            m.write_back(file).await?;
            file.flush().await?;
        }
        Ok(report)
    }

    /// Checks, and with `repair` fixes, the image held by `file` without
    /// opening it as a node: what `qemu-img check [-r all]` does. Works on
    /// every image that opens read-only, including those with internal
    /// snapshots (which a writable open refuses): every snapshot's tables
    /// are counted as references, so a repair never frees a cluster a
    /// snapshot uses. Only refcounts are repaired (leaks, and refcounts
    /// lower than the references where a refcount block exists); when a
    /// repair leaves no corruption, the dirty and corrupt header bits are
    /// cleared, as QEMU does. Guest data is never touched (persistent
    /// bitmaps stay consistent).
    ///
    /// Nothing else may use the image meanwhile. `options.read_only` is
    /// ignored: a repair writes, a plain check does not. One request
    /// entering the graph at `file`.
    pub async fn check_image(
        file: IoRef<'_>,
        options: Qcow2Options,
        repair: bool,
    ) -> Result<CheckReport> {
        let (_request, file) = file.admit()?;
        let limits = options.limits.clone();
        let drv = Self::open_in_request(
            file,
            Qcow2Options {
                read_only: true,
                ..options
            },
        )
        .await?;
        let snapshots = (drv.nb_snapshots > 0).then_some((drv.snapshots_offset, drv.nb_snapshots));
        let mut m = drv.meta.lock().await;
        let report = check_meta(&mut m, file, repair, &limits, snapshots).await?;
        if repair {
            m.write_back(file).await?;
            file.flush().await?;
        }
        // Version 2 headers have no feature bits.
        if repair && drv.geo.version >= 3 {
            let inc = be64(&m.hdr, OFF_INCOMPATIBLE);
            let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
            if report.corruptions == report.repaired_corruptions && inc & bits != 0 {
                m.hdr[OFF_INCOMPATIBLE..OFF_INCOMPATIBLE + 8]
                    .copy_from_slice(&(inc & !bits).to_be_bytes());
                m.write_header(file, OFF_INCOMPATIBLE, OFF_INCOMPATIBLE + 8)
                    .await?;
                file.flush().await?;
            }
        }
        Ok(report)
    }
}
