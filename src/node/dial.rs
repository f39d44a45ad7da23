//! Dialing neighbors (SPEC §5.2): the dial loop of an edge we are responsible for (smaller fingerprint), with
//! capped, jittered exponential backoff and an unreachable neighbor reported once (log, `status`, tracker); and
//! the knock on a new edge whose dialer has not dialed us (it may not know the edge yet).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::NeighborId;
use anomos_proto::tracker::{FailureKind, FailureReport};
use rand::Rng;
use tracing::{debug, info, warn};

use super::registry::{NeighborEntry, KNOCK_FRESH};
use super::Node;
use crate::circuit::LinkDirectory;
use crate::link;

/// The first retry after a failed dial.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The longest wait between dials of an unreachable neighbor.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Failed dials (refusals excepted) after which a neighbor counts as unreachable: logged at WARN once, shown by
/// `status`, reported to the tracker. A link that just dropped and cannot be redialed is reported (and shown) at
/// the first failed dial already, logged at INFO.
pub const UNREACHABLE_AFTER: u32 = 3;
/// The wait before a second knock on a new edge (doubling before the third). The first knock goes at once, unless
/// the edge's dialer dialed us within [`KNOCK_FRESH`] (its link is then coming up).
pub const KNOCK_GRACE: Duration = Duration::from_millis(1500);
/// Knocks per new edge at most.
const KNOCKS: u32 = 3;

/// The wait before the next dial after `failures` consecutive failed dials: 250 ms doubling to
/// [`DIAL_BACKOFF_MAX`], each wait drawn uniformly from 75–125 % of that (so neighbors of a dead peer do not
/// redial it in lockstep), never above the cap.
pub fn dial_backoff(failures: u32, rng: &mut impl Rng) -> Duration {
    let base = DIAL_BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(DIAL_BACKOFF_MAX);
    base.mul_f64(rng.gen_range(0.75..=1.25)).min(DIAL_BACKOFF_MAX)
}

/// A neighbor we dial and cannot reach, as `status` shows it.
#[derive(Debug, Clone)]
pub struct Unreachable {
    /// Its fingerprint (short form).
    pub peer: String,
    /// Where we dial it.
    pub addr: std::net::SocketAddr,
    /// Consecutive failed dials.
    pub failures: u32,
    /// The last dial's error.
    pub last_error: String,
    /// Since when (the first failed dial of this outage).
    pub since: Instant,
    /// When the next dial is due.
    pub next_dial: Instant,
}

/// Unreachable neighbors by edge (only those past [`UNREACHABLE_AFTER`]).
#[derive(Default)]
pub struct DialTroubles(std::sync::Mutex<HashMap<NeighborId, Unreachable>>);

impl DialTroubles {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<NeighborId, Unreachable>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every unreachable neighbor, sorted by fingerprint.
    pub fn all(&self) -> Vec<Unreachable> {
        let mut v: Vec<Unreachable> = self.map().values().cloned().collect();
        v.sort_by(|a, b| a.peer.cmp(&b.peer));
        v
    }
}

