//! The atomics, `Arc`, `Mutex` and `AtomicWaker` the lock is built from.
//!
//! Under `--cfg loom` these are loom's model-checked versions, so the lock
//! protocol in [`super::graph_lock`] is explored exhaustively by the loom
//! tests without changing a line of it.

#[cfg(loom)]
pub(crate) use loom::{
    future::AtomicWaker,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

#[cfg(not(loom))]
pub(crate) use futures::task::AtomicWaker;
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc, Mutex,
};
