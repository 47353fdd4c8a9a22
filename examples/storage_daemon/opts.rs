//! QMP errors and typed access to a command's arguments, QAPI style: the
//! same checks and messages for a QMP `arguments` object and for a command
//! line's `key=value` list.
//!
//! QEMU checks arguments against a schema: a missing member is "Parameter
//! 'x' is missing", an unknown one "Parameter 'x' is unexpected", a wrong
//! type "Invalid parameter type for 'x', expected: integer". [`Opts`] gives
//! the same answers: a handler takes each member it knows and
//! [`Opts::finish`] refuses what is left. Command-line values (QEMU's
//! keyval syntax) are all strings; in that mode numbers and booleans are
//! parsed from them (`on`/`off`), as QEMU's keyval visitor does.

use serde_json::{Map, Value};

/// A QMP error: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// QEMU's error class: `GenericError` for almost everything,
    /// `CommandNotFound`, `DeviceNotFound`.
    pub class: &'static str,
    /// The human-readable message.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// The answer to a command this daemon does not have, word for word
    /// QEMU's.
    pub fn command_not_found(name: &str) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: format!("The command {name} has not been found"),
        }
    }

    /// The JSON form, `{"class": ..., "desc": ...}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "class": self.class, "desc": self.desc })
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.desc)
    }
}

/// A result whose error is a [`QmpError`].
pub type QResult<T> = Result<T, QmpError>;

/// A `blockgraph::Error` as QEMU would word the failure: a `GenericError`
/// with the library's message.
pub fn lib_err(e: blockgraph::Error) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The members of one argument object, taken one by one.
#[derive(Debug)]
pub struct Opts {
    map: Map<String, Value>,
    /// The dotted path of this object in the whole argument set, for
    /// messages (`addr.path`).
    prefix: String,
    /// Values are keyval strings (command line), not typed JSON.
    keyval: bool,
}

impl Opts {
    /// The arguments in `value`, which must be an object (or absent:
    /// `Value::Null` is an empty object).
    pub fn new(value: Value, keyval: bool) -> QResult<Opts> {
        Self::nested(value, String::new(), keyval)
    }

