// The twin of 02c and 05e: a commit started on the main loop with the
// `Bql`, no `GsRef` held across it; the overlay is looked at again
// afterwards, with a new `GsRef`. Runs a real commit of an intermediate
// qcow2 image (in memory) into its base.
use std::time::Duration;

use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use blockgraph::drivers::MemoryDriver;
use blockgraph::job::{self, CommitOptions, JobEvent, JobOptions, JobStatus};
use blockgraph::{BackendOptions, ChildRole, Error, MainLoop, NodeHandle};

const SIZE: u64 = 1 << 20;

/// A qcow2 image in memory on `backing` (if any), with `data` at 0.
fn image(
    main: &MainLoop,
    io: &blockgraph::IoThread,
    name: &str,
    backing: Option<&NodeHandle>,
    data: Option<u8>,
) -> NodeHandle {
    let file_name = format!("{name}-file");
    let file = main
        .run(move |bql| bql.write(|w| w.add_node(&file_name, MemoryDriver::new(4 << 20), &[])))
        .unwrap();
    let mut create = CreateOptions::new(SIZE).cluster_size(64 << 10);
    if let Some(b) = backing {
        create = create.backing(b.name(), "qcow2");
    }
    let f = file.clone();
    let driver = io
        .spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::create(f.io(&g), &create).await?;
            Qcow2Driver::open(f.io(&g), Qcow2Options::default()).await
        })
        .join()
        .unwrap();
    let (name, b) = (name.to_owned(), backing.cloned());
    let node = main
        .run(move |bql| {
            bql.write(|w| {
                let mut children = vec![(ChildRole::File, &file)];
                if let Some(b) = &b {
                    children.push((ChildRole::Backing, b));
                }
                w.add_node(&name, driver, &children)
            })
        })
        .unwrap();
    if let Some(byte) = data {
        let n = node.clone();
        io.spawn(move |mut cx| async move {
            let g = cx.read().await;
            n.io(&g).write(0, &[byte; 4096]).await
        })
        .join()
        .unwrap();
    }
    node
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let base = image(&main, &io, "base", None, Some(1));
    let mid = image(&main, &io, "mid", Some(&base), Some(2));
    let top = image(&main, &io, "top", Some(&mid), None);
    let t = top.clone();
    let vda = main
        .run(move |bql| bql.write(|w| w.add_backend("vda", &t, BackendOptions::default())))
        .unwrap();

    let (handle, t, m) = (io.handle(), top.clone(), mid.clone());
    let mut events = main
        .run(move |bql| {
            let overlay = t.gs(bql).name().to_owned(); // a GsRef, dropped here
            let job = job::commit(bql, &handle, JobOptions::new("c"), CommitOptions::new(&m))?;
            println!("committing into the chain below '{overlay}'");
            Ok::<_, Error>(job.events())
        })
        .unwrap();
    loop {
        match events.next_timeout(Duration::from_secs(30)) {
            Some(JobEvent::StatusChange(JobStatus::Null)) => break,
            Some(JobEvent::Completed { error, .. }) => assert_eq!(error, None),
            Some(_) => {}
            None => panic!("the commit did not end"),
        }
    }
    let (t, b) = (top.clone(), base.clone());
    main.run(move |bql| {
        let overlay = t.gs(bql); // taken again after the graph changed
        assert_eq!(
            overlay.backing().map(|n| n.name().to_owned()),
            Some(b.name().to_owned())
        );
    });
    let byte = io
        .spawn(move |mut cx| async move {
            let mut buf = [0u8; 1];
            vda.read(&mut cx, 0, &mut buf).await.map(|_| buf[0])
        })
        .join()
        .unwrap();
    assert_eq!(byte, 2);
    drop(io);
    main.shutdown();
}
