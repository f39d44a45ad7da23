//! How many transactions one conversation may hand the pool (SPEC open issue 26b).
//!
//! A serving peer cannot check a transaction's inputs (it keeps no UTXO set), so a requester could fill the pool
//! with made-up spends: about 670 of 100 kB filled [`MAX_POOL_BYTES`], after which every honest transaction was
//! refused until they expired (14 days), and each one cost a commit under the store's write lock. Each
//! conversation now has a rate (a token bucket: [`TX_BURST`] at once, [`TXS_PER_MINUTE`] after) and a share of
//! the pool ([`POOL_SHARE_BYTES`]); a transaction beyond either is refused with `reject` before anything is
//! checked or stored. A wallet broadcasting its own transactions stays far inside both.

use std::time::Duration;

use tokio::time::Instant;

use crate::chain::store::MAX_POOL_BYTES;

/// Transactions one conversation may send at once.
pub const TX_BURST: u32 = 60;
/// Transactions one conversation may send per minute after the burst.
pub const TXS_PER_MINUTE: u32 = 30;
/// Bytes of the pool one conversation's transactions may hold (a sixteenth).
pub const POOL_SHARE_BYTES: usize = MAX_POOL_BYTES / 16;

/// A whole transaction, in the allowance's unit.
const ONE: u64 = 1_000_000;

/// One conversation's allowance.
#[derive(Debug)]
pub struct TxAllowance {
    /// Millionths of a transaction (fine enough that frequent calls lose nothing to rounding).
    micro_tokens: u64,
    refilled: Instant,
    /// Bytes of its transactions the pool took.
    pooled: usize,
}

impl TxAllowance {
    /// A full bucket and an empty share, at `now`.
    pub fn new(now: Instant) -> TxAllowance {
        TxAllowance { micro_tokens: u64::from(TX_BURST) * ONE, refilled: now, pooled: 0 }
    }

    /// Takes one transaction of `bytes` from the allowance at `now`, or says why not.
    pub fn take(&mut self, bytes: usize, now: Instant) -> Result<(), &'static str> {
        let elapsed = now.saturating_duration_since(self.refilled).min(Duration::from_secs(3600));
        // Whole microseconds times the rate per minute over 60 is millionths of a transaction.
        let gained = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX) * u64::from(TXS_PER_MINUTE) / 60;
        self.micro_tokens = (self.micro_tokens + gained).min(u64::from(TX_BURST) * ONE);
        self.refilled = now;
        if self.micro_tokens < ONE {
            return Err("over this circuit's transaction rate");
        }
        if self.pooled.saturating_add(bytes) > POOL_SHARE_BYTES {
            return Err("over this circuit's share of the pool");
        }
        self.micro_tokens -= ONE;
        Ok(())
    }

    /// The pool took a transaction of `bytes` from this conversation.
    pub fn pooled(&mut self, bytes: usize) {
        self.pooled = self.pooled.saturating_add(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_a_share_of_the_pool() {
        let t0 = Instant::now();
        let mut a = TxAllowance::new(t0);
        for i in 0..TX_BURST {
            assert_eq!(a.take(100, t0), Ok(()), "{i}");
        }
        assert_eq!(a.take(100, t0), Err("over this circuit's transaction rate"));
        // 30 a minute: one every 2 s.
        assert!(a.take(100, t0 + Duration::from_millis(1_999)).is_err());
        assert_eq!(a.take(100, t0 + Duration::from_millis(2_000)), Ok(()));
        // An hour idle refills the burst, not more.
        let later = t0 + Duration::from_secs(3_600);
        for _ in 0..TX_BURST {
            a.take(100, later).unwrap();
        }
        assert!(a.take(100, later).is_err());
        // The share: counted on what the pool took.
        let mut b = TxAllowance::new(t0);
        b.pooled(POOL_SHARE_BYTES - 10);
        assert_eq!(b.take(11, t0), Err("over this circuit's share of the pool"));
        assert_eq!(b.take(10, t0), Ok(()));
    }
}