    fn nested(value: Value, prefix: String, keyval: bool) -> QResult<Opts> {
        match value {
            Value::Object(map) => Ok(Opts {
                map,
                prefix,
                keyval,
            }),
            Value::Null if prefix.is_empty() => Ok(Opts {
                map: Map::new(),
                prefix,
                keyval,
            }),
            _ => Err(QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: object",
                if prefix.is_empty() {
                    "arguments"
                } else {
                    &prefix
                }
            ))),
        }
    }

    /// Whether values are command-line strings.
    pub fn is_keyval(&self) -> bool {
        self.keyval
    }

    /// The full dotted name of member `key`.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn bad_type(&self, key: &str, expected: &str) -> QmpError {
        if self.keyval {
            QmpError::generic(format!("Parameter '{}' expects {expected}", self.path(key)))
        } else {
            QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: {expected}",
                self.path(key)
            ))
        }
    }

    /// Whether member `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Takes member `key` as it is.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// "Parameter 'x' is missing".
    pub fn missing(&self, key: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is missing", self.path(key)))
    }

    /// Takes a string member.
    pub fn str(&mut self, key: &str) -> QResult<Option<String>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad_type(key, "string")),
        }
    }

    /// Takes a string member that must be there.
    pub fn req_str(&mut self, key: &str) -> QResult<String> {
        self.str(key)?.ok_or_else(|| self.missing(key))
    }

    /// Takes a boolean member (`on`/`off`, `yes`/`no`, `true`/`false` on
    /// the command line).
    pub fn bool(&mut self, key: &str) -> QResult<Option<bool>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" => Ok(Some(true)),
                "off" | "no" | "false" => Ok(Some(false)),
                _ => Err(self.bad_type(key, "'on' or 'off'")),
            },
            Some(_) => Err(self.bad_type(key, "boolean")),
        }
    }

    /// Takes an unsigned integer member.
    pub fn u64(&mut self, key: &str) -> QResult<Option<u64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "uint64")),
            Some(Value::String(s)) if self.keyval => s
                .parse::<u64>()
                .map(Some)
                .map_err(|_| self.bad_type(key, "uint64")),
            Some(_) => Err(self.bad_type(key, "integer")),
        }
    }

    /// Takes a signed integer member (QAPI's `int`).
    pub fn i64(&mut self, key: &str) -> QResult<Option<i64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "int64")),
            Some(Value::String(s)) if self.keyval => s
                .parse::<i64>()
                .map(Some)
                .map_err(|_| self.bad_type(key, "int64")),
            Some(_) => Err(self.bad_type(key, "integer")),
        }
    }

    /// Takes an enumeration member: one of `values` (QAPI's "Parameter
    /// 'x' does not accept value 'y'" otherwise).
    pub fn enumeration(&mut self, key: &str, values: &[&str]) -> QResult<Option<String>> {
        match self.str(key)? {
            None => Ok(None),
            Some(v) if values.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{v}'",
                self.path(key)
            ))),
        }
    }

    /// Takes an array member.
    pub fn array(&mut self, key: &str) -> QResult<Option<Vec<Value>>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.bad_type(key, "array")),
        }
    }

    /// The object at `value`, member `key`'s element, as nested arguments
    /// (for messages: `actions[0].data.x`).
    pub fn element(&self, key: &str, index: usize, value: Value) -> QResult<Opts> {
        Opts::nested(value, format!("{}[{index}]", self.path(key)), self.keyval)
    }

    /// Takes a size member: an integer, or on the command line a number
    /// with a `k`/`M`/`G`/`T` suffix (powers of 1024), as QEMU's size type.
    pub fn size(&mut self, key: &str) -> QResult<Option<u64>> {
        match self.map.remove(key) {
            Some(Value::String(s)) if self.keyval => parse_size(&s)
                .map(Some)
                .ok_or_else(|| self.bad_type(key, "a non-negative number below 2^64")),
            Some(other) => {
                self.map.insert(key.to_owned(), other);
                self.u64(key)
            }
            None => Ok(None),
        }
    }

    /// Takes a nested object member.
    pub fn object(&mut self, key: &str) -> QResult<Option<Opts>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Opts::nested(v, self.path(key), self.keyval).map(Some),
            Some(_) => Err(self.bad_type(key, "object")),
        }
    }

    /// Takes a member that may be a string or an object (QAPI's
    /// alternates, such as `BlockdevRef`).
    pub fn str_or_object(&mut self, key: &str) -> QResult<Option<Result<String, Opts>>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(Ok(s))),
            Some(v @ Value::Object(_)) => {
                Opts::nested(v, self.path(key), self.keyval).map(|o| Some(Err(o)))
            }
            Some(_) => Err(self.bad_type(key, "BlockdevRef")),
        }
    }

    /// Refuses any member not taken: "Parameter 'x' is unexpected".
    pub fn finish(self) -> QResult<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.path(key)
            ))),
        }
    }
}

/// A size with an optional `k`, `M`, `G`, `T` (or `K`, `m`, `g`, `t`,
/// and `b` for bytes) suffix; `None` for anything else or an overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return None,
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_are_checked_like_qapi() {
        let mut o = Opts::new(json!({"a": "x", "n": 5, "b": true, "o": {"p": 1}}), false).unwrap();
        assert_eq!(o.req_str("a").unwrap(), "x");
        assert_eq!(o.u64("n").unwrap(), Some(5));
        assert!(o
            .req_str("zz")
            .unwrap_err()
            .desc
            .contains("'zz' is missing"));
        let mut inner = o.object("o").unwrap().unwrap();
        assert!(inner.str("p").unwrap_err().desc.contains("'o.p'"));
        assert_eq!(o.finish().unwrap_err().desc, "Parameter 'b' is unexpected");
        let mut k = Opts::new(json!({"w": "on", "s": "64k"}), true).unwrap();
        assert_eq!(k.bool("w").unwrap(), Some(true));
        assert_eq!(k.size("s").unwrap(), Some(65536));
        k.finish().unwrap();
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("99999999999999T"), None);
        assert_eq!(parse_size("x"), None);
    }
}
