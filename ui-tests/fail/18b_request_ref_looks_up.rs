// Rule 18: a request only goes down the graph, so every request that reaches
// a node is counted where it entered, above it.
//
// Violation: a filter's `read` callback turns to its parent (a request going
// *up* the graph would reach a node that a drain of the parent does not
// wait for) and to another node's driver.
// Expected: error[E0277]: a driver's I/O callback cannot look at its parents
// or at drivers through a `RequestRef` (`InRequest` is not
// `OutsideRequest`).
use blockgraph::{driver::{forward, BlockDriver, IoFuture}, ChildRole, ParentRef, RequestRef};

struct Climber;

impl BlockDriver for Climber {
    fn format_name(&self) -> &'static str {
        "climber"
    }

    fn length<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, u64> {
        forward::length(node, ChildRole::Filtered)
    }

    fn read<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        for parent in node.parents() {
            if let ParentRef::Node { node: above, .. } = parent {
                return above.read(offset, buf).into();
            }
        }
        forward::to_child(node, ChildRole::Filtered, |child| child.read(offset, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        forward::to_child(node, ChildRole::Filtered, |child| child.write(offset, buf))
    }
}

fn main() {
    let _ = Climber;
}
