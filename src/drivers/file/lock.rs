//! Image locks: QEMU's OFD lock bytes (offset 100 + permission bit for
//! what we use, 200 + bit for what we do not share), taken at open and
//! released when the node leaves the graph.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::types::Perm;
use crate::types::{Error, Result};

use super::host::path_error;
use super::options::FileOptions;

/// Offsets of QEMU's lock bytes.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
/// The permissions with lock bytes, in bit order.
const LOCK_PERMS: [(Perm, &str); 4] = [
    (Perm::CONSISTENT_READ, "consistent read"),
    (Perm::WRITE, "write"),
    (Perm::WRITE_UNCHANGED, "write unchanged"),
    (Perm::RESIZE, "resize"),
];

/// Releases every lock byte this open file description may hold.
pub(super) fn unlock_image(file: &File) {
    let fd = file.as_raw_fd();
    let bits = LOCK_PERMS.len() as i64;
    for byte in
        (LOCK_PERM_BASE..LOCK_PERM_BASE + bits).chain(LOCK_SHARED_BASE..LOCK_SHARED_BASE + bits)
    {
        // Unlocking a byte we do not hold is a no-op; an error here
        // (none is expected for F_UNLCK) leaves the lock to the close of
        // the descriptor, as before.
        let _ = ofd_lock(fd, byte, libc::F_UNLCK as libc::c_short, libc::F_OFD_SETLK);
    }
}

/// Takes the image locks for `options`; `Ok(false)` when the filesystem has
/// no OFD locks.
pub(super) fn lock_image(file: &File, path: &Path, options: &FileOptions) -> Result<bool> {
    let take = if options.read_only {
        Perm::CONSISTENT_READ
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
    };
    let share = if options.share_writes {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    let fd = file.as_raw_fd();
    for (bit, (perm, _)) in LOCK_PERMS.iter().enumerate() {
        let bit = bit as i64;
        for (wanted, byte) in [
            (take.contains(*perm), LOCK_PERM_BASE + bit),
            (!share.contains(*perm), LOCK_SHARED_BASE + bit),
        ] {
            if !wanted {
                continue;
            }
            match ofd_lock(fd, byte, libc::F_RDLCK as libc::c_short, libc::F_OFD_SETLK) {
                Ok(_) => {}
                Err(e) if unsupported_lock(&e) => return Ok(false),
                Err(e) => return Err(locked(path, *perm, e)),
            }
        }
    }
    for (bit, (perm, name)) in LOCK_PERMS.iter().enumerate() {
        let bit = bit as i64;
        let who = |byte| -> Result<bool> {
            ofd_lock(fd, byte, libc::F_WRLCK as libc::c_short, libc::F_OFD_GETLK)
                .map_err(|e| path_error(path, "cannot test locks on", e))
        };
        if take.contains(*perm) && who(LOCK_SHARED_BASE + bit)? {
            return Err(Error::Locked {
                path: path.display().to_string(),
                detail: format!(
                    "another user does not share the \"{name}\" permission this open needs; \
                     is the image in use by another process or node?"
                ),
            });
        }
        if !share.contains(*perm) && who(LOCK_PERM_BASE + bit)? {
            return Err(Error::Locked {
                path: path.display().to_string(),
                detail: format!(
                    "another user holds the \"{name}\" permission this open does not share; \
                     is the image in use by another process or node? (open read-only with \
                     share_writes to look at it anyway)"
                ),
            });
        }
    }
    Ok(true)
}

fn unsupported_lock(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn locked(path: &Path, perm: Perm, e: io::Error) -> Error {
    Error::Locked {
        path: path.display().to_string(),
        detail: format!("cannot take the lock for {perm}: {e}"),
    }
}

/// One `fcntl` OFD lock call on the single byte at `byte`. For
/// `F_OFD_GETLK`, returns whether another open file description holds a
/// lock that conflicts with the `kind` lock described.
fn ofd_lock(fd: libc::c_int, byte: i64, kind: libc::c_short, cmd: libc::c_int) -> io::Result<bool> {
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a
    // valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_pid = 0; // required by OFD locks
    loop {
        // SAFETY: `fd` is an open descriptor owned by a `File` the caller
        // keeps alive for the call, and `fl` is a valid, exclusively
        // borrowed `flock` that the kernel reads (and for GETLK writes)
        // only during the call.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short)
}
