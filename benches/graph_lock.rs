//! Graph lock benchmark: our read lock against `std::sync::RwLock`,
//! `parking_lot::RwLock`, `crossbeam_utils::sync::ShardedLock`,
//! `tokio::sync::RwLock`, `async_lock::RwLock` and three calibration kernels,
//! in one binary, with ratios computed per round (BRIEF §8, issue 4).
//!
//! ```sh
//! cargo bench --bench graph_lock                # full run
//! cargo bench --bench graph_lock -- --quick     # about a minute
//! cargo bench --bench graph_lock -- --quick --raw --only=s12,s5
//! ```
//!
//! `--raw` also prints every round's figures; `--only=` takes a comma list
//! of `s12`, `s3`, `s4`, `s5`.
//!
//! Rounds are short (a fraction of a millisecond per kernel) and many, and
//! every ratio is taken within a round, so a burst of interference from
//! other processes spoils a few rounds rather than skewing a kernel; the
//! tables show medians (and the best round, the least disturbed).
//!
//! Calibration kernels (the same counter/flag layout as the lock: one
//! cache-padded counter per thread, one cache-padded flag):
//!
//! * **F0**, the floor: counter load + store, compiler fence, relaxed flag
//!   load; the same to leave.
//! * **F0+owner** (extra, to explain the gap to F0): F0 plus a thread-local
//!   id compared with the counter's owner on each side, which is what lets
//!   our lock keep plain stores while tasks and guards migrate.
//! * **F1**: F0 with the counter update as one locked RMW (`SeqCst`
//!   `fetch_add`/`fetch_sub`), i.e. the symmetric fallback's cost.
//! * **F2**, QEMU's exact read sequence: counter store, full fence, flag
//!   load; unlock store, full fence, and a third full fence for the wake-up
//!   kick (`aio_wait_kick`) followed by its load of the waiter count.
//!
//! Scenarios:
//!
//! * **S1** one thread, lock + unlock pair.
//! * **S2** two threads pinned to two cores, each with its own context;
//!   per-thread cost.
//! * **S3** S2 plus a main-loop writer every 10 µs / 100 µs / 1 ms / 10 ms
//!   holding ~1 µs: reader throughput retained (against a writer-less run in
//!   the same round), reader latency percentiles (one op in 64 timed, timer
//!   overhead included), writer acquisition p50/p99.
//! * **S4** writer acquisition (announce, barrier, wait, enter) with 1 / 8 /
//!   64 / 256 idle contexts, and with one reader holding the lock 10 µs.
//! * **S5** async `read().await` looping in one spawned task, uncontended
//!   (against the sync pair, tokio and async-lock in the same task), and
//!   queued behind a writer (wake-up latency after the writer leaves, spread
//!   across the queued readers).
//!
//! Every lock scenario runs in both fence modes: "asym" (membarrier; the
//! default where available) and "sym" (forced with
//! `BLOCKGRAPH_LOCK_FENCE=symmetric`).

use std::hint::black_box;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blockgraph::{IoContext, IoTask, MainLoop};
use crossbeam_utils::CachePadded;

#[path = "../src/sync/membarrier.rs"]
#[allow(dead_code)]
mod membarrier;

// ---------------------------------------------------------------- settings

#[derive(Clone)]
struct Config {
    quick: bool,
    raw: bool,
    only: Option<Vec<String>>,
    /// Rounds of S1/S2/S5 (ratios are taken per round).
    rounds: usize,
    /// Lock/unlock pairs per kernel per round, one thread.
    s1_iters: u64,
    /// Pairs per thread per kernel per round, two threads.
    s2_iters: u64,
    /// Length of each S3 window.
    s3_window: Duration,
    /// S3 rounds (each: one window without writer, one with).
    s3_rounds: usize,
    /// Writes measured per S4 configuration.
    s4_writes: usize,
    /// Queued-reader trials in S5.
    s5_trials: usize,
}

impl Config {
    fn from_args() -> Config {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick");
        let raw = args.iter().any(|a| a == "--raw");
        let only = args
            .iter()
            .find_map(|a| a.strip_prefix("--only="))
            .map(|l| l.split(',').map(str::to_owned).collect());
        let base = Config {
            quick,
            raw,
            only,
            rounds: 301,
            s1_iters: 100_000,
            s2_iters: 100_000,
            s3_window: Duration::from_millis(40),
            s3_rounds: 25,
            s4_writes: 2_000,
            s5_trials: 100,
        };
        if quick {
            base
        } else {
            Config {
                rounds: 1001,
                s3_rounds: 61,
                s4_writes: 10_000,
                s5_trials: 400,
                ..base
            }
        }
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|l| l.iter().any(|s| s == scenario))
    }
}

// ------------------------------------------------------------- statistics

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[rank.min(s.len() - 1)]
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

