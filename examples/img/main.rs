//! `img`: a `qemu-img`-like command line over blockgraph's driver stack.
//!
//! ```text
//! cargo run --release --example img -- help
//! cargo run --release --example img -- create -f qcow2 -o cluster_size=64k disk.qcow2 1G
//! cargo run --release --example img -- info --json disk.qcow2
//! cargo run --release --example img -- bench --stack throttle:iops-total=200/null:size=1G --time 2
//! ```
//!
//! Every failure is one line on stderr and a non-zero exit status; see
//! [`USAGE`] for the subcommands, the stack syntax and the exit codes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgraph::drivers::qcow2::{
    open_image_chain, BackingPolicy, ChainOptions, CreateOptions, FileOpener, SnapshotInfo,
};
use blockgraph::drivers::{
    CopyOnRead, FaultInjector, FaultRule, FileDriver, FileOptions, MemoryDriver, NullDriver,
    Qcow2Driver, Qcow2Options, RawDriver, ThrottleConfig, ThrottleDriver,
};
use blockgraph::{
    BackendOptions, BlockBackend, BlockDriver, BlockStatus, ChildRole, IoCx, IoThread, MainLoop,
    NodeHandle, Perm, Permissions,
};

const USAGE: &str = "\
usage: img <command> [options]

commands:
  create [-f raw|qcow2] [-o cluster_size=SIZE,compat=0.10|1.1] [-b BACKING [-F FMT]] FILE [SIZE]
      Create an image. SIZE may be left out with -b (the backing file's size).
  info [--json | --output=json] [--backing-chain] [-f FMT] [-U] FILE
      Format, virtual size, disk size, allocation, cluster size, snapshots,
      format-specific data and the backing chain (JSON as qemu-img info's;
      with --backing-chain an array, one object per image).
  check [-r leaks|all] [-f FMT] FILE
      Check (and repair) a qcow2 image's metadata.
  convert [-f FMT | --stack STACK] [-O raw|qcow2] [-o OPTIONS] [-U] SRC DST
      Copy any stack's contents into a new raw or qcow2 image (zeroes stay sparse).
  compare [-f FMT] [-F FMT] [-U] A B
      Compare two images' contents.
  resize [-f FMT] [--shrink] FILE [+|-]SIZE
      Change the virtual size (shrinking needs --shrink; qcow2 shrinks only
      over areas that hold no data, so discard them first).
  snapshot [-l | -c NAME | -a SNAPSHOT | -d SNAPSHOT] [-U] FILE
      List, create, apply (revert the disk to) or delete internal snapshots of
      a qcow2 image nobody is using; SNAPSHOT is an id or a name.
  bench [--stack STACK | -f FMT] [--rw read|write|randread|randwrite] [--bs SIZE]
        [--depth N] [--threads N] [--time SECS | --count N] [--warmup SECS]
        [--size SIZE] [FILE]
      Run I/O through a stack; print IOPS, throughput and latency percentiles.

common options:
  -f FMT                the image format (default: probed; qcow2 or raw)
  -U, --force-share     open images others are writing (no write lock conflict)
  --allow-absolute      let backing file names be absolute or leave the image's directory

stacks: layers top to bottom, separated by '/', each NAME[:KEY=VALUE,...]:
  throttle:iops-total=N,bps-read=SIZE,...   (QEMU's throttle limits, with -max, -max-length)
  cor                                       copy-on-read
  fault:op=write,error=eio|enospc|delay-ms=N,offset=..,len=..,nth=N
  raw[:offset=SIZE,size=SIZE]               format over the file
  qcow2                                     format (and backing chain) over the file
  file[:direct=on,locking=off]              the FILE argument
  null[:size=SIZE,delay-us=N] | memory[:size=SIZE]
A stack ending in raw or qcow2 gets a file below it; e.g.
  --stack throttle:iops-total=200/qcow2   or   --stack raw:offset=1M/null:size=1G

sizes take k, M, G, T suffixes (powers of 1024).
exit status: 0 success; 1 error; compare: 1 different, 2 error;
check: 2 corruptions, 3 leaks only, 63 format without checks.";

type Res<T> = Result<T, String>;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("img: internal error (this is a bug): {info}");
    }));
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A panic is a bug; the hook above printed it on one line.
    let code = std::panic::catch_unwind(|| run(&args)).unwrap_or(70);
    std::process::exit(code);
}

fn run(args: &[String]) -> i32 {
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("img: missing command (try 'img help')");
        return 1;
    };
    let result = match cmd.as_str() {
        "create" => cmd_create(rest),
        "info" => cmd_info(rest),
        "check" => cmd_check(rest),
        "convert" => cmd_convert(rest),
        "compare" => cmd_compare(rest).map_err(|e| (e, 2)),
        "resize" => cmd_resize(rest),
        "snapshot" => cmd_snapshot(rest),
        "bench" => cmd_bench(rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err((format!("unknown command '{other}' (try 'img help')"), 1)),
    };
    match result {
        Ok(code) => code,
        Err((msg, code)) => {
            eprintln!("img: {}", msg.replace('\n', " "));
            code
        }
    }
}

/// Commands report errors as `(message, exit code)`; most use 1.
trait OrExit<T> {
    fn or_exit(self) -> Result<T, (String, i32)>;
}

impl<T> OrExit<T> for Res<T> {
    fn or_exit(self) -> Result<T, (String, i32)> {
        self.map_err(|e| (e, 1))
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

// ---- argument parsing ------------------------------------------------------

/// One option a command accepts: canonical name, spellings, takes a value.
type OptSpec = (&'static str, &'static [&'static str], bool);

const COMMON: &[OptSpec] = &[
    ("format", &["-f", "--format"], true),
    ("force-share", &["-U", "--force-share"], false),
    ("allow-absolute", &["--allow-absolute"], false),
];

struct Args {
    values: HashMap<&'static str, String>,
    flags: Vec<&'static str>,
    positional: Vec<String>,
}

impl Args {
    fn parse(cmd: &str, args: &[String], spec: &[OptSpec]) -> Res<Args> {
        let mut out = Args {
            values: HashMap::new(),
            flags: Vec::new(),
            positional: Vec::new(),
        };
        let find = |name: &str| {
            spec.iter()
                .chain(COMMON)
                .find(|(_, spellings, _)| spellings.contains(&name))
                .copied()
        };
        let mut it = args.iter();
        let mut only_positional = false;
        while let Some(arg) = it.next() {
            if only_positional || !arg.starts_with('-') || arg == "-" {
                out.positional.push(arg.clone());
                continue;
            }
            if arg == "--" {
                only_positional = true;
                continue;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let Some((canonical, _, takes_value)) = find(name) else {
                return Err(format!("{cmd}: unknown option '{name}' (try 'img help')"));
            };
            if takes_value {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("{cmd}: option '{name}' needs a value"))?,
                };
                if out.values.insert(canonical, value).is_some() {
                    return Err(format!("{cmd}: option '{name}' given twice"));
                }
            } else if inline.is_some() {
                return Err(format!("{cmd}: option '{name}' takes no value"));
            } else {
                out.flags.push(canonical);
            }
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }

    fn positional(&self, cmd: &str, min: usize, max: usize, what: &str) -> Res<&[String]> {
        let n = self.positional.len();
        if n < min || n > max {
            return Err(format!("{cmd}: expected {what}, got {n} argument(s)"));
        }
        Ok(&self.positional)
    }
}

/// A byte count: digits with an optional k/M/G/T/P suffix (powers of 1024).
fn parse_size(what: &str, s: &str) -> Res<u64> {
    let bad =
        || format!("{what}: '{s}' is not a size (a number with an optional k, M, G or T suffix)");
    let s = s.trim();
    let (digits, shift) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                _ => return Err(bad()),
            };
            (&s[..s.len() - 1], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

fn parse_count(what: &str, s: &str, min: u64, max: u64) -> Res<u64> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{what}: '{s}' is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("{what} must be {min} to {max}, not {n}"));
    }
    Ok(n)
}

fn parse_seconds(what: &str, s: &str) -> Res<Duration> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{what}: '{s}' is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(format!(
            "{what} must be more than 0 and at most 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `key=value,key=value` (a bare `key` means `key=on`).
fn parse_kv(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => (p.trim().to_owned(), "on".to_owned()),
        })
        .collect()
}

fn parse_bool(what: &str, v: &str) -> Res<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{what}: '{v}' is not on or off")),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.3} {}", UNITS[unit]).replace(".000 ", " ")
    }
}

