//! Block jobs on the daemon: starting them (`block-stream`), their verbs,
//! `query-jobs` / `query-block-jobs`, their events, and what the daemon's
//! node table learns when a job changes the graph.
//!
//! A job kind is a function that checks its arguments like QEMU, starts a
//! `blockgraph::job` on the jobs I/O thread and hands the [`Job`] to
//! [`Daemon::track_job`]; everything after that (events, verbs, queries,
//! busy checks, shutdown) is the same for every kind: `block-stream` and
//! `block-commit` (of an intermediate image) so far.

use std::path::Path;
use std::time::{Duration, Instant};

use blockgraph::job::{
    self, BackupOptions, BackupSync, BitmapSyncMode, CommitOptions, CopyMode, ErrorAction,
    IoOperation, Job, JobEvent, JobInfo, JobOptions, JobStatus, MirrorOptions, MirrorSync,
    MirrorTarget, OnError, StreamOptions,
};
use blockgraph::{Bql, IoThreadHandle, NodeHandle};
use serde_json::{json, Value};

use super::Daemon;
use crate::opts::{lib_err, QResult, QmpError};
use crate::qmp::Events;

/// What a running job holds on to, for QEMU's op blockers.
pub(super) struct JobUse {
    /// The job's QMP type (`stream`).
    kind: &'static str,
    /// Graph names of the nodes it works on.
    nodes: Vec<String>,
    /// A mirror in `write-blocking` copy mode (QEMU's `actively-synced`
    /// once ready).
    write_blocking: bool,
    /// The node (graph name) whose users the job's filter took over, for
    /// an active commit: QEMU's BlockBackends move onto its filter, so
    /// that node is busy rather than "in use" for `blockdev-del`.
    under_filter: Option<String>,
}

/// What every job command takes besides its own members: QEMU's
/// `job-id`, `speed`, error policy, `filter-node-name`, `auto-finalize`
/// and `auto-dismiss`.
#[derive(Debug, Default)]
pub struct JobArgs {
    /// `job-id` (QEMU's default is the device's name, which nodes without
    /// a BlockBackend do not have: the empty string, refused).
    pub job_id: Option<String>,
    /// `speed` (bytes per second).
    pub speed: i64,
    /// `on-error`; for a copy job, the one policy the library has for
    /// `on-source-error` and `on-target-error`.
    pub on_error: OnError,
    /// `filter-node-name`.
    pub filter_node_name: Option<String>,
    /// `auto-finalize`.
    pub auto_finalize: bool,
    /// `auto-dismiss`.
    pub auto_dismiss: bool,
}

/// `block-stream`'s arguments.
#[derive(Debug, Default)]
pub struct StreamSpec {
    /// The job's common arguments.
    pub job: JobArgs,
    /// `device`: the top node.
    pub device: String,
    /// `base`: a file name in the chain.
    pub base: Option<String>,
    /// `base-node`.
    pub base_node: Option<String>,
    /// `bottom`: the lowest node to stream from.
    pub bottom: Option<String>,
    /// `backing-file`: the name to write into the top's header.
    pub backing_file: Option<String>,
    /// `backing-mask-protocol`.
    pub backing_mask_protocol: bool,
}

/// `block-commit`'s arguments (`qapi/block-core.json`).
#[derive(Debug, Default)]
pub struct CommitSpec {
    /// The job's common arguments.
    pub job: JobArgs,
    /// `device`: the root node of the chain.
    pub device: String,
    /// `base-node`.
    pub base_node: Option<String>,
    /// `base`: a file name in the chain below top.
    pub base: Option<String>,
    /// `top-node`.
    pub top_node: Option<String>,
    /// `top`: a file name in the chain.
    pub top: Option<String>,
    /// `backing-file`: the name to write into the overlay's header.
    pub backing_file: Option<String>,
    /// `backing-mask-protocol`.
    pub backing_mask_protocol: bool,
}

/// `blockdev-mirror`'s arguments (`qapi/block-core.json`).
#[derive(Debug, Default)]
pub struct MirrorSpec {
    /// The job's common arguments.
    pub job: JobArgs,
    /// `device`: the root node to mirror.
    pub device: String,
    /// `target`: an existing node.
    pub target: String,
    /// `replaces` (refused: the pivot replaces `device` only).
    pub replaces: Option<String>,
    /// `sync`: a `MirrorSyncMode` member.
    pub sync: String,
    /// `granularity` (0: the default).
    pub granularity: u64,
    /// `copy-mode`.
    pub copy_mode: Option<String>,
}