// ------------------------------------------------------------------ machine

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Whether cpu0 and cpu1 are hyperthreads of one core.
fn ht_siblings() -> String {
    match read_trimmed("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") {
        Some(list) => {
            let siblings: Vec<usize> = list
                .split(',')
                .flat_map(|part| {
                    let mut ends = part.split('-').filter_map(|x| x.trim().parse().ok());
                    let a: usize = ends.next().unwrap_or(0);
                    let b = ends.next().unwrap_or(a);
                    a..=b
                })
                .collect();
            if siblings.contains(&1) {
                format!("yes (cpu0 siblings: {list})")
            } else {
                format!("no (cpu0 siblings: {list})")
            }
        }
        None => "unknown".into(),
    }
}

fn print_machine(cfg: &Config) {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "# graph lock benchmark ({} mode)",
        if cfg.quick { "quick" } else { "full" }
    );
    println!("cpu model : {}", cpu_model());
    println!("cpus      : {cpus}");
    println!(
        "kernel    : {}",
        read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| std::env::consts::OS.into())
    );
    println!("cpu0/cpu1 hyperthread siblings: {}", ht_siblings());
    println!(
        "fence mode (default lock): {}",
        membarrier::FenceMode::detect().name()
    );
    println!();
}

#[cfg(target_os = "linux")]
fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

#[cfg(not(target_os = "linux"))]
fn pin_to(_cpu: usize) {}

// --------------------------------------------------------- our lock set-up

const FENCE_ENV: &str = membarrier::FENCE_ENV;

/// A main loop whose graph lock runs in `symmetric` or the default mode.
fn main_loop(symmetric: bool) -> MainLoop {
    if symmetric {
        std::env::set_var(FENCE_ENV, "symmetric");
    }
    let main = MainLoop::new().expect("main loop");
    std::env::remove_var(FENCE_ENV);
    main
}

/// Runs synchronous code `f` as a task of `ctx` on the calling thread: an
/// `IoTask` works only inside its own task (rule 17), so the sync kernels run
/// inside one. The task is polled once, directly (no executor, so `ours_op`
/// may still block on a read future inside it); its set-up is outside the
/// timed loops or amortised over them.
fn in_task<R>(ctx: &IoContext, f: impl FnOnce(&mut IoTask) -> R) -> R {
    use std::future::Future as _;
    let task = std::pin::pin!(ctx.task(|mut cx| async move { f(&mut cx) }));
    match task.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => unexpected("a synchronous task was pending"),
    }
}

#[cold]
#[inline(never)]
fn unexpected(what: &str) -> ! {
    panic!("benchmark invariant broken: {what}")
}

#[inline(always)]
fn ours_pair(cx: &mut IoTask) {
    let guard = cx.try_read();
    if guard.is_none() {
        unexpected("read lock refused without a writer");
    }
    drop(guard);
}

/// One reader op that also copes with a writer: try, else wait (parks the
/// thread on the lock's waker). Whether it had to wait.
#[inline(always)]
fn ours_op(cx: &mut IoTask) -> bool {
    let entered = cx.try_read().is_some();
    if !entered {
        drop(futures::executor::block_on(cx.read()));
    }
    !entered
}

// ------------------------------------------------------ calibration kernels

std::thread_local! {
    /// F0+owner's stand-in for the lock's thread id.
    static THREAD_TOKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Gives the calling thread a token and makes it `kernel`'s owner.
fn own(kernel: &Kernel) {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let token = THREAD_TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    });
    kernel.owner.store(token, Ordering::Relaxed);
}

/// The per-thread counter and the shared flag of F0/F1/F2.
struct Kernel {
    counter: CachePadded<AtomicUsize>,
    /// For F0+owner: the thread token of the thread using this kernel.
    owner: AtomicUsize,
    flag: Arc<CachePadded<AtomicBool>>,
    waiters: Arc<CachePadded<AtomicUsize>>,
}

impl Kernel {
    fn new(flag: &Arc<CachePadded<AtomicBool>>, waiters: &Arc<CachePadded<AtomicUsize>>) -> Self {
        Kernel {
            counter: CachePadded::new(AtomicUsize::new(0)),
            owner: AtomicUsize::new(usize::MAX),
            flag: flag.clone(),
            waiters: waiters.clone(),
        }
    }

