//! Block jobs under control: drains pause them, the rate limit holds, the
//! error policies do what QEMU's do, manual finalize and dismiss, the
//! order of a job driver's steps, and pause/resume/cancel at random points
//! of a stream with the guest writing all along.

mod common;
mod job_util;
mod qcow2_util;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::drivers::{FaultAction, FaultOp, FaultRule};
use blockgraph::job::{
    self, query_jobs, ErrorAction, IoOperation, Job, JobCx, JobDriver, JobEvent, JobOptions,
    JobStatus, JobType, OnError, StreamOptions,
};
use blockgraph::{Error, Result};

use common::jobs::{cancel_or_resume, random_verbs, Verb};
use common::{join, recv, wait_until, watchdog};
use job_util::*;
use qcow2_util::{Env, Rng};

fn start_stream(env: &Env, options: JobOptions, stream: StreamOptions) -> (Job, job::JobEvents) {
    let io = env.io.handle();
    env.main
        .run(move |bql| {
            let job = job::stream(bql, &io, options, stream)?;
            let events = job.events();
            Ok::<_, Error>((job, events))
        })
        .unwrap()
}

fn verb(
    env: &Env,
    job: &Job,
    f: impl FnOnce(&Job, &blockgraph::Bql) -> Result<()> + Send + 'static,
) -> Result<()> {
    let job = job.clone();
    env.main.run(move |bql| f(&job, bql))
}

#[test]
fn a_drain_pauses_the_stream_and_no_job_request_reaches_the_drained_node() {
    let _w = watchdog("drain_pauses_the_stream", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let mut options = JobOptions::new("job0");
    options.speed = 2 << 20; // about two seconds for the whole disk
    let (job, mut events) = start_stream(
        &env,
        options,
        StreamOptions::new(&chain.top).copy_options(job::CopyOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        }),
    );
    wait_until("the stream has copied something", || job.progress().0 > 0);

    // Hold a drain of top from a main-loop task until told to stop.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (drained_tx, drained_rx) = std::sync::mpsc::channel();
    let top = chain.top.clone();
    let holder = env.main.spawn(move |task| async move {
        let d = task.drain(&top).await;
        drained_tx.send(()).unwrap();
        let _ = rx.await;
        drop(d);
    });
    recv(&drained_rx, "the drain");
    assert_eq!(
        job.status(),
        JobStatus::Paused,
        "drained: the job is paused"
    );
    let before = chain.top_file_requests.requests();
    // A worker counts its last chunk just after the request completes.
    thread::sleep(Duration::from_millis(50));
    let progress = job.progress().0;
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        chain.top_file_requests.requests(),
        before,
        "a request reached the drained node"
    );
    assert_eq!(job.progress().0, progress, "the job went on while drained");
    assert_eq!(job.status(), JobStatus::Paused);
    tx.send(()).unwrap();
    join(holder, "the drain holder");

    let all = until_null(&mut events);
    assert!(all.contains(&JobEvent::StatusChange(JobStatus::Paused)));
    let resumed = all
        .iter()
        .skip_while(|e| **e != JobEvent::StatusChange(JobStatus::Paused))
        .any(|e| *e == JobEvent::StatusChange(JobStatus::Running));
    assert!(resumed, "the job resumed after the drain: {all:?}");
    assert!(all
        .iter()
        .any(|e| matches!(e, JobEvent::Completed { error: None, .. })));
    assert!(chain_below(&env, &chain.top).is_empty());
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
}

