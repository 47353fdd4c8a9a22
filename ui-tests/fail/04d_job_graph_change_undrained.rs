// Rule 4 for block jobs: a job's graph change (stream dropping the
// intermediate images, commit and mirror swapping nodes) happens in a
// write section on drained nodes, like any other.
//
// Violation: a job's `prepare` sets a node's backing in a write section
// without draining the node.
// Expected: error[E0308]: mismatched types (expected `&Drained<'_>`, found
// `&NodeHandle`).
use blockgraph::job::{JobCx, JobDriver, JobType};
use blockgraph::{NodeHandle, Result};

struct Mine {
    top: NodeHandle,
    base: NodeHandle,
}

impl JobDriver for Mine {
    fn job_type(&self) -> JobType {
        JobType::Other("mine")
    }

    async fn run(&mut self, _cx: &mut JobCx<'_>) -> Result<()> {
        Ok(())
    }

    async fn prepare(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        let (top, base) = (self.top.clone(), self.base.clone());
        cx.on_main_loop(move |bql| bql.write(|w| w.set_backing(&top, Some(&base))))
            .await?
    }
}

fn main() {}
