//! The connection and the open image (QEMU's `BDRVRBDState`): the
//! librados cluster handle, the pool's I/O context and the librbd image
//! handle, owned together and closed in reverse order, and the synchronous
//! calls on them.

use std::ffi::{c_char, c_int, CStr, CString};
use std::io;
use std::sync::{Condvar, Mutex};

use crate::types::{Error, Result};

use super::ffi::{self, Handle, Lib};
use super::options::{is_secret_option, RbdOptions};

/// A Ceph error code (a negative errno) as our error, for `what`.
pub(super) fn ceph_error(what: &str, r: i64) -> Error {
    let errno = i32::try_from(-r).unwrap_or(libc::EIO);
    Error::driver(
        "rbd",
        io::Error::new(
            io::Error::from_raw_os_error(errno).kind(),
            format!("{what}: {}", io::Error::from_raw_os_error(errno)),
        ),
    )
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("rbd: {what} contains a NUL byte")))
}

/// One snapshot of an RBD image, as [`RbdDriver::snapshots`](super::RbdDriver::snapshots) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RbdSnapshot {
    /// librbd's snapshot id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The image's size when it was taken.
    pub size: u64,
}

/// Requests whose completion callback has not run yet, so that the image is
/// closed only after the last one (see `aio.rs`).
#[derive(Debug, Default)]
pub(super) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    pub(super) fn begin(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    pub(super) fn end(&self) {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Request buffers of 64 KiB and more, kept for reuse: a large request
/// then costs neither an allocation (with glibc, often an `mmap` and a
/// page fault per page) nor zeroing. The buffers are always initialized
/// memory; a read zeroes whatever librbd does not fill (see `aio.rs`).
#[derive(Debug, Default)]
pub(super) struct BufPool(Mutex<Vec<Vec<u8>>>);

impl BufPool {
    /// Smallest buffer worth keeping.
    const MIN: usize = 64 << 10;
    /// Largest buffer kept.
    const MAX: usize = 4 << 20;
    /// Buffers kept at most.
    const COUNT: usize = 64;

    /// A buffer of exactly `len` initialized bytes: a kept one of that
    /// length (its old contents), or a new zeroed one.
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        if len >= Self::MIN {
            let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free.iter().rposition(|b| b.len() == len) {
                return free.swap_remove(i);
            }
        }
        vec![0u8; len]
    }

    /// Gives a buffer back for reuse.
    pub(super) fn put(&self, buf: Vec<u8>) {
        if (Self::MIN..=Self::MAX).contains(&buf.len()) {
            let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < Self::COUNT {
                free.push(buf);
            }
        }
    }
}

/// One open image with the cluster connection and I/O context it uses.
pub(super) struct Image {
    pub lib: &'static Lib,
    cluster: Handle,
    ioctx: Handle,
    pub image: Handle,
    pub in_flight: std::sync::Arc<InFlight>,
    pub buffers: BufPool,
}

// SAFETY: the handles are librados/librbd objects that those libraries
// document as usable from any thread, concurrently (librados' cluster and
// I/O context handles are thread-safe; librbd serialises each image's state
// under its own locks, and QEMU issues requests on one image from several
// I/O threads). We never hand out the raw handles beyond this module's
// calls, and `Drop` (which needs `&mut self`, so no other call is running)
// is the only place they are destroyed.
unsafe impl Send for Image {}
// SAFETY: see `Send`: every call made through `&Image` is thread-safe in
// librados/librbd.
unsafe impl Sync for Image {}

/// The result of connecting: cluster and I/O context, destroyed on drop
/// unless turned into an [`Image`].
struct Connection {
    lib: &'static Lib,
    cluster: Handle,
    ioctx: Handle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: both handles were created by the calls in `connect` and
        // are destroyed exactly once, I/O context first; null means never
        // created.
        unsafe {
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

fn connect(o: &RbdOptions) -> Result<Connection> {
    let lib = ffi::lib().map_err(|e| Error::driver("rbd", e))?;
    let mut c = Connection {
        lib,
        cluster: std::ptr::null_mut(),
        ioctx: std::ptr::null_mut(),
    };
    let user = o
        .user
        .as_deref()
        .map(|u| cstring("the user", u))
        .transpose()?;
    // SAFETY: `c.cluster` is a valid out-pointer; `user` is null (librados'
    // default, `admin`) or a NUL-terminated string that outlives the call.
    let r = unsafe {
        (lib.rados_create)(
            &mut c.cluster,
            user.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()),
        )
    };
    if r < 0 {
        c.cluster = std::ptr::null_mut();
        return Err(ceph_error("cannot create the cluster handle", r.into()));
    }
    // The configuration file: the named one must be read; without one,
    // Ceph's default search, which may find nothing (then the options must
    // say where the monitors are).
    let conf = o
        .conf
        .as_ref()
        .map(|p| cstring("the configuration path", &p.display().to_string()))
        .transpose()?;
    // SAFETY: a live cluster handle, not yet connected; the path is null
    // (default search) or NUL-terminated and outlives the call.
    let r = unsafe {
        (lib.rados_conf_read_file)(
            c.cluster,
            conf.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
        )
    };
    if r < 0 && conf.is_some() {
        return Err(ceph_error(
            &format!(
                "cannot read the Ceph configuration '{}'",
                o.conf.as_deref().unwrap_or_else(|| "".as_ref()).display()
            ),
            r.into(),
        ));
    }
    // SAFETY: a live, unconnected cluster handle; null means `CEPH_ARGS`.
    let r = unsafe { (lib.rados_conf_parse_env)(c.cluster, std::ptr::null()) };
    if r < 0 {
        return Err(ceph_error("cannot parse CEPH_ARGS", r.into()));
    }
    let set = |key: &str, value: &str| -> Result<()> {
        let k = cstring("an option name", key)?;
        let v = cstring("an option value", value)?;
        // SAFETY: a live, unconnected cluster handle; both strings are
        // NUL-terminated and outlive the call (librados copies them).
        let r = unsafe { (lib.rados_conf_set)(c.cluster, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            // The value is never part of the message: it may be a key.
            let shown = if is_secret_option(key) {
                "<redacted>"
            } else {
                value
            };
            return Err(ceph_error(
                &format!("cannot set Ceph option '{key}' to '{shown}'"),
                r.into(),
            ));
        }
        Ok(())
    };
    if let Some(k) = &o.keyring {
        set("keyring", &k.display().to_string())?;
    }
    for (k, v) in &o.extra {
        if k == "key" && !super::options::RbdSecret::new(v.as_str()).is_well_formed() {
            return Err(Error::InvalidArgument(
                "rbd: the key is not a valid cephx key (base64, as in a keyring)".into(),
            ));
        }
        set(k, v)?;
    }
    if let Some(key) = &o.key {
        // librados logs a key it cannot decode, in full: refuse it here.
        if !key.is_well_formed() {
            return Err(Error::InvalidArgument(
                "rbd: the key is not a valid cephx key (base64, as in a keyring)".into(),
            ));
        }
        set("key", key.expose())?;
    }
    // SAFETY: a live, configured cluster handle.
    let r = unsafe { (lib.rados_connect)(c.cluster) };
    if r < 0 {
        return Err(ceph_error("cannot connect to the Ceph cluster", r.into()));
    }
    let pool = cstring("the pool name", &o.pool)?;
    // SAFETY: a connected cluster handle, a NUL-terminated pool name and a
    // valid out-pointer.
    let r = unsafe { (lib.rados_ioctx_create)(c.cluster, pool.as_ptr(), &mut c.ioctx) };
    if r < 0 {
        c.ioctx = std::ptr::null_mut();
        return Err(ceph_error(
            &format!("cannot open pool '{}'", o.pool),
            r.into(),
        ));
    }
    if let Some(ns) = &o.namespace {
        let ns = cstring("the namespace", ns)?;
        // SAFETY: a live I/O context and a NUL-terminated name, copied.
        unsafe { (lib.rados_ioctx_set_namespace)(c.ioctx, ns.as_ptr()) };
    }
    Ok(c)
}

impl Image {
    /// Connects and opens the image (read-only when `read_only`, or at a
    /// snapshot).
    pub(super) fn open(o: &RbdOptions, read_only: bool) -> Result<Image> {
        let mut c = connect(o)?;
        let lib = c.lib;
        let name = cstring("the image name", &o.image)?;
        let snap = o
            .snapshot
            .as_deref()
            .map(|s| cstring("the snapshot name", s))
            .transpose()?;
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut image: Handle = std::ptr::null_mut();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: a live I/O context, NUL-terminated names that outlive the
        // call (librbd copies them), a valid out-pointer.
        let r = unsafe { open(c.ioctx, name.as_ptr(), &mut image, snap_ptr) };
        if r < 0 {
            let at = o
                .snapshot
                .as_deref()
                .map(|s| format!("@{s}"))
                .unwrap_or_default();
            return Err(ceph_error(
                &format!("cannot open image '{}/{}{at}'", o.pool, o.image),
                r.into(),
            ));
        }
        let cluster = std::mem::replace(&mut c.cluster, std::ptr::null_mut());
        let ioctx = std::mem::replace(&mut c.ioctx, std::ptr::null_mut());
        Ok(Image {
            lib,
            cluster,
            ioctx,
            image,
            in_flight: Default::default(),
            buffers: BufPool::default(),
        })
    }

    /// Creates image `o.image` of `size` bytes (librbd's defaults: format
    /// 2, 4 MiB objects).
    pub(super) fn create(o: &RbdOptions, size: u64) -> Result<()> {
        let c = connect(o)?;
        let name = cstring("the image name", &o.image)?;
        let mut order: c_int = 0;
        // SAFETY: a live I/O context, a NUL-terminated name, a valid
        // out-pointer (0: librbd's default object size).
        let r = unsafe { (c.lib.rbd_create)(c.ioctx, name.as_ptr(), size, &mut order) };
        if r < 0 {
            return Err(ceph_error(
                &format!("cannot create image '{}/{}'", o.pool, o.image),
                r.into(),
            ));
        }
        Ok(())
    }

    /// The image's size now (librbd keeps it current: another client's
    /// resize is seen).
    pub(super) fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: a live image handle and a valid out-pointer.
        let r = unsafe { (self.lib.rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(ceph_error("cannot get the image size", r.into()));
        }
        Ok(size)
    }

    /// The object size (QEMU reports it as the cluster size).
    pub(super) fn object_size(&self) -> Result<u64> {
        // SAFETY: all-zero bytes are a valid `ImageInfo` (integers and
        // character arrays).
        let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: a live image handle; `info` is a writable struct of the
        // size passed, librbd's `rbd_image_info_t`.
        let r = unsafe {
            (self.lib.rbd_stat)(self.image, &mut info, std::mem::size_of::<ffi::ImageInfo>())
        };
        if r < 0 {
            return Err(ceph_error("cannot stat the image", r.into()));
        }
        Ok(info.obj_size)
    }

    /// Resizes the image. Blocks (it talks to the cluster): call it off the
    /// executor thread.
    pub(super) fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: a live image handle.
        let r = unsafe { (self.lib.rbd_resize)(self.image, size) };
        if r < 0 {
            return Err(ceph_error("cannot resize the image", r.into()));
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` starts with allocated objects, and
    /// for how many bytes that holds (QEMU's `qemu_rbd_co_block_status`),
    /// from the object map; `None` when the image has no valid fast-diff
    /// map (then everything counts as data, as in QEMU). Blocks: call it
    /// off the executor thread.
    pub(super) fn allocation(&self, offset: u64, len: u64) -> Result<Option<(bool, u64)>> {
        let (mut features, mut flags) = (0u64, 0u64);
        // SAFETY: a live image handle and valid out-pointers.
        let ok = unsafe {
            (self.lib.rbd_get_features)(self.image, &mut features) >= 0
                && (self.lib.rbd_get_flags)(self.image, &mut flags) >= 0
        };
        if !ok
            || features & ffi::FEATURE_FAST_DIFF == 0
            || flags & ffi::FLAG_FAST_DIFF_INVALID != 0
            || len == 0
        {
            return Ok(None);
        }
        let mut req = DiffReq {
            offset,
            bytes: 0,
            exists: false,
        };
        // SAFETY: a live image handle; null means "from the beginning"; the
        // callback has the prototype librbd expects and is called on this
        // thread, before `rbd_diff_iterate2` returns, with `arg` = `&mut
        // req`, which outlives the call and nothing else touches meanwhile.
        let r = unsafe {
            (self.lib.rbd_diff_iterate2)(
                self.image,
                std::ptr::null(),
                offset,
                len,
                1,
                1,
                diff_cb,
                (&mut req as *mut DiffReq).cast(),
            )
        };
        if r < 0 && r != DIFF_STOP {
            return Ok(None);
        }
        if !req.exists {
            if r == 0 {
                // No callback at all: nothing allocated in the range.
                req.bytes = len;
            }
            return Ok(Some((false, req.bytes.clamp(1, len))));
        }
        Ok(Some((true, req.bytes.clamp(1, len))))
    }

    /// The image's snapshots, oldest first.
    pub(super) fn snapshots(&self) -> Result<Vec<RbdSnapshot>> {
        let mut max: c_int = 16;
        loop {
            let cap = usize::try_from(max).unwrap_or(0).max(1);
            let mut snaps: Vec<ffi::SnapInfo> = Vec::with_capacity(cap);
            let mut n = max;
            // SAFETY: a live image handle; `snaps` has room for `max`
            // entries, which librbd writes at most (it answers -ERANGE and
            // the count it needs otherwise).
            let r = unsafe { (self.lib.rbd_snap_list)(self.image, snaps.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                max = n.max(max.saturating_mul(2));
                continue;
            }
            if r < 0 {
                return Err(ceph_error("cannot list the snapshots", r.into()));
            }
            let count = usize::try_from(r).unwrap_or(0).min(cap);
            // SAFETY: librbd filled the first `count` entries.
            unsafe { snaps.set_len(count) };
            let out = snaps
                .iter()
                .map(|s| RbdSnapshot {
                    id: s.id,
                    size: s.size,
                    // SAFETY: librbd set `name` to a NUL-terminated string
                    // that lives until `rbd_snap_list_end`, below.
                    name: unsafe { name_of(s.name) },
                })
                .collect();
            // librbd asks for room for one more entry than it fills and
            // writes a terminator with a null name there, which
            // `rbd_snap_list_end` stops at; it frees the names once.
            if count < cap {
                // SAFETY: the entries `rbd_snap_list` filled plus its
                // terminator, all inside `snaps`' allocation; released
                // once, after the names were copied out above.
                unsafe { (self.lib.rbd_snap_list_end)(snaps.as_mut_ptr()) };
            }
            return Ok(out);
        }
    }
}

/// What `diff_cb` found so far.
struct DiffReq {
    offset: u64,
    bytes: u64,
    exists: bool,
}

/// The callback's "stop iterating" answer (QEMU's
/// `QEMU_RBD_EXIT_DIFF_ITERATE2`; librbd passes it through).
const DIFF_STOP: c_int = -9000;

/// Records the first run of allocated or unallocated bytes from
/// `req.offset` (QEMU's `qemu_rbd_diff_iterate_cb`). librbd reports only
/// allocated extents (and holes an overlay has over its parent's data),
/// in order.
extern "C" fn diff_cb(off: u64, len: usize, exists: c_int, arg: *mut std::ffi::c_void) -> c_int {
    // SAFETY: `arg` is the `&mut DiffReq` `allocation` passed, alive and
    // unaliased for the whole `rbd_diff_iterate2` call this runs inside.
    let req = unsafe { &mut *arg.cast::<DiffReq>() };
    let len = len as u64;
    if exists == 0 {
        // A hole: like an unallocated area.
        return 0;
    }
    if !req.exists && off > req.offset {
        // Started unallocated; this is the first allocated extent.
        req.bytes = off - req.offset;
        return DIFF_STOP;
    }
    if req.exists && off > req.offset.saturating_add(req.bytes) {
        // Started allocated and jumped over a gap: stop at the gap.
        return DIFF_STOP;
    }
    // An extent (whole objects) may start before the range.
    let end = off.saturating_add(len);
    req.bytes = end.saturating_sub(req.offset);
    req.exists = true;
    0
}

/// # Safety
///
/// `p` is null or a NUL-terminated string alive for the call.
unsafe fn name_of(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's promise.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Every request's callback must have run before librbd frees the
        // image: the callbacks call `rbd_aio_release` on completions that
        // belong to it.
        self.in_flight.wait_idle();
        // SAFETY: the handles were made in `open`, are destroyed exactly
        // once, image first, and no request is in flight (above).
        unsafe {
            (self.lib.rbd_close)(self.image);
            (self.lib.rados_ioctx_destroy)(self.ioctx);
            (self.lib.rados_shutdown)(self.cluster);
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").finish_non_exhaustive()
    }
}
