//! Compressed clusters: raw deflate streams (no zlib header), as QEMU
//! writes them with `qemu-img convert -c`.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::types::Result;

use super::header::invalid;

/// Inflates one compressed cluster. The stream must produce a whole
/// cluster; bytes after that are ignored (the last 512-byte sector may be
/// shared with the next compressed cluster).
pub(crate) fn inflate_cluster(input: &[u8], cluster_size: usize, at: u64) -> Result<Vec<u8>> {
    let mut d = Decompress::new(false);
    let mut out = vec![0u8; cluster_size];
    match d.decompress(input, &mut out, FlushDecompress::Finish) {
        Ok(_) if d.total_out() == cluster_size as u64 => Ok(out),
        Ok(_) => Err(invalid(format!(
            "compressed cluster at {at:#x} inflates to {} bytes instead of {cluster_size}",
            d.total_out()
        ))),
        Err(e) => Err(invalid(format!(
            "compressed cluster at {at:#x} is not a valid deflate stream: {e}"
        ))),
    }
}

/// Deflates one cluster; `None` when compression would not save a sector
/// (the cluster is then better stored as is).
pub(crate) fn deflate_cluster(data: &[u8]) -> Option<Vec<u8>> {
    let mut c = Compress::new(Compression::default(), false);
    // Only worth it if it saves at least one 512-byte sector.
    let limit = data.len().checked_sub(512)?;
    let mut out = vec![0u8; limit];
    match c.compress(data, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => {
            out.truncate(c.total_out() as usize);
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i / 64) as u8).collect();
        let z = deflate_cluster(&data).expect("compressible");
        assert!(z.len() < data.len() - 512);
        assert_eq!(inflate_cluster(&z, 4096, 0).unwrap(), data);
        // Trailing garbage after the stream is ignored.
        let mut padded = z.clone();
        padded.extend_from_slice(&[0xff; 100]);
        assert_eq!(inflate_cluster(&padded, 4096, 0).unwrap(), data);
    }

    #[test]
    fn short_or_garbage_streams_are_errors() {
        let data = vec![7u8; 4096];
        let z = deflate_cluster(&data).unwrap();
        assert!(inflate_cluster(&z, 8192, 0).is_err(), "too short");
        assert!(inflate_cluster(&[0xff; 64], 4096, 0).is_err(), "garbage");
        assert!(inflate_cluster(&[], 4096, 0).is_err(), "empty");
    }

    #[test]
    fn incompressible_data_is_not_compressed() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(deflate_cluster(&data).is_none());
    }
}
