//! Opening an image file together with its backing files, under a backing
//! policy the embedder controls.
//!
//! Backing file names come from the image, so they are untrusted: a guest
//! that can write an image header could otherwise point it at any host
//! file. [`BackingPolicy`] decides which names resolve: by default only
//! relative names that stay inside the image's directory (no absolute
//! paths, no `..` leaving it, no symbolic link leading out of it), at most
//! 16 backing files deep, no loops, and a backing format must be recorded
//! in the image (no probing, which would let a raw guest disk pose as a
//! qcow2 image naming host files).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::drivers::{FileDriver, FileOptions};
use crate::graph::driver::BlockDriver;
use crate::graph::proof::NodeHandle;
use crate::graph::runtime::IoTask;
use crate::types::ChildRole;
use crate::types::{Error, Result};

use super::header::MAGIC;
use super::options::Qcow2Options;
use super::state::Qcow2Driver;

/// Opens a host file as a protocol driver: `(path, writable)`.
pub type FileOpener = Arc<dyn Fn(&Path, bool) -> Result<Box<dyn BlockDriver>> + Send + Sync>;

/// Which backing file names an image may use.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackingPolicy {
    /// Accept absolute backing paths (default `false`).
    pub allow_absolute: bool,
    /// Accept relative names that leave the image's directory, through
    /// `..` or a symbolic link (default `false`).
    pub allow_escape: bool,
    /// Most backing files below the top image (default 16).
    pub max_depth: usize,
    /// Guess a backing file's format from its first bytes when the image
    /// records none (default `false`).
    pub allow_probing: bool,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            allow_absolute: false,
            allow_escape: false,
            max_depth: 16,
            allow_probing: false,
        }
    }
}

impl BackingPolicy {
    /// Resolves backing file `name`, stored in the image at `image`, to a
    /// host path, or says why the policy refuses it.
    ///
    /// ```
    /// use std::path::Path;
    /// use blockgraph::drivers::qcow2::BackingPolicy;
    ///
    /// let p = BackingPolicy::default();
    /// assert_eq!(p.resolve(Path::new("/vm/top.qcow2"), "base.qcow2")?, Path::new("/vm/base.qcow2"));
    /// assert!(p.resolve(Path::new("/vm/top.qcow2"), "/etc/shadow").is_err());
    /// assert!(p.resolve(Path::new("/vm/top.qcow2"), "../other/base.qcow2").is_err());
    /// # Ok::<(), blockgraph::Error>(())
    /// ```
    pub fn resolve(&self, image: &Path, name: &str) -> Result<PathBuf> {
        let refuse = |reason: &str| Error::BackingRefused {
            image: image.display().to_string(),
            backing: name.to_owned(),
            reason: reason.to_owned(),
        };
        if name.is_empty() || name.contains('\0') {
            return Err(refuse("empty name or NUL byte"));
        }
        if name.starts_with("json:") || name.contains("://") {
            return Err(refuse(
                "protocol and JSON backing specifications are not supported",
            ));
        }
        let base = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let p = Path::new(name);
        if p.is_absolute() {
            if !self.allow_absolute {
                return Err(refuse(
                    "absolute backing paths are not allowed by the backing policy",
                ));
            }
            return Ok(p.to_path_buf());
        }
        let mut rel = PathBuf::new();
        let mut depth = 0usize;
        for comp in p.components() {
            match comp {
                Component::Normal(x) => {
                    rel.push(x);
                    depth += 1;
                }
                Component::CurDir => {}
                Component::ParentDir if depth > 0 => {
                    rel.pop();
                    depth -= 1;
                }
                Component::ParentDir => {
                    if !self.allow_escape {
                        return Err(refuse(
                            "'..' leaves the image's directory, which the backing policy forbids",
                        ));
                    }
                    rel.push("..");
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse("not a relative path"));
                }
            }
        }
        if depth == 0 && !self.allow_escape {
            return Err(refuse("names the image's directory, not a file"));
        }
        let joined = base.join(&rel);
        if !self.allow_escape {
            if let (Ok(real), Ok(real_base)) = (joined.canonicalize(), base.canonicalize()) {
                if !real.starts_with(&real_base) {
                    return Err(refuse(
                        "resolves through a symbolic link to outside the image's directory",
                    ));
                }
            }
        }
        Ok(joined)
    }
}

/// How [`open_image_chain`] opens an image and its backing files.
#[non_exhaustive]
pub struct ChainOptions {
    /// Name of the top qcow2 node; the others derive from it
    /// (`NAME-file`, `NAME-b1`, `NAME-b1-file`, …).
    pub node_name: String,
    /// Which backing files may be opened.
    pub policy: BackingPolicy,
    /// Open the top image writable (backing files are always read-only).
    pub writable: bool,
    /// Options for every qcow2 image of the chain (`read_only` is set per
    /// image).
    pub qcow2: Qcow2Options,
    /// How host files become nodes (default: [`FileDriver`] with default
    /// options, read-only for backing files).
    pub opener: Option<FileOpener>,
}