    #[inline(always)]
    fn f0(&self) {
        let c = &self.counter;
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        if self.flag.load(Ordering::Relaxed) {
            unexpected("flag");
        }
        c.store(c.load(Ordering::Relaxed) - 1, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        if self.flag.load(Ordering::Relaxed) {
            unexpected("flag");
        }
    }

    /// F0 plus what makes the lock safe for migrating tasks and guards: a
    /// thread-local id compared with the counter's owner on each side.
    #[inline(always)]
    fn f0_owner(&self) {
        let c = &self.counter;
        if self.owner.load(Ordering::Relaxed) != THREAD_TOKEN.with(|t| t.get()) {
            unexpected("owner");
        }
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        if self.flag.load(Ordering::Relaxed) {
            unexpected("flag");
        }
        if self.owner.load(Ordering::Relaxed) != THREAD_TOKEN.with(|t| t.get()) {
            unexpected("owner");
        }
        c.store(c.load(Ordering::Relaxed) - 1, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        if self.flag.load(Ordering::Relaxed) {
            unexpected("flag");
        }
    }

    #[inline(always)]
    fn f1(&self) {
        self.counter.fetch_add(1, Ordering::SeqCst);
        if self.flag.load(Ordering::SeqCst) {
            unexpected("flag");
        }
        self.counter.fetch_sub(1, Ordering::SeqCst);
        if self.flag.load(Ordering::SeqCst) {
            unexpected("flag");
        }
    }

    #[inline(always)]
    fn f2(&self) {
        let c = &self.counter;
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.flag.load(Ordering::Relaxed) {
            unexpected("flag");
        }
        c.store(c.load(Ordering::Relaxed) - 1, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.flag.load(Ordering::Relaxed) {
            unexpected("flag");
        }
        // aio_wait_kick(): smp_mb(), then look for waiters.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) != 0 {
            unexpected("waiters");
        }
    }
}

/// The competitors shared by both S2 threads.
struct Shared {
    std_rw: std::sync::RwLock<u64>,
    pl_rw: parking_lot::RwLock<u64>,
    sharded: crossbeam_utils::sync::ShardedLock<u64>,
    flag: Arc<CachePadded<AtomicBool>>,
    waiters: Arc<CachePadded<AtomicUsize>>,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            std_rw: std::sync::RwLock::new(0),
            pl_rw: parking_lot::RwLock::new(0),
            sharded: crossbeam_utils::sync::ShardedLock::new(0),
            flag: Arc::new(CachePadded::new(AtomicBool::new(false))),
            waiters: Arc::new(CachePadded::new(AtomicUsize::new(0))),
        })
    }
}

/// The sync kernels of S1 and S2, by index.
const SYNC_KERNELS: [&str; 9] = [
    "ours asym",
    "ours sym",
    "F0",
    "F0+owner",
    "F1",
    "F2",
    "std RwLock",
    "parking_lot",
    "ShardedLock",
];

/// One thread's view of every sync kernel.
struct ThreadKernels {
    asym: IoContext,
    sym: IoContext,
    kernel: Kernel,
    shared: Arc<Shared>,
}

impl ThreadKernels {
    /// Runs kernel `k` for `n` pairs; returns nanoseconds per pair.
    fn run(&mut self, k: usize, n: u64) -> f64 {
        let start = Instant::now();
        match k {
            0 | 1 => {
                let ctx = if k == 0 { &self.asym } else { &self.sym };
                in_task(ctx, |cx| {
                    let cx = black_box(cx);
                    for _ in 0..n {
                        ours_pair(cx);
                    }
                });
            }
            2 => {
                let k = black_box(&self.kernel);
                for _ in 0..n {
                    k.f0();
                }
            }
            3 => {
                let k = black_box(&self.kernel);
                for _ in 0..n {
                    k.f0_owner();
                }
            }
            4 => {
                let k = black_box(&self.kernel);
                for _ in 0..n {
                    k.f1();
                }
            }
            5 => {
                let k = black_box(&self.kernel);
                for _ in 0..n {
                    k.f2();
                }
            }
            6 => {
                let l = black_box(&self.shared.std_rw);
                for _ in 0..n {
                    drop(l.read().unwrap_or_else(|e| e.into_inner()));
                }
            }
            7 => {
                let l = black_box(&self.shared.pl_rw);
                for _ in 0..n {
                    drop(l.read());
                }
            }
            8 => {
                let l = black_box(&self.shared.sharded);
                for _ in 0..n {
                    drop(l.read().unwrap_or_else(|e| e.into_inner()));
                }
            }
            _ => unreachable!(),
        }
        start.elapsed().as_nanos() as f64 / n as f64
    }
}

// ------------------------------------------------------------ S2/S3 workers

enum Cmd {
    /// Run sync kernel `k` for `n` pairs after the start barrier.
    /// Run sync kernel `k` for `n` pairs, after the start barrier when
    /// `together` (S2), alone otherwise (S1).
    Kernel(usize, u64, bool),
    /// S3: run reader ops through `mode` (0 asym, 1 sym) until `stop`.
    Reader(usize, Arc<AtomicBool>),
    Quit,
}

enum Reply {
    NsPerOp(f64),
    /// Ops done, the sampled per-op latencies in ns, and how many ops found
    /// a writer and waited.
    Reader(u64, Vec<f64>, u64),
}

