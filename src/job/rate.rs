//! A job's rate limit: a token bucket in bytes per second on the job's
//! clock (QEMU's `RateLimit` with its 100 ms slices).
//!
//! The bucket holds at most one slice (a tenth of a second) of tokens, so a
//! job that was paused or idle gets no burst larger than that. A copy may
//! take the bucket into debt (a chunk larger than a slice still goes as
//! one request); the next copy waits until the debt is paid. The first
//! copy goes at once; after it, `n` bytes cost `n / rate` seconds, so
//! copying `total` bytes takes at least `(total - first chunk) / rate`.
//! Changing the rate takes effect for the next wait (a waiter re-reads it
//! when woken).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tokens never pile up beyond this much time's worth.
const SLICE: Duration = Duration::from_millis(100);

pub(crate) struct RateLimit {
    state: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// Bytes that may go now (negative: debt).
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(rate: u64) -> Self {
        RateLimit {
            state: Mutex::new(Bucket {
                rate,
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    pub(crate) fn rate(&self) -> u64 {
        self.lock().rate
    }

    pub(crate) fn set_rate(&self, rate: u64) {
        let mut b = self.lock();
        b.refill(Instant::now());
        b.rate = rate;
        let cap = b.cap();
        if b.tokens > cap {
            b.tokens = cap;
        }
    }

    /// Takes `bytes` if the bucket is not in debt (`None`), or says how
    /// long to wait before asking again.
    pub(crate) fn try_take(&self, bytes: u64) -> Option<Duration> {
        let mut b = self.lock();
        if b.rate == 0 {
            b.tokens = 0.0;
            return None;
        }
        let now = Instant::now();
        b.refill(now);
        if b.tokens >= 0.0 {
            b.tokens -= bytes as f64;
            return None;
        }
        let wait = -b.tokens / b.rate as f64;
        Some(Duration::from_secs_f64(wait.min(3600.0)).max(Duration::from_micros(100)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Bucket {
    fn cap(&self) -> f64 {
        self.rate as f64 * SLICE.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if self.rate > 0 {
            self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.cap());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let r = RateLimit::new(0);
        for _ in 0..1000 {
            assert_eq!(r.try_take(1 << 30), None);
        }
    }

    #[test]
    fn the_first_take_goes_and_the_next_waits_for_the_debt() {
        let r = RateLimit::new(1 << 20);
        assert_eq!(r.try_take(1 << 20), None);
        let wait = r.try_take(4096).expect("in debt");
        assert!(wait > Duration::from_millis(900), "{wait:?}");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn raising_the_rate_shortens_the_wait() {
        let r = RateLimit::new(1 << 20);
        assert_eq!(r.try_take(1 << 20), None);
        r.set_rate(1 << 30);
        let wait = r.try_take(4096).expect("still in debt");
        assert!(wait < Duration::from_millis(10), "{wait:?}");
        r.set_rate(0);
        assert_eq!(r.try_take(4096), None);
    }
}
