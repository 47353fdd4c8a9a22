// Rule 18: driver callbacks are called only by the graph, always with their
// own node.
//
// Violation: a filter's `drained_begin` callback passes the news on to its
// child by calling the child's driver itself, out of the graph's bookkeeping
// (the child would be told it is drained when no section covers it).
// Expected: error[E0277]: a driver callback cannot reach drivers through its
// node reference (`InCallback` is not `OutsideRequest`).
use blockgraph::{driver::{forward, BlockDriver, IoFuture}, CallbackRef, ChildRole, RequestRef};

struct Gossip;

impl BlockDriver for Gossip {
    fn format_name(&self) -> &'static str {
        "gossip"
    }

    fn drained_begin(&self, node: CallbackRef<'_>) {
        if let Some(child) = node.child(ChildRole::Filtered) {
            child.driver().drained_begin(child);
        }
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        forward::length(node, ChildRole::Filtered)
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        forward::to_child(node, ChildRole::Filtered, |child| child.read(offset, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        forward::to_child(node, ChildRole::Filtered, |child| child.write(offset, buf))
    }
}

fn main() {
    let _ = Gossip;
}
