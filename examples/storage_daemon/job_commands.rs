//! QMP's job commands: `block-stream`, `block-commit`, `blockdev-mirror`,
//! `blockdev-backup`, `query-jobs`, `query-block-jobs`,
//! the `job-*` verbs and their `block-job-*` twins, `block-job-set-speed`.
//! Each parses its arguments with QEMU's names and defaults (`qapi/job.json`,
//! `qapi/block-core.json`) and calls the daemon (`daemon/jobs.rs`).
//!
//! A job kind is one function here that parses its arguments and one in
//! `daemon/jobs.rs` that starts the library's job and hands it to
//! `Daemon::track_job`; its table entry in `commands::TABLE` then turns
//! from `Pending` to `Ready`. Events, verbs, queries and shutdown need
//! nothing new.

use blockgraph::job::OnError;
use serde_json::{json, Value};

use crate::daemon::{BackupSpec, CommitSpec, Daemon, JobArgs, JobVerbCmd, MirrorSpec, StreamSpec};
use crate::opts::{Opts, QResult};

/// QEMU's `BlockdevOnError`.
fn on_error(o: &mut Opts, key: &str) -> QResult<OnError> {
    let v = o.enumeration(key, &["report", "ignore", "enospc", "stop", "auto"])?;
    Ok(match v.as_deref() {
        Some("ignore") => OnError::Ignore,
        Some("enospc") => OnError::Enospc,
        Some("stop") => OnError::Stop,
        // `auto` is a device's own policy; a job reports.
        _ => OnError::Report,
    })
}

/// The library has one error policy per job; QEMU has one per side. The
/// target's wins where the user set it (a copy job's writes are where a
/// full disk shows), else the source's.
fn one_policy(source: OnError, target: OnError) -> OnError {
    if target != OnError::Report {
        target
    } else {
        source
    }
}

/// A copy job's `on-source-error` and `on-target-error`, as one policy.
fn copy_policy(o: &mut Opts) -> QResult<OnError> {
    let source = on_error(o, "on-source-error")?;
    Ok(one_policy(source, on_error(o, "on-target-error")?))
}

/// `speed` (default 0: unlimited).
fn speed(o: &mut Opts) -> QResult<i64> {
    Ok(o.i64("speed")?.unwrap_or(0))
}

/// `auto-finalize` and `auto-dismiss` (both default to true).
fn auto(o: &mut Opts) -> QResult<(bool, bool)> {
    let finalize = o.bool("auto-finalize")?.unwrap_or(true);
    Ok((finalize, o.bool("auto-dismiss")?.unwrap_or(true)))
}

/// The members `block-stream` and `block-commit` end with, in QAPI's
/// order: `backing-file`, `backing-mask-protocol`, `speed`, `on-error`,
/// `filter-node-name`, `auto-finalize`, `auto-dismiss`.
fn chain_job_tail(
    o: &mut Opts,
    job_id: Option<String>,
) -> QResult<(Option<String>, bool, JobArgs)> {
    let backing_file = o.str("backing-file")?;
    let mask_protocol = o.bool("backing-mask-protocol")?.unwrap_or(false);
    let speed = speed(o)?;
    let on_error = on_error(o, "on-error")?;
    let filter_node_name = o.str("filter-node-name")?;
    let (auto_finalize, auto_dismiss) = auto(o)?;
    let job = JobArgs {
        job_id,
        speed,
        on_error,
        filter_node_name,
        auto_finalize,
        auto_dismiss,
    };
    Ok((backing_file, mask_protocol, job))
}

/// `block-stream`.
pub fn block_stream(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let job_id = o.str("job-id")?;
    let device = o.req_str("device")?;
    let base = o.str("base")?;
    let base_node = o.str("base-node")?;
    let bottom = o.str("bottom")?;
    let (backing_file, backing_mask_protocol, job) = chain_job_tail(&mut o, job_id)?;
    o.finish()?;
    d.block_stream(StreamSpec {
        job,
        device,
        base,
        base_node,
        bottom,
        backing_file,
        backing_mask_protocol,
    })?;
    Ok(json!({}))
}

