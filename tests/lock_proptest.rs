//! Property test of the graph lock as a state machine, through the public
//! API: random sequences of context add/remove, reader lock/unlock from
//! various contexts, non-blocking read attempts, writer enter/leave and
//! drain begin/end, checked against a model after every step.
//!
//! The system under test: a main loop with `base` (null) under backend
//! `vda`; contexts from `MainLoop::new_io_context` whose reader tasks run on
//! a two-worker multi-thread runtime (so guards migrate); the writer and the
//! drain sections are main-loop tasks held open across steps.
//!
//! Invariants after every step: readers inside == readers the model holds,
//! per context too; the writer flag is up exactly while a writer waits or is
//! inside; a writer waiting for readers enters when the last one leaves (and
//! not before); readers that arrive while a writer is active queue and all
//! get in when it leaves; a non-blocking read succeeds exactly when no writer
//! is active; the contexts the writer counts are the live ones plus removed
//! ones that still have reader tasks; the base node's drain count and the
//! backend's quiesced state follow the open drain sections. Every wait is
//! bounded, so a lost wake-up fails instead of hanging. Both fence modes
//! run (the symmetric one forced through `BLOCKGRAPH_LOCK_FENCE`).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use blockgraph::drivers::NullDriver;
use blockgraph::{BackendOptions, BlockBackend, IoContext, MainLoop, NodeHandle};
use proptest::prelude::*;
use proptest::sample::Index;
use tokio::sync::oneshot;

/// Bound on every wait: each step takes microseconds to milliseconds, so a
/// wait this long is a lost wake-up (short, because shrinking a failure
/// replays it many times).
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a queued reader is given to (wrongly) get in before we check
/// that it did not.
const SETTLE: Duration = Duration::from_millis(1);

#[derive(Clone, Debug)]
enum Op {
    AddContext,
    RemoveContext(Index),
    Read(Index),
    Release(Index),
    TryRead(Index),
    WriterEnter,
    WriterLeave,
    DrainBegin,
    DrainEnd(Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::AddContext),
        1 => any::<Index>().prop_map(Op::RemoveContext),
        4 => any::<Index>().prop_map(Op::Read),
        3 => any::<Index>().prop_map(Op::Release),
        2 => any::<Index>().prop_map(Op::TryRead),
        2 => Just(Op::WriterEnter),
        2 => Just(Op::WriterLeave),
        1 => Just(Op::DrainBegin),
        1 => any::<Index>().prop_map(Op::DrainEnd),
    ]
}

struct Context {
    id: usize,
    /// `None` once removed.
    handle: Option<IoContext>,
}

#[derive(PartialEq)]
enum ReaderState {
    Held,
    Queued,
}

struct Reader {
    context: usize,
    state: ReaderState,
    entered: mpsc::Receiver<()>,
    release: Option<oneshot::Sender<()>>,
    done: mpsc::Receiver<()>,
}

enum Writer {
    Idle,
    Waiting(WriterTask),
    Inside(WriterTask),
}

struct WriterTask {
    entered: mpsc::Receiver<()>,
    leave: mpsc::Sender<()>,
    left: mpsc::Receiver<()>,
}

struct Drain {
    end: oneshot::Sender<()>,
    ended: mpsc::Receiver<()>,
}

struct Harness {
    main: MainLoop,
    runtime: tokio::runtime::Runtime,
    base: NodeHandle,
    backend: BlockBackend,
    contexts: Vec<Context>,
    readers: Vec<Reader>,
    writer: Writer,
    drains: Vec<Drain>,
}

