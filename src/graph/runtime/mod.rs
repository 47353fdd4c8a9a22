//! The threads and the contexts that lend proofs: the [`MainLoop`] (lends
//! the `Bql`), its async tasks' [`MainTask`], the [`IoThread`]s, their
//! [`IoContext`]s and each I/O task's [`IoTask`] (lends read guards).

mod io_task;
mod io_thread;
mod main_loop;
mod main_task;
mod task;

pub use io_task::{IoContext, IoTask};
pub use io_thread::{IoThread, IoThreadHandle};
pub use main_loop::MainLoop;
pub use main_task::MainTask;
pub use task::TaskHandle;
