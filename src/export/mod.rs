//! Exports: serving the graph's devices to clients outside the process
//! (QEMU's block exports). Built only on the crate's public API.

pub mod nbd;
