//! The fault-injection filter (QEMU's `blkdebug`): fails or delays chosen
//! requests, for tests that prove errors reach the caller, drains still
//! complete and nothing is lost.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::driver::{require_child, Filter};
use crate::graph::driver::IoFuture;
use crate::graph::proof::RequestRef;
use crate::types::{Error, Result};
use crate::types::{IoVec, IoVecMut};

/// Which requests a [`FaultRule`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Write-zeroes requests.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes (they have no range: a rule with a range never matches one).
    Flush,
    /// Every request above.
    Any,
}

impl FaultOp {
    fn covers(self, op: FaultOp) -> bool {
        self == FaultOp::Any || self == op
    }
}

/// What a firing rule does to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fails the request with this `errno` (as [`Error::Io`] holding
    /// `io::Error::from_raw_os_error`); the child never sees it.
    Fail(i32),
    /// Delays the request this long (on the I/O thread's timer), then lets
    /// it through.
    Delay(Duration),
}

impl FaultAction {
    /// Fail with `EIO`.
    pub const EIO: FaultAction = FaultAction::Fail(libc::EIO);
    /// Fail with `ENOSPC` (a full host filesystem).
    pub const ENOSPC: FaultAction = FaultAction::Fail(libc::ENOSPC);
}

/// One rule: which requests it matches and what it does to them.
///
/// ```
/// use blockgraph::drivers::{FaultAction, FaultOp, FaultRule};
/// // The third write that touches the first MiB fails with ENOSPC.
/// let rule = FaultRule::new(FaultOp::Write, FaultAction::ENOSPC)
///     .in_range(0, 1 << 20)
///     .nth(3);
/// # let _ = rule;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    op: FaultOp,
    range: Option<(u64, u64)>,
    skip: u64,
    times: Option<u64>,
    action: FaultAction,
}

impl FaultRule {
    /// Applies `action` to every request of kind `op`.
    pub fn new(op: FaultOp, action: FaultAction) -> Self {
        FaultRule {
            op,
            range: None,
            skip: 0,
            times: None,
            action,
        }
    }

    /// Only requests that overlap `[offset, offset + len)` match.
    pub fn in_range(mut self, offset: u64, len: u64) -> Self {
        self.range = Some((offset, len));
        self
    }

    /// Fires on the `n`th matching request only (counting from 1).
    pub fn nth(mut self, n: u64) -> Self {
        self.skip = n.saturating_sub(1);
        self.times = Some(u64::from(n != 0));
        self
    }

    /// Lets the first `n` matching requests through untouched.
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Fires at most `n` times, then lets everything through.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    /// Fires once.
    pub fn once(self) -> Self {
        self.times(1)
    }

