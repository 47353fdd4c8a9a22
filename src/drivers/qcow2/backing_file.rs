//! Rewriting the backing file name in the header (QEMU's
//! `bdrv_change_backing_file` → `qcow2_change_backing_file`), for block
//! jobs that change an image's backing chain (stream, commit).
//!
//! The name lives in the first cluster, after the header extensions; the
//! backing format is an extension of its own. The first cluster is rebuilt
//! in memory: the header fields as they are, the new backing format
//! extension (if any), every other extension exactly as it was (the
//! feature table, the bitmaps extension, ones we do not know), the end
//! marker, the new name, zeroes to the end of the cluster. It is written in
//! one write, after everything the image holds has been flushed: the new
//! name may point at an image that lacks data the old one supplied, so the
//! data copied into this image (by the stream that makes this change)
//! must be durable first. A crash leaves the old cluster or the new one.

use crate::driver::require_child;
use crate::graph::proof::IoRef;
use crate::types::{ChildRole, Error, Result};

use super::header::{
    be32, be64, EXT_BACKING_FORMAT, EXT_END, MAX_BACKING_FORMAT, MAX_BACKING_NAME, V2_HEADER_LEN,
};
use super::state::{BackingName, Qcow2Driver};

/// Header fields: backing file name offset (u64) and length (u32).
const OFF_BACKING_OFFSET: usize = 8;
const OFF_BACKING_SIZE: usize = 16;
/// Header field of version 3: the header's length.
const OFF_HEADER_LENGTH: usize = 100;

