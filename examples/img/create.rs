//! `img create`: makes a new raw or qcow2 image, a qcow2 one optionally
//! over a backing file (whose size it takes when SIZE is left out).

use std::path::PathBuf;

use blockgraph::drivers::FileOptions;

use crate::args::{format_parser, size_parser, Common, Format, ImageOptions};
use crate::open::{create_image, Env, OpenPolicy};
use crate::output::{err, Res};
use crate::stack::{format_of, image_layers};

/// Create a raw or qcow2 image.
///
/// SIZE may be left out with -b (the backing file's size).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Options: cluster_size=SIZE,compat=0.10|1.1 (qcow2),
    /// preallocation=off|metadata|falloc|full (metadata: qcow2 only)
    #[arg(short = 'o', value_name = "OPTIONS", allow_hyphen_values = true,
          value_parser = ImageOptions::parse)]
    options: Option<ImageOptions>,
    /// The backing file (qcow2 only), relative to the new image
    #[arg(
        short = 'b',
        long = "backing",
        value_name = "BACKING",
        allow_hyphen_values = true
    )]
    backing: Option<String>,
    /// The backing file's format (default: probed)
    #[arg(short = 'F', long = "backing-format", value_name = "FMT", allow_hyphen_values = true,
          value_parser = format_parser("backing format"))]
    backing_format: Option<Format>,
    /// The new image
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Its virtual size
    #[arg(value_name = "SIZE", value_parser = size_parser("SIZE", u64::MAX))]
    size: Option<u64>,
}

pub fn run(a: Args) -> Res<i32> {
    let format = a.common.format.unwrap_or(Format::Raw);
    let options = a.options.unwrap_or_default();
    if format == Format::Raw && (a.backing.is_some() || !options.qcow2_only_empty()) {
        return Err("create: raw images take no -b and no -o options but preallocation".into());
    }
    if a.backing_format.is_some() && a.backing.is_none() {
        return Err("create: -F needs -b".into());
    }
    let env = Env::new(1)?;
    // The backing file, resolved as a reader will resolve it.
    let backing = match &a.backing {
        None => None,
        Some(name) => {
            let policy = OpenPolicy::new(&a.common, false);
            let resolved = policy
                .backing_policy()
                .resolve(&a.file, name)
                .map_err(err)?;
            let fmt = format_of(a.backing_format, &resolved)?;
            let layers = image_layers(None, Some(fmt), Some(&resolved))?;
            let opened = env
                .open(layers, Some(resolved), policy, "backing-")
                .map_err(|e| format!("backing file '{name}': {e}"))?;
            Some((name.clone(), fmt, env.length(&opened.top)?))
        }
    };
    let size = match (a.size, &backing) {
        (Some(s), _) => s,
        (None, Some((_, _, len))) => *len,
        (None, None) => {
            return Err(format!(
                "create: a {} image needs a SIZE{}",
                format.name(),
                if format == Format::Qcow2 {
                    " (or -b)"
                } else {
                    ""
                }
            ))
        }
    };
    if size == 0 {
        return Err("create: SIZE must be positive".into());
    }
    let qcow2 = (format == Format::Qcow2).then(|| {
        let opts = options.qcow2(size);
        match &backing {
            Some((name, fmt, _)) => opts.backing(name.clone(), fmt.name().to_owned()),
            None => opts,
        }
    });
    let path = a.file.clone();
    env.io(move |mut cx| async move {
        create_image(
            &mut cx,
            "new-file",
            &path,
            size,
            qcow2.as_ref(),
            FileOptions::default(),
            options.prealloc(),
        )
        .await
    })?;
    let mut line = format!(
        "Formatting '{}', fmt={} size={size}",
        crate::open::shown_name(&a.file.to_string_lossy()),
        format.name()
    );
    if let Some((name, fmt, _)) = &backing {
        line += &format!(" backing_file={name} backing_fmt={}", fmt.name());
    }
    if let Some(p) = options.preallocation {
        line += &format!(" preallocation={p}");
    }
    println!("{line}");
    Ok(0)
}