impl Node {
    /// Keeps a link to a neighbor we are responsible for while the edge is in our table.
    pub(super) async fn dial_loop(self: &Arc<Self>, fp: Fingerprint, n: NeighborEntry) {
        let mut failures = 0u32;
        let mut since = Instant::now();
        let mut reported = false;
        // Whether a link over this edge was up just before this dial (then a failure is reported at once).
        let mut lost = false;
        let mut addr = n.addr;
        // The neighbor dialed us before we knew the edge (we refused and refreshed): that link is coming up now.
        if self.neighbors.recently_knocked(&fp, n.addr.ip()) {
            let _ = self.links.wait_link(n.nid, KNOCK_FRESH).await;
        }
        loop {
            // Still a neighbor over the same edge? At the address the tracker gave last (a neighbor that
            // restarted on another port keeps its edge but moves).
            match self.neighbors.get(&fp).map(|e| (e.nid, e.addr)) {
                Some((nid, now)) if nid == n.nid => {
                    if now != addr {
                        debug!(peer = %fp.short(), "neighbor moved; dialing its new address");
                        addr = now;
                        failures = 0;
                    }
                }
                _ => break,
            }
            if self.is_shutting_down() {
                break;
            }
            // A link is up already (the neighbor knocked, or restarted and dialed us): it is reachable; dial when
            // the link is gone.
            if self.links.link(n.nid).is_some() {
                if failures >= UNREACHABLE_AFTER || reported {
                    info!(peer = %fp.short(), failures, "neighbor reachable again (it dialed us)");
                }
                self.dial_troubles.map().remove(&n.nid);
                (failures, reported) = (0, false);
                self.links.wait_gone(n.nid).await;
                lost = true;
                continue;
            }
            let host: Arc<dyn link::LinkHost> = self.host.clone();
            let wait = match link::dial(host, &self.link_settings, n.nid, addr, n.key.clone()).await {
                // The link ran and ended; dial again (the neighbor may have restarted).
                Ok(()) => {
                    if failures >= UNREACHABLE_AFTER || reported {
                        info!(peer = %fp.short(), failures, "neighbor reachable again");
                    }
                    self.dial_troubles.map().remove(&n.nid);
                    (failures, reported, lost) = (0, false, true);
                    DIAL_BACKOFF_MIN
                }
                Err(e) => {
                    if failures == 0 {
                        since = Instant::now();
                    }
                    failures += 1;
                    let wait = anomos_net::rt::with_rng(|mut r| dial_backoff(failures, &mut r));
                    if link::is_refused(&e) {
                        // The neighbor has not learned of our edge yet (it refreshes when it refuses us).
                        debug!(peer = %fp.short(), "neighbor does not know us yet; retrying");
                    } else {
                        if !reported && (failures >= UNREACHABLE_AFTER || lost) {
                            // At once when a link just dropped and cannot be redialed: new paths should avoid it now.
                            reported = true;
                            self.reporter.report(FailureReport {
                                kind: FailureKind::NeighborUnreachable,
                                neighbor: Some(n.nid),
                                circuit: None,
                                hop_tag: None,
                            });
                        }
                        if failures == UNREACHABLE_AFTER {
                            // Once per outage, when it is not a blip (a neighbor that restarts is back by now).
                            warn!(
                                peer = %fp.short(), failures,
                                "neighbor unreachable: {e}; reported to the tracker, redialing with backoff (up to {}s)",
                                DIAL_BACKOFF_MAX.as_secs()
                            );
                        } else if lost {
                            info!(peer = %fp.short(), "neighbor's link dropped and a redial failed ({e}); reported to the tracker");
                        } else {
                            debug!(peer = %fp.short(), failures, next_in = ?wait, "dial failed: {e}");
                        }
                    }
                    if reported {
                        self.dial_troubles.map().insert(
                            n.nid,
                            Unreachable {
                                peer: fp.short(),
                                addr,
                                failures,
                                last_error: e.to_string(),
                                since,
                                next_dial: Instant::now() + wait,
                            },
                        );
                    }
                    lost = false;
                    wait
                }
            };
            // Wait out the backoff, but go on at once if an announce tells us the neighbor moved, or if the neighbor
            // dials us meanwhile (then its link is watched from the start, and its loss reported at once: with only
            // the backoff, a link that came and went while we slept would go unnoticed here).
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let changed = self.neighbors.changed.notified();
                let moved = self.neighbors.get(&fp).is_none_or(|e| e.addr != addr);
                if moved {
                    break;
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                tokio::select! {
                    biased; // in order: the same outcome in every run of a simulation
                    _ = self.links.wait_link(n.nid, left) => break, // up, or the backoff is over
                    _ = changed => {}
                }
            }
        }
        self.dial_troubles.map().remove(&n.nid);
    }

    /// A new edge whose dialer is the neighbor (smaller fingerprint): it most likely does not know the edge yet
    /// (the tracker made it at our announce, and tells the neighbor at its next one), so we dial it at once,
    /// unless it dialed us within [`KNOCK_FRESH`] (we refused it before our table had the edge, and its link is
    /// coming up). It refreshes its table on our AUTH and accepts, and the link runs as any other until it ends;
    /// after that, redialing is the neighbor's job. At most [`KNOCKS`] tries, [`KNOCK_GRACE`] apart and doubling,
    /// while the edge lasts and no link is up. Should the neighbor dial too, the links cross and one drains (SPEC
    /// §5.2).
    pub(super) async fn knock(self: &Arc<Self>, fp: Fingerprint, n: NeighborEntry) {
        let mut wait = if self.neighbors.recently_knocked(&fp, n.addr.ip()) { KNOCK_FRESH } else { Duration::ZERO };
        for k in 0..KNOCKS {
            if self.links.wait_link(n.nid, wait).await.is_some() || self.is_shutting_down() {
                return;
            }
            wait = if k == 0 { KNOCK_GRACE } else { wait.saturating_mul(2) };
            let Some(now) = self.neighbors.get(&fp).filter(|e| e.nid == n.nid) else { return };
            let host: Arc<dyn link::LinkHost> = self.host.clone();
            match link::dial(host, &self.link_settings, n.nid, now.addr, n.key.clone()).await {
                Ok(()) => return,
                Err(e) => debug!(peer = %fp.short(), "knock on a new neighbor failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_backoff_grows_exponentially_to_a_cap_with_jitter() {
        let mut rng = rand::thread_rng();
        for failures in 1..=40u32 {
            let base = DIAL_BACKOFF_MIN.saturating_mul(1u32 << (failures - 1).min(16)).min(DIAL_BACKOFF_MAX);
            let draws: Vec<Duration> = (0..200).map(|_| dial_backoff(failures, &mut rng)).collect();
            for d in &draws {
                assert!(
                    *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25).min(DIAL_BACKOFF_MAX),
                    "{failures}: {d:?}"
                );
            }
            // Jittered: not all the same (every base here is at least 250 ms, so the range is wide).
            assert!(draws.iter().any(|d| *d != draws[0]), "{failures}: no jitter");
        }
        // Doubling at first: the 5th wait is about 16 times the first.
        assert!(dial_backoff(5, &mut rng) >= Duration::from_secs(3));
        // The cap is reached (10 s was the old cap: a dead neighbor was redialed every 10 s forever).
        assert!(dial_backoff(30, &mut rng) >= DIAL_BACKOFF_MAX.mul_f64(0.75));
        assert!(dial_backoff(u32::MAX, &mut rng) <= DIAL_BACKOFF_MAX);
    }
}
