//! Loom models of the graph lock protocol (`--cfg loom`).
//!
//! The "graph" is a `loom::cell::UnsafeCell`: readers read it inside their
//! read section, the writer writes it inside its write section. Loom fails a
//! model on any access pair not ordered by happens-before, so "the writer
//! never enters while a reader is inside" (and "a reader sees the writer's
//! changes") is checked on every explored interleaving; a reader that is
//! never woken shows up as a deadlock.
//!
//! Both fence modes are modelled. Loom cannot express `membarrier`; the
//! asymmetric mode is modelled by what the kernel promises: the writer's
//! `membarrier` acts as a full fence on the writer side *and* at the reader's
//! compiler fence (`light_barrier` and `heavy_barrier` are `fence(SeqCst)`
//! under loom). What the model then checks is everything else: the split
//! owner/foreign counters, the owner claim, guards released on another
//! thread, wake-ups and the reader queue. Loom treats `SeqCst` accesses as
//! `AcqRel`, so the symmetric mode's reliance on the `SeqCst` total order is
//! modelled by a `fence(SeqCst)` after each RMW and after the writer's flag
//! store (`seq_cst_point`).
//!
//! Each of these protocol mutations makes at least one model fail at the
//! default bounds (checked by hand while writing them): dropping the
//! reader's light barrier, the writer's heavy barrier, the flag copies on
//! raising, the copy initialisation of a shard created under a writer, the
//! wake-up of the writer on leaving, the owner check (any thread writing
//! the owner's counters), reading `entered` before `left` in the writer's
//! sum, pruning a shard that a reader still holds, and draining the reader
//! queue before lowering the flag.
//!
//! Bounded run (what CI does through `tests/lock_loom.rs`, seconds once
//! built): `RUSTFLAGS="--cfg loom" cargo test --release --lib sync::tests::loom`
//! (3 preemptions, 2 for the three-thread queue model). Deeper:
//! `LOOM_MAX_PREEMPTIONS=3` in front of the same command (about 45 s on 2
//! cores), or `=4` (about 25 min).

use std::future::poll_fn;

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

use crate::sync::graph_lock::{GraphLock, ReaderShard};
use crate::sync::membarrier::FenceMode;

const MODES: [FenceMode; 2] = [FenceMode::Asymmetric, FenceMode::Symmetric];

/// Checks `f` with `LOOM_MAX_PREEMPTIONS` (and loom's other variables)
/// from the environment, or at most 3 preemptions by default: enough to
/// catch every mutation listed in the module documentation, in seconds.
fn model(f: impl Fn() + Sync + Send + 'static) {
    model_with_default_bound(3, f);
}

fn model_with_default_bound(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(bound);
    }
    builder.check(f);
}

/// The state a model shares between threads.
struct World {
    lock: GraphLock,
    graph: UnsafeCell<u64>,
}

impl World {
    fn new(mode: FenceMode) -> Arc<World> {
        let world = Arc::new(World {
            lock: GraphLock::with_mode(mode),
            graph: UnsafeCell::new(0),
        });
        assert_eq!(world.lock.mode(), mode);
        world
    }

    /// `IoTask::read().await`, blocking the model thread while queued.
    fn read(&self, shard: &ReaderShard) {
        loom::future::block_on(poll_fn(|cx| self.lock.poll_read(shard, cx)));
    }

    /// What a reader does inside: look at the graph.
    fn look(&self) -> u64 {
        // SAFETY: called between a successful read lock and its unlock; the
        // only writes are `World::write`'s, inside write sections, which the
        // lock under test excludes (loom checks exactly that).
        self.graph.with(|p| unsafe { *p })
    }

    /// A whole write section (`Bql::write`): announce, wait, change, leave.
    fn write(&self) {
        self.lock.write_announce();
        loom::future::block_on(poll_fn(|cx| self.lock.poll_readers_gone(cx)));
        // SAFETY: the flag is up and every reader has left: the lock under
        // test promises no reader accesses the graph now (loom checks it).
        self.graph.with_mut(|p| unsafe { *p += 1 });
        self.lock.write_leave();
    }
}

#[test]
fn loom_reader_and_writer_exclude_each_other() {
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let shard = world.lock.new_shard();
            let reader = {
                let world = world.clone();
                thread::spawn(move || {
                    world.read(&shard);
                    let seen = world.look();
                    world.lock.read_unlock(&shard);
                    seen
                })
            };
            world.write();
            let seen = reader.join().unwrap();
            assert!(seen <= 1);
            assert_eq!(world.lock.total_readers(), 0);
        });
    }
}

