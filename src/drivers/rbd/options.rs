//! What an RBD node opens ([`RbdOptions`]), QEMU's `rbd:` file name syntax,
//! and the secret key type that never prints itself ([`RbdSecret`]).

use std::fmt;
use std::path::PathBuf;

use crate::types::{Error, Result};

/// A cephx secret (a base64 key), kept out of every printout.
///
/// `Debug` prints `RbdSecret(<redacted>)` and there is no `Display`; the
/// bytes are overwritten with zeroes when it is dropped. The only way to the
/// key is [`RbdSecret::expose`], which the driver calls once, to hand it to
/// librados.
///
/// # Examples
///
/// ```
/// use blockgraph::drivers::RbdSecret;
///
/// let key = RbdSecret::new("AQBxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx==");
/// assert_eq!(format!("{key:?}"), "RbdSecret(<redacted>)");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RbdSecret(Vec<u8>);

impl RbdSecret {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        RbdSecret(key.into().into_bytes())
    }

    /// Whether it has the shape of a cephx key: base64 of Ceph's
    /// `CryptoKey` encoding (type 1 = AES, creation time, a 16-byte
    /// secret). librados writes a key it cannot decode into its log, so
    /// the driver refuses a malformed key before handing it over.
    pub fn is_well_formed(&self) -> bool {
        match base64_decode(&self.0) {
            Some(b) => {
                b.len() == 28
                    && u16::from_le_bytes([b[0], b[1]]) == 1
                    && u16::from_le_bytes([b[10], b[11]]) == 16
            }
            None => false,
        }
    }

    /// The key itself. Do not print it.
    pub fn expose(&self) -> &str {
        // Built from a `String` only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for RbdSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RbdSecret(<redacted>)")
    }
}

impl Drop for RbdSecret {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keep the zeroing from being optimised away as a dead store.
        std::hint::black_box(&self.0);
    }
}

