//! Opening and creating a host file (QEMU's `raw_open_common`): `open`,
//! `fstat`, the `O_DIRECT` alignment probe, then the image locks (`lock.rs`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::driver::range_lock::RangeLock;
use crate::types::{Error, Result};

use super::host::{path_error, AlignedBuf, Host};
use super::lock::lock_image;
use super::options::{Aio, FileOptions};
use super::state::FileDriver;
use crate::drivers::Preallocation;

impl FileDriver {
    /// Opens `path` (a regular file or a block device).
    ///
    /// Opening is synchronous: it is one `open`, one `fstat` and a few lock
    /// calls, done once on the main loop (or wherever the graph is built),
    /// like QEMU's `bdrv_open`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] (naming the path) when the file cannot be opened,
    /// [`Error::InvalidArgument`] when it is neither a regular file nor a
    /// block device or the filesystem refuses `O_DIRECT`, and
    /// [`Error::Locked`] when another user holds it in a conflicting way;
    /// [`Error::InvalidArgument`] too when [`FileOptions::aio`] insists on
    /// io_uring and it is not available.
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<FileDriver> {
        Self::open_inner(path.as_ref(), options, false)
    }

    /// Creates (or empties) the file at `path`, sizes it to `size` bytes
    /// (sparse) and opens it writable with `options`.
    ///
    /// An existing file is locked before it is emptied, so a file in use by
    /// another writer is refused, not clobbered.
    pub fn create(path: impl AsRef<Path>, size: u64, options: FileOptions) -> Result<FileDriver> {
        let path = path.as_ref();
        if options.read_only {
            return Err(Error::InvalidArgument(format!(
                "cannot create '{}' read-only",
                path.display()
            )));
        }
        let driver = Self::open_inner(path, options, true)?;
        let host = &driver.host;
        if host.block_device {
            return Err(Error::InvalidArgument(format!(
                "'{}' is a block device; create images on regular files",
                path.display()
            )));
        }
        // Only what is needed: on ext4 any truncation to size 0 (also of
        // an empty file) marks the inode to have its dirty data flushed at
        // the last close (`auto_da_alloc`, for programs that rewrite files
        // in place), and this descriptor stays open for the whole life of
        // the node, so an `img convert` of 1 GiB spent 0.45 s in its final
        // `close`. qemu-img escapes it by closing the creating descriptor
        // at once; a fresh file is not truncated here at all.
        let emptied = match host.file.metadata() {
            Ok(m) if m.len() == 0 => Ok(()),
            _ => host.file.set_len(0),
        };
        emptied
            .and_then(|()| {
                if size == 0 {
                    Ok(())
                } else {
                    host.file.set_len(size)
                }
            })
            .map_err(|e| path_error(path, "cannot size", e))?;
        host.size.store(size, Ordering::SeqCst);
        Ok(driver)
    }

