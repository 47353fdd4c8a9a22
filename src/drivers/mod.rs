//! The built-in drivers: protocol drivers that store data (`file`,
//! `memory`, `null`), formats (`raw`, `qcow2`) and filters (`throttle`,
//! `copy-on-read`, the fault injector and a pass-through filter).

mod copy_on_read;
mod fault;
mod file;
mod filter;
mod memory;
mod null;
pub mod qcow2;
mod raw;
mod throttle;

pub use copy_on_read::CopyOnRead;
pub use fault::{FaultAction, FaultController, FaultInjector, FaultOp, FaultRule, RuleId};
pub use file::{Aio, FileDriver, FileOptions};
pub use filter::PassthroughFilter;
pub use memory::MemoryDriver;
pub use null::NullDriver;
pub use raw::RawDriver;
pub use throttle::{ThrottleConfig, ThrottleDriver, ThrottleGroup, ThrottleLimit};
