//! The vocabulary every layer speaks: errors, child roles, permissions,
//! block status and I/O vectors. Imports nothing else from the crate.

mod error;
mod info;
pub(crate) mod io_buf;
pub(crate) mod io_vec;
mod perm;
mod status;

pub use error::{Error, Result};
pub use info::{BackendInfo, ChildInfo, DirtyBitmapInfo, DriverInfo, IoStats, NodeInfo};
pub use io_buf::{IoBuf, IO_BUF_ALIGN};
pub use io_vec::{IoVec, IoVecMut};
pub use perm::{ChildRole, Perm, Permissions};
pub use status::BlockStatus;