#[test]
fn the_rate_limit_holds_and_can_be_changed_while_running() {
    let _w = watchdog("rate_limit", Duration::from_secs(120));
    let env = Env::new();
    // No base: every cluster top does not store is copied (4/5 of 4 MiB).
    let chain = mem_chain(&env, false);
    let mut options = JobOptions::new("slow");
    options.speed = 1 << 20;
    let started = Instant::now();
    let (job, mut events) = start_stream(&env, options, StreamOptions::new(&chain.top));
    let all = until_null(&mut events);
    let took = started.elapsed();
    assert!(all
        .iter()
        .any(|e| matches!(e, JobEvent::Completed { error: None, .. })));
    // About 3.2 MiB at 1 MiB/s: it cannot be done in under two seconds.
    assert!(took >= Duration::from_secs(2), "copied too fast: {took:?}");
    assert_eq!(job.progress().0, SIZE);

    // A crawl that is lifted: it finishes long before the crawl would.
    let chain = mem_chain(&env, false);
    let mut options = JobOptions::new("lifted");
    options.speed = 16 << 10;
    let (job, mut events) = start_stream(&env, options, StreamOptions::new(&chain.top));
    wait_until("some progress", || job.progress().0 > 0);
    let lifted = Instant::now();
    verb(&env, &job, |j, bql| j.set_speed(bql, 0)).unwrap();
    assert_eq!(job.speed(), 0);
    until_null(&mut events);
    assert!(
        lifted.elapsed() < Duration::from_secs(60),
        "{:?}",
        lifted.elapsed()
    );
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
}

fn failing_stream(env: &Env, on_error: OnError, errno: i32) -> (MemChain, Job, job::JobEvents) {
    let chain = mem_chain(env, true);
    let (_, control) = chain.fault.as_ref().unwrap();
    // The first read of a mid cluster's data through the fault node fails.
    control
        .add_rule(
            FaultRule::new(FaultOp::Read, FaultAction::Fail(errno))
                .in_range(3 * CLUSTER, CLUSTER)
                .once(),
        )
        .unwrap();
    let mut options = JobOptions::new("faulty");
    options.on_error = on_error;
    let (job, events) = start_stream(
        env,
        options,
        StreamOptions::new(&chain.top).base(&chain.base),
    );
    (chain, job, events)
}

fn error_events(all: &[JobEvent]) -> Vec<(IoOperation, ErrorAction)> {
    all.iter()
        .filter_map(|e| match e {
            JobEvent::Error {
                operation, action, ..
            } => Some((*operation, *action)),
            _ => None,
        })
        .collect()
}

#[test]
fn on_error_report_fails_the_job_and_leaves_the_chain() {
    let _w = watchdog("on_error_report", Duration::from_secs(120));
    let env = Env::new();
    let (chain, _job, mut events) = failing_stream(&env, OnError::Report, libc::EIO);
    let all = until_null(&mut events);
    assert_eq!(
        error_events(&all),
        [(IoOperation::Read, ErrorAction::Report)]
    );
    assert!(all.contains(&JobEvent::StatusChange(JobStatus::Aborting)));
    let err = all.iter().find_map(|e| match e {
        JobEvent::Completed { error, .. } => error.clone(),
        _ => None,
    });
    assert!(
        err.is_some_and(|e| e.contains("Input/output error")),
        "{all:?}"
    );
    // Nothing changed but what was copied; the filter is gone.
    let fault = chain.fault.as_ref().unwrap().0.name().to_owned();
    assert_eq!(
        chain_below(&env, &chain.top),
        [
            fault,
            chain.mid.name().to_owned(),
            chain.base.name().to_owned()
        ]
    );
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
    assert!(env.main.run(|bql| bql.node("faulty-stream").is_none()));
}

#[test]
fn on_error_ignore_goes_on_and_fails_at_the_end_as_qemus_stream_does() {
    let _w = watchdog("on_error_ignore", Duration::from_secs(120));
    let env = Env::new();
    let (chain, job, mut events) = failing_stream(&env, OnError::Ignore, libc::EIO);
    let all = until_null(&mut events);
    assert_eq!(
        error_events(&all),
        [(IoOperation::Read, ErrorAction::Ignore)]
    );
    // Every range was gone through.
    assert_eq!(job.progress(), (SIZE, SIZE));
    assert!(all
        .iter()
        .any(|e| matches!(e, JobEvent::Completed { error: Some(_), .. })));
    // The backing file stays: an error was there.
    assert_eq!(chain_below(&env, &chain.top).len(), 3);
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
}

