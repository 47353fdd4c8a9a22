//! [`NbdOptions`]: where the server is, which export, how to reconnect;
//! and QEMU's NBD URIs and legacy `nbd:` file names.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::types::{Error, Result};

/// The default NBD port (IANA), for `nbd://host/` without a port.
pub(crate) const DEFAULT_PORT: u16 = 10809;

/// Where the NBD server listens (QEMU's `server` option: `type=unix` with
/// `path`, or `type=inet` with `host` and `port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP address: host name or IP address, and port.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How an [`NbdDriver`](crate::drivers::NbdDriver) connects and what it
/// does when the connection drops (QEMU's `nbd` driver options).
///
/// # Reconnecting
///
/// When the connection is lost (the server closed it, a socket error, a
/// reply that breaks the protocol, or no reply within
/// [`request_timeout`](Self::request_timeout)), the driver tries to
/// connect again, every [`reconnect_interval`](Self::reconnect_interval),
/// at most [`reconnect_attempts`](Self::reconnect_attempts) times in a
/// row (then it gives up for good: every request fails).
///
/// Meanwhile requests wait: those that were in flight and new ones, for
/// at most [`reconnect_delay`](Self::reconnect_delay) after the loss
/// (QEMU's `reconnect-delay`). Once connected again, they are sent (again):
/// NBD writes are idempotent, so a write the old server may or may not
/// have carried out is simply written again, and no write is acknowledged
/// to the caller before the server acknowledged it. When the delay
/// passes first, the waiting requests fail with an error that says so,
/// and new requests fail at once until the connection is back. With a
/// delay of zero (the default, as in QEMU) requests fail as soon as the
/// connection is lost, and reconnecting goes on in the background.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use blockgraph::drivers::{NbdAddress, NbdOptions};
///
/// let opts = NbdOptions::parse_uri("nbd+unix:///disk?socket=/run/nbd.sock")?
///     .reconnect_delay(Duration::from_secs(10));
/// assert_eq!(opts.address, NbdAddress::Unix("/run/nbd.sock".into()));
/// assert_eq!(opts.export, "disk");
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdOptions {
    /// The server's address.
    pub address: NbdAddress,
    /// The export name (empty: the server's default export).
    pub export: String,
    /// Open read-only even if the server allows writes.
    pub read_only: bool,
    /// How long requests wait for a lost connection to come back before
    /// they fail (QEMU's `reconnect-delay`; default 0).
    pub reconnect_delay: Duration,
    /// Pause between two connection attempts after a loss (default 1 s;
    /// the first attempt is immediate).
    pub reconnect_interval: Duration,
    /// Attempts in a row before the driver gives up for good (`None`:
    /// never gives up, the default, as QEMU).
    pub reconnect_attempts: Option<u32>,
    /// Time allowed for connecting and the handshake, on open and on each
    /// reconnect attempt (QEMU's `open-timeout` for the first; default
    /// 10 s).
    pub connect_timeout: Duration,
    /// A request with no reply after this long marks the connection as
    /// lost (then reconnecting applies; default 60 s; zero: no timeout).
    pub request_timeout: Duration,
    /// Every write asks the server for `FUA` (durable before it is
    /// acknowledged), or is followed by a flush if the server cannot
    /// (writethrough; default off).
    pub write_through: bool,
}

impl NbdOptions {
    /// Options for `export` on the server at `address`, with the defaults.
    pub fn new(address: NbdAddress, export: impl Into<String>) -> Self {
        NbdOptions {
            address,
            export: export.into(),
            read_only: false,
            reconnect_delay: Duration::ZERO,
            reconnect_interval: Duration::from_secs(1),
            reconnect_attempts: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            write_through: false,
        }
    }

    /// Sets [`read_only`](Self::read_only).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets [`reconnect_delay`](Self::reconnect_delay).
    pub fn reconnect_delay(mut self, delay: Duration) -> Self {
        self.reconnect_delay = delay;
        self
    }

    /// Sets [`reconnect_interval`](Self::reconnect_interval).
    pub fn reconnect_interval(mut self, interval: Duration) -> Self {
        self.reconnect_interval = interval;
        self
    }

    /// Sets [`reconnect_attempts`](Self::reconnect_attempts).
    pub fn reconnect_attempts(mut self, attempts: Option<u32>) -> Self {
        self.reconnect_attempts = attempts;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`write_through`](Self::write_through).
    pub fn write_through(mut self, on: bool) -> Self {
        self.write_through = on;
        self
    }

    /// Whether `name` is an NBD file name: a URI (`nbd://`, `nbd+tcp://`,
    /// `nbd+unix://`) or QEMU's legacy `nbd:` syntax.
    pub fn is_nbd_filename(name: &str) -> bool {
        name.starts_with("nbd:") || name.starts_with("nbd+")
    }

