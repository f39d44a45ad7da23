//! Node-wide pools of a resource (queued cells, circuit slots), shared fairly among the neighbors that use them.
//!
//! Every neighbor link — and the node itself, for the circuits it originates — holds one [`Share`] of each pool.
//! A share may take from the pool freely while the pool is less than half used. Beyond that, only shares that hold
//! less than their fair part of the other half (`cap / 2 / members`) may take more, and never past `cap`. So when the
//! pool is tight the neighbors using the most are refused first (their circuits are denied or broken by the
//! caller), while every other neighbor still gets at least its fair part: one neighbor can no longer exhaust what
//! the node has for everyone (SPEC §8, "Node budget").
//!
//! Bounds: shares that were over their part can only have taken while the pool was under half, and every other
//! share holds at most its part, so the pool never exceeds `cap` (up to the few units of concurrent takes that
//! passed the same check at once). Counters are atomics: taking and giving back cost two atomic adds, cheap
//! enough for every cell on the relay path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A pool of `cap` units of one resource.
#[derive(Debug)]
pub struct Pool {
    what: &'static str,
    cap: usize,
    used: AtomicUsize,
    members: AtomicUsize,
}

/// The historical name of the node's pool of queued cells.
pub type Budget = Pool;

impl Pool {
    /// A pool of `cap` units (named `what` in logs).
    pub fn new(what: &'static str, cap: usize) -> Arc<Self> {
        Arc::new(Pool { what, cap, used: AtomicUsize::new(0), members: AtomicUsize::new(0) })
    }

    /// What the pool holds (for log lines).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Units in use now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Shares alive now (neighbors with a link, plus the node's own).
    pub fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// The most a share may hold once the pool is more than half used.
    pub fn fair_part(&self) -> usize {
        (self.cap / 2) / self.members().max(1)
    }

    /// A new share of this pool (counted as a member until dropped).
    pub fn share(self: &Arc<Self>) -> Arc<Share> {
        self.members.fetch_add(1, Ordering::Relaxed);
        Arc::new(Share { pool: self.clone(), held: AtomicUsize::new(0) })
    }
}

/// One member's holding in a [`Pool`]. Dropping it gives back whatever it still holds.
#[derive(Debug)]
pub struct Share {
    pool: Arc<Pool>,
    held: AtomicUsize,
}

/// Why a take was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverShare {
    /// What this share held.
    pub held: usize,
    /// Its fair part at that moment.
    pub fair_part: usize,
    /// What the whole pool held.
    pub used: usize,
}

impl Share {
    /// Units this share holds.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Takes `n` units if the fairness rule allows it (module docs).
    pub fn try_take(&self, n: usize) -> Result<(), OverShare> {
        let used = self.pool.used();
        let held = self.held();
        let half = self.pool.cap / 2;
        let ok = used + n <= half || {
            let part = self.pool.fair_part();
            held + n <= part && used + n <= self.pool.cap
        };
        if !ok {
            return Err(OverShare { held, fair_part: self.pool.fair_part(), used });
        }
        self.take_unchecked(n);
        Ok(())
    }

    /// Takes `n` units without asking (what is moved from one queue to another of the same share, already
    /// counted, or bounded elsewhere).
    pub fn take_unchecked(&self, n: usize) {
        self.held.fetch_add(n, Ordering::Relaxed);
        self.pool.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives `n` units back.
    pub fn give(&self, n: usize) {
        // Never below zero, even if a caller's bookkeeping were off by one: saturate instead of wrapping.
        let given = match self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| Some(h.saturating_sub(n))) {
            Ok(prev) | Err(prev) => prev.min(n),
        };
        let _ = self.pool.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(given)));
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        let _ = self.pool.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(held)));
        self.pool.members.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one unit of a share (a circuit slot) while alive.
#[derive(Debug)]
pub struct Unit(Arc<Share>);

impl Unit {
    /// Takes one unit of `share` if the fairness rule allows it.
    pub fn take(share: &Arc<Share>) -> Result<Unit, OverShare> {
        share.try_take(1)?;
        Ok(Unit(share.clone()))
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        self.0.give(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anyone_takes_below_half_then_only_shares_under_their_part() {
        let pool = Pool::new("cells", 100);
        let heavy = pool.share();
        let light = pool.share();
        // Below half (50) anyone takes.
        assert!(heavy.try_take(50).is_ok());
        // Tight now: the fair part is 50 / 2 members = 25. `heavy` holds 50, over its part: refused.
        let refused = heavy.try_take(1).unwrap_err();
        assert_eq!(refused, OverShare { held: 50, fair_part: 25, used: 50 });
        // `light` still gets its whole part, one unit at a time, and not one more.
        for _ in 0..25 {
            light.try_take(1).unwrap();
        }
        assert!(light.try_take(1).is_err());
        assert_eq!(pool.used(), 75);
        // Giving back below half reopens the pool for everyone.
        heavy.give(40);
        assert!(heavy.try_take(5).is_ok());
        assert_eq!(heavy.held(), 15);
    }

    #[test]
    fn the_pool_never_exceeds_its_cap_whatever_the_order() {
        let pool = Pool::new("cells", 64);
        let shares: Vec<_> = (0..5).map(|_| pool.share()).collect();
        // Every share tries to take as much as it can, round robin.
        for _ in 0..200 {
            for s in &shares {
                let _ = s.try_take(1);
            }
        }
        assert!(pool.used() <= 64, "used {}", pool.used());
        // Each share got at least its fair part (32 / 5 = 6).
        for s in &shares {
            assert!(s.held() >= 6, "a share was starved: {}", s.held());
        }
    }

    #[test]
    fn a_dropped_share_gives_back_what_it_held_and_leaves_the_members() {
        let pool = Pool::new("slots", 10);
        let a = pool.share();
        let b = pool.share();
        assert_eq!(pool.members(), 2);
        let unit = Unit::take(&a).unwrap();
        a.try_take(3).unwrap();
        drop(unit);
        assert_eq!(a.held(), 3);
        drop(a);
        assert_eq!((pool.used(), pool.members()), (0, 1));
        b.give(7); // more than held: saturates, never wraps
        assert_eq!((pool.used(), b.held()), (0, 0));
    }
}
