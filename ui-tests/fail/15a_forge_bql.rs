// Rule 15: forging a proof in safe code.
//
// Violation: building a `Bql` (the main-loop token) with a struct literal,
// off the main loop, to mutate the graph from any thread. (`todo!()` stands
// for the graph, whose type is crate-private too.)
// Expected: error[E0451]: fields `graph`, `main` and `_not_send` of struct
// `Bql` are private: only the main loop makes one, and lends it as `&mut`.
#![allow(unused)] // the code after `todo!()` is unreachable; keep the snapshot to the error
use blockgraph::{Bql, MainLoop};
use std::marker::PhantomData;

fn main() {
    let main = MainLoop::new().unwrap();
    let bql = Bql {
        graph: todo!(),
        main: main.clone(),
        _not_send: PhantomData,
    };
    assert_eq!(bql.graph().nodes().count(), 0);
    main.shutdown();
}
