//! QMP's dirty bitmap commands: `block-dirty-bitmap-add`, `-remove`,
//! `-clear`, `-enable`, `-disable`, `-merge`, with QEMU's arguments
//! (`qapi/block-core.json`); the daemon applies them with the library's
//! `NodeRef` bitmap verbs (`daemon/bitmaps.rs`).

use serde_json::{json, Value};

use crate::daemon::{BitmapAdd, BitmapRef, BitmapVerb, Daemon};
use crate::opts::{Opts, QResult, QmpError};

/// QAPI's `uint32`: "Parameter 'x' expects uint32_t" out of range,
/// "... expects uint64" for what is not a number (QEMU's words, found by
/// asking it).
fn uint32(o: &mut Opts, key: &str) -> QResult<Option<u64>> {
    match o.take(key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= u64::from(u32::MAX) => Ok(Some(v)),
            _ => Err(QmpError::generic(format!(
                "Parameter '{}' expects uint32_t",
                o.path(key)
            ))),
        },
        Some(Value::String(s)) if o.is_keyval() => {
            s.parse::<u32>().map(|v| Some(u64::from(v))).map_err(|_| {
                QmpError::generic(format!("Parameter '{}' expects uint32_t", o.path(key)))
            })
        }
        // QEMU's visitor for unsigned members says so for any other type.
        Some(_) => Err(QmpError::generic(format!(
            "Parameter '{}' expects uint64",
            o.path(key)
        ))),
    }
}

/// `block-dirty-bitmap-add`.
pub fn add(d: &mut Daemon, o: Opts) -> QResult<Value> {
    d.bitmap_add(add_spec(o)?)?;
    Ok(json!({}))
}

/// `block-dirty-bitmap-add`'s arguments (also a `transaction` action's).
pub fn add_spec(mut o: Opts) -> QResult<BitmapAdd> {
    let spec = BitmapAdd {
        node: o.req_str("node")?,
        name: o.req_str("name")?,
        granularity: uint32(&mut o, "granularity")?,
        persistent: o.bool("persistent")?.unwrap_or(false),
        disabled: o.bool("disabled")?.unwrap_or(false),
    };
    o.finish()?;
    Ok(spec)
}

/// `node` and `name` (QAPI's `BlockDirtyBitmap`).
pub fn node_and_name(mut o: Opts) -> QResult<(String, String)> {
    let node = o.req_str("node")?;
    let name = o.req_str("name")?;
    o.finish()?;
    Ok((node, name))
}

/// One of the verbs that take `node` and `name` only.
fn verb(d: &mut Daemon, o: Opts, verb: BitmapVerb) -> QResult<Value> {
    let (node, name) = node_and_name(o)?;
    d.bitmap_verb(&node, &name, verb)?;
    Ok(json!({}))
}

/// `block-dirty-bitmap-remove`.
pub fn remove(d: &mut Daemon, o: Opts) -> QResult<Value> {
    verb(d, o, BitmapVerb::Remove)
}

/// `block-dirty-bitmap-clear`.
pub fn clear(d: &mut Daemon, o: Opts) -> QResult<Value> {
    verb(d, o, BitmapVerb::Clear)
}

/// `block-dirty-bitmap-enable`.
pub fn enable(d: &mut Daemon, o: Opts) -> QResult<Value> {
    verb(d, o, BitmapVerb::Enable)
}

/// `block-dirty-bitmap-disable`.
pub fn disable(d: &mut Daemon, o: Opts) -> QResult<Value> {
    verb(d, o, BitmapVerb::Disable)
}

/// `block-dirty-bitmap-merge`: `bitmaps` is a list of names (bitmaps of
/// `node`) or `{node, name}` objects (QAPI's `BlockDirtyBitmapOrStr`).
pub fn merge(d: &mut Daemon, o: Opts) -> QResult<Value> {
    let (node, target, sources) = merge_spec(o)?;
    d.bitmap_merge(&node, &target, &sources)?;
    Ok(json!({}))
}

/// `block-dirty-bitmap-merge`'s arguments: node, target, sources.
pub fn merge_spec(mut o: Opts) -> QResult<(String, String, Vec<BitmapRef>)> {
    let node = o.req_str("node")?;
    let target = o.req_str("target")?;
    let Some(list) = o.array("bitmaps")? else {
        return Err(o.missing("bitmaps"));
    };
    let mut sources = Vec::new();
    for (i, item) in list.into_iter().enumerate() {
        match item {
            Value::String(name) => sources.push(BitmapRef {
                node: node.clone(),
                name,
            }),
            v @ Value::Object(_) => {
                let mut b = o.element("bitmaps", i, v)?;
                let source = BitmapRef {
                    node: b.req_str("node")?,
                    name: b.req_str("name")?,
                };
                b.finish()?;
                sources.push(source);
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{}[{i}]', expected: BlockDirtyBitmapOrStr",
                    o.path("bitmaps")
                )))
            }
        }
    }
    o.finish()?;
    Ok((node, target, sources))
}
