//! Deterministic tests of the graph lock protocol, in both fence modes.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::sync::graph_lock::GraphLock;
use crate::sync::membarrier::{asymmetric_available, FenceMode};

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Arc<CountingWaker>, Waker) {
    let count = Arc::new(CountingWaker::default());
    (count.clone(), Waker::from(count))
}

/// Both modes; the asymmetric one only where the kernel grants membarrier
/// (elsewhere the lock must have fallen back, which is checked).
fn locks() -> Vec<GraphLock> {
    let asym = GraphLock::with_mode(FenceMode::Asymmetric);
    if asymmetric_available() {
        assert_eq!(asym.mode(), FenceMode::Asymmetric);
    } else {
        assert_eq!(asym.mode(), FenceMode::Symmetric, "must fall back");
    }
    let sym = GraphLock::with_mode(FenceMode::Symmetric);
    assert_eq!(sym.mode(), FenceMode::Symmetric);
    vec![asym, sym]
}

#[test]
fn uncontended_read_uses_the_owner_word_only_in_asymmetric_mode() {
    for lock in locks() {
        let shard = lock.new_shard();
        assert!(lock.try_read(&shard));
        assert_eq!(lock.total_readers(), 1);
        let (owned, foreign) = shard.words();
        match lock.mode() {
            FenceMode::Asymmetric => assert_eq!((owned, foreign), (1, 0)),
            FenceMode::Symmetric => assert_eq!((owned, foreign), (0, 1)),
        }
        lock.read_unlock(&shard);
        assert_eq!(lock.total_readers(), 0);
        assert_eq!(shard.words(), (0, 0));
    }
}

#[test]
fn a_second_thread_uses_the_foreign_word() {
    for lock in locks() {
        let shard = lock.new_shard();
        assert!(lock.try_read(&shard)); // this thread claims in asymmetric mode
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(lock.try_read(&shard));
                lock.read_unlock(&shard);
                assert!(lock.try_read(&shard));
            });
        });
        assert_eq!(lock.total_readers(), 2);
        let (owned, foreign) = shard.words();
        match lock.mode() {
            FenceMode::Asymmetric => assert_eq!((owned, foreign), (1, 1)),
            FenceMode::Symmetric => assert_eq!((owned, foreign), (0, 2)),
        }
        lock.read_unlock(&shard);
        lock.read_unlock(&shard);
        assert_eq!(lock.total_readers(), 0);
    }
}

#[test]
fn guard_released_on_another_thread_keeps_the_sum_right() {
    for lock in locks() {
        let shard = lock.new_shard();
        // Taken here (the owner), released there.
        assert!(lock.try_read(&shard));
        std::thread::scope(|s| {
            s.spawn(|| lock.read_unlock(&shard));
        });
        assert_eq!(lock.total_readers(), 0);
        // Taken there, released here.
        std::thread::scope(|s| {
            s.spawn(|| assert!(lock.try_read(&shard)));
        });
        assert_eq!(lock.total_readers(), 1);
        lock.write_announce();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(lock.poll_readers_gone(&mut cx).is_pending());
        lock.read_unlock(&shard);
        assert!(
            woken.0.load(Ordering::SeqCst) > 0,
            "last reader out must wake"
        );
        assert!(lock.poll_readers_gone(&mut cx).is_ready());
        lock.write_leave();
        assert_eq!(lock.total_readers(), 0);
    }
}

#[test]
fn writer_flag_turns_readers_away_without_counting_them() {
    for lock in locks() {
        let shard = lock.new_shard();
        lock.write_announce();
        assert!(lock.writer_active());
        assert!(!lock.try_read(&shard));
        assert_eq!(lock.total_readers(), 0);
        let (_, waker) = counting_waker();
        assert!(lock
            .poll_readers_gone(&mut Context::from_waker(&waker))
            .is_ready());
        lock.write_leave();
        assert!(!lock.writer_active());
        assert!(lock.try_read(&shard));
        lock.read_unlock(&shard);
    }
}

#[test]
fn writer_waits_for_every_context_and_the_last_reader_out_wakes_it() {
    for lock in locks() {
        let shards: Vec<_> = (0..3).map(|_| lock.new_shard()).collect();
        for s in &shards {
            assert!(lock.try_read(s));
        }
        lock.write_announce();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(lock.poll_readers_gone(&mut cx).is_pending());
        for s in &shards[..2] {
            lock.read_unlock(s);
            assert!(lock.poll_readers_gone(&mut cx).is_pending());
        }
        let before = woken.0.load(Ordering::SeqCst);
        lock.read_unlock(&shards[2]);
        assert!(woken.0.load(Ordering::SeqCst) > before, "no wake-up");
        assert!(lock.poll_readers_gone(&mut cx).is_ready());
        lock.write_leave();
    }
}

