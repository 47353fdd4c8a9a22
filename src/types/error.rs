//! The one error type every fallible operation returns.

use std::io;

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the block graph.
///
/// Each variant carries enough context (node names, offsets, permissions) for
/// the message to make sense without a debugger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The host or a driver reported an I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// A request reaches past the end of the device.
    #[error("request at offset {offset} with length {len} is outside the {size}-byte device")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },

    /// A request does not respect the node's request alignment.
    #[error("request at offset {offset} with length {len} is not aligned to {alignment} bytes")]
    Misaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Required alignment in bytes.
        alignment: u32,
    },

    /// Two users of a node want permissions that exclude each other.
    #[error("permission conflict on node '{node}': {detail}")]
    PermissionConflict {
        /// The node where the conflict appears.
        node: String,
        /// Which parent takes what the other does not share.
        detail: String,
    },

    /// The change would make a node its own ancestor.
    #[error("graph change rejected: making '{child}' a child of '{parent}' would create a cycle")]
    Cycle {
        /// The would-be parent.
        parent: String,
        /// The would-be child.
        child: String,
    },

    /// The change would make a path down the graph longer than
    /// [`MAX_GRAPH_DEPTH`](crate::MAX_GRAPH_DEPTH) nodes.
    #[error(
        "graph change rejected: it would make a path through '{node}' {depth} nodes deep; a \
         graph may be at most {max} deep (each layer nests a request on the stack of the \
         thread that runs it)"
    )]
    GraphTooDeep {
        /// A node on the path that would be too long.
        node: String,
        /// The length the path would have, in nodes.
        depth: usize,
        /// [`MAX_GRAPH_DEPTH`](crate::MAX_GRAPH_DEPTH).
        max: usize,
    },

    /// A node or backend with this name already exists.
    #[error("a node or backend named '{0}' already exists")]
    DuplicateName(String),

    /// A name is empty or contains characters a name may not contain.
    #[error(
        "invalid name '{0}': names are 1-127 characters of [A-Za-z0-9_.-] and start with a letter"
    )]
    InvalidName(String),

    /// No node with this name is in the graph.
    #[error("no node named '{0}'")]
    NodeNotFound(String),

    /// The node is no longer part of the graph.
    #[error("node '{0}' has been removed from the graph")]
    NodeRemoved(String),

    /// The node still has parents, so it cannot be removed.
    #[error("node '{node}' is still used by {parents}")]
    HasParents {
        /// The node that cannot go.
        node: String,
        /// Who still uses it.
        parents: String,
    },

    /// The node has no child with this role.
    #[error("node '{node}' has no {role} child")]
    NoSuchChild {
        /// The parent node.
        node: String,
        /// The missing role.
        role: crate::types::ChildRole,
    },

    /// The backend has no node attached (its medium was removed).
    #[error("backend '{0}' has no medium")]
    NoMedium(String),

    /// A write was issued through a read-only user.
    #[error("'{0}' is read-only")]
    ReadOnly(String),

    /// The driver does not implement this operation.
    #[error("driver '{driver}' does not support {operation}")]
    Unsupported {
        /// The driver's format name.
        driver: &'static str,
        /// What was asked.
        operation: &'static str,
    },

    /// An image file is malformed, corrupt or hostile (bad header field,
    /// table outside the file, reserved bits set, …).
    #[error("invalid {format} image: {reason}")]
    InvalidImage {
        /// The image format (`"qcow2"`).
        format: &'static str,
        /// What is wrong, with the offending values.
        reason: String,
    },

    /// An image uses a feature this implementation does not support
    /// (encryption, external data files, unknown incompatible features…).
    #[error("{format} image uses {feature}, which is not supported")]
    UnsupportedImage {
        /// The image format (`"qcow2"`).
        format: &'static str,
        /// The feature, as specific as the image lets us name it.
        feature: String,
    },

    /// A backing file name was refused by the embedder's backing policy, or
    /// the backing chain is too deep or loops.
    #[error("backing file '{backing}' of '{image}' refused: {reason}")]
    BackingRefused {
        /// The image naming the backing file.
        image: String,
        /// The backing file name as stored in the image.
        backing: String,
        /// Why it was refused.
        reason: String,
    },

    /// An argument is outside what the operation accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Another user (in this or another process) holds the image file in a
    /// way this open excludes (QEMU's `locking=on`: two writers, or a
    /// writer and a reader that does not share writes).
    #[error("failed to lock '{path}': {detail}")]
    Locked {
        /// The image file.
        path: String,
        /// Which permission conflicts, and how to get past it.
        detail: String,
    },

    /// The main loop or I/O thread serving this request has shut down.
    #[error("the {0} has shut down")]
    ShutDown(&'static str),

    /// A handle of one main loop's graph met a proof or task of another
    /// (rule 16): the other graph's lock does not protect it, so nothing was
    /// touched.
    #[error(
        "{what} belongs to another main loop's graph than the read guard or task used \
         (rule 16: a proof of one graph never reaches into another)"
    )]
    WrongGraph {
        /// What was refused (`node 'x'`, `backend 'y'`).
        what: String,
    },

    /// A request was made directly on a node (not through a backend) while
    /// a drain section covers it (rule 18): it would reach a drained node,
    /// and it cannot queue while holding the read lock.
    #[error(
        "node '{node}' is drained: a request made under a read guard cannot reach it until \
         the drain section ends (rule 18: no request reaches a drained node)"
    )]
    Drained {
        /// The drained node.
        node: String,
    },

    /// A user tried an operation that needs a permission it did not take
    /// on the node (QEMU asserts `child->perm & BLK_PERM_RESIZE` in
    /// `bdrv_co_truncate`; here it is an error). Nothing was changed.
    #[error(
        "{user} may not {operation} node '{node}': it did not take the \"{perm}\" permission \
         (Perm::{}) on it",
        perm_const_name(*.perm)
    )]
    PermissionDenied {
        /// Who asked (`backend 'vda'`, `node 'qcow0' (file edge)`).
        user: String,
        /// The permission it lacks.
        perm: crate::types::Perm,
        /// The node the operation was for.
        node: String,
        /// What was refused (`"resize"`).
        operation: &'static str,
    },

    /// No dirty bitmap of this name on the node (QEMU's "Dirty bitmap
    /// 'x' not found").
    #[error("dirty bitmap '{bitmap}' not found on node '{node}'")]
    NoSuchBitmap {
        /// The node.
        node: String,
        /// The bitmap asked for.
        bitmap: String,
    },

    /// The node already has a dirty bitmap of this name (QEMU's "Bitmap
    /// already exists").
    #[error("dirty bitmap '{bitmap}' already exists on node '{node}'")]
    BitmapExists {
        /// The node.
        node: String,
        /// The name.
        bitmap: String,
    },

    /// The dirty bitmap is busy: a block job uses it, so it cannot be
    /// changed, enabled, disabled, cleared, merged into or removed (QEMU's
    /// words).
    #[error("bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),

    /// The dirty bitmap was loaded from an image that did not save it
    /// cleanly (qcow2's `in_use` flag): it may have missed writes, so it can
    /// only be removed (QEMU's words).
    #[error("bitmap '{0}' is inconsistent and cannot be used; remove it (block-dirty-bitmap-remove) to delete it from the image")]
    BitmapInconsistent(String),

    /// A block job refused a command in its current status (QEMU's
    /// "Job 'x' in state 'y' cannot accept command verb 'z'"; its
    /// `JobVerbTable`). A command the table allows but the job's situation
    /// does not (resuming a job nobody paused) is
    /// [`Error::InvalidArgument`].
    #[error("job '{job}' in state '{status}' cannot accept command verb '{verb}'")]
    JobState {
        /// The job's id.
        job: String,
        /// The refused verb (`"pause"`, `"dismiss"`, …).
        verb: &'static str,
        /// The job's status when it was refused.
        status: &'static str,
    },

    /// A block job was cancelled (QEMU's `ECANCELED`): the outcome of its
    /// work, not a failure of it.
    #[error("job '{0}' was cancelled")]
    JobCancelled(String),

    /// A driver failed in a way of its own that no other variant names (a
    /// checksum mismatch, a remote protocol error, …): its own error is
    /// kept as [`source`](std::error::Error::source), so callers can walk
    /// the chain or downcast it. Drivers outside this crate make one with
    /// [`Error::driver`].
    ///
    /// ```
    /// use std::error::Error as _;
    /// use blockgraph::Error;
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("block 7 fails its checksum")]
    /// struct Mismatch;
    ///
    /// let err = Error::driver("checksum", Mismatch);
    /// assert_eq!(err.to_string(), "driver 'checksum': block 7 fails its checksum");
    /// assert!(err.source().unwrap().is::<Mismatch>());
    /// ```
    #[error("driver '{driver}': {source}")]
    Driver {
        /// The driver's format name.
        driver: &'static str,
        /// The driver's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// An [`Error::Driver`]: `driver`'s own error `source` (any error type,
    /// or a message as a `String` or `&str`), kept as the error's source.
    pub fn driver(
        driver: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Error {
        Error::Driver {
            driver,
            source: source.into(),
        }
    }
}

/// The name of `perm`'s constant, for messages that tell what to take.
fn perm_const_name(perm: crate::types::Perm) -> &'static str {
    use crate::types::Perm;
    match perm {
        p if p == Perm::CONSISTENT_READ => "CONSISTENT_READ",
        p if p == Perm::WRITE => "WRITE",
        p if p == Perm::WRITE_UNCHANGED => "WRITE_UNCHANGED",
        p if p == Perm::RESIZE => "RESIZE",
        _ => "…",
    }
}

#[cfg(test)]
mod tests {
    use super::Error;
    use std::error::Error as _;
    use std::io;

    /// A driver's own error that has a cause of its own.
    #[derive(Debug, thiserror::Error)]
    #[error("remote refused the request")]
    struct Remote(#[source] io::Error);

    #[test]
    fn a_driver_error_keeps_its_whole_source_chain() {
        let err = Error::driver("remote", Remote(io::Error::other("connection reset")));
        assert!(matches!(
            err,
            Error::Driver {
                driver: "remote",
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "driver 'remote': remote refused the request"
        );
        let source = err.source().expect("the driver's error is the source");
        assert!(source.is::<Remote>());
        let cause = source.source().expect("and its own source is kept");
        assert_eq!(cause.to_string(), "connection reset");
        assert!(cause.source().is_none());
    }

    #[test]
    fn a_driver_error_can_be_a_plain_message() {
        let err = Error::driver("toy", "lost its marbles");
        assert_eq!(err.to_string(), "driver 'toy': lost its marbles");
        assert_eq!(err.source().unwrap().to_string(), "lost its marbles");
    }
}