/// Standard base64 with padding; `None` for anything else.
fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() % 4 != 0 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let chunks = s.len() / 4;
    for (i, q) in s.chunks(4).enumerate() {
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for c in &q[..4 - pad] {
            n = n << 6 | value(*c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Ceph configuration keys whose values are credentials: never printed,
/// wherever they come from (an `rbd:` file name's `:key=…`, or
/// [`RbdOptions::set`]).
fn is_secret_key(key: &str) -> bool {
    let k = key.replace('-', "_");
    k == "key" || k.contains("secret")
}

/// What an RBD node opens: which image, and how to reach the cluster.
///
/// Field for field QEMU's `BlockdevOptionsRbd` (`pool`, `namespace`,
/// `image`, `snapshot`, `conf`, `user`), plus the key as an [`RbdSecret`]
/// (QEMU's `key-secret` names a secret object holding it), a `keyring`
/// file, and further Ceph configuration options (what an `rbd:` file name
/// carries after the image, such as `mon_host`).
///
/// Where the configuration and credentials come from, in librados' order
/// (later wins): the configuration file [`conf`](Self::conf), or, without
/// one, Ceph's default search (`$CEPH_CONF`, `/etc/ceph/ceph.conf`,
/// `~/.ceph/config`, `./ceph.conf`); then `CEPH_ARGS` from the environment;
/// then the options here. The key is the keyring's entry for
/// `client.<user>` (the configuration's `keyring`, by default
/// `/etc/ceph/ceph.client.<user>.keyring` and friends) unless
/// [`key`](Self::key) gives it.
///
/// `Debug` shows everything except secrets: the key, and any option in
/// [`extra`](Self::extra) whose name is `key` or contains `secret`, print as
/// `<redacted>`.
///
/// # Examples
///
/// ```
/// use blockgraph::drivers::RbdOptions;
///
/// let o = RbdOptions::parse_filename("rbd:pool/ns/disk@snap1:conf=/etc/ceph/x.conf:id=qemu:key=c2VjcmV0")?;
/// assert_eq!((o.pool.as_str(), o.namespace.as_deref(), o.image.as_str()), ("pool", Some("ns"), "disk"));
/// assert_eq!(o.snapshot.as_deref(), Some("snap1"));
/// assert_eq!(o.user.as_deref(), Some("qemu"));
/// assert!(o.key.is_some());
/// assert!(!format!("{o:?}").contains("c2VjcmV0"));
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (none: the default namespace).
    pub namespace: Option<String>,
    /// The image's name.
    pub image: String,
    /// A snapshot to open instead of the image's head (always read-only).
    pub snapshot: Option<String>,
    /// The Ceph configuration file (none: Ceph's default search).
    pub conf: Option<PathBuf>,
    /// The Ceph user, without `client.` (none: `admin`).
    pub user: Option<String>,
    /// The user's cephx key (none: from the keyring).
    pub key: Option<RbdSecret>,
    /// A keyring file to find the key in.
    pub keyring: Option<PathBuf>,
    /// Further Ceph configuration options, set in this order after the
    /// file is read (`mon_host`, `auth_client_required`, …).
    pub extra: Vec<(String, String)>,
    /// Open without write access (a snapshot is read-only anyway).
    pub read_only: bool,
}

impl RbdOptions {
    /// Options for `pool/image`, everything else from Ceph's defaults.
    pub fn new(pool: impl Into<String>, image: impl Into<String>) -> Self {
        RbdOptions {
            pool: pool.into(),
            image: image.into(),
            ..Self::default()
        }
    }

    /// Adds a Ceph configuration option; `key`/`id`/`conf`/`keyring` (and
    /// their dashed forms) go to their fields instead.
    pub fn set(&mut self, key: &str, value: &str) {
        match key {
            "conf" => self.conf = Some(value.into()),
            "id" | "user" => self.user = Some(value.to_owned()),
            "key" => self.key = Some(RbdSecret::new(value)),
            "keyring" => self.keyring = Some(value.into()),
            _ => self.extra.push((key.to_owned(), value.to_owned())),
        }
    }

    /// Parses QEMU's `rbd:` file name,
    /// `rbd:pool[/namespace]/image[@snapshot][:option=value[:option=value...]]`
    /// (`block/rbd.c`'s `qemu_rbd_parse_filename`): a backslash escapes
    /// the next character (`\:`, `\@`, `\/`, `\\`); `id` is the user,
    /// `conf` the configuration file, `key` the key, `keyring` the keyring,
    /// every other option a Ceph configuration option.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the prefix, the pool or the image is
    /// missing, or an option has no `=`. The message never contains an
    /// option's value.
    pub fn parse_filename(filename: &str) -> Result<RbdOptions> {
        let bad = |why: &str| Error::InvalidArgument(format!("rbd file name: {why}"));
        let rest = filename
            .strip_prefix("rbd:")
            .ok_or_else(|| bad("it does not start with 'rbd:'"))?;
        let (path, opts) = split_once(rest, ':');
        let names = split_all(&path, '/');
        let (image_snap, pool, ns) = match names.as_slice() {
            [pool, image] => (image, pool, None),
            [pool, ns, image] => (image, pool, Some(ns)),
            _ => return Err(bad("expected pool/image or pool/namespace/image")),
        };
        let (image, snap) = split_once(image_snap, '@');
        let mut o = RbdOptions {
            pool: unescape(pool),
            namespace: ns.map(|n| unescape(n)),
            image: unescape(&image),
            snapshot: snap.map(|s| unescape(&s)),
            ..RbdOptions::default()
        };
        if o.pool.is_empty() || o.image.is_empty() {
            return Err(bad("the pool or the image name is empty"));
        }
        if let Some(opts) = opts {
            for pair in split_all(&opts, ':') {
                let (key, value) = split_once(&pair, '=');
                let key = unescape(&key);
                let Some(value) = value else {
                    return Err(bad(&format!("option '{key}' has no value")));
                };
                o.set(&key, &unescape(&value));
            }
        }
        Ok(o)
    }

    /// The image as an `rbd:` file name without credentials or options
    /// other than `conf` (what `describe` and node info show):
    /// `rbd:pool[/namespace]/image[@snapshot][:conf=…]`.
    pub fn display_name(&self) -> String {
        let mut s = format!("rbd:{}", escape(&self.pool));
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(&escape(ns));
        }
        s.push('/');
        s.push_str(&escape(&self.image));
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(&escape(snap));
        }
        if let Some(conf) = &self.conf {
            s.push_str(":conf=");
            // In an option's value only `:` (and `\`) separate.
            s.push_str(&escape_value(&conf.display().to_string()));
        }
        s
    }
}

impl fmt::Debug for RbdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_key(k) { "<redacted>" } else { v };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("RbdOptions")
            .field("pool", &self.pool)
            .field("namespace", &self.namespace)
            .field("image", &self.image)
            .field("snapshot", &self.snapshot)
            .field("conf", &self.conf)
            .field("user", &self.user)
            .field("key", &self.key)
            .field("keyring", &self.keyring)
            .field("extra", &extra)
            .field("read_only", &self.read_only)
            .finish()
    }
}

