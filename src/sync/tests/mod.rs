//! Tests of the graph lock protocol.
//!
//! `lock_unit` runs with plain `cargo test`. The `loom_*` models run under
//! `--cfg loom` (see `tests/lock_loom.rs`, which does that from a plain
//! `cargo test` with a bounded configuration, and the README for the deeper
//! command).

#[cfg(not(loom))]
mod lock_unit;
#[cfg(loom)]
mod loom_lock;
