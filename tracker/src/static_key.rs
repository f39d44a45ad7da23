//! The tracker's static X25519 key for version-2 channels (SPEC open issue 27; `anomos_proto::tracker`'s
//! `channel_v2`): generated at start, certified by the tracker's RSA identity for [`CERT_LIFETIME`], and replaced
//! every [`ROTATE_EVERY`] (one RSA signature each time). Kept in memory only: a restarted tracker, or each replica,
//! has its own, and the certificate travels in every ServerHello, so nothing needs to overlap.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anomos_net::Clock;
use anomos_proto::identity::Identity;
use anomos_proto::tracker::StaticKey;
use rand::rngs::OsRng;
use tracing::{info, warn};

/// How long a certificate is valid (peers refuse one valid for more than 7 days).
pub const CERT_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// How often the key is replaced (well within the certificate's life).
pub const ROTATE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The current static key, shared by every connection.
pub struct StaticKeys {
    current: Mutex<Arc<StaticKey>>,
}

impl StaticKeys {
    /// A first key, certified now on `clock`.
    pub fn new(identity: &Identity, clock: Clock) -> Result<StaticKeys, anomos_proto::ProtoError> {
        let k = StaticKey::generate(&mut OsRng, identity, clock.unix_now(), CERT_LIFETIME.as_secs())?;
        Ok(StaticKeys { current: Mutex::new(Arc::new(k)) })
    }

    /// The key to answer a ClientHello with.
    pub fn get(&self) -> Arc<StaticKey> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the key every [`ROTATE_EVERY`], for ever (a failed generation keeps the old key and is retried at
    /// the next turn; the old certificate is still valid for a day).
    pub async fn rotate(self: Arc<Self>, identity: Arc<Identity>, clock: Clock) {
        loop {
            tokio::time::sleep(ROTATE_EVERY).await;
            match StaticKey::generate(&mut OsRng, &identity, clock.unix_now(), CERT_LIFETIME.as_secs()) {
                Ok(k) => {
                    *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
                    info!("static channel key rotated");
                }
                Err(e) => warn!(error = %e, "static channel key not rotated"),
            }
        }
    }
}