#[test]
fn loom_fast_path_reader_and_writer() {
    // try_read (no queue) racing the writer: exclusion plus the writer's
    // wake-up by a reader that backs off or leaves.
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let shard = world.lock.new_shard();
            let reader = {
                let world = world.clone();
                thread::spawn(move || {
                    for _ in 0..2 {
                        if world.lock.try_read(&shard) {
                            world.look();
                            world.lock.read_unlock(&shard);
                        }
                    }
                })
            };
            world.write();
            reader.join().unwrap();
            assert!(!world.lock.writer_active());
        });
    }
}

#[test]
fn loom_queued_readers_are_all_woken() {
    // Three threads: 2 preemptions by default (seconds), 3 in the deeper
    // run (about a minute).
    for mode in MODES {
        model_with_default_bound(2, move || {
            let world = World::new(mode);
            world.lock.write_announce();
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let world = world.clone();
                    let shard = world.lock.new_shard();
                    thread::spawn(move || {
                        world.read(&shard);
                        let seen = world.look();
                        world.lock.read_unlock(&shard);
                        seen
                    })
                })
                .collect();
            loom::future::block_on(poll_fn(|cx| world.lock.poll_readers_gone(cx)));
            // SAFETY: write section (flag up, no reader inside).
            world.graph.with_mut(|p| unsafe { *p = 7 });
            world.lock.write_leave();
            for r in readers {
                // Announced before the readers started: they all queued and
                // must all see the write once woken.
                assert_eq!(r.join().unwrap(), 7);
            }
        });
    }
}

#[test]
fn loom_context_removed_during_a_read() {
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let context = world.lock.new_shard();
            let task = context.clone(); // the reader task's IoTask
            let reader = {
                let world = world.clone();
                thread::spawn(move || {
                    world.read(&task);
                    world.look();
                    world.lock.read_unlock(&task);
                    drop(task);
                })
            };
            drop(context); // remove the context while the reader may be inside
            world.write();
            reader.join().unwrap();
            assert_eq!(world.lock.shard_count(), 0);
        });
    }
}

#[test]
fn loom_guard_dropped_on_another_thread() {
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let shard = world.lock.new_shard();
            // Takes the read lock (claiming the shard in asymmetric mode)
            // and hands the "guard" to whoever joins it.
            let taker = {
                let world = world.clone();
                let shard = shard.clone();
                thread::spawn(move || world.lock.try_read(&shard))
            };
            let writer = {
                let world = world.clone();
                thread::spawn(move || world.write())
            };
            if taker.join().unwrap() {
                // Still inside, now on this thread: look, then release here.
                world.look();
                world.lock.read_unlock(&shard);
            }
            writer.join().unwrap();
            assert_eq!(world.lock.total_readers(), 0);
        });
    }
}

#[test]
fn loom_owner_and_foreign_readers_share_a_context() {
    // Two threads reading through one context (an embedder's multi-thread
    // runtime): one owns the shard, the other goes through `foreign`.
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let shard = world.lock.new_shard();
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let world = world.clone();
                    let shard = shard.clone();
                    thread::spawn(move || {
                        if world.lock.try_read(&shard) {
                            world.look();
                            world.lock.read_unlock(&shard);
                        }
                    })
                })
                .collect();
            world.write();
            for r in readers {
                r.join().unwrap();
            }
            assert_eq!(world.lock.total_readers(), 0);
        });
    }
}

#[test]
fn loom_context_added_during_a_write() {
    // A context created while a writer announces: its flag copies must
    // start raised if the flag is up, or the writer must see its reader.
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let reader = {
                let world = world.clone();
                thread::spawn(move || {
                    let shard = world.lock.new_shard();
                    if world.lock.try_read(&shard) {
                        world.look();
                        world.lock.read_unlock(&shard);
                    }
                })
            };
            world.write();
            reader.join().unwrap();
            assert_eq!(world.lock.total_readers(), 0);
        });
    }
}

#[test]
fn loom_owner_thread_task_backs_off_while_another_is_inside() {
    // Two tasks of one I/O thread: the first is inside, the second arrives
    // after the writer and backs off. Its enter/leave pair on the owner's
    // counters must never cancel the first task's count in the writer's sum.
    for mode in MODES {
        model(move || {
            let world = World::new(mode);
            let shard = world.lock.new_shard();
            let io_thread = {
                let world = world.clone();
                thread::spawn(move || {
                    if world.lock.try_read(&shard) {
                        if world.lock.try_read(&shard) {
                            world.lock.read_unlock(&shard);
                        }
                        world.look();
                        world.lock.read_unlock(&shard);
                    }
                })
            };
            world.write();
            io_thread.join().unwrap();
            assert_eq!(world.lock.total_readers(), 0);
        });
    }
}