#[test]
fn queued_readers_all_resume_when_the_writer_leaves() {
    for lock in locks() {
        let shards: Vec<_> = (0..4).map(|_| lock.new_shard()).collect();
        lock.write_announce();
        let wakers: Vec<_> = shards.iter().map(|_| counting_waker()).collect();
        for (s, (_, w)) in shards.iter().zip(&wakers) {
            assert!(lock.poll_read(s, &mut Context::from_waker(w)).is_pending());
        }
        // Polling again does not queue twice.
        assert!(lock
            .poll_read(&shards[0], &mut Context::from_waker(&wakers[0].1))
            .is_pending());
        assert!(wakers.iter().all(|(c, _)| c.0.load(Ordering::SeqCst) == 0));
        lock.write_leave();
        for (s, (c, w)) in shards.iter().zip(&wakers) {
            assert_eq!(c.0.load(Ordering::SeqCst), 1, "woken exactly once");
            assert!(lock.poll_read(s, &mut Context::from_waker(w)).is_ready());
        }
        assert_eq!(lock.total_readers(), 4);
        for s in &shards {
            lock.read_unlock(s);
        }
    }
}

/// A queued reader whose waker panics: the writer leaves all the same,
/// and the readers queued after it are woken (`sync::wake`).
#[test]
fn a_panicking_reader_waker_costs_no_other_reader_its_wake_up() {
    for lock in locks() {
        let shards: Vec<_> = (0..3).map(|_| lock.new_shard()).collect();
        lock.write_announce();
        let panicking = crate::sync::wake::panicking_waker();
        assert!(lock
            .poll_read(&shards[0], &mut Context::from_waker(&panicking))
            .is_pending());
        let wakers: Vec<_> = shards[1..].iter().map(|_| counting_waker()).collect();
        for (s, (_, w)) in shards[1..].iter().zip(&wakers) {
            assert!(lock.poll_read(s, &mut Context::from_waker(w)).is_pending());
        }
        lock.write_leave();
        assert!(!lock.writer_active());
        for (woken, _) in &wakers {
            assert_eq!(woken.0.load(Ordering::SeqCst), 1, "a wake-up was lost");
        }
        for s in &shards {
            assert!(lock
                .poll_read(s, &mut Context::from_waker(Waker::noop()))
                .is_ready());
            lock.read_unlock(s);
        }
    }
}

/// The writer's waker panics when the last reader leaves: the reader's
/// guard is released all the same, and the writer gets in.
#[test]
fn a_panicking_writer_waker_does_not_unwind_into_the_last_reader() {
    for lock in locks() {
        let shard = lock.new_shard();
        assert!(lock.try_read(&shard));
        lock.write_announce();
        let panicking = crate::sync::wake::panicking_waker();
        assert!(lock
            .poll_readers_gone(&mut Context::from_waker(&panicking))
            .is_pending());
        lock.read_unlock(&shard);
        assert_eq!(lock.total_readers(), 0);
        assert!(lock
            .poll_readers_gone(&mut Context::from_waker(Waker::noop()))
            .is_ready());
        lock.write_leave();
    }
}

#[test]
fn nested_writers_keep_the_flag_until_the_outermost_leaves() {
    for lock in locks() {
        let shard = lock.new_shard();
        lock.write_announce();
        lock.write_announce();
        lock.write_leave();
        assert!(lock.writer_active());
        assert!(!lock.try_read(&shard));
        lock.write_leave();
        assert!(lock.try_read(&shard));
        lock.read_unlock(&shard);
    }
}

