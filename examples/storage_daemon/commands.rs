//! The QMP commands: the dispatch table, each command's arguments, and
//! the commands that are not here yet.
//!
//! [`TABLE`] lists every command by name with a [`Handler`]: `Ready` ones
//! run on the executor against the [`Daemon`]; `Pending` ones belong to
//! work in progress (none at the moment) and are answered exactly as a daemon without them answers,
//! `CommandNotFound` ("The command X has not been found"), and left out of
//! `query-commands`. Plugging one in is replacing its `Pending` with a
//! `Ready` function. `qmp_capabilities` and `quit` are answered by the
//! connection itself (`qmp.rs`) and only listed here.

use blockgraph::drivers::ThrottleConfig;
use serde_json::{json, Value};

use crate::blockdev;
use crate::daemon::{Daemon, ExportSpec, NbdAddr};
use crate::opts::{Opts, QResult, QmpError};
use crate::{bitmap_commands, job_commands, snapshot_commands};

/// What a command does.
pub enum Handler {
    /// Runs on the executor.
    Ready(fn(&mut Daemon, Opts) -> QResult<Value>),
    /// Answered by the connection (`qmp_capabilities`, `quit`).
    Connection,
    /// Not here yet: which work will add it. (No command is pending at
    /// the moment; the scheme stays for the next one.)
    #[allow(dead_code)]
    Pending(&'static str),
}

/// Every command, by QMP name.
pub const TABLE: &[(&str, Handler)] = &[
    ("qmp_capabilities", Handler::Connection),
    ("quit", Handler::Connection),
    ("query-version", Handler::Ready(query_version)),
    ("query-commands", Handler::Ready(query_commands)),
    ("blockdev-add", Handler::Ready(blockdev_add)),
    ("blockdev-del", Handler::Ready(blockdev_del)),
    (
        "query-named-block-nodes",
        Handler::Ready(query_named_block_nodes),
    ),
    ("object-add", Handler::Ready(object_add)),
    ("object-del", Handler::Ready(object_del)),
    ("nbd-server-start", Handler::Ready(nbd_server_start)),
    ("nbd-server-stop", Handler::Ready(nbd_server_stop)),
    ("block-export-add", Handler::Ready(block_export_add)),
    ("block-export-del", Handler::Ready(block_export_del)),
    ("query-block-exports", Handler::Ready(query_block_exports)),
    (
        "blockdev-snapshot",
        Handler::Ready(snapshot_commands::blockdev_snapshot),
    ),
    (
        "blockdev-snapshot-sync",
        Handler::Ready(snapshot_commands::blockdev_snapshot_sync),
    ),
    (
        "transaction",
        Handler::Ready(snapshot_commands::transaction),
    ),
    ("block-stream", Handler::Ready(job_commands::block_stream)),
    ("block-commit", Handler::Ready(job_commands::block_commit)),
    (
        "blockdev-mirror",
        Handler::Ready(job_commands::blockdev_mirror),
    ),
    (
        "blockdev-backup",
        Handler::Ready(job_commands::blockdev_backup),
    ),
    ("query-jobs", Handler::Ready(job_commands::query_jobs)),
    (
        "query-block-jobs",
        Handler::Ready(job_commands::query_block_jobs),
    ),
    ("job-pause", Handler::Ready(job_commands::job_pause)),
    ("job-resume", Handler::Ready(job_commands::job_resume)),
    ("job-cancel", Handler::Ready(job_commands::job_cancel)),
    ("job-complete", Handler::Ready(job_commands::job_complete)),
    ("job-finalize", Handler::Ready(job_commands::job_finalize)),
    ("job-dismiss", Handler::Ready(job_commands::job_dismiss)),
    (
        "block-job-set-speed",
        Handler::Ready(job_commands::block_job_set_speed),
    ),
    (
        "block-job-pause",
        Handler::Ready(job_commands::block_job_pause),
    ),
    (
        "block-job-resume",
        Handler::Ready(job_commands::block_job_resume),
    ),
    (
        "block-job-cancel",
        Handler::Ready(job_commands::block_job_cancel),
    ),
    (
        "block-job-complete",
        Handler::Ready(job_commands::block_job_complete),
    ),
    (
        "block-job-finalize",
        Handler::Ready(job_commands::block_job_finalize),
    ),
    (
        "block-job-dismiss",
        Handler::Ready(job_commands::block_job_dismiss),
    ),
    (
        "block-dirty-bitmap-add",
        Handler::Ready(bitmap_commands::add),
    ),
    (
        "block-dirty-bitmap-remove",
        Handler::Ready(bitmap_commands::remove),
    ),
    (
        "block-dirty-bitmap-clear",
        Handler::Ready(bitmap_commands::clear),
    ),
    (
        "block-dirty-bitmap-enable",
        Handler::Ready(bitmap_commands::enable),
    ),
    (
        "block-dirty-bitmap-disable",
        Handler::Ready(bitmap_commands::disable),
    ),
    (
        "block-dirty-bitmap-merge",
        Handler::Ready(bitmap_commands::merge),
    ),
];

/// Runs command `name` on the executor.
pub fn dispatch(daemon: &mut Daemon, name: &str, args: Value, keyval: bool) -> QResult<Value> {
    match TABLE.iter().find(|(n, _)| *n == name).map(|(_, h)| h) {
        Some(Handler::Ready(f)) => {
            // What jobs and snapshots changed in the graph since the last
            // command shows in this one's answer.
            daemon.reconcile();
            f(daemon, Opts::new(args, keyval)?)
        }
        Some(Handler::Pending(by)) => {
            eprintln!("storage_daemon: '{name}' is not here yet (it comes with {by})");
            Err(QmpError::command_not_found(name))
        }
        // The connection answers these before they reach the executor.
        Some(Handler::Connection) | None => Err(QmpError::command_not_found(name)),
    }
}

fn query_version(_: &mut Daemon, o: Opts) -> QResult<Value> {
    o.finish()?;
    Ok(version())
}

/// The `version` of the greeting and `query-version`: this crate's.
pub fn version() -> Value {
    let n = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": n(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": n(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": n(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!("blockgraph ", env!("CARGO_PKG_VERSION"), " storage_daemon"),
    })
}

