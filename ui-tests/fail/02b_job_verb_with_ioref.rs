// Rule 2 for block jobs: a job's verbs (pause, resume, cancel, complete,
// finalize, dismiss, set-speed) are main-loop commands, like QEMU's QMP
// commands; they take the `Bql`.
//
// Violation: an I/O task holding a read guard pauses a job, passing the
// `IoRef` it has instead of the `Bql` it cannot have.
// Expected: error[E0308]: mismatched types (expected `&Bql`, found
// `&NodeRef<'_, ReadLocked>`).
use blockgraph::job::{Job, JobOptions, JobType};
use blockgraph::{drivers::MemoryDriver, MainLoop};

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let (disk, job) = main
        .run(|bql| {
            let disk = bql.write(|w| w.add_node("disk", MemoryDriver::new(4096), &[]))?;
            let job = Job::create(bql, JobType::Other("mine"), &JobOptions::new("job0"))?;
            Ok::<_, blockgraph::Error>((disk, job))
        })
        .unwrap();
    io.spawn(move |mut cx| async move {
        let guard = cx.read().await;
        let node = disk.io(&guard);
        job.pause(&node)
    })
    .join()
    .unwrap();
}
