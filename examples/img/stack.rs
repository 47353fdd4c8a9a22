//! Which drivers an image argument opens: the `--stack` syntax (layers top
//! to bottom), `-f`, or the format probed from the file's first bytes.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use blockgraph::drivers::{Aio, FaultRule, RawDriver, ThrottleConfig};

use crate::args::{parse_bool, parse_count, parse_kv, parse_size, Format};
use crate::output::{err, Res};

/// The stack syntax, for `--help`.
pub const HELP: &str = "\
Stacks (--stack): layers top to bottom, separated by '/', each NAME[:KEY=VALUE,...]:
  throttle:iops-total=N,bps-read=SIZE,...   (QEMU's throttle limits, with -max, -max-length)
  cor                                       copy-on-read
  fault:op=write,error=eio|enospc|delay-ms=N,offset=..,len=..,nth=N
  raw[:offset=SIZE,size=SIZE]               format over the file
  qcow2                                     format (and backing chain) over the file
  file[:direct=on,locking=off,aio=threads|io_uring]   the FILE argument
  null[:size=SIZE,delay-us=N] | memory[:size=SIZE]
A stack ending in raw or qcow2 gets a file below it; e.g.
  --stack throttle:iops-total=200/qcow2   or   --stack raw:offset=1M/null:size=1G";

/// One layer of a stack.
#[derive(Debug, Clone)]
pub enum Layer {
    Throttle(ThrottleConfig),
    Cor,
    Fault(FaultRule),
    Raw(u64, Option<u64>),
    Qcow2,
    File(FileLayer),
    Null { size: u64, delay: Duration },
    Memory(u64),
}

/// The `file` layer's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileLayer {
    pub direct: bool,
    pub no_locking: bool,
    /// `aio=`; `None`: io_uring where available.
    pub aio: Option<Aio>,
}

impl Layer {
    fn is_bottom(&self) -> bool {
        matches!(self, Layer::File(_) | Layer::Null { .. } | Layer::Memory(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Layer::Throttle(_) => "throttle",
            Layer::Cor => "cor",
            Layer::Fault(_) => "fault",
            Layer::Raw(..) => "raw",
            Layer::Qcow2 => "qcow2",
            Layer::File(_) => "file",
            Layer::Null { .. } => "null",
            Layer::Memory(_) => "memory",
        }
    }
}

fn parse_layer(spec: &str) -> Res<Layer> {
    let (name, opts) = spec.split_once(':').unwrap_or((spec, ""));
    let kv = parse_kv(opts);
    let pairs: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let no_opts = |layer: Layer| {
        if pairs.is_empty() {
            Ok(layer)
        } else {
            Err(format!("stack layer '{name}' takes no options"))
        }
    };
    let sized = |default: u64| -> Res<(u64, Vec<(&str, &str)>)> {
        let mut size = default;
        let mut rest = Vec::new();
        for (k, v) in &pairs {
            if *k == "size" {
                size = parse_size(&format!("{name}: size"), v)?;
            } else {
                rest.push((*k, *v));
            }
        }
        if size == 0 {
            return Err(format!("{name}: size must be positive"));
        }
        Ok((size, rest))
    };
    match name {
        "throttle" => Ok(Layer::Throttle(
            ThrottleConfig::from_options(&pairs).map_err(err)?,
        )),
        "cor" | "copy-on-read" => no_opts(Layer::Cor),
        "fault" => Ok(Layer::Fault(FaultRule::from_options(&pairs).map_err(err)?)),
        "raw" => {
            let raw = RawDriver::from_options(&pairs).map_err(err)?;
            Ok(Layer::Raw(raw.offset(), raw.size()))
        }
        "qcow2" => no_opts(Layer::Qcow2),
        "file" => {
            let mut f = FileLayer::default();
            for (k, v) in &pairs {
                match *k {
                    "direct" => f.direct = parse_bool("file: direct", v)?,
                    "locking" => f.no_locking = !parse_bool("file: locking", v)?,
                    "aio" => {
                        f.aio = Some(Aio::parse(v).ok_or_else(|| {
                            format!("file: aio must be 'threads' or 'io_uring', not '{v}'")
                        })?)
                    }
                    _ => return Err(format!("file: unknown option '{k}' (direct, locking, aio)")),
                }
            }
            Ok(Layer::File(f))
        }
        "null" => {
            let (size, rest) = sized(1 << 30)?;
            let mut delay = Duration::ZERO;
            for (k, v) in rest {
                match k {
                    "delay-us" => {
                        delay =
                            Duration::from_micros(parse_count("null: delay-us", v, 0, 10_000_000)?)
                    }
                    _ => return Err(format!("null: unknown option '{k}' (size, delay-us)")),
                }
            }
            Ok(Layer::Null { size, delay })
        }
        "memory" => {
            let (size, rest) = sized(64 << 20)?;
            if let Some((k, _)) = rest.first() {
                return Err(format!("memory: unknown option '{k}' (size)"));
            }
            if size > 16 << 30 {
                return Err("memory: size must be at most 16 GiB".into());
            }
            Ok(Layer::Memory(size))
        }
        "" => Err("empty stack layer (two '/' in a row?)".into()),
        other => Err(format!(
            "unknown stack layer '{other}' (throttle, cor, fault, raw, qcow2, file, null, memory)"
        )),
    }
}

/// A `--stack` argument, parsed and completed: formats get a `file` below
/// them.
#[derive(Debug, Clone)]
pub struct Stack(pub Vec<Layer>);

impl Stack {
    pub fn parse(spec: &str) -> Res<Stack> {
        let mut layers = spec.split('/').map(parse_layer).collect::<Res<Vec<_>>>()?;
        match layers.last() {
            Some(Layer::Raw(..) | Layer::Qcow2) => layers.push(Layer::File(FileLayer::default())),
            Some(l) if l.is_bottom() => {}
            _ => {
                return Err(format!(
                    "stack '{spec}' must end in raw, qcow2, file, null or memory"
                ))
            }
        }
        for (i, l) in layers.iter().enumerate() {
            let last = i + 1 == layers.len();
            if l.is_bottom() && !last {
                return Err(format!(
                    "stack '{spec}': '{}' must be the last layer",
                    l.name()
                ));
            }
            if matches!(l, Layer::Qcow2) && !matches!(layers.get(i + 1), Some(Layer::File(_))) {
                return Err(format!("stack '{spec}': qcow2 must sit directly on a file"));
            }
        }
        Ok(Stack(layers))
    }
}

/// `--stack`, for the subcommands that take any stack as well as an image.
#[derive(clap::Args, Debug)]
#[command(after_help = HELP)]
pub struct StackArg {
    /// Open the image through this stack (syntax below) instead of -f
    #[arg(long, value_name = "STACK", allow_hyphen_values = true,
          value_parser = Stack::parse, conflicts_with = "format")]
    pub stack: Option<Stack>,
}

