//! What the copying jobs' setups share (stream, commit, mirror, backup):
//! the options every job has (its filter node's name, the copy engine's
//! options) and their builder methods, the options of the two
//! backing-chain jobs (stream and commit), the create / set up / start
//! sequence, and small graph helpers.

use crate::graph::backend::BackendOptions;
use crate::graph::proof::{Bql, Drained, GraphWriter, NodeHandle};
use crate::graph::runtime::IoThreadHandle;
use crate::types::{ChildRole, Perm, Permissions, Result};

use super::copy::CopyOptions;
use super::driver::JobDriver;
use super::handle::{Job, JobOptions};
use super::status::JobType;

/// The options every copying job has.
#[derive(Debug, Clone)]
pub(super) struct CommonOptions {
    pub(super) filter_node_name: Option<String>,
    pub(super) copy: CopyOptions,
}

impl CommonOptions {
    pub(super) fn new(copy: CopyOptions) -> Self {
        CommonOptions {
            filter_node_name: None,
            copy,
        }
    }

    /// The filter node's name: the one given, or `<job id>-<suffix>`.
    pub(super) fn filter_name(&self, job: &Job, suffix: &str) -> String {
        self.filter_node_name
            .clone()
            .unwrap_or_else(|| format!("{}-{suffix}", job.id()))
    }
}

/// The options of a job on a backing chain (stream and commit): `top`, an
/// optional `base` below it, the backing file name to write.
#[derive(Debug, Clone)]
pub(super) struct ChainOptions {
    pub(super) top: NodeHandle,
    pub(super) base: Option<NodeHandle>,
    pub(super) backing_file: Option<(String, String)>,
    pub(super) common: CommonOptions,
}

impl ChainOptions {
    pub(super) fn new(top: &NodeHandle) -> Self {
        ChainOptions {
            top: top.clone(),
            base: None,
            backing_file: None,
            common: CommonOptions::new(CopyOptions::default()),
        }
    }
}

/// The builder methods of [`CommonOptions`], for an options struct that
/// holds it at `self.<path>`: `filter_node_name` (its doc names the
/// default suffix) and `copy_options` (documented by the attributes given).
macro_rules! common_option_setters {
    ($($path:ident).+, $suffix:literal, $(#[$copy_doc:meta])*) => {
        #[doc = concat!("The name of the job's filter node (default `<job id>-", $suffix, "`).")]
        pub fn filter_node_name(mut self, name: impl Into<String>) -> Self {
            self.$($path).+.filter_node_name = Some(name.into());
            self
        }

        $(#[$copy_doc])*
        pub fn copy_options(mut self, copy: CopyOptions) -> Self {
            self.$($path).+.copy = copy;
            self
        }
    };
}

/// The builder methods of [`ChainOptions`], held at `self.<path>`: `base`
/// and `backing_file`, each documented by the attributes given.
macro_rules! chain_option_setters {
    ($($path:ident).+, base: $(#[$base_doc:meta])*, backing_file: $(#[$file_doc:meta])*) => {
        $(#[$base_doc])*
        pub fn base(mut self, base: &NodeHandle) -> Self {
            self.$($path).+.base = Some(base.clone());
            self
        }

        $(#[$file_doc])*
        pub fn backing_file(mut self, file: impl Into<String>, format: impl Into<String>) -> Self {
            self.$($path).+.backing_file = Some((file.into(), format.into()));
            self
        }
    };
}

/// Creates a job of `kind`, sets it up with `set_up` and starts its
/// driver on `io`; if setup fails, the job goes away again (setup has
/// undone what it did) and its error is returned; if it panics, the job
/// goes away and the panic goes on.
pub(super) fn launch<D: JobDriver>(
    bql: &mut Bql,
    io: &IoThreadHandle,
    kind: JobType,
    options: &JobOptions,
    set_up: impl FnOnce(&mut Bql, &Job) -> Result<D>,
) -> Result<Job> {
    let job = Job::create(bql, kind, options)?;
    // A panic in setup (a caller's step such as `BackupOptions::at_start`)
    // takes the job away too before it goes on to the caller (rule 20).
    let set_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| set_up(bql, &job)));
    match set_up {
        Ok(Ok(driver)) => {
            job.start(bql, io, driver)?;
            Ok(job)
        }
        Ok(Err(e)) => {
            job.early_fail(bql);
            Err(e)
        }
        Err(panic) => {
            job.early_fail(bql);
            std::panic::resume_unwind(panic)
        }
    }
}

/// `node`'s length, read in a task of `io`.
pub(super) fn length_of(bql: &mut Bql, io: &IoThreadHandle, node: &NodeHandle) -> Result<u64> {
    let n = node.clone();
    bql.block_on(io.spawn(move |mut cx| async move {
        let g = cx.read().await;
        n.try_io(&g)?.length().await
    }))
}

/// The images a backing-chain job drops from the chain (those of `images`
/// still in the graph, top down), each followed by its file and data
/// nodes: what stream, commit and active commit (mirror) remove at the
/// end where nothing else uses it ([`remove_unused`]).
pub(super) fn dropped_with_their_files(bql: &mut Bql, images: &[NodeHandle]) -> Vec<NodeHandle> {
    let mut dropped = Vec::new();
    for n in images {
        let g = n.gs(bql);
        if !g.is_in_graph() {
            continue;
        }
        dropped.push(n.clone());
        dropped.extend(
            g.children()
                .filter(|c| matches!(c.role, ChildRole::File | ChildRole::Data))
                .map(|c| c.node.to_handle()),
        );
    }
    dropped
}

/// Removes each of `drained`, in order, that no parent uses: in the order
/// of [`dropped_with_their_files`] each removal leaves the next one
/// unused, and a node that something else still uses (another overlay
/// shares the image, a user holds a backend on it) stays.
pub(super) fn remove_unused(w: &mut GraphWriter<'_>, drained: &[Drained<'_>]) -> Result<()> {
    for d in drained {
        if w.node(d.name()).is_some_and(|n| n.parents().len() == 0) {
            w.remove_node(d)?;
        }
    }
    Ok(())
}

/// A job's own backend: takes `take`, shares `share`, and stays on its
/// node when a filter goes in above it.
pub(super) fn job_backend(take: Perm, share: Perm) -> BackendOptions {
    BackendOptions {
        perms: Permissions { take, share },
        stay_at_node: true,
    }
}