    /// Like [`FileDriver::create`], and allocates the file's storage as
    /// `prealloc` says (QEMU's `preallocation` for a `file` node):
    /// [`Off`](Preallocation::Off) is [`FileDriver::create`] (sparse),
    /// [`Falloc`](Preallocation::Falloc) has the host allocate every block
    /// (`posix_fallocate`: the file reads zeroes but takes its whole size on
    /// disk), [`Full`](Preallocation::Full) writes zeroes over the file and
    /// syncs it.
    ///
    /// Synchronous like [`FileDriver::create`]: `Full` takes as long as
    /// writing the whole file.
    ///
    /// # Errors
    ///
    /// Those of [`FileDriver::create`]; [`Error::InvalidArgument`] for
    /// [`Metadata`](Preallocation::Metadata), which a raw file does not have
    /// (QEMU's "Unsupported preallocation mode"), before anything is
    /// created; [`Error::Io`] when the host cannot allocate or write the
    /// space (the file is then left at size 0 and the error names it).
    pub fn create_preallocated(
        path: impl AsRef<Path>,
        size: u64,
        options: FileOptions,
        prealloc: Preallocation,
    ) -> Result<FileDriver> {
        let path = path.as_ref();
        match prealloc {
            Preallocation::Off => return Self::create(path, size, options),
            Preallocation::Metadata => {
                return Err(Error::InvalidArgument(format!(
                    "'{}': Unsupported preallocation mode: metadata (a raw file has no metadata)",
                    path.display()
                )))
            }
            Preallocation::Falloc | Preallocation::Full => {}
        }
        let driver = Self::create(path, 0, options)?;
        let host = &driver.host;
        // The host calls go through a descriptor without `O_DIRECT`, so
        // the buffer and the tail need no alignment. The file is already
        // locked through `host.file`.
        let reopened;
        let file = if options.direct {
            reopened = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| path_error(path, "cannot open", e))?;
            &reopened
        } else {
            &host.file
        };
        let done = match prealloc {
            Preallocation::Falloc => falloc(file, size),
            _ => write_zeroes_over(file, size),
        };
        if let Err(e) = done {
            let _ = host.file.set_len(0);
            return Err(path_error(path, "cannot preallocate", e));
        }
        host.size.store(size, Ordering::SeqCst);
        Ok(driver)
    }

    fn open_inner(path: &Path, options: FileOptions, create: bool) -> Result<FileDriver> {
        let aio = match options.aio {
            None if Aio::io_uring_available() => Aio::IoUring,
            None | Some(Aio::Threads) => Aio::Threads,
            Some(Aio::IoUring) if Aio::io_uring_available() => Aio::IoUring,
            Some(Aio::IoUring) => {
                return Err(Error::InvalidArgument(format!(
                    "cannot open '{}' with aio=io_uring: io_uring is not available \
                     (not built in, refused by the kernel, or BLOCKGRAPH_NO_IO_URING is set)",
                    path.display()
                )))
            }
        };
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only).create(create);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(|e| {
            if options.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::InvalidArgument(format!(
                    "the filesystem of '{}' does not support O_DIRECT (open it without direct)",
                    path.display()
                ))
            } else {
                path_error(path, "cannot open", e)
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| path_error(path, "cannot stat", e))?;
        let kind = meta.file_type();
        let block_device = kind.is_block_device();
        if !kind.is_file() && !block_device {
            return Err(Error::InvalidArgument(format!(
                "'{}' is not a regular file or a block device",
                path.display()
            )));
        }
        let size = if block_device {
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|e| path_error(path, "cannot size", e))?
        } else {
            meta.len()
        };
        let align = if options.direct {
            u64::from(probe_alignment(&file, size))
        } else {
            1
        };
        let locked = if options.locking {
            lock_image(&file, path, &options)?
        } else {
            false
        };
        Ok(FileDriver {
            path: path.to_owned(),
            host: Arc::new(Host {
                file,
                size: AtomicU64::new(size),
                align,
                block_device,
                nowait_reads: AtomicBool::new(align == 1),
            }),
            options,
            locked: AtomicBool::new(locked),
            read_only: AtomicBool::new(options.read_only),
            ranges: RangeLock::default(),
            aio,
            writes: Default::default(),
        })
    }
}

/// The smallest power of two from 512 to 4096 that an `O_DIRECT` read at
/// offset 0 accepts; 4096 when the file is empty (nothing to probe with) or
/// the probe is inconclusive.
fn probe_alignment(file: &File, size: u64) -> u32 {
    if size == 0 {
        return 4096;
    }
    for align in [512u32, 1024, 2048, 4096] {
        let Ok(mut buf) = AlignedBuf::new(u64::from(align), 2) else {
            break;
        };
        match file.read_at(buf.as_mut_slice(), 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => break,
        }
    }
    4096
}

/// `posix_fallocate` over `[0, size)`: the host allocates the blocks
/// (unwritten extents where the filesystem has them, so they read zeroes);
/// glibc writes a byte per block on a filesystem without `fallocate`.
/// Then the first block is written with zeroes (see below).
fn falloc(file: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(());
    }
    let len =
        libc::off_t::try_from(size).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: a plain system call on a descriptor `file` keeps open.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => {}
        e => return Err(std::io::Error::from_raw_os_error(e)),
    }
    // Zeroes written over the first block, as QEMU's `allocate_first_block`
    // after its `posix_fallocate`: an `O_DIRECT` alignment probe reading
    // there then meets a written block, not an unwritten extent (which
    // accepts any alignment). Best effort, as in QEMU.
    let _ = file.write_all_at(&[0u8; 4096][..size.min(4096) as usize], 0);
    Ok(())
}

/// Sizes the file to `size` bytes first (the filesystem may then lay it out
/// in fewer extents, as QEMU does), writes zeroes over all of it in 1 MiB
/// pieces, then syncs it.
fn write_zeroes_over(file: &File, size: u64) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    file.set_len(size)?;
    let zeroes = vec![0u8; CHUNK.min(size) as usize];
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off) as usize;
        file.write_all_at(&zeroes[..n], off)?;
        off += n as u64;
    }
    file.sync_data()
}
