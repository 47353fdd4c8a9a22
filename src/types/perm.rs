//! Roles and permissions: what a child is to its parent, and what each user
//! of a node takes and shares (QEMU's `BdrvChildRole` and `BLK_PERM_*`).

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

/// What a child is to its parent (QEMU's `BdrvChildRole`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ChildRole {
    /// The protocol node a format driver stores its data in (qcow2's file).
    File,
    /// The image whose data shows through unallocated areas (a backing file).
    Backing,
    /// An external data file.
    Data,
    /// The one child a filter passes requests to.
    Filtered,
}

impl fmt::Display for ChildRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::Data => "data",
            ChildRole::Filtered => "filtered",
        })
    }
}

/// A set of permissions on a node (QEMU's `BLK_PERM_*`).
///
/// Each edge *takes* some permissions on its child and *shares* some with
/// every other user of that child. Two users conflict when one takes what the
/// other does not share.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return what the guest last wrote (QEMU's `CONSISTENT_READ`).
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// May change the data.
    pub const WRITE: Perm = Perm(2);
    /// May write data that does not change what a reader sees (copy-on-read,
    /// stream).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// May change the size.
    pub const RESIZE: Perm = Perm(8);
    /// Every permission.
    pub const ALL: Perm = Perm(15);

    /// Whether every permission in `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` holds no permission.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Perm::CONSISTENT_READ, "read"),
            (Perm::WRITE, "write"),
            (Perm::WRITE_UNCHANGED, "write-unchanged"),
            (Perm::RESIZE, "resize"),
        ];
        let mut first = true;
        for (p, name) in names {
            if self.contains(p) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// The permissions one user takes on a node and those it shares with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// What this user needs.
    pub take: Perm,
    /// What this user lets every other user take.
    pub share: Perm,
}

impl Permissions {
    /// Takes nothing and shares everything: the user does not mind anyone.
    pub const UNRESTRICTED: Permissions = Permissions {
        take: Perm::NONE,
        share: Perm::ALL,
    };

    /// A guest device that reads and writes and lets others only read: the
    /// usual exclusive writer.
    pub const EXCLUSIVE_WRITER: Permissions = Permissions {
        take: Perm(Perm::CONSISTENT_READ.0 | Perm::WRITE.0),
        share: Perm(Perm::CONSISTENT_READ.0 | Perm::WRITE_UNCHANGED.0),
    };

    /// A reader that tolerates any other user.
    pub const SHARED_READER: Permissions = Permissions {
        take: Perm::CONSISTENT_READ,
        share: Perm::ALL,
    };

    /// What a node takes and shares on its `Backing` child, given what its
    /// own users take and share (QEMU's `bdrv_default_perms_for_cow`): a
    /// consistent read, and nobody else may change the backing data —
    /// unless every user of the node shares [`Perm::WRITE`] itself (it
    /// copes with data changing under it), in which case the backing edge
    /// shares `WRITE` and `RESIZE` too.
    ///
    /// That is how a block job writes into a node that an overlay reads
    /// (QEMU's commit): the job puts a filter above the overlay that shares
    /// everything on its child, so the overlay's users share `WRITE`, so
    /// its backing edge does, so the job's own writer on the base (a
    /// backend with [`stay_at_node`](crate::BackendOptions::stay_at_node))
    /// is allowed. Without such a filter a guest backend above the overlay
    /// shares no `WRITE`, and a writer on the base is refused.
    pub fn for_backing(users: Permissions) -> Permissions {
        let mut share = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if users.share.contains(Perm::WRITE) {
            share = share | Perm::WRITE | Perm::RESIZE;
        }
        Permissions {
            take: Perm::CONSISTENT_READ,
            share,
        }
    }
}