impl StackArg {
    /// The layers to open: the stack, or the image at `path` (with `format`
    /// or probed).
    pub fn layers(&self, format: Option<Format>, path: Option<&Path>) -> Res<Vec<Layer>> {
        image_layers(self.stack.as_ref(), format, path)
    }
}

/// The format of `path` from its first bytes.
pub fn probe(path: &Path) -> Res<Format> {
    // An NBD export is raw unless `-f` says otherwise.
    #[cfg(feature = "nbd-client")]
    if path
        .to_str()
        .is_some_and(blockgraph::drivers::NbdOptions::is_nbd_filename)
    {
        return Ok(Format::Raw);
    }
    // An RBD image (`rbd:pool/image`) is taken as raw unless `-f` says
    // otherwise; it has no local file to read the magic from.
    if path.to_str().is_some_and(|s| s.starts_with("rbd:")) {
        return Ok(Format::Raw);
    }
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open '{}': {e}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(|e| format!("cannot read '{}': {e}", path.display()))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// `format`, or the format probed from `path`.
pub fn format_of(format: Option<Format>, path: &Path) -> Res<Format> {
    match format {
        Some(f) => Ok(f),
        None => probe(path),
    }
}

/// The layers for an image argument: `--stack`, `-f`, or probed. (Clap
/// refuses `--stack` together with `-f`.)
pub fn image_layers(
    stack: Option<&Stack>,
    format: Option<Format>,
    path: Option<&Path>,
) -> Res<Vec<Layer>> {
    if let Some(stack) = stack {
        return Ok(stack.0.clone());
    }
    let path = path.ok_or("no image given (a FILE, or a --stack ending in null or memory)")?;
    Ok(match format_of(format, path)? {
        Format::Raw => vec![Layer::Raw(0, None), Layer::File(FileLayer::default())],
        Format::Qcow2 => vec![Layer::Qcow2, Layer::File(FileLayer::default())],
    })
}
