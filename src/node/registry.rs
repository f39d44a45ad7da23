//! The node's registry of neighbors and live links, and what links tell the node: the neighbor table the
//! tracker gave us ([`Neighbors`]), the live links by NeighborID ([`Links`], the circuit layer's
//! [`LinkDirectory`]), and [`Host`], the [`LinkHost`] every link reports to (up → attach to the router;
//! down → detach, and report the neighbor if it does not come back).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::tracker::{FailureKind, FailureReport};
use tokio::sync::Notify;
use tracing::info;

use crate::circuit::{LinkDirectory, Reporter, Router};
use crate::link::{CellSink, Link, LinkHost};
use crate::stats::Stats;

/// One neighbor as the tracker described it.
#[derive(Clone)]
pub struct NeighborEntry {
    /// The edge.
    pub nid: NeighborId,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its key.
    pub key: PublicKey,
}

/// Our neighbor table (replaced by every announce reply), and the request for an early announce.
#[derive(Default)]
pub struct Neighbors {
    table: Mutex<HashMap<Fingerprint, NeighborEntry>>,
    /// Notified whenever an announce replaced the table.
    pub changed: Notify,
    /// Asks the announce loop for an early announce (it coalesces requests and spaces early announces by
    /// [`super::neighbors::REANNOUNCE_MIN`]: anyone can ask by claiming an unknown fingerprint, and every announce
    /// costs the tracker work).
    pub reannounce: Notify,
    /// Fingerprints refused as strangers lately, and when (bounded): a neighbor that dialed us before we knew
    /// of its edge.
    knocked: Mutex<HashMap<Fingerprint, Instant>>,
}

/// Strangers remembered at most (a flood of made-up fingerprints must not grow memory).
const KNOCKED_MAX: usize = 64;
/// How long a refused stranger counts as "knocking".
pub const KNOCK_FRESH: Duration = Duration::from_secs(5);

impl Neighbors {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Fingerprint, NeighborEntry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the table.
    pub fn replace(&self, t: HashMap<Fingerprint, NeighborEntry>) {
        *self.table() = t;
        self.changed.notify_waiters();
    }

    /// A neighbor by fingerprint.
    pub fn get(&self, fp: &Fingerprint) -> Option<NeighborEntry> {
        self.table().get(fp).cloned()
    }

    /// Every neighbor.
    pub fn all(&self) -> Vec<(Fingerprint, NeighborEntry)> {
        // In fingerprint order (not the map's): dials start in the same order in every run of a simulation.
        let mut v: Vec<(Fingerprint, NeighborEntry)> = self.table().iter().map(|(k, v)| (*k, v.clone())).collect();
        v.sort_unstable_by_key(|(fp, _)| *fp);
        v
    }

    /// Whether `nid` is one of our edges.
    pub fn has_edge(&self, nid: NeighborId) -> bool {
        self.table().values().any(|n| n.nid == nid)
    }

    /// Number of neighbors.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Asks for an early announce (coalesced and rate-limited by the announce loop; never lost).
    pub fn request_reannounce(&self) {
        self.reannounce.notify_one();
    }

    /// Remembers that a dialer claiming `fp` was refused just now.
    pub fn knocked(&self, fp: &Fingerprint) {
        let mut k = self.knocked.lock().unwrap_or_else(|e| e.into_inner());
        k.retain(|_, t| anomos_net::rt::since(*t) < KNOCK_FRESH);
        if k.len() < KNOCKED_MAX || k.contains_key(fp) {
            k.insert(*fp, anomos_net::rt::now());
        }
    }

    /// Whether a dialer claiming `fp` was refused within [`KNOCK_FRESH`].
    pub fn recently_knocked(&self, fp: &Fingerprint) -> bool {
        self.knocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(fp)
            .is_some_and(|t| anomos_net::rt::since(*t) < KNOCK_FRESH)
    }
}

/// Live links by NeighborID (the newest link per edge).
pub struct Links {
    map: Mutex<HashMap<NeighborId, Arc<Link>>>,
    changed: Notify,
    neighbors: Arc<Neighbors>,
}

impl Links {
    /// An empty registry over `neighbors`.
    pub fn new(neighbors: Arc<Neighbors>) -> Arc<Links> {
        Arc::new(Links { map: Mutex::new(HashMap::new()), changed: Notify::new(), neighbors })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<NeighborId, Arc<Link>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every live link.
    pub fn all(&self) -> Vec<Arc<Link>> {
        // In neighbor order (not the map's), so what is done to every link happens in the same order in every run.
        let mut v: Vec<Arc<Link>> = self.map().values().cloned().collect();
        v.sort_unstable_by_key(|l| (l.peer, l.serial));
        v
    }

    /// Number of live links.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    fn install(&self, link: &Arc<Link>) {
        let old = self.map().insert(link.nid, link.clone());
        if let Some(old) = old {
            // A neighbor that restarted dials again; the new link replaces the old one.
            old.close("replaced by a newer link to the same neighbor");
        }
        self.changed.notify_waiters();
    }

