//! The `throttle` filter: IOPS and bytes-per-second limits with bursts,
//! shared by the nodes of a [`ThrottleGroup`] (QEMU's throttle groups).
//!
//! See [`ThrottleDriver`] for the algorithm and how drains end throttling.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::driver::{forward, require_child, Filter};
use crate::graph::driver::IoFuture;
use crate::graph::proof::{CallbackRef, NodeRequest, RequestRef};
use crate::types::{Error, Result};
use crate::types::{IoBuf, IoVec, IoVecMut};

/// The largest rate accepted (QEMU's bound too): 10^15 units per second.
const MAX_RATE: u64 = 1_000_000_000_000_000;
/// The longest burst accepted, in seconds.
const MAX_BURST_SECONDS: u32 = 86_400;

/// One limit: an average rate, and optionally a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimit {
    /// Units (bytes or I/Os) per second, on average. Must be positive.
    pub avg: u64,
    /// The rate allowed during a burst (at least `avg`), if bursts are on.
    pub max: Option<u64>,
    /// How long a full burst at `max` may last, in seconds (at least 1; more
    /// than 1 needs `max`).
    pub burst_seconds: u32,
}

impl ThrottleLimit {
    /// `avg` units per second, no burst beyond the default tenth of a
    /// second's worth.
    pub const fn new(avg: u64) -> Self {
        ThrottleLimit {
            avg,
            max: None,
            burst_seconds: 1,
        }
    }

    /// Allows bursts at `max` units per second for `seconds` seconds.
    pub const fn with_burst(mut self, max: u64, seconds: u32) -> Self {
        self.max = Some(max);
        self.burst_seconds = seconds;
        self
    }
}

/// What a [`ThrottleGroup`] limits. Unset limits do not apply.
///
/// ```
/// use blockgraph::drivers::{ThrottleConfig, ThrottleLimit};
///
/// let cfg = ThrottleConfig::from_options(&[("iops-total", "200"), ("bps-write", "1M")])?;
/// assert_eq!(cfg.iops_total, Some(ThrottleLimit::new(200)));
/// assert_eq!(cfg.to_string(), "bps-write=1048576,iops-total=200");
/// assert!(ThrottleConfig::from_options(&[("iops-total", "0")]).is_err());
/// # Ok::<(), blockgraph::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleConfig {
    /// Bytes per second, reads and writes together.
    pub bps_total: Option<ThrottleLimit>,
    /// Bytes per second read.
    pub bps_read: Option<ThrottleLimit>,
    /// Bytes per second written (writes, write-zeroes, discards).
    pub bps_write: Option<ThrottleLimit>,
    /// Requests per second, reads and writes together.
    pub iops_total: Option<ThrottleLimit>,
    /// Read requests per second.
    pub iops_read: Option<ThrottleLimit>,
    /// Write requests per second.
    pub iops_write: Option<ThrottleLimit>,
    /// Requests larger than this count as `size / iops_size` I/Os.
    pub iops_size: Option<u64>,
}

/// The six limits, in bucket order.
const KINDS: [&str; 6] = [
    "bps-total",
    "bps-read",
    "bps-write",
    "iops-total",
    "iops-read",
    "iops-write",
];

impl ThrottleConfig {
    fn limits(&self) -> [Option<ThrottleLimit>; 6] {
        [
            self.bps_total,
            self.bps_read,
            self.bps_write,
            self.iops_total,
            self.iops_read,
            self.iops_write,
        ]
    }

