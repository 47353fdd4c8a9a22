//! Compile-time checks of the locking rules (BRIEF §3): every case in
//! `ui-tests/fail/` must be rejected by the compiler with the error in its
//! `.stderr` snapshot, and every case in `ui-tests/pass/` (the correct way to
//! do the same thing) must compile and run. See `ui-tests/README.md`.
//!
//! Regenerate the snapshots with `TRYBUILD=overwrite cargo test --test ui`
//! and read every changed `.stderr`: the first error must still be about the
//! missing proof, not about something incidental.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui-tests/fail/*.rs");
    t.pass("ui-tests/pass/*.rs");
}
