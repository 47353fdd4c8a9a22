//! The sync kernels of S1, S2 (and the threads of S3): our lock in both
//! fence modes, the calibration kernels and the sync competitors.
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

use std::hint::black_box;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use blockgraph::{IoContext, MainLoop};
use crossbeam_utils::CachePadded;

use crate::ours::{self, in_task, unexpected};

std::thread_local! {
    /// F0+owner's stand-in for the lock's thread id.
    static THREAD_TOKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Gives the calling thread a token and makes it `kernel`'s owner.
pub fn own(kernel: &Kernel) {
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
pub struct Kernel {
    counter: CachePadded<AtomicUsize>,
    /// For F0+owner: the thread token of the thread using this kernel.
    owner: AtomicUsize,
    flag: Arc<CachePadded<AtomicBool>>,
    waiters: Arc<CachePadded<AtomicUsize>>,
}

impl Kernel {
    pub fn new(
        flag: &Arc<CachePadded<AtomicBool>>,
        waiters: &Arc<CachePadded<AtomicUsize>>,
    ) -> Self {
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
pub struct Shared {
    std_rw: std::sync::RwLock<u64>,
    pl_rw: parking_lot::RwLock<u64>,
    sharded: crossbeam_utils::sync::ShardedLock<u64>,
    flag: Arc<CachePadded<AtomicBool>>,
    waiters: Arc<CachePadded<AtomicUsize>>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
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
pub const SYNC_KERNELS: [&str; 9] = [
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
pub struct ThreadKernels {
    /// A context of the main loop in asymmetric mode.
    pub asym: IoContext,
    /// A context of the main loop in symmetric mode.
    pub sym: IoContext,
    pub kernel: Kernel,
    pub shared: Arc<Shared>,
}

impl ThreadKernels {
    /// The kernels of the thread that will run on `cpu`, with contexts of
    /// `main_a` (asymmetric) and `main_s` (symmetric) named after `label`.
    pub fn new(
        label: &str,
        cpu: usize,
        main_a: &MainLoop,
        main_s: &MainLoop,
        shared: &Arc<Shared>,
    ) -> ThreadKernels {
        ThreadKernels {
            asym: main_a.new_io_context(&format!("{label}-asym-{cpu}")),
            sym: main_s.new_io_context(&format!("{label}-sym-{cpu}")),
            kernel: Kernel::new(&shared.flag, &shared.waiters),
            shared: shared.clone(),
        }
    }

    /// Runs kernel `k` for `n` pairs; returns nanoseconds per pair.
    pub fn run(&mut self, k: usize, n: u64) -> f64 {
        let start = Instant::now();
        match k {
            0 | 1 => {
                let ctx = if k == 0 { &self.asym } else { &self.sym };
                in_task(ctx, |cx| {
                    let cx = black_box(cx);
                    for _ in 0..n {
                        ours::pair(cx);
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
