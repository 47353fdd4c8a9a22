//! The command line, modelled on `qemu-storage-daemon`'s: the options in
//! the order given, each a QEMU keyval list (`key=value,...`, dotted keys
//! for nested objects, `,,` for a comma in a value) or, for `--blockdev`,
//! `--export` and `--nbd-server`, a JSON object.
//!
//! ```text
//! --blockdev driver=file,node-name=f0,filename=disk.qcow2
//! --blockdev '{"driver":"qcow2","node-name":"d0","file":"f0"}'
//! --object throttle-group,id=tg0,limits.iops-total=1000
//! --nbd-server addr.type=unix,addr.path=/tmp/nbd.sock
//! --export type=nbd,id=e0,node-name=d0,name=disk,writable=on
//! --chardev socket,id=m0,path=/tmp/qmp.sock,server=on,wait=off
//! --monitor chardev=m0
//! --pidfile /run/daemon.pid
//! ```
//!
//! Like QEMU's, the options are applied in order: a `--blockdev` may only
//! name nodes added before it, and an `--export` needs the `--nbd-server`
//! before it.

use serde_json::{Map, Value};

/// One option of the command line, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum CliOption {
    /// `--blockdev`: a node (keyval strings, or typed JSON).
    Blockdev(Value, bool),
    /// `--object`: a QOM object (only `throttle-group`).
    Object(Value),
    /// `--nbd-server`: the NBD server's address.
    NbdServer(Value, bool),
    /// `--export`: an export (keyval strings, or typed JSON).
    Export(Value, bool),
    /// `--chardev`: a character device (only `socket` with a `path`).
    Chardev(Value),
    /// `--monitor`: a QMP monitor on a character device.
    Monitor(Value),
    /// `--pidfile`: where to write the daemon's process id.
    Pidfile(String),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Cli {
    /// Run the daemon with these options, in order.
    Run(Vec<CliOption>),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

/// The help text.
pub const HELP: &str = "\
Usage: storage_daemon [options]
A QMP storage daemon over blockgraph, with qemu-storage-daemon's options.

  -h, --help                 show this help and exit
  -V, --version              show the version and exit
  --blockdev [driver=]<driver>,node-name=<name>[,<prop>=<value>...]
                             add a node (drivers: file, raw, qcow2, throttle,
                             copy-on-read, null-co); or a JSON object
  --object throttle-group,id=<id>[,limits.<limit>=<n>...]
                             add a throttle group
  --nbd-server addr.type=unix,addr.path=<path>
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
                             start the NBD server
  --export type=nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on|off]
                             export a node over NBD
  --chardev socket,id=<id>,path=<path>,server=on,wait=off
                             a Unix socket for a monitor
  --monitor [chardev=]<id>   a QMP monitor on that socket
  --pidfile <path>           write the process id to <path>

SIGTERM, SIGINT and QMP's `quit` close the exports, flush every node and exit.";

/// Parses `args` (without the program name).
pub fn parse(args: &[String]) -> Result<Cli, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        match name {
            "-h" | "--help" => return Ok(Cli::Help),
            "-V" | "--version" => return Ok(Cli::Version),
            _ => {}
        }
        let takes_value = matches!(
            name,
            "--blockdev"
                | "--object"
                | "--nbd-server"
                | "--export"
                | "--chardev"
                | "--monitor"
                | "--pidfile"
        );
        if !takes_value {
            return Err(format!("unrecognized option '{arg}' (see --help)"));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let v = args
                    .get(i)
                    .ok_or_else(|| format!("option '{name}' needs an argument"))?;
                i += 1;
                v.clone()
            }
        };
        let json_or_keyval = |implied: Option<&str>| -> Result<(Value, bool), String> {
            if value.trim_start().starts_with('{') {
                serde_json::from_str::<Value>(&value)
                    .map(|v| (v, false))
                    .map_err(|e| format!("{name}: invalid JSON: {e}"))
            } else {
                keyval(&value, implied).map(|v| (v, true))
            }
        };
        out.push(match name {
            "--blockdev" => {
                let (v, k) = json_or_keyval(Some("driver"))?;
                CliOption::Blockdev(v, k)
            }
            "--object" => CliOption::Object(keyval(&value, Some("qom-type"))?),
            "--nbd-server" => {
                let (v, k) = json_or_keyval(None)?;
                CliOption::NbdServer(v, k)
            }
            "--export" => {
                let (v, k) = json_or_keyval(Some("type"))?;
                CliOption::Export(v, k)
            }
            "--chardev" => CliOption::Chardev(keyval(&value, Some("backend"))?),
            "--monitor" => CliOption::Monitor(keyval(&value, Some("chardev"))?),
            _ => CliOption::Pidfile(value),
        });
    }
    Ok(Cli::Run(out))
}