#[test]
fn removed_context_keeps_counting_its_readers() {
    for lock in locks() {
        let context = lock.new_shard();
        let task = context.clone(); // an IoTask's handle on the shard
        assert!(lock.try_read(&task));
        drop(context); // the context goes away while its reader is inside
        assert_eq!(lock.shard_count(), 1);
        lock.write_announce();
        let (woken, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(lock.poll_readers_gone(&mut cx).is_pending());
        lock.read_unlock(&task);
        assert!(woken.0.load(Ordering::SeqCst) > 0);
        drop(task);
        assert!(lock.poll_readers_gone(&mut cx).is_ready());
        assert_eq!(lock.shard_count(), 0);
        lock.write_leave();
    }
}

#[test]
fn counts_split_across_threads_sum_to_the_readers_inside() {
    for lock in locks() {
        let shard = lock.new_shard();
        assert!(lock.try_read(&shard));
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(lock.try_read(&shard));
                assert_eq!(shard.readers(), 2);
            });
        });
        lock.read_unlock(&shard);
        lock.read_unlock(&shard);
        // Owned word went 1 -> 0 -> -1 in asymmetric mode, foreign +1.
        assert_eq!(shard.readers(), 0);
        assert_eq!(lock.total_readers(), 0);
    }
}

/// Readers on two threads and the writer on a third, for real: the writer
/// changes two words that readers must see equal and never half-updated.
#[test]
fn concurrent_readers_never_overlap_the_writer() {
    for lock in locks() {
        let lock = &lock;
        let shards: Vec<_> = (0..2).map(|_| lock.new_shard()).collect();
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let writing = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let entered = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for shard in &shards {
                let (a, b, writing, stop, entered) = (&a, &b, &writing, &stop, &entered);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if lock.try_read(shard) {
                            assert!(!writing.load(Ordering::Relaxed), "reader inside a write");
                            let x = a.load(Ordering::Relaxed);
                            std::hint::spin_loop();
                            let y = b.load(Ordering::Relaxed);
                            assert_eq!(x, y, "reader saw a half-done write");
                            entered.fetch_add(1, Ordering::Relaxed);
                            lock.read_unlock(shard);
                        } else {
                            futures::executor::block_on(poll_fn(|cx| lock.poll_read(shard, cx)));
                            assert!(!writing.load(Ordering::Relaxed), "reader inside a write");
                            // Counted too: on a loaded machine every try may
                            // meet the writer, and the test must not depend
                            // on which path the readers took.
                            entered.fetch_add(1, Ordering::Relaxed);
                            lock.read_unlock(shard);
                        }
                    }
                });
            }
            for i in 1..=2_000u64 {
                lock.write_announce();
                futures::executor::block_on(poll_fn(|cx| lock.poll_readers_gone(cx)));
                writing.store(true, Ordering::Relaxed);
                a.store(i, Ordering::Relaxed);
                std::hint::spin_loop();
                b.store(i, Ordering::Relaxed);
                writing.store(false, Ordering::Relaxed);
                lock.write_leave();
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            // On a loaded machine the readers may not have run at all yet:
            // give them (bounded) time to get in once before stopping.
            let start = std::time::Instant::now();
            while entered.load(Ordering::Relaxed) == 0
                && start.elapsed() < std::time::Duration::from_secs(20)
            {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(entered.load(Ordering::Relaxed) > 0);
        assert_eq!(lock.total_readers(), 0);
    }
}

#[test]
fn poll_read_is_ready_at_once_without_a_writer() {
    for lock in locks() {
        let shard = lock.new_shard();
        let (_, waker) = counting_waker();
        assert_eq!(
            lock.poll_read(&shard, &mut Context::from_waker(&waker)),
            Poll::Ready(())
        );
        lock.read_unlock(&shard);
    }
}

/// The mode choice and the membarrier probe.
mod fence_mode {
    use crate::sync::membarrier::{asymmetric_available, heavy_barrier, FenceMode};

    #[test]
    fn setting_forces_symmetric_without_probing() {
        for v in ["symmetric", "fallback", " Symmetric ", "FALLBACK"] {
            let mode = FenceMode::choose(Some(v), || panic!("must not probe when forced"));
            assert_eq!(mode, FenceMode::Symmetric, "setting {v:?}");
        }
    }

    #[test]
    fn other_settings_follow_availability() {
        for v in [
            None,
            Some(""),
            Some("auto"),
            Some("asymmetric"),
            Some("bogus"),
        ] {
            assert_eq!(
                FenceMode::choose(v, || true),
                FenceMode::Asymmetric,
                "{v:?}"
            );
            assert_eq!(
                FenceMode::choose(v, || false),
                FenceMode::Symmetric,
                "{v:?}"
            );
        }
    }

    #[test]
    fn probe_is_stable_and_barrier_works_when_available() {
        let first = asymmetric_available();
        assert_eq!(first, asymmetric_available());
        if first {
            // Must not panic once registered.
            heavy_barrier();
            heavy_barrier();
        }
        #[cfg(not(target_os = "linux"))]
        assert!(!first);
    }
}