/// `blockdev-backup`'s arguments (`qapi/block-core.json`).
#[derive(Debug, Default)]
pub struct BackupSpec {
    /// The job's common arguments.
    pub job: JobArgs,
    /// `device`: the node to back up.
    pub device: String,
    /// `target`: an existing node of the same size.
    pub target: String,
    /// `sync`: a `MirrorSyncMode` member.
    pub sync: String,
    /// `bitmap`.
    pub bitmap: Option<String>,
    /// `bitmap-mode`.
    pub bitmap_mode: Option<String>,
    /// `compress` (refused when true).
    pub compress: bool,
}

/// A backup checked and ready to start (`Daemon::check_backup`).
pub(super) struct PreparedBackup {
    /// The job's options.
    pub(super) jo: JobOptions,
    /// The library's backup options.
    pub(super) options: BackupOptions,
    /// The nodes it makes busy (graph names).
    pub(super) busy: Vec<String>,
    /// The node backed up.
    pub(super) source: NodeHandle,
    /// Where to.
    pub(super) target: NodeHandle,
}

/// A verb given to one job, by `job-*` (`id`) or `block-job-*` (`device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerbCmd {
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `job-cancel`, `block-job-cancel` (with its `force`).
    Cancel {
        /// Abandon a ready job instead of completing it.
        force: bool,
    },
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `block-job-set-speed`.
    SetSpeed(i64),
}

/// QEMU's words for a refused verb.
fn verb_error(verb: JobVerbCmd, e: blockgraph::Error) -> QmpError {
    match (verb, e) {
        (
            _,
            blockgraph::Error::JobState {
                job, verb, status, ..
            },
        ) => QmpError::generic(format!(
            "Job '{job}' in state '{status}' cannot accept command verb '{verb}'"
        )),
        (JobVerbCmd::Pause, blockgraph::Error::InvalidArgument(_)) => {
            QmpError::generic("Job is already paused")
        }
        (JobVerbCmd::Resume, blockgraph::Error::InvalidArgument(_)) => {
            QmpError::generic("Can't resume a job that was not paused")
        }
        (_, e) => lib_err(e),
    }
}

/// "Parameter 'speed' expects a non-negative value".
fn check_speed(speed: i64) -> QResult<u64> {
    u64::try_from(speed)
        .map_err(|_| QmpError::generic("Parameter 'speed' expects a non-negative value"))
}

/// A job's `error` as QEMU words it: a cancelled job's is `strerror
/// (ECANCELED)`.
fn job_error(info: &JobInfo) -> Option<String> {
    let e = info.error.as_ref()?;
    if *e == blockgraph::Error::JobCancelled(info.id.clone()).to_string() {
        Some("Operation canceled".to_owned())
    } else {
        Some(e.clone())
    }
}

/// QEMU's `JobInfo`.
fn job_info_json(info: &JobInfo) -> Value {
    let mut v = json!({
        "id": info.id,
        "type": info.job_type.as_str(),
        "status": info.status.as_str(),
        "current-progress": info.current_progress,
        "total-progress": info.total_progress,
    });
    if let Some(e) = job_error(info) {
        v["error"] = json!(e);
    }
    v
}

/// QEMU's `BlockJobInfo` (every job here is a block job; `device` is its
/// id, as for jobs on nodes without a BlockBackend).
fn block_job_info_json(info: &JobInfo) -> Value {
    let mut v = json!({
        "type": info.job_type.as_str(),
        "device": info.id,
        "len": info.total_progress,
        "offset": info.current_progress,
        "busy": info.busy,
        "paused": info.paused,
        "speed": info.speed,
        "io-status": "ok",
        "ready": info.status.is_ready(),
        "status": info.status.as_str(),
        "auto-finalize": info.auto_finalize,
        "auto-dismiss": info.auto_dismiss,
    });
    if let Some(e) = job_error(info) {
        v["error"] = json!(e);
    }
    v
}

/// Sends one job event as QEMU's QMP event(s).
fn forward(events: &Events, job: &Job, auto_finalize: bool, event: JobEvent) {
    let id = job.id();
    let ty = job.job_type().as_str();
    match event {
        JobEvent::StatusChange(status) => events.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": id, "status": status.as_str()}),
        ),
        JobEvent::Ready => {
            let (offset, len) = job.progress();
            events.emit(
                "BLOCK_JOB_READY",
                json!({"type": ty, "device": id, "len": len, "offset": offset,
                       "speed": job.speed()}),
            );
        }
        // QEMU announces `pending` only to those who finalize by hand.
        JobEvent::Pending if auto_finalize => {}
        JobEvent::Pending => events.emit("BLOCK_JOB_PENDING", json!({"type": ty, "id": id})),
        JobEvent::Error {
            operation, action, ..
        } => events.emit(
            "BLOCK_JOB_ERROR",
            json!({
                "device": id,
                "operation": match operation {
                    IoOperation::Read => "read",
                    IoOperation::Write => "write",
                },
                "action": match action {
                    ErrorAction::Report => "report",
                    ErrorAction::Ignore => "ignore",
                    ErrorAction::Stop => "stop",
                },
            }),
        ),
        JobEvent::Completed {
            current,
            total,
            error,
        } => {
            let mut data = json!({"type": ty, "device": id, "len": total, "offset": current,
                                  "speed": job.speed()});
            if let Some(e) = error {
                data["error"] = json!(e);
            }
            events.emit("BLOCK_JOB_COMPLETED", data);
        }
        JobEvent::Cancelled { current, total } => events.emit(
            "BLOCK_JOB_CANCELLED",
            json!({"type": ty, "device": id, "len": total, "offset": current,
                   "speed": job.speed()}),
        ),
        // A kind of event a later library version adds: nothing QMP has.
        _ => {}
    }
}

