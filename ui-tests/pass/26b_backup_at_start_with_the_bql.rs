// The twin of 02g: the step at a backup's drained start uses the `Bql` it
// is lent for the call (here it adds a dirty bitmap, which then records
// exactly the writes after the backup's point in time) and keeps only
// owned values (a name), never a `GsRef`.
use std::sync::mpsc;
use std::time::Duration;

use blockgraph::drivers::MemoryDriver;
use blockgraph::job::{self, BackupOptions, BackupSync, JobEvent, JobOptions, JobStatus};
use blockgraph::{DirtyBitmapOptions, Error, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, copy) = main
        .run(|bql| {
            bql.write(|w| {
                Ok::<_, Error>((
                    w.add_node("disk", MemoryDriver::new(1 << 20), &[])?,
                    w.add_node("copy", MemoryDriver::new(1 << 20), &[])?,
                ))
            })
        })
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let (handle, d) = (io.handle(), disk.clone());
    let mut events = main
        .run(move |bql| {
            let step_disk = d.clone();
            let options = BackupOptions::new(&d, &copy, BackupSync::Full).at_start(move |bql| {
                let node = step_disk.gs(bql);
                node.add_dirty_bitmap("since-backup", DirtyBitmapOptions::new())?;
                tx.send(node.name().to_owned()).unwrap();
                Ok(())
            });
            Ok::<_, Error>(job::backup(bql, &handle, JobOptions::new("b"), options)?.events())
        })
        .unwrap();
    assert_eq!(rx.recv().unwrap(), "disk");
    loop {
        match events.next_timeout(Duration::from_secs(30)) {
            Some(JobEvent::StatusChange(JobStatus::Null)) => break,
            Some(JobEvent::Completed { error, .. }) => assert_eq!(error, None),
            Some(_) => {}
            None => panic!("the backup did not end"),
        }
    }
    let has = main.run(move |bql| {
        disk.gs(bql)
            .dirty_bitmaps()
            .iter()
            .any(|b| b.name == "since-backup")
    });
    assert!(has);
    drop(io);
    main.shutdown();
}
