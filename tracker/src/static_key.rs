//! The tracker's static X25519 key for version-2 channels (SPEC open issue 27; `anomos_proto::tracker`'s
//! `channel_v2`): certified by the tracker's RSA identity for [`CERT_LIFETIME`] and replaced, when asked for, once
//! it has less than [`RENEW_BEFORE`] left or the wall clock is outside its dates (one RSA signature each time). Kept
//! in memory only: a restarted tracker, or each replica, has its own, and the certificate travels in every
//! ServerHello, so nothing needs to overlap.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anomos_net::Clock;
use anomos_proto::identity::Identity;
use anomos_proto::tracker::StaticKey;
use rand::rngs::OsRng;
use tracing::{info, warn};

/// How long a certificate is valid after its making (peers refuse one valid for more than 7 days in all).
pub const CERT_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// A key with less than this left is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);

/// The current static key, shared by every connection.
pub struct StaticKeys {
    current: Mutex<Option<Arc<StaticKey>>>,
    identity: Arc<Identity>,
    clock: Clock,
}

impl StaticKeys {
    /// The keys of `identity`, dated on `clock` (the first is made now).
    pub fn new(identity: Arc<Identity>, clock: Clock) -> StaticKeys {
        let keys = StaticKeys { current: Mutex::new(None), identity, clock };
        let _ = keys.get();
        keys
    }

    /// The key to answer a version-2 ClientHello with, renewed first if it is near its end or the clock left its
    /// dates; `None` if none valid could be made (then the tracker offers version 1 only).
    pub fn get(&self) -> Option<Arc<StaticKey>> {
        let now = self.clock.unix_now();
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = cur.as_ref().is_some_and(|k| {
            let c = k.cert();
            c.not_before <= now && now.saturating_add(RENEW_BEFORE.as_secs()) < c.not_after
        });
        if !fresh {
            match StaticKey::generate(&mut OsRng, &self.identity, now, CERT_LIFETIME.as_secs()) {
                Ok(k) => {
                    info!(not_after = k.cert().not_after, "static channel key made");
                    *cur = Some(Arc::new(k));
                }
                Err(e) => {
                    warn!(error = %e, "static channel key not made: offering channel version 1 only");
                    *cur = None;
                }
            }
        }
        cur.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_renewed_a_day_before_its_end_and_when_the_clock_leaves_its_dates() {
        let pem = include_str!("../../proto/tests/vectors/keys/id0_2048.pem");
        let id = Arc::new(Identity::from_pkcs8_pem(pem).expect("vector key"));
        let keys = StaticKeys::new(id, Clock::default());
        let first = keys.get().expect("a key");
        assert!(Arc::ptr_eq(&first, &keys.get().expect("a key")), "kept while fresh");
        // Near its end (as if made long ago): renewed.
        *keys.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(
            StaticKey::generate(&mut OsRng, &keys.identity, keys.clock.unix_now() - 30 * 3600, CERT_LIFETIME.as_secs())
                .expect("key"),
        ));
        let renewed = keys.get().expect("a key");
        assert!(renewed.cert().not_after > keys.clock.unix_now() + RENEW_BEFORE.as_secs());
        // The clock jumped back before the key's dates: renewed too.
        let skewed = StaticKeys {
            current: Mutex::new(Some(renewed.clone())),
            identity: keys.identity.clone(),
            clock: Clock::skewed(-3 * 3600),
        };
        assert!(!Arc::ptr_eq(&skewed.get().expect("a key"), &renewed));
    }
}
