// The twin of 02f: a backup started on the main loop with the `Bql`, no
// `GsRef` held across it (it inserts a filter above the source); guest
// writes during the job leave the target holding the source as it was at
// the start.
use std::time::Duration;

use blockgraph::drivers::MemoryDriver;
use blockgraph::job::{self, BackupOptions, BackupSync, JobEvent, JobOptions, JobStatus};
use blockgraph::{BackendOptions, Error, MainLoop};

const SIZE: u64 = 1 << 20;

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, copy, vda) = main
        .run(|bql| {
            bql.write(|w| {
                let disk = w.add_node("disk", MemoryDriver::from_bytes(vec![7; SIZE as usize]), &[])?;
                let copy = w.add_node("copy", MemoryDriver::new(SIZE), &[])?;
                let vda = w.add_backend("vda", &disk, BackendOptions::default())?;
                Ok::<_, Error>((disk, copy, vda))
            })
        })
        .unwrap();
    let (handle, d, c) = (io.handle(), disk.clone(), copy.clone());
    let mut events = main
        .run(move |bql| {
            let name = d.gs(bql).name().to_owned(); // a GsRef, dropped here
            let mut options = JobOptions::new("b");
            options.speed = 1 << 20;
            let job = job::backup(bql, &handle, options, BackupOptions::new(&d, &c, BackupSync::Full))?;
            println!("backing up '{name}'");
            Ok::<_, Error>(job.events())
        })
        .unwrap();
    let blk = vda.clone();
    io.spawn(move |mut cx| async move { blk.write(&mut cx, 0, &[9; 4096]).await })
        .join()
        .unwrap();
    loop {
        match events.next_timeout(Duration::from_secs(30)) {
            Some(JobEvent::StatusChange(JobStatus::Null)) => break,
            Some(JobEvent::Completed { error, .. }) => assert_eq!(error, None),
            Some(_) => {}
            None => panic!("the backup did not end"),
        }
    }
    let (first, now) = io
        .spawn(move |mut cx| async move {
            let g = cx.read().await;
            let mut a = [0u8; 1];
            copy.io(&g).read(0, &mut a).await?;
            let mut b = [0u8; 1];
            disk.io(&g).read(0, &mut b).await?;
            Ok::<_, Error>((a[0], b[0]))
        })
        .join()
        .unwrap();
    assert_eq!((first, now), (7, 9), "the copy holds the start");
    drop(vda);
    drop(io);
    main.shutdown();
}