impl Daemon {
    pub(super) fn jobs_io(&self) -> QResult<&blockgraph::IoThread> {
        self.jobs_io
            .as_ref()
            .ok_or_else(|| QmpError::generic("the daemon is shutting down"))
    }

    /// Every job of the main loop, as the library reports them.
    fn job_infos(&self) -> Vec<JobInfo> {
        self.main.run(|bql| job::query_jobs(bql))
    }

    /// The job `id`, if it is listed.
    fn find_job(&self, id: &str) -> Option<Job> {
        let id = id.to_owned();
        self.main.run(move |bql| job::find_job(bql, &id))
    }

    /// QEMU's op blocker check: the first of `nodes` (graph names) that a
    /// running job works on, as "Node 'x' is busy: ...".
    pub(super) fn check_not_busy(&self, nodes: &[String]) -> QResult<()> {
        for n in nodes {
            if let Some(u) = self.job_uses.values().find(|u| u.nodes.contains(n)) {
                return Err(QmpError::generic(format!(
                    "Node '{}' is busy: block device is in use by block job: {}",
                    self.display_name(n),
                    u.kind
                )));
            }
        }
        Ok(())
    }

    /// Whether a running job's filter took over the users of the node
    /// with graph name `graph` (see `JobUse::under_filter`).
    pub(super) fn under_job_filter(&self, graph: &str) -> bool {
        self.job_uses
            .values()
            .any(|u| u.under_filter.as_deref() == Some(graph))
    }

    /// The QMP name of the node with graph name `graph` (the graph name
    /// itself for a node the daemon did not add, such as a job's filter).
    pub(super) fn display_name(&self, graph: &str) -> String {
        self.nodes
            .iter()
            .find(|(_, n)| n.handle.name() == graph)
            .map(|(d, _)| d.clone())
            .unwrap_or_else(|| graph.to_owned())
    }

    /// Forgets the busy marks of jobs that have concluded (their filters
    /// and backends are gone) or were dismissed.
    pub(super) fn forget_finished_jobs(&mut self) {
        if self.job_uses.is_empty() {
            return;
        }
        let live: Vec<String> = self
            .job_infos()
            .into_iter()
            .filter(|i| !matches!(i.status, JobStatus::Concluded | JobStatus::Null))
            .map(|i| i.id)
            .collect();
        let done: Vec<String> = self
            .job_uses
            .keys()
            .filter(|id| !live.contains(id))
            .cloned()
            .collect();
        for id in done {
            self.job_uses.remove(&id);
        }
    }

    /// Starts reporting a started job: its events so far go out now (so
    /// `created` and `running` come before the command's answer, as in
    /// QEMU), the rest from a thread of its own until the job is gone.
    pub(super) fn track_job(
        &mut self,
        job: &Job,
        kind: &'static str,
        nodes: Vec<String>,
        auto_finalize: bool,
        write_blocking: bool,
    ) {
        self.job_uses.insert(
            job.id().to_owned(),
            JobUse {
                kind,
                nodes,
                write_blocking,
                under_filter: None,
            },
        );
        // QEMU's job coroutine runs until its first yield before the
        // command returns, and by then a copy job has set its total; ours
        // measures on its own thread. Wait (bounded) until it has, so a
        // `query-jobs` or a cancel right after the command reports the
        // same length QEMU does.
        let started = std::time::Instant::now();
        while job.progress().1 == 0
            && matches!(
                job.status(),
                JobStatus::Created | JobStatus::Running | JobStatus::Paused
            )
            && started.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut stream = job.events();
        while let Some(event) = stream.try_next() {
            forward(&self.events, job, auto_finalize, event);
        }
        let (events, job) = (self.events.clone(), job.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("job-events-{}", job.id()))
            .spawn(move || loop {
                match stream.next_timeout(Duration::from_secs(60)) {
                    Some(event) => forward(&events, &job, auto_finalize, event),
                    None if job.status() == JobStatus::Null => return,
                    None => {}
                }
            });
        if let Err(e) = spawned {
            eprintln!("storage_daemon: no thread for the events of a job: {e}");
        }
    }

