//! A VMM operator's day on real files: the main example.
//!
//! Two qcow2 disks (A and B, created in a temporary directory) serve a
//! guest on two I/O threads, which keep writing verifiable patterns and
//! reading them back for the whole run. Meanwhile the main loop:
//!
//! 1. inserts and removes a filter above both disks, over and over (live
//!    reconfiguration under I/O; each change drains the disk first);
//! 2. takes a live snapshot of both disks at one instant, twice
//!    (`blockgraph::snapshot`): each disk becomes `base <- mid <- top`;
//! 3. streams disk A (everything into `top`: it stands alone afterwards)
//!    and commits disk B's `mid` into its `base` (B becomes
//!    `base <- top`), both jobs at once, with a progress bar each;
//! 4. mirrors disk A to a new qcow2 file and pivots the guest onto it
//!    (reads then come from the new file), while backing up disk B to
//!    another new qcow2 file as it was when the backup started (the guest
//!    holds B's writes for that one instant only), both at once, with a
//!    progress bar each;
//! 5. writes the graph before, during and after the stream and commit as
//!    Graphviz DOT (and SVG when the `dot` program is installed);
//! 6. reads every block of both disks back and compares it with what the
//!    guest wrote, every block of the backup with B as it was at the
//!    backup's start, and checks every qcow2 image left.
//!
//! It exits non-zero if any block differs.
//!
//! `cargo run --release --example live_reconfig [-- --mib N] [--speed MIB_PER_S] [--out DIR]`
//!
//! The disk size defaults to 64 MiB (or `LIVE_RECONFIG_MIB`), the jobs'
//! rate limit to 32 MiB/s, the output directory to
//! `$TMPDIR/blockgraph-live_reconfig`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgraph::drivers::qcow2::{CreateOptions, Qcow2Driver, Qcow2Options};
use blockgraph::drivers::{FileDriver, FileOptions, PassthroughFilter};
use blockgraph::job::{
    self, BackupOptions, BackupSync, CommitOptions, ImageFormat, Job, JobEvent, JobEvents,
    JobOptions, JobType, MirrorOptions, MirrorTarget, StreamOptions,
};
use blockgraph::snapshot::{self, SnapshotSync};
use blockgraph::{
    BackendOptions, BlockBackend, ChildRole, Error, IoThread, MainLoop, NodeHandle, Result,
};

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of each disk in MiB.
    pub disk_mib: u64,
    /// The jobs' rate limit, bytes per second (0: none).
    pub speed: u64,
    /// Where the DOT (and SVG) files go.
    pub out_dir: PathBuf,
    /// How long the guest writes between the steps.
    pub phase: Duration,
}

impl Options {
    fn from_args() -> std::result::Result<Options, String> {
        let mut options = Options {
            disk_mib: match std::env::var("LIVE_RECONFIG_MIB") {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("bad LIVE_RECONFIG_MIB: {v}"))?,
                Err(_) => 64,
            },
            speed: 32 * MIB,
            out_dir: std::env::temp_dir().join("blockgraph-live_reconfig"),
            phase: Duration::from_millis(700),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--mib" => {
                    let v = value()?;
                    options.disk_mib = v.parse().map_err(|_| format!("bad --mib: {v}"))?;
                }
                "--speed" => {
                    let v = value()?;
                    let mib: u64 = v.parse().map_err(|_| format!("bad --speed: {v}"))?;
                    options.speed = mib * MIB;
                }
                "--out" => options.out_dir = PathBuf::from(value()?),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if options.disk_mib == 0 || options.disk_mib > 4096 {
            return Err("the disk size must be 1 to 4096 MiB".into());
        }
        Ok(options)
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Guest writes issued (each read back and checked at once).
    pub writes: u64,
    /// Blocks read back at the end and compared (both disks and the
    /// backup).
    pub verified_blocks: u64,
    /// Blocks that differed from what the guest wrote (or, for the
    /// backup, from disk B at the backup's start).
    pub mismatches: u64,
    /// Bytes each job processed (copied or found already in place).
    pub job_bytes: Vec<(String, u64)>,
    /// The qcow2 images checked at the end, and whether each was clean.
    pub checked: Vec<(String, bool)>,
    /// Each disk's backing chain at the end (node names, top down).
    pub chains: Vec<Vec<String>>,
    /// The DOT files written.
    pub dot_files: Vec<PathBuf>,
}