    /// Parses one rule from options: `op` (`read`, `write`, `write-zeroes`,
    /// `discard`, `flush`, `any`; default `any`), then either `error`
    /// (`eio`, `enospc` or an errno number) or `delay-ms`, and optionally
    /// `offset` + `len`, `nth`, `after`, `times`.
    pub fn from_options(options: &[(&str, &str)]) -> Result<Self> {
        let bad = |m: String| Error::InvalidArgument(format!("fault: {m}"));
        let number =
            |key: &str, value: &str| -> Result<u64> { super::raw::parse_size("fault", key, value) };
        let mut op = FaultOp::Any;
        let mut action = None;
        let (mut offset, mut len) = (None, None);
        let (mut nth, mut after, mut times) = (None, None, None);
        for (key, value) in options {
            match *key {
                "op" => {
                    op = match *value {
                        "read" => FaultOp::Read,
                        "write" => FaultOp::Write,
                        "write-zeroes" => FaultOp::WriteZeroes,
                        "discard" => FaultOp::Discard,
                        "flush" => FaultOp::Flush,
                        "any" => FaultOp::Any,
                        _ => {
                            return Err(bad(format!(
                            "unknown op '{value}' (read, write, write-zeroes, discard, flush, any)"
                        )))
                        }
                    }
                }
                "error" => {
                    let errno = match value.to_ascii_lowercase().as_str() {
                        "eio" => libc::EIO,
                        "enospc" => libc::ENOSPC,
                        n => n.parse().map_err(|_| {
                            bad(format!(
                                "error '{value}' is not eio, enospc or an errno number"
                            ))
                        })?,
                    };
                    action = Some(FaultAction::Fail(errno));
                }
                "delay-ms" => {
                    action = Some(FaultAction::Delay(Duration::from_millis(number(
                        key, value,
                    )?)))
                }
                "offset" => offset = Some(number(key, value)?),
                "len" => len = Some(number(key, value)?),
                "nth" => nth = Some(number(key, value)?),
                "after" => after = Some(number(key, value)?),
                "times" => times = Some(number(key, value)?),
                _ => {
                    return Err(bad(format!(
                    "unknown option '{key}' (op, error, delay-ms, offset, len, nth, after, times)"
                )))
                }
            }
        }
        let action = action.ok_or_else(|| bad("a rule needs error= or delay-ms=".into()))?;
        let mut rule = FaultRule::new(op, action);
        match (offset, len) {
            (None, None) => {}
            (Some(o), Some(l)) => rule = rule.in_range(o, l),
            _ => return Err(bad("offset and len go together".into())),
        }
        if let Some(n) = nth {
            if after.is_some() || times.is_some() {
                return Err(bad("nth cannot be combined with after or times".into()));
            }
            rule = rule.nth(n);
        }
        if let Some(n) = after {
            rule = rule.after(n);
        }
        if let Some(n) = times {
            rule = rule.times(n);
        }
        rule.validate()?;
        Ok(rule)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("fault rule: {m}")));
        if let Some((offset, len)) = self.range {
            if len == 0 {
                return bad("the range is empty (len must be positive)");
            }
            if offset.checked_add(len).is_none() {
                return bad("the range's end overflows");
            }
        }
        if self.times == Some(0) {
            return bad("a rule that fires 0 times (nth(0) or times(0)) never fires");
        }
        match self.action {
            FaultAction::Fail(errno) if errno <= 0 => bad("the errno must be positive"),
            _ => Ok(()),
        }
    }

    fn matches(&self, op: FaultOp, offset: u64, len: u64) -> bool {
        self.op.covers(op)
            && self
                .range
                .is_none_or(|(start, n)| len > 0 && offset < start + n && start < offset + len)
    }
}

/// A rule's handle, to remove it or ask how often it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

#[derive(Debug)]
struct RuleState {
    id: RuleId,
    rule: FaultRule,
    seen: u64,
    fired: u64,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<RuleState>>,
    next_id: AtomicU64,
    requests: AtomicU64,
    failed: AtomicU64,
}

/// Changes a [`FaultInjector`]'s rules at run time, from any thread (tests
/// keep one while I/O runs). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FaultController {
    shared: Arc<Shared>,
}

impl FaultController {
    fn rules(&self) -> std::sync::MutexGuard<'_, Vec<RuleState>> {
        self.shared.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `rule` after the existing ones.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty or overflowing range, a rule
    /// that can never fire (`nth(0)`, `times(0)`) or a non-positive errno.
    pub fn add_rule(&self, rule: FaultRule) -> Result<RuleId> {
        rule.validate()?;
        let id = RuleId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        self.rules().push(RuleState {
            id,
            rule,
            seen: 0,
            fired: 0,
        });
        Ok(id)
    }

