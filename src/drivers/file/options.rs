//! [`FileOptions`]: how to open a host file.

/// How to open a host file; see [`FileDriver::open`].
///
/// ```
/// use blockgraph::drivers::FileOptions;
/// let opts = FileOptions { read_only: true, ..FileOptions::default() };
/// assert!(opts.locking);
/// ```
///
/// [`FileDriver::open`]: super::FileDriver::open
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for reading only; writes fail with [`Error::ReadOnly`].
    ///
    /// [`Error::ReadOnly`]: crate::types::Error::ReadOnly
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`); requests are bounced as
    /// described on [`FileDriver`].
    ///
    /// [`FileDriver`]: super::FileDriver
    pub direct: bool,
    /// Take QEMU-compatible image locks (default `true`).
    pub locking: bool,
    /// Let other users write the file while we have it open (QEMU's
    /// `force-share` for readers, `share-rw` for writers). Default `false`.
    pub share_writes: bool,
    /// With `direct`: report the real alignment and refuse misaligned
    /// requests instead of bouncing them. Default `false`.
    pub strict_alignment: bool,
    /// How host I/O is done (QEMU's `aio=`): `None` (the default) picks
    /// [`Aio::IoUring`] where the kernel allows it and [`Aio::Threads`]
    /// otherwise; `Some` insists, and opening fails if io_uring is asked
    /// for and unavailable. [`FileDriver::aio`] says which was chosen.
    ///
    /// [`FileDriver::aio`]: super::FileDriver::aio
    pub aio: Option<Aio>,
    /// Flushes succeed without reaching the host (QEMU's
    /// `cache.no-flush=on`, the file half of `cache=unsafe`): what was
    /// written stays in the host's page cache until the kernel writes it
    /// back, so a host crash can lose it. For scratch images and for
    /// `qemu-img convert`-style copies that are checked afterwards. Default
    /// `false`.
    pub no_flush: bool,
}

/// How a file node does its host I/O ([`FileOptions::aio`]).
///
/// ```
/// use blockgraph::drivers::Aio;
/// assert_eq!(Aio::parse("threads"), Some(Aio::Threads));
/// assert_eq!(Aio::IoUring.name(), "io_uring");
/// assert_eq!(Aio::parse("native"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Aio {
    /// Each host call on tokio's blocking thread pool (QEMU's
    /// `aio=threads`). Always available.
    Threads,
    /// An io_uring per I/O thread, completions on the thread's reactor
    /// (QEMU's `aio=io_uring`). Needs the `io-uring` cargo feature (on by
    /// default) and a kernel that lets the process make rings. Requests
    /// polled outside an I/O thread still use the thread pool.
    IoUring,
}

impl Aio {
    /// The option value: `threads` or `io_uring`.
    pub fn name(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::IoUring => "io_uring",
        }
    }

    /// Parses an option value (`threads`, `io_uring`); `None` for anything
    /// else.
    pub fn parse(s: &str) -> Option<Aio> {
        match s {
            "threads" => Some(Aio::Threads),
            "io_uring" => Some(Aio::IoUring),
            _ => None,
        }
    }

    /// Whether io_uring can be used in this process: built with the
    /// `io-uring` feature, the kernel makes a ring for us (not refused by
    /// `io_uring_disabled`, seccomp or an old kernel), and the environment
    /// variable `BLOCKGRAPH_NO_IO_URING` is unset (or `0`). Probed once.
    pub fn io_uring_available() -> bool {
        #[cfg(feature = "io-uring")]
        {
            super::uring::available()
        }
        #[cfg(not(feature = "io-uring"))]
        {
            false
        }
    }
}

impl std::fmt::Display for Aio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            read_only: false,
            direct: false,
            locking: true,
            share_writes: false,
            strict_alignment: false,
            aio: None,
            no_flush: false,
        }
    }
}
