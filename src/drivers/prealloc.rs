//! [`Preallocation`]: how much of a new image is allocated up front
//! (QEMU's `preallocation` creation option, `PreallocMode`).

use std::fmt;
use std::str::FromStr;

use crate::types::Error;

/// How much of a new image's storage is allocated when it is created:
/// QEMU's `-o preallocation=off|metadata|falloc|full`, with the same names
/// and meanings.
///
/// * A raw file ([`FileDriver::create_preallocated`](super::FileDriver::create_preallocated)):
///   `Off` leaves it sparse, `Falloc` has the host allocate its blocks
///   (`posix_fallocate`; they read as zeroes), `Full` writes zeroes over
///   it. `Metadata` is refused: a raw file has no metadata.
/// * A qcow2 image ([`CreateOptions::preallocation`](super::qcow2::CreateOptions::preallocation)):
///   `Metadata` allocates every L2 table and every data cluster (in the
///   refcounts, mapped in L2) and grows the file over them, sparse;
///   `Falloc` and `Full` do that and also allocate the data clusters in
///   the file (`Falloc`) or write zeroes over them (`Full`). Guest writes
///   then land in place, with no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preallocation {
    /// Nothing beyond what the format needs (the default).
    #[default]
    Off,
    /// The format's metadata for the whole disk (qcow2 only).
    Metadata,
    /// The metadata, and the host allocates the data blocks.
    Falloc,
    /// The metadata, and zeroes written over the whole data area.
    Full,
}

impl Preallocation {
    /// QEMU's name for the mode: `off`, `metadata`, `falloc` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

impl fmt::Display for Preallocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preallocation {
    type Err = Error;

    /// Parses QEMU's names; anything else is
    /// [`Error::InvalidArgument`], with QEMU's wording.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(Error::InvalidArgument(format!(
                "Parameter 'preallocation' does not accept value '{s}' \
                 (off, metadata, falloc or full)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Preallocation;

    #[test]
    fn names_round_trip() {
        for p in [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ] {
            assert_eq!(p.name().parse::<Preallocation>().unwrap(), p);
        }
        let e = "sparse".parse::<Preallocation>().unwrap_err().to_string();
        assert!(e.contains("'sparse'"), "{e}");
    }
}