impl ChainOptions {
    /// Defaults: writable top image, [`BackingPolicy::default`], host files
    /// through [`FileDriver`].
    pub fn new(node_name: impl Into<String>) -> Self {
        ChainOptions {
            node_name: node_name.into(),
            policy: BackingPolicy::default(),
            writable: true,
            qcow2: Qcow2Options::default(),
            opener: None,
        }
    }
}

impl std::fmt::Debug for ChainOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainOptions")
            .field("node_name", &self.node_name)
            .field("policy", &self.policy)
            .field("writable", &self.writable)
            .field("custom_opener", &self.opener.is_some())
            .finish()
    }
}

/// One image of an opened chain.
#[derive(Debug, Clone)]
pub struct ChainImage {
    /// The host path it was opened from.
    pub path: PathBuf,
    /// `"qcow2"` or `"raw"`.
    pub format: &'static str,
    /// The image's node (for raw images, the file node itself).
    pub node: NodeHandle,
    /// The file node holding the image.
    pub file: NodeHandle,
}

/// The nodes [`open_image_chain`] added, top image first.
#[derive(Debug, Clone)]
pub struct ImageChain {
    /// Top image first, then each backing file.
    pub images: Vec<ChainImage>,
}

impl ImageChain {
    /// The top image's node: attach a backend to it.
    pub fn top(&self) -> &NodeHandle {
        &self.images[0].node
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Qcow2,
    Raw,
}

struct Level {
    path: PathBuf,
    file: NodeHandle,
    qcow2: Option<Qcow2Driver>,
    name: String,
}

/// Opens the qcow2 image at `path` and its backing chain, adds their nodes
/// to the graph, and returns them.
///
/// Runs on an I/O thread: it reads headers under read guards and adds nodes
/// through [`IoTask::run_on_main_loop`]. Each backing name is resolved by
/// `options.policy` relative to the image that names it; refusals, loops
/// and chains deeper than the policy allows are
/// [`Error::BackingRefused`]. On any error, the nodes added so far are
/// removed again.
pub async fn open_image_chain(
    cx: &mut IoTask,
    path: impl AsRef<Path>,
    options: ChainOptions,
) -> Result<ImageChain> {
    let mut added: Vec<NodeHandle> = Vec::new();
    let result = open_inner(cx, path.as_ref(), options, &mut added).await;
    if result.is_err() {
        remove_nodes(cx, added).await;
    }
    result
}

async fn open_inner(
    cx: &mut IoTask,
    top: &Path,
    options: ChainOptions,
    added: &mut Vec<NodeHandle>,
) -> Result<ImageChain> {
    let opener: FileOpener = options.opener.clone().unwrap_or_else(|| {
        Arc::new(|path: &Path, writable: bool| {
            let opts = FileOptions {
                read_only: !writable,
                ..FileOptions::default()
            };
            Ok(Box::new(FileDriver::open(path, opts)?) as Box<dyn BlockDriver>)
        })
    });
    let mut levels: Vec<(Level, Format)> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut path = top.to_path_buf();
    let mut format = Some(Format::Qcow2);
    let mut naming: Option<(PathBuf, String)> = None;
    loop {
        let depth = levels.len();
        let refuse = |reason: String| {
            let (image, backing) = naming
                .clone()
                .unwrap_or_else(|| (path.clone(), String::new()));
            Error::BackingRefused {
                image: image.display().to_string(),
                backing,
                reason,
            }
        };
        if depth > options.policy.max_depth {
            return Err(refuse(format!(
                "the backing chain is deeper than the policy's limit of {}",
                options.policy.max_depth
            )));
        }
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        if !seen.insert(canonical) {
            return Err(refuse(format!(
                "the backing chain loops back to '{}'",
                path.display()
            )));
        }
        let name = if depth == 0 {
            options.node_name.clone()
        } else {
            format!("{}-b{depth}", options.node_name)
        };
        let writable = depth == 0 && options.writable;
        let driver = opener(&path, writable)?;
        let file_name = format!("{name}-file");
        let file = cx
            .run_on_main_loop(move |bql| bql.write(|w| w.add_node_boxed(&file_name, driver, &[])))
            .await??;
        added.push(file.clone());

        let fmt = match format {
            Some(f) => f,
            None => {
                let g = cx.read().await;
                let (_request, node) = file.io(&g).admit()?;
                let len = node.length().await?;
                let align = u64::from(node.request_alignment().max(1));
                let head =
                    super::file_io::read_file(node, align, len, 0, 4.min(len as usize)).await?;
                if head.len() == 4
                    && u32::from_be_bytes([head[0], head[1], head[2], head[3]]) == MAGIC
                {
                    Format::Qcow2
                } else {
                    Format::Raw
                }
            }
        };
        if fmt == Format::Raw {
            levels.push((
                Level {
                    path: path.clone(),
                    file,
                    qcow2: None,
                    name,
                },
                fmt,
            ));
            break;
        }
        let mut qopts = options.qcow2.clone();
        qopts.read_only = !writable;
        let drv = {
            let g = cx.read().await;
            Qcow2Driver::open(file.io(&g), qopts).await?
        };
        let next = drv.backing_file();
        let next_format = drv.backing_format();
        levels.push((
            Level {
                path: path.clone(),
                file,
                qcow2: Some(drv),
                name,
            },
            fmt,
        ));
        let Some(next) = next else { break };
        let resolved = options.policy.resolve(&path, &next)?;
        format = match next_format.as_deref() {
            Some("qcow2") => Some(Format::Qcow2),
            Some("raw") => Some(Format::Raw),
            Some(other) => {
                return Err(Error::UnsupportedImage {
                    format: "qcow2",
                    feature: format!("backing format '{other}'"),
                })
            }
            None if options.policy.allow_probing => None,
            None => {
                return Err(Error::BackingRefused {
                    image: path.display().to_string(),
                    backing: next,
                    reason: "the image records no backing format and the policy forbids probing"
                        .into(),
                })
            }
        };
        naming = Some((path.clone(), next));
        path = resolved;
    }

    // Add the format nodes bottom-up, each on top of the one below.
    let mut below: Option<NodeHandle> = None;
    let mut images = Vec::new();
    for (level, fmt) in levels.into_iter().rev() {
        let node = match level.qcow2 {
            None => level.file.clone(),
            Some(drv) => {
                let file = level.file.clone();
                let backing = below.clone();
                let name = level.name.clone();
                let node = cx
                    .run_on_main_loop(move |bql| {
                        bql.write(|w| {
                            let mut kids = vec![(ChildRole::File, &file)];
                            if let Some(b) = &backing {
                                kids.push((ChildRole::Backing, b));
                            }
                            w.add_node(&name, drv, &kids)
                        })
                    })
                    .await??;
                added.push(node.clone());
                node
            }
        };
        images.push(ChainImage {
            path: level.path,
            format: if fmt == Format::Raw { "raw" } else { "qcow2" },
            node: node.clone(),
            file: level.file,
        });
        below = Some(node);
    }
    images.reverse();
    Ok(ImageChain { images })
}

/// Removes `nodes` (added in order, children first), parents first.
async fn remove_nodes(cx: &mut IoTask, nodes: Vec<NodeHandle>) {
    let _ = cx
        .run_on_main_loop(move |bql| {
            for h in nodes.iter().rev() {
                let d = bql.drain(h);
                let _ = bql.write(|w| w.remove_node(&d));
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: Result<PathBuf>) -> bool {
        matches!(r, Err(Error::BackingRefused { .. }))
    }

    #[test]
    fn default_policy_keeps_names_inside_the_image_directory() {
        let p = BackingPolicy::default();
        let img = Path::new("/vm/disks/top.qcow2");
        assert_eq!(
            p.resolve(img, "base.qcow2").unwrap(),
            Path::new("/vm/disks/base.qcow2")
        );
        assert_eq!(
            p.resolve(img, "./sub/b.img").unwrap(),
            Path::new("/vm/disks/sub/b.img")
        );
        assert_eq!(
            p.resolve(img, "sub/../b.img").unwrap(),
            Path::new("/vm/disks/b.img")
        );
        assert!(refused(p.resolve(img, "/etc/passwd")));
        assert!(refused(p.resolve(img, "../b.img")));
        assert!(refused(p.resolve(img, "sub/../../b.img")));
        assert!(refused(p.resolve(img, "")));
        assert!(refused(p.resolve(img, ".")));
        assert!(refused(p.resolve(img, "json:{\"driver\":\"file\"}")));
        assert!(refused(p.resolve(img, "nbd://host/export")));
    }

    #[test]
    fn relaxed_policy_allows_what_it_says() {
        let p = BackingPolicy {
            allow_absolute: true,
            allow_escape: true,
            ..BackingPolicy::default()
        };
        let img = Path::new("/vm/disks/top.qcow2");
        assert_eq!(
            p.resolve(img, "/srv/base.img").unwrap(),
            Path::new("/srv/base.img")
        );
        assert_eq!(
            p.resolve(img, "../b.img").unwrap(),
            Path::new("/vm/disks/../b.img")
        );
    }

    #[test]
    fn relative_image_path_resolves_against_its_directory() {
        let p = BackingPolicy::default();
        assert_eq!(
            p.resolve(Path::new("top.qcow2"), "b.qcow2").unwrap(),
            Path::new("./b.qcow2")
        );
    }

    #[test]
    fn symlink_out_of_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        let img = dir.path().join("top.qcow2");
        let p = BackingPolicy::default();
        assert!(refused(p.resolve(&img, "link")));
        std::fs::write(dir.path().join("inside"), b"x").unwrap();
        assert!(p.resolve(&img, "inside").is_ok());
    }
}