// ---- stacks ----------------------------------------------------------------

#[derive(Debug, Clone)]
enum Layer {
    Throttle(ThrottleConfig),
    Cor,
    Fault(FaultRule),
    Raw(u64, Option<u64>),
    Qcow2,
    File(FileLayer),
    Null { size: u64, delay: Duration },
    Memory(u64),
}

#[derive(Debug, Clone, Copy, Default)]
struct FileLayer {
    direct: bool,
    no_locking: bool,
}

impl Layer {
    fn is_bottom(&self) -> bool {
        matches!(self, Layer::File(_) | Layer::Null { .. } | Layer::Memory(_))
    }

    fn name(&self) -> &'static str {
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
                    _ => return Err(format!("file: unknown option '{k}' (direct, locking)")),
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

/// Parses a stack and completes it: formats get a `file` below them.
fn parse_stack(spec: &str) -> Res<Vec<Layer>> {
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
    Ok(layers)
}

/// The format of `path` from its first bytes.
fn probe(path: &Path) -> Res<&'static str> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open '{}': {e}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(|e| format!("cannot read '{}': {e}", path.display()))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// The layers for an image argument: `--stack`, `-f`, or probed.
fn image_layers(stack: Option<&str>, format: Option<&str>, path: Option<&Path>) -> Res<Vec<Layer>> {
    if let Some(spec) = stack {
        if format.is_some() {
            return Err("give either --stack or -f, not both".into());
        }
        return parse_stack(spec);
    }
    let path = path.ok_or("no image given (a FILE, or a --stack ending in null or memory)")?;
    let fmt = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match fmt {
        "raw" => Ok(vec![Layer::Raw(0, None), Layer::File(FileLayer::default())]),
        "qcow2" => Ok(vec![Layer::Qcow2, Layer::File(FileLayer::default())]),
        other => Err(format!("unknown format '{other}' (raw or qcow2)")),
    }
}

/// How images are opened.
#[derive(Clone)]
struct OpenPolicy {
    writable: bool,
    force_share: bool,
    allow_absolute: bool,
}

impl OpenPolicy {
    fn from_args(args: &Args, writable: bool) -> Self {
        OpenPolicy {
            writable,
            force_share: args.flag("force-share"),
            allow_absolute: args.flag("allow-absolute"),
        }
    }

    fn file_options(&self, layer: FileLayer, writable: bool) -> FileOptions {
        FileOptions {
            read_only: !writable,
            direct: layer.direct,
            locking: !layer.no_locking,
            share_writes: self.force_share,
            ..FileOptions::default()
        }
    }

    fn backing_policy(&self) -> BackingPolicy {
        let mut p = BackingPolicy::default();
        p.allow_absolute = self.allow_absolute;
        p.allow_escape = self.allow_absolute;
        p
    }
}

/// What a stack opened: its top node and, for qcow2, the image chain.
struct Opened {
    top: NodeHandle,
    images: Vec<(PathBuf, &'static str, NodeHandle, NodeHandle)>,
}

async fn add_node(
    cx: &mut IoCx,
    name: String,
    driver: Box<dyn BlockDriver>,
    child: Option<(ChildRole, NodeHandle)>,
) -> Res<NodeHandle> {
    cx.run_on_main_loop(move |bql| {
        bql.write(|w| {
            let kids: Vec<(ChildRole, &NodeHandle)> = child.iter().map(|(r, h)| (*r, h)).collect();
            w.add_node_boxed(&name, driver, &kids)
        })
    })
    .await
    .map_err(err)?
    .map_err(err)
}

/// Opens `layers` (bottom: `path`) on the calling I/O thread. Node names
/// start with `prefix`.
async fn open_stack(
    cx: &mut IoCx,
    layers: &[Layer],
    path: Option<&Path>,
    policy: &OpenPolicy,
    prefix: &str,
) -> Res<Opened> {
    let need_path = || path.ok_or_else(|| "this stack needs a FILE argument".to_string());
    let n = layers.len();
    let mut images = Vec::new();
    // Bottom (and the qcow2 chain above a file).
    let (mut below, mut start) = match (&layers[n - 1], n.checked_sub(2).map(|i| &layers[i])) {
        (Layer::File(f), Some(Layer::Qcow2)) => {
            let path = need_path()?;
            let mut opts = ChainOptions::new(format!("{prefix}qcow2"));
            opts.writable = policy.writable;
            opts.policy = policy.backing_policy();
            let (p, f) = (policy.clone(), *f);
            let opener: FileOpener = Arc::new(move |path: &Path, writable: bool| {
                Ok(
                    Box::new(FileDriver::open(path, p.file_options(f, writable))?)
                        as Box<dyn BlockDriver>,
                )
            });
            opts.opener = Some(opener);
            let chain = open_image_chain(cx, path, opts).await.map_err(err)?;
            for img in &chain.images {
                images.push((
                    img.path.clone(),
                    img.format,
                    img.node.clone(),
                    img.file.clone(),
                ));
            }
            (chain.top().clone(), n - 2)
        }
        (Layer::File(f), _) => {
            let path = need_path()?;
            let drv =
                FileDriver::open(path, policy.file_options(*f, policy.writable)).map_err(err)?;
            let node = add_node(cx, format!("{prefix}file"), Box::new(drv), None).await?;
            images.push((path.to_owned(), "raw", node.clone(), node.clone()));
            (node, n - 1)
        }
        (Layer::Null { size, delay }, _) => {
            if path.is_some() {
                return Err("a stack ending in null takes no FILE argument".into());
            }
            let drv = NullDriver::new(*size).with_delay(*delay);
            (
                add_node(cx, format!("{prefix}null"), Box::new(drv), None).await?,
                n - 1,
            )
        }
        (Layer::Memory(size), _) => {
            if path.is_some() {
                return Err("a stack ending in memory takes no FILE argument".into());
            }
            let drv = MemoryDriver::new(*size);
            (
                add_node(cx, format!("{prefix}memory"), Box::new(drv), None).await?,
                n - 1,
            )
        }
        _ => return Err("the stack has no protocol layer at the bottom".into()),
    };
    while start > 0 {
        start -= 1;
        let layer = &layers[start];
        let (driver, role): (Box<dyn BlockDriver>, ChildRole) = match layer {
            Layer::Throttle(cfg) => (
                Box::new(
                    ThrottleDriver::with_config(&format!("{prefix}group{start}"), *cfg)
                        .map_err(err)?,
                ),
                ChildRole::Filtered,
            ),
            Layer::Cor => (Box::new(CopyOnRead::new()), ChildRole::Filtered),
            Layer::Fault(rule) => {
                let f = FaultInjector::new();
                f.add_rule(*rule).map_err(err)?;
                (Box::new(f), ChildRole::Filtered)
            }
            Layer::Raw(offset, size) => (
                Box::new(RawDriver::with_window(*offset, *size).map_err(err)?),
                ChildRole::File,
            ),
            other => return Err(format!("'{}' cannot sit above another layer", other.name())),
        };
        let name = format!("{prefix}{}{start}", layer.name());
        below = add_node(cx, name, driver, Some((role, below))).await?;
    }
    Ok(Opened { top: below, images })
}

/// A main loop with I/O threads; removes everything on drop.
struct Env {
    main: MainLoop,
    threads: Vec<IoThread>,
}

impl Env {
    fn new(threads: usize) -> Res<Env> {
        let main = MainLoop::new().map_err(err)?;
        let threads = (0..threads)
            .map(|i| main.new_io_thread(&format!("io{i}")).map_err(err))
            .collect::<Res<Vec<_>>>()?;
        Ok(Env { main, threads })
    }

