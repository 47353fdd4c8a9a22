//! `img info`: what `qemu-img info` shows about an image and its backing
//! chain (format, sizes, allocation, snapshots, format-specific data), as
//! text or as the same JSON (`--output=json`).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use blockgraph::driver::BlockStatus;
use blockgraph::drivers::qcow2::{Qcow2Driver, SnapshotInfo};
use blockgraph::drivers::FileDriver;
use blockgraph::IoRef;
use serde::Serialize;

use crate::args::Common;
use crate::open::{Env, OpenPolicy, Opened};
use crate::output::{err, print_json, qemu_size, snapshot_table, Res};
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

/// What `qemu-img info` prints about a qcow2 image beyond its geometry:
/// the `data` of its `format-specific` object, with QEMU's keys, types
/// and order. The fields version 2 images lack are `None`.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Facts {
    /// "0.10" (version 2) or "1.1" (version 3).
    compat: &'static str,
    compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bitmaps: Vec<BitmapFacts>,
    refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

/// One persistent bitmap, as `format-specific` lists it.
#[derive(Serialize)]
struct BitmapFacts {
    /// "in-use" and "auto", where they apply.
    flags: Vec<&'static str>,
    name: String,
    granularity: u64,
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
    /// How the file node does its host I/O (`threads` or `io_uring`), when
    /// it is a file.
    aio: Option<&'static str>,
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

/// The persistent bitmaps an image stores, for `format-specific` (an image
/// without any prints no `bitmaps` key, as QEMU's).
fn bitmap_facts(q: &Qcow2Driver) -> Vec<BitmapFacts> {
    q.bitmaps()
        .into_iter()
        .map(|b| BitmapFacts {
            flags: [(b.in_use, "in-use"), (b.auto, "auto")]
                .into_iter()
                .filter_map(|(set, flag)| set.then_some(flag))
                .collect(),
            name: b.name,
            granularity: b.granularity,
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
            let aio = file
                .io(&g)
                .driver_as::<FileDriver>()
                .map(|f| f.aio().name());
            let data = data_bytes(n, virtual_size).await?;
            let q = n.driver_as::<Qcow2Driver>();
            let (qcow2, dirty, snapshots) = match q {
                None => (None, false, Vec::new()),
                Some(q) => (
                    Some({
                        let v3 = q.version() >= 3;
                        Qcow2Facts {
                            compat: if v3 { "1.1" } else { "0.10" },
                            compression_type: q.compression_type(),
                            lazy_refcounts: v3.then_some(q.lazy_refcounts().await),
                            bitmaps: bitmap_facts(q),
                            refcount_bits: q.refcount_bits(),
                            corrupt: v3.then_some(q.is_corrupt().await),
                            extended_l2: v3.then_some(q.extended_l2().await),
                        }
                    }),
                    q.is_dirty().await,
                    q.snapshots(n).await.map_err(err)?,
                ),
            };
            let backing_file = q.and_then(Qcow2Driver::backing_file);
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
                backing_format: q.and_then(Qcow2Driver::backing_format),
                aio,
            })
        })?;
        out.push(info);
    }
    Ok(out)
}

/// One image as `qemu-img info --output=json` prints it (field order
/// too), plus `allocated-data-bytes` and the nested `backing-image`.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ImageJson<'a> {
    children: [ChildJson<'a>; 1],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<SnapshotJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<&'a str>,
    virtual_size: u64,
    filename: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'a str,
    actual_size: u64,
    allocated_data_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_image: Option<Box<ImageJson<'a>>>,
    dirty_flag: bool,
}

/// The image's `file` child.
#[derive(Serialize)]
struct ChildJson<'a> {
    name: &'static str,
    info: FileJson<'a>,
}

/// The protocol node under an image, as QEMU describes it.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileJson<'a> {
    children: [(); 0],
    virtual_size: u64,
    filename: &'a str,
    format: &'static str,
    actual_size: u64,
    format_specific: FormatSpecific<'a>,
    dirty_flag: bool,
}

/// `{"type": ..., "data": {...}}`.
#[derive(Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
enum FormatSpecific<'a> {
    Qcow2(&'a Qcow2Facts),
    File {},
}

/// One internal snapshot, with QEMU's keys and order.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct SnapshotJson<'a> {
    icount: u64,
    vm_clock_nsec: u64,
    name: &'a str,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_sec: u64,
    id: &'a str,
    vm_state_size: u64,
}

impl<'a> From<&'a SnapshotInfo> for SnapshotJson<'a> {
    fn from(s: &'a SnapshotInfo) -> Self {
        SnapshotJson {
            icount: s.icount.unwrap_or(u64::MAX),
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: &s.name,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: &s.id,
            vm_state_size: s.vm_state_size,
        }
    }
}

/// The JSON of `chain`'s first image, the rest nested as its
/// `backing-image`.
fn image_json(chain: &[ImageInfo]) -> Option<ImageJson<'_>> {
    let (img, rest) = chain.split_first()?;
    let file = FileJson {
        children: [],
        virtual_size: img.file_length,
        filename: &img.filename,
        format: "file",
        actual_size: img.actual_size,
        format_specific: FormatSpecific::File {},
        dirty_flag: false,
    };
    Some(ImageJson {
        children: [ChildJson {
            name: "file",
            info: file,
        }],
        snapshots: img.snapshots.iter().map(SnapshotJson::from).collect(),
        backing_filename_format: img.backing_format.as_deref(),
        virtual_size: img.virtual_size,
        filename: &img.filename,
        cluster_size: img.cluster_size,
        format: img.format,
        actual_size: img.actual_size,
        allocated_data_bytes: img.data_bytes,
        format_specific: img.qcow2.as_ref().map(FormatSpecific::Qcow2),
        full_backing_filename: img.full_backing_file.as_deref(),
        backing_filename: img.backing_file.as_deref(),
        backing_image: image_json(rest).map(Box::new),
        dirty_flag: img.dirty,
    })
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
        println!("    compat: {}", q.compat);
        println!("    compression type: {}", q.compression_type);
        if let Some(lazy) = q.lazy_refcounts {
            println!("    lazy refcounts: {lazy}");
        }
        if !q.bitmaps.is_empty() {
            println!("    bitmaps:");
            for (i, b) in q.bitmaps.iter().enumerate() {
                println!("        [{i}]:");
                println!("            flags:");
                for (j, f) in b.flags.iter().enumerate() {
                    println!("                [{j}]: {f}");
                }
                println!("            name: {}", b.name);
                println!("            granularity: {}", b.granularity);
            }
        }
        println!("    refcount bits: {}", q.refcount_bits);
        if let (Some(corrupt), Some(extended_l2)) = (q.corrupt, q.extended_l2) {
            println!("    corrupt: {corrupt}");
            println!("    extended l2: {extended_l2}");
        }
    }
    println!("Child node '/file':");
    println!("    filename: {}", img.filename);
    let protocol = if img.filename.starts_with("rbd:") {
        "rbd"
    } else {
        "file"
    };
    println!("    protocol type: {protocol}");
    if let Some(aio) = img.aio {
        println!("    aio: {aio}");
    }
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
    // An `rbd:` name may carry a key: show the image's name without it.
    let chain = gather_info(&env, &opened, &crate::open::shown_name(&a.file))?;
    if json {
        if a.backing_chain {
            // As qemu-img: an array, one object per image, top first.
            let each: Vec<_> = (0..chain.len())
                .filter_map(|i| image_json(&chain[i..=i]))
                .collect();
            print_json(&each)?;
        } else {
            print_json(&image_json(&chain))?;
        }
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
