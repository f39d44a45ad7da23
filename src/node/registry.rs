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
    /// Asks the announce loop for an early announce.
    pub reannounce: Notify,
    last_reannounce: Mutex<Option<Instant>>,
}

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
        self.table().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Whether `nid` is one of our edges.
    pub fn has_edge(&self, nid: NeighborId) -> bool {
        self.table().values().any(|n| n.nid == nid)
    }

    /// Number of neighbors.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Asks for an early announce, at most once per 5 s: anyone can trigger this by claiming an unknown
    /// fingerprint, and every announce costs the tracker RSA work.
    pub fn request_reannounce(&self) {
        let mut last = self.last_reannounce.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            *last = Some(Instant::now());
            self.reannounce.notify_one();
        }
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
        self.map().values().cloned().collect()
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

    fn stranger(&self, _fp: &Fingerprint) {
        // Possibly a neighbor the tracker assigned after our last announce: refresh soon.
        self.neighbors.request_reannounce();
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
        // avoid it until it announces again.
        let (links, neighbors, router, reporter) =
            (self.links.clone(), self.neighbors.clone(), self.router.clone(), self.reporter.clone());
        let nid = link.nid;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
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