    /// Runs `f` on the first I/O thread and waits for it.
    fn io<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(IoCx) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.threads[0].spawn(f).join()
    }

    fn backend(&self, name: &str, node: &NodeHandle, writable: bool) -> Res<BlockBackend> {
        let perms = if writable {
            Permissions::EXCLUSIVE_WRITER
        } else {
            Permissions {
                take: Perm::CONSISTENT_READ,
                share: Perm::ALL,
            }
        };
        let (name, node) = (name.to_owned(), node.clone());
        self.main
            .run(move |bql| {
                bql.write(|w| w.add_backend(&name, &node, BackendOptions::with_perms(perms)))
            })
            .map_err(err)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.threads.clear();
        self.main.shutdown();
    }
}

/// Opens an image (or stack) on `env`'s first I/O thread.
fn open(
    env: &Env,
    layers: Vec<Layer>,
    path: Option<PathBuf>,
    policy: OpenPolicy,
    prefix: &'static str,
) -> Res<Opened> {
    env.io(move |mut cx| async move {
        open_stack(&mut cx, &layers, path.as_deref(), &policy, prefix).await
    })
}

// ---- create ------------------------------------------------------------------

fn cmd_create(args: &[String]) -> Result<i32, (String, i32)> {
    let spec: &[OptSpec] = &[
        ("options", &["-o"], true),
        ("backing", &["-b", "--backing"], true),
        ("backing-format", &["-F", "--backing-format"], true),
    ];
    let a = Args::parse("create", args, spec).or_exit()?;
    let pos = a.positional("create", 1, 2, "FILE [SIZE]").or_exit()?;
    let path = PathBuf::from(&pos[0]);
    let format = a.get("format").unwrap_or("raw");
    let mut cluster_size = None;
    let mut version = 3;
    for (k, v) in parse_kv(a.get("options").unwrap_or("")) {
        match k.as_str() {
            "cluster_size" => cluster_size = Some(parse_size("-o cluster_size", &v).or_exit()?),
            "compat" => {
                version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err((format!("create: compat must be 0.10 or 1.1, not '{v}'"), 1)),
                }
            }
            _ => {
                return Err((
                    format!("create: unknown -o option '{k}' (cluster_size, compat)"),
                    1,
                ))
            }
        }
    }
    let size = pos
        .get(1)
        .map(|s| parse_size("create: SIZE", s))
        .transpose()
        .or_exit()?;
    match format {
        "raw" => {
            if a.get("backing").is_some() || cluster_size.is_some() || a.get("options").is_some() {
                return Err(("create: raw images take no -b or -o options".into(), 1));
            }
            let size = size.ok_or(("create: a raw image needs a SIZE".to_string(), 1))?;
            if size == 0 {
                return Err(("create: SIZE must be positive".into(), 1));
            }
            FileDriver::create(&path, size, FileOptions::default())
                .map_err(|e| (e.to_string(), 1))?;
            println!("Formatting '{}', fmt=raw size={size}", path.display());
            Ok(0)
        }
        "qcow2" => create_qcow2(&a, &path, size, cluster_size, version).or_exit(),
        other => Err((
            format!("create: unknown format '{other}' (raw or qcow2)"),
            1,
        )),
    }
}

fn create_qcow2(
    a: &Args,
    path: &Path,
    size: Option<u64>,
    cluster_size: Option<u64>,
    version: u32,
) -> Res<i32> {
    let backing = a.get("backing").map(str::to_owned);
    let env = Env::new(1)?;
    // The backing file, resolved as a reader will resolve it.
    let (backing_fmt, backing_size) = match &backing {
        None => {
            if a.get("backing-format").is_some() {
                return Err("create: -F needs -b".into());
            }
            (None, None)
        }
        Some(name) => {
            let policy = OpenPolicy::from_args(a, false);
            let resolved = policy.backing_policy().resolve(path, name).map_err(err)?;
            let fmt = match a.get("backing-format") {
                Some(f @ ("raw" | "qcow2")) => f.to_owned(),
                Some(f) => return Err(format!("create: unknown backing format '{f}'")),
                None => probe(&resolved)?.to_owned(),
            };
            let layers = image_layers(None, Some(&fmt), Some(&resolved))?;
            let opened = open(&env, layers, Some(resolved.clone()), policy, "backing-")
                .map_err(|e| format!("backing file '{name}': {e}"))?;
            let top = opened.top.clone();
            let len = env
                .io(move |mut cx| async move {
                    let g = cx.read().await;
                    top.io(&g).length().await
                })
                .map_err(err)?;
            (Some(fmt), Some(len))
        }
    };
    let size = match (size, backing_size) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => return Err("create: a qcow2 image needs a SIZE (or -b)".into()),
    };
    if size == 0 {
        return Err("create: SIZE must be positive".into());
    }
    let mut opts = CreateOptions::new(size).version(version);
    if let Some(cs) = cluster_size {
        opts = opts.cluster_size(cs);
    }
    if let (Some(b), Some(f)) = (&backing, &backing_fmt) {
        opts = opts.backing(b.clone(), f.clone());
    }
    let file = FileDriver::create(path, 0, FileOptions::default()).map_err(err)?;
    let created = env.io(move |mut cx| async move {
        let node = add_node(&mut cx, "new-file".into(), Box::new(file), None).await?;
        let g = cx.read().await;
        let n = node.io(&g);
        Qcow2Driver::create(n, &opts).await.map_err(err)?;
        n.flush().await.map_err(err)
    });
    if let Err(e) = created {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let mut line = format!("Formatting '{}', fmt=qcow2 size={size}", path.display());
    if let (Some(b), Some(f)) = (&backing, &backing_fmt) {
        let _ = write!(line, " backing_file={b} backing_fmt={f}");
    }
    println!("{line}");
    Ok(0)
}

// ---- info ------------------------------------------------------------------

/// What `qemu-img info` prints about a qcow2 image beyond its geometry.
struct Qcow2Facts {
    version: u32,
    compression_type: &'static str,
    lazy_refcounts: bool,
    refcount_bits: u32,
    corrupt: bool,
    extended_l2: bool,
    bitmaps: Vec<BitmapFacts>,
}

