//! The storage daemon benchmark against qemu-storage-daemon (filled in next).

fn main() {}