struct Worker {
    cmd: mpsc::Sender<Cmd>,
    reply: mpsc::Receiver<Reply>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn start(cpu: usize, mut kernels: ThreadKernels, start: Arc<Barrier>) -> Worker {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("bench-cpu{cpu}"))
            .spawn(move || {
                pin_to(cpu);
                // Claim each context's owner word on this thread, as an I/O
                // thread does with its own context.
                in_task(&kernels.asym, ours_pair);
                in_task(&kernels.sym, ours_pair);
                own(&kernels.kernel);
                while let Ok(cmd) = cmd_rx.recv() {
                    match cmd {
                        Cmd::Kernel(k, n, together) => {
                            kernels.run(k, n / 10); // warm up
                            if together {
                                start.wait();
                            }
                            let ns = kernels.run(k, n);
                            let _ = reply_tx.send(Reply::NsPerOp(ns));
                        }
                        Cmd::Reader(mode, stop) => {
                            let ctx = if mode == 0 {
                                &kernels.asym
                            } else {
                                &kernels.sym
                            };
                            let reply = in_task(ctx, |cx| {
                                start.wait();
                                let mut ops = 0u64;
                                let mut waited = 0u64;
                                let mut samples = Vec::with_capacity(1 << 16);
                                while !stop.load(Ordering::Relaxed) {
                                    for _ in 0..63 {
                                        waited += u64::from(ours_op(cx));
                                    }
                                    let t = Instant::now();
                                    waited += u64::from(ours_op(cx));
                                    samples.push(t.elapsed().as_nanos() as f64);
                                    ops += 64;
                                }
                                Reply::Reader(ops, samples, waited)
                            });
                            let _ = reply_tx.send(reply);
                        }
                        Cmd::Quit => break,
                    }
                }
            })
            .expect("worker thread");
        Worker {
            cmd: cmd_tx,
            reply: reply_rx,
            thread: Some(thread),
        }
    }

    fn recv(&self) -> Reply {
        self.reply
            .recv_timeout(Duration::from_secs(120))
            .expect("worker did not answer")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ S1, S2

struct SyncResults {
    /// Per kernel, per round: ns per pair.
    s1: Vec<Vec<f64>>,
    /// Per kernel, per round: mean of the two threads' ns per pair.
    s2: Vec<Vec<f64>>,
}

fn run_s1_s2(cfg: &Config, main_a: &MainLoop, main_s: &MainLoop) -> SyncResults {
    // S1 runs on worker 0 alone, S2 on both: the same threads, contexts
    // and kernel state, so S2/S1 isolates the effect of the second core.
    let shared = Shared::new();
    let start = Arc::new(Barrier::new(2));
    let workers: Vec<Worker> = (0..2)
        .map(|cpu| {
            let kernels = ThreadKernels {
                asym: main_a.new_io_context(&format!("s2-asym-{cpu}")),
                sym: main_s.new_io_context(&format!("s2-sym-{cpu}")),
                kernel: Kernel::new(&shared.flag, &shared.waiters),
                shared: shared.clone(),
            };
            Worker::start(cpu, kernels, start.clone())
        })
        .collect();

    let n_k = SYNC_KERNELS.len();
    let mut s1 = vec![Vec::new(); n_k];
    let mut s2 = vec![Vec::new(); n_k];
    for round in 0..cfg.rounds {
        for i in 0..n_k {
            let k = (i + round) % n_k; // rotate the order every round
            workers[0]
                .cmd
                .send(Cmd::Kernel(k, cfg.s1_iters, false))
                .expect("worker");
            match workers[0].recv() {
                Reply::NsPerOp(ns) => s1[k].push(ns),
                Reply::Reader(..) => unreachable!(),
            }
            for w in &workers {
                w.cmd
                    .send(Cmd::Kernel(k, cfg.s2_iters, true))
                    .expect("worker");
            }
            let mut sum = 0.0;
            for w in &workers {
                match w.recv() {
                    Reply::NsPerOp(ns) => sum += ns,
                    Reply::Reader(..) => unreachable!(),
                }
            }
            s2[k].push(sum / workers.len() as f64);
        }
    }
    SyncResults { s1, s2 }
}

fn best(v: &[f64]) -> f64 {
    percentile(v, 0.0)
}

fn print_raw(name: &str, v: &[f64]) {
    let r: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
    println!("raw {name:<22} {}", r.join(" "));
}

fn print_sync(cfg: &Config, res: &SyncResults) {
    let idx = |name: &str| SYNC_KERNELS.iter().position(|k| *k == name).unwrap();
    let (asym, sym, f0) = (idx("ours asym"), idx("ours sym"), idx("F0"));
    if cfg.raw {
        for (k, name) in SYNC_KERNELS.iter().enumerate() {
            print_raw(&format!("S1 {name}"), &res.s1[k]);
            print_raw(&format!("S2 {name}"), &res.s2[k]);
        }
    }
    println!("## S1: one thread, lock+unlock pair (ns/pair; ratios: median of per-round ratios)");
    println!(
        "{:<14} {:>8} {:>8} {:>12} {:>12} {:>10}",
        "kernel", "median", "best", "asym/kernel", "sym/kernel", "kernel/F0"
    );
    for (k, name) in SYNC_KERNELS.iter().enumerate() {
        println!(
            "{:<14} {:>8.2} {:>8.2} {:>12.3} {:>12.3} {:>10.2}",
            name,
            median(&res.s1[k]),
            best(&res.s1[k]),
            median(&ratios(&res.s1[asym], &res.s1[k])),
            median(&ratios(&res.s1[sym], &res.s1[k])),
            median(&ratios(&res.s1[k], &res.s1[f0])),
        );
    }
    println!();
    println!("## S2: two threads on two cores, own context each (ns/pair per thread)");
    println!(
        "{:<14} {:>8} {:>8} {:>10} {:>12} {:>12}",
        "kernel", "median", "best", "S2/S1", "kernel/asym", "kernel/sym"
    );
    for (k, name) in SYNC_KERNELS.iter().enumerate() {
        println!(
            "{:<14} {:>8.2} {:>8.2} {:>10.3} {:>12.1} {:>12.1}",
            name,
            median(&res.s2[k]),
            best(&res.s2[k]),
            median(&ratios(&res.s2[k], &res.s1[k])),
            median(&ratios(&res.s2[k], &res.s2[asym])),
            median(&ratios(&res.s2[k], &res.s2[sym])),
        );
    }
    println!();
}

// --------------------------------------------------------------------- S3

struct S3Row {
    mode: &'static str,
    period: Duration,
    retained: Vec<f64>,
    reader_p99: Vec<f64>,
    reader_p999: Vec<f64>,
    writer: Vec<f64>,
    writes_per_s: Vec<f64>,
    /// Reader ops that found the writer and parked, per write.
    waits_per_write: Vec<f64>,
}

/// A main-loop task writing every `period`, holding ~1 µs; returns the
/// acquisition latencies (ns) once `stop` is set.
fn spawn_writer(
    main: &MainLoop,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> blockgraph::TaskHandle<Vec<f64>> {
    main.spawn(move |mut cx| async move {
        let mut lat = Vec::new();
        let mut next = Instant::now() + period;
        while !stop.load(Ordering::Relaxed) {
            // Periods of 1 ms and more: sleep (timer slack adds some tens of
            // microseconds). Shorter ones cannot be slept precisely: sleep
            // while far from the deadline, spin the rest, at the price of
            // the writer's core time (blocking the main-loop thread is fine
            // here: nothing else runs on it).
            loop {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                let left = next - now;
                if period >= Duration::from_millis(1) {
                    thread::sleep(left);
                } else if left > Duration::from_micros(120) {
                    thread::sleep(left - Duration::from_micros(80));
                } else {
                    std::hint::spin_loop();
                }
            }
            next += period;
            let t0 = Instant::now();
            let entered = cx
                .write(|_w| {
                    let t1 = Instant::now();
                    while t1.elapsed() < Duration::from_micros(1) {
                        std::hint::spin_loop();
                    }
                    t1
                })
                .await;
            lat.push((entered - t0).as_nanos() as f64);
            let now = Instant::now();
            if next < now {
                next = now; // fell behind: do not burst
            }
        }
        lat
    })
}

fn run_s3(cfg: &Config, main_a: &MainLoop, main_s: &MainLoop) -> Vec<S3Row> {
    let periods = [
        Duration::from_micros(10),
        Duration::from_micros(100),
        Duration::from_millis(1),
        Duration::from_millis(10),
    ];
    let shared = Shared::new();
    let start = Arc::new(Barrier::new(2));
    let workers: Vec<Worker> = (0..2)
        .map(|cpu| {
            let kernels = ThreadKernels {
                asym: main_a.new_io_context(&format!("s3-asym-{cpu}")),
                sym: main_s.new_io_context(&format!("s3-sym-{cpu}")),
                kernel: Kernel::new(&shared.flag, &shared.waiters),
                shared: shared.clone(),
            };
            Worker::start(cpu, kernels, start.clone())
        })
        .collect();
    let window = |mode: usize, writer: Option<(&MainLoop, Duration)>| {
        let stop = Arc::new(AtomicBool::new(false));
        let wstop = Arc::new(AtomicBool::new(false));
        let w = writer.map(|(main, period)| spawn_writer(main, period, wstop.clone()));
        for wk in &workers {
            wk.cmd
                .send(Cmd::Reader(mode, stop.clone()))
                .expect("worker");
        }
        thread::sleep(cfg.s3_window);
        stop.store(true, Ordering::Relaxed);
        let mut ops = 0;
        let mut waited = 0;
        let mut samples = Vec::new();
        for wk in &workers {
            match wk.recv() {
                Reply::Reader(n, s, p) => {
                    ops += n;
                    waited += p;
                    samples.extend(s);
                }
                Reply::NsPerOp(_) => unreachable!(),
            }
        }
        wstop.store(true, Ordering::Relaxed);
        let lat = w.map(|h| h.join()).unwrap_or_default();
        (ops, samples, lat, waited)
    };
    let mut rows = Vec::new();
    for (mode, name, main) in [(0, "asym", main_a), (1, "sym", main_s)] {
        for period in periods {
            let mut row = S3Row {
                mode: name,
                period,
                retained: vec![],
                reader_p99: vec![],
                reader_p999: vec![],
                writer: vec![],
                writes_per_s: vec![],
                waits_per_write: vec![],
            };
            for _ in 0..cfg.s3_rounds {
                let (base, _, _, _) = window(mode, None);
                let (ops, samples, lat, waited) = window(mode, Some((main, period)));
                row.waits_per_write
                    .push(waited as f64 / lat.len().max(1) as f64);
                row.retained.push(ops as f64 / base as f64);
                row.reader_p99.push(percentile(&samples, 99.0));
                row.reader_p999.push(percentile(&samples, 99.9));
                row.writes_per_s
                    .push(lat.len() as f64 / cfg.s3_window.as_secs_f64());
                row.writer.extend(lat);
            }
            rows.push(row);
        }
    }
    rows
}

fn print_s3(rows: &[S3Row]) {
    println!("## S3: S2 plus a writer holding ~1 us (medians over rounds)");
    println!(
        "{:<5} {:>8} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10} {:>11}",
        "mode",
        "period",
        "writes/s",
        "retained",
        "rd p99 ns",
        "rd p99.9 ns",
        "wr p50 us",
        "wr p99 us",
        "waits/write"
    );
    for r in rows {
        println!(
            "{:<5} {:>8} {:>9.0} {:>8.2}% {:>11.0} {:>11.0} {:>10.1} {:>10.1} {:>11.2}",
            r.mode,
            format!("{:?}", r.period),
            median(&r.writes_per_s),
            median(&r.retained) * 100.0,
            median(&r.reader_p99),
            median(&r.reader_p999),
            percentile(&r.writer, 50.0) / 1e3,
            percentile(&r.writer, 99.0) / 1e3,
            median(&r.waits_per_write),
        );
    }
    println!(
        "(rd: one reader op in 64 timed with Instant, ~20-40 ns timer overhead included; \
         wr: writer acquisition; waits/write: reader ops that found the writer and parked)"
    );
    println!();
}

// --------------------------------------------------------------------- S4

struct S4Row {
    mode: &'static str,
    what: String,
    lat: Vec<f64>,
}

/// Write-section acquisition latencies (ns) measured on the main loop.
fn measure_writes(main: &MainLoop, n: usize, gap: Duration) -> Vec<f64> {
    main.run(move |bql| {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            let t1 = bql.write(|_w| Instant::now());
            lat.push((t1 - t0).as_nanos() as f64);
            if !gap.is_zero() {
                let until = Instant::now() + gap;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }
        lat
    })
}

fn run_s4(cfg: &Config) -> Vec<S4Row> {
    let mut rows = Vec::new();
    for (symmetric, mode) in [(false, "asym"), (true, "sym")] {
        for n in [1usize, 8, 64, 256] {
            let main = main_loop(symmetric);
            let contexts: Vec<IoContext> = (0..n)
                .map(|i| main.new_io_context(&format!("idle{i}")))
                .collect();
            // Idle, but used once (claimed) on another thread, like an I/O
            // thread that has gone quiet.
            thread::scope(|s| {
                s.spawn(|| {
                    for c in &contexts {
                        in_task(c, ours_pair);
                    }
                });
            });
            assert_eq!(main.lock_contexts(), n);
            measure_writes(&main, cfg.s4_writes / 10, Duration::ZERO);
            let lat = measure_writes(&main, cfg.s4_writes, Duration::from_micros(5));
            rows.push(S4Row {
                mode,
                what: format!("{n} idle contexts"),
                lat,
            });
            drop(contexts);
            main.shutdown();
        }
        // One reader holding the lock 10 us at a time, on cpu1.
        let main = main_loop(symmetric);
        let ctx = main.new_io_context("holder");
        let stop = Arc::new(AtomicBool::new(false));
        let holder = {
            let stop = stop.clone();
            let ctx = ctx.clone();
            thread::spawn(move || {
                pin_to(1);
                in_task(&ctx, |cx| {
                    let mut held = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let g = futures::executor::block_on(cx.read());
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(10) {
                            std::hint::spin_loop();
                        }
                        drop(g);
                        held += 1;
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(2) {
                            std::hint::spin_loop();
                        }
                    }
                    held
                })
            })
        };
        let lat = measure_writes(&main, cfg.s4_writes / 4, Duration::from_micros(23));
        stop.store(true, Ordering::Relaxed);
        let held = holder.join().expect("holder");
        assert!(held > 0);
        rows.push(S4Row {
            mode,
            what: "1 reader holding 10 us".into(),
            lat,
        });
        main.shutdown();
    }
    rows
}

fn print_s4(rows: &[S4Row]) {
    println!("## S4: writer acquisition latency (announce + barrier + wait + enter)");
    println!(
        "{:<5} {:<24} {:>9} {:>9} {:>9}",
        "mode", "setting", "p50 us", "p99 us", "max us"
    );
    for r in rows {
        println!(
            "{:<5} {:<24} {:>9.2} {:>9.2} {:>9.1}",
            r.mode,
            r.what,
            percentile(&r.lat, 50.0) / 1e3,
            percentile(&r.lat, 99.0) / 1e3,
            percentile(&r.lat, 100.0) / 1e3,
        );
    }
    println!();
}

// --------------------------------------------------------------------- S5

const ASYNC_KERNELS: [&str; 5] = [
    "ours async",
    "ours sync pair",
    "tokio RwLock",
    "async_lock",
    "std RwLock",
];

/// One spawned task looping over every async kernel for every round.
fn run_s5_uncontended(cfg: &Config, main: &MainLoop, label: &str) -> Vec<Vec<f64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    pin_to(0);
    let ctx = main.new_io_context(label);
    let rounds = cfg.rounds;
    let n = cfg.s1_iters;
    let task = ctx.spawn_on(rt.handle(), move |mut cx| async move {
        let tokio_rw = tokio::sync::RwLock::new(0u64);
        let async_rw = async_lock::RwLock::new(0u64);
        let std_rw = std::sync::RwLock::new(0u64);
        let mut res = vec![Vec::new(); ASYNC_KERNELS.len()];
        for round in 0..rounds + 1 {
            for i in 0..ASYNC_KERNELS.len() {
                let k = (i + round) % ASYNC_KERNELS.len();
                let start = Instant::now();
                match k {
                    0 => {
                        for _ in 0..n {
                            // Consumed like the sync pair's guard (no
                            // black_box: dropping it has side effects).
                            let g = cx.read().await;
                            drop(g);
                        }
                    }
                    1 => {
                        for _ in 0..n {
                            ours_pair(&mut cx);
                        }
                    }
                    2 => {
                        for _ in 0..n {
                            drop(tokio_rw.read().await);
                        }
                    }
                    3 => {
                        for _ in 0..n {
                            drop(async_rw.read().await);
                        }
                    }
                    4 => {
                        for _ in 0..n {
                            drop(std_rw.read().unwrap_or_else(|e| e.into_inner()));
                        }
                    }
                    _ => unreachable!(),
                }
                if round > 0 {
                    // round 0 warms up
                    res[k].push(start.elapsed().as_nanos() as f64 / n as f64);
                }
            }
        }
        res
    });
    rt.block_on(task).expect("S5 task")
}