/// One persistent bitmap, as `format-specific` lists it.
struct BitmapFacts {
    name: String,
    granularity: u64,
    in_use: bool,
    auto: bool,
}

struct ImageInfo {
    /// The name QEMU would show: the argument for the top image, the
    /// backing file name combined with the directory of the image naming
    /// it for the others.
    filename: String,
    format: &'static str,
    virtual_size: u64,
    actual_size: u64,
    /// The length of the file under the format (the `file` child).
    file_length: u64,
    data_bytes: u64,
    cluster_size: Option<u64>,
    dirty: bool,
    qcow2: Option<Qcow2Facts>,
    snapshots: Vec<SnapshotInfo>,
    backing_file: Option<String>,
    full_backing_file: Option<String>,
    backing_format: Option<String>,
}

/// QEMU's `path_combine`: `name` relative to the directory of `base`.
fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_owned();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{name}", &base[..=i]),
        None => name.to_owned(),
    }
}

/// The persistent bitmaps an image stores, for `format-specific`.
///
/// The driver's bitmap directory API lands with the qcow2 metadata work;
/// until it is wired here no image lists bitmaps (and no `bitmaps` key is
/// printed, as QEMU prints none for an image without them).
fn bitmap_facts(q: &Qcow2Driver) -> Vec<BitmapFacts> {
    q.bitmaps()
        .into_iter()
        .map(|b| BitmapFacts {
            name: b.name,
            granularity: b.granularity,
            in_use: b.in_use,
            auto: b.auto,
        })
        .collect()
}

/// Bytes of `[0, size)` that `node` itself stores as data.
async fn data_bytes(node: blockgraph::IoRef<'_>, size: u64) -> Res<u64> {
    let mut off = 0;
    let mut data = 0;
    while off < size {
        let (status, n) = node.block_status(off, size - off).await.map_err(err)?;
        let n = n.clamp(1, size - off);
        if status == BlockStatus::Data {
            data += n;
        }
        off += n;
    }
    Ok(data)
}

fn gather_info(env: &Env, opened: &Opened, top_name: &str) -> Res<Vec<ImageInfo>> {
    let mut out: Vec<ImageInfo> = Vec::new();
    for (path, format, node, file) in &opened.images {
        let (node, file, format) = (node.clone(), file.clone(), *format);
        let filename = match out.last() {
            None => top_name.to_owned(),
            Some(above) => above
                .full_backing_file
                .clone()
                .unwrap_or_else(|| path.display().to_string()),
        };
        let actual_size = std::fs::metadata(path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let info = env.io(move |mut cx| async move {
            let g = cx.read().await;
            let n = node.io(&g);
            let virtual_size = n.length().await.map_err(err)?;
            // Block devices count whole sectors, as QEMU's file driver does.
            let file_length = file.io(&g).length().await.map_err(err)?.div_ceil(512) * 512;
            let data = data_bytes(n, virtual_size).await?;
            let q = n.driver_as::<Qcow2Driver>();
            let (qcow2, dirty, snapshots) = match q {
                None => (None, false, Vec::new()),
                Some(q) => (
                    Some(Qcow2Facts {
                        version: q.version(),
                        compression_type: q.compression_type(),
                        lazy_refcounts: q.lazy_refcounts().await,
                        refcount_bits: q.refcount_bits(),
                        corrupt: q.is_corrupt().await,
                        extended_l2: q.extended_l2().await,
                        bitmaps: bitmap_facts(q),
                    }),
                    q.is_dirty().await,
                    q.snapshots(n).await.map_err(err)?,
                ),
            };
            let backing_file = q.and_then(|q| q.backing_file().map(str::to_owned));
            Ok::<_, String>(ImageInfo {
                full_backing_file: backing_file.as_deref().map(|b| path_combine(&filename, b)),
                filename,
                format,
                virtual_size,
                actual_size,
                file_length,
                data_bytes: data,
                cluster_size: q.map(Qcow2Driver::cluster_size),
                dirty,
                qcow2,
                snapshots,
                backing_file,
                backing_format: q.and_then(|q| q.backing_format().map(str::to_owned)),
            })
        })?;
        out.push(info);
    }
    Ok(out)
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON value, printed the way QEMU's JSON writer pretty-prints (four
/// spaces per level, empty containers on two lines).
enum Json {
    Num(u64),
    Str(String),
    Bool(bool),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn s(v: &str) -> Json {
        Json::Str(v.to_owned())
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |n: usize| " ".repeat(n * 4);
        match self {
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => out.push_str(&json_str(s)),
            Json::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            Json::Arr(items) => {
                out.push_str("[\n");
                for (i, v) in items.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    v.write(out, indent + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    let _ = write!(out, "{}{}: ", pad(indent + 1), json_str(k));
                    v.write(out, indent + 1);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
    }
}

fn snapshot_json(s: &SnapshotInfo) -> Json {
    Json::Obj(vec![
        ("icount", Json::Num(s.icount.unwrap_or(u64::MAX))),
        ("vm-clock-nsec", Json::Num(s.vm_clock_nsec % 1_000_000_000)),
        ("name", Json::s(&s.name)),
        ("date-sec", Json::Num(u64::from(s.date_sec))),
        ("date-nsec", Json::Num(u64::from(s.date_nsec))),
        ("vm-clock-sec", Json::Num(s.vm_clock_nsec / 1_000_000_000)),
        ("id", Json::s(&s.id)),
        ("vm-state-size", Json::Num(s.vm_state_size)),
    ])
}

/// `format-specific` data for a qcow2 image, with QEMU's keys and types.
fn qcow2_json(q: &Qcow2Facts) -> Json {
    let compat = if q.version == 2 { "0.10" } else { "1.1" };
    let mut data = vec![
        ("compat", Json::s(compat)),
        ("compression-type", Json::s(q.compression_type)),
    ];
    if q.version >= 3 {
        data.push(("lazy-refcounts", Json::Bool(q.lazy_refcounts)));
    }
    if !q.bitmaps.is_empty() {
        data.push(("bitmaps", bitmaps_json(&q.bitmaps)));
    }
    data.push(("refcount-bits", Json::Num(u64::from(q.refcount_bits))));
    if q.version >= 3 {
        data.push(("corrupt", Json::Bool(q.corrupt)));
        data.push(("extended-l2", Json::Bool(q.extended_l2)));
    }
    Json::Obj(vec![("type", Json::s("qcow2")), ("data", Json::Obj(data))])
}

fn bitmap_flags(b: &BitmapFacts) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.auto {
        flags.push("auto");
    }
    flags
}

fn bitmaps_json(bitmaps: &[BitmapFacts]) -> Json {
    Json::Arr(
        bitmaps
            .iter()
            .map(|b| {
                Json::Obj(vec![
                    (
                        "flags",
                        Json::Arr(bitmap_flags(b).into_iter().map(Json::s).collect()),
                    ),
                    ("name", Json::s(&b.name)),
                    ("granularity", Json::Num(b.granularity)),
                ])
            })
            .collect(),
    )
}

/// One image as `qemu-img info --output=json` prints it (field order
/// too), plus `allocated-data-bytes` and the nested `backing-image`.
fn image_json(chain: &[ImageInfo]) -> Json {
    let Some((img, rest)) = chain.split_first() else {
        return Json::Obj(Vec::new());
    };
    let file_child = Json::Obj(vec![
        ("children", Json::Arr(Vec::new())),
        ("virtual-size", Json::Num(img.file_length)),
        ("filename", Json::s(&img.filename)),
        ("format", Json::s("file")),
        ("actual-size", Json::Num(img.actual_size)),
        (
            "format-specific",
            Json::Obj(vec![
                ("type", Json::s("file")),
                ("data", Json::Obj(Vec::new())),
            ]),
        ),
        ("dirty-flag", Json::Bool(false)),
    ]);
    let mut f = vec![(
        "children",
        Json::Arr(vec![Json::Obj(vec![
            ("name", Json::s("file")),
            ("info", file_child),
        ])]),
    )];
    if !img.snapshots.is_empty() {
        f.push((
            "snapshots",
            Json::Arr(img.snapshots.iter().map(snapshot_json).collect()),
        ));
    }
    if let Some(fmt) = &img.backing_format {
        f.push(("backing-filename-format", Json::s(fmt)));
    }
    f.push(("virtual-size", Json::Num(img.virtual_size)));
    f.push(("filename", Json::s(&img.filename)));
    if let Some(cs) = img.cluster_size {
        f.push(("cluster-size", Json::Num(cs)));
    }
    f.push(("format", Json::s(img.format)));
    f.push(("actual-size", Json::Num(img.actual_size)));
    f.push(("allocated-data-bytes", Json::Num(img.data_bytes)));
    if let Some(q) = &img.qcow2 {
        f.push(("format-specific", qcow2_json(q)));
    }
    if let Some(full) = &img.full_backing_file {
        f.push(("full-backing-filename", Json::s(full)));
    }
    if let Some(b) = &img.backing_file {
        f.push(("backing-filename", Json::s(b)));
    }
    if !rest.is_empty() {
        f.push(("backing-image", image_json(rest)));
    }
    f.push(("dirty-flag", Json::Bool(img.dirty)));
    Json::Obj(f)
}

/// QEMU's `size_to_str`: three significant digits and a binary unit.
fn qemu_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit keeps the number below 1000 (so 1000 B is 0.977 KiB).
    let mut i = 0;
    while i + 1 < UNITS.len() && bytes as f64 >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let v = bytes as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}B", g3(v), UNITS[i])
}

/// C's `%0.3g` for 0 <= v < 1000.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = v.abs().log10().floor() as i32;
    let decimals = (2 - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// The snapshot table as `qemu-img snapshot -l` and `qemu-img info` print
/// it (dates in local time).
fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut out = String::from("Snapshot list:\n");
    let _ = writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            qemu_size(s.vm_state_size),
            local_time(s.date_sec),
            clock,
            icount
        );
    }
    out
}