/// The bytes of `block` of disk `disk` after the write stamped `stamp`
/// (0: never written, zeroes): unique per write, so a lost, stale or
/// misplaced block shows.
fn pattern(disk: usize, block: u64, stamp: u64) -> Vec<u8> {
    if stamp == 0 {
        return vec![0; BLOCK as usize];
    }
    let mut x = stamp ^ (block << 20) ^ ((disk as u64) << 62) | 1;
    let mut out = Vec::with_capacity(BLOCK as usize);
    while out.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// One disk: its guest backend and the nodes of its chain.
struct Disk {
    name: &'static str,
    prefix: &'static str,
    blk: BlockBackend,
    base: NodeHandle,
    mid: Option<NodeHandle>,
    top: Option<NodeHandle>,
}

impl Disk {
    fn active(&self) -> &NodeHandle {
        self.top
            .as_ref()
            .or(self.mid.as_ref())
            .unwrap_or(&self.base)
    }
}

/// Seconds since the start, for the log.
struct Clock(Instant);

impl Clock {
    fn say(&self, line: impl AsRef<str>) {
        println!(
            "[{:5.2}s] {}",
            self.0.elapsed().as_secs_f64(),
            line.as_ref()
        );
    }
}

/// Creates a qcow2 image of `size` bytes at `path` and adds it to the graph
/// as `name` on a file node, with a backend `backend` on it.
fn create_disk(
    main: &MainLoop,
    io: &IoThread,
    path: &Path,
    name: &str,
    size: u64,
) -> Result<NodeHandle> {
    let file = FileDriver::create(path, 0, FileOptions::default())?;
    let file_name = format!("{name}-file");
    let file_node = main.run(move |bql| bql.write(|w| w.add_node(&file_name, file, &[])))?;
    let f = file_node.clone();
    let driver = io
        .spawn(move |mut cx| async move {
            let g = cx.read().await;
            Qcow2Driver::create(f.try_io(&g)?, &CreateOptions::new(size)).await?;
            Qcow2Driver::open(f.try_io(&g)?, Qcow2Options::default()).await
        })
        .join()?;
    let name = name.to_owned();
    main.run(move |bql| bql.write(|w| w.add_node(&name, driver, &[(ChildRole::File, &file_node)])))
}

/// What a guest thread did: writes issued, and the last stamp it wrote per
/// (disk, block).
type GuestLog = (u64, HashMap<(usize, u64), u64>);

/// Lets the operator hold the guest's writes to disk B for an instant (the
/// backup's start): while `held`, no write to B starts, and `in_flight`
/// counts those that started before.
#[derive(Default)]
struct HoldB {
    held: AtomicBool,
    in_flight: AtomicU64,
}

impl HoldB {
    /// Holds B's writes; returns once none is in flight.
    fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// The guest's side: waits while held, then counts itself in.
    async fn enter(&self) {
        loop {
            while self.held.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if !self.held.load(Ordering::SeqCst) {
                return;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The guest on I/O thread `lane`: writes random blocks of its working set
/// (the first `hot` blocks) of both disks (only blocks with
/// `block % 2 == lane`, so the two threads never race for a block), reads
/// each back at once and checks it, until `stop`.
fn guest(
    io: &IoThread,
    lane: u64,
    disks: Vec<BlockBackend>,
    hot: u64,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    hold_b: Arc<HoldB>,
) -> blockgraph::TaskHandle<Result<GuestLog>> {
    io.spawn(move |mut cx| async move {
        let mut last = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ lane;
        let mut seq = 0u64;
        let mut back = vec![0u8; BLOCK as usize];
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let disk = (seq % 2) as usize;
            let block = (rng % (hot / 2)) * 2 + lane;
            let stamp = ((lane + 1) << 56) | seq;
            let data = pattern(disk, block, stamp);
            if disk == 1 {
                hold_b.enter().await;
            }
            let written = disks[disk].write(&mut cx, block * BLOCK, &data).await;
            if disk == 1 {
                hold_b.leave();
            }
            written?;
            disks[disk].read(&mut cx, block * BLOCK, &mut back).await?;
            if back != data {
                return Err(Error::InvalidArgument(format!(
                    "guest {lane}: block {block} of disk {disk} read back wrong at once"
                )));
            }
            last.insert((disk, block), stamp);
            writes.fetch_add(1, Ordering::Relaxed);
            if seq % 8 == 0 {
                // A guest, not a benchmark: leave the cores some air.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok((seq, last))
    })
}

/// Writes the graph as DOT to `dir/name.dot` (and SVG with `dot`).
fn write_dot(main: &MainLoop, dir: &Path, name: &str, report: &mut Report) -> Result<String> {
    let dot = main.run(|bql| bql.graph().to_dot());
    let path = dir.join(format!("{name}.dot"));
    std::fs::write(&path, dot)?;
    report.dot_files.push(path.clone());
    let svg = dir.join(format!("{name}.svg"));
    let made = Command::new("dot")
        .arg("-Tsvg")
        .arg(&path)
        .arg("-o")
        .arg(&svg)
        .status()
        .is_ok_and(|s| s.success());
    Ok(if made {
        format!("{} and {}", path.display(), svg.display())
    } else {
        path.display().to_string()
    })
}

/// Shows the jobs' progress until they are gone: a bar each on a
/// terminal, a plain line every half second otherwise; completes a job
/// that becomes ready (a mirror: its pivot), and lifts a mirror's rate
/// limit once it has copied `size` bytes (the initial pass), so that it
/// outruns the guest's new writes and converges. Returns the bytes each
/// processed, or the first error one reported.
fn follow(
    main: &MainLoop,
    size: u64,
    jobs: Vec<(Job, JobEvents)>,
    clock: &Clock,
    writes: &AtomicU64,
) -> Result<Vec<(String, u64)>> {
    let tty = std::io::stderr().is_terminal();
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>10} [{bar:40.cyan/blue}] {bytes:>10}/{total_bytes:<10} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let mut state: Vec<_> = jobs
        .into_iter()
        .map(|(job, events)| {
            let bar = if tty {
                bars.add(indicatif::ProgressBar::new(0))
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(style.clone());
            bar.set_prefix(job.id().to_owned());
            (job, events, bar, None::<std::result::Result<u64, String>>)
        })
        .collect();
    let mut lifted = false;
    let mut last_line = Instant::now();
    loop {
        for (job, events, bar, outcome) in &mut state {
            while let Some(event) = events.try_next() {
                match event {
                    JobEvent::Completed {
                        current,
                        error: None,
                        ..
                    } => *outcome = Some(Ok(current)),
                    JobEvent::Completed { error: Some(e), .. } => *outcome = Some(Err(e)),
                    JobEvent::Cancelled { .. } => *outcome = Some(Err("cancelled".into())),
                    // A mirror in sync: pivot at once (`job-complete`).
                    JobEvent::Ready => {
                        let j = job.clone();
                        if let Err(e) = main.run(move |bql| j.complete(bql)) {
                            *outcome = Some(Err(format!("complete: {e}")));
                        }
                    }
                    _ => {}
                }
            }
            let (current, total) = job.progress();
            bar.set_length(total);
            bar.set_position(current);
            if !lifted && job.job_type() == JobType::Mirror && current >= size {
                lifted = true;
                let j = job.clone();
                if main.run(move |bql| j.set_speed(bql, 0)).is_ok() {
                    clock.say(format!(
                        "  {}: initial copy done, rate limit lifted to catch up with the guest",
                        job.id()
                    ));
                }
            }
            match outcome {
                _ if bar.is_finished() => {}
                Some(Ok(_)) => bar.finish_with_message("done"),
                Some(Err(e)) => bar.abandon_with_message(format!("failed: {e}")),
                None => bar.set_message(job.status().to_string()),
            }
        }
        let all_done = state.iter().all(|s| s.3.is_some());
        if !tty && (all_done || last_line.elapsed() >= Duration::from_millis(500)) {
            last_line = Instant::now();
            let parts: Vec<String> = state
                .iter()
                .map(|(job, _, _, _)| {
                    let (current, total) = job.progress();
                    format!(
                        "{} {:.1}/{:.1} MiB ({})",
                        job.id(),
                        current as f64 / MIB as f64,
                        total as f64 / MIB as f64,
                        job.status()
                    )
                })
                .collect();
            clock.say(format!(
                "  progress: {}; guest writes so far: {}",
                parts.join(", "),
                writes.load(Ordering::Relaxed)
            ));
        }
        if all_done {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    state
        .into_iter()
        .map(|(job, _, _, outcome)| match outcome {
            Some(Ok(bytes)) => Ok((job.id().to_owned(), bytes)),
            Some(Err(e)) => Err(Error::InvalidArgument(format!("job '{}': {e}", job.id()))),
            None => unreachable!("every job has an outcome here"),
        })
        .collect()
}

/// What the later steps of the day need.
struct Day<'a> {
    main: &'a MainLoop,
    mgmt: &'a IoThread,
    dir: &'a Path,
    size: u64,
    speed: u64,
    clock: &'a Clock,
    writes: &'a AtomicU64,
}

/// Reads all of `blk` on `io`.
fn read_all(io: &IoThread, blk: &BlockBackend, size: u64) -> Result<Vec<u8>> {
    let blk = blk.clone();
    io.spawn(move |mut cx| async move {
        let mut all = vec![0u8; size as usize];
        for chunk in all.chunks_mut(MIB as usize).enumerate() {
            let (i, buf) = chunk;
            blk.read(&mut cx, i as u64 * MIB, buf).await?;
        }
        Ok::<_, Error>(all)
    })
    .join()
}

/// Step 4: a mirror of disk A to a new qcow2 file, pivoted on READY, and a
/// backup of disk B to another new one, at once. Returns the bytes each
/// job processed, and the backup's node with what B held at its start.
#[allow(clippy::type_complexity)] // two results of one step, spelled out
fn mirror_and_backup(
    day: &Day<'_>,
    disks: &[Disk],
    hold_b: &HoldB,
) -> Result<(Vec<(String, u64)>, (NodeHandle, Vec<u8>))> {
    let (a, b) = (&disks[0], &disks[1]);
    let target = create_disk(
        day.main,
        day.mgmt,
        &day.dir.join("b-backup.qcow2"),
        "b-backup",
        day.size,
    )?;
    // B at the backup's start: its writes held while it is read and the
    // job starts (the job's filter goes in over a drained B, so what it
    // copies is B as of that drain).
    hold_b.hold();
    let started = read_all(day.mgmt, &b.blk, day.size).and_then(|expected| {
        let (a_top, b_top, t) = (a.active().clone(), b.active().clone(), target.clone());
        let (handle, speed) = (day.mgmt.handle(), day.speed);
        let path = day.dir.join("a-mirror.qcow2");
        let jobs = day.main.run(move |bql| {
            let mut o = JobOptions::new("mirror-A");
            o.speed = speed;
            let new = MirrorTarget::NewImage {
                path,
                format: ImageFormat::Qcow2,
                node_name: "a-mirror".into(),
                backing: false,
            };
            // The guest's block size: a write dirties 4 KiB, not 64.
            let options = MirrorOptions::new(&a_top, new).granularity(BLOCK);
            let mirror = job::mirror(bql, &handle, o, options)?;
            let mut o = JobOptions::new("backup-B");
            o.speed = speed;
            let options = BackupOptions::new(&b_top, &t, BackupSync::Full);
            let backup = match job::backup(bql, &handle, o, options) {
                Ok(job) => job,
                Err(e) => {
                    let _ = mirror.cancel(bql, true);
                    return Err(e);
                }
            };
            let (me, be) = (mirror.events(), backup.events());
            Ok::<_, Error>(vec![(mirror, me), (backup, be)])
        })?;
        Ok((jobs, expected))
    });
    hold_b.release();
    let (jobs, expected) = started?;
    day.clock.say(format!(
        "mirror-A: a-top to a new a-mirror.qcow2, pivot when in sync; backup-B: b-top as of \
         now into a new b-backup.qcow2 (rate limit {} MiB/s)",
        day.speed / MIB
    ));
    let done = follow(day.main, day.size, jobs, day.clock, day.writes)?;
    Ok((done, (target, expected)))
}

/// Reads the backup through a backend of its own and counts the blocks
/// that differ from `expected`.
fn verify_backup(
    main: &MainLoop,
    io: &IoThread,
    node: &NodeHandle,
    expected: Vec<u8>,
) -> Result<u64> {
    let n = node.clone();
    let blk = main.run(move |bql| {
        bql.write(|w| w.add_backend("backup-check", &n, BackendOptions::default()))
    })?;
    let got = read_all(io, &blk, expected.len() as u64);
    let b = blk.clone();
    main.run(move |bql| bql.write(|w| w.remove_backend(&b)))?;
    let got = got?;
    Ok(got
        .chunks(BLOCK as usize)
        .zip(expected.chunks(BLOCK as usize))
        .filter(|(g, e)| g != e)
        .count() as u64)
}

/// The whole day; see the module's documentation.
pub fn run(options: &Options) -> std::result::Result<Report, Box<dyn std::error::Error>> {
    let clock = Clock(Instant::now());
    let mut report = Report::default();
    let images = tempfile::tempdir()?;
    std::fs::create_dir_all(&options.out_dir)?;
    let size = options.disk_mib * MIB;
    let blocks = size / BLOCK;

    let main = MainLoop::new()?;
    let guests_io = [main.new_io_thread("io0")?, main.new_io_thread("io1")?];
    // The operator's own I/O (formatting images, flushing, the jobs) runs
    // on a third thread, so the guests' threads only serve the guest.
    let mut mgmt = main.new_io_thread("mgmt")?;

    // Two qcow2 disks, filled as an installed guest would have them.
    let mut disks = Vec::new();
    for (name, prefix) in [("A", "a"), ("B", "b")] {
        let base = create_disk(
            &main,
            &mgmt,
            &images.path().join(format!("{prefix}-base.qcow2")),
            &format!("{prefix}-base"),
            size,
        )?;
        let (b, backend) = (base.clone(), format!("vd{prefix}"));
        let blk = main.run(move |bql| {
            bql.write(|w| w.add_backend(&backend, &b, BackendOptions::default()))
        })?;
        disks.push(Disk {
            name,
            prefix,
            blk,
            base,
            mid: None,
            top: None,
        });
    }
    // The model: the stamp of the last write of each block of each disk.
    let mut model = vec![vec![0u64; blocks as usize]; 2];
    const FILL: u64 = 0xf111 << 48;
    for (d, disk) in disks.iter().enumerate() {
        let blk = disk.blk.clone();
        mgmt.spawn(move |mut cx| async move {
            let chunk = 16;
            for first in (0..blocks).step_by(chunk) {
                let n = chunk.min((blocks - first) as usize) as u64;
                let mut buf = Vec::with_capacity((n * BLOCK) as usize);
                for block in first..first + n {
                    let stamp = if block % 3 == 0 { 0 } else { FILL | block };
                    buf.extend(pattern(d, block, stamp));
                }
                blk.write(&mut cx, first * BLOCK, &buf).await?;
            }
            blk.flush(&mut cx).await
        })
        .join()?;
        for (block, stamp) in model[d].iter_mut().enumerate() {
            if block % 3 != 0 {
                *stamp = FILL | block as u64;
            }
        }
    }
    clock.say(format!(
        "two {} MiB qcow2 disks in {}, 2/3 of their blocks written",
        options.disk_mib,
        images.path().display()
    ));

    // The guest, on two I/O threads, for the rest of the run.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let hold_b = Arc::new(HoldB::default());
    let blks: Vec<BlockBackend> = disks.iter().map(|d| d.blk.clone()).collect();
    // Its working set: an eighth of the disk (a guest rewrites its logs
    // and databases, not its whole disk), so the snapshots' overlays hold
    // that much and the jobs have the rest to move.
    let hot = (blocks / 8).max(16);
    let guests: Vec<_> = guests_io
        .iter()
        .enumerate()
        .map(|(lane, io)| {
            guest(
                io,
                lane as u64,
                blks.clone(),
                hot,
                stop.clone(),
                writes.clone(),
                hold_b.clone(),
            )
        })
        .collect();
    clock.say(format!(
        "guest running on io0 and io1 over the first {} MiB of each disk: write a block, \
         read it back, check it",
        hot * BLOCK / MIB
    ));

    // 1. Filters in and out under I/O.
    let tops: Vec<NodeHandle> = disks.iter().map(|d| d.active().clone()).collect();
    let mut waits = main
        .spawn(move |mut cx| async move {
            let mut waits = Vec::new();
            for round in 0..10 {
                for top in &tops {
                    let t = Instant::now();
                    let drained = cx.drain(top).await;
                    waits.push(t.elapsed());
                    let name = format!("{}-filter{round}", top.name());
                    let filter = cx
                        .write(|w| w.insert_filter(&drained, &name, PassthroughFilter::new()))
                        .await?;
                    drop(drained);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let t = Instant::now();
                    let drained = cx.drain(&filter).await;
                    waits.push(t.elapsed());
                    cx.write(|w| w.remove_filter(&drained)).await?;
                }
            }
            Ok::<_, Error>(waits)
        })
        .join()?;
    waits.sort();
    clock.say(format!(
        "filters inserted and removed 20 times above the disks under I/O; median drain {:?}, \
         {} guest requests queued behind drains",
        waits[waits.len() / 2],
        disks.iter().map(|d| d.blk.queued_requests()).sum::<u64>()
    ));

    // 2. Two live snapshots of both disks, each at one instant.
    for level in ["mid", "top"] {
        std::thread::sleep(options.phase);
        let snaps: Vec<SnapshotSync> = disks
            .iter()
            .map(|d| {
                SnapshotSync::new(
                    d.active(),
                    images.path().join(format!("{}-{level}.qcow2", d.prefix)),
                    &format!("{}-{level}", d.prefix),
                )
            })
            .collect();
        let (back, overlays) = main
            .spawn(move |mut task| async move {
                let r = snapshot::snapshot_sync(&mut task, &mgmt, &snaps).await;
                (mgmt, r)
            })
            .join();
        mgmt = back;
        for (d, overlay) in disks.iter_mut().zip(overlays?) {
            if level == "mid" {
                d.mid = Some(overlay);
            } else {
                d.top = Some(overlay);
            }
        }
        clock.say(format!(
            "live snapshot of both disks at one instant: {}",
            disks
                .iter()
                .map(|d| format!("{} on {}", d.active().name(), d.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    std::thread::sleep(options.phase);
    let where_ = write_dot(&main, &options.out_dir, "graph-before", &mut report)?;
    clock.say(format!("graph before the jobs: {where_}"));

    // 3. Stream on A, commit on B, at once, the guest still writing.
    let (a, b) = (&disks[0], &disks[1]);
    let (a_top, b_mid, b_base) = (
        a.top.clone().expect("snapshotted"),
        b.mid.clone().expect("snapshotted"),
        b.base.clone(),
    );
    let handle = mgmt.handle();
    let speed = options.speed;
    let jobs = main.run(move |bql| {
        let mut o = JobOptions::new("stream-A");
        o.speed = speed;
        let stream = job::stream(bql, &handle, o, StreamOptions::new(&a_top))?;
        let mut o = JobOptions::new("commit-B");
        o.speed = speed;
        let commit = job::commit(bql, &handle, o, CommitOptions::new(&b_mid).base(&b_base));
        let commit = match commit {
            Ok(job) => job,
            Err(e) => {
                let _ = stream.cancel(bql, false);
                return Err(e);
            }
        };
        let (se, ce) = (stream.events(), commit.events());
        Ok::<_, Error>(vec![(stream, se), (commit, ce)])
    })?;
    clock.say(format!(
        "stream-A: a-mid and a-base into a-top; commit-B: b-mid into b-base (rate limit {} MiB/s)",
        options.speed / MIB
    ));
    let where_ = write_dot(&main, &options.out_dir, "graph-during", &mut report)?;
    clock.say(format!(
        "graph with the jobs' filters and backends: {where_}"
    ));
    let followed = follow(&main, size, jobs, &clock, &writes);
    let where_ = write_dot(&main, &options.out_dir, "graph-after", &mut report)?;
    clock.say(format!("graph after: {where_}"));
    // 4. Mirror A with pivot, back up B, the guest still writing.
    let followed = followed.and_then(|mut done| {
        let day = Day {
            main: &main,
            mgmt: &mgmt,
            dir: images.path(),
            size,
            speed: options.speed,
            clock: &clock,
            writes: &writes,
        };
        let (more, backup) = mirror_and_backup(&day, &disks, &hold_b)?;
        done.extend(more);
        Ok((done, backup))
    });
    // Whatever happened, stop the guest and collect what it wrote.
    std::thread::sleep(options.phase / 2);
    stop.store(true, Ordering::Relaxed);
    for guest in guests {
        let (n, last) = guest.join()?;
        report.writes += n;
        for ((disk, block), stamp) in last {
            model[disk][block as usize] = stamp;
        }
    }
    let (job_bytes, (backup_node, backup_expected)) = followed?;
    report.job_bytes = job_bytes;
    clock.say(format!(
        "jobs done: {}",
        report
            .job_bytes
            .iter()
            .map(|(id, n)| format!("{id} {:.1} MiB", *n as f64 / MIB as f64))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if Command::new("dot").arg("-V").output().is_err() {
        clock.say("no SVG: the `dot` program (graphviz) is not installed");
    }

    // 5. Read everything back, compare, check the images.
    for (d, disk) in disks.iter().enumerate() {
        let (blk, expected) = (disk.blk.clone(), std::mem::take(&mut model[d]));
        let bad = mgmt
            .spawn(move |mut cx| async move {
                let mut bad = 0u64;
                let chunk = 64u64;
                let mut buf = vec![0u8; (chunk * BLOCK) as usize];
                for first in (0..blocks).step_by(chunk as usize) {
                    let n = chunk.min(blocks - first);
                    let buf = &mut buf[..(n * BLOCK) as usize];
                    blk.read(&mut cx, first * BLOCK, buf).await?;
                    for (i, got) in buf.chunks(BLOCK as usize).enumerate() {
                        let block = first + i as u64;
                        bad += u64::from(got != pattern(d, block, expected[block as usize]));
                    }
                }
                blk.flush(&mut cx).await?;
                Ok::<_, Error>(bad)
            })
            .join()?;
        report.verified_blocks += blocks;
        report.mismatches += bad;
    }
    // The backup: B as it was when the backup started.
    let bad = verify_backup(&main, &mgmt, &backup_node, backup_expected)?;
    report.verified_blocks += blocks;
    report.mismatches += bad;
    let qcow2: Vec<NodeHandle> = main.run(|bql| {
        bql.graph()
            .nodes()
            .filter(|n| n.driver_as::<Qcow2Driver>().is_some())
            .map(|n| n.to_handle())
            .collect()
    });
    for node in qcow2 {
        let n = node.clone();
        let clean = mgmt
            .spawn(move |mut cx| async move {
                let g = cx.read().await;
                let io = n.try_io(&g)?;
                let q = io.driver_as::<Qcow2Driver>().expect("a qcow2 node");
                q.check(io, false).await
            })
            .join()?
            .is_clean();
        report.checked.push((node.name().to_owned(), clean));
    }
    for disk in &disks {
        let blk = disk.blk.name().to_owned();
        report.chains.push(main.run(move |bql| {
            bql.query_backends()
                .into_iter()
                .find(|b| b.name == blk)
                .and_then(|b| b.root)
                .map(|root| {
                    let below = bql
                        .query_nodes()
                        .into_iter()
                        .find(|n| n.name == root)
                        .map(|n| n.backing_chain)
                        .unwrap_or_default();
                    std::iter::once(root).chain(below).collect()
                })
                .unwrap_or_default()
        }));
    }

    println!();
    println!(
        "guest: {} writes issued on two I/O threads, each read back and checked at once",
        report.writes
    );
    for (id, bytes) in &report.job_bytes {
        println!("job {id}: {bytes} bytes processed (copied, or found in place)");
    }
    for (disk, chain) in disks.iter().zip(&report.chains) {
        let alone = if chain.len() == 1 {
            " (stands alone)"
        } else {
            ""
        };
        println!("disk {} now: {}{alone}", disk.name, chain.join(" -> "));
    }
    println!(
        "qcow2 check: {}",
        report
            .checked
            .iter()
            .map(|(n, clean)| format!("{n} {}", if *clean { "clean" } else { "NOT CLEAN" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "final check: {} blocks read back on two disks and the backup, {} mismatching",
        report.verified_blocks, report.mismatches
    );
    clock.say("done");

    drop(guests_io);
    drop(mgmt);
    main.shutdown();
    Ok(report)
}

/// Runs the day; fails (exit code 1) if a block or an image is wrong.
pub fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let options = Options::from_args()?;
    let report = run(&options)?;
    if report.mismatches != 0 {
        return Err(format!(
            "{} blocks differ from what the guest wrote",
            report.mismatches
        )
        .into());
    }
    if let Some((name, _)) = report.checked.iter().find(|(_, clean)| !clean) {
        return Err(format!("qcow2 image '{name}' is not clean").into());
    }
    Ok(())
}
