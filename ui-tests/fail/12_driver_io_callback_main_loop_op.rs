// Rule 12: a driver's I/O callback calling a main-loop-only operation on its
// children.
//
// Violation: a filter's `read` callback (which gets a `RequestRef` of its node)
// takes a `NodeHandle` to its child, a main-loop-only operation.
// Expected: error[E0277]: this is a main-loop-only operation, and a `RequestRef`
// only proves that the graph is read-locked (`InRequest` is not
// `MainLoopProof`).
use blockgraph::{driver::{require_child, BlockDriver, IoFuture}, ChildRole, NodeHandle, RequestRef};
use std::sync::Mutex;

/// Remembers the last child it read from.
#[derive(Default)]
struct RememberingFilter {
    last_child: Mutex<Option<NodeHandle>>,
}

impl BlockDriver for RememberingFilter {
    fn format_name(&self) -> &'static str {
        "remembering"
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        Box::pin(async move { require_child(node, ChildRole::Filtered)?.length().await })
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, ChildRole::Filtered)?;
            *self.last_child.lock().unwrap() = Some(child.to_handle());
            child.read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            require_child(node, ChildRole::Filtered)?
                .write(offset, buf)
                .await
        })
    }
}

fn main() {
    let filter = RememberingFilter::default();
    assert!(filter.last_child.lock().unwrap().is_none());
}
