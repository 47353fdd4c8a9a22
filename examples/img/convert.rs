//! `img convert`: copies any image or stack's contents into a new raw or
//! qcow2 image; zeroes stay sparse.
//!
//! Like `qemu-img convert`: the source is walked with `block_status`
//! (through its whole backing chain), so what reads as zeroes (holes,
//! unallocated clusters over no backing file, zero clusters) is never read;
//! the data ranges are read and only the granules (a cluster of a qcow2
//! target, 4 KiB of a raw one: QEMU's `-S 4k`) holding a non-zero byte are
//! written, since a new image reads zeroes. Eight copies are in flight
//! (`-m`), and their writes reach the target in the source's order unless
//! `-W`.
//!
//! `-S 0` copies every byte (no scan, a fully allocated target); `-n`
//! copies into an existing image, which need not read zeroes, so what reads
//! as zeroes in the source is zeroed there (`write_zeroes`) unless
//! `--target-is-zero` says it already is.
//!
//! `-o preallocation=metadata|falloc|full` creates the target preallocated
//! (as `img create` does); it still reads zeroes, so the copy is the same
//! and its writes land in the preallocated clusters, allocating nothing.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use blockgraph::driver::BlockStatus;
use blockgraph::drivers::qcow2::Qcow2Driver;
use blockgraph::drivers::FileOptions;
use blockgraph::{BlockBackend, ChildRole, IoBuf, IoTask};
use indicatif::ProgressBar;

use crate::args::{format_parser, parse_size, Common, Format, ImageOptions};
use crate::open::{add_node, create_image, Env, OpenPolicy};
use crate::output::{err, human, progress_bar, Res};
use crate::stack::{image_layers, StackArg};

/// Copy an image's or a stack's contents into a new raw or qcow2 image
/// (or, with -n, an existing one).
///
/// Zeroes stay sparse (unless -S 0). With --stack, SRC is the stack's FILE, if it needs
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
    /// Options: cluster_size=SIZE,compat=0.10|1.1 (qcow2),
    /// preallocation=off|metadata|falloc|full (metadata: qcow2 only)
    #[arg(short = 'o', value_name = "OPTIONS", allow_hyphen_values = true,
          value_parser = ImageOptions::parse)]
    options: Option<ImageOptions>,
    /// Show a progress bar on stderr (when it is a terminal)
    #[arg(short = 'p', long)]
    progress: bool,
    /// Print what the copy did: bytes read from the source, bytes written,
    /// requests and block-status calls
    #[arg(long)]
    stats: bool,
    /// Copies in flight, 1 to 16 (default 8)
    #[arg(short = 'm', value_name = "NUM", default_value_t = WORKERS,
          value_parser = parse_in_flight)]
    in_flight: u64,
    /// Let writes reach the target out of the source's order
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Runs of zero bytes at least this long stay sparse (default: a
    /// cluster of a qcow2 target, 4k for raw); 0 writes every byte
    #[arg(short = 'S', value_name = "SIZE", value_parser = parse_sparse)]
    sparse_size: Option<u64>,
    /// Copy into DST, an existing image (in -O's format), instead of
    /// creating it
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: DST already reads zeroes everywhere, so zeroes need not be
    /// written
    #[arg(long)]
    target_is_zero: bool,
    /// The target's cache mode: unsafe (the default, as qemu-img's: the
    /// data may still be in the host's page cache when convert returns) or
    /// writeback (flushed to stable storage before convert returns)
    #[arg(short = 't', value_name = "CACHE", default_value = "unsafe",
          value_parser = parse_cache)]
    cache: Cache,
    /// The source and the new image
    #[arg(value_names = ["SRC", "DST"], num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
}

/// Largest copy unit (QEMU's `IO_BUF_SIZE`): large enough to be efficient,
/// small enough that a unit's buffer stays cheap.
const CHUNK: u64 = 2 << 20;