struct Queued {
    /// Per reader, ns from the writer's last instant inside to the reader
    /// holding the lock.
    wake: Vec<f64>,
    /// Per trial, latest minus earliest reader.
    spread: Vec<f64>,
}

/// Readers (2 I/O threads x 2 tasks) queue behind a write section; how fast
/// do they all get in once it ends?
fn run_s5_queued(cfg: &Config, main: &MainLoop) -> Queued {
    const READERS_PER_THREAD: usize = 2;
    let threads: Vec<_> = (0..2)
        .map(|i| main.new_io_thread(&format!("s5-io{i}")).expect("io thread"))
        .collect();
    let total = threads.len() * READERS_PER_THREAD;
    let mut out = Queued {
        wake: vec![],
        spread: vec![],
    };
    for _ in 0..cfg.s5_trials {
        let ready = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Instant>();
        let go = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        // The writer enters first, then lets the readers loose and waits
        // until they have all polled (and queued) before leaving.
        let leave = {
            let (ready, go) = (ready.clone(), go.clone());
            main.spawn(move |mut cx| async move {
                cx.write(|_w| {
                    go.store(true, Ordering::SeqCst);
                    let t = Instant::now();
                    while ready.load(Ordering::SeqCst) < total {
                        if t.elapsed() > Duration::from_secs(10) {
                            unexpected("readers did not queue");
                        }
                        std::hint::spin_loop();
                    }
                    // Let the last poll reach the queue.
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                    Instant::now()
                })
                .await
            })
        };
        for io in &threads {
            for _ in 0..READERS_PER_THREAD {
                let (ready, go, tx) = (ready.clone(), go.clone(), tx.clone());
                handles.push(io.spawn(move |mut cx| async move {
                    while !go.load(Ordering::SeqCst) {
                        tokio::task::yield_now().await;
                    }
                    ready.fetch_add(1, Ordering::SeqCst);
                    let g = cx.read().await;
                    let t = Instant::now();
                    drop(g);
                    let _ = tx.send(t);
                }));
            }
        }
        drop(tx);
        let left = leave.join();
        let times: Vec<Instant> = (0..total)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("queued reader never resumed")
            })
            .collect();
        for h in handles {
            h.join();
        }
        let lat: Vec<f64> = times
            .iter()
            .map(|t| t.saturating_duration_since(left).as_nanos() as f64)
            .collect();
        let first = times.iter().min().copied().expect("readers");
        let last = times.iter().max().copied().expect("readers");
        out.spread.push((last - first).as_nanos() as f64);
        out.wake.extend(lat);
    }
    out
}