impl Qcow2Driver {
    /// Changes the backing file name (and format) stored in the image to
    /// `backing` = `(file, format)`, or removes it with `None` (QEMU's
    /// `bdrv_change_backing_file`). `node` is this driver's node. Only the
    /// header changes: the graph's backing edge is the caller's business
    /// (stream and commit jobs change both). [`backing_file`] and
    /// [`backing_format`] report the new name once the header is written.
    ///
    /// [`backing_file`]: Qcow2Driver::backing_file
    /// [`backing_format`]: Qcow2Driver::backing_format
    ///
    /// The image is flushed first (metadata written back, the file flushed)
    /// and the header cluster is written in one piece, then flushed.
    ///
    /// One request entering the graph at `node` (see [`IoRef`]).
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`] on a read-only image; [`Error::InvalidArgument`]
    /// for a name that is empty, longer than 1023 bytes or holds a NUL, a
    /// format longer than 32 bytes, or a name and extensions that do not
    /// fit in the first cluster (nothing is written then); I/O errors.
    pub async fn change_backing_file(
        &self,
        node: IoRef<'_>,
        backing: Option<(&str, &str)>,
    ) -> Result<()> {
        self.own_node(node)?;
        let (_request, node) = node.admit()?;
        self.check_writable(node)?;
        if let Some((file, format)) = backing {
            if file.is_empty() || file.len() > MAX_BACKING_NAME as usize || file.contains('\0') {
                return Err(Error::InvalidArgument(format!(
                    "a backing file name must be 1 to {MAX_BACKING_NAME} bytes without NUL"
                )));
            }
            if format.len() > MAX_BACKING_FORMAT as usize
                || !format.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(Error::InvalidArgument(format!(
                    "a backing format name must be at most {MAX_BACKING_FORMAT} printable ASCII bytes"
                )));
            }
        }
        let file = require_child(node, ChildRole::File)?;
        // Everything copied into the image is durable before the header
        // stops pointing where it was read from.
        self.do_flush(node).await?;
        let mut m = self.meta.lock().await;
        if let Some(why) = &m.broken {
            return Err(Error::InvalidImage {
                format: "qcow2",
                reason: why.clone(),
            });
        }
        let cluster = rebuild(&m.hdr, self.geo.version, backing)?;
        let old = std::mem::replace(&mut m.hdr, cluster);
        let len = m.hdr.len();
        if let Err(e) = m.write_header(file, 0, len).await {
            m.hdr = old;
            return Err(e);
        }
        // What `backing_file()` and `info` report from now on (still under
        // the metadata lock, so two changes cannot cross).
        *self.backing.lock().unwrap_or_else(|e| e.into_inner()) = BackingName {
            file: backing.map(|(f, _)| f.to_owned()),
            format: backing.map(|(_, t)| t.to_owned()).filter(|t| !t.is_empty()),
        };
        file.flush().await
    }
}

/// The first cluster `hdr` with its backing name and format replaced.
fn rebuild(hdr: &[u8], version: u32, backing: Option<(&str, &str)>) -> Result<Vec<u8>> {
    let cs = hdr.len();
    let header_len = if version >= 3 {
        be32(hdr, OFF_HEADER_LENGTH) as usize
    } else {
        V2_HEADER_LEN as usize
    };
    let old_name_at = be64(hdr, OFF_BACKING_OFFSET) as usize;
    // The extensions end at the end marker, or where the name begins.
    let ext_limit = if old_name_at != 0 {
        old_name_at.min(cs)
    } else {
        cs
    };
    let mut kept: Vec<(u32, &[u8])> = Vec::new();
    let mut pos = header_len;
    while pos + 8 <= ext_limit {
        let ty = be32(hdr, pos);
        let len = be32(hdr, pos + 4) as usize;
        if ty == EXT_END {
            break;
        }
        let data_end = pos + 8 + len;
        if data_end > ext_limit {
            // Open validated the extensions; a header that changed under
            // us is not something to rewrite.
            return Err(Error::InvalidImage {
                format: "qcow2",
                reason: format!("header extension {ty:#010x} runs past the extension area"),
            });
        }
        if ty != EXT_BACKING_FORMAT {
            kept.push((ty, &hdr[pos + 8..data_end]));
        }
        pos += 8 + len.div_ceil(8) * 8;
    }

    let mut out = vec![0u8; cs];
    out[..header_len].copy_from_slice(&hdr[..header_len]);
    let mut at = header_len;
    let too_big = || {
        Error::InvalidArgument(format!(
            "the backing file name and header extensions do not fit in the {cs}-byte first cluster"
        ))
    };
    let put_ext = |out: &mut [u8], at: &mut usize, ty: u32, data: &[u8]| -> Result<()> {
        let padded = data.len().div_ceil(8) * 8;
        if *at + 8 + padded > cs {
            return Err(too_big());
        }
        out[*at..*at + 4].copy_from_slice(&ty.to_be_bytes());
        out[*at + 4..*at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        out[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
        *at += 8 + padded;
        Ok(())
    };
    if let Some((_, format)) = backing {
        if !format.is_empty() {
            put_ext(&mut out, &mut at, EXT_BACKING_FORMAT, format.as_bytes())?;
        }
    }
    for (ty, data) in kept {
        put_ext(&mut out, &mut at, ty, data)?;
    }
    // The end marker: eight zero bytes, already there.
    if at + 8 > cs {
        return Err(too_big());
    }
    at += 8;
    let (name_at, name_len) = match backing {
        Some((file, _)) => {
            if at + file.len() > cs {
                return Err(too_big());
            }
            out[at..at + file.len()].copy_from_slice(file.as_bytes());
            (at as u64, file.len() as u32)
        }
        None => (0, 0),
    };
    out[OFF_BACKING_OFFSET..OFF_BACKING_OFFSET + 8].copy_from_slice(&name_at.to_be_bytes());
    out[OFF_BACKING_SIZE..OFF_BACKING_SIZE + 4].copy_from_slice(&name_len.to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::qcow2::header::{Header, NewHeader};
    use crate::drivers::qcow2::Qcow2Limits;

    fn image(version: u32, backing: Option<(&str, &str)>) -> Vec<u8> {
        NewHeader {
            version,
            cluster_bits: 16,
            size: 1 << 20,
            l1_size: 1,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            backing_file: backing.map(|b| b.0),
            backing_format: backing.map(|b| b.1),
        }
        .to_cluster()
        .expect("a header")
    }

    fn parse(hdr: &[u8]) -> Header {
        let mut file = hdr.to_vec();
        file.resize(4 << 16, 0);
        Header::parse(&file, 4 << 16, &Qcow2Limits::default()).expect("valid")
    }

    #[test]
    fn the_name_and_format_change_and_other_extensions_stay() {
        for version in [2, 3] {
            let old = image(version, Some(("mid.qcow2", "qcow2")));
            let new = rebuild(&old, version, Some(("base.raw", "raw"))).unwrap();
            let h = parse(&new);
            assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            assert_eq!(new[..16 - 8], old[..16 - 8], "fields before the name");
            assert_eq!(new[20..72], old[20..72], "fields after the name");
            if version == 3 {
                // The feature table is still there, as it was.
                let find = |b: &[u8]| b.windows(11).position(|w| w == b"dirty bit\0\0");
                assert!(find(&old).is_some() && find(&new).is_some());
            }
        }
    }

    #[test]
    fn no_backing_clears_name_and_format() {
        let old = image(3, Some(("mid.qcow2", "qcow2")));
        let new = rebuild(&old, 3, None).unwrap();
        let h = parse(&new);
        assert_eq!(h.backing_file, None);
        assert_eq!(h.backing_format, None);
        assert_eq!(be64(&new, OFF_BACKING_OFFSET), 0);
    }

    #[test]
    fn an_image_without_backing_gets_one() {
        let old = image(3, None);
        let new = rebuild(&old, 3, Some(("b.qcow2", "qcow2"))).unwrap();
        assert_eq!(parse(&new).backing_file.as_deref(), Some("b.qcow2"));
    }

    #[test]
    fn a_name_that_does_not_fit_is_refused() {
        let mut old = image(3, None);
        old.truncate(512);
        let long = "x".repeat(500);
        assert!(matches!(
            rebuild(&old, 3, Some((&long, "qcow2"))),
            Err(Error::InvalidArgument(_))
        ));
    }
}