/// I/O threads the copy runs on, the workers spread over them. One: with
/// two, each thread's ring sends its buffered writes to a kernel worker of
/// its own, and the two workers contend for the target's inode lock (a
/// 1 GiB raw copy: 1.1-1.2 s on two threads, 0.77-0.79 s on one).
/// Decompression, the one CPU-heavy step, runs on the blocking pool anyway
/// (the qcow2 driver's `inflate_off_thread`).
const CONVERT_THREADS: usize = 1;
/// Copies in flight (QEMU's `qemu-img convert -m` default).
const WORKERS: u64 = 8;
/// The zero detection granularity of a raw target (QEMU's `-S` default).
const RAW_SPARSE: u64 = 4 << 10;

/// `-t`: what the end of a conversion waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// The written data may still be in the host's page cache when convert
    /// returns (qemu-img convert's default): the target file's flushes
    /// stop there (`FileOptions::no_flush`).
    Unsafe,
    /// The target is flushed (`fdatasync`) before convert returns.
    Writeback,
}

fn parse_cache(s: &str) -> Result<Cache, String> {
    match s {
        "unsafe" => Ok(Cache::Unsafe),
        "writeback" => Ok(Cache::Writeback),
        _ => Err(format!("-t must be unsafe or writeback, not '{s}'")),
    }
}

/// `-m`: 1 to 16 copies in flight, as qemu-img allows.
fn parse_in_flight(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n @ 1..=16) => Ok(n),
        _ => Err(format!("-m must be 1 to 16, not '{s}'")),
    }
}

/// `-S`: 0, or a multiple of 512 up to the copy unit (as qemu-img checks).
fn parse_sparse(s: &str) -> Result<u64, String> {
    let n = parse_size("-S", s)?;
    if n % 512 != 0 || n > CHUNK {
        return Err(format!(
            "-S must be 0 or a multiple of 512 up to {}, not {n}",
            human(CHUNK)
        ));
    }
    Ok(n)
}

/// Whether `bytes` are all zero: a byte-wise OR over blocks, which the
/// compiler vectorises, stopping at the first block with a non-zero byte.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(512)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// What the workers share: where the walk of the source stands.
struct Walk {
    /// The first byte no worker has taken yet (a multiple of the
    /// granularity, or the size).
    next: u64,
    /// The last `block_status` answer: data or not, up to where.
    known: Option<(bool, u64)>,
    /// `block_status` calls so far.
    status_calls: u64,
    /// Units taken so far.
    units: u64,
}

/// What a worker that stopped because another failed returns; the other's
/// error is the one reported.
const ANOTHER_FAILED: &str = "another copy failed";