    /// Resolves a node name for a job argument (QEMU's `bdrv_lookup_bs`):
    /// "Cannot find device='dev' nor node-name='name'".
    pub(super) fn lookup(&self, device: &str, node: &str) -> QResult<NodeHandle> {
        let name = if node.is_empty() { device } else { node };
        self.nodes
            .get(name)
            .map(|n| n.handle.clone())
            .ok_or_else(|| {
                QmpError::generic(format!(
                    "Cannot find device='{device}' nor node-name='{node}'"
                ))
            })
    }

    /// `block-stream`: QEMU's checks in QEMU's order, then
    /// `blockgraph::job::stream` on the jobs I/O thread.
    pub fn block_stream(&mut self, spec: StreamSpec) -> QResult<()> {
        for (a, b, x, y) in [
            ("base", "base-node", &spec.base, &spec.base_node),
            ("base", "bottom", &spec.base, &spec.bottom),
            ("bottom", "base-node", &spec.bottom, &spec.base_node),
        ] {
            if x.is_some() && y.is_some() {
                return Err(QmpError::generic(format!(
                    "'{a}' and '{b}' cannot be specified at the same time"
                )));
            }
        }
        let top = self.lookup(&spec.device, &spec.device)?;
        // The chain below top, by graph name, as it is now.
        let t = top.clone();
        let chain: Vec<(String, NodeHandle)> = self.main.run(move |bql| {
            let gs = t.gs(bql);
            gs.backing()
                .map(|b| b.backing_chain())
                .unwrap_or_default()
                .iter()
                .map(|n| (n.name().to_owned(), n.to_handle()))
                .collect()
        });
        let index_of = |h: &NodeHandle| chain.iter().position(|(n, _)| n == h.name());
        // Where the streamed part ends: the index of base in `chain`.
        let mut base_at: Option<usize> = None;
        if let Some(base) = &spec.base {
            base_at = Some(self.find_backing_image(&top, &chain, base).ok_or_else(|| {
                QmpError::generic(format!("Can't find '{base}' in the backing chain"))
            })?);
        }
        if let Some(base_node) = &spec.base_node {
            let b = self.lookup("", base_node)?;
            base_at = Some(index_of(&b).ok_or_else(|| {
                QmpError::generic(format!(
                    "Node '{base_node}' is not a backing image of '{}'",
                    spec.device
                ))
            })?);
        }
        if let Some(bottom) = &spec.bottom {
            let b = self.lookup("", bottom)?;
            let at = index_of(&b).ok_or_else(|| {
                QmpError::generic(format!(
                    "Node '{bottom}' is not in a chain starting from '{}'",
                    spec.device
                ))
            })?;
            // Stream down to bottom: its backing (if any) is the base.
            base_at = (at + 1 < chain.len()).then_some(at + 1);
        }
        let base = base_at.map(|i| chain[i].1.clone());
        let mut busy = vec![top.name().to_owned()];
        busy.extend(
            chain[..base_at.unwrap_or(chain.len())]
                .iter()
                .map(|(n, _)| n.clone()),
        );
        self.check_not_busy(&busy)?;
        if base.is_none() && spec.backing_file.is_some() {
            return Err(QmpError::generic(
                "backing file specified, but streaming the entire chain",
            ));
        }
        let jo = self.check_job_basics(&spec.job)?;

        let mut options = StreamOptions::new(&top);
        if let Some(b) = &base {
            options = options.base(b);
            // QEMU writes the base's file name as opened (or the one
            // given) and its format.
            let named =
                self.backing_name_for(b, spec.backing_file.clone(), spec.backing_mask_protocol);
            if let Some((name, format)) = named {
                options = options.backing_file(name, format);
            }
        }
        options = options.filter_node_name(self.filter_name(&spec.job));
        self.start_job(jo, "stream", busy, false, move |bql, io, jo| {
            job::stream(bql, io, jo, options)
        })
    }

    /// The backing chain from `node` down (`node` first), as (graph name,
    /// handle).
    fn chain_from(&self, node: &NodeHandle) -> Vec<(String, NodeHandle)> {
        let n = node.clone();
        self.main.run(move |bql| {
            n.gs(bql)
                .backing_chain()
                .iter()
                .map(|x| (x.name().to_owned(), x.to_handle()))
                .collect()
        })
    }

