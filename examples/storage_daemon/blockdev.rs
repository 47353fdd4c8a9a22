//! `blockdev-add`'s options (QEMU's `BlockdevOptions`) parsed into a
//! [`NodeSpec`], with QEMU's option names and JSON shapes, for the drivers
//! this daemon has: `file`, `raw`, `qcow2`, `throttle`, `copy-on-read`,
//! `null-co` and `nbd`.
//!
//! A child is a `BlockdevRef`: the name of an existing node
//! (`"file": "f0"`) or a nested definition (`"file": {"driver": "file",
//! "filename": "x.img"}`), which becomes an implicit node owned by its
//! parent. Options of QEMU's that do not change what this daemon does are
//! accepted with their default values only, so a script written for
//! QEMU is never silently served differently.

use std::path::PathBuf;

use crate::opts::{Opts, QResult, QmpError};

/// The drivers `blockdev-add` knows, by QEMU's names.
pub const DRIVERS: &[&str] = &[
    "file",
    "raw",
    "qcow2",
    "throttle",
    "copy-on-read",
    "null-co",
    "nbd",
    #[cfg(feature = "rbd")]
    "rbd",
];

/// A child given by reference or defined inline.
#[derive(Debug)]
pub enum ChildSpec {
    /// An existing node.
    Ref(String),
    /// A new node, owned by its parent.
    Inline(Box<NodeSpec>),
}

/// A qcow2 node's backing child.
#[derive(Debug)]
pub enum Backing {
    /// Open what the image's header names (QEMU's default).
    FromImage,
    /// `"backing": null`: no backing file; what the image does not store
    /// reads as zeroes.
    Nothing,
    /// A given node (or inline definition).
    Child(ChildSpec),
}

/// What one driver needs.
#[derive(Debug)]
pub enum Kind {
    /// `file`: a host file.
    File {
        /// `filename`.
        filename: PathBuf,
        /// `cache.direct`.
        direct: bool,
        /// `locking` (`on`, `off`, `auto`).
        locking: bool,
        /// `aio` (`threads`, `io_uring`; unset: io_uring where available).
        aio: Option<blockgraph::drivers::Aio>,
    },
    /// `raw`, with its optional window.
    Raw {
        /// `file`.
        file: ChildSpec,
        /// `offset`.
        offset: u64,
        /// `size`.
        size: Option<u64>,
    },
    /// `qcow2`.
    Qcow2 {
        /// `file`.
        file: ChildSpec,
        /// `backing`.
        backing: Backing,
    },
    /// `throttle` in group `throttle-group`.
    Throttle {
        /// `file`.
        file: ChildSpec,
        /// `throttle-group`.
        group: String,
    },
    /// `copy-on-read`.
    CopyOnRead {
        /// `file`.
        file: ChildSpec,
    },
    /// `rbd`: an image in a Ceph pool.
    #[cfg(feature = "rbd")]
    Rbd(RbdSpec),
    /// `null-co`; what was not given is `None` (QEMU names the node
    /// `null-co://` only when nothing was).
    Null {
        /// `size` (default 1 GiB).
        size: Option<u64>,
        /// `latency-ns` (default 0).
        latency_ns: Option<u64>,
        /// `read-zeroes` (default off).
        read_zeroes: Option<bool>,
    },
    /// `nbd`.
    Nbd(NbdSpec),
}

/// `nbd`: an export of an NBD server (`server`, `export`,
/// `reconnect-delay`, `open-timeout`), as the driver's options.
#[derive(Debug)]
pub struct NbdSpec(pub blockgraph::drivers::NbdOptions);

