// Rule 8: entering the nested event loop while a proof is held.
//
// Violation: main-loop code waits synchronously (`bql.block_on`) from inside
// a write section, while the `GraphWriter` is alive.
// Expected: error[E0499]: cannot borrow `*bql` as mutable more than once at
// a time: the write section holds `&mut Bql`, and so would `block_on`.
use blockgraph::MainLoop;

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let task = io.spawn(|_cx| async { 4096 });
    main.run(move |bql| {
        bql.write(|_w| {
            let size = bql.block_on(task);
            assert_eq!(size, 4096);
        });
    });
    drop(io);
    main.shutdown();
}
