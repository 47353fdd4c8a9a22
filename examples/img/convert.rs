//! `img convert`: copies any image or stack's contents into a new raw or
//! qcow2 image; zeroes stay sparse.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockgraph::drivers::qcow2::Qcow2Driver;
use blockgraph::ChildRole;

use crate::args::{format_parser, Common, Format, ImageOptions};
use crate::open::{add_node, create_image, Env, OpenPolicy};
use crate::output::{err, human, progress_bar, Res};
use crate::stack::StackArg;

/// Copy an image's or a stack's contents into a new raw or qcow2 image.
///
/// Zeroes stay sparse. With --stack, SRC is the stack's FILE, if it needs
/// one.
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "img convert [OPTIONS] <SRC> <DST>\n       img convert [OPTIONS] --stack <STACK> [SRC] <DST>"
)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    stack: StackArg,
    /// The new image's format: raw (the default) or qcow2
    #[arg(short = 'O', value_name = "FMT", allow_hyphen_values = true,
          value_parser = format_parser("output format"))]
    output_format: Option<Format>,
    /// qcow2 options: cluster_size=SIZE,compat=0.10|1.1
    #[arg(short = 'o', value_name = "OPTIONS", allow_hyphen_values = true,
          value_parser = ImageOptions::parse)]
    options: Option<ImageOptions>,
    /// Show a progress bar on stderr (when it is a terminal)
    #[arg(short = 'p', long)]
    progress: bool,
    /// The source and the new image
    #[arg(value_names = ["SRC", "DST"], num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
}

/// Copy unit: large enough to be efficient, small enough to skip zeroes.
const CHUNK: u64 = 1 << 20;
/// Copies in flight.
const WORKERS: u64 = 4;

pub fn run(a: Args) -> Res<i32> {
    let (src, dst) = match (a.paths.as_slice(), &a.stack.stack) {
        ([dst], Some(_)) => (None, dst.clone()),
        ([src, dst], _) => (Some(src.clone()), dst.clone()),
        _ => return Err("convert: expected SRC DST (or --stack STACK [SRC] DST)".into()),
    };
    let out_fmt = a.output_format.unwrap_or(Format::Raw);
    let options = a.options.unwrap_or_default();
    if out_fmt == Format::Raw && !options.is_empty() {
        return Err("convert: raw images take no -o options".into());
    }
    let layers = a.stack.layers(a.common.format, src.as_deref())?;
    let env = Env::new(1)?;
    let source = env.open(layers, src, OpenPolicy::new(&a.common, false), "src-")?;
    let src_blk = env.backend("src-blk", &source.top, false)?;
    let b = src_blk.clone();
    let size = env
        .io(move |mut cx| async move { b.length(&mut cx).await })
        .map_err(err)?;
    if size == 0 {
        return Err("convert: the source is empty".into());
    }
    // The destination.
    let qcow2 = (out_fmt == Format::Qcow2).then(|| options.qcow2(size));
    let path = dst.clone();
    let dst_top = env.io(move |mut cx| async move {
        let file = create_image(&mut cx, "dst-file", &path, size, qcow2.as_ref()).await?;
        if qcow2.is_none() {
            return Ok(file);
        }
        let drv = {
            let g = cx.read().await;
            Qcow2Driver::open(file.io(&g), Default::default())
                .await
                .map_err(err)?
        };
        add_node(
            &mut cx,
            "dst".into(),
            Box::new(drv),
            Some((ChildRole::File, file)),
        )
        .await
    });
    // Nothing half-made is left behind.
    let dst_top = dst_top.inspect_err(|_| {
        let _ = std::fs::remove_file(&dst);
    })?;
    let dst_blk = env.backend("dst-blk", &dst_top, true)?;
    let copied = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(
        a.progress,
        size,
        "{wide_bar} {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
    );
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (src, dst, copied) = (src_blk.clone(), dst_blk.clone(), copied.clone());
            let bar = bar.clone();
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
                            .map_err(|e| format!("writing the destination at {off}: {e}"))?;
                        copied.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    bar.inc(len as u64);
                    off += WORKERS * CHUNK;
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
    // The bar goes before the result (or the error) is printed.
    bar.finish_and_clear();
    if let Some(e) = failure.or(flushed.err()) {
        return Err(e);
    }
    println!(
        "converted {} ({} of data) to '{}'",
        human(size),
        human(copied.load(Ordering::Relaxed)),
        dst.display()
    );
    Ok(0)
}