/// `block-commit`.
pub fn block_commit(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let job_id = o.str("job-id")?;
    let device = o.req_str("device")?;
    let base_node = o.str("base-node")?;
    let base = o.str("base")?;
    let top_node = o.str("top-node")?;
    let top = o.str("top")?;
    let (backing_file, backing_mask_protocol, job) = chain_job_tail(&mut o, job_id)?;
    o.finish()?;
    d.block_commit(CommitSpec {
        job,
        device,
        base_node,
        base,
        top_node,
        top,
        backing_file,
        backing_mask_protocol,
    })?;
    Ok(json!({}))
}

/// QEMU's `MirrorSyncMode` (every member: the commands refuse the ones
/// they do not support with QEMU's words).
const SYNC_MODES: &[&str] = &["top", "full", "none", "incremental", "bitmap"];

/// What `blockdev-mirror` and `blockdev-backup` start with, in QAPI's
/// order: `job-id`, `device`, `target`, (mirror's `replaces`,) `sync`.
fn copy_job_head(o: &mut Opts, replaces: bool) -> QResult<CopyHead> {
    let job_id = o.str("job-id")?;
    let device = o.req_str("device")?;
    let target = o.req_str("target")?;
    let replaces = if replaces { o.str("replaces")? } else { None };
    let Some(sync) = o.enumeration("sync", SYNC_MODES)? else {
        return Err(o.missing("sync"));
    };
    Ok(CopyHead {
        job_id,
        device,
        target,
        replaces,
        sync,
    })
}

/// [`copy_job_head`]'s members.
struct CopyHead {
    job_id: Option<String>,
    device: String,
    target: String,
    replaces: Option<String>,
    sync: String,
}

/// `blockdev-mirror`.
pub fn blockdev_mirror(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let head = copy_job_head(&mut o, true)?;
    let speed = speed(&mut o)?;
    let granularity = o.u64("granularity")?.unwrap_or(0);
    // QAPI's order of members: `buf-size` comes between `granularity` and
    // `on-source-error`; it is checked and ignored (the library sizes its
    // copies itself).
    o.i64("buf-size")?;
    let on_error = copy_policy(&mut o)?;
    let filter_node_name = o.str("filter-node-name")?;
    let copy_mode = o.enumeration("copy-mode", &["background", "write-blocking"])?;
    let (auto_finalize, auto_dismiss) = auto(&mut o)?;
    o.finish()?;
    d.blockdev_mirror(MirrorSpec {
        job: JobArgs {
            job_id: head.job_id,
            speed,
            on_error,
            filter_node_name,
            auto_finalize,
            auto_dismiss,
        },
        device: head.device,
        target: head.target,
        replaces: head.replaces,
        sync: head.sync,
        granularity,
        copy_mode,
    })?;
    Ok(json!({}))
}

/// `blockdev-backup`.
pub fn blockdev_backup(d: &mut Daemon, o: Opts) -> QResult<Value> {
    d.blockdev_backup(backup_spec(o)?)?;
    Ok(json!({}))
}

/// `blockdev-backup`'s arguments (also a `transaction` action's `data`).
pub fn backup_spec(mut o: Opts) -> QResult<BackupSpec> {
    let head = copy_job_head(&mut o, false)?;
    let speed = speed(&mut o)?;
    let bitmap = o.str("bitmap")?;
    let bitmap_mode = o.enumeration("bitmap-mode", &["on-success", "never", "always"])?;
    let compress = o.bool("compress")?.unwrap_or(false);
    let on_error = copy_policy(&mut o)?;
    let (auto_finalize, auto_dismiss) = auto(&mut o)?;
    let filter_node_name = o.str("filter-node-name")?;
    o.finish()?;
    Ok(BackupSpec {
        job: JobArgs {
            job_id: head.job_id,
            speed,
            on_error,
            filter_node_name,
            auto_finalize,
            auto_dismiss,
        },
        device: head.device,
        target: head.target,
        sync: head.sync,
        bitmap,
        bitmap_mode,
        compress,
    })
}