#[test]
fn on_error_stop_pauses_until_resumed_then_retries() {
    let _w = watchdog("on_error_stop", Duration::from_secs(120));
    let env = Env::new();
    let (chain, job, mut events) = failing_stream(&env, OnError::Stop, libc::EIO);
    wait_until("the job stopped", || job.info().paused);
    assert_eq!(job.status(), JobStatus::Paused);
    wait_until("every worker is parked", || !job.info().busy);
    let progress = job.progress().0;
    thread::sleep(Duration::from_millis(200));
    assert_eq!(job.progress().0, progress, "a stopped job went on");
    verb(&env, &job, |j, bql| j.resume(bql)).unwrap();
    let all = until_null(&mut events);
    assert!(
        error_events(&all).contains(&(IoOperation::Read, ErrorAction::Stop)),
        "{all:?}"
    );
    assert!(all
        .iter()
        .any(|e| matches!(e, JobEvent::Completed { error: None, .. })));
    assert_eq!(chain_below(&env, &chain.top), [chain.base.name()]);
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
}

#[test]
fn on_error_enospc_stops_on_enospc_and_reports_anything_else() {
    let _w = watchdog("on_error_enospc", Duration::from_secs(120));
    let env = Env::new();
    let (_chain, job, mut events) = failing_stream(&env, OnError::Enospc, libc::ENOSPC);
    wait_until("the job stopped", || job.info().paused);
    verb(&env, &job, |j, bql| j.resume(bql)).unwrap();
    let all = until_null(&mut events);
    assert!(all
        .iter()
        .any(|e| matches!(e, JobEvent::Completed { error: None, .. })));

    let (_chain, _job, mut events) = failing_stream(&env, OnError::Enospc, libc::EIO);
    let all = until_null(&mut events);
    assert_eq!(
        error_events(&all),
        [(IoOperation::Read, ErrorAction::Report)]
    );
}

#[test]
fn manual_finalize_and_dismiss_and_a_cancel_while_pending() {
    let _w = watchdog("manual_finalize", Duration::from_secs(120));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let mut options = JobOptions::new("manual");
    options.auto_finalize = false;
    options.auto_dismiss = false;
    let (job, mut events) = start_stream(
        &env,
        options.clone(),
        StreamOptions::new(&chain.top).base(&chain.base),
    );
    until_status(&job, JobStatus::Pending);
    // Copied, not finalized: the chain is as it was.
    assert_eq!(chain_below(&env, &chain.top).len(), 2);
    let listed = env.main.run(|bql| query_jobs(bql));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "manual");
    assert_eq!(listed[0].status, JobStatus::Pending);
    assert_eq!(listed[0].job_type, JobType::Stream);
    assert!(matches!(
        verb(&env, &job, |j, bql| j.dismiss(bql)),
        Err(Error::JobState {
            verb: "dismiss",
            status: "pending",
            ..
        })
    ));
    verb(&env, &job, |j, bql| j.finalize(bql)).unwrap();
    until_status(&job, JobStatus::Concluded);
    assert_eq!(chain_below(&env, &chain.top), [chain.base.name()]);
    assert_eq!(
        env.main.run(|bql| query_jobs(bql))[0].status,
        JobStatus::Concluded
    );
    verb(&env, &job, |j, bql| j.dismiss(bql)).unwrap();
    let all = until_null(&mut events);
    let statuses: Vec<JobStatus> = all
        .iter()
        .filter_map(|e| match e {
            JobEvent::StatusChange(s) => Some(*s),
            _ => None,
        })
        .filter(|s| {
            !matches!(
                s,
                JobStatus::Created | JobStatus::Paused | JobStatus::Running
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Waiting,
            JobStatus::Pending,
            JobStatus::Concluded,
            JobStatus::Null
        ]
    );
    assert!(env.main.run(|bql| query_jobs(bql)).is_empty());

    // The id is free again; cancelled while pending, the chain stays.
    let chain = mem_chain(&env, false);
    let (job, mut events) = start_stream(
        &env,
        options,
        StreamOptions::new(&chain.top).base(&chain.base),
    );
    until_status(&job, JobStatus::Pending);
    verb(&env, &job, |j, bql| j.cancel(bql, false)).unwrap();
    until_status(&job, JobStatus::Concluded);
    verb(&env, &job, |j, bql| j.dismiss(bql)).unwrap();
    let all = until_null(&mut events);
    assert!(all.iter().any(|e| matches!(e, JobEvent::Cancelled { .. })));
    assert!(all.contains(&JobEvent::StatusChange(JobStatus::Aborting)));
    assert_eq!(chain_below(&env, &chain.top).len(), 2);
    assert_same(&read_disk(&env.io, &chain.vda), &chain_contents());
}