fn print_s5(cfg: &Config, unc: &[(&str, Vec<Vec<f64>>)], queued: &[(&str, Queued)]) {
    if cfg.raw {
        for (mode, res) in unc {
            for (k, name) in ASYNC_KERNELS.iter().enumerate() {
                print_raw(&format!("S5 {mode} {name}"), &res[k]);
            }
        }
    }
    println!("## S5: async read().await looping in one spawned task (ns/op)");
    println!(
        "{:<6} {:<15} {:>8} {:>8} {:>14}",
        "mode", "kernel", "median", "best", "ours async/it"
    );
    for (mode, res) in unc {
        for (k, name) in ASYNC_KERNELS.iter().enumerate() {
            println!(
                "{:<6} {:<15} {:>8.2} {:>8.2} {:>14.3}",
                mode,
                name,
                median(&res[k]),
                best(&res[k]),
                median(&ratios(&res[0], &res[k]))
            );
        }
    }
    println!();
    println!("## S5: 4 readers (2 I/O threads x 2 tasks) queued behind a writer");
    println!(
        "{:<6} {:>12} {:>12} {:>12} {:>16}",
        "mode", "wake p50 us", "wake p99 us", "wake max us", "spread p50 us"
    );
    for (mode, q) in queued {
        println!(
            "{:<6} {:>12.1} {:>12.1} {:>12.1} {:>16.1}",
            mode,
            percentile(&q.wake, 50.0) / 1e3,
            percentile(&q.wake, 99.0) / 1e3,
            percentile(&q.wake, 100.0) / 1e3,
            percentile(&q.spread, 50.0) / 1e3,
        );
    }
    println!("(every queued reader resumed in every trial)");
    println!();
}

