//! `img check`: checks (and with `-r` repairs) a qcow2 image's metadata,
//! with `qemu-img check`'s report and exit status.

use std::path::PathBuf;

use blockgraph::drivers::qcow2::Qcow2Driver;

use crate::args::{Common, Format};
use crate::open::{Env, OpenPolicy};
use crate::output::{err, Res};
use crate::stack::{format_of, image_layers};

/// Check (and repair) a qcow2 image's metadata.
///
/// Exit status: 0 clean, 2 corruptions, 3 leaks only, 63 a format without
/// checks.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// Repair what is found (leaks or all: both repair everything they can)
    #[arg(short = 'r', value_name = "WHAT", value_enum)]
    repair: Option<Repair>,
    /// The image
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Repair {
    Leaks,
    All,
}

pub fn run(a: Args) -> Res<i32> {
    let repair = a.repair.is_some();
    let fmt = format_of(a.common.format, &a.file)?;
    if fmt == Format::Raw {
        println!("This image format does not support checks");
        return Ok(63);
    }
    let layers = image_layers(None, Some(fmt), Some(&a.file))?;
    let env = Env::new(1)?;
    let opened = env.open(layers, Some(a.file), OpenPolicy::new(&a.common, repair), "")?;
    let top = opened.top.clone();
    let report = env.io(move |mut cx| async move {
        let g = cx.read().await;
        let n = top.io(&g);
        let q = n.driver_as::<Qcow2Driver>().ok_or("not a qcow2 image")?;
        q.check(n, repair).await.map_err(err)
    })?;
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
    // qemu-img check's exit status.
    Ok(if corrupt > 0 {
        2
    } else if leaks > 0 {
        3
    } else {
        0
    })
}
