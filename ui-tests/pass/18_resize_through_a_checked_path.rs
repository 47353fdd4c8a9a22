// Issue 7, class 8, the right way: resize through a backend that took
// `Perm::RESIZE` (`BlockBackend::truncate`), and let a driver resize its
// child only through `truncate_child`, which checks its edge took it.
use blockgraph::drivers::{MemoryDriver, PassthroughFilter};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (fixed, resizable) = main
        .run(|bql| {
            bql.write(|w| {
                let a = w.add_node("a", MemoryDriver::new(4096), &[])?;
                let b = w.add_node("b", MemoryDriver::new(4096), &[])?;
                // The filter passes its users' RESIZE to its edge, and its
                // `truncate` goes through `truncate_child(Filtered, ..)`.
                let f = w.add_node("f", PassthroughFilter::new(), &[(ChildRole::Filtered, &b)])?;
                let fixed = w.add_backend("vda", &a, BackendOptions::default())?;
                let resizable = w.add_backend("vdb", &f, BackendOptions::resizable())?;
                Ok::<_, Error>((fixed, resizable))
            })
        })
        .unwrap();
    let (refused, len) = io
        .spawn(move |mut cx| async move {
            let refused = fixed.truncate(&mut cx, 8192).await;
            resizable.truncate(&mut cx, 8192).await.unwrap();
            (refused, resizable.length(&mut cx).await.unwrap())
        })
        .join();
    assert!(matches!(refused, Err(Error::PermissionDenied { .. })));
    assert_eq!(len, 8192);
    drop(io);
    main.shutdown();
}
