// The twin of 02b, 04c, 09b and 10b: a job of one's own whose steps each
// hold the proof they need. Its work reads under a read guard and drops it
// before the pause point; its graph change runs on the main loop, drained,
// in a write section, after the guard is gone; its verbs are given on the
// main loop.
use std::time::Duration;

use blockgraph::job::{Job, JobCx, JobDriver, JobEvent, JobOptions, JobStatus, JobType};
use blockgraph::{drivers::MemoryDriver, ChildRole, MainLoop, NodeHandle, Result};

struct Mine {
    top: NodeHandle,
}

impl JobDriver for Mine {
    fn job_type(&self) -> JobType {
        JobType::Other("mine")
    }

    async fn run(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        for offset in (0..4096).step_by(512) {
            {
                let guard = cx.io().read().await;
                let mut buf = [0u8; 512];
                self.top.io(&guard).read(offset, &mut buf).await?;
            }
            cx.runner().add_progress(512);
            cx.pause_point().await?;
        }
        Ok(())
    }

    async fn prepare(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let top = self.top.clone();
        cx.on_main_loop(move |bql| {
            let drained = bql.drain(&top);
            bql.write(|w| w.set_backing(&drained, None))
        })
        .await?
    }
}

fn main() {
    let main = MainLoop::new().unwrap();
    let io = main.new_io_thread("io0").unwrap();
    let top = main
        .run(|bql| {
            bql.write(|w| {
                let base = w.add_node("base", MemoryDriver::new(4096), &[])?;
                w.add_node(
                    "top",
                    blockgraph::drivers::PassthroughFilter::new(),
                    &[(ChildRole::Filtered, &base), (ChildRole::Backing, &base)],
                )
            })
        })
        .unwrap();
    let (handle, t) = (io.handle(), top.clone());
    let mut events = main
        .run(move |bql| {
            let job = Job::create(bql, JobType::Other("mine"), &JobOptions::new("job0"))?;
            // A verb takes the Bql. Before `start`: a job this short may be
            // pending by the time a verb after it runs.
            job.set_speed(bql, 0)?;
            job.start(bql, &handle, Mine { top: t })?;
            Ok::<_, blockgraph::Error>(job.events())
        })
        .unwrap();
    let mut last = None;
    while let Some(event) = events.next_timeout(Duration::from_secs(30)) {
        last = Some(event);
    }
    assert_eq!(last, Some(JobEvent::StatusChange(JobStatus::Null)));
    main.run(move |bql| assert!(top.gs(bql).backing().is_none()));
    drop(io);
    main.shutdown();
}
