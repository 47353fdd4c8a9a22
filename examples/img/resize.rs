//! `img resize`: changes an image's virtual size to SIZE, or by +SIZE or
//! -SIZE (shrinking only with `--shrink`).

use std::path::PathBuf;

use blockgraph::BackendOptions;

use crate::args::{parse_size, Common};
use crate::open::{Env, OpenPolicy};
use crate::output::{err, Res};
use crate::stack::image_layers;

/// Change an image's virtual size.
///
/// Shrinking needs --shrink; qcow2 shrinks only over areas that hold no
/// data, so discard them first.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Allow the image to get smaller
    #[arg(long)]
    shrink: bool,
    /// The image
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The new size, or +SIZE / -SIZE relative to the current one
    #[arg(value_name = "SIZE", allow_hyphen_values = true, value_parser = NewSize::parse)]
    size: NewSize,
}

/// `SIZE`, `+SIZE` or `-SIZE`.
#[derive(Debug, Clone, Copy)]
enum NewSize {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

impl NewSize {
    fn parse(s: &str) -> Res<NewSize> {
        Ok(if let Some(d) = s.strip_prefix('+') {
            NewSize::Grow(parse_size("SIZE", d)?)
        } else if let Some(d) = s.strip_prefix('-') {
            NewSize::Shrink(parse_size("SIZE", d)?)
        } else {
            NewSize::Absolute(parse_size("SIZE", s)?)
        })
    }

    /// The new size of an image of `old` bytes.
    fn from(self, old: u64) -> Res<u64> {
        match self {
            NewSize::Absolute(n) => Ok(n),
            NewSize::Grow(d) => old
                .checked_add(d)
                .ok_or_else(|| "resize: the new size overflows".into()),
            NewSize::Shrink(d) => old
                .checked_sub(d)
                .ok_or_else(|| "resize: cannot shrink below zero".into()),
        }
    }
}

pub fn run(a: Args) -> Res<i32> {
    let layers = image_layers(None, a.common.format, Some(&a.file))?;
    let (spec, shrink) = (a.size, a.shrink);
    let env = Env::new(1)?;
    let opened = env.open(layers, Some(a.file), OpenPolicy::new(&a.common, true), "")?;
    // Resizing needs the resize permission: QEMU's `block_resize` takes it
    // on a backend of its own, as this one does.
    let blk = env.backend_with("resize", &opened.top, BackendOptions::resizable())?;
    env.io(move |mut cx| async move {
        let old = blk.length(&mut cx).await.map_err(err)?;
        let new = spec.from(old)?;
        if new < old && !shrink {
            return Err(format!(
                "resize: shrinking from {old} to {new} bytes drops data past the new end; \
                 give --shrink if that is meant"
            ));
        }
        blk.truncate(&mut cx, new).await.map_err(err)?;
        blk.flush(&mut cx).await.map_err(err)
    })?;
    println!("Image resized.");
    Ok(0)
}