/// `%Y-%m-%d %H:%M:%S` in the local time zone, as QEMU prints dates.
fn local_time(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: `localtime_r` writes only into `tm`, which lives here.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn print_info(img: &ImageInfo) {
    println!("image: {}", img.filename);
    println!("file format: {}", img.format);
    println!(
        "virtual size: {} ({} bytes)",
        qemu_size(img.virtual_size),
        img.virtual_size
    );
    println!("disk size: {}", qemu_size(img.actual_size));
    println!(
        "allocated data: {} ({} bytes)",
        qemu_size(img.data_bytes),
        img.data_bytes
    );
    if let Some(cs) = img.cluster_size {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = &img.backing_file {
        match &img.full_backing_file {
            Some(full) if full != b => println!("backing file: {b} (actual path: {full})"),
            _ => println!("backing file: {b}"),
        }
    }
    if let Some(f) = &img.backing_format {
        println!("backing file format: {f}");
    }
    if img.dirty {
        println!("cleanly shut down: no");
    }
    if !img.snapshots.is_empty() {
        print!("{}", snapshot_table(&img.snapshots));
    }
    if let Some(q) = &img.qcow2 {
        println!("Format specific information:");
        println!(
            "    compat: {}",
            if q.version == 2 { "0.10" } else { "1.1" }
        );
        println!("    compression type: {}", q.compression_type);
        if q.version >= 3 {
            println!("    lazy refcounts: {}", q.lazy_refcounts);
        }
        if !q.bitmaps.is_empty() {
            println!("    bitmaps:");
            for (i, b) in q.bitmaps.iter().enumerate() {
                println!("        [{i}]:");
                println!("            flags:");
                for (j, f) in bitmap_flags(b).iter().enumerate() {
                    println!("                [{j}]: {f}");
                }
                println!("            name: {}", b.name);
                println!("            granularity: {}", b.granularity);
            }
        }
        println!("    refcount bits: {}", q.refcount_bits);
        if q.version >= 3 {
            println!("    corrupt: {}", q.corrupt);
            println!("    extended l2: {}", q.extended_l2);
        }
    }
    println!("Child node '/file':");
    println!("    filename: {}", img.filename);
    println!("    protocol type: file");
    println!(
        "    file length: {} ({} bytes)",
        qemu_size(img.file_length),
        img.file_length
    );
    println!("    disk size: {}", qemu_size(img.actual_size));
}

fn cmd_info(args: &[String]) -> Result<i32, (String, i32)> {
    let a = Args::parse(
        "info",
        args,
        &[
            ("json", &["--json"], false),
            ("output", &["--output"], true),
            ("backing-chain", &["--backing-chain"], false),
        ],
    )
    .or_exit()?;
    let pos = a.positional("info", 1, 1, "FILE").or_exit()?;
    let json = match a.get("output") {
        None => a.flag("json"),
        Some("json") => true,
        Some("human") => a.flag("json"),
        Some(o) => {
            return Err((
                format!("info: --output must be json or human, not '{o}'"),
                1,
            ))
        }
    };
    let name = pos[0].clone();
    let path = PathBuf::from(&name);
    let layers = image_layers(None, a.get("format"), Some(&path)).or_exit()?;
    let env = Env::new(1).or_exit()?;
    let opened = open(
        &env,
        layers,
        Some(path),
        OpenPolicy::from_args(&a, false),
        "",
    )
    .or_exit()?;
    let chain = gather_info(&env, &opened, &name).or_exit()?;
    if json {
        let mut out = String::new();
        if a.flag("backing-chain") {
            // As qemu-img: an array, one object per image, top first.
            Json::Arr(
                (0..chain.len())
                    .map(|i| image_json(&chain[i..=i]))
                    .collect(),
            )
            .write(&mut out, 0);
        } else {
            image_json(&chain).write(&mut out, 0);
        }
        println!("{out}");
        return Ok(0);
    }
    for (i, img) in chain.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_info(img);
    }
    Ok(0)
}

// ---- snapshot ----------------------------------------------------------------

fn cmd_snapshot(args: &[String]) -> Result<i32, (String, i32)> {
    let spec: &[OptSpec] = &[
        ("list", &["-l"], false),
        ("create", &["-c"], true),
        ("apply", &["-a"], true),
        ("delete", &["-d"], true),
    ];
    let a = Args::parse("snapshot", args, spec).or_exit()?;
    let pos = a.positional("snapshot", 1, 1, "FILE").or_exit()?;
    let path = PathBuf::from(&pos[0]);
    let ops = [
        a.flag("list"),
        a.get("create").is_some(),
        a.get("apply").is_some(),
        a.get("delete").is_some(),
    ];
    let op = match ops.iter().filter(|&&x| x).count() {
        0 => "list",
        1 => ["list", "create", "apply", "delete"][ops.iter().position(|&x| x).unwrap_or(0)],
        _ => return Err(("snapshot: give one of -l, -c, -a, -d".into(), 1)),
    };
    let fmt = match a.get("format") {
        Some(f) => f.to_owned(),
        None => probe(&path).or_exit()?.to_owned(),
    };
    if fmt != "qcow2" {
        return Err((
            format!(
                "snapshot: '{}' is {fmt}, which has no internal snapshots",
                path.display()
            ),
            1,
        ));
    }
    let write = op != "list";
    let policy = OpenPolicy::from_args(&a, write);
    let file = FileDriver::open(&path, policy.file_options(FileLayer::default(), write))
        .map_err(|e| (e.to_string(), 1))?;
    let key = a
        .get("create")
        .or(a.get("apply"))
        .or(a.get("delete"))
        .unwrap_or_default()
        .to_owned();
    let env = Env::new(1).or_exit()?;
    let op = op.to_owned();
    let listed = env
        .io(move |mut cx| async move {
            let node = add_node(&mut cx, "file".into(), Box::new(file), None).await?;
            let g = cx.read().await;
            let n = node.io(&g);
            let opts = Qcow2Options::default();
            let r = match op.as_str() {
                "list" => Qcow2Driver::list_snapshots(n, opts).await,
                "create" => Qcow2Driver::create_snapshot(n, opts, &key)
                    .await
                    .map(|_| Vec::new()),
                "apply" => Qcow2Driver::apply_snapshot(n, opts, &key)
                    .await
                    .map(|()| Vec::new()),
                _ => Qcow2Driver::delete_snapshot(n, opts, &key)
                    .await
                    .map(|()| Vec::new()),
            };
            r.map_err(|e| format!("snapshot: {e}"))
        })
        .or_exit()?;
    // Only a listing returns snapshots; an empty list prints nothing, as
    // qemu-img's.
    if !listed.is_empty() {
        print!("{}", snapshot_table(&listed));
    }
    Ok(0)
}

// ---- check -----------------------------------------------------------------

fn cmd_check(args: &[String]) -> Result<i32, (String, i32)> {
    let a = Args::parse("check", args, &[("repair", &["-r"], true)]).or_exit()?;
    let pos = a.positional("check", 1, 1, "FILE").or_exit()?;
    let path = PathBuf::from(&pos[0]);
    let repair = match a.get("repair") {
        None => false,
        Some("leaks" | "all") => true,
        Some(r) => return Err((format!("check: -r takes leaks or all, not '{r}'"), 1)),
    };
    let fmt = match a.get("format") {
        Some(f) => f.to_owned(),
        None => probe(&path).or_exit()?.to_owned(),
    };
    if fmt == "raw" {
        println!("This image format does not support checks");
        return Ok(63);
    }
    let layers = image_layers(None, Some(&fmt), Some(&path)).or_exit()?;
    let env = Env::new(1).or_exit()?;
    let opened = open(
        &env,
        layers,
        Some(path),
        OpenPolicy::from_args(&a, repair),
        "",
    )
    .or_exit()?;
    let top = opened.top.clone();
    let report = env
        .io(move |mut cx| async move {
            let g = cx.read().await;
            let n = top.io(&g);
            let q = n.driver_as::<Qcow2Driver>().ok_or("not a qcow2 image")?;
            q.check(n, repair).await.map_err(err)
        })
        .or_exit()?;
    for m in &report.messages {
        println!("{m}");
    }
    let corrupt = report.corruptions - report.repaired_corruptions;
    let leaks = report.leaks - report.repaired_leaks;
    if report.repaired_leaks + report.repaired_corruptions > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            report.repaired_leaks, report.repaired_corruptions
        );
    }
    if corrupt > 0 {
        println!("{corrupt} errors were found on the image.");
        println!("Data may be corrupted, or further writes to the image may corrupt it.");
    }
    if leaks > 0 {
        println!("{leaks} leaked clusters were found on the image.");
        println!("This means waste of disk space, but no harm to data.");
    }
    if corrupt == 0 && leaks == 0 {
        println!("No errors were found on the image.");
    }
    println!(
        "{} clusters allocated by the guest.\nImage end offset: {}",
        report.allocated_clusters, report.image_end_offset
    );
    Ok(if corrupt > 0 {
        2
    } else if leaks > 0 {
        3
    } else {
        0
    })
}

