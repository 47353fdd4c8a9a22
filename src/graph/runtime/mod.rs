//! The threads and the contexts that lend proofs: the [`MainLoop`] (lends
//! the `Bql`), its async tasks' [`MainTask`], the [`IoThread`]s, their
//! [`IoContext`]s and each I/O task's [`IoTask`] (lends read guards).

mod io_task;
mod io_thread;
mod main_loop;
mod main_task;
mod task;

/// Stack size of the threads the crate starts to run requests and graph
/// walks on (the main loop, `IoThread`s, the shutdown flusher, NBD server
/// threads): a request nests one future per layer, and a graph may be
/// [`MAX_GRAPH_DEPTH`](crate::MAX_GRAPH_DEPTH) layers deep. Only the
/// pages a thread touches are committed.
pub(crate) const THREAD_STACK_SIZE: usize = 16 << 20;

pub use io_task::{IoContext, IoTask};
pub use io_thread::{IoThread, IoThreadHandle};
pub use main_loop::MainLoop;
pub use main_task::MainTask;
pub use task::TaskHandle;
