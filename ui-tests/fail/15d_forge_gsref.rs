// Rule 15: forging a proof in safe code.
//
// Violation: building a `GsRef` (a node seen under the main-loop proof)
// with a struct literal, so as to read a node without holding the `Bql`.
// (`todo!()` stands for the node, whose type is crate-private too.)
// Expected: error[E0451]: fields `node` and `_proof` of struct `NodeRef` are
// private: `GsRef`s come only from `&Bql` (`bql.node()`, `handle.gs(bql)`)
// or from a `GraphWriter`.
#![allow(unused)] // the code after `todo!()` is unreachable; keep the snapshot to the error
use blockgraph::GsRef;
use std::marker::PhantomData;

fn main() {
    let node: GsRef<'static> = GsRef {
        node: todo!(),
        _proof: PhantomData,
    };
    assert_eq!(node.name(), "disk");
}
