//! Runs `examples/virtio_blk.rs` (a virtio-blk-style device serving
//! requests from a `vm_memory::GuestMemoryMmap` with vectored reads and
//! writes on a qcow2 image), whose `main` asserts that the guest reads back
//! what it wrote, the disk holds it too, and a request with overlapping
//! buffers is refused. So the example cannot rot.

#[path = "../examples/virtio_blk.rs"]
mod virtio_blk;

mod common;

#[test]
fn the_virtio_blk_example_serves_guest_memory_directly() {
    let _dog = common::watchdog("virtio_blk", std::time::Duration::from_secs(120));
    virtio_blk::main().unwrap();
}
