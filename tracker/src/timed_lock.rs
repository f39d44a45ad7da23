//! The state lock, timed: every hold is measured, so the tracker can show (in `--metrics`, and the load
//! generator prints it) that no request keeps the others waiting: the longest hold since start, and the total.
//! Both in wall time and in the holding thread's CPU time: on a loaded machine the OS may preempt the holder,
//! which lengthens a hold in wall time without any work under the lock (the CPU figure tells the two apart).
//! Each hold names its holder, and a hold of [`LONG_HOLD`] or more is logged with that name (at most one such
//! line a second), so a long hold seen in the metrics can be traced to the request that made it. The line is
//! written as the hold ends, before the lock is released (as the handlers' own log lines under it are).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A hold at least this long is logged, with its holder.
pub(crate) const LONG_HOLD: Duration = Duration::from_millis(10);

/// A mutex whose holds are timed.
#[derive(Debug)]
pub(crate) struct TimedMutex<T> {
    inner: Mutex<T>,
    max_ns: AtomicU64,
    max_cpu_ns: AtomicU64,
    total_ns: AtomicU64,
    holds: AtomicU64,
    /// When the last long hold was logged, in milliseconds since `created` plus 1,000 (0: never, so the first one
    /// is logged), to log at most one a second.
    long_logged_ms: AtomicU64,
    created: Instant,
}

/// Hold statistics since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HoldStats {
    /// Longest single hold, in microseconds.
    pub(crate) max_us: u64,
    /// Most CPU time of the holding thread during one hold, in microseconds.
    pub(crate) max_cpu_us: u64,
    /// All holds together, in microseconds.
    pub(crate) total_us: u64,
    /// Number of holds.
    pub(crate) holds: u64,
}

impl<T> TimedMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        TimedMutex {
            inner: Mutex::new(value),
            max_ns: AtomicU64::new(0),
            max_cpu_ns: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            holds: AtomicU64::new(0),
            long_logged_ms: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    /// Locks on behalf of `holder` (a short name of the request or task, logged if the hold is long). A poisoned
    /// lock is taken over: a panic while holding it would be a bug, and the state is still consistent enough to
    /// go on.
    pub(crate) fn lock(&self, holder: &'static str) -> TimedGuard<'_, T> {
        let guard = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        TimedGuard { guard, since: Instant::now(), cpu_since: thread_cpu_ns(), owner: self, holder }
    }

    /// Whether a long hold ending now may be logged (none was in the last second); claims the slot if so.
    fn may_log_long(&self) -> bool {
        let now_ms = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1000);
        let last = self.long_logged_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= 1000
            && self.long_logged_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    pub(crate) fn stats(&self) -> HoldStats {
        HoldStats {
            max_us: self.max_ns.load(Ordering::Relaxed) / 1000,
            max_cpu_us: self.max_cpu_ns.load(Ordering::Relaxed) / 1000,
            total_us: self.total_ns.load(Ordering::Relaxed) / 1000,
            holds: self.holds.load(Ordering::Relaxed),
        }
    }
}

/// A held [`TimedMutex`]; the hold ends (and is counted) when it is dropped.
pub(crate) struct TimedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    since: Instant,
    cpu_since: u64,
    owner: &'a TimedMutex<T>,
    holder: &'static str,
}

impl<T> Deref for TimedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for TimedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for TimedGuard<'_, T> {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        let ns = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        let cpu_ns = thread_cpu_ns().saturating_sub(self.cpu_since);
        self.owner.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.owner.max_cpu_ns.fetch_max(cpu_ns, Ordering::Relaxed);
        self.owner.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.owner.holds.fetch_add(1, Ordering::Relaxed);
        if held >= LONG_HOLD && self.owner.may_log_long() {
            tracing::info!(
                holder = self.holder,
                held_ms = held.as_secs_f64() * 1000.0,
                cpu_ms = cpu_ns as f64 / 1e6,
                "long hold of the state lock"
            );
        }
    }
}

/// The calling thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_holds_are_logged_at_most_once_a_second() {
        let m = TimedMutex::new(());
        assert!(m.may_log_long(), "the first long hold is logged");
        assert!(!m.may_log_long(), "another within the same second is not");
        // A second later the slot is free again.
        m.long_logged_ms.fetch_sub(1000, Ordering::Relaxed);
        assert!(m.may_log_long());
    }

    #[test]
    fn holds_are_counted_and_the_longest_kept() {
        let m = TimedMutex::new(1u32);
        *m.lock("test") += 1;
        {
            let _g = m.lock("test");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let s = m.stats();
        assert_eq!(*m.lock("test"), 2);
        assert_eq!(s.holds, 2);
        assert!(s.max_us >= 5_000 && s.total_us >= s.max_us, "{s:?}");
        // Sleeping holds the lock but uses no CPU.
        assert!(s.max_cpu_us < 5_000, "{s:?}");
    }
}
