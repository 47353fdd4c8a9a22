// Rule 12 for dirty bitmaps: a driver's I/O callback gets a `RequestRef`,
// which cannot run main-loop commands such as adding a dirty bitmap.
//
// Violation: a driver's `write` adds a bitmap to its own node.
// Expected: error[E0277]: this is a main-loop-only operation, and an
// `IoRef` only proves that the graph is read-locked.
use blockgraph::driver::{BlockDriver, IoFuture};
use blockgraph::{DirtyBitmapOptions, RequestRef};

struct Tracker;

impl BlockDriver for Tracker {
    fn format_name(&self) -> &'static str {
        "tracker"
    }
    fn length<'a>(&'a self, _node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async { Ok(4096) })
    }
    fn read<'a>(&'a self, _node: RequestRef<'a>, _o: u64, _b: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn write<'a>(&'a self, node: RequestRef<'a>, _o: u64, _b: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { node.add_dirty_bitmap("seen", DirtyBitmapOptions::new()) })
    }
}

fn main() {}