/// Parses `nbd`'s options: `server` (`type=unix` with `path`, or
/// `type=inet` with `host` and `port`), `export`, `reconnect-delay` and
/// `open-timeout` (seconds); TLS is refused.
fn nbd(o: &mut Opts, read_only: bool) -> QResult<NbdSpec> {
    use blockgraph::drivers::{NbdAddress, NbdOptions};
    use std::time::Duration;
    let mut server = o.object("server")?.ok_or_else(|| o.missing("server"))?;
    let address = match server.enumeration("type", &["unix", "inet"])?.as_deref() {
        Some("unix") => NbdAddress::Unix(PathBuf::from(server.req_str("path")?)),
        Some(_) => {
            let host = server.req_str("host")?;
            let port = server.req_str("port")?;
            let port = port.parse().map_err(|_| {
                QmpError::generic(format!("{}: bad port '{port}'", server.path("port")))
            })?;
            NbdAddress::Tcp { host, port }
        }
        None => return Err(server.missing("type")),
    };
    server.finish()?;
    for key in ["tls-creds", "tls-hostname", "x-dirty-bitmap"] {
        if o.has(key) {
            return Err(QmpError::generic(format!(
                "nbd: '{key}' is not supported by this daemon"
            )));
        }
    }
    let mut opts =
        NbdOptions::new(address, o.str("export")?.unwrap_or_default()).read_only(read_only);
    if let Some(s) = o.u64("reconnect-delay")? {
        opts = opts.reconnect_delay(Duration::from_secs(s));
    }
    if let Some(s) = o.u64("open-timeout")? {
        opts = opts.connect_timeout(Duration::from_secs(s.max(1)));
    }
    Ok(NbdSpec(opts))
}

/// `rbd`'s options (QEMU's `BlockdevOptionsRbd`), with the `rbd` feature.
#[cfg(feature = "rbd")]
#[derive(Debug)]
pub struct RbdSpec {
    /// `pool`, `namespace`, `image`, `snapshot`, `conf`, `user`.
    pub options: blockgraph::drivers::RbdOptions,
}

/// One node to add.
#[derive(Debug)]
pub struct NodeSpec {
    /// `node-name`; QEMU requires it for the node `blockdev-add` names.
    pub node_name: Option<String>,
    /// QEMU's driver name.
    pub driver: &'static str,
    /// `read-only`.
    pub read_only: bool,
    /// `force-share`: let others write the file too.
    pub force_share: bool,
    /// The driver's own options.
    pub kind: Kind,
}

