//! `img compare`: compares two images' contents; exit status 0 identical,
//! 1 different, 2 error (as `qemu-img compare`).

use std::path::PathBuf;

use crate::args::{format_parser, Common, Format};
use crate::open::{Env, OpenPolicy};
use crate::output::{err, Res};
use crate::stack::image_layers;

/// Compare two images' contents.
///
/// Exit status: 0 identical, 1 different, 2 error. An image longer than
/// the other must read zeroes past the other's end.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// The second image's format (default: -f's, or probed)
    #[arg(short = 'F', value_name = "FMT", allow_hyphen_values = true,
          value_parser = format_parser("format"))]
    format2: Option<Format>,
    /// The first image
    #[arg(value_name = "A")]
    a: PathBuf,
    /// The second image
    #[arg(value_name = "B")]
    b: PathBuf,
}

/// Compared in pieces of this size.
const CHUNK: u64 = 1 << 20;

pub fn run(a: Args) -> Res<i32> {
    let la = image_layers(None, a.common.format, Some(&a.a))?;
    let lb = image_layers(None, a.format2.or(a.common.format), Some(&a.b))?;
    let env = Env::new(1)?;
    let policy = OpenPolicy::new(&a.common, false);
    let ia = env.open(la, Some(a.a), policy.clone(), "a-")?;
    let ib = env.open(lb, Some(a.b), policy, "b-")?;
    let (ba, bb) = (
        env.backend("a", &ia.top, false)?,
        env.backend("b", &ib.top, false)?,
    );
    let (size_a, size_b, mismatch) = env.io(move |mut cx| async move {
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
