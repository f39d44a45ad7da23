//! The node's place in the overlay: the announce loop (our neighbor table comes from its replies), and which
//! neighbors get dialed (the dial loops themselves are in `dial.rs`, SPEC §5.2).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::identity::PublicKey;
use anomos_proto::ids::NeighborId;
use anomos_proto::tracker::{Announce, FromTracker, ToTracker};
use tracing::{debug, info, warn};

use super::registry::NeighborEntry;
use super::status::TrackerState;
use super::Node;
use crate::circuit::LinkDirectory;
use crate::error::PeerError;
use crate::stats::unix_now;

/// Early announces (asked for by a refused stranger or an OPEN naming an unknown edge) at most this often.
pub const REANNOUNCE_MIN: Duration = Duration::from_secs(2);
/// An early announce waits at least this long, so requests arriving together (the dials of a new peer's neighbors)
/// make one announce. Short: a dialer waits for it (its AUTH is held until our table is refreshed).
pub const REANNOUNCE_COALESCE: Duration = Duration::from_millis(50);

impl Node {
    pub(super) async fn announce_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.is_shutting_down() {
                return;
            }
            let last_announce = tokio::time::Instant::now();
            let wait = match self.announce_once().await {
                Ok(interval) => {
                    self.stats.announces_ok.fetch_add(1, Ordering::Relaxed);
                    *self.tracker_state.lock().unwrap_or_else(|e| e.into_inner()) =
                        TrackerState { last_ok_unix: Some(unix_now()), last_error: None };
                    backoff = Duration::from_millis(500);
                    self.announced.notify_waiters();
                    interval
                }
                Err(e) => {
                    self.stats.announces_failed.fetch_add(1, Ordering::Relaxed);
                    self.tracker_state.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.to_string());
                    // Jittered (×0.5–1.5): after a tracker restart every peer's announce fails at once, and
                    // unjittered retries would come back as one wave each time (SPEC §3.4).
                    // Drawn from `rt::with_rng`, so a simulation replays it.
                    let w = backoff.mul_f64(0.5 + anomos_net::rt::with_rng(|r| rand::Rng::gen::<f64>(r)));
                    warn!("announce failed (retrying in {:.1}s): {e}", w.as_secs_f64());
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                biased; // in order: the same outcome in every run of a simulation
                _ = tokio::time::sleep(wait) => {}
                _ = self.neighbors.reannounce.notified() => {
                    // Early announces are spaced by REANNOUNCE_MIN; requests meanwhile are coalesced into the
                    // next one, not lost (a second new neighbor within the window must not wait for the interval).
                    let since = last_announce.elapsed();
                    tokio::time::sleep(REANNOUNCE_COALESCE.max(REANNOUNCE_MIN.saturating_sub(since))).await;
                }
            }
        }
    }

    async fn announce_once(self: &Arc<Self>) -> Result<Duration, PeerError> {
        let listen = self.cfg.advertise.unwrap_or(self.listen_addr);
        let reply = self
            .tracker
            .request(&ToTracker::Announce(Announce {
                listen,
                chains: self.cfg.serve.clone(),
                family: self.cfg.family.clone(),
            }))
            .await?;
        let FromTracker::Announced(a) = reply else {
            return Err(PeerError::Tracker(format!("unexpected reply {reply:?}")));
        };
        let mut table = HashMap::new();
        for n in &a.neighbors {
            match PublicKey::from_der(&n.public_key) {
                Ok(key) => {
                    table.insert(key.fingerprint(), NeighborEntry { nid: n.id, addr: n.addr, key });
                }
                Err(e) => warn!("tracker sent a bad neighbor key: {e}"),
            }
        }
        let count = table.len();
        let before: HashSet<NeighborId> = self.neighbors.all().iter().map(|(_, n)| n.nid).collect();
        self.neighbors.replace(table);
        debug!(neighbors = count, "announced");
        self.retire_stale_links();
        self.reconcile_links(&before);
        Ok(Duration::from_secs(a.interval_secs.clamp(1, 3600) as u64))
    }

    /// Closes links over edges that are no longer in our neighbor table (the tracker dropped or renumbered
    /// the edge, e.g. after it restarted) once they carry no circuits. Circuits on them finish undisturbed;
    /// new circuits never use them (TCs name current edges).
    fn retire_stale_links(&self) {
        for l in self.links.all() {
            if !self.neighbors.has_edge(l.nid) && self.router.circuits_on(&l) == 0 {
                info!(peer = %l.peer.short(), "retiring a link whose edge the tracker no longer lists");
                l.close("edge no longer current");
            }
        }
    }

    /// Dials the neighbors we are responsible for: one link per pair, dialed by the side with the smaller
    /// fingerprint. For the others, new in this table, we knock (`dial::knock`): the tracker most likely paired us
    /// after their last announce, so they do not know the edge yet (SPEC §5.2).
    fn reconcile_links(self: &Arc<Self>, known_before: &HashSet<NeighborId>) {
        let me = self.fingerprint();
        for (fp, n) in self.neighbors.all() {
            let knock = fp < me;
            if self.links.link(n.nid).is_some() || (knock && known_before.contains(&n.nid)) {
                continue;
            }
            if !self.dialing.lock().unwrap_or_else(|e| e.into_inner()).insert(n.nid) {
                continue;
            }
            let node = self.clone();
            tokio::spawn(async move {
                let nid = n.nid;
                if knock {
                    node.knock(fp, n).await;
                } else {
                    node.dial_loop(fp, n).await;
                }
                node.dialing.lock().unwrap_or_else(|e| e.into_inner()).remove(&nid);
            });
        }
    }
}