/// A job of our own that records its steps.
struct Recorder {
    log: Arc<Mutex<Vec<&'static str>>>,
    fail_run: bool,
    panic_run: bool,
    fail_prepare: bool,
}

impl JobDriver for Recorder {
    fn job_type(&self) -> JobType {
        JobType::Other("recorder")
    }

    async fn run(&mut self, cx: &mut JobCx<'_>) -> Result<()> {
        self.log.lock().unwrap().push("run");
        cx.runner().set_remaining(10);
        cx.pause_point().await?;
        // A job's step may drain and change the graph through the main loop.
        let on_main = cx.on_main_loop(|bql| bql.graph().mutation_count()).await;
        assert!(on_main.is_ok());
        cx.runner().add_progress(10);
        assert!(!self.panic_run, "deliberate panic in run");
        if self.fail_run {
            return Err(Error::InvalidArgument("deliberate".into()));
        }
        Ok(())
    }

    async fn prepare(&mut self, _cx: &mut JobCx<'_>) -> Result<()> {
        self.log.lock().unwrap().push("prepare");
        if self.fail_prepare {
            return Err(Error::InvalidArgument("prepare refused".into()));
        }
        Ok(())
    }

    async fn commit(&mut self, _cx: &mut JobCx<'_>) {
        self.log.lock().unwrap().push("commit");
    }

    async fn abort(&mut self, _cx: &mut JobCx<'_>) {
        self.log.lock().unwrap().push("abort");
    }

    async fn clean(&mut self, _cx: &mut JobCx<'_>) {
        self.log.lock().unwrap().push("clean");
    }
}

fn run_recorder(
    env: &Env,
    id: &str,
    fail_run: bool,
    panic_run: bool,
    fail_prepare: bool,
) -> (Vec<&'static str>, Vec<JobEvent>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let driver = Recorder {
        log: log.clone(),
        fail_run,
        panic_run,
        fail_prepare,
    };
    let io = env.io.handle();
    let id = id.to_owned();
    let mut events = env
        .main
        .run(move |bql| {
            let job = Job::create(bql, JobType::Other("recorder"), &JobOptions::new(id))?;
            let events = job.events();
            job.start(bql, &io, driver)?;
            Ok::<_, Error>(events)
        })
        .unwrap();
    let all = until_null(&mut events);
    let steps = log.lock().unwrap().clone();
    (steps, all)
}

#[test]
fn a_job_drivers_steps_run_in_qemus_order() {
    let _w = watchdog("driver_steps", Duration::from_secs(60));
    let env = Env::new();
    let (steps, all) = run_recorder(&env, "ok", false, false, false);
    assert_eq!(steps, ["run", "prepare", "commit", "clean"]);
    assert_eq!(
        all,
        [
            JobEvent::StatusChange(JobStatus::Created),
            JobEvent::StatusChange(JobStatus::Running),
            JobEvent::StatusChange(JobStatus::Waiting),
            JobEvent::StatusChange(JobStatus::Pending),
            JobEvent::Pending,
            JobEvent::Completed {
                current: 10,
                total: 10,
                error: None
            },
            JobEvent::StatusChange(JobStatus::Concluded),
            JobEvent::StatusChange(JobStatus::Null),
        ]
    );
    let (steps, all) = run_recorder(&env, "fails", true, false, false);
    assert_eq!(steps, ["run", "abort", "clean"]);
    assert!(all.contains(&JobEvent::StatusChange(JobStatus::Aborting)));
    let (steps, _) = run_recorder(&env, "refuses", false, false, true);
    assert_eq!(steps, ["run", "prepare", "abort", "clean"]);
    let (steps, all) = run_recorder(&env, "panics", false, true, false);
    assert_eq!(steps, ["run", "abort", "clean"]);
    assert!(all.iter().any(|e| matches!(
        e,
        JobEvent::Completed { error: Some(m), .. } if m.contains("deliberate panic in run")
    )));
}