// ------------------------------------------------------------------ targets

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "GAP"
    }
}

fn target(mode: &str, what: &str, value: String, ok: bool) {
    println!("{mode:<5} {what:<36} {value:>10}  {}", verdict(ok));
}

fn print_targets(
    sync: Option<&SyncResults>,
    s3: &[S3Row],
    s4: &[S4Row],
    s5: &[(&str, Vec<Vec<f64>>)],
) {
    let idx = |name: &str| SYNC_KERNELS.iter().position(|k| *k == name).unwrap();
    println!("## BRIEF §8 lock targets (median of per-round ratios)");
    for (mode, ours) in [("asym", idx("ours asym")), ("sym", idx("ours sym"))] {
        if let Some(sync) = sync {
            let r1 = |other: &str| median(&ratios(&sync.s1[ours], &sync.s1[idx(other)]));
            let r2 = |other: &str| median(&ratios(&sync.s2[idx(other)], &sync.s2[ours]));
            let upto = [
                ("S1 ours/F0 <= 1.3", r1("F0"), 1.3),
                ("S1 ours/std <= 0.25", r1("std RwLock"), 0.25),
                ("S1 ours/parking_lot <= 0.25", r1("parking_lot"), 0.25),
                ("S1 ours/ShardedLock <= 0.25", r1("ShardedLock"), 0.25),
                ("S1 ours/F2 <= 0.4", r1("F2"), 0.4),
                (
                    "S2 per-thread/S1 <= 1.1",
                    median(&ratios(&sync.s2[ours], &sync.s1[ours])),
                    1.1,
                ),
            ];
            for (what, v, limit) in upto {
                target(mode, what, format!("{v:.3}"), v <= limit);
            }
            for (what, v) in [
                ("S2 std/ours >= 10", r2("std RwLock")),
                ("S2 parking_lot/ours >= 10", r2("parking_lot")),
            ] {
                target(mode, what, format!("{v:.1}"), v >= 10.0);
            }
        }
        if let Some((_, res)) = s5.iter().find(|(m, _)| *m == mode) {
            let r = |k: usize| median(&ratios(&res[0], &res[k]));
            for (what, v, limit) in [
                ("S5 async/sync pair <= 1.5", r(1), 1.5),
                ("S5 async/tokio <= 0.2", r(2), 0.2),
                ("S5 async/async_lock <= 0.3", r(3), 0.3),
            ] {
                target(mode, what, format!("{v:.3}"), v <= limit);
            }
        }
        if let Some(r) = s4
            .iter()
            .find(|r| r.mode == mode && r.what == "64 idle contexts")
        {
            let p99 = percentile(&r.lat, 99.0) / 1e3;
            target(
                mode,
                "S4 64 idle: writer p99 < 50 us",
                format!("{p99:.2} us"),
                p99 < 50.0,
            );
        }
        if let Some(r) = s3
            .iter()
            .find(|r| r.mode == mode && r.period == Duration::from_millis(1))
        {
            let kept = median(&r.retained) * 100.0;
            target(
                mode,
                "S3 1 ms writer: retained >= 97%",
                format!("{kept:.2}%"),
                kept >= 97.0,
            );
        }
    }
    println!();
}