/// Whether `name` is a valid QEMU node name: a letter, then letters,
/// digits, `-`, `.`, `_`; at most 31 characters.
pub fn valid_node_name(name: &str) -> bool {
    name.len() <= 31
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Parses one `BlockdevOptions` object (the whole `blockdev-add`
/// arguments, or a nested child definition).
pub fn parse(mut o: Opts) -> QResult<NodeSpec> {
    let driver_name = o.req_str("driver")?;
    let Some(&driver) = DRIVERS.iter().find(|d| **d == driver_name) else {
        return Err(QmpError::generic(format!(
            "Parameter '{}' does not accept value '{driver_name}' (this daemon has: {})",
            o.path("driver"),
            DRIVERS.join(", ")
        )));
    };
    let node_name = o.str("node-name")?;
    if let Some(n) = &node_name {
        if !valid_node_name(n) {
            return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
        }
    }
    let read_only = o.bool("read-only")?.unwrap_or(false);
    let _auto_read_only = o.bool("auto-read-only")?;
    let force_share = o.bool("force-share")?.unwrap_or(false);
    if force_share && !read_only {
        return Err(QmpError::generic(
            "force-share=on can only be used with read-only images",
        ));
    }
    if let Some(d) = o.str("discard")? {
        if !matches!(d.as_str(), "ignore" | "off" | "unmap" | "on") {
            return Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{d}'",
                o.path("discard")
            )));
        }
    }
    if let Some(z) = o.str("detect-zeroes")? {
        if z != "off" {
            return Err(QmpError::generic(format!(
                "detect-zeroes={z} is not supported by this daemon (only 'off')"
            )));
        }
    }
    let mut direct = false;
    if let Some(mut cache) = o.object("cache")? {
        direct = cache.bool("direct")?.unwrap_or(false);
        if cache.bool("no-flush")?.unwrap_or(false) {
            return Err(QmpError::generic(
                "cache.no-flush=on is not supported by this daemon",
            ));
        }
        cache.finish()?;
    }
    let kind = match driver {
        "file" => {
            let filename = PathBuf::from(o.req_str("filename")?);
            let locking = match o.str("locking")?.as_deref() {
                None | Some("auto") | Some("on") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' does not accept value '{other}'",
                        o.path("locking")
                    )))
                }
            };
            let aio = match o.str("aio")? {
                None => None,
                Some(aio) => Some(blockgraph::drivers::Aio::parse(&aio).ok_or_else(|| {
                    QmpError::generic(format!(
                        "aio={aio} is not supported by this daemon ('threads' or 'io_uring')"
                    ))
                })?),
            };
            Kind::File {
                filename,
                direct,
                locking,
                aio,
            }
        }
        "raw" => Kind::Raw {
            file: child(&mut o, "file")?,
            offset: o.size("offset")?.unwrap_or(0),
            size: o.size("size")?,
        },
        "qcow2" => {
            let file = child(&mut o, "file")?;
            let backing = match o.take("backing") {
                None => Backing::FromImage,
                Some(serde_json::Value::Null) => Backing::Nothing,
                // The command line spells "no backing" as an empty string.
                Some(serde_json::Value::String(s)) if s.is_empty() && o.is_keyval() => {
                    Backing::Nothing
                }
                Some(serde_json::Value::String(s)) => Backing::Child(ChildSpec::Ref(s)),
                Some(v @ serde_json::Value::Object(_)) => {
                    let nested = Opts::new(v, o.is_keyval())?;
                    Backing::Child(ChildSpec::Inline(Box::new(parse(nested)?)))
                }
                Some(_) => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{}', expected: BlockdevRefOrNull",
                        o.path("backing")
                    )))
                }
            };
            // Cache sizes: accepted, the driver's defaults are used.
            for key in ["cache-size", "l2-cache-size", "refcount-cache-size"] {
                o.size(key)?;
            }
            Kind::Qcow2 { file, backing }
        }
        "throttle" => Kind::Throttle {
            file: child(&mut o, "file")?,
            group: o.req_str("throttle-group")?,
        },
        "copy-on-read" => {
            if o.has("bottom") {
                return Err(QmpError::generic(
                    "copy-on-read: 'bottom' is not supported by this daemon",
                ));
            }
            Kind::CopyOnRead {
                file: child(&mut o, "file")?,
            }
        }
        "nbd" => Kind::Nbd(nbd(&mut o, read_only)?),
        #[cfg(feature = "rbd")]
        "rbd" => Kind::Rbd(rbd(&mut o)?),
        _ => Kind::Null {
            size: o.size("size")?,
            latency_ns: o.u64("latency-ns")?,
            read_zeroes: o.bool("read-zeroes")?,
        },
    };
    o.finish()?;
    Ok(NodeSpec {
        node_name,
        driver,
        read_only,
        force_share,
        kind,
    })
}

/// `rbd`'s options. The key itself comes from the Ceph configuration and
/// keyring (`conf`, `user`): QEMU's `key-secret` names a secret object,
/// which this daemon does not have, and is refused; so are `server`,
/// `auth-client-required` and `encrypt` (set them in `conf`).
#[cfg(feature = "rbd")]
fn rbd(o: &mut Opts) -> QResult<RbdSpec> {
    let mut options = blockgraph::drivers::RbdOptions::new(o.req_str("pool")?, o.req_str("image")?);
    options.namespace = o.str("namespace")?.filter(|n| !n.is_empty());
    options.snapshot = o.str("snapshot")?;
    options.conf = o.str("conf")?.map(PathBuf::from);
    options.user = o.str("user")?;
    for key in ["key-secret", "server", "auth-client-required", "encrypt"] {
        if o.has(key) {
            return Err(QmpError::generic(format!(
                "rbd: '{key}' is not supported by this daemon (put it in the Ceph configuration file)"
            )));
        }
    }
    Ok(RbdSpec { options })
}