    /// Parses QEMU's NBD file names:
    ///
    /// - `nbd://host[:port]/[export]` and `nbd+tcp://…` (TCP; default port
    ///   10809; IPv6 hosts in brackets);
    /// - `nbd+unix:///[export]?socket=/path` (Unix socket);
    /// - the legacy `nbd:unix:/path[:exportname=name]` and
    ///   `nbd:host:port[:exportname=name]`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for anything else: another scheme, TLS
    /// (`nbds://`), a Unix URI without `socket=`, a TCP URI with a socket,
    /// unknown query parameters, a bad port.
    ///
    /// # Examples
    ///
    /// ```
    /// use blockgraph::drivers::{NbdAddress, NbdOptions};
    ///
    /// let o = NbdOptions::parse_uri("nbd://example.com:10810/vm1")?;
    /// assert_eq!(o.address, NbdAddress::Tcp { host: "example.com".into(), port: 10810 });
    /// assert_eq!(o.export, "vm1");
    /// let o = NbdOptions::parse_uri("nbd:unix:/tmp/s.sock:exportname=d0")?;
    /// assert_eq!((o.address, o.export.as_str()), (NbdAddress::Unix("/tmp/s.sock".into()), "d0"));
    /// assert!(NbdOptions::parse_uri("nbds://host/x").is_err());
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn parse_uri(name: &str) -> Result<NbdOptions> {
        let bad = |why: &str| Error::InvalidArgument(format!("NBD file name '{name}': {why}"));
        let (transport, rest) = if let Some(r) = name.strip_prefix("nbd://") {
            ("tcp", r)
        } else if let Some(r) = name.strip_prefix("nbd+tcp://") {
            ("tcp", r)
        } else if let Some(r) = name.strip_prefix("nbd+unix://") {
            ("unix", r)
        } else if let Some(r) = name.strip_prefix("nbd:") {
            if r.starts_with("//") || name.starts_with("nbds") {
                return Err(bad("unsupported URI"));
            }
            return Self::parse_legacy(name, r);
        } else {
            return Err(bad("not an NBD URI (nbd://, nbd+unix://, nbd:)"));
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in export name"))?;
        let mut socket = None;
        for param in query.into_iter().flat_map(|q| q.split('&')) {
            match param.split_once('=') {
                Some(("socket", v)) => {
                    socket = Some(percent_decode(v).ok_or_else(|| bad("bad %-escape"))?)
                }
                _ => return Err(bad(&format!("unknown parameter '{param}'"))),
            }
        }
        let address = if transport == "unix" {
            if !authority.is_empty() {
                return Err(bad("a Unix URI has no host (nbd+unix:///export?socket=…)"));
            }
            NbdAddress::Unix(
                socket
                    .ok_or_else(|| bad("missing ?socket="))
                    .map(PathBuf::from)?,
            )
        } else {
            if socket.is_some() {
                return Err(bad("socket= is for nbd+unix://"));
            }
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host:port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            NbdAddress::Tcp {
                host,
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(NbdOptions::new(address, export))
    }

    /// `nbd:unix:/path[:exportname=x]` or `nbd:host:port[:exportname=x]`
    /// (`rest` is after `nbd:`).
    fn parse_legacy(name: &str, rest: &str) -> Result<NbdOptions> {
        let bad = |why: &str| Error::InvalidArgument(format!("NBD file name '{name}': {why}"));
        let (main, export) = match rest.find(":exportname=") {
            Some(i) => (&rest[..i], &rest[i + ":exportname=".len()..]),
            None => (rest, ""),
        };
        let address = if let Some(path) = main.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("missing socket path"));
            }
            NbdAddress::Unix(PathBuf::from(path))
        } else {
            let (host, port) = main
                .rsplit_once(':')
                .ok_or_else(|| bad("expected nbd:host:port or nbd:unix:path"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            NbdAddress::Tcp {
                host: host.to_owned(),
                port: port.parse().map_err(|_| bad("bad port"))?,
            }
        };
        Ok(NbdOptions::new(address, export))
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_owned(), port));
    }
    match s.split_once(':') {
        Some((h, p)) => Some((h.to_owned(), Some(p.parse().ok()?))),
        None => Some((s.to_owned(), None)),
    }
}

/// Decodes `%XX` escapes; `None` on a malformed one or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use crate::drivers::nbd::options::{NbdAddress, NbdOptions};

    fn parse(s: &str) -> (NbdAddress, String) {
        let o = NbdOptions::parse_uri(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (o.address, o.export)
    }

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn uris() {
        assert_eq!(parse("nbd://h/e"), (tcp("h", 10809), "e".into()));
        assert_eq!(parse("nbd://h:1234"), (tcp("h", 1234), "".into()));
        assert_eq!(parse("nbd+tcp://h:1/"), (tcp("h", 1), "".into()));
        assert_eq!(
            parse("nbd://[::1]:99/a%20b"),
            (tcp("::1", 99), "a b".into())
        );
        assert_eq!(parse("nbd://[::1]/x"), (tcp("::1", 10809), "x".into()));
        assert_eq!(
            parse("nbd+unix:///d0?socket=/tmp/a.sock"),
            (NbdAddress::Unix("/tmp/a.sock".into()), "d0".into())
        );
        assert_eq!(
            parse("nbd+unix://?socket=/s"),
            (NbdAddress::Unix("/s".into()), "".into())
        );
    }

    #[test]
    fn legacy() {
        assert_eq!(parse("nbd:h:10"), (tcp("h", 10), "".into()));
        assert_eq!(
            parse("nbd:h:10:exportname=e:x"),
            (tcp("h", 10), "e:x".into())
        );
        assert_eq!(
            parse("nbd:unix:/a/b.sock"),
            (NbdAddress::Unix("/a/b.sock".into()), "".into())
        );
        assert_eq!(
            parse("nbd:unix:/a/b.sock:exportname=x"),
            (NbdAddress::Unix("/a/b.sock".into()), "x".into())
        );
    }

    #[test]
    fn refused() {
        for s in [
            "file.img",
            "nbds://h/e",
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "nbd://h/e?socket=/s",
            "nbd://h:99999/e",
            "nbd://h/e?tls=1",
            "nbd://:1/e",
            "nbd://h/%zz",
            "nbd:unix:",
            "nbd:h",
            "nbd:h:port",
        ] {
            assert!(NbdOptions::parse_uri(s).is_err(), "{s} accepted");
        }
    }

    #[test]
    fn display() {
        assert_eq!(tcp("::1", 5).to_string(), "[::1]:5");
        assert_eq!(NbdAddress::Unix("/s".into()).to_string(), "unix:/s");
    }
}
