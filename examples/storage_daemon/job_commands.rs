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

use crate::daemon::{BackupSpec, CommitSpec, Daemon, JobVerbCmd, MirrorSpec, StreamSpec};
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

/// `block-stream`.
pub fn block_stream(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let spec = StreamSpec {
        job_id: o.str("job-id")?,
        device: o.req_str("device")?,
        base: o.str("base")?,
        base_node: o.str("base-node")?,
        bottom: o.str("bottom")?,
        backing_file: o.str("backing-file")?,
        backing_mask_protocol: o.bool("backing-mask-protocol")?.unwrap_or(false),
        speed: o.i64("speed")?.unwrap_or(0),
        on_error: on_error(&mut o, "on-error")?,
        filter_node_name: o.str("filter-node-name")?,
        auto_finalize: o.bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: o.bool("auto-dismiss")?.unwrap_or(true),
    };
    o.finish()?;
    d.block_stream(spec)?;
    Ok(json!({}))
}

/// `block-commit`.
pub fn block_commit(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let spec = CommitSpec {
        job_id: o.str("job-id")?,
        device: o.req_str("device")?,
        base_node: o.str("base-node")?,
        base: o.str("base")?,
        top_node: o.str("top-node")?,
        top: o.str("top")?,
        backing_file: o.str("backing-file")?,
        backing_mask_protocol: o.bool("backing-mask-protocol")?.unwrap_or(false),
        speed: o.i64("speed")?.unwrap_or(0),
        on_error: on_error(&mut o, "on-error")?,
        filter_node_name: o.str("filter-node-name")?,
        auto_finalize: o.bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: o.bool("auto-dismiss")?.unwrap_or(true),
    };
    o.finish()?;
    d.block_commit(spec)?;
    Ok(json!({}))
}

/// QEMU's `MirrorSyncMode` (every member: the commands refuse the ones
/// they do not support with QEMU's words).
const SYNC_MODES: &[&str] = &["top", "full", "none", "incremental", "bitmap"];

/// `blockdev-mirror`.
pub fn blockdev_mirror(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let job_id = o.str("job-id")?;
    let device = o.req_str("device")?;
    let target = o.req_str("target")?;
    let replaces = o.str("replaces")?;
    let Some(sync) = o.enumeration("sync", SYNC_MODES)? else {
        return Err(o.missing("sync"));
    };
    // QAPI's order of members: `buf-size` comes between `granularity` and
    // `on-source-error`; it is checked and ignored (the library sizes its
    // copies itself).
    let spec = MirrorSpec {
        job_id,
        device,
        target,
        replaces,
        sync,
        speed: o.i64("speed")?.unwrap_or(0),
        granularity: o.u64("granularity")?.unwrap_or(0),
        on_source_error: {
            o.i64("buf-size")?;
            on_error(&mut o, "on-source-error")?
        },
        on_target_error: on_error(&mut o, "on-target-error")?,
        filter_node_name: o.str("filter-node-name")?,
        copy_mode: o.enumeration("copy-mode", &["background", "write-blocking"])?,
        auto_finalize: o.bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: o.bool("auto-dismiss")?.unwrap_or(true),
    };
    o.finish()?;
    d.blockdev_mirror(spec)?;
    Ok(json!({}))
}

/// `blockdev-backup`.
pub fn blockdev_backup(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let job_id = o.str("job-id")?;
    let device = o.req_str("device")?;
    let target = o.req_str("target")?;
    let Some(sync) = o.enumeration("sync", SYNC_MODES)? else {
        return Err(o.missing("sync"));
    };
    let spec = BackupSpec {
        job_id,
        device,
        target,
        sync,
        speed: o.i64("speed")?.unwrap_or(0),
        bitmap: o.str("bitmap")?,
        bitmap_mode: o.enumeration("bitmap-mode", &["on-success", "never", "always"])?,
        compress: o.bool("compress")?.unwrap_or(false),
        on_source_error: on_error(&mut o, "on-source-error")?,
        on_target_error: on_error(&mut o, "on-target-error")?,
        auto_finalize: o.bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: o.bool("auto-dismiss")?.unwrap_or(true),
        filter_node_name: o.str("filter-node-name")?,
    };
    o.finish()?;
    d.blockdev_backup(spec)?;
    Ok(json!({}))
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
