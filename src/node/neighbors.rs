//! The node's place in the overlay: the announce loop (our neighbor table comes from its replies) and the dial
//! loops that keep a link to every neighbor we are responsible for (SPEC §5.2).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::tracker::{Announce, FailureKind, FailureReport, FromTracker, ToTracker};
use tracing::{debug, info, warn};

use super::registry::NeighborEntry;
use super::status::TrackerState;
use super::Node;
use crate::circuit::LinkDirectory;
use crate::error::PeerError;
use crate::link;
use crate::stats::unix_now;

impl Node {
    pub(super) async fn announce_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.is_shutting_down() {
                return;
            }
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
                    warn!("announce failed (retrying in {:.1}s): {e}", backoff.as_secs_f64());
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.neighbors.reannounce.notified() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
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
        self.neighbors.replace(table);
        debug!(neighbors = count, "announced");
        self.retire_stale_links();
        self.reconcile_links();
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

    /// Dials the neighbors we are responsible for: exactly one link per pair, dialed by the side with the
    /// smaller fingerprint.
    fn reconcile_links(self: &Arc<Self>) {
        let me = self.fingerprint();
        for (fp, n) in self.neighbors.all() {
            if fp <= me || self.links.link(n.nid).is_some() {
                continue;
            }
            if !self.dialing.lock().unwrap_or_else(|e| e.into_inner()).insert(n.nid) {
                continue;
            }
            let node = self.clone();
            tokio::spawn(async move {
                let nid = n.nid;
                node.dial_loop(fp, n).await;
                node.dialing.lock().unwrap_or_else(|e| e.into_inner()).remove(&nid);
            });
        }
    }

    async fn dial_loop(self: &Arc<Self>, fp: Fingerprint, n: NeighborEntry) {
        let mut backoff = Duration::from_millis(250);
        let mut failures = 0u32;
        let mut addr = n.addr;
        loop {
            // Still a neighbor over the same edge? At the address the tracker gave last (a neighbor that
            // restarted on another port keeps its edge but moves).
            match self.neighbors.get(&fp).map(|e| (e.nid, e.addr)) {
                Some((nid, now)) if nid == n.nid => {
                    if now != addr {
                        debug!(peer = %fp.short(), "neighbor moved; dialing its new address");
                        addr = now;
                        backoff = Duration::from_millis(250);
                    }
                }
                _ => return,
            }
            if self.is_shutting_down() {
                return;
            }
            let host: Arc<dyn link::LinkHost> = self.host.clone();
            match link::dial(host, &self.link_settings, n.nid, addr, n.key.clone()).await {
                // The link ran and ended; dial again (the neighbor may have restarted).
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    failures += 1;
                    if link::is_refused(&e) {
                        debug!(peer = %fp.short(), "neighbor does not know us yet; retrying");
                    } else {
                        info!(peer = %fp.short(), "dial failed: {e}");
                        if failures == 3 {
                            self.reporter.report(FailureReport {
                                kind: FailureKind::NeighborUnreachable,
                                neighbor: Some(n.nid),
                                circuit: None,
                                hop_tag: None,
                            });
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            // Wait out the backoff, but dial at once if an announce tells us the neighbor moved.
            let deadline = tokio::time::Instant::now() + backoff;
            loop {
                let changed = self.neighbors.changed.notified();
                let moved = self.neighbors.get(&fp).is_none_or(|e| e.addr != addr);
                if moved || tokio::time::timeout_at(deadline, changed).await.is_err() {
                    break;
                }
            }
        }
    }
}
