//! `img`: a `qemu-img`-like command line over blockgraph's driver stack.
//!
//! It creates, inspects, checks, copies, compares, resizes and snapshots
//! raw and qcow2 images, and measures any stack of blockgraph drivers.
//! Each subcommand is one module:
//!
//! | subcommand | module | what it does |
//! | --- | --- | --- |
//! | `create`   | [`create`]   | a new raw or qcow2 image, optionally over a backing file |
//! | `info`     | [`info`]     | what `qemu-img info` shows, as text or the same JSON |
//! | `check`    | [`check`]    | checks (and repairs) a qcow2 image's metadata |
//! | `convert`  | [`convert`]  | copies any image or stack into a new (or, with `-n`, an existing) raw or qcow2 image |
//! | `compare`  | [`compare`]  | compares two images' contents |
//! | `resize`   | [`resize`]   | changes an image's virtual size |
//! | `snapshot` | [`snapshot`] | lists, creates, applies and deletes internal snapshots |
//! | `bench`    | [`bench`]    | runs I/O through a stack and reports IOPS and latency |
//!
//! The shared modules: [`args`] (the options every subcommand takes and the
//! parsers of sizes, counts and formats), [`stack`] (the `--stack` syntax
//! and format probing), [`open`] (opening and creating images on an I/O
//! thread) and [`output`] (errors, sizes, tables and progress bars).
//!
//! ```text
//! cargo run --release --example img -- help
//! cargo run --release --example img -- create -f qcow2 -o cluster_size=64k disk.qcow2 1G
//! cargo run --release --example img -- info --output=json disk.qcow2
//! cargo run --release --example img -- bench --stack throttle:iops-total=200/null:size=1G --time 2
//! ```
//!
//! Every failure is one line on stderr (`img: ...`) and a non-zero exit
//! status, usage errors included: 1, or 2 for `compare` (where 1 means
//! "different"); `check` exits 2 for corruptions, 3 for leaks only and 63
//! for a format without checks, as `qemu-img check` does. A panic is a bug
//! and exits 70.

mod args;
mod bench;
mod check;
mod compare;
mod convert;
mod create;
mod info;
mod open;
mod output;
mod resize;
mod snapshot;
mod stack;

use clap::{CommandFactory, Parser, Subcommand};

const EXIT_HELP: &str = "\
Sizes take k, M, G, T suffixes (powers of 1024).

Exit status: 0 success; 1 error; compare: 1 different, 2 error;
check: 2 corruptions, 3 leaks only, 63 format without checks.";

/// A qemu-img-like tool over blockgraph's driver stack.
#[derive(Parser)]
#[command(name = "img", subcommand_required = true,
          after_help = format!("{}\n\n{EXIT_HELP}", stack::HELP))]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Create(create::Args),
    Info(info::Args),
    Check(check::Args),
    Convert(convert::Args),
    Compare(compare::Args),
    Resize(resize::Args),
    Snapshot(snapshot::Args),
    Bench(bench::Args),
}

impl Command {
    /// Runs the subcommand: its exit status, or the message of its failure.
    fn run(self) -> output::Res<i32> {
        match self {
            Command::Create(a) => create::run(a),
            Command::Info(a) => info::run(a),
            Command::Check(a) => check::run(a),
            Command::Convert(a) => convert::run(a),
            Command::Compare(a) => compare::run(a),
            Command::Resize(a) => resize::run(a),
            Command::Snapshot(a) => snapshot::run(a),
            Command::Bench(a) => bench::run(a),
        }
    }
}

/// The exit status of a failure, usage errors included: `compare` keeps 1
/// for "the images differ", as `qemu-img compare` does.
fn failure_status(subcommand: Option<&str>) -> i32 {
    match subcommand {
        Some("compare") => 2,
        _ => 1,
    }
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("img: internal error (this is a bug): {info}");
    }));
    // A panic is a bug; the hook above printed it on one line.
    let code = std::panic::catch_unwind(run).unwrap_or(70);
    std::process::exit(code);
}

fn run() -> i32 {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The subcommand, if the first argument names one (clap's errors do not
    // say which subcommand they are about).
    let subcommand = argv
        .get(1)
        .and_then(|a| a.to_str())
        .and_then(|a| Cli::command().find_subcommand(a).cloned());
    let name = subcommand.as_ref().map(|c| c.get_name().to_owned());
    let status = failure_status(name.as_deref());
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                // Help on stdout, as asked for.
                let _ = e.print();
                return 0;
            }
            output::fail(&output::usage_error(&e, subcommand.as_ref()));
            return status;
        }
    };
    match cli.command.run() {
        Ok(code) => code,
        Err(msg) => {
            output::fail(&msg);
            status
        }
    }
}