fn recv(rx: &mpsc::Receiver<()>, what: &str) -> Result<(), TestCaseError> {
    rx.recv_timeout(TIMEOUT)
        .map_err(|_| TestCaseError::fail(format!("timed out: {what}")))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), TestCaseError> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > TIMEOUT {
            return Err(TestCaseError::fail(format!("timed out: {what}")));
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// Serialises main-loop creation: the fence mode is read from the
/// environment then.
static MODE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Harness {
    fn new(symmetric: bool) -> Harness {
        let main = {
            let _serial = MODE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            if symmetric {
                std::env::set_var("BLOCKGRAPH_LOCK_FENCE", "symmetric");
            }
            let main = MainLoop::new().expect("main loop");
            std::env::remove_var("BLOCKGRAPH_LOCK_FENCE");
            main
        };
        let (base, backend) = main
            .run(|bql| {
                bql.write(|w| -> blockgraph::Result<_> {
                    let base = w.add_node("base", NullDriver::new(1 << 20), &[])?;
                    let backend = w.add_backend("vda", &base, BackendOptions::default())?;
                    Ok((base, backend))
                })
            })
            .expect("graph");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        Harness {
            main,
            runtime,
            base,
            backend,
            contexts: Vec::new(),
            readers: Vec::new(),
            writer: Writer::Idle,
            drains: Vec::new(),
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.contexts.len())
            .filter(|&i| self.contexts[i].handle.is_some())
            .collect()
    }

    fn held(&self) -> usize {
        self.readers
            .iter()
            .filter(|r| r.state == ReaderState::Held)
            .count()
    }

    fn writer_inside(&self) -> bool {
        matches!(self.writer, Writer::Inside(_))
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::AddContext => {
                let id = self.contexts.len();
                let handle = self.main.new_io_context(&format!("ctx{id}"));
                self.contexts.push(Context {
                    id,
                    handle: Some(handle),
                });
            }
            Op::RemoveContext(i) => {
                let live = self.live();
                if !live.is_empty() {
                    self.contexts[live[i.index(live.len())]].handle = None;
                }
            }
            Op::Read(i) => {
                let live = self.live();
                if !live.is_empty() {
                    self.spawn_reader(live[i.index(live.len())])?;
                }
            }
            Op::Release(i) => {
                let held: Vec<usize> = (0..self.readers.len())
                    .filter(|&r| self.readers[r].state == ReaderState::Held)
                    .collect();
                if !held.is_empty() {
                    self.release(held[i.index(held.len())])?;
                }
            }
            Op::TryRead(i) => {
                let live = self.live();
                if !live.is_empty() {
                    let ctx = self.contexts[live[i.index(live.len())]]
                        .handle
                        .clone()
                        .expect("live");
                    let got = self
                        .runtime
                        .block_on(ctx.spawn_on(self.runtime.handle(), |mut cx| async move {
                            cx.try_read().is_some()
                        }))
                        .expect("try_read task");
                    let writer_active = !matches!(self.writer, Writer::Idle);
                    prop_assert_eq!(
                        got,
                        !writer_active,
                        "try_read with writer {}",
                        writer_active
                    );
                }
            }
            Op::WriterEnter => {
                if matches!(self.writer, Writer::Idle) {
                    self.writer_enter()?;
                }
            }
            Op::WriterLeave => {
                if self.writer_inside() {
                    self.writer_leave()?;
                }
            }
            Op::DrainBegin => {
                if !self.writer_inside() {
                    self.drain_begin()?;
                }
            }
            Op::DrainEnd(i) => {
                if !self.writer_inside() && !self.drains.is_empty() {
                    let d = self.drains.remove(i.index(self.drains.len()));
                    let _ = d.end.send(());
                    recv(&d.ended, "drain section end")?;
                }
            }
        }
        self.check()
    }

    fn spawn_reader(&mut self, context: usize) -> Result<(), TestCaseError> {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = oneshot::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let ctx = self.contexts[context].handle.as_ref().expect("live");
        drop(
            ctx.spawn_on(self.runtime.handle(), move |mut cx| async move {
                let guard = cx.read().await;
                let _ = entered_tx.send(());
                let _ = release_rx.await;
                drop(guard);
                drop(cx);
                let _ = done_tx.send(());
            }),
        );
        let state = if matches!(self.writer, Writer::Idle) {
            recv(&entered, "uncontended reader to get in")?;
            ReaderState::Held
        } else {
            std::thread::sleep(SETTLE);
            prop_assert!(
                entered.try_recv().is_err(),
                "a reader got in while a writer was active"
            );
            ReaderState::Queued
        };
        self.readers.push(Reader {
            context,
            state,
            entered,
            release: Some(release),
            done,
        });
        Ok(())
    }

    fn release(&mut self, r: usize) -> Result<(), TestCaseError> {
        let mut reader = self.readers.remove(r);
        let _ = reader.release.take().expect("held").send(());
        recv(&reader.done, "reader to leave")?;
        if let Writer::Waiting(task) = &self.writer {
            if self.held() == 0 {
                // The last reader out must wake the writer.
                recv(&task.entered, "writer to enter after the last reader left")?;
                let Writer::Waiting(task) = std::mem::replace(&mut self.writer, Writer::Idle)
                else {
                    unreachable!()
                };
                self.writer = Writer::Inside(task);
            } else {
                prop_assert!(
                    task.entered.try_recv().is_err(),
                    "writer entered while readers were inside"
                );
            }
        }
        Ok(())
    }

    fn writer_enter(&mut self) -> Result<(), TestCaseError> {
        let (entered_tx, entered) = mpsc::channel();
        let (leave, leave_rx) = mpsc::channel::<()>();
        let (left_tx, left) = mpsc::channel();
        drop(self.main.spawn(move |mut cx| async move {
            cx.write(move |_w| {
                let _ = entered_tx.send(());
                // Hold the section (and the main loop) until told to leave.
                let _ = leave_rx.recv_timeout(TIMEOUT);
            })
            .await;
            let _ = left_tx.send(());
        }));
        let task = WriterTask {
            entered,
            leave,
            left,
        };
        if self.held() == 0 {
            recv(&task.entered, "writer to enter with no reader inside")?;
            self.writer = Writer::Inside(task);
        } else {
            let main = self.main.clone();
            wait_until("writer to announce itself", || main.writer_active())?;
            std::thread::sleep(SETTLE);
            prop_assert!(
                task.entered.try_recv().is_err(),
                "writer entered while readers were inside"
            );
            self.writer = Writer::Waiting(task);
        }
        Ok(())
    }

    fn writer_leave(&mut self) -> Result<(), TestCaseError> {
        let Writer::Inside(task) = std::mem::replace(&mut self.writer, Writer::Idle) else {
            unreachable!()
        };
        let _ = task.leave.send(());
        recv(&task.left, "write section to end")?;
        // Every queued reader gets in.
        for reader in &mut self.readers {
            if reader.state == ReaderState::Queued {
                recv(
                    &reader.entered,
                    "queued reader to resume after the writer left",
                )?;
                reader.state = ReaderState::Held;
            }
        }
        Ok(())
    }

    fn drain_begin(&mut self) -> Result<(), TestCaseError> {
        let (began_tx, began) = mpsc::channel();
        let (end, end_rx) = oneshot::channel::<()>();
        let (ended_tx, ended) = mpsc::channel();
        let node = self.base.clone();
        drop(self.main.spawn(move |cx| async move {
            let drained = cx.drain(&node).await;
            let _ = began_tx.send(());
            let _ = end_rx.await;
            drop(drained);
            let _ = ended_tx.send(());
        }));
        recv(&began, "drain section to begin")?;
        self.drains.push(Drain { end, ended });
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.main.readers_inside(), self.held(), "readers inside");
        prop_assert_eq!(
            self.main.writer_active(),
            !matches!(self.writer, Writer::Idle),
            "writer flag"
        );
        for c in &self.contexts {
            if let Some(handle) = &c.handle {
                let held = self
                    .readers
                    .iter()
                    .filter(|r| r.context == c.id && r.state == ReaderState::Held)
                    .count();
                prop_assert_eq!(handle.readers(), held, "readers of ctx{}", c.id);
            }
        }
        let counted = self
            .contexts
            .iter()
            .filter(|c| c.handle.is_some() || self.readers.iter().any(|r| r.context == c.id))
            .count();
        prop_assert_eq!(self.main.lock_contexts(), counted, "contexts counted");
        if !self.writer_inside() {
            let base = self.base.clone();
            let count = self.main.run(move |bql| base.gs(bql).drain_count());
            prop_assert_eq!(count as usize, self.drains.len(), "drain count of base");
            prop_assert_eq!(
                self.backend.is_quiesced(),
                !self.drains.is_empty(),
                "backend quiesced"
            );
        }
        Ok(())
    }

    /// Ends everything and checks the lock is back to rest.
    fn finish(mut self) -> Result<(), TestCaseError> {
        while self.held() > 0 {
            let r = self
                .readers
                .iter()
                .position(|r| r.state == ReaderState::Held)
                .expect("held");
            self.release(r)?;
        }
        if self.writer_inside() {
            self.writer_leave()?;
        }
        while !self.readers.is_empty() {
            self.release(0)?;
        }
        for d in std::mem::take(&mut self.drains) {
            let _ = d.end.send(());
            recv(&d.ended, "drain section end")?;
        }
        self.check()?;
        for c in &mut self.contexts {
            c.handle = None;
        }
        prop_assert_eq!(self.main.lock_contexts(), 0);
        prop_assert_eq!(self.main.readers_inside(), 0);
        prop_assert!(!self.main.writer_active());
        self.main.shutdown();
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        max_shrink_iters: 256,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn graph_lock_state_machine(ops in prop::collection::vec(op(), 1..40)) {
        run(false, &ops)?;
    }

    #[test]
    fn graph_lock_state_machine_symmetric_fence(ops in prop::collection::vec(op(), 1..40)) {
        run(true, &ops)?;
    }
}

fn run(symmetric: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(symmetric);
    // Start with a context so short sequences still read.
    harness.apply(&Op::AddContext)?;
    for op in ops {
        harness.apply(op)?;
    }
    harness.finish()
}