/// Parses a QEMU keyval list into a JSON object of strings: `a=1,b.c=x`
/// is `{"a": "1", "b": {"c": "x"}}`; `,,` is a literal comma; a first
/// element without `=` is the value of the `implied` key.
pub fn keyval(s: &str, implied: Option<&str>) -> Result<Value, String> {
    let mut root = Map::new();
    let mut rest = s;
    let mut first = true;
    while !rest.is_empty() {
        // The key runs to '=' or ',' (keys contain neither).
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let (key, value);
        if rest[key_end..].starts_with('=') {
            key = rest[..key_end].to_owned();
            let (v, after) = keyval_value(&rest[key_end + 1..]);
            value = v;
            rest = after;
        } else {
            // No '=': the implied key's value (first element only).
            let Some(implied) = implied.filter(|_| first) else {
                return Err(format!(
                    "expected '=' after parameter '{}'",
                    &rest[..key_end]
                ));
            };
            let (v, after) = keyval_value(rest);
            key = implied.to_owned();
            value = v;
            rest = after;
        }
        first = false;
        if key.is_empty() {
            return Err(format!("invalid parameter '' in '{s}'"));
        }
        insert_dotted(&mut root, &key, value)?;
    }
    Ok(Value::Object(root))
}

/// Reads a value up to an unescaped ',' and returns it with the rest after
/// that comma.
fn keyval_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if matches!(chars.peek(), Some((_, ','))) {
                chars.next();
                value.push(',');
                continue;
            }
            return (value, &s[i + 1..]);
        }
        value.push(c);
    }
    (value, "")
}

fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: String) -> Result<(), String> {
    match key.split_once('.') {
        None => {
            if map.contains_key(key) {
                return Err(format!("parameter '{key}' is given twice"));
            }
            map.insert(key.to_owned(), Value::String(value));
            Ok(())
        }
        Some((head, tail)) => {
            let entry = map
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            match entry {
                Value::Object(inner) => insert_dotted(inner, tail, value),
                _ => Err(format!("parameter '{head}' is both a value and an object")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_lists_become_objects() {
        assert_eq!(
            keyval("socket,id=m0,path=/tmp/a,,b,server=on", Some("backend")).unwrap(),
            json!({"backend": "socket", "id": "m0", "path": "/tmp/a,b", "server": "on"})
        );
        assert_eq!(
            keyval("addr.type=unix,addr.path=/s", None).unwrap(),
            json!({"addr": {"type": "unix", "path": "/s"}})
        );
        assert!(keyval("a=1,a=2", None).is_err());
        assert!(keyval("novalue", None).is_err());
    }

    #[test]
    fn options_keep_their_order() {
        let args: Vec<String> = ["--blockdev", "driver=null-co,node-name=n0", "--monitor=m0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let Cli::Run(opts) = parse(&args).unwrap() else {
            panic!()
        };
        assert_eq!(opts.len(), 2);
        assert_eq!(opts[1], CliOption::Monitor(json!({"chardev": "m0"})));
        assert!(parse(&["--bogus".to_string()]).is_err());
    }
}
