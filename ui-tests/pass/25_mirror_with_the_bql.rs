// The twin of 02d: a mirror started on the main loop with the `Bql`,
// made ready, completed there with the `Bql` (the pivot), and the guest's
// backend found on the target afterwards, with a new `GsRef`.
use std::time::Duration;

use blockgraph::drivers::MemoryDriver;
use blockgraph::job::{self, JobEvent, JobOptions, JobStatus, MirrorOptions, MirrorTarget};
use blockgraph::{BackendOptions, Error, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (src, dst, vda) = main
        .run(|bql| {
            bql.write(|w| {
                let s = w.add_node("src", MemoryDriver::from_bytes(vec![7; 1 << 20]), &[])?;
                let d = w.add_node("dst", MemoryDriver::new(1 << 20), &[])?;
                let vda = w.add_backend("vda", &s, BackendOptions::default())?;
                Ok::<_, Error>((s, d, vda))
            })
        })
        .unwrap();
    let (handle, s, d) = (io.handle(), src.clone(), dst.clone());
    let (job, mut events) = main
        .run(move |bql| {
            let options = MirrorOptions::new(&s, MirrorTarget::Node(d));
            let job = job::mirror(bql, &handle, JobOptions::new("m"), options)?;
            Ok::<_, Error>((job.clone(), job.events()))
        })
        .unwrap();
    loop {
        match events.next_timeout(Duration::from_secs(30)) {
            Some(JobEvent::Ready) => {
                let j = job.clone();
                main.run(move |bql| j.complete(bql)).unwrap();
            }
            Some(JobEvent::StatusChange(JobStatus::Null)) => break,
            Some(JobEvent::Completed { error, .. }) => assert_eq!(error, None),
            Some(_) => {}
            None => panic!("the mirror did not end"),
        }
    }
    main.run(move |bql| {
        let target = dst.gs(bql); // taken again after the pivot
        assert_eq!(target.parents().len(), 1);
        assert!(src.gs(bql).parents().len() == 0);
    });
    let byte = io
        .spawn(move |mut cx| async move {
            let mut buf = [0u8; 1];
            vda.read(&mut cx, 4096, &mut buf).await.map(|_| buf[0])
        })
        .join()
        .unwrap();
    assert_eq!(byte, 7);
    drop(io);
    main.shutdown();
}
