//! The part of librados and librbd the driver calls, loaded at run time.
//!
//! The libraries are opened with `dlopen` the first time an RBD image is
//! opened (`librbd.so.1`, which pulls in `librados.so.2`), and the symbols
//! below are looked up once into a [`Lib`] of plain function pointers that
//! lives for the rest of the process: the libraries are never closed,
//! because librbd's own threads may still run completion callbacks (our
//! code) after the last image is gone. So the crate builds, and every other
//! driver works, on a machine without Ceph; opening an RBD image there
//! fails with an error naming the library.
//!
//! The declarations follow `rados/librados.h` and `rbd/librbd.h` as shipped
//! since Ceph 15 (the ABI of `librbd.so.1` and `librados.so.2` is stable
//! across their versions). Only `rbd_aio_write_zeroes` is optional (newer
//! than the rest); without it, write-zeroes writes zero buffers.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// `rados_t`, `rados_ioctx_t`, `rbd_image_t`, `rbd_completion_t`: opaque.
pub(super) type Handle = *mut c_void;

/// `rbd_callback_t`.
pub(super) type Callback = extern "C" fn(completion: Handle, arg: *mut c_void);

/// The `rbd_diff_iterate2` callback: `(offset, length, exists, arg)`.
pub(super) type DiffCallback = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `RBD_FEATURE_FAST_DIFF`.
pub(super) const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID`.
pub(super) const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// `rbd_image_info_t` (`rbd_stat`).
#[repr(C)]
pub(super) struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `rbd_snap_info_t` (`rbd_snap_list`).
#[repr(C)]
pub(super) struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// The functions, resolved once.
pub(super) struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut Handle, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    pub rados_conf_parse_env: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Handle, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Handle) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Handle),
    pub rados_ioctx_create: unsafe extern "C" fn(Handle, *const c_char, *mut Handle) -> c_int,
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(Handle, *const c_char),
    pub rados_ioctx_destroy: unsafe extern "C" fn(Handle),
    pub rbd_create: unsafe extern "C" fn(Handle, *const c_char, u64, *mut c_int) -> c_int,
    pub rbd_open: unsafe extern "C" fn(Handle, *const c_char, *mut Handle, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(Handle, *const c_char, *mut Handle, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Handle) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Handle, *mut u64) -> c_int,
    pub rbd_stat: unsafe extern "C" fn(Handle, *mut ImageInfo, usize) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Handle, u64) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(Handle, *mut u64) -> c_int,
    pub rbd_get_flags: unsafe extern "C" fn(Handle, *mut u64) -> c_int,
    pub rbd_diff_iterate2: unsafe extern "C" fn(
        Handle,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int,
    pub rbd_snap_list: unsafe extern "C" fn(Handle, *mut SnapInfo, *mut c_int) -> c_int,
    pub rbd_snap_list_end: unsafe extern "C" fn(*mut SnapInfo),
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Handle) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Handle) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Handle),
    pub rbd_aio_read: unsafe extern "C" fn(Handle, u64, usize, *mut c_char, Handle) -> c_int,
    pub rbd_aio_write: unsafe extern "C" fn(Handle, u64, usize, *const c_char, Handle) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Handle, u64, u64, Handle) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Handle, Handle) -> c_int,
    pub rbd_aio_write_zeroes:
        Option<unsafe extern "C" fn(Handle, u64, usize, Handle, c_int, c_int) -> c_int>,
}

/// The libraries' file names (their stable sonames).
pub(super) const LIBRBD: &str = "librbd.so.1";
pub(super) const LIBRADOS: &str = "librados.so.2";

/// The loaded libraries, or why they could not be loaded (the same answer
/// for the life of the process).
pub(super) fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn dlerror() -> String {
    // SAFETY: `dlerror` returns null or a NUL-terminated string owned by the
    // C library that stays valid until the next `dl*` call on this thread;
    // it is copied out at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".to_owned()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn open(name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a NUL-terminated file name; `dlopen` runs the
    // library's initialisers, which are librados'/librbd's own (they set up
    // no state that outlives a process that never calls them). The handle
    // is never closed (see the module docs).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        Err(format!(
            "cannot load {name} ({}); install Ceph's client libraries (Debian: librbd1)",
            dlerror()
        ))
    } else {
        Ok(h)
    }
}

fn sym(handle: *mut c_void, lib: &str, name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: `handle` came from a successful `dlopen` and is never closed;
    // `c` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    if p.is_null() {
        Err(format!("{lib} has no symbol {name}"))
    } else {
        Ok(p)
    }
}

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
///
/// `p` is the address of a C function whose prototype is `F`'s (a function
/// pointer type: a data pointer and a function pointer have the same size
/// and representation on every platform `dlsym` exists on, checked below).
unsafe fn as_fn<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the caller's promise; the sizes are equal (above).
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) }
}

fn load() -> Result<Lib, String> {
    let rbd = open(LIBRBD)?;
    let rados = open(LIBRADOS)?;
    macro_rules! f {
        ($h:expr, $lib:expr, $name:ident) => {{
            let p = sym($h, $lib, stringify!($name))?;
            // SAFETY: the symbol is the C function of that name, whose
            // prototype in librados.h / librbd.h is the field's type.
            unsafe { as_fn(p) }
        }};
    }
    let write_zeroes = match sym(rbd, LIBRBD, "rbd_aio_write_zeroes") {
        // SAFETY: as in `f!`: the symbol's prototype is the field's type.
        Ok(p) => Some(unsafe { as_fn(p) }),
        Err(_) => None,
    };
    Ok(Lib {
        rados_create: f!(rados, LIBRADOS, rados_create),
        rados_conf_read_file: f!(rados, LIBRADOS, rados_conf_read_file),
        rados_conf_parse_env: f!(rados, LIBRADOS, rados_conf_parse_env),
        rados_conf_set: f!(rados, LIBRADOS, rados_conf_set),
        rados_connect: f!(rados, LIBRADOS, rados_connect),
        rados_shutdown: f!(rados, LIBRADOS, rados_shutdown),
        rados_ioctx_create: f!(rados, LIBRADOS, rados_ioctx_create),
        rados_ioctx_set_namespace: f!(rados, LIBRADOS, rados_ioctx_set_namespace),
        rados_ioctx_destroy: f!(rados, LIBRADOS, rados_ioctx_destroy),
        rbd_create: f!(rbd, LIBRBD, rbd_create),
        rbd_open: f!(rbd, LIBRBD, rbd_open),
        rbd_open_read_only: f!(rbd, LIBRBD, rbd_open_read_only),
        rbd_close: f!(rbd, LIBRBD, rbd_close),
        rbd_get_size: f!(rbd, LIBRBD, rbd_get_size),
        rbd_stat: f!(rbd, LIBRBD, rbd_stat),
        rbd_resize: f!(rbd, LIBRBD, rbd_resize),
        rbd_get_features: f!(rbd, LIBRBD, rbd_get_features),
        rbd_get_flags: f!(rbd, LIBRBD, rbd_get_flags),
        rbd_diff_iterate2: f!(rbd, LIBRBD, rbd_diff_iterate2),
        rbd_snap_list: f!(rbd, LIBRBD, rbd_snap_list),
        rbd_snap_list_end: f!(rbd, LIBRBD, rbd_snap_list_end),
        rbd_aio_create_completion: f!(rbd, LIBRBD, rbd_aio_create_completion),
        rbd_aio_get_return_value: f!(rbd, LIBRBD, rbd_aio_get_return_value),
        rbd_aio_release: f!(rbd, LIBRBD, rbd_aio_release),
        rbd_aio_read: f!(rbd, LIBRBD, rbd_aio_read),
        rbd_aio_write: f!(rbd, LIBRBD, rbd_aio_write),
        rbd_aio_discard: f!(rbd, LIBRBD, rbd_aio_discard),
        rbd_aio_flush: f!(rbd, LIBRBD, rbd_aio_flush),
        rbd_aio_write_zeroes: write_zeroes,
    })
}