fn query_commands(_: &mut Daemon, o: Opts) -> QResult<Value> {
    o.finish()?;
    Ok(Value::Array(
        TABLE
            .iter()
            .filter(|(_, h)| !matches!(h, Handler::Pending(_)))
            .map(|(n, _)| json!({ "name": n }))
            .collect(),
    ))
}

fn blockdev_add(d: &mut Daemon, o: Opts) -> QResult<Value> {
    d.blockdev_add(blockdev::parse(o)?)?;
    Ok(json!({}))
}

fn blockdev_del(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let name = o.req_str("node-name")?;
    o.finish()?;
    d.blockdev_del(&name)?;
    Ok(json!({}))
}

fn query_named_block_nodes(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let flat = o.bool("flat")?.unwrap_or(false);
    o.finish()?;
    d.query_named_block_nodes(flat)
}

/// `object-add`: `throttle-group` only, its limits as `limits.*` or the
/// older `x-*` members.
fn object_add(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let qom_type = o.req_str("qom-type")?;
    let id = o.req_str("id")?;
    if qom_type != "throttle-group" {
        return Err(QmpError::generic(format!(
            "Invalid parameter '{qom_type}': this daemon has only 'throttle-group' objects"
        )));
    }
    let mut limits: Vec<(String, String)> = Vec::new();
    if let Some(mut l) = o.object("limits")? {
        for key in LIMIT_KEYS {
            if let Some(v) = l.u64(key)? {
                limits.push((key.to_string(), v.to_string()));
            }
        }
        l.finish()?;
    }
    for key in LIMIT_KEYS {
        if let Some(v) = o.u64(&format!("x-{key}"))? {
            limits.push((key.to_string(), v.to_string()));
        }
    }
    o.finish()?;
    let pairs: Vec<(&str, &str)> = limits
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let config = ThrottleConfig::from_options(&pairs).map_err(crate::opts::lib_err)?;
    d.add_throttle_group(&id, config)?;
    Ok(json!({}))
}

/// QEMU's `ThrottleLimits` members.
const LIMIT_KEYS: [&str; 19] = [
    "iops-total",
    "iops-total-max",
    "iops-total-max-length",
    "iops-read",
    "iops-read-max",
    "iops-read-max-length",
    "iops-write",
    "iops-write-max",
    "iops-write-max-length",
    "bps-total",
    "bps-total-max",
    "bps-total-max-length",
    "bps-read",
    "bps-read-max",
    "bps-read-max-length",
    "bps-write",
    "bps-write-max",
    "bps-write-max-length",
    "iops-size",
];

fn object_del(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let id = o.req_str("id")?;
    o.finish()?;
    d.del_object(&id)?;
    Ok(json!({}))
}

