//! Helpers the block job tests share: reading a job's events, finding
//! where a backend is attached, holding a drain while checking the job,
//! job verbs at random points.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use blockgraph::job::{Job, JobEvent, JobStatus};
use blockgraph::{BlockBackend, Error, MainLoop, NodeHandle};

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

/// One verb [`random_verbs`] may pick.
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    Pause,
    Resume,
    /// A new speed below this bound.
    SetSpeed(u64),
    /// Whatever the caller's `drain` does.
    Drain,
}

/// Pause, resume, a speed below 8 MiB/s, or (half the time) a drain.
pub const DRAIN_VERBS: [Verb; 6] = [
    Verb::Pause,
    Verb::Resume,
    Verb::SetSpeed(8 << 20),
    Verb::Drain,
    Verb::Drain,
    Verb::Drain,
];

/// `count` verbs on `job`, each after a sleep of below `sleep_ms` ms and
/// picked from `verbs` at random; `below(n)` is the random source (a
/// number below `n`), handed on to `drain`. Refusals (a resume while not
/// paused, a verb after the job finished) are fine; any other error fails.
pub fn random_verbs(
    main: &MainLoop,
    job: &Job,
    count: u64,
    sleep_ms: u64,
    verbs: &[Verb],
    mut below: impl FnMut(u64) -> u64,
    mut drain: impl FnMut(&mut dyn FnMut(u64) -> u64),
) {
    for _ in 0..count {
        thread::sleep(Duration::from_millis(below(sleep_ms)));
        let j = job.clone();
        let r = match verbs[below(verbs.len() as u64) as usize] {
            Verb::Pause => main.run(move |bql| j.pause(bql)),
            Verb::Resume => main.run(move |bql| j.resume(bql)),
            Verb::SetSpeed(bound) => {
                let speed = below(bound);
                main.run(move |bql| j.set_speed(bql, speed))
            }
            Verb::Drain => {
                drain(&mut below);
                Ok(())
            }
        };
        if let Err(e) = r {
            assert!(
                matches!(e, Error::JobState { .. } | Error::InvalidArgument(_)),
                "{e}"
            );
        }
    }
}

/// One time in three (by `below`) cancels `job` (without force) and says
/// whether that was accepted; otherwise resumes it, so that it is not left
/// paused, and returns false.
pub fn cancel_or_resume(main: &MainLoop, job: &Job, mut below: impl FnMut(u64) -> u64) -> bool {
    let j = job.clone();
    if below(3) == 0 {
        main.run(move |bql| j.cancel(bql, false)).is_ok()
    } else {
        let _ = main.run(move |bql| j.resume(bql));
        false
    }
}

/// The backup and commit stress rounds: [`random_verbs`] with
/// [`DRAIN_VERBS`] (1 to 6, below 40 ms apart), a drain picking one of
/// `involved` and handing it to `drain` while `job` runs; then
/// [`cancel_or_resume`], whose answer it returns.
pub fn verbs_and_drains(
    main: &MainLoop,
    job: &Job,
    involved: &[NodeHandle],
    mut below: impl FnMut(u64) -> u64,
    mut drain: impl FnMut(&NodeHandle),
) -> bool {
    let count = 1 + below(6);
    random_verbs(main, job, count, 40, &DRAIN_VERBS, &mut below, |below| {
        let node = &involved[below(involved.len() as u64) as usize];
        if job.status() == JobStatus::Running {
            drain(node);
        }
    });
    cancel_or_resume(main, job, below)
}
