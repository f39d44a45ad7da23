//! The node's registry of neighbors and live links, and what links tell the node: the neighbor table the
//! tracker gave us ([`Neighbors`]), the live links by NeighborID ([`Links`], the circuit layer's
//! [`LinkDirectory`]), and [`Host`], the [`LinkHost`] every link reports to (up → attach to the router;
//! down → detach, and report the neighbor if it does not come back).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::tracker::{FailureKind, FailureReport};
use tokio::sync::Notify;
use tracing::{debug, info};

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
    /// Fingerprints refused as strangers lately, with the address each claim came from, and when (bounded): a
    /// neighbor that dialed us before we knew of its edge.
    knocked: Mutex<HashMap<(Fingerprint, IpAddr), Instant>>,
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

    /// Remembers that a dialer at `from` claiming `fp` was refused just now.
    pub fn knocked(&self, fp: &Fingerprint, from: IpAddr) {
        let key = (*fp, from.to_canonical());
        let mut k = self.knocked.lock().unwrap_or_else(|e| e.into_inner());
        k.retain(|_, t| anomos_net::rt::since(*t) < KNOCK_FRESH);
        if k.len() < KNOCKED_MAX || k.contains_key(&key) {
            k.insert(key, anomos_net::rt::now());
        }
    }

    /// Whether a dialer claiming `fp` was refused within [`KNOCK_FRESH`], dialing from `ip` (the neighbor's
    /// address as the tracker gave it). The fingerprint of a refused dialer is unverified: anyone could claim a
    /// neighbor's and make our dial to it wait for a link that is not coming, but only from the neighbor's own
    /// address. (A neighbor that dials from another address than the one it listens on is not waited for: its
    /// link and ours then cross, and one of them drains, SPEC §5.2.)
    pub fn recently_knocked(&self, fp: &Fingerprint, ip: IpAddr) -> bool {
        self.knocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(*fp, ip.to_canonical()))
            .is_some_and(|t| anomos_net::rt::since(*t) < KNOCK_FRESH)
    }
}

/// How young the current link over an edge must be for a second link of the other kind (dialed by the other
/// side) to count as a *crossing* dial rather than a neighbor that restarted (SPEC §5.2): a restarted neighbor
/// dials only after its restart, its tracker session and its announce, and its old link came up before all that.
/// (Both ends see the two links come up within about two transits of each other: with round trips under a second
/// or so, both judge a crossing alike.)
pub const CROSS_WINDOW: Duration = Duration::from_millis(1500);
/// How long a link that lost a crossing is kept, draining, at least: a circuit the neighbor opened on it before it
/// saw the other link come up is served. After that it closes once it carries no circuit.
pub const DRAIN_LINGER: Duration = Duration::from_secs(10);
/// How often a draining link is checked after [`DRAIN_LINGER`].
const DRAIN_CHECK: Duration = Duration::from_secs(2);
/// A draining link closes after this long even with circuits on it (a neighbor must not keep two links).
pub const DRAIN_MAX: Duration = Duration::from_secs(600);

/// The links over one edge: the current one (new circuits use it), when it came up, and at most one that lost a
/// crossing and drains (its circuits finish, no new one is started on it) with the time it began to.
struct Entry {
    current: Arc<Link>,
    up_at: Instant,
    draining: Option<(Arc<Link>, Instant)>,
}

/// Live links by NeighborID: one current link per edge (see [`Links::install`] for which), and links draining.
pub struct Links {
    map: Mutex<HashMap<NeighborId, Entry>>,
    changed: Notify,
    neighbors: Arc<Neighbors>,
    /// Our fingerprint: of two crossing links, the one dialed by the smaller fingerprint stays.
    me: Fingerprint,
}