// ---- resize ------------------------------------------------------------------

fn cmd_resize(args: &[String]) -> Result<i32, (String, i32)> {
    // `-1M` is a size, not an option.
    let mut args = args.to_vec();
    let relative_down = args
        .last()
        .and_then(|s| s.strip_prefix('-'))
        .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit()));
    let size_arg = if relative_down { args.pop() } else { None };
    let a = Args::parse("resize", &args, &[("shrink", &["--shrink"], false)]).or_exit()?;
    let (path, spec) = match (&size_arg, a.positional.as_slice()) {
        (Some(size), [path]) => (PathBuf::from(path), size.clone()),
        (None, [path, size]) => (PathBuf::from(path), size.clone()),
        (_, given) => {
            let n = given.len() + usize::from(size_arg.is_some());
            return Err((
                format!("resize: expected FILE [+|-]SIZE, got {n} argument(s)"),
                1,
            ));
        }
    };
    let layers = image_layers(None, a.get("format"), Some(&path)).or_exit()?;
    let shrink = a.flag("shrink");
    let env = Env::new(1).or_exit()?;
    let opened = open(
        &env,
        layers,
        Some(path),
        OpenPolicy::from_args(&a, true),
        "",
    )
    .or_exit()?;
    // Resizing needs the resize permission: QEMU's `block_resize` takes it
    // on a backend of its own, as this one does.
    let top = opened.top.clone();
    let blk = env
        .main
        .run(move |bql| bql.write(|w| w.add_backend("resize", &top, BackendOptions::resizable())))
        .map_err(err)
        .or_exit()?;
    env.io(move |mut cx| async move {
        let old = blk.length(&mut cx).await.map_err(err)?;
        let new = if let Some(d) = spec.strip_prefix('+') {
            old.checked_add(parse_size("resize", d)?)
                .ok_or("resize: the new size overflows")?
        } else if let Some(d) = spec.strip_prefix('-') {
            old.checked_sub(parse_size("resize", d)?)
                .ok_or("resize: cannot shrink below zero")?
        } else {
            parse_size("resize", &spec)?
        };
        if new < old && !shrink {
            return Err(format!(
                "resize: shrinking from {old} to {new} bytes drops data past the new end; \
                 give --shrink if that is meant"
            ));
        }
        blk.truncate(&mut cx, new).await.map_err(err)?;
        blk.flush(&mut cx).await.map_err(err)
    })
    .or_exit()?;
    println!("Image resized.");
    Ok(0)
}

// ---- convert -----------------------------------------------------------------

/// Copy unit: large enough to be efficient, small enough to skip zeroes.
const CHUNK: u64 = 1 << 20;
/// Copies in flight.
const CONVERT_WORKERS: u64 = 4;