/// Writes go out in the source's order, as qemu-img's do unless `-W`:
/// reads overlap, but a new qcow2 image's clusters are then allocated in
/// order, as qemu-img's are (no fragmentation).
#[derive(Default)]
struct Order {
    /// The unit whose turn it is to write.
    turn: AtomicU64,
    /// Set when a worker failed: nobody waits for its turn any more.
    failed: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Order {
    /// Waits for unit `seq`'s turn; an error once another worker failed.
    async fn wait(&self, seq: u64) -> Res<()> {
        loop {
            // Registered before the check, so no wake-up is missed.
            let changed = self.changed.notified();
            if self.failed.load(Ordering::Acquire) {
                return Err(ANOTHER_FAILED.into());
            }
            if self.turn.load(Ordering::Acquire) == seq {
                return Ok(());
            }
            changed.await;
        }
    }

    fn done(&self, seq: u64) {
        self.turn.store(seq + 1, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// One unit of copying: `[start, end)`, and the data ranges in it (the
/// rest reads as zeroes).
struct Unit {
    /// Units are numbered in the order they were taken; they are written
    /// in that order (unless `-W`).
    seq: u64,
    start: u64,
    end: u64,
    data: Vec<(u64, u64)>,
}

/// The walk's fixed parameters.
#[derive(Clone, Copy)]
struct Plan {
    size: u64,
    /// Zero detection and alignment unit: a cluster of a qcow2 target,
    /// 4 KiB for raw (or `-S`), at least both sides' request alignment.
    gran: u64,
    chunk: u64,
    /// Whether zeroes stay sparse (`-S` is not 0): when not, every byte is
    /// read and written, without asking `block_status`.
    sparse: bool,
    /// Whether the target may not read zeroes where the source does (`-n`
    /// without `--target-is-zero`): such ranges are zeroed.
    zero_target: bool,
    /// Whether writes wait for their turn (no `-W`).
    ordered: bool,
}

fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

fn align_up(x: u64, a: u64, cap: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a).min(cap)
}

impl Walk {
    /// Whether `off` holds data, and up to where that answer holds.
    async fn status_at(
        &mut self,
        src: &BlockBackend,
        cx: &mut IoTask,
        size: u64,
        off: u64,
    ) -> Res<(bool, u64)> {
        if let Some((data, end)) = self.known {
            if off < end && end <= size {
                return Ok((data, end));
            }
        }
        self.status_calls += 1;
        let (status, n) = src
            .block_status(cx, off, size - off)
            .await
            .map_err(|e| format!("block status of the source at {off}: {e}"))?;
        // Unallocated over nothing and zero clusters both read as zeroes.
        let data = status == BlockStatus::Data;
        let end = off + n.clamp(1, size - off);
        self.known = Some((data, end));
        Ok((data, end))
    }

    /// The next unit to copy, skipping whole granules that read as zero;
    /// `None` at the end.
    async fn take(
        &mut self,
        src: &BlockBackend,
        cx: &mut IoTask,
        p: Plan,
        bar: &ProgressBar,
    ) -> Res<Option<Unit>> {
        while self.next < p.size {
            let start = self.next;
            if !p.sparse {
                // `-S 0`: every byte is copied; nothing to ask.
                let end = (start + p.chunk).min(p.size);
                self.next = end;
                self.units += 1;
                return Ok(Some(Unit {
                    seq: self.units - 1,
                    start,
                    end,
                    data: vec![(start, end)],
                }));
            }
            let (data, run_end) = self.status_at(src, cx, p.size, start).await?;
            if !data && p.zero_target {
                // A long run of zeroes: one unit that zeroes it whole.
                let end = run_end.min(p.size);
                if end - start >= p.chunk {
                    self.next = end;
                    self.units += 1;
                    return Ok(Some(Unit {
                        seq: self.units - 1,
                        start,
                        end,
                        data: Vec::new(),
                    }));
                }
            } else if !data {
                let skip_to = if run_end >= p.size {
                    p.size
                } else {
                    align_down(run_end, p.gran)
                };
                if skip_to > start {
                    bar.inc(skip_to - start);
                    self.next = skip_to;
                    continue;
                }
            }
            let mut end = (start + p.chunk).min(p.size);
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut off = start;
            while off < end {
                let (data, run_end) = self.status_at(src, cx, p.size, off).await?;
                let to = run_end.min(end);
                if !data {
                    if let Some(&(_, data_end)) = ranges.last() {
                        // A hole after data ends the unit (as qemu-img
                        // splits at status changes): a unit that is data
                        // from end to end moves its buffer through
                        // (`copy_unit`), and the hole is the next unit's
                        // to skip or zero.
                        end = data_end.max(off);
                        break;
                    }
                }
                if data {
                    // Read whole granules: extend to the granularity
                    // (which the source's alignment divides), and merge.
                    let (a, b) = (align_down(off, p.gran), align_up(to, p.gran, end));
                    match ranges.last_mut() {
                        Some(last) if last.1 >= a => last.1 = last.1.max(b),
                        _ => ranges.push((a.max(start), b)),
                    }
                }
                off = to;
            }
            self.next = end;
            self.units += 1;
            return Ok(Some(Unit {
                seq: self.units - 1,
                start,
                end,
                data: ranges,
            }));
        }
        Ok(None)
    }
}

/// One request on the target.
enum Out {
    /// Write the unit's bytes at `[start, end)`.
    Data(u64, u64),
    /// Zero `[start, end)` (the target may not read zeroes there).
    Zero(u64, u64),
}

/// What a unit sends to the target: runs of granules with a non-zero byte
/// (all of them with `-S 0`) as writes, and, when the target may not read
/// zeroes, the rest as write-zeroes.
fn plan_unit(p: Plan, u: &Unit, buf: &[u8]) -> Vec<Out> {
    let mut out = Vec::new();
    let zero = |out: &mut Vec<Out>, from: u64, to: u64| {
        if p.zero_target && to > from {
            out.push(Out::Zero(from, to));
        }
    };
    let mut done = u.start;
    for &(a, b) in &u.data {
        zero(&mut out, done, a);
        done = b;
        let chunk = &buf[(a - u.start) as usize..(b - u.start) as usize];
        let granule = |o: u64| &chunk[(o - a) as usize..((o + p.gran).min(b) - a) as usize];
        let mut off = a;
        while off < b {
            let run = off;
            let data = !p.sparse || !is_zero(granule(off));
            while off < b && (!p.sparse || is_zero(granule(off)) != data) {
                off = (off + p.gran).min(b);
            }
            if data {
                out.push(Out::Data(run, off));
            } else {
                zero(&mut out, run, off);
            }
        }
    }
    zero(&mut out, done, u.end);
    out
}

/// Copies one unit: reads its data ranges, then, in its turn, sends the
/// target what [`plan_unit`] says. Returns the bytes written.
///
/// In order (no `-W`), the next unit's turn comes once this unit's last
/// request is *issued* (polled until it waits), not done: the target sees
/// the requests in the source's order (a new qcow2 image allocates its
/// clusters in that order, as qemu-img's does), while the next unit's
/// write is queued behind this one's rather than after its completion and
/// a wake-up (1.2-1.6 s against 0.86 s for a 1 GiB raw copy).
async fn copy_unit(
    src: &BlockBackend,
    dst: &BlockBackend,
    cx: &mut IoTask,
    p: Plan,
    u: &Unit,
    buf: &mut IoBuf,
    order: &Order,
) -> Res<u64> {
    let len = (u.end - u.start) as usize;
    buf.set_len(len);
    // A unit that is data from end to end (the common case) moves the
    // buffer into the read and, when the target gets all of it, into the
    // write: the file driver hands it to the kernel as it is, with no copy
    // through a ring buffer on either side.
    let whole = u.data.as_slice() == [(u.start, u.end)];
    if whole {
        let owned = std::mem::replace(buf, IoBuf::zeroed(0));
        match src.read_buf(cx, u.start, owned).await {
            Ok(back) => *buf = back,
            Err(e) => {
                *buf = IoBuf::zeroed(len);
                return Err(format!("reading the source at {}: {e}", u.start));
            }
        }
    } else {
        for &(a, b) in &u.data {
            let at = (a - u.start) as usize..(b - u.start) as usize;
            src.read(cx, a, &mut buf[at])
                .await
                .map_err(|e| format!("reading the source at {a}: {e}"))?;
        }
    }
    let outs = plan_unit(p, u, buf);
    if p.ordered {
        order.wait(u.seq).await?;
    }
    let all_of_it =
        whole && matches!(outs.as_slice(), [Out::Data(a, b)] if (*a, *b) == (u.start, u.end));
    let mut written = 0;
    let last = outs.len().saturating_sub(1);
    for (i, out) in outs.iter().enumerate() {
        // Each request hands back the buffer if it took it.
        let cx = &mut *cx;
        let (request, what, at): (Request<'_>, _, _) = match *out {
            Out::Data(a, b) if all_of_it => {
                written += b - a;
                let owned = std::mem::replace(buf, IoBuf::zeroed(0));
                (
                    Box::pin(async move { dst.write_buf(cx, a, owned).await.map(Some) }),
                    "writing",
                    a,
                )
            }
            Out::Data(a, b) => {
                written += b - a;
                let bytes = &buf[(a - u.start) as usize..(b - u.start) as usize];
                (
                    Box::pin(async move { dst.write(cx, a, bytes).await.map(|()| None) }),
                    "writing",
                    a,
                )
            }
            Out::Zero(a, b) => (
                Box::pin(async move { dst.write_zeroes(cx, a, b - a).await.map(|()| None) }),
                "zeroing",
                a,
            ),
        };
        let mut request = request;
        let result = if p.ordered && i == last {
            // One poll, with this task's waker: the request is issued.
            let first = std::future::poll_fn(|c| Poll::Ready(request.as_mut().poll(c))).await;
            order.done(u.seq);
            match first {
                Poll::Ready(r) => r,
                Poll::Pending => (&mut request).await,
            }
        } else {
            (&mut request).await
        };
        drop(request);
        match result {
            Ok(Some(back)) => *buf = back,
            Ok(None) => {}
            Err(e) => {
                if buf.capacity() < len {
                    *buf = IoBuf::zeroed(len);
                }
                return Err(format!("{what} the destination at {at}: {e}"));
            }
        }
    }
    if p.ordered && outs.is_empty() {
        order.done(u.seq);
    }
    Ok(written)
}

/// A request of [`copy_unit`]'s to the target: the buffer back if it took
/// it.
type Request<'a> =
    std::pin::Pin<Box<dyn Future<Output = blockgraph::Result<Option<IoBuf>>> + Send + 'a>>;

pub fn run(a: Args) -> Res<i32> {
    let (src, dst) = match (a.paths.as_slice(), &a.stack.stack) {
        ([dst], Some(_)) => (None, dst.clone()),
        ([src, dst], _) => (Some(src.clone()), dst.clone()),
        _ => return Err("convert: expected SRC DST (or --stack STACK [SRC] DST)".into()),
    };
    if a.target_is_zero && !a.no_create {
        return Err("convert: --target-is-zero is for an existing target (-n)".into());
    }
    let out_fmt = a.output_format.unwrap_or(Format::Raw);
    let options = a.options.unwrap_or_default();
    if out_fmt == Format::Raw && !options.qcow2_only_empty() {
        return Err("convert: raw images take no -o options but preallocation".into());
    }
    let layers = a.stack.layers(a.common.format, src.as_deref())?;
    let env = Env::new(CONVERT_THREADS)?;
    let source = env.open(layers, src, OpenPolicy::new(&a.common, false), "src-")?;
    let src_blk = env.backend("src-blk", &source.top, false)?;
    let b = src_blk.clone();
    let size = env
        .io(move |mut cx| async move { b.length(&mut cx).await })
        .map_err(err)?;
    if size == 0 {
        return Err("convert: the source is empty".into());
    }
    // The destination; with `-t unsafe` its file's flushes (ours at the
    // end and the one at shutdown) stop at the page cache, as qemu-img's do.
    let no_flush = a.cache == Cache::Unsafe;
    let dst_top = if a.no_create {
        if !options.is_empty() {
            return Err(
                "convert: -n copies into an existing image, which takes no -o options".into(),
            );
        }
        let layers = image_layers(None, Some(out_fmt), Some(&dst))?;
        let target = env.open(
            layers,
            Some(dst.clone()),
            OpenPolicy::new(&a.common, true),
            "dst-",
        )?;
        let target_size = env.length(&target.top)?;
        if target_size < size {
            return Err(format!(
                "convert: '{}' ({}) is smaller than the source ({})",
                dst.display(),
                human(target_size),
                human(size)
            ));
        }
        target.top
    } else {
        let qcow2 = (out_fmt == Format::Qcow2).then(|| options.qcow2(size));
        let path = dst.clone();
        let created = env.io(move |mut cx| async move {
            let file_options = FileOptions {
                no_flush,
                ..FileOptions::default()
            };
            let file = create_image(
                &mut cx,
                "dst-file",
                &path,
                size,
                qcow2.as_ref(),
                file_options,
                options.prealloc(),
            )
            .await?;
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
        created.inspect_err(|_| {
            let _ = std::fs::remove_file(&dst);
        })?
    };
    // Zero detection: a cluster of a new qcow2 target, else 4 KiB, or -S.
    let sparse = match a.sparse_size {
        Some(n) => n,
        None if out_fmt == Format::Qcow2 && !a.no_create => options.qcow2(size).cluster_size,
        None => RAW_SPARSE,
    };
    let dst_blk = env.backend("dst-blk", &dst_top, true)?;
    let (s, d) = (src_blk.clone(), dst_blk.clone());
    let align = env
        .io(move |mut cx| async move {
            Ok::<_, blockgraph::Error>((
                s.request_alignment(&mut cx).await?,
                d.request_alignment(&mut cx).await?,
            ))
        })
        .map_err(err)?;
    // Request alignments are powers of two, so the largest is a multiple
    // of the others; the granule is the zero detection size rounded up to
    // it (-S takes any multiple of 512).
    let align = u64::from(align.0).max(u64::from(align.1)).max(1);
    let gran = align_up(sparse.max(1), align, u64::MAX);
    let plan = Plan {
        size,
        gran,
        chunk: align_up(CHUNK, gran, u64::MAX),
        sparse: sparse != 0,
        zero_target: a.no_create && !a.target_is_zero,
        ordered: !a.out_of_order,
    };
    let walk = Arc::new(tokio::sync::Mutex::new(Walk {
        next: 0,
        known: None,
        status_calls: 0,
        units: 0,
    }));
    let order = Arc::new(Order::default());
    let copied = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(
        a.progress,
        size,
        "{wide_bar} {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
    );
    let workers: Vec<_> = (0..a.in_flight)
        .map(|i| {
            let (src, dst, copied) = (src_blk.clone(), dst_blk.clone(), copied.clone());
            let (walk, bar, order) = (walk.clone(), bar.clone(), order.clone());
            env.threads[i as usize % env.threads.len()].spawn(move |mut cx| async move {
                // One buffer per worker, grown to the largest unit, moved
                // into the requests that can take it (`copy_unit`).
                let mut buf = IoBuf::zeroed(0);
                let copy = async {
                    loop {
                        let unit = walk.lock().await.take(&src, &mut cx, plan, &bar).await?;
                        let Some(unit) = unit else {
                            return Ok::<_, String>(());
                        };
                        let len = (unit.end - unit.start) as usize;
                        if buf.capacity() < len {
                            buf = IoBuf::zeroed(len);
                        }
                        let n =
                            copy_unit(&src, &dst, &mut cx, plan, &unit, &mut buf, &order).await?;
                        copied.fetch_add(n, Ordering::Relaxed);
                        bar.inc(unit.end - unit.start);
                    }
                };
                let result = copy.await;
                if result.is_err() {
                    order.fail();
                }
                result
            })
        })
        .collect();
    let mut failure = None;
    for w in workers {
        match w.join() {
            Err(e) if failure.as_deref().is_none_or(|f| f == ANOTHER_FAILED) => failure = Some(e),
            _ => {}
        }
    }
    // Everything reaches the file (a qcow2 target's cached metadata too);
    // with `-t writeback` the file then reaches stable storage.
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
        crate::open::shown_name(&dst.to_string_lossy())
    );
    if a.stats {
        let (r, w) = (src_blk.stats(), dst_blk.stats());
        let calls = env.io(move |_| async move { walk.lock().await.status_calls });
        println!(
            "stats: source_read_bytes={} source_reads={} block_status_calls={calls} \
             target_write_bytes={} target_writes={}",
            r.read_bytes, r.reads, w.write_bytes, w.writes
        );
    }
    Ok(0)
}
