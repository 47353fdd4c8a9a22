//! The two pinned threads of S1/S2 and S3, driven by commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::kernels::{own, ThreadKernels};
use crate::ours::{self, in_task, pin_to};

pub enum Cmd {
    /// Run sync kernel `k` for `n` pairs, after the start barrier when
    /// `together` (S2), alone otherwise (S1).
    Kernel(usize, u64, bool),
    /// S3: run reader ops through `mode` (0 asym, 1 sym) until `stop`.
    Reader(usize, Arc<AtomicBool>),
    Quit,
}

pub enum Reply {
    NsPerOp(f64),
    /// Ops done, the sampled per-op latencies in ns, and how many ops found
    /// a writer and waited.
    Reader(u64, Vec<f64>, u64),
}

pub struct Worker {
    pub cmd: mpsc::Sender<Cmd>,
    reply: mpsc::Receiver<Reply>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    pub fn start(cpu: usize, mut kernels: ThreadKernels, start: Arc<Barrier>) -> Worker {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("bench-cpu{cpu}"))
            .spawn(move || {
                pin_to(cpu);
                // Claim each context's owner word on this thread, as an I/O
                // thread does with its own context.
                in_task(&kernels.asym, ours::pair);
                in_task(&kernels.sym, ours::pair);
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
                                        waited += u64::from(ours::op(cx));
                                    }
                                    let t = Instant::now();
                                    waited += u64::from(ours::op(cx));
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

    pub fn recv(&self) -> Reply {
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