/// `query-jobs`.
pub fn query_jobs(d: &mut Daemon, o: Opts) -> QResult<Value> {
    o.finish()?;
    Ok(d.query_jobs())
}

/// `query-block-jobs`.
pub fn query_block_jobs(d: &mut Daemon, o: Opts) -> QResult<Value> {
    o.finish()?;
    Ok(d.query_block_jobs())
}

/// A `job-*` verb: `id` only.
fn job_verb(d: &mut Daemon, mut o: Opts, verb: JobVerbCmd) -> QResult<Value> {
    let id = o.req_str("id")?;
    o.finish()?;
    d.job_verb(&id, verb, false)?;
    Ok(json!({}))
}

/// `job-pause`.
pub fn job_pause(d: &mut Daemon, o: Opts) -> QResult<Value> {
    job_verb(d, o, JobVerbCmd::Pause)
}

/// `job-resume`.
pub fn job_resume(d: &mut Daemon, o: Opts) -> QResult<Value> {
    job_verb(d, o, JobVerbCmd::Resume)
}

/// `job-cancel` (QEMU's `job_user_cancel(job, true)`: forced).
pub fn job_cancel(d: &mut Daemon, o: Opts) -> QResult<Value> {
    job_verb(d, o, JobVerbCmd::Cancel { force: true })
}

/// `job-complete`.
pub fn job_complete(d: &mut Daemon, o: Opts) -> QResult<Value> {
    job_verb(d, o, JobVerbCmd::Complete)
}

/// `job-finalize`.
pub fn job_finalize(d: &mut Daemon, o: Opts) -> QResult<Value> {
    job_verb(d, o, JobVerbCmd::Finalize)
}

/// `job-dismiss`.
pub fn job_dismiss(d: &mut Daemon, o: Opts) -> QResult<Value> {
    job_verb(d, o, JobVerbCmd::Dismiss)
}

/// A `block-job-*` verb: the job by `device` (`finalize` and `dismiss`
/// name it `id`), unknown ones `DeviceNotActive`.
fn block_job_verb(d: &mut Daemon, mut o: Opts, key: &str, verb: JobVerbCmd) -> QResult<Value> {
    let id = o.req_str(key)?;
    let verb = match verb {
        JobVerbCmd::Cancel { .. } => JobVerbCmd::Cancel {
            force: o.bool("force")?.unwrap_or(false),
        },
        JobVerbCmd::SetSpeed(_) => match o.i64("speed")? {
            Some(s) => JobVerbCmd::SetSpeed(s),
            None => return Err(o.missing("speed")),
        },
        v => v,
    };
    o.finish()?;
    d.job_verb(&id, verb, true)?;
    Ok(json!({}))
}

/// `block-job-set-speed`.
pub fn block_job_set_speed(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "device", JobVerbCmd::SetSpeed(0))
}

/// `block-job-pause`.
pub fn block_job_pause(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "device", JobVerbCmd::Pause)
}

/// `block-job-resume`.
pub fn block_job_resume(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "device", JobVerbCmd::Resume)
}

/// `block-job-cancel` (`force` defaults to false).
pub fn block_job_cancel(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "device", JobVerbCmd::Cancel { force: false })
}

/// `block-job-complete`.
pub fn block_job_complete(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "device", JobVerbCmd::Complete)
}

/// `block-job-finalize`.
pub fn block_job_finalize(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "id", JobVerbCmd::Finalize)
}

/// `block-job-dismiss`.
pub fn block_job_dismiss(d: &mut Daemon, o: Opts) -> QResult<Value> {
    block_job_verb(d, o, "id", JobVerbCmd::Dismiss)
}
