//! Runs `examples/custom_driver.rs` (a checksumming filter written on the
//! public driver kit only), whose `main` asserts that the filter works:
//! reads of what was written pass, a byte changed below the filter fails
//! the read with `Error::Driver` and the filter's own error as its source.
//! So the example cannot rot.

#[path = "../examples/custom_driver.rs"]
mod custom_driver;

#[test]
fn the_custom_driver_example_runs_and_catches_a_changed_block() {
    custom_driver::main().unwrap();
}
