//! QEMU's job state machine, exhaustively: every pair of statuses against
//! QEMU's `JobSTT`, every verb in every status against its
//! `JobVerbTable`, and the verbs of live jobs in each status a job can be
//! held in: accepted where the table says so, refused with a clear error
//! (changing nothing) everywhere else.

mod common;
mod job_util;
mod qcow2_util;

use std::time::Duration;

use blockgraph::job::{self, Job, JobOptions, JobStatus, JobType, JobVerb, StreamOptions};
use blockgraph::{Bql, Error, Result};

use common::watchdog;
use job_util::*;
use qcow2_util::Env;

/// QEMU's `JobSTT` (job.c), rows and columns in the order
/// created, running, paused, ready, standby, waiting, pending, aborting,
/// concluded, null (QEMU's `undefined` has no counterpart: a job exists
/// from `created` on).
const QEMU_STT: [[u8; 10]; 10] = [
    /* C */ [0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    /* R */ [0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    /* P */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    /* Y */ [0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    /* S */ [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* W */ [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    /* D */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* X */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* E */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    /* N */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];

/// QEMU's `JobVerbTable`, columns as above; rows cancel, pause, resume,
/// set-speed, complete, finalize, dismiss.
const QEMU_VERBS: [[u8; 10]; 7] = [
    /* cancel    */ [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    /* pause     */ [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* resume    */ [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* set-speed */ [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* complete  */ [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* finalize  */ [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    /* dismiss   */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
];

#[test]
fn every_transition_is_qemus() {
    for (i, from) in JobStatus::ALL.iter().enumerate() {
        for (j, to) in JobStatus::ALL.iter().enumerate() {
            assert_eq!(from.can_become(*to), QEMU_STT[i][j] == 1, "{from} -> {to}");
        }
    }
}

#[test]
fn every_verb_in_every_status_is_qemus() {
    for (v, verb) in JobVerb::ALL.iter().enumerate() {
        for (i, status) in JobStatus::ALL.iter().enumerate() {
            assert_eq!(
                verb.allowed_in(*status),
                QEMU_VERBS[v][i] == 1,
                "{verb} in {status}"
            );
        }
    }
}

#[test]
fn names_are_qmps() {
    let names: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        [
            "created",
            "running",
            "paused",
            "ready",
            "standby",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null"
        ]
    );
    assert_eq!(JobVerb::SetSpeed.to_string(), "set-speed");
    assert_eq!(JobType::Stream.to_string(), "stream");
}

/// Applies `verb` to `job` (the argument-free form of each).
fn apply(job: &Job, bql: &Bql, verb: JobVerb) -> Result<()> {
    match verb {
        JobVerb::Cancel => job.cancel(bql, false),
        JobVerb::Pause => job.pause(bql),
        JobVerb::Resume => job.resume(bql),
        JobVerb::SetSpeed => job.set_speed(bql, 1 << 20),
        JobVerb::Complete => job.complete(bql),
        JobVerb::Finalize => job.finalize(bql),
        JobVerb::Dismiss => job.dismiss(bql),
    }
}

/// Every verb the table refuses in the job's status is refused, with the
/// error naming job, verb and status, and changes nothing.
fn refused_verbs_are_refused(env: &Env, job: &Job, status: JobStatus) {
    for verb in JobVerb::ALL {
        if verb.allowed_in(status) {
            continue;
        }
        let j = job.clone();
        let r = env.main.run(move |bql| apply(&j, bql, verb));
        match r {
            Err(Error::JobState {
                job: id,
                verb: v,
                status: s,
            }) => {
                assert_eq!(
                    (id.as_str(), v, s),
                    (job.id(), verb.as_str(), status.as_str())
                );
            }
            other => panic!("{verb} in {status}: {other:?}"),
        }
        assert_eq!(job.status(), status, "a refused {verb} changed the status");
        let message = Error::JobState {
            job: job.id().to_owned(),
            verb: verb.as_str(),
            status: status.as_str(),
        }
        .to_string();
        assert_eq!(
            message,
            format!(
                "job '{}' in state '{status}' cannot accept command verb '{verb}'",
                job.id()
            )
        );
    }
}

#[test]
fn live_jobs_accept_and_refuse_verbs_as_the_table_says() {
    let _w = watchdog("live_verbs", Duration::from_secs(120));
    let env = Env::new();

    // created: made but not started.
    let created = env
        .main
        .run(|bql| Job::create(bql, JobType::Other("idle"), &JobOptions::new("idle")))
        .unwrap();
    assert_eq!(created.status(), JobStatus::Created);
    refused_verbs_are_refused(&env, &created, JobStatus::Created);
    let c = created.clone();
    env.main
        .run(move |bql| {
            c.pause(bql)?;
            assert!(matches!(c.pause(bql), Err(Error::InvalidArgument(_))));
            c.resume(bql)?;
            assert!(matches!(c.resume(bql), Err(Error::InvalidArgument(_))));
            c.set_speed(bql, 4096)?;
            c.early_fail(bql);
            Ok::<_, Error>(())
        })
        .unwrap();
    assert_eq!(created.status(), JobStatus::Null);
    refused_verbs_are_refused(&env, &created, JobStatus::Null);

    // Bad ids.
    env.main.run(|bql| {
        assert!(matches!(
            Job::create(bql, JobType::Stream, &JobOptions::new("0bad")),
            Err(Error::InvalidName(_))
        ));
        let a = Job::create(bql, JobType::Stream, &JobOptions::new("twice")).unwrap();
        assert!(matches!(
            Job::create(bql, JobType::Stream, &JobOptions::new("twice")),
            Err(Error::DuplicateName(_))
        ));
        a.early_fail(bql);
    });

    // running, paused, pending, concluded: a slow stream that waits for
    // finalize and dismiss.
    let chain = mem_chain(&env, false);
    let mut options = JobOptions::new("held");
    options.speed = 1 << 20;
    options.auto_finalize = false;
    options.auto_dismiss = false;
    let io = env.io.handle();
    let top = chain.top.clone();
    let job = env
        .main
        .run(move |bql| job::stream(bql, &io, options, StreamOptions::new(&top)))
        .unwrap();
    assert_eq!(job.status(), JobStatus::Running);
    refused_verbs_are_refused(&env, &job, JobStatus::Running);
    let j = job.clone();
    env.main.run(move |bql| j.pause(bql)).unwrap();
    assert_eq!(job.status(), JobStatus::Paused);
    refused_verbs_are_refused(&env, &job, JobStatus::Paused);
    let j = job.clone();
    env.main
        .run(move |bql| {
            j.set_speed(bql, 0)?;
            j.resume(bql)
        })
        .unwrap();
    until_status(&job, JobStatus::Pending);
    refused_verbs_are_refused(&env, &job, JobStatus::Pending);
    let j = job.clone();
    env.main.run(move |bql| j.finalize(bql)).unwrap();
    until_status(&job, JobStatus::Concluded);
    refused_verbs_are_refused(&env, &job, JobStatus::Concluded);
    assert_eq!(job.info().error, None);
    let j = job.clone();
    env.main.run(move |bql| j.dismiss(bql)).unwrap();
    assert_eq!(job.status(), JobStatus::Null);
    refused_verbs_are_refused(&env, &job, JobStatus::Null);
    let mut events = job.events();
    let all = until_null(&mut events);
    // Every status change the job went through was one QEMU allows.
    let mut status = None;
    for e in all {
        if let blockgraph::job::JobEvent::StatusChange(next) = e {
            if let Some(prev) = status {
                assert!(JobStatus::can_become(prev, next), "{prev} -> {next}");
            }
            status = Some(next);
        }
    }
    assert_eq!(status, Some(JobStatus::Null));
}
