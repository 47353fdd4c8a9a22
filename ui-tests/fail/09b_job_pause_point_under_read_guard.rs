// Rule 9 for block jobs: a job waits at a pause point (for a resume, or
// for the end of a drain of a node it uses) and in its rate limit without
// the graph read lock. Holding it there would keep out the write section
// of whoever drained the job's nodes, who waits for the guard while the
// job waits for the drain to end.
//
// Violation: a copy hook keeps its read guard across the job's pause
// point.
// Expected: error[E0499]: cannot borrow `*io` as mutable more than once at
// a time (the pause point takes the task's `&mut IoTask`, which the guard
// borrows).
use blockgraph::job::{ChunkError, CopyChunks, JobRunner};
use blockgraph::{IoTask, NodeHandle, Result};

struct Hook {
    node: NodeHandle,
    runner: JobRunner,
}

impl CopyChunks for Hook {
    async fn needs_copy(&self, _io: &mut IoTask, _offset: u64, len: u64) -> Result<(bool, u64)> {
        Ok((true, len))
    }

    async fn copy(&self, io: &mut IoTask, offset: u64, buf: &mut [u8]) -> std::result::Result<(), ChunkError> {
        let guard = io.read().await;
        self.node.io(&guard).read(offset, buf).await.map_err(ChunkError::read)?;
        self.runner.pause_point(io).await.map_err(ChunkError::read)?;
        drop(guard);
        Ok(())
    }
}

fn main() {}