pub(super) fn is_secret_option(key: &str) -> bool {
    is_secret_key(key)
}

/// Splits `s` (still escaped) at its unescaped `sep`s.
fn split_all(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == sep {
            parts.push(String::new());
            continue;
        }
        let part = parts.last_mut().expect("parts is never empty");
        part.push(c);
        if c == '\\' {
            if let Some(n) = chars.next() {
                part.push(n);
            }
        }
    }
    parts
}

/// Splits `s` (still escaped) at its first unescaped `sep`.
fn split_once(s: &str, sep: char) -> (String, Option<String>) {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            return (s[..i].to_owned(), Some(s[i + c.len_utf8()..].to_owned()));
        }
    }
    (s.to_owned(), None)
}

/// Removes the escaping backslashes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ':' | '@' | '/') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::drivers::rbd::options::{RbdOptions, RbdSecret};

    #[test]
    fn parses_qemu_file_names() {
        let o = RbdOptions::parse_filename("rbd:p/i").unwrap();
        assert_eq!((o.pool.as_str(), o.image.as_str()), ("p", "i"));
        assert_eq!((o.namespace, o.snapshot, o.conf), (None, None, None));

        let o = RbdOptions::parse_filename(
            "rbd:p/n/i@s:conf=/x/c.conf:id=u:mon_host=127.0.0.1\\:6789:key=SECRET",
        )
        .unwrap();
        assert_eq!(o.namespace.as_deref(), Some("n"));
        assert_eq!(o.snapshot.as_deref(), Some("s"));
        assert_eq!(o.conf.as_deref(), Some(std::path::Path::new("/x/c.conf")));
        assert_eq!(o.user.as_deref(), Some("u"));
        assert_eq!(
            o.extra,
            vec![("mon_host".to_owned(), "127.0.0.1:6789".to_owned())]
        );
        assert_eq!(o.key.as_ref().map(RbdSecret::expose), Some("SECRET"));
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");

        // Escapes in names.
        let o = RbdOptions::parse_filename("rbd:p/we\\@ird\\:name").unwrap();
        assert_eq!(o.image, "we@ird:name");
        assert_eq!(o.display_name(), "rbd:p/we\\@ird\\:name");
        let mut o = RbdOptions::new("p", "i");
        o.conf = Some("/etc/ceph/a:b.conf".into());
        assert_eq!(o.display_name(), "rbd:p/i:conf=/etc/ceph/a\\:b.conf");
        assert_eq!(
            RbdOptions::parse_filename(&o.display_name()).unwrap().conf,
            o.conf
        );
        assert_eq!(
            RbdOptions::parse_filename(&o.display_name()).unwrap().image,
            o.image
        );
    }

    #[test]
    fn refuses_malformed_names_without_echoing_values() {
        for bad in ["p/i", "rbd:", "rbd:p", "rbd:/i", "rbd:p/", "rbd:a/b/c/d"] {
            assert!(RbdOptions::parse_filename(bad).is_err(), "{bad}");
        }
        let e = RbdOptions::parse_filename("rbd:p/i:keyring").unwrap_err();
        assert!(e.to_string().contains("'keyring' has no value"), "{e}");
    }

    #[test]
    fn malformed_keys_are_recognised() {
        // `ceph-authtool --gen-print-key` output has this shape.
        assert!(RbdSecret::new("AQBDJw9rL04ODhAA09607n8ZIIcwAv34mMxL+A==").is_well_formed());
        for bad in [
            "",
            "not base64!",
            "AQBx1e5mAAAAABAAn0tR3allyAk3yN0tr3alQ==",
            "c2VjcmV0",
            "AQBDJw9rL04ODhAA09607n8ZIIcwAv34mMxL+A=",
        ] {
            assert!(!RbdSecret::new(bad).is_well_formed(), "{bad}");
        }
    }

    #[test]
    fn secret_extra_options_are_redacted() {
        let mut o = RbdOptions::new("p", "i");
        o.set("auth-secret", "HIDDEN1");
        o.set("mon_host", "127.0.0.1");
        let dbg = format!("{o:?}");
        assert!(
            !dbg.contains("HIDDEN1") && dbg.contains("127.0.0.1"),
            "{dbg}"
        );
    }
}
