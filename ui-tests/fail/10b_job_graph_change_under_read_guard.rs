// Rule 10 for block jobs: a job changes the graph only on the main loop,
// through `JobCx::on_main_loop`, which needs the job task's `&mut IoTask`:
// never while the task holds the read lock (the write section would wait
// for this very guard; QEMU 10.0 deadlocks on this).
//
// Violation: a job's `prepare` asks the main loop to change the graph
// while it still holds a read guard.
// Expected: error[E0499]: cannot borrow `*cx` as mutable more than once at
// a time.
use blockgraph::job::{JobCx, JobDriver, JobType};
use blockgraph::{NodeHandle, Result};

struct Mine {
    node: NodeHandle,
}

impl JobDriver for Mine {
    fn job_type(&self) -> JobType {
        JobType::Other("mine")
    }

    async fn run(&mut self, _cx: &mut JobCx<'_>) -> Result<()> {
        Ok(())
    }

    async fn prepare(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let guard = cx.io().read().await;
        let len = self.node.io(&guard).length().await?;
        let node = self.node.clone();
        cx.on_main_loop(move |bql| {
            let drained = bql.drain(&node);
            bql.write(|w| w.remove_node(&drained))
        })
        .await??;
        drop(guard);
        let _ = len;
        Ok(())
    }
}

fn main() {}