fn main() {
    let cfg = Config::from_args();
    print_machine(&cfg);
    let t0 = Instant::now();

    let main_a = main_loop(false);
    let main_s = main_loop(true);

    let sync = cfg.runs("s12").then(|| run_s1_s2(&cfg, &main_a, &main_s));
    if let Some(sync) = &sync {
        print_sync(&cfg, sync);
    }
    let s3 = if cfg.runs("s3") {
        run_s3(&cfg, &main_a, &main_s)
    } else {
        Vec::new()
    };
    if !s3.is_empty() {
        print_s3(&s3);
    }
    let s4 = if cfg.runs("s4") {
        run_s4(&cfg)
    } else {
        Vec::new()
    };
    if !s4.is_empty() {
        print_s4(&s4);
    }
    let unc = if cfg.runs("s5") {
        let unc = vec![
            ("asym", run_s5_uncontended(&cfg, &main_a, "s5-asym")),
            ("sym", run_s5_uncontended(&cfg, &main_s, "s5-sym")),
        ];
        let queued = vec![
            ("asym", run_s5_queued(&cfg, &main_a)),
            ("sym", run_s5_queued(&cfg, &main_s)),
        ];
        print_s5(&cfg, &unc, &queued);
        unc
    } else {
        Vec::new()
    };

    print_targets(sync.as_ref(), &s3, &s4, &unc);
    println!("total bench time: {:.1} s", t0.elapsed().as_secs_f64());

    main_a.shutdown();
    main_s.shutdown();
}
