//! `img info`: what `qemu-img info` shows about an image and its backing
//! chain (format, sizes, allocation, snapshots, format-specific data), as
//! text or as the same JSON (`--output=json`).

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use blockgraph::driver::BlockStatus;
use blockgraph::drivers::qcow2::{Qcow2Driver, SnapshotInfo};
use blockgraph::IoRef;

use crate::args::Common;
use crate::open::{Env, OpenPolicy, Opened};
use crate::output::{err, qemu_size, snapshot_table, Res};
use crate::stack::image_layers;

/// Show an image's format, sizes, allocation, snapshots and backing chain.
///
/// Also the format-specific data. The JSON is qemu-img info's; with
/// --backing-chain an array, one object per image.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Print JSON (the same as --output=json)
    #[arg(long)]
    json: bool,
    /// The output format
    #[arg(long, value_name = "FMT", value_enum)]
    output: Option<Output>,
    /// Show every image of the backing chain on its own
    #[arg(long)]
    backing_chain: bool,
    /// The image
    #[arg(value_name = "FILE")]
    file: String,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Json,
    Human,
}

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
async fn data_bytes(node: IoRef<'_>, size: u64) -> Res<u64> {
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
    for image in &opened.images {
        let path = &image.path;
        let (node, file, format) = (image.node.clone(), image.file.clone(), image.format);
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

pub fn run(a: Args) -> Res<i32> {
    let json = a.json || a.output == Some(Output::Json);
    let path = PathBuf::from(&a.file);
    let layers = image_layers(None, a.common.format, Some(&path))?;
    let env = Env::new(1)?;
    let opened = env.open(layers, Some(path), OpenPolicy::new(&a.common, false), "")?;
    let chain = gather_info(&env, &opened, &a.file)?;
    if json {
        let mut out = String::new();
        if a.backing_chain {
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
