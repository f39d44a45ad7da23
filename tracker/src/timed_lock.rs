//! The state lock, timed: every hold is measured, so the tracker can show (in `--metrics`, and the load
//! generator prints it) that no request keeps the others waiting: the longest hold since start, and the total.
//! Both in wall time and in the holding thread's CPU time: on a loaded machine the OS may preempt the holder,
//! which lengthens a hold in wall time without any work under the lock (the CPU figure tells the two apart).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// A mutex whose holds are timed.
#[derive(Debug, Default)]
pub(crate) struct TimedMutex<T> {
    inner: Mutex<T>,
    max_ns: AtomicU64,
    max_cpu_ns: AtomicU64,
    total_ns: AtomicU64,
    holds: AtomicU64,
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
        }
    }

    /// Locks (a poisoned lock is taken over: a panic while holding it would be a bug, and the state is still
    /// consistent enough to go on).
    pub(crate) fn lock(&self) -> TimedGuard<'_, T> {
        let guard = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        TimedGuard { guard, since: Instant::now(), cpu_since: thread_cpu_ns(), owner: self }
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
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.owner.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.owner.max_cpu_ns.fetch_max(thread_cpu_ns().saturating_sub(self.cpu_since), Ordering::Relaxed);
        self.owner.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.owner.holds.fetch_add(1, Ordering::Relaxed);
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
    fn holds_are_counted_and_the_longest_kept() {
        let m = TimedMutex::new(1u32);
        *m.lock() += 1;
        {
            let _g = m.lock();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let s = m.stats();
        assert_eq!(*m.lock(), 2);
        assert_eq!(s.holds, 2);
        assert!(s.max_us >= 5_000 && s.total_us >= s.max_us, "{s:?}");
        // Sleeping holds the lock but uses no CPU.
        assert!(s.max_cpu_us < 5_000, "{s:?}");
    }
}