#[test]
fn pause_resume_cancel_at_random_points_lose_no_guest_write() {
    let _w = watchdog("pause_resume_cancel_stress", Duration::from_secs(300));
    let env = Env::new();
    let mut rng = Rng::new(0x5eed);
    for round in 0..12u64 {
        let chain = mem_chain(&env, false);
        let stop = Arc::new(AtomicBool::new(false));
        let g0 = guest(&env.io, &chain.vda, 0, round * 2 + 1, stop.clone(), 16);
        let g1 = guest(&env.io2, &chain.vda, 1, round * 2 + 2, stop.clone(), 16);
        let mut options = JobOptions::new(format!("stress{round}"));
        options.speed = 4 << 20;
        let with_base = round % 2 == 0;
        let mut so = StreamOptions::new(&chain.top).copy_options(job::CopyOptions {
            chunk_size: 64 << 10,
            in_flight: 1 + (round % 4) as usize,
            alignment: 1,
        });
        if with_base {
            so = so.base(&chain.base);
        }
        let (job, mut events) = start_stream(&env, options, so);
        // Refusals are fine (resume while not paused, a verb after the job
        // finished); anything else is not.
        random_verbs(
            &env.main,
            &job,
            rng.below(6),
            60,
            &[
                Verb::Pause,
                Verb::Pause,
                Verb::Resume,
                Verb::Resume,
                Verb::SetSpeed(8 << 20),
            ],
            |n| rng.below(n),
            |_| unreachable!("no drains here"),
        );
        let cancelled = cancel_or_resume(&env.main, &job, |n| rng.below(n));
        let all = until_null(&mut events);
        stop.store(true, Ordering::SeqCst);
        let mut expected = chain_contents();
        apply(&mut expected, &join(g0, "guest 0"));
        apply(&mut expected, &join(g1, "guest 1"));
        assert_same(&read_disk(&env.io, &chain.vda), &expected);
        let below = chain_below(&env, &chain.top);
        let completed = all
            .iter()
            .any(|e| matches!(e, JobEvent::Completed { error: None, .. }));
        if completed {
            let want: Vec<String> = if with_base {
                vec![chain.base.name().to_owned()]
            } else {
                vec![]
            };
            assert_eq!(below, want, "round {round}");
        } else {
            assert!(cancelled, "round {round}: the job failed: {all:?}");
            assert_eq!(
                below.len(),
                2,
                "round {round}: a cancelled stream changed the chain"
            );
        }
        assert!(env.main.run(|bql| query_jobs(bql)).is_empty());
        // What the graph ends with is checked by the qcow2 driver too.
        let report = env.check(&chain.top, false).unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
        remove_backend(&env, &chain.vda);
    }
}

#[test]
fn block_status_above_stops_at_base_and_sees_through_filters() {
    use blockgraph::driver::BlockStatus;
    use blockgraph::drivers::PassthroughFilter;
    let _w = watchdog("block_status_above", Duration::from_secs(60));
    let env = Env::new();
    let chain = mem_chain(&env, false);
    let ask = |base: Option<blockgraph::NodeHandle>, cluster: u64| {
        let blk = chain.vda.clone();
        join(
            env.io.spawn(move |mut cx| async move {
                blk.block_status_above(&mut cx, base.as_ref(), cluster * CLUSTER, CLUSTER)
                    .await
            }),
            "block status",
        )
        .unwrap()
        .0
    };
    // Cluster 1 is base's, 3 is mid's, 5 is top's.
    assert_eq!(ask(None, 1), BlockStatus::Data);
    assert_eq!(ask(Some(chain.base.clone()), 1), BlockStatus::Unallocated);
    assert_eq!(ask(Some(chain.base.clone()), 3), BlockStatus::Data);
    assert_eq!(ask(Some(chain.mid.clone()), 3), BlockStatus::Unallocated);
    assert_eq!(ask(Some(chain.mid.clone()), 5), BlockStatus::Data);
    // A filter above top: what the chain below it stores is still data.
    let top = chain.top.clone();
    env.main
        .run(move |bql| {
            let d = bql.drain(&top);
            bql.write(|w| w.insert_filter(&d, "pass", PassthroughFilter::new()))
        })
        .unwrap();
    assert_eq!(ask(None, 1), BlockStatus::Data);
    assert_eq!(ask(Some(chain.base.clone()), 1), BlockStatus::Unallocated);
    assert_eq!(ask(Some(chain.base.clone()), 3), BlockStatus::Data);
}