    fn remove(&self, link: &Arc<Link>) {
        let mut m = self.map();
        if m.get(&link.nid).is_some_and(|l| Arc::ptr_eq(l, link)) {
            m.remove(&link.nid);
        }
        drop(m);
        self.changed.notify_waiters();
    }
}

impl LinkDirectory for Links {
    fn link(&self, nid: NeighborId) -> Option<Arc<Link>> {
        self.map().get(&nid).cloned()
    }

    fn expects(&self, nid: NeighborId) -> bool {
        self.neighbors.has_edge(nid)
    }

    fn refresh(&self) {
        self.neighbors.request_reannounce();
    }

    fn wait_new_edge(
        &self,
        nid: NeighborId,
        max: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<Link>>> + Send + '_>> {
        Box::pin(self.wait(nid, max, true))
    }

    fn wait_link(
        &self,
        nid: NeighborId,
        max: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<Link>>> + Send + '_>> {
        Box::pin(self.wait(nid, max, false))
    }
}

impl Links {
    /// Waits until no link over `nid` is up, or the neighbor table no longer lists `nid`.
    pub async fn wait_gone(&self, nid: NeighborId) {
        loop {
            let link_changed = self.changed.notified();
            let table_changed = self.neighbors.changed.notified();
            if self.link(nid).is_none() || !self.neighbors.has_edge(nid) {
                return;
            }
            tokio::select! {
                biased; // in order: the same outcome in every run of a simulation
                _ = link_changed => {}
                _ = table_changed => {}
            }
        }
    }

    /// Waits up to `max` for the link over `nid`; with `unlisted`, also gives up when a replaced neighbor table
    /// does not list `nid`.
    async fn wait(&self, nid: NeighborId, max: Duration, unlisted: bool) -> Option<Arc<Link>> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let link_changed = self.changed.notified();
            let table_changed = self.neighbors.changed.notified();
            if let Some(l) = self.link(nid) {
                return Some(l);
            }
            tokio::select! {
                biased; // in order: the same outcome in every run of a simulation
                _ = tokio::time::sleep_until(deadline) => return self.link(nid),
                _ = link_changed => {}
                _ = table_changed => {
                    if unlisted && !self.neighbors.has_edge(nid) {
                        return self.link(nid);
                    }
                }
            }
        }
    }
}

/// How long after a link went down the node reports the neighbor unreachable if no new link came up.
pub const LINK_LOST_REPORT: Duration = Duration::from_secs(1);

/// What every link of the node reports to.
pub struct Host {
    /// Live links.
    pub links: Arc<Links>,
    /// The neighbor table.
    pub neighbors: Arc<Neighbors>,
    /// The circuit layer.
    pub router: Arc<Router>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Failure reports for the tracker.
    pub reporter: Reporter,
    /// Most links at once.
    pub max_links: usize,
}

impl LinkHost for Host {
    fn neighbor(&self, fp: &Fingerprint) -> Option<(PublicKey, NeighborId)> {
        self.neighbors.get(fp).map(|n| (n.key, n.nid))
    }

    fn busy(&self, nid: NeighborId) -> bool {
        // A neighbor that restarted replaces its old link, so it does not need a free slot.
        self.links.len() >= self.max_links && self.links.link(nid).is_none()
    }

    fn stranger(&self, fp: &Fingerprint) {
        // Possibly a neighbor the tracker assigned after our last announce: refresh soon. (A known neighbor's
        // fingerprint with a bad signature is not remembered: anyone can claim it, and its dial loop must not wait.)
        if self.neighbors.get(fp).is_none() {
            self.neighbors.knocked(fp);
        }
        self.neighbors.request_reannounce();
    }

    fn table_refreshed(&self, max: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let _ = tokio::time::timeout(max, self.neighbors.changed.notified()).await;
        })
    }

    fn up(&self, link: &Arc<Link>) -> Option<Arc<dyn CellSink>> {
        if self.router.is_shutting_down() {
            return None;
        }
        self.stats.links_opened.fetch_add(1, Ordering::Relaxed);
        let sink = self.router.attach(link);
        self.links.install(link);
        Some(sink)
    }

    fn down(&self, link: &Arc<Link>, _reason: &str) {
        self.links.remove(link);
        self.stats.links_closed.fetch_add(1, Ordering::Relaxed);
        self.router.detach(link);
        // If the neighbor does not come back soon, tell the tracker (whichever side dialed), so new paths
        // avoid it until it announces again. The dialing side redials at once and reports as soon as that fails
        // (`dial_loop`); this is the accepting side's (and a backstop for the dialer's) report.
        let (links, neighbors, router, reporter) =
            (self.links.clone(), self.neighbors.clone(), self.router.clone(), self.reporter.clone());
        let nid = link.nid;
        tokio::spawn(async move {
            tokio::time::sleep(LINK_LOST_REPORT).await;
            if router.is_shutting_down() {
                return;
            }
            if neighbors.has_edge(nid) && links.link(nid).is_none() {
                info!(neighbor = ?nid, "neighbor did not come back; reporting it");
                reporter.report(FailureReport {
                    kind: FailureKind::NeighborUnreachable,
                    neighbor: Some(nid),
                    circuit: None,
                    hop_tag: None,
                });
            }
        });
    }
}