fn cmd_convert(args: &[String]) -> Result<i32, (String, i32)> {
    let spec: &[OptSpec] = &[
        ("stack", &["--stack"], true),
        ("output-format", &["-O"], true),
        ("options", &["-o"], true),
    ];
    let a = Args::parse("convert", args, spec).or_exit()?;
    let pos = a
        .positional("convert", 1, 2, "SRC DST (or --stack ... DST)")
        .or_exit()?;
    let (src, dst) = match pos {
        [dst] if a.get("stack").is_some() => (None, PathBuf::from(dst)),
        [src, dst] => (Some(PathBuf::from(src)), PathBuf::from(dst)),
        _ => return Err(("convert: expected SRC DST".into(), 1)),
    };
    let out_fmt = a.get("output-format").unwrap_or("raw");
    let mut cluster_size = None;
    let mut version = 3;
    for (k, v) in parse_kv(a.get("options").unwrap_or("")) {
        match (out_fmt, k.as_str()) {
            ("qcow2", "cluster_size") => {
                cluster_size = Some(parse_size("-o cluster_size", &v).or_exit()?)
            }
            ("qcow2", "compat") => {
                version = match v.as_str() {
                    "0.10" => 2,
                    "1.1" => 3,
                    _ => {
                        return Err((format!("convert: compat must be 0.10 or 1.1, not '{v}'"), 1))
                    }
                }
            }
            _ => return Err((format!("convert: unknown -o option '{k}' for {out_fmt}"), 1)),
        }
    }
    if !matches!(out_fmt, "raw" | "qcow2") {
        return Err((
            format!("convert: unknown output format '{out_fmt}' (raw or qcow2)"),
            1,
        ));
    }
    let layers = image_layers(a.get("stack"), a.get("format"), src.as_deref()).or_exit()?;
    let env = Env::new(1).or_exit()?;
    let source = open(&env, layers, src, OpenPolicy::from_args(&a, false), "src-").or_exit()?;
    let src_blk = env.backend("src-blk", &source.top, false).or_exit()?;
    let b = src_blk.clone();
    let size = env
        .io(move |mut cx| async move { b.length(&mut cx).await })
        .map_err(|e| (e.to_string(), 1))?;
    if size == 0 {
        return Err(("convert: the source is empty".into(), 1));
    }
    // The destination.
    let file = FileDriver::create(
        &dst,
        if out_fmt == "raw" { size } else { 0 },
        FileOptions::default(),
    )
    .map_err(|e| (e.to_string(), 1))?;
    let out_fmt = out_fmt.to_owned();
    let dst_top = env.io(move |mut cx| async move {
        let node = add_node(&mut cx, "dst-file".into(), Box::new(file), None).await?;
        if out_fmt == "raw" {
            return Ok(node);
        }
        let mut opts = CreateOptions::new(size).version(version);
        if let Some(cs) = cluster_size {
            opts = opts.cluster_size(cs);
        }
        let drv = {
            let g = cx.read().await;
            Qcow2Driver::create(node.io(&g), &opts).await.map_err(err)?;
            Qcow2Driver::open(node.io(&g), Default::default())
                .await
                .map_err(err)?
        };
        add_node(
            &mut cx,
            "dst".into(),
            Box::new(drv),
            Some((ChildRole::File, node)),
        )
        .await
    });
    let dst_top = match dst_top {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&dst);
            return Err((e, 1));
        }
    };
    let dst_blk = env.backend("dst-blk", &dst_top, true).or_exit()?;
    let copied = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..CONVERT_WORKERS)
        .map(|w| {
            let (src, dst, copied) = (src_blk.clone(), dst_blk.clone(), copied.clone());
            env.threads[0].spawn(move |mut cx| async move {
                let mut buf = vec![0u8; CHUNK as usize];
                let mut off = w * CHUNK;
                while off < size {
                    let len = CHUNK.min(size - off) as usize;
                    src.read(&mut cx, off, &mut buf[..len])
                        .await
                        .map_err(|e| format!("reading the source at {off}: {e}"))?;
                    if buf[..len].iter().any(|&b| b != 0) {
                        dst.write(&mut cx, off, &buf[..len])
                            .await
                            .map_err(|e| format!("writing '{}' at {off}: {e}", "destination"))?;
                        copied.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    off += CONVERT_WORKERS * CHUNK;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    let mut failure = None;
    for w in workers {
        if let Err(e) = w.join() {
            failure.get_or_insert(e);
        }
    }
    let d = dst_blk.clone();
    let flushed = env
        .io(move |mut cx| async move { d.flush(&mut cx).await })
        .map_err(err);
    if let Some(e) = failure.or(flushed.err()) {
        return Err((e, 1));
    }
    println!(
        "converted {} ({} of data) to '{}'",
        human(size),
        human(copied.load(Ordering::Relaxed)),
        dst.display()
    );
    Ok(0)
}

// ---- compare -------------------------------------------------------------------

fn cmd_compare(args: &[String]) -> Res<i32> {
    let a = Args::parse("compare", args, &[("format2", &["-F"], true)])?;
    let pos = a.positional("compare", 2, 2, "A B")?;
    let (pa, pb) = (PathBuf::from(&pos[0]), PathBuf::from(&pos[1]));
    let la = image_layers(None, a.get("format"), Some(&pa))?;
    let lb = image_layers(None, a.get("format2").or(a.get("format")), Some(&pb))?;
    let env = Env::new(1)?;
    let policy = OpenPolicy::from_args(&a, false);
    let ia = open(&env, la, Some(pa), policy.clone(), "a-")?;
    let ib = open(&env, lb, Some(pb), policy, "b-")?;
    let (ba, bb) = (
        env.backend("a", &ia.top, false)?,
        env.backend("b", &ib.top, false)?,
    );
    let outcome = env.io(move |mut cx| async move {
        let size_a = ba.length(&mut cx).await.map_err(err)?;
        let size_b = bb.length(&mut cx).await.map_err(err)?;
        let common = size_a.min(size_b);
        let mut x = vec![0u8; CHUNK as usize];
        let mut y = vec![0u8; CHUNK as usize];
        let mut off = 0;
        while off < common {
            let len = CHUNK.min(common - off) as usize;
            ba.read(&mut cx, off, &mut x[..len]).await.map_err(err)?;
            bb.read(&mut cx, off, &mut y[..len]).await.map_err(err)?;
            if let Some(i) = x[..len].iter().zip(&y[..len]).position(|(p, q)| p != q) {
                return Ok::<_, String>((size_a, size_b, Some(off + i as u64)));
            }
            off += len as u64;
        }
        // The longer one must read zeroes past the shorter one's end.
        let (longer, end) = if size_a > size_b {
            (&ba, size_a)
        } else {
            (&bb, size_b)
        };
        while off < end {
            let len = CHUNK.min(end - off) as usize;
            longer
                .read(&mut cx, off, &mut x[..len])
                .await
                .map_err(err)?;
            if let Some(i) = x[..len].iter().position(|&p| p != 0) {
                return Ok((size_a, size_b, Some(off + i as u64)));
            }
            off += len as u64;
        }
        Ok((size_a, size_b, None))
    })?;
    let (size_a, size_b, mismatch) = outcome;
    if size_a != size_b {
        println!("Warning: Image size mismatch!");
    }
    match mismatch {
        Some(off) => {
            println!("Content mismatch at offset {off}!");
            Ok(1)
        }
        None => {
            println!("Images are identical.");
            Ok(0)
        }
    }
}

// ---- bench -------------------------------------------------------------------

/// Latencies in a log-linear histogram: 16 buckets per power of two, so a
/// percentile is within about 6% of the true value, in constant memory.
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    min: u64,
    max: u64,
    total: u64,
}

impl Histogram {
    const SUB: u64 = 16;

    fn new() -> Self {
        Histogram {
            counts: vec![0; 64 * Self::SUB as usize],
            min: u64::MAX,
            max: 0,
            total: 0,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < Self::SUB {
            return ns as usize;
        }
        let bits = 63 - ns.leading_zeros() as u64;
        let sub = (ns >> (bits - 4)) & (Self::SUB - 1);
        ((bits - 3) * Self::SUB + sub) as usize
    }

    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < Self::SUB {
            return index;
        }
        let bits = index / Self::SUB + 3;
        let sub = index % Self::SUB;
        (Self::SUB + sub) << (bits - 4)
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
        self.total += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.total += other.total;
    }

    fn percentile(&self, p: f64) -> u64 {
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

struct BenchResult {
    hist: Histogram,
    errors: u64,
    first_error: Option<String>,
}

fn cmd_bench(args: &[String]) -> Result<i32, (String, i32)> {
    let spec: &[OptSpec] = &[
        ("stack", &["--stack"], true),
        ("rw", &["--rw"], true),
        ("bs", &["--bs"], true),
        ("depth", &["--depth", "-d"], true),
        ("threads", &["--threads", "-t"], true),
        ("time", &["--time"], true),
        ("count", &["--count", "-c"], true),
        ("warmup", &["--warmup"], true),
        ("size", &["--size"], true),
    ];
    let a = Args::parse("bench", args, spec).or_exit()?;
    let pos = a.positional("bench", 0, 1, "at most one FILE").or_exit()?;
    let path = pos.first().map(PathBuf::from);
    let (write, random) = match a.get("rw").unwrap_or("randread") {
        "read" => (false, false),
        "write" => (true, false),
        "randread" => (false, true),
        "randwrite" => (true, true),
        other => {
            return Err((
                format!("bench: --rw must be read, write, randread or randwrite, not '{other}'"),
                1,
            ))
        }
    };
    let bs = parse_size("bench: --bs", a.get("bs").unwrap_or("4k")).or_exit()?;
    if bs == 0 || bs > 64 << 20 {
        return Err(("bench: --bs must be 1 byte to 64 MiB".into(), 1));
    }
    let depth = parse_count("bench: --depth", a.get("depth").unwrap_or("32"), 1, 1024).or_exit()?;
    let threads =
        parse_count("bench: --threads", a.get("threads").unwrap_or("1"), 1, 64).or_exit()?;
    if depth < threads {
        return Err((
            "bench: --depth must be at least --threads (each thread runs part of the queue)".into(),
            1,
        ));
    }
    let (time, count) = match (a.get("time"), a.get("count")) {
        (Some(_), Some(_)) => return Err(("bench: give --time or --count, not both".into(), 1)),
        (_, Some(c)) => (
            None,
            Some(parse_count("bench: --count", c, 1, u64::MAX).or_exit()?),
        ),
        (t, None) => (
            Some(parse_seconds("bench: --time", t.unwrap_or("5")).or_exit()?),
            None,
        ),
    };
    let warmup = a
        .get("warmup")
        .map(|w| parse_seconds("bench: --warmup", w))
        .transpose()
        .or_exit()?;
    if warmup.is_some() && count.is_some() {
        return Err(("bench: --warmup goes with --time".into(), 1));
    }
    let layers = image_layers(a.get("stack"), a.get("format"), path.as_deref()).or_exit()?;
    let env = Env::new(threads as usize).or_exit()?;
    let opened = open(&env, layers, path, OpenPolicy::from_args(&a, write), "").or_exit()?;
    let blk = env.backend("bench", &opened.top, write).or_exit()?;
    let b = blk.clone();
    let (dev_size, align) = {
        let top = opened.top.clone();
        env.io(move |mut cx| async move {
            let size = b.length(&mut cx).await.map_err(err)?;
            let g = cx.read().await;
            Ok::<_, String>((size, u64::from(top.io(&g).request_alignment().max(1))))
        })
        .or_exit()?
    };
    let region = match a.get("size") {
        Some(s) => parse_size("bench: --size", s).or_exit()?,
        None => dev_size,
    };
    if region > dev_size {
        return Err((
            format!("bench: --size {region} is larger than the device ({dev_size} bytes)"),
            1,
        ));
    }
    if bs % align != 0 {
        return Err((
            format!("bench: --bs must be a multiple of the stack's {align}-byte alignment"),
            1,
        ));
    }
    if region < bs {
        return Err((
            format!("bench: the region ({region} bytes) is smaller than one block ({bs} bytes)"),
            1,
        ));
    }
    let blocks = region / bs;
    let start = Instant::now();
    let measure_from = start + warmup.unwrap_or(Duration::ZERO);
    let deadline = time.map(|t| measure_from + t);
    let issued = Arc::new(AtomicU64::new(0));
    let cursor = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..depth {
        let thread = &env.threads[(w % threads) as usize];
        let (blk, issued, cursor) = (blk.clone(), issued.clone(), cursor.clone());
        tasks.push(thread.spawn(move |mut cx| async move {
            let mut buf = vec![0xA5u8; bs as usize];
            let mut hist = Histogram::new();
            let mut errors = 0;
            let mut first_error = None;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            loop {
                if let Some(d) = deadline {
                    if Instant::now() >= d {
                        break;
                    }
                }
                if let Some(c) = count {
                    if issued.fetch_add(1, Ordering::Relaxed) >= c {
                        break;
                    }
                }
                let block = if random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % blocks
                } else {
                    cursor.fetch_add(1, Ordering::Relaxed) % blocks
                };
                let t = Instant::now();
                let r = if write {
                    blk.write(&mut cx, block * bs, &buf).await
                } else {
                    blk.read(&mut cx, block * bs, &mut buf).await
                };
                if t < measure_from {
                    continue;
                }
                match r {
                    Ok(()) => hist.record(t.elapsed().as_nanos() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            BenchResult {
                hist,
                errors,
                first_error,
            }
        }));
    }
    let mut total = Histogram::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let r = t.join();
        total.merge(&r.hist);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let elapsed = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    if write {
        let b = blk.clone();
        env.io(move |mut cx| async move { b.flush(&mut cx).await })
            .map_err(|e| (e.to_string(), 1))?;
    }
    let ops = total.total;
    let iops = ops as f64 / elapsed;
    let rw = match (write, random) {
        (false, false) => "read",
        (true, false) => "write",
        (false, true) => "randread",
        (true, true) => "randwrite",
    };
    println!(
        "bench: {rw}, bs {bs}, depth {depth}, {threads} I/O thread(s), {elapsed:.2} s measured"
    );
    println!(
        "  ops: {ops}  IOPS: {iops:.0}  throughput: {:.2} MiB/s",
        iops * bs as f64 / (1 << 20) as f64
    );
    if ops > 0 {
        let us = |ns: u64| ns as f64 / 1000.0;
        println!(
            "  latency (us): min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            us(total.min),
            us(total.percentile(50.0)),
            us(total.percentile(90.0)),
            us(total.percentile(99.0)),
            us(total.percentile(99.9)),
            us(total.max)
        );
    }
    if errors > 0 {
        return Err((
            format!(
                "bench: {errors} request(s) failed; first: {}",
                first_error.unwrap_or_default()
            ),
            1,
        ));
    }
    Ok(0)
}
