//! Per-link admission of OPENs by rate: each OPEN costs an RSA decryption, so a link gets `open_rate` per second
//! (with a burst); beyond that OPENs are refused unpeeled, and a link that keeps flooding is closed (SPEC §7.4).

use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { tokens: burst, rate: f64::from(rate.max(1)), burst, last: anomos_net::rt::now() }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        let now = anomos_net::rt::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do with an OPEN that arrived on a link, by rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAdmission {
    /// Within the link's rate: peel it.
    Admit,
    /// Over the rate: deny it without peeling.
    Deny,
    /// Far over the rate (a further burst's worth of OPENs after being refused): close the link.
    Abuse,
}

/// A bucket of `rate`/s with `burst`, and a second bucket of the same size that only refused OPENs drain; when
/// that one is empty too, the neighbor is flooding.
#[derive(Debug)]
pub struct OpenLimiter {
    admit: TokenBucket,
    refused: TokenBucket,
}

impl OpenLimiter {
    /// Both buckets full.
    pub fn new(rate: u32, burst: u32) -> Self {
        OpenLimiter { admit: TokenBucket::new(rate, burst), refused: TokenBucket::new(rate, burst) }
    }

    /// The verdict for one more OPEN.
    pub fn admit(&mut self) -> OpenAdmission {
        if self.admit.take() {
            OpenAdmission::Admit
        } else if self.refused.take() {
            OpenAdmission::Deny
        } else {
            OpenAdmission::Abuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_admission_denies_over_the_rate_and_flags_a_flood() {
        let mut l = OpenLimiter::new(10, 5);
        let seen: Vec<OpenAdmission> = (0..11).map(|_| l.admit()).collect();
        assert_eq!(&seen[..5], &[OpenAdmission::Admit; 5]);
        assert_eq!(&seen[5..10], &[OpenAdmission::Deny; 5]);
        assert_eq!(seen[10], OpenAdmission::Abuse);
        // The bucket refills at the rate.
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!((l.admit(), l.admit()), (OpenAdmission::Admit, OpenAdmission::Admit));
    }
}