    fn limit_mut(&mut self, kind: usize) -> &mut Option<ThrottleLimit> {
        match kind {
            0 => &mut self.bps_total,
            1 => &mut self.bps_read,
            2 => &mut self.bps_write,
            3 => &mut self.iops_total,
            4 => &mut self.iops_read,
            _ => &mut self.iops_write,
        }
    }

    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.limits().iter().all(Option::is_none)
    }

    /// Checks the rules QEMU applies, with a message naming the option.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a zero or huge rate, a total limit
    /// set together with a read or write limit of the same kind, a burst
    /// rate below the average, a zero burst length, a burst longer than a
    /// second without a burst rate, or a zero `iops-size`.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("throttle: {m}")));
        let limits = self.limits();
        for (kind, limit) in KINDS.iter().zip(limits) {
            let Some(l) = limit else { continue };
            if l.avg == 0 {
                return bad(format!(
                    "{kind} must be positive (leave it unset for no limit)"
                ));
            }
            if l.avg > MAX_RATE || l.max.is_some_and(|m| m > MAX_RATE) {
                return bad(format!("{kind} must be at most {MAX_RATE}"));
            }
            if let Some(max) = l.max {
                if max < l.avg {
                    return bad(format!(
                        "{kind}-max ({max}) must be at least {kind} ({})",
                        l.avg
                    ));
                }
            }
            if l.burst_seconds == 0 || l.burst_seconds > MAX_BURST_SECONDS {
                return bad(format!(
                    "{kind}-max-length must be 1 to {MAX_BURST_SECONDS} seconds"
                ));
            }
            if l.burst_seconds > 1 && l.max.is_none() {
                return bad(format!("{kind}-max-length needs {kind}-max"));
            }
        }
        for (total, read, write) in [(0, 1, 2), (3, 4, 5)] {
            if limits[total].is_some() && (limits[read].is_some() || limits[write].is_some()) {
                return bad(format!(
                    "{} cannot be combined with {} or {}",
                    KINDS[total], KINDS[read], KINDS[write]
                ));
            }
        }
        if self.iops_size == Some(0) {
            return bad("iops-size must be positive".into());
        }
        Ok(())
    }

    /// Parses QEMU-style options: `iops-total`, `iops-read`, `iops-write`,
    /// `bps-total`, `bps-read`, `bps-write`, each with `-max` (burst rate)
    /// and `-max-length` (seconds), and `iops-size`. Byte rates accept
    /// `k`/`M`/`G`/`T` suffixes. The result is validated.
    pub fn from_options(options: &[(&str, &str)]) -> Result<Self> {
        let mut cfg = ThrottleConfig::default();
        let mut maxes: [Option<u64>; 6] = [None; 6];
        let mut lengths: [Option<u32>; 6] = [None; 6];
        for (key, value) in options {
            if *key == "iops-size" {
                cfg.iops_size = Some(super::raw::parse_size("throttle", key, value)?);
                continue;
            }
            let (base, part) = if let Some(b) = key.strip_suffix("-max-length") {
                (b, 2)
            } else if let Some(b) = key.strip_suffix("-max") {
                (b, 1)
            } else {
                (*key, 0)
            };
            let Some(kind) = KINDS.iter().position(|k| *k == base) else {
                return Err(Error::InvalidArgument(format!(
                    "throttle: unknown option '{key}' (known: {}, each also with -max and \
                     -max-length, and iops-size)",
                    KINDS.join(", ")
                )));
            };
            let n = super::raw::parse_size("throttle", key, value)?;
            match part {
                0 => *cfg.limit_mut(kind) = Some(ThrottleLimit::new(n)),
                1 => maxes[kind] = Some(n),
                _ => {
                    lengths[kind] = Some(u32::try_from(n).map_err(|_| {
                        Error::InvalidArgument(format!("throttle: {key} is too long"))
                    })?)
                }
            }
        }
        for kind in 0..6 {
            if maxes[kind].is_none() && lengths[kind].is_none() {
                continue;
            }
            let Some(limit) = cfg.limit_mut(kind) else {
                return Err(Error::InvalidArgument(format!(
                    "throttle: {0}-max and {0}-max-length need {0}",
                    KINDS[kind]
                )));
            };
            limit.max = maxes[kind];
            limit.burst_seconds = lengths[kind].unwrap_or(1);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

impl std::fmt::Display for ThrottleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (kind, limit) in KINDS.iter().zip(self.limits()) {
            let Some(l) = limit else { continue };
            parts.push(format!("{kind}={}", l.avg));
            if let Some(max) = l.max {
                parts.push(format!("{kind}-max={max}"));
                parts.push(format!("{kind}-max-length={}", l.burst_seconds));
            }
        }
        if let Some(size) = self.iops_size {
            parts.push(format!("iops-size={size}"));
        }
        if parts.is_empty() {
            f.write_str("unlimited")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    burst_level: f64,
    last: Instant,
}

#[derive(Debug)]
struct GroupState {
    config: ThrottleConfig,
    buckets: [Bucket; 6],
}

/// Limits shared by every throttle node that uses the group (QEMU's
/// `throttle-group` object): the nodes' requests together stay within the
/// configured rates. Create one with [`ThrottleGroup::new`] and hand the
/// `Arc` to each [`ThrottleDriver`]; it can be changed at run time with
/// [`ThrottleGroup::set_config`].
#[derive(Debug)]
pub struct ThrottleGroup {
    name: String,
    unlimited: AtomicBool,
    state: Mutex<GroupState>,
}

impl ThrottleGroup {
    /// A group named `name` (for messages) with `config`.
    ///
    /// # Errors
    ///
    /// As [`ThrottleConfig::validate`].
    pub fn new(name: &str, config: ThrottleConfig) -> Result<Arc<ThrottleGroup>> {
        config.validate()?;
        let now = Instant::now();
        Ok(Arc::new(ThrottleGroup {
            name: name.to_owned(),
            unlimited: AtomicBool::new(config.is_unlimited()),
            state: Mutex::new(GroupState {
                config,
                buckets: [Bucket {
                    level: 0.0,
                    burst_level: 0.0,
                    last: now,
                }; 6],
            }),
        }))
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current limits.
    pub fn config(&self) -> ThrottleConfig {
        self.lock().config
    }

    /// Replaces the limits (the buckets start empty). Requests already
    /// sleeping keep their wake-up time.
    ///
    /// # Errors
    ///
    /// As [`ThrottleConfig::validate`]; the old limits then stay.
    pub fn set_config(&self, config: ThrottleConfig) -> Result<()> {
        config.validate()?;
        let mut st = self.lock();
        st.config = config;
        let now = Instant::now();
        for b in &mut st.buckets {
            *b = Bucket {
                level: 0.0,
                burst_level: 0.0,
                last: now,
            };
        }
        self.unlimited
            .store(config.is_unlimited(), Ordering::Release);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Books a request of `bytes` and returns how long it must wait.
    #[inline]
    fn book(&self, write: bool, bytes: u64) -> Duration {
        if self.unlimited.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        self.book_limited(write, bytes)
    }

    /// [`book`](Self::book) for a group with limits (out of line: the
    /// unlimited case is on every request's path).
    #[inline(never)]
    fn book_limited(&self, write: bool, bytes: u64) -> Duration {
        let now = Instant::now();
        let mut st = self.lock();
        let config = st.config;
        let limits = config.limits();
        let ios = match config.iops_size {
            Some(size) if bytes > size => bytes as f64 / size as f64,
            _ => 1.0,
        };
        let dir = if write { 2 } else { 1 };
        let mut wait: f64 = 0.0;
        for (kind, units) in [
            (0, bytes as f64),
            (dir, bytes as f64),
            (3, ios),
            (dir + 3, ios),
        ] {
            let Some(limit) = limits[kind] else { continue };
            let b = &mut st.buckets[kind];
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.last = b.last.max(now);
            let avg = limit.avg as f64;
            b.level = (b.level - avg * dt).max(0.0);
            let capacity = match limit.max {
                Some(max) => max as f64 * f64::from(limit.burst_seconds),
                None => avg / 10.0,
            };
            if b.level >= capacity {
                wait = wait.max((b.level - capacity) / avg);
            }
            b.level += units;
            if let Some(max) = limit.max {
                let max = max as f64;
                b.burst_level = (b.burst_level - max * dt).max(0.0);
                let burst_capacity = max / 10.0;
                if b.burst_level >= burst_capacity {
                    wait = wait.max((b.burst_level - burst_capacity) / max);
                }
                b.burst_level += units;
            }
        }
        Duration::from_secs_f64(wait.min(1e9))
    }
}

/// A filter that holds requests back to its [`ThrottleGroup`]'s limits and
/// passes them to its [`ChildRole::Filtered`](crate::ChildRole::Filtered) child.
///
/// # The algorithm
///
/// Each configured limit is a leaky bucket: its level drains at the
/// average rate, and a request may start while the level is below the
/// bucket's capacity (the burst: `max × burst_seconds` units with a burst
/// configured, a tenth of a second's worth otherwise). A request adds its
/// cost (bytes, or I/Os) to every bucket that applies to it (total plus
/// read or write, bytes and I/Os) *when it arrives*, and sleeps until the
/// fullest of them has drained below capacity. Booking at arrival makes the
/// group a virtual clock: requests start in arrival order, and a timer that
/// fires late (tokio's timer has millisecond granularity) delays one request
/// without lowering the rate, because the next request's wait is computed
/// from the bucket levels, not from when the previous one woke. A burst rate
/// (`max`) is a second bucket per limit, draining at `max` with a tenth of a
/// second's capacity.
///
/// The sleep runs on the calling I/O thread's tokio timer; it needs a tokio
/// runtime with timers enabled (every [`IoThread`](crate::IoThread) has one).
///
/// # Drain
///
/// A throttled request is in flight at its backend, so a drain waits for
/// it. Like QEMU, which turns throttling off for a drained node, the filter
/// stops throttling when its first drain section begins: the
/// `drained_begin` callback wakes every request sleeping in this node, and
/// requests arriving before the backends have quiesced go straight through,
/// so the drain completes as soon as the child has served them. Throttling
/// resumes when the last section ends. Requests that were sleeping had
/// booked their cost, so the group's later requests pay for them; requests
/// that arrive during the drain are not counted at all (as in QEMU).
///
/// Reads count against read limits; writes, write-zeroes and discards
/// against write limits; flushes, lengths and block-status queries are not
/// throttled.
#[derive(Debug)]
pub struct ThrottleDriver {
    group: Arc<ThrottleGroup>,
    /// A drain section covers the node: let everything through.
    bypass: AtomicBool,
    /// Wakes this node's sleeping requests when a drain begins (a wait
    /// list: a waiter's panicking waker must not unwind into the drain).
    wake: crate::sync::WaitList,
    throttled: AtomicU64,
    /// The group's limits before each reopen not yet committed or aborted,
    /// newest last (`reopen_abort` puts them back).
    before_reopen: std::sync::Mutex<Vec<ThrottleConfig>>,
}

impl ThrottleDriver {
    /// A member of `group`.
    pub fn new(group: Arc<ThrottleGroup>) -> Self {
        ThrottleDriver {
            group,
            bypass: AtomicBool::new(false),
            wake: crate::sync::WaitList::default(),
            throttled: AtomicU64::new(0),
            before_reopen: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn before_reopen(&self) -> std::sync::MutexGuard<'_, Vec<ThrottleConfig>> {
        self.before_reopen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A node with a group of its own named `name`.
    pub fn with_config(name: &str, config: ThrottleConfig) -> Result<Self> {
        Ok(Self::new(ThrottleGroup::new(name, config)?))
    }

    /// The node's group.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    /// Requests that had to wait.
    pub fn throttled_requests(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Waits until a request of `bytes` may go.
    async fn admit(&self, write: bool, bytes: u64) -> Result<()> {
        match self.book_now(write, bytes) {
            None => Ok(()),
            Some(wait) => self.wait_booked(wait).await,
        }
    }

    /// Books a request; `None` if it may go at once (the common case with
    /// generous limits, and always without limits or while drained), so the
    /// caller can hand its child's future straight back without wrapping it.
    #[inline]
    fn book_now(&self, write: bool, bytes: u64) -> Option<Duration> {
        if self.bypass.load(Ordering::Acquire) {
            return None;
        }
        let wait = self.group.book(write, bytes);
        (!wait.is_zero()).then_some(wait)
    }

    /// Books `bytes` of reads (or writes), then hands the request to the
    /// child with `call`: the child's own future when it is admitted at
    /// once (no allocation of ours), else after the wait. What `read`,
    /// `write` and their vectored and owned-buffer forms share.
    #[inline]
    fn pass_on<'a, T: Send + 'a>(
        &'a self,
        node: RequestRef<'a>,
        write: bool,
        bytes: u64,
        call: impl FnOnce(RequestRef<'a>) -> NodeRequest<'a, T> + Send + 'a,
    ) -> IoFuture<'a, T> {
        let child = match require_child(node, Self::CHILD) {
            Ok(child) => child,
            Err(e) => return forward::failed(e),
        };
        match self.book_now(write, bytes) {
            None => call(child).into(),
            Some(wait) => self.pass_on_after(wait, child, call),
        }
    }

    /// The rest of [`pass_on`](Self::pass_on) for a request that must
    /// wait: out of line, so that the admitted-at-once path, the one every
    /// request of an unlimited group takes, stays a short call.
    #[cold]
    #[inline(never)]
    fn pass_on_after<'a, T: Send + 'a>(
        &'a self,
        wait: Duration,
        child: RequestRef<'a>,
        call: impl FnOnce(RequestRef<'a>) -> NodeRequest<'a, T> + Send + 'a,
    ) -> IoFuture<'a, T> {
        Box::pin(async move {
            self.wait_booked(wait).await?;
            call(child).await
        })
    }

    /// Sleeps for a booked `wait`, cut short when a drain begins.
    async fn wait_booked(&self, wait: Duration) -> Result<()> {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        if self.bypass.load(Ordering::Acquire) {
            return Ok(());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Unsupported {
                driver: "throttle",
                operation: "waiting outside a tokio runtime",
            });
        }
        let mut sleep = pin!(tokio::time::sleep(wait));
        std::future::poll_fn(|cx| {
            if std::future::Future::poll(sleep.as_mut(), cx).is_ready() {
                return std::task::Poll::Ready(());
            }
            // Until a drain begins.
            self.wake
                .poll_until(cx, || self.bypass.load(Ordering::Acquire).then_some(()))
        })
        .await;
        Ok(())
    }
}

/// On the driver kit: length, alignment, flush, block status and resizes
/// are the child's, unthrottled (they move no data), and the node refuses
/// to join the graph without its child.
impl Filter for ThrottleDriver {
    fn format_name(&self) -> &'static str {
        "throttle"
    }

    fn describe(&self) -> String {
        format!(
            "throttle, group '{}': {}",
            self.group.name,
            self.group.config()
        )
    }

    /// Options as [`ThrottleConfig::from_options`]; they replace the whole
    /// group's limits. A rollback of the mutation puts the old limits back
    /// (`reopen_abort`).
    fn reopen(&self, _node: CallbackRef<'_>, options: &[(&str, &str)]) -> Result<()> {
        let old = self.group.config();
        self.group
            .set_config(ThrottleConfig::from_options(options)?)?;
        self.before_reopen().push(old);
        Ok(())
    }

    fn reopen_commit(&self, _node: CallbackRef<'_>) {
        self.before_reopen().pop();
    }

    fn reopen_abort(&self, _node: CallbackRef<'_>) {
        if let Some(old) = self.before_reopen().pop() {
            // Limits the group had before: valid.
            let _ = self.group.set_config(old);
        }
    }

    fn drained_begin(&self, _node: CallbackRef<'_>) {
        self.bypass.store(true, Ordering::Release);
        self.wake.wake_all();
    }

    fn drained_end(&self, _node: CallbackRef<'_>) {
        self.bypass.store(false, Ordering::Release);
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        let len = buf.len() as u64;
        self.pass_on(node, false, len, move |child| child.read(offset, buf))
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        let len = buf.len() as u64;
        self.pass_on(node, true, len, move |child| child.write(offset, buf))
    }

    /// Throttled as a read of `buf.len()` bytes, then the buffer goes to
    /// the child as it is.
    fn read_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        let len = buf.len() as u64;
        self.pass_on(node, false, len, move |child| child.read_buf(offset, buf))
    }

    /// Throttled as a write of `buf.len()` bytes, then the buffer goes to
    /// the child as it is.
    fn write_buf<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: IoBuf,
    ) -> IoFuture<'a, IoBuf> {
        let len = buf.len() as u64;
        self.pass_on(node, true, len, move |child| child.write_buf(offset, buf))
    }

    /// Throttled as a read of `iov.len()` bytes, then the vector goes to
    /// the child as it is.
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        let len = iov.len() as u64;
        self.pass_on(node, false, len, move |child| child.readv(offset, iov))
    }

    /// Throttled as a write of `iov.len()` bytes, then the vector goes to
    /// the child as it is.
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        let len = iov.len() as u64;
        self.pass_on(node, true, len, move |child| child.writev(offset, iov))
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.admit(true, len).await?;
            child.write_zeroes(offset, len).await
        })
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.admit(true, len).await?;
            child.discard(offset, len).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booking_spaces_requests_at_the_average_rate() {
        let cfg = ThrottleConfig {
            iops_total: Some(ThrottleLimit::new(100)),
            ..Default::default()
        };
        let g = ThrottleGroup::new("g", cfg).unwrap();
        // Capacity 10 I/Os: the first 10 go at once, then 10 ms apart.
        let waits: Vec<Duration> = (0..20).map(|_| g.book(false, 4096)).collect();
        assert!(waits[..10].iter().all(|w| w.is_zero()), "{waits:?}");
        for (i, w) in waits[10..].iter().enumerate() {
            let expect = i as f64 * 0.01;
            assert!(
                (w.as_secs_f64() - expect).abs() < 0.005,
                "request {}: {w:?}",
                i + 10
            );
        }
    }

    #[test]
    fn reads_do_not_pay_for_write_limits() {
        let cfg = ThrottleConfig {
            iops_write: Some(ThrottleLimit::new(10)),
            ..Default::default()
        };
        let g = ThrottleGroup::new("g", cfg).unwrap();
        for _ in 0..100 {
            assert!(g.book(false, 512).is_zero());
        }
        // Capacity is one write: the second goes when the first has
        // drained, the third waits.
        g.book(true, 512);
        g.book(true, 512);
        assert!(g.book(true, 512) > Duration::from_millis(90));
    }

    #[test]
    fn large_requests_count_as_several_ios_with_iops_size() {
        let cfg = ThrottleConfig {
            iops_total: Some(ThrottleLimit::new(10)),
            iops_size: Some(4096),
            ..Default::default()
        };
        let g = ThrottleGroup::new("g", cfg).unwrap();
        assert!(g.book(false, 40960).is_zero(), "the first goes");
        // It counted 10 I/Os: the next waits (10 - 1) / 10 s.
        let w = g.book(false, 512).as_secs_f64();
        assert!((w - 0.9).abs() < 0.01, "{w}");
    }
}