/// `nbd-server-start`: `addr` in QMP's legacy form (`{"type": "unix",
/// "data": {"path": ...}}`), or, from the command line, the flat form
/// (`addr.type=unix,addr.path=...`).
fn nbd_server_start(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let Some(mut addr) = o.object("addr")? else {
        return Err(o.missing("addr"));
    };
    for unsupported in ["tls-creds", "tls-authz", "tls-hostname"] {
        if o.str(unsupported)?.is_some() {
            return Err(QmpError::generic(format!(
                "{unsupported}: TLS is not supported by this daemon"
            )));
        }
    }
    let _max_connections = o.u64("max-connections")?;
    o.finish()?;
    let ty = addr.req_str("type")?;
    // The legacy form nests the address under `data`.
    let flat = o_is_keyval_or_flat(&addr);
    let mut data = if flat {
        addr
    } else {
        let Some(data) = addr.object("data")? else {
            return Err(addr.missing("data"));
        };
        addr.finish()?;
        data
    };
    let parsed = match ty.as_str() {
        "unix" => {
            let path = data.req_str("path")?;
            let _abstract = data.bool("abstract")?;
            let _tight = data.bool("tight")?;
            NbdAddr::Unix(path.into())
        }
        "inet" => {
            let host = data.req_str("host")?;
            let port = match data.take("port") {
                Some(Value::String(s)) => s,
                // Tolerated although QAPI wants a string.
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{}', expected: string",
                        data.path("port")
                    )))
                }
                None => return Err(data.missing("port")),
            };
            for key in ["numeric", "ipv4", "ipv6", "keep-alive", "mptcp"] {
                data.bool(key)?;
            }
            let _to = data.u64("to")?;
            NbdAddr::Inet(host, port)
        }
        other => {
            return Err(QmpError::generic(format!(
            "Parameter 'addr.type' does not accept value '{other}' (this daemon has: unix, inet)"
        )))
        }
    };
    data.finish()?;
    d.nbd_server_start(parsed)?;
    Ok(json!({}))
}

/// Whether an `addr` object is the flat `SocketAddress` (command line)
/// rather than QMP's legacy `{type, data}`.
fn o_is_keyval_or_flat(addr: &Opts) -> bool {
    addr.is_keyval() || !addr.has("data")
}

fn nbd_server_stop(d: &mut Daemon, o: Opts) -> QResult<Value> {
    o.finish()?;
    d.nbd_server_stop()?;
    Ok(json!({}))
}

/// `block-export-add` with `type: nbd`.
fn block_export_add(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let ty = o.req_str("type")?;
    match ty.as_str() {
        "nbd" => {}
        "fuse" | "vhost-user-blk" | "vduse-blk" => {
            return Err(QmpError::generic(format!(
                "Export type '{ty}' is not supported by this daemon (only 'nbd')"
            )))
        }
        _ => {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{ty}'"
            )))
        }
    }
    let id = o.req_str("id")?;
    let node = o.req_str("node-name")?;
    let writable = o.bool("writable")?.unwrap_or(false);
    if o.bool("writethrough")?.unwrap_or(false) {
        return Err(QmpError::generic(
            "writethrough=on is not supported by this daemon",
        ));
    }
    if o.str("iothread")?.is_some() {
        return Err(QmpError::generic(
            "iothread is not supported by this daemon (the NBD server has its own threads)",
        ));
    }
    let _fixed = o.bool("fixed-iothread")?;
    let name = o.str("name")?;
    let description = o.str("description")?.unwrap_or_default();
    if let Some(b) = o.take("bitmaps") {
        if b.as_array().is_some_and(|a| !a.is_empty()) {
            return Err(QmpError::generic(
                "exporting dirty bitmaps is not supported by this daemon",
            ));
        }
    }
    if o.bool("allocation-depth")?.unwrap_or(false) {
        return Err(QmpError::generic(
            "allocation-depth is not supported by this daemon",
        ));
    }
    o.finish()?;
    d.block_export_add(ExportSpec {
        id,
        node,
        name,
        description,
        writable,
    })?;
    Ok(json!({}))
}

fn block_export_del(d: &mut Daemon, mut o: Opts) -> QResult<Value> {
    let id = o.req_str("id")?;
    let hard = match o.str("mode")?.as_deref() {
        None | Some("safe") => false,
        Some("hard") => true,
        Some(mode) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{mode}'"
            )))
        }
    };
    o.finish()?;
    d.block_export_del(&id, hard)?;
    Ok(json!({}))
}

fn query_block_exports(d: &mut Daemon, o: Opts) -> QResult<Value> {
    o.finish()?;
    Ok(d.query_block_exports())
}
