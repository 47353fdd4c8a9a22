//! The driver kit: the interface a node's driver implements
//! ([`BlockDriver`]), the proof each of its callbacks receives, and helpers
//! for writing one.
//!
//! A driver's callbacks carry the proof their context requires. I/O
//! callbacks get a [`RequestRef`](crate::RequestRef) of their own node, which only the request
//! path makes: the graph is read-locked for the whole request, and the
//! driver reaches its children with [`NodeRef::child`](crate::NodeRef::child)
//! and passes the request down to them with the same proof, never
//! re-locking and never counted twice. Main-loop callbacks get a
//! [`CallbackRef`](crate::CallbackRef), which only the graph makes too: they can look at the
//! graph like a [`GsRef`](crate::GsRef) but cannot issue I/O (that needs an
//! [`IoRef`](crate::IoRef) or a `RequestRef`), cannot change the graph
//! (that needs a `GraphWriter`) and cannot reach any driver, so no callback
//! is ever called except by the graph, with its own node.
//!
//! This module is what a driver author needs: the trait and its types, and
//! helpers for the common shapes: [`Filter`] for a driver that sits on one
//! child and passes down what it does not change, [`require_child`],
//! [`forward`], and [`Error::driver`](crate::Error::driver) for a driver's
//! own errors.

mod filter;
pub mod forward;
pub(crate) mod range_lock;

pub use crate::graph::driver::{
    read_buf_via_read, readv_via_read, write_buf_via_write, writev_via_write, BlockDriver,
    IoFuture, ResizePermit, BOUNCE_CHUNK,
};
pub use crate::types::io_vec::{Segments, SegmentsMut};
pub use crate::types::BlockStatus;
pub use crate::types::DriverInfo;
pub use crate::types::{IoVec, IoVecMut};
pub use filter::Filter;

use crate::graph::proof::{NodeRef, Proof};
use crate::types::{ChildRole, Error, Result};

/// The `role` child of `node`, or [`Error::NoSuchChild`] naming `node`,
/// under the proof `node` carries: a [`GsRef`](crate::GsRef) or a
/// [`CallbackRef`](crate::CallbackRef) on the main loop (a driver's `open`
/// checking that its child is there), an [`IoRef`](crate::IoRef) or a
/// [`RequestRef`](crate::RequestRef) in I/O code. The child comes back under
/// the same proof, so it can do what `node` can and nothing more.
#[inline]
pub fn require_child<P: Proof>(node: NodeRef<'_, P>, role: ChildRole) -> Result<NodeRef<'_, P>> {
    match node.child(role) {
        Some(child) => Ok(child),
        None => Err(no_such_child(node.name(), role)),
    }
}

/// The error of [`require_child`], out of line: every forwarded request
/// passes through `require_child`, and keeping the error's construction
/// off that path keeps the forwarding call small.
#[cold]
#[inline(never)]
fn no_such_child(node: &str, role: ChildRole) -> Error {
    Error::NoSuchChild {
        node: node.to_owned(),
        role,
    }
}
