//! The graph lock: per-context reader counters, a writer flag, and the
//! queues that park readers and the writer.
//!
//! This module knows nothing about nodes; it only decides who may touch the
//! graph when. [`crate::IoTask`], [`crate::ReadGuard`] and the write section in
//! [`crate::GraphWriter`] are the public faces built on it.

pub(crate) mod graph_lock;
pub(crate) mod membarrier;
pub(crate) mod primitives;
pub(crate) mod wait_list;
pub(crate) mod wake;

#[cfg(test)]
mod tests;

pub(crate) use graph_lock::{GraphLock, ReaderShard};
pub(crate) use wait_list::WaitList;