    /// Removes a rule; `false` if it was not there.
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut rules = self.rules();
        let before = rules.len();
        rules.retain(|r| r.id != id);
        rules.len() != before
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules().clear();
    }

    /// How many times the rule fired (0 for an unknown rule).
    pub fn fired(&self, id: RuleId) -> u64 {
        self.rules()
            .iter()
            .find(|r| r.id == id)
            .map_or(0, |r| r.fired)
    }

    /// Requests the filter has seen (reads, writes, write-zeroes, discards,
    /// flushes).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Requests it failed.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Runs the rules for one request: waits for the delays of the rules
    /// that fire, then fails if a failing rule fired.
    async fn apply(&self, op: FaultOp, offset: u64, len: u64) -> Result<()> {
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        let mut delay = Duration::ZERO;
        let mut errno = None;
        for r in self.rules().iter_mut() {
            if !r.rule.matches(op, offset, len) {
                continue;
            }
            r.seen += 1;
            if r.seen <= r.rule.skip || r.rule.times.is_some_and(|t| r.fired >= t) {
                continue;
            }
            r.fired += 1;
            match r.rule.action {
                FaultAction::Delay(d) => delay += d,
                FaultAction::Fail(e) => {
                    errno.get_or_insert(e);
                }
            }
        }
        if !delay.is_zero() {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(Error::Unsupported {
                    driver: "fault",
                    operation: "delays outside a tokio runtime",
                });
            }
            tokio::time::sleep(delay).await;
        }
        match errno {
            Some(e) => {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                Err(Error::Io(io::Error::from_raw_os_error(e)))
            }
            None => Ok(()),
        }
    }
}

/// A filter that fails or delays requests by [`FaultRule`]s and passes the
/// rest to its [`ChildRole::Filtered`](crate::ChildRole::Filtered) child. Rules are evaluated in the
/// order they were added; every matching rule counts the request, the
/// delays of all rules that fire add up, and the first failing rule that
/// fires decides the error (the request then never reaches the child).
/// Length and block-status queries pass untouched.
///
/// Change the rules at run time through the driver (on the main loop,
/// `node.driver_as::<FaultInjector>()`) or through a
/// [`FaultController`] taken before the node is added.
#[derive(Debug, Default)]
pub struct FaultInjector {
    control: FaultController,
}

impl FaultInjector {
    /// A filter with no rules (it passes everything).
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle to change the rules from anywhere.
    pub fn controller(&self) -> FaultController {
        self.control.clone()
    }

    /// See [`FaultController::add_rule`].
    pub fn add_rule(&self, rule: FaultRule) -> Result<RuleId> {
        self.control.add_rule(rule)
    }

    /// See [`FaultController::remove_rule`].
    pub fn remove_rule(&self, id: RuleId) -> bool {
        self.control.remove_rule(id)
    }

    /// See [`FaultController::fired`].
    pub fn fired(&self, id: RuleId) -> u64 {
        self.control.fired(id)
    }
}

/// On the driver kit: length, alignment, block status and resizes are the
/// child's, untouched by the rules, and the node refuses to join the graph
/// without its child.
impl Filter for FaultInjector {
    fn format_name(&self) -> &'static str {
        "fault"
    }

    fn describe(&self) -> String {
        format!("fault injection, {} rule(s)", self.control.rules().len())
    }

    fn read<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        buf: &'a mut [u8],
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control
                .apply(FaultOp::Read, offset, buf.len() as u64)
                .await?;
            child.read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, node: RequestRef<'a>, offset: u64, buf: &'a [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control
                .apply(FaultOp::Write, offset, buf.len() as u64)
                .await?;
            child.write(offset, buf).await
        })
    }

    /// The read rules apply to it as to a read of `iov.len()` bytes.
    fn readv<'a>(
        &'a self,
        node: RequestRef<'a>,
        offset: u64,
        iov: IoVecMut<'a>,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control
                .apply(FaultOp::Read, offset, iov.len() as u64)
                .await?;
            child.readv(offset, iov).await
        })
    }

    /// The write rules apply to it as to a write of `iov.len()` bytes.
    fn writev<'a>(&'a self, node: RequestRef<'a>, offset: u64, iov: IoVec<'a>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control
                .apply(FaultOp::Write, offset, iov.len() as u64)
                .await?;
            child.writev(offset, iov).await
        })
    }

    fn write_zeroes<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control
                .apply(FaultOp::WriteZeroes, offset, len)
                .await?;
            child.write_zeroes(offset, len).await
        })
    }

    fn discard<'a>(&'a self, node: RequestRef<'a>, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control.apply(FaultOp::Discard, offset, len).await?;
            child.discard(offset, len).await
        })
    }

    fn flush<'a>(&'a self, node: RequestRef<'a>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let child = require_child(node, Self::CHILD)?;
            self.control.apply(FaultOp::Flush, 0, 0).await?;
            child.flush().await
        })
    }
}
