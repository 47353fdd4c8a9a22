//! Switching between read-only and read-write (QEMU's `raw_reopen_prepare`
//! / `raw_reopen_commit` for `read-only`): a new open file description with
//! the new access mode takes the descriptor's place.
//!
//! `O_RDWR` cannot be changed with `fcntl(F_SETFL)`, so the file is opened
//! again and the new description is moved onto the old descriptor number
//! with `dup3`, which swaps them atomically: host calls already running
//! finish on the old description, every later one uses the new one, and
//! the request path (which holds the `File`) does not change at all. The
//! old description goes away with its last descriptor, and its lock bytes
//! with it.
//!
//! Image locks (QEMU's lock bytes, `lock.rs`): the new description needs
//! different bytes, and the ones the old description holds would conflict
//! with them (a writer unshares what a reader takes and the other way
//! round), so the old ones are released first, then the new ones taken and
//! checked. If another process holds what the new mode needs, the new
//! description is closed, the old bytes are taken again, and the reopen
//! fails with [`Error::Locked`]; the file stays as it was.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;

use crate::types::{Error, Result};

use super::host::path_error;
use super::lock::{lock_image, unlock_image};
use super::options::FileOptions;
use super::state::FileDriver;

impl FileDriver {
    /// Reopens the file read-only or read-write (see the module docs).
    pub(super) fn switch_read_only(&self, read_only: bool) -> Result<()> {
        if read_only == self.is_read_only() {
            return Ok(());
        }
        let old = self.options();
        let new = FileOptions { read_only, ..old };
        let mut open = OpenOptions::new();
        open.read(true).write(!read_only);
        if new.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open
            .open(&self.path)
            .map_err(|e| path_error(&self.path, "cannot reopen", e))?;
        let was_locked = self.is_locked();
        if was_locked {
            unlock_image(&self.host.file);
            match lock_image(&file, &self.path, &new) {
                Ok(held) => self.locked.store(held, Ordering::Release),
                Err(e) => {
                    drop(file);
                    // Take the old bytes again. Another process may have
                    // taken what they exclude in the moment between; then
                    // the file is still usable but unlocked, as on a
                    // filesystem without OFD locks, and the error says so.
                    return match lock_image(&self.host.file, &self.path, &old) {
                        Ok(held) => {
                            self.locked.store(held, Ordering::Release);
                            Err(e)
                        }
                        Err(again) => {
                            self.locked.store(false, Ordering::Release);
                            Err(Error::Locked {
                                path: self.path.display().to_string(),
                                detail: format!(
                                    "{e}; the old locks could not be taken again either ({again}): \
                                     the file is unlocked"
                                ),
                            })
                        }
                    };
                }
            }
        }
        loop {
            // SAFETY: both descriptors are open and owned by `File`s alive
            // for the call; `dup3` makes the old number refer to the new
            // description (the old one closes with its last descriptor) and
            // does not touch memory.
            let r = unsafe {
                libc::dup3(
                    file.as_raw_fd(),
                    self.host.file.as_raw_fd(),
                    libc::O_CLOEXEC,
                )
            };
            if r >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing was swapped: put the old locks back.
            if was_locked {
                unlock_image(&file);
                let held = lock_image(&self.host.file, &self.path, &old).unwrap_or(false);
                self.locked.store(held, Ordering::Release);
            }
            return Err(path_error(&self.path, "cannot reopen", e));
        }
        // `file`'s own descriptor closes here; the description lives on
        // under the old number, with its locks.
        drop(file);
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }
}
