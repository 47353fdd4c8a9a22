//! `img snapshot`: lists, creates, applies (reverts the disk to) or deletes
//! the internal snapshots of a qcow2 image nobody is using.

use std::path::PathBuf;

use blockgraph::drivers::qcow2::{Qcow2Driver, Qcow2Options};
use blockgraph::drivers::FileDriver;

use crate::args::{Common, Format};
use crate::open::{add_node, Env, OpenPolicy};
use crate::output::{err, snapshot_table, Res};
use crate::stack::{format_of, FileLayer};

/// List, create, apply or delete a qcow2 image's internal snapshots.
///
/// Applying one reverts the disk to it. The image must not be in use;
/// SNAPSHOT is an id or a name.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    common: Common,
    /// List the snapshots (the default)
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot called NAME
    #[arg(short = 'c', value_name = "NAME", allow_hyphen_values = true)]
    create: Option<String>,
    /// Revert the disk to SNAPSHOT
    #[arg(short = 'a', value_name = "SNAPSHOT", allow_hyphen_values = true)]
    apply: Option<String>,
    /// Delete SNAPSHOT
    #[arg(short = 'd', value_name = "SNAPSHOT", allow_hyphen_values = true)]
    delete: Option<String>,
    /// The image
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

enum Op {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

impl Args {
    /// The one operation asked for.
    fn op(&mut self) -> Res<Op> {
        let mut ops: Vec<Op> = [
            self.list.then_some(Op::List),
            self.create.take().map(Op::Create),
            self.apply.take().map(Op::Apply),
            self.delete.take().map(Op::Delete),
        ]
        .into_iter()
        .flatten()
        .collect();
        match ops.len() {
            0 => Ok(Op::List),
            1 => Ok(ops.remove(0)),
            _ => Err("snapshot: give one of -l, -c, -a, -d".into()),
        }
    }
}

pub fn run(mut a: Args) -> Res<i32> {
    let op = a.op()?;
    let path = a.file;
    let fmt = format_of(a.common.format, &path)?;
    if fmt != Format::Qcow2 {
        return Err(format!(
            "snapshot: '{}' is {}, which has no internal snapshots",
            path.display(),
            fmt.name()
        ));
    }
    let write = !matches!(op, Op::List);
    let policy = OpenPolicy::new(&a.common, write);
    let file =
        FileDriver::open(&path, policy.file_options(FileLayer::default(), write)).map_err(err)?;
    let env = Env::new(1)?;
    let listed = env.io(move |mut cx| async move {
        let node = add_node(&mut cx, "file".into(), Box::new(file), None).await?;
        let g = cx.read().await;
        let n = node.io(&g);
        let opts = Qcow2Options::default();
        let r = match &op {
            Op::List => Qcow2Driver::list_snapshots(n, opts).await,
            Op::Create(name) => Qcow2Driver::create_snapshot(n, opts, name)
                .await
                .map(|_| Vec::new()),
            Op::Apply(key) => Qcow2Driver::apply_snapshot(n, opts, key)
                .await
                .map(|()| Vec::new()),
            Op::Delete(key) => Qcow2Driver::delete_snapshot(n, opts, key)
                .await
                .map(|()| Vec::new()),
        };
        r.map_err(|e| format!("snapshot: {e}"))
    })?;
    // Only a listing returns snapshots; an empty list prints nothing, as
    // qemu-img's.
    if !listed.is_empty() {
        print!("{}", snapshot_table(&listed));
    }
    Ok(0)
}