    /// The backing name QEMU writes for `base` (`backing-file`, or the
    /// base's file name as opened) and its format (`raw` for a protocol
    /// node with `backing-mask-protocol`): what stream and commit put into
    /// the header of the image above the part they drop.
    fn backing_name_for(
        &self,
        base: &NodeHandle,
        given: Option<String>,
        mask_protocol: bool,
    ) -> Option<(String, &'static str)> {
        let node = self.nodes.values().find(|n| n.handle.ptr_eq(base));
        let name = given.or_else(|| node.map(|n| n.filename.clone()))?;
        let format = match node.map(|n| n.drv) {
            Some("file") if mask_protocol => "raw",
            Some(drv) => drv,
            None => "raw",
        };
        Some((name, format))
    }

    /// `block-commit`: QEMU's checks in QEMU's order (`qmp_block_commit`,
    /// then `commit_start` or `commit_active_start`), then
    /// `blockgraph::job::commit` on the jobs I/O thread. Of the active
    /// layer it is the library's active commit (READY, then
    /// `job-complete`), as QEMU's.
    pub fn block_commit(&mut self, spec: CommitSpec) -> QResult<()> {
        // libvirt probes for commit with an unknown device and relies on
        // `DeviceNotFound`, so QEMU looks the device up before anything.
        let Some(dev) = self.nodes.get(&spec.device).map(|n| n.handle.clone()) else {
            return Err(QmpError {
                class: "DeviceNotFound",
                desc: format!("Device '{}' not found", spec.device),
            });
        };
        // QEMU's `qmp_get_root_bs`: no node above it (an export or a
        // job's backend is not one; a job's filter is, as QEMU's job
        // children are).
        if self.parents(&dev).0 > 0 {
            return Err(QmpError::generic("Need a root block node"));
        }
        let chain = self.chain_from(&dev);
        let index_of = |h: &NodeHandle| chain.iter().position(|(n, _)| n == h.name());
        let top_at = match (&spec.top_node, &spec.top) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'top-node' and 'top' are mutually exclusive",
                ))
            }
            (Some(t), None) => {
                let h = self.lookup("", t)?;
                index_of(&h).ok_or_else(|| {
                    QmpError::generic(format!("'{t}' is not in this backing file chain"))
                })?
            }
            (None, Some(t)) => {
                let is_device = self
                    .nodes
                    .get(&spec.device)
                    .is_some_and(|n| n.filename == *t);
                if is_device {
                    0
                } else {
                    self.find_backing_image(&dev, &chain[1..], t)
                        .map(|i| i + 1)
                        .ok_or_else(|| QmpError::generic(format!("Top image file {t} not found")))?
                }
            }
            (None, None) => 0,
        };
        let top = chain[top_at].1.clone();
        let base_at = match (&spec.base_node, &spec.base) {
            (Some(_), Some(_)) => {
                return Err(QmpError::generic(
                    "'base-node' and 'base' are mutually exclusive",
                ))
            }
            (Some(b), None) => {
                let h = self.lookup("", b)?;
                index_of(&h).filter(|i| *i >= top_at).ok_or_else(|| {
                    QmpError::generic(format!("'{b}' is not in this backing file chain"))
                })?
            }
            (None, Some(b)) => self
                .find_backing_image(&top, &chain[top_at + 1..], b)
                .map(|i| i + top_at + 1)
                .ok_or_else(|| {
                    QmpError::generic(format!("Can't find '{b}' in the backing chain"))
                })?,
            // QEMU's `bdrv_find_base`: the bottom of the chain.
            (None, None) => chain.len() - 1,
        };
        let base = chain[base_at].1.clone();
        // What the commit drops must not be another job's.
        let dropped: Vec<String> = chain[top_at..base_at]
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        self.check_not_busy(&dropped)?;
        if top_at == base_at {
            return Err(QmpError::generic("cannot commit an image into itself"));
        }
        if top_at == 0 {
            // Active commit (QEMU's `commit_active_start`): the library's
            // commit of the active layer is a mirror of it into the base,
            // READY once converged, `job-complete` pivots the device's
            // users (the export) onto the base. No header to rewrite.
            if spec.backing_file.is_some() {
                return Err(QmpError::generic(
                    "'backing-file' specified, but 'top' is the active layer",
                ));
            }
            let jo = self.check_job_basics(&spec.job)?;
            let options = CommitOptions::new(&top)
                .base(&base)
                .filter_node_name(self.filter_name(&spec.job));
            // Busy as in QEMU: the device, what is dropped and the base.
            let mut busy = dropped;
            busy.push(chain[base_at].0.clone());
            busy.dedup();
            let id = jo.id.clone();
            self.start_job(jo, "commit", busy, false, move |bql, io, jo| {
                job::commit(bql, io, jo, options)
            })?;
            if let Some(u) = self.job_uses.get_mut(&id) {
                u.under_filter = Some(top.name().to_owned());
            }
            return Ok(());
        }
        let overlay = chain[top_at - 1].0.clone();
        self.check_not_busy(std::slice::from_ref(&overlay))?;
        let jo = self.check_job_basics(&spec.job)?;

        // QEMU's `bdrv_drop_intermediate` writes `backing-file` or the
        // base's file name as opened, and the base's format.
        let mut options = CommitOptions::new(&top)
            .base(&base)
            .filter_node_name(self.filter_name(&spec.job));
        let named =
            self.backing_name_for(&base, spec.backing_file.clone(), spec.backing_mask_protocol);
        if let Some((name, format)) = named {
            options = options.backing_file(name, format);
        }
        // Busy as in QEMU: the device, the overlay, what is dropped and
        // the base.
        let mut busy = vec![chain[0].0.clone(), overlay];
        busy.extend(dropped);
        busy.push(chain[base_at].0.clone());
        busy.dedup();
        self.start_job(jo, "commit", busy, false, move |bql, io, jo| {
            job::commit(bql, io, jo, options)
        })
    }

    /// The job id, speed and filter name checks every job kind makes
    /// last (QEMU's `job_create`, `block_job_create`, the filter's node
    /// name); the library's options for the job.
    fn check_job_basics(&self, args: &JobArgs) -> QResult<JobOptions> {
        let id = args.job_id.clone().unwrap_or_default();
        if !super::valid_id(&id) {
            return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
        }
        if self.find_job(&id).is_some() {
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        let speed = check_speed(args.speed)?;
        if let Some(f) = &args.filter_node_name {
            if self.nodes.contains_key(f) {
                return Err(QmpError::generic(format!(
                    "Duplicate nodes with node-name='{f}'"
                )));
            }
        }
        let mut jo = JobOptions::new(id);
        jo.speed = speed;
        jo.on_error = args.on_error;
        jo.auto_finalize = args.auto_finalize;
        jo.auto_dismiss = args.auto_dismiss;
        Ok(jo)
    }

    /// The job's filter node name: the user's, or QEMU's implicit node's
    /// (a graph name no user name can take).
    fn filter_name(&mut self, args: &JobArgs) -> String {
        match &args.filter_node_name {
            Some(f) => f.clone(),
            None => self.auto_name().1,
        }
    }

    /// Starts a job checked by [`Self::check_job_basics`]: `start` (the
    /// library's job function) on the main loop with the jobs I/O thread,
    /// then [`Self::track_job`] with `kind` and the `busy` nodes.
    fn start_job(
        &mut self,
        jo: JobOptions,
        kind: &'static str,
        busy: Vec<String>,
        write_blocking: bool,
        start: impl FnOnce(&mut Bql, &IoThreadHandle, JobOptions) -> blockgraph::Result<Job>
            + Send
            + 'static,
    ) -> QResult<()> {
        let auto_finalize = jo.auto_finalize;
        let io = self.jobs_io()?.handle();
        let job = self
            .main
            .run(move |bql| start(bql, &io, jo))
            .map_err(lib_err)?;
        self.track_job(&job, kind, busy, auto_finalize, write_blocking);
        Ok(())
    }

    /// `blockdev-mirror`: QEMU's checks (`qmp_blockdev_mirror`,
    /// `blockdev_mirror_common`, `mirror_start_job`), then
    /// `blockgraph::job::mirror` on the jobs I/O thread. `job-complete`
    /// pivots every user of the device (exports included) onto the
    /// target; the node table follows (`reconcile`).
    pub fn blockdev_mirror(&mut self, spec: MirrorSpec) -> QResult<()> {
        let dev = self.lookup(&spec.device, &spec.device)?;
        if self.parents(&dev).0 > 0 {
            return Err(QmpError::generic("Need a root block node"));
        }
        let target = self.lookup(&spec.target, &spec.target)?;
        let mut sync = match spec.sync.as_str() {
            "full" => MirrorSync::Full,
            "top" => MirrorSync::Top,
            "none" => MirrorSync::None,
            other => {
                return Err(QmpError::generic(format!(
                    "Sync mode '{other}' not supported"
                )))
            }
        };
        if spec.replaces.is_some() {
            return Err(QmpError::generic(
                "'replaces' is not supported by this daemon: job-complete replaces the \
                 device itself",
            ));
        }
        self.check_not_busy(&[dev.name().to_owned(), target.name().to_owned()])?;
        if spec.granularity != 0 {
            if !(512..=(64 << 20)).contains(&spec.granularity) {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            if !spec.granularity.is_power_of_two() {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a power of 2",
                ));
            }
        }
        if dev.ptr_eq(&target) {
            return Err(QmpError::generic("Can't mirror node into itself"));
        }
        let jo = self.check_job_basics(&spec.job)?;
        // QEMU starts the job and fails it at once ("Source and target
        // image have different sizes", in BLOCK_JOB_COMPLETED); this
        // daemon refuses the command with the same words.
        if self.node_length(&dev)? != self.node_length(&target)? {
            return Err(QmpError::generic(
                "Source and target image have different sizes",
            ));
        }
        // QEMU: top without a backing file is full.
        let d = dev.clone();
        if sync == MirrorSync::Top && self.main.run(move |bql| d.gs(bql).backing().is_none()) {
            sync = MirrorSync::Full;
        }
        let filter = self.filter_name(&spec.job);
        let mut options = MirrorOptions::new(&dev, MirrorTarget::Node(target.clone()))
            .sync(sync)
            .copy_mode(match spec.copy_mode.as_deref() {
                Some("write-blocking") => CopyMode::WriteBlocking,
                _ => CopyMode::Background,
            })
            .filter_node_name(filter);
        if spec.granularity != 0 {
            options = options.granularity(spec.granularity);
        }
        let busy = vec![dev.name().to_owned(), target.name().to_owned()];
        let write_blocking = spec.copy_mode.as_deref() == Some("write-blocking");
        self.start_job(jo, "mirror", busy, write_blocking, move |bql, io, jo| {
            job::mirror(bql, io, jo, options)
        })
    }

    /// `blockdev-backup`: QEMU's checks (`do_backup_common`, then
    /// `backup_job_create`), then `blockgraph::job::backup` on the jobs
    /// I/O thread. What the library does not have is refused with a
    /// description that says so: `sync=none` (image fleecing), a bitmap
    /// with `sync=full`/`top` (the bitmap as output only), `compress`.
    pub fn blockdev_backup(&mut self, spec: BackupSpec) -> QResult<()> {
        let p = self.check_backup(spec)?;
        self.start_job(p.jo, "backup", p.busy, false, move |bql, io, jo| {
            job::backup(bql, io, jo, p.options)
        })
    }

    /// `blockdev-backup`'s checks; what starting it takes.
    pub(super) fn check_backup(&mut self, spec: BackupSpec) -> QResult<PreparedBackup> {
        let src = self.lookup(&spec.device, &spec.device)?;
        let target = self.lookup(&spec.target, &spec.target)?;
        let mut sync = spec.sync.clone();
        let mut mode = spec.bitmap_mode.clone();
        if (sync == "bitmap" || sync == "incremental") && spec.bitmap.is_none() {
            return Err(QmpError::generic(format!(
                "must provide a valid bitmap name for '{sync}' sync mode"
            )));
        }
        if sync == "incremental" {
            if mode.as_deref().is_some_and(|m| m != "on-success") {
                return Err(QmpError::generic(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
                ));
            }
            mode = Some("on-success".to_owned());
            sync = "bitmap".to_owned();
        }
        if let Some(name) = &spec.bitmap {
            let s = src.clone();
            let info = self
                .main
                .run(move |bql| s.gs(bql).dirty_bitmaps())
                .into_iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' could not be found")))?;
            let Some(m) = &mode else {
                return Err(QmpError::generic(
                    "Bitmap sync mode must be given when providing a bitmap",
                ));
            };
            if info.busy {
                return Err(super::bitmaps::bitmap_err(blockgraph::Error::BitmapBusy(
                    name.clone(),
                )));
            }
            if info.inconsistent {
                return Err(super::bitmaps::bitmap_err(
                    blockgraph::Error::BitmapInconsistent(name.clone()),
                ));
            }
            if sync == "none" {
                return Err(QmpError::generic(
                    "sync mode 'none' does not produce meaningful bitmap outputs",
                ));
            }
            if m == "never" && sync != "bitmap" {
                return Err(QmpError::generic(format!(
                    "Bitmap sync mode 'never' has no meaningful effect when combined with \
                     sync mode '{sync}'"
                )));
            }
        } else if mode.is_some() {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        if src.ptr_eq(&target) {
            return Err(QmpError::generic("Source and target cannot be the same"));
        }
        if spec.compress {
            return Err(QmpError::generic(
                "'compress' is not supported by this daemon: the backup job writes plain \
                 clusters",
            ));
        }
        self.check_not_busy(&[src.name().to_owned(), target.name().to_owned()])?;
        if self.node_length(&src)? != self.node_length(&target)? {
            return Err(QmpError::generic(
                "Source and target image have different sizes",
            ));
        }
        let sync = match (sync.as_str(), &spec.bitmap) {
            ("bitmap", Some(b)) => BackupSync::Bitmap {
                bitmap: b.clone(),
                mode: match mode.as_deref() {
                    Some("always") => BitmapSyncMode::Always,
                    Some("never") => BitmapSyncMode::Never,
                    _ => BitmapSyncMode::OnSuccess,
                },
            },
            ("full", None) => BackupSync::Full,
            ("top", None) => BackupSync::Top,
            ("none", _) => {
                return Err(QmpError::generic(
                    "Sync mode 'none' (image fleecing) is not supported by this daemon: the \
                     library's backup job has no such mode",
                ))
            }
            (other, _) => {
                return Err(QmpError::generic(format!(
                    "A bitmap with sync mode '{other}' is not supported by this daemon: the \
                     library's backup job takes a bitmap as input only (sync mode 'bitmap')"
                )))
            }
        };
        let jo = self.check_job_basics(&spec.job)?;
        let filter = self.filter_name(&spec.job);
        let options = BackupOptions::new(&src, &target, sync).filter_node_name(filter);
        let busy = vec![src.name().to_owned(), target.name().to_owned()];
        Ok(PreparedBackup {
            jo,
            options,
            busy,
            source: src,
            target,
        })
    }

    /// QEMU's `bdrv_find_backing_image`: the node of `chain` whose file
    /// name is `name`, as opened or as the image above names it (relative
    /// to that image's directory).
    fn find_backing_image(
        &self,
        top: &NodeHandle,
        chain: &[(String, NodeHandle)],
        name: &str,
    ) -> Option<usize> {
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        let top_file = self
            .nodes
            .values()
            .find(|n| n.handle.ptr_eq(top))
            .map(|n| n.filename.clone())?;
        let wanted = if Path::new(name).is_absolute() {
            canon(Path::new(name))
        } else {
            Path::new(&top_file)
                .parent()
                .and_then(|dir| canon(&dir.join(name)))
        };
        chain.iter().position(|(_, h)| {
            self.nodes
                .values()
                .find(|n| n.handle.ptr_eq(h))
                .is_some_and(|n| {
                    n.filename == name
                        || (wanted.is_some() && canon(Path::new(&n.filename)) == wanted)
                })
        })
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Value {
        Value::Array(self.job_infos().iter().map(job_info_json).collect())
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Value {
        let infos = self.job_infos();
        Value::Array(
            infos
                .iter()
                .map(|info| {
                    let mut v = block_job_info_json(info);
                    // QEMU's mirror adds `actively-synced`: write-blocking
                    // and converged.
                    if info.job_type == job::JobType::Mirror {
                        let wb = self
                            .job_uses
                            .get(&info.id)
                            .is_some_and(|u| u.write_blocking);
                        v["actively-synced"] = json!(wb && info.status.is_ready());
                    }
                    v
                })
                .collect(),
        )
    }

    /// A verb for job `id`. `block` says it came as `block-job-*`, whose
    /// unknown-job error is QEMU's `DeviceNotActive`.
    pub fn job_verb(&mut self, id: &str, verb: JobVerbCmd, block: bool) -> QResult<()> {
        let Some(job) = self.find_job(id) else {
            return Err(if block {
                QmpError {
                    class: "DeviceNotActive",
                    desc: format!("Block job '{id}' not found"),
                }
            } else {
                QmpError::generic("Job not found")
            });
        };
        let speed = match verb {
            JobVerbCmd::SetSpeed(s) => check_speed(s)?,
            _ => 0,
        };
        self.main
            .run(move |bql| match verb {
                JobVerbCmd::Pause => job.pause(bql),
                JobVerbCmd::Resume => job.resume(bql),
                JobVerbCmd::Cancel { force } => job.cancel(bql, force),
                JobVerbCmd::Complete => job.complete(bql),
                JobVerbCmd::Finalize => job.finalize(bql),
                JobVerbCmd::Dismiss => job.dismiss(bql),
                JobVerbCmd::SetSpeed(_) => job.set_speed(bql, speed),
            })
            .map_err(|e| verb_error(verb, e))
    }

    /// Shutdown: cancels every job and waits (a while) for each to
    /// conclude, then dismisses it, as `qemu-storage-daemon` cancels its
    /// jobs synchronously on exit. Returns what did not end in time.
    pub(super) fn cancel_all_jobs(&mut self) -> Vec<String> {
        let jobs: Vec<Job> = self.main.run(|bql| {
            job::query_jobs(bql)
                .iter()
                .filter_map(|i| job::find_job(bql, &i.id))
                .collect()
        });
        for j in &jobs {
            let job = j.clone();
            let _ = self.main.run(move |bql| job.cancel(bql, true));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut problems = Vec::new();
        for j in jobs {
            while !matches!(j.status(), JobStatus::Concluded | JobStatus::Null) {
                if Instant::now() > deadline {
                    problems.push(format!("job '{}' did not end after cancel", j.id()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if j.status() == JobStatus::Concluded {
                let job = j.clone();
                let _ = self.main.run(move |bql| job.dismiss(bql));
            }
        }
        self.job_uses.clear();
        problems
    }
}
