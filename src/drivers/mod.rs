//! The built-in drivers: protocol drivers that store data (`file`,
//! `memory`, `null`, and `rbd` with the `rbd` cargo feature), formats (`raw`, `qcow2`) and filters (`throttle`,
//! `copy-on-read`, the fault injector and a pass-through filter).

mod copy_on_read;
mod fault;
mod file;
mod filter;
mod memory;
#[cfg(all(feature = "nbd-client", not(loom)))]
mod nbd;
mod null;
mod prealloc;
pub mod qcow2;
mod raw;
#[cfg(feature = "rbd")]
mod rbd;
mod throttle;

pub use copy_on_read::CopyOnRead;
pub use fault::{FaultAction, FaultController, FaultInjector, FaultOp, FaultRule, RuleId};
pub use file::{Aio, FileDriver, FileOptions};
pub use filter::PassthroughFilter;
pub use memory::MemoryDriver;
#[cfg(all(feature = "nbd-client", not(loom)))]
pub use nbd::{NbdAddress, NbdDriver, NbdOptions};
pub use null::NullDriver;
pub use prealloc::Preallocation;
pub use raw::RawDriver;
#[cfg(feature = "rbd")]
pub use rbd::{RbdDriver, RbdOptions, RbdSecret, RbdSnapshot};
pub use throttle::{ThrottleConfig, ThrottleDriver, ThrottleGroup, ThrottleLimit};
