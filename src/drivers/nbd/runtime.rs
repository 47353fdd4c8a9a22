//! The runtime thread every NBD connection of the process runs on.
//!
//! The I/O threads' current-thread runtimes have timers but no reactor
//! for sockets (`graph::runtime::io_thread`), and the main loop may not
//! run one either, so the connections get a runtime of their own: one
//! current-thread runtime on one thread, started by the first
//! [`NbdDriver::connect`](super::NbdDriver::connect) and kept for the
//! life of the process (it idles when no node is connected). One thread
//! is plenty: it only moves bytes between sockets and channels.

use std::io;
use std::sync::Mutex;

use tokio::runtime::{Builder, Handle};

static HANDLE: Mutex<Option<Handle>> = Mutex::new(None);

/// The runtime's handle, starting it on first use.
pub(super) fn handle() -> io::Result<Handle> {
    let mut slot = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = &*slot {
        return Ok(h.clone());
    }
    let rt = Builder::new_current_thread().enable_all().build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("nbd-client".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    *slot = Some(handle.clone());
    Ok(handle)
}
