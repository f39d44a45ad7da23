//! The probe keys of our version-2 tracker sessions (SPEC open issue 27): the tracker client installs one after
//! each new session, the node's listener answers a version-2 probe with the one it is under. The handle gives
//! neither the session's secret nor the key out: only answers. (Below both: neither depends on the other.)

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anomos_proto::probe_v2::{ProbeAuth, ProbeV2, PROBE_UNKNOWN, PROBE_V2_ANSWER_LEN};

/// How long a replaced session's key still answers (a probe the tracker started on the old session).
const KEEP_PREVIOUS: Duration = Duration::from_secs(60);

/// The current probe key, and the previous one with when it was replaced.
#[derive(Default)]
struct Keys {
    current: Option<ProbeAuth>,
    previous: Option<(ProbeAuth, Instant)>,
}

/// Our sessions' probe keys.
#[derive(Default)]
pub struct ProbeKeys {
    keys: Mutex<Keys>,
}

impl ProbeKeys {
    /// A new session's key becomes current; the one it replaces answers for [`KEEP_PREVIOUS`] more.
    pub fn install(&self, auth: ProbeAuth) {
        let mut k = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = k.current.replace(auth) {
            k.previous = Some((old, anomos_net::rt::now()));
        }
    }

    /// The answer to `probe`, we announcing `announced`: by the key the probe names, or `PROBE_UNKNOWN`.
    pub fn answer(&self, probe: &ProbeV2, announced: SocketAddr) -> [u8; PROBE_V2_ANSWER_LEN] {
        let k = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let previous = k.previous.as_ref().filter(|(_, at)| anomos_net::rt::since(*at) < KEEP_PREVIOUS).map(|(a, _)| a);
        match k.current.iter().chain(previous).find(|a| a.owns(probe)) {
            Some(a) => a.answer(probe, announced),
            None => {
                let mut out = [0u8; PROBE_V2_ANSWER_LEN];
                out[0] = PROBE_UNKNOWN;
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anomos_proto::crypto::Secret;
    use anomos_proto::identity::Fingerprint;
    use anomos_proto::probe_v2::{decode_probe_v2, PROBE_OK};

    #[tokio::test(start_paused = true)]
    async fn the_current_and_the_recent_previous_session_answer_others_do_not() {
        let fp = Fingerprint([3; 32]);
        let auth = |s: u8| ProbeAuth::derive(&Secret([s; 32]), &fp).unwrap();
        let addr: SocketAddr = "192.0.2.1:8633".parse().unwrap();
        let probe = |s: u8| decode_probe_v2(&auth(s).probe(&[1; 32], addr)[8..]).unwrap();
        let keys = ProbeKeys::default();
        assert_eq!(keys.answer(&probe(1), addr)[0], PROBE_UNKNOWN, "no session yet");
        keys.install(auth(1));
        assert_eq!(keys.answer(&probe(1), addr)[0], PROBE_OK);
        keys.install(auth(2));
        assert_eq!(keys.answer(&probe(2), addr)[0], PROBE_OK);
        assert_eq!(keys.answer(&probe(1), addr)[0], PROBE_OK, "the previous session, for a while");
        tokio::time::advance(KEEP_PREVIOUS).await;
        assert_eq!(keys.answer(&probe(1), addr)[0], PROBE_UNKNOWN);
        assert_eq!(keys.answer(&probe(9), addr)[0], PROBE_UNKNOWN, "a session we never had");
    }
}
