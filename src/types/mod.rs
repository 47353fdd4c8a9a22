//! The vocabulary every layer speaks: errors, child roles, permissions and
//! block status. Imports nothing else from the crate.

mod error;
mod info;
mod perm;
mod status;

pub use error::{Error, Result};
pub use info::{BackendInfo, ChildInfo, DirtyBitmapInfo, DriverInfo, IoStats, NodeInfo};
pub use perm::{ChildRole, Perm, Permissions};
pub use status::BlockStatus;