impl Links {
    /// An empty registry over `neighbors`, for the node whose fingerprint is `me`.
    pub fn new(neighbors: Arc<Neighbors>, me: Fingerprint) -> Arc<Links> {
        Arc::new(Links { map: Mutex::new(HashMap::new()), changed: Notify::new(), neighbors, me })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<NeighborId, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every live link, draining ones included.
    pub fn all(&self) -> Vec<Arc<Link>> {
        // In neighbor order (not the map's), so what is done to every link happens in the same order in every run.
        let mut v: Vec<Arc<Link>> = self
            .map()
            .values()
            .flat_map(|e| std::iter::once(e.current.clone()).chain(e.draining.as_ref().map(|d| d.0.clone())))
            .collect();
        v.sort_unstable_by_key(|l| (l.peer, l.serial));
        v
    }

    /// Whether `link` is the link draining over its edge.
    #[cfg(test)]
    fn is_draining(&self, link: &Arc<Link>) -> bool {
        self.draining_since(link).is_some()
    }

    /// When `link` began to drain, if it is the link draining over its edge (a link promoted and made to drain
    /// again has the later time).
    fn draining_since(&self, link: &Arc<Link>) -> Option<Instant> {
        let m = self.map();
        m.get(&link.nid).and_then(|e| e.draining.as_ref()).filter(|(d, _)| Arc::ptr_eq(d, link)).map(|(_, at)| *at)
    }

    /// Number of live links (draining ones included: each is a connection).
    pub fn len(&self) -> usize {
        self.map().values().map(|e| 1 + usize::from(e.draining.is_some())).sum()
    }

    /// Number of edges of the current neighbor table with a link up (a draining link beside a current one is not a
    /// second edge; a link over an edge the table no longer lists does not count).
    pub fn edges_up(&self) -> usize {
        let nids: Vec<NeighborId> = self.map().keys().copied().collect();
        nids.into_iter().filter(|nid| self.neighbors.has_edge(*nid)).count()
    }

    /// Whether `link` was dialed by the smaller fingerprint of its two ends (the same answer at both ends).
    fn canonical(&self, link: &Link) -> bool {
        if link.dialer {
            self.me < link.peer
        } else {
            link.peer < self.me
        }
    }

    /// A link came up (SPEC §5.2, "one link per pair"). With no link over its edge it becomes the current one.
    /// Beside a current link of the same kind (dialed by the same side), or one up for longer than
    /// [`CROSS_WINDOW`], it replaces it, which is closed: the neighbor dropped or restarted. Beside a young
    /// current link of the other kind it is a *crossing* (both sides dialed at once): the link dialed by the
    /// smaller fingerprint is current and the other drains, at both ends alike, whichever came up first there
    /// (a circuit already opened on either finishes). Returns the link that began to drain, if one did, and when.
    /// (The map lock is held while a link's writer lock is taken to ask whether it is closed: that order only.)
    fn install(&self, link: &Arc<Link>) -> Option<(Arc<Link>, Instant)> {
        let now = anomos_net::rt::now();
        let mut close: Vec<(Arc<Link>, &'static str)> = Vec::new();
        let mut began = None;
        let mut m = self.map();
        match m.get_mut(&link.nid) {
            None => {
                m.insert(link.nid, Entry { current: link.clone(), up_at: now, draining: None });
            }
            Some(e) => {
                let crossing = e.current.dialer != link.dialer
                    && now.saturating_duration_since(e.up_at) <= CROSS_WINDOW
                    && !e.current.writer.is_closed();
                let drains = if !crossing {
                    // The neighbor dropped or restarted: a link that drained beside the old one goes too (after a
                    // restart it is dead at the neighbor's end).
                    close.extend(e.draining.take().map(|(d, _)| (d, "replaced by a newer link to the same neighbor")));
                    close.push((e.current.clone(), "replaced by a newer link to the same neighbor"));
                    e.current = link.clone();
                    e.up_at = now;
                    None
                } else if self.canonical(link) {
                    Some(std::mem::replace(&mut e.current, link.clone()))
                } else {
                    Some(link.clone())
                };
                if let Some(d) = drains {
                    info!(peer = %d.peer.short(), dialer = d.dialer, "crossing links: this one drains, the other stays");
                    d.set_draining(now);
                    began = Some((d.clone(), now));
                    if let Some((older, _)) = e.draining.replace((d, now)) {
                        close.push((older, "superseded by a newer crossing link"));
                    }
                }
            }
        }
        drop(m);
        for (l, why) in close {
            l.close(why);
        }
        self.changed.notify_waiters();
        began
    }

    /// Closes `link`, which began to drain at `since`, once it carries no circuit [`DRAIN_LINGER`] after that, or
    /// at [`DRAIN_MAX`] in any case; stops watching when it closed or became current meanwhile, or began to drain
    /// again (promoted, then the loser of a new crossing: the watch of that drain takes over, so the link still
    /// lingers [`DRAIN_LINGER`] after it).
    async fn drain(self: Arc<Self>, link: Arc<Link>, since: Instant, circuits_on: impl Fn(&Link) -> usize) {
        tokio::time::sleep(DRAIN_LINGER).await;
        let mut waited = DRAIN_LINGER;
        loop {
            if link.writer.is_closed() || self.draining_since(&link) != Some(since) {
                return;
            }
            let circuits = circuits_on(&link);
            if circuits == 0 || waited >= DRAIN_MAX {
                debug!(peer = %link.peer.short(), circuits, "closing a drained crossing link");
                link.close("superseded by the crossing link");
                return;
            }
            tokio::time::sleep(DRAIN_CHECK).await;
            waited += DRAIN_CHECK;
        }
    }

    /// A link went down: it leaves the registry; a draining link over its edge becomes current if it was.
    fn remove(&self, link: &Arc<Link>) {
        let now = anomos_net::rt::now();
        let mut m = self.map();
        if let Some(e) = m.get_mut(&link.nid) {
            if Arc::ptr_eq(&e.current, link) {
                match e.draining.take() {
                    Some((d, _)) if !d.writer.is_closed() => {
                        // Current now: it takes OPENs again, and its drain watch (which checks
                        // `draining_since`) lets it be.
                        d.clear_draining();
                        e.current = d;
                        e.up_at = now;
                    }
                    _ => {
                        m.remove(&link.nid);
                    }
                }
            } else if e.draining.as_ref().is_some_and(|(d, _)| Arc::ptr_eq(d, link)) {
                e.draining = None;
            }
        }
        drop(m);
        self.changed.notify_waiters();
    }
}

impl LinkDirectory for Links {
    fn link(&self, nid: NeighborId) -> Option<Arc<Link>> {
        self.map().get(&nid).map(|e| e.current.clone())
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

    /// Waits until a link comes up or goes down, or `max` passed (a change just before the call may be missed:
    /// callers re-check on a short `max`).
    pub async fn wait_change(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.changed.notified()).await;
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

    fn has_link(&self, nid: NeighborId) -> bool {
        self.links.link(nid).is_some_and(|l| !l.writer.is_closed())
    }

    fn stranger(&self, fp: &Fingerprint, from: IpAddr) {
        // Possibly a neighbor the tracker assigned after our last announce: refresh soon. (A known neighbor's
        // fingerprint with a bad signature is not remembered: anyone can claim it, and its dial loop must not wait.)
        if self.neighbors.get(fp).is_none() {
            self.neighbors.knocked(fp, from);
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
        if let Some((d, since)) = self.links.install(link) {
            let router = self.router.clone();
            tokio::spawn(self.links.clone().drain(d, since, move |l: &Link| router.circuits_on(l)));
        }
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

#[cfg(test)]
mod tests;