/// Takes the `BlockdevRef` member `key`, which must be there.
fn child(o: &mut Opts, key: &str) -> QResult<ChildSpec> {
    match o.str_or_object(key)? {
        None => Err(o.missing(key)),
        Some(Ok(name)) => Ok(ChildSpec::Ref(name)),
        Some(Err(nested)) => Ok(ChildSpec::Inline(Box::new(parse(nested)?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> QResult<NodeSpec> {
        parse(Opts::new(v, false)?)
    }

    #[test]
    fn qemu_shapes_parse() {
        let s = spec(json!({"driver": "qcow2", "node-name": "d0",
                            "file": {"driver": "file", "filename": "x.img"}}))
        .unwrap();
        assert_eq!(s.driver, "qcow2");
        let Kind::Qcow2 {
            file: ChildSpec::Inline(f),
            backing: Backing::FromImage,
        } = s.kind
        else {
            panic!("{:?}", s.kind)
        };
        assert_eq!(f.driver, "file");
        assert!(matches!(
            spec(json!({"driver": "qcow2", "node-name": "d0", "file": "f0", "backing": null}))
                .unwrap()
                .kind,
            Kind::Qcow2 {
                backing: Backing::Nothing,
                ..
            }
        ));
        let e = spec(json!({"driver": "qcow2", "node-name": "d0", "file": "f0", "bogus": 1}))
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
        let e = spec(json!({"driver": "raw", "node-name": "r", "file": {"driver": "file"}}))
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'file.filename' is missing");
        assert!(spec(json!({"driver": "vmdk"})).is_err());
        assert!(spec(json!({"driver": "null-co", "node-name": "1x"})).is_err());
    }

    #[test]
    fn nbd_options_parse() {
        use blockgraph::drivers::NbdAddress;
        let s = spec(json!({"driver": "nbd", "node-name": "n0", "export": "disk",
                            "server": {"type": "inet", "host": "h", "port": "10810"},
                            "reconnect-delay": 7}))
        .unwrap();
        let Kind::Nbd(NbdSpec(o)) = s.kind else {
            panic!("{:?}", s.kind)
        };
        let tcp = NbdAddress::Tcp {
            host: "h".into(),
            port: 10810,
        };
        assert_eq!((o.address, o.export.as_str()), (tcp, "disk"));
        assert_eq!(o.reconnect_delay, std::time::Duration::from_secs(7));
        let s = spec(json!({"driver": "nbd", "node-name": "n0",
                            "server": {"type": "unix", "path": "/s"}}))
        .unwrap();
        assert!(
            matches!(s.kind, Kind::Nbd(NbdSpec(ref o)) if o.address == NbdAddress::Unix("/s".into()))
        );
        let e = spec(json!({"driver": "nbd", "node-name": "n0"})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'server' is missing");
        let e = spec(json!({"driver": "nbd", "node-name": "n0",
                            "server": {"type": "unix"}}))
        .unwrap_err();
        assert_eq!(e.desc, "Parameter 'server.path' is missing");
        assert!(
            spec(json!({"driver": "nbd", "node-name": "n0", "tls-creds": "t",
                            "server": {"type": "unix", "path": "/s"}}))
            .is_err()
        );
    }

    #[test]
    fn file_aio_parses() {
        use blockgraph::drivers::Aio;
        let aio = |v: Option<&str>| {
            let mut j = json!({"driver": "file", "node-name": "f0", "filename": "x.img"});
            if let Some(v) = v {
                j["aio"] = json!(v);
            }
            spec(j).map(|s| match s.kind {
                Kind::File { aio, .. } => aio,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(aio(None).unwrap(), None);
        assert_eq!(aio(Some("threads")).unwrap(), Some(Aio::Threads));
        assert_eq!(aio(Some("io_uring")).unwrap(), Some(Aio::IoUring));
        let e = aio(Some("native")).unwrap_err();
        assert!(e.desc.contains("aio=native"), "{}", e.desc);
    }
}
