//! Helpers the block job tests share: reading a job's events, finding
//! where a backend is attached, holding a drain while checking the job.

use std::sync::mpsc;

use blockgraph::job::JobEvent;
use blockgraph::{BlockBackend, MainLoop, NodeHandle};

use super::{join, recv};

/// The job completed without an error.
pub fn completed(all: &[JobEvent]) -> bool {
    all.iter()
        .any(|e| matches!(e, JobEvent::Completed { error: None, .. }))
}

/// The job was cancelled.
pub fn cancelled(all: &[JobEvent]) -> bool {
    all.iter().any(|e| matches!(e, JobEvent::Cancelled { .. }))
}

/// The node `vda` is attached to now.
pub fn backend_node(main: &MainLoop, vda: &BlockBackend) -> String {
    let name = vda.name().to_owned();
    main.run(move |bql| {
        bql.query_backends()
            .into_iter()
            .find(|b| b.name == name)
            .and_then(|b| b.root)
            .expect("the backend is attached")
    })
}

/// Drains `node` from a task of `main`, runs `during` once the drain has
/// begun, then ends the drain and waits for its holder.
pub fn while_drained<T>(main: &MainLoop, node: &NodeHandle, during: impl FnOnce() -> T) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (drained_tx, drained_rx) = mpsc::channel();
    let n = node.clone();
    let holder = main.spawn(move |task| async move {
        let d = task.drain(&n).await;
        drained_tx.send(()).unwrap();
        let _ = rx.await;
        drop(d);
    });
    recv(&drained_rx, "the drain");
    let out = during();
    tx.send(()).unwrap();
    join(holder, "the drain holder");
    out
}
