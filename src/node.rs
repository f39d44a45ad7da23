//! The peer node: its one listening port, its place in the overlay (announce loop, neighbor links), and the
//! state every circuit shares (links, replay cache, circuit count, statistics).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::cell::{BreakReason, DenyReason};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{self as plink, LINK_MAGIC, PROBE_MAGIC};
use anomos_proto::tracker::{
    Announce, CircuitGrant, CircuitRequest, FailureKind, FailureReport, FromTracker, ToTracker,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::circuit::endpoint::{CircuitStream, Endpoint};
use crate::circuit::relay::Dir;
use crate::circuit::Route;
use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::link::writer::Budget;
use crate::link::{self, Link};
use crate::tracker_client::TrackerClient;

/// What serves circuits that end here (the chain node).
pub trait Service: Send + Sync + 'static {
    /// Takes a new incoming circuit (its end-to-end session is up).
    fn accept(&self, stream: CircuitStream);
}

/// Counters (monotonic).
#[derive(Default)]
pub struct Stats {
    /// DATA cells relayed.
    pub cells_relayed: AtomicU64,
    /// Payload bytes relayed.
    pub bytes_relayed: AtomicU64,
    /// Circuits relayed since start.
    pub relay_opened: AtomicU64,
    /// Circuits opened to us as target.
    pub target_opened: AtomicU64,
    /// OPENs denied.
    pub denied: AtomicU64,
}

impl Stats {
    pub(crate) fn relayed(&self, bytes: u64) {
        self.cells_relayed.fetch_add(1, Ordering::Relaxed);
        self.bytes_relayed.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn relay_opened(&self) {
        self.relay_opened.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn target_opened(&self) {
        self.target_opened.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn denied(&self, _r: DenyReason) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of what a node holds (for the `stats` log line, tests and monitoring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Live neighbor links.
    pub links: usize,
    /// Circuits alive here (relayed and endpoints).
    pub circuits: usize,
    /// Cells queued on all links (bounded by `max_queued_cells`).
    pub queued_cells: usize,
    /// Cells queued on the fullest link.
    pub max_link_queue: usize,
    /// Incoming connections open (handshaking, links, probes).
    pub conns: usize,
}

/// Counts a circuit against the limit while alive.
pub struct CircuitGuard(Arc<AtomicUsize>);

impl Drop for CircuitGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Debug trace of relayed DATA payloads (hex, one line per cell: `circ dir in out`), for anonymity tests.
pub struct Trace(Mutex<std::io::BufWriter<std::fs::File>>);

impl Trace {
    pub(crate) fn record(&self, circ: u32, dir: Dir, before: &[u8], after: &[u8]) {
        use std::io::Write;
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            f,
            "{circ:08x} {} {} {}",
            if dir == Dir::Fwd { "fwd" } else { "bwd" },
            hex::encode(before),
            hex::encode(after)
        );
        let _ = f.flush();
    }
}

#[derive(Clone)]
struct NeighborEntry {
    nid: NeighborId,
    addr: SocketAddr,
    key: PublicKey,
}

/// Incoming connections open now, in total and per source IP (the listening port's limits).
#[derive(Default)]
struct ConnTable {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one slot of the connection limits while an incoming connection lives.
struct ConnSlot {
    node: Arc<Node>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = self.node.conns.lock().unwrap_or_else(|e| e.into_inner());
        t.total -= 1;
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Replay tags seen, with their expiry; bounded.
struct ReplayCache {
    seen: HashMap<[u8; 16], u64>,
    cap: usize,
}

/// A running peer.
pub struct Node {
    /// Configuration.
    pub cfg: PeerConfig,
    /// Our identity.
    pub identity: Arc<Identity>,
    /// The pinned tracker key.
    pub tracker_key: PublicKey,
    /// The address we listen on.
    pub listen_addr: SocketAddr,
    /// Who handles circuits ending here.
    pub service: Option<Arc<dyn Service>>,
    /// Counters.
    pub stats: Stats,
    pub(crate) trace: Option<Arc<Trace>>,
    neighbors: Mutex<HashMap<Fingerprint, NeighborEntry>>,
    links: Mutex<HashMap<NeighborId, Arc<Link>>>,
    dialing: Mutex<std::collections::HashSet<NeighborId>>,
    link_change: Notify,
    /// Notified whenever an announce replaced the neighbor table.
    table_change: Notify,
    replay: Mutex<ReplayCache>,
    circuits: Arc<AtomicUsize>,
    reannounce: Notify,
    announced: Notify,
    last_reannounce: Mutex<Option<Instant>>,
    conns: Mutex<ConnTable>,
    /// The node-wide budget of queued cells, shared by every link.
    pub(crate) budget: Arc<Budget>,
    /// Our session with the tracker (announces, circuit requests, reports).
    tracker: Arc<TrackerClient>,
}

impl Node {
    /// Binds the listening port and builds the node (nothing runs until [`Node::start`]).
    pub async fn bind(
        cfg: PeerConfig,
        identity: Identity,
        tracker_key: PublicKey,
        service: Option<Arc<dyn Service>>,
    ) -> Result<(Arc<Self>, TcpListener), PeerError> {
        cfg.validate().map_err(PeerError::Config)?;
        let listener = TcpListener::bind(cfg.listen).await?;
        let listen_addr = listener.local_addr()?;
        let trace = match &cfg.cell_trace {
            Some(p) => Some(Arc::new(Trace(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            ))))),
            None => None,
        };
        let cfg_budget = cfg.max_queued_cells;
        let identity = Arc::new(identity);
        let tracker = Arc::new(TrackerClient::new(cfg.tracker, tracker_key.clone(), identity.clone()));
        let node = Arc::new(Node {
            cfg,
            identity,
            tracker_key,
            listen_addr,
            service,
            stats: Stats::default(),
            trace,
            neighbors: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            dialing: Mutex::new(Default::default()),
            link_change: Notify::new(),
            table_change: Notify::new(),
            replay: Mutex::new(ReplayCache { seen: HashMap::new(), cap: 1_000_000 }),
            circuits: Arc::new(AtomicUsize::new(0)),
            reannounce: Notify::new(),
            announced: Notify::new(),
            last_reannounce: Mutex::new(None),
            conns: Mutex::new(ConnTable::default()),
            budget: Budget::new(cfg_budget),
            tracker,
        });
        Ok((node, listener))
    }

    /// Starts the accept loop, the announce loop and (if configured) the stats log.
    pub fn start(self: &Arc<Self>, listener: TcpListener) {
        tokio::spawn(self.clone().accept_loop(listener));
        tokio::spawn(self.clone().announce_loop());
        if !self.cfg.stats_interval.is_zero() {
            tokio::spawn(self.clone().stats_loop());
        }
    }

    async fn stats_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.stats_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let g = self.gauges();
            info!(
                links = g.links,
                circuits = g.circuits,
                queued_cells = g.queued_cells,
                max_link_queue = g.max_link_queue,
                conns = g.conns,
                relayed_cells = self.stats.cells_relayed.load(Ordering::Relaxed),
                relay_opened = self.stats.relay_opened.load(Ordering::Relaxed),
                target_opened = self.stats.target_opened.load(Ordering::Relaxed),
                denied = self.stats.denied.load(Ordering::Relaxed),
                "stats"
            );
        }
    }

    /// Current gauges (what the `stats` log line shows).
    pub fn gauges(&self) -> Gauges {
        let links: Vec<Arc<Link>> = self.links.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let per_link: Vec<usize> = links.iter().map(|l| l.writer.total_queued() + l.writer.control_queued()).collect();
        Gauges {
            links: links.len(),
            circuits: self.circuit_count(),
            queued_cells: self.budget.used(),
            max_link_queue: per_link.into_iter().max().unwrap_or(0),
            conns: self.conns.lock().unwrap_or_else(|e| e.into_inner()).total,
        }
    }

    /// Takes a slot of the incoming-connection limits for `ip`, or says which limit is reached.
    fn take_conn_slot(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, &'static str> {
        let mut t = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if t.total >= self.cfg.max_conns {
            return Err("too many connections (--max-conns)");
        }
        let n = t.per_ip.entry(ip).or_insert(0);
        if *n >= self.cfg.max_conns_per_ip {
            return Err("too many connections from this address (--max-conns-per-ip)");
        }
        *n += 1;
        t.total += 1;
        Ok(ConnSlot { node: self.clone(), ip })
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let probes = Arc::new(tokio::sync::Semaphore::new(4));
        loop {
            let (s, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match self.take_conn_slot(remote.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    warn!(%remote, "connection refused: {why}");
                    drop(s);
                    continue;
                }
            };
            let node = self.clone();
            let probes = probes.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = node.serve_connection(s, remote, probes).await {
                    info!(%remote, "connection dropped: {e}");
                }
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        mut s: TcpStream,
        remote: SocketAddr,
        probes: Arc<tokio::sync::Semaphore>,
    ) -> Result<(), PeerError> {
        let _ = s.set_nodelay(true);
        // Everything before a link is up (magic, handshake) or a probe is answered shares one deadline, so a
        // slow or silent connection (slowloris) holds its slot only that long.
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        let mut magic = [0u8; 8];
        tokio::time::timeout_at(deadline, s.read_exact(&mut magic))
            .await
            .map_err(|_| PeerError::Timeout("the first bytes (handshake too slow)"))??;
        if magic == LINK_MAGIC {
            link::accept(self, s, remote, deadline).await
        } else if magic == PROBE_MAGIC {
            // Each probe costs us an RSA signature: serve at most a few at once.
            let _permit = probes.try_acquire().map_err(|_| PeerError::Config("too many probes at once".into()))?;
            let mut body = [0u8; 34];
            tokio::time::timeout_at(deadline, s.read_exact(&mut body))
                .await
                .map_err(|_| PeerError::Timeout("probe (too slow)"))??;
            let nonce = plink::decode_probe_body(&body)?;
            let me = self.identity.clone();
            let answer = tokio::task::spawn_blocking(move || plink::answer_probe(&me, &nonce, &mut rand::rngs::OsRng))
                .await
                .map_err(|e| PeerError::Config(e.to_string()))?;
            tokio::time::timeout(self.cfg.handshake_timeout, s.write_all(&answer))
                .await
                .map_err(|_| PeerError::Timeout("the prober to read the answer"))??;
            debug!(%remote, "answered reachability probe");
            Ok(())
        } else {
            Err(PeerError::Proto(anomos_proto::ProtoError::BadMagic(magic)))
        }
    }

    /// Our fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    // ---- announce loop and neighbors ----

    async fn announce_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.announce_once().await {
                Ok(interval) => {
                    backoff = Duration::from_millis(500);
                    self.announced.notify_waiters();
                    interval
                }
                Err(e) => {
                    warn!("announce failed (retrying in {:.1}s): {e}", backoff.as_secs_f64());
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.reannounce.notified() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn announce_once(self: &Arc<Self>) -> Result<Duration, PeerError> {
        let listen = self.cfg.advertise.unwrap_or(self.listen_addr);
        let reply = self.tracker.request(&ToTracker::Announce(Announce { listen, chains: self.cfg.serve.clone() })).await?;
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
        *self.neighbors.lock().unwrap_or_else(|e| e.into_inner()) = table;
        self.table_change.notify_waiters();
        debug!(neighbors = count, "announced");
        self.retire_stale_links();
        self.reconcile_links();
        Ok(Duration::from_secs(a.interval_secs.clamp(1, 3600) as u64))
    }

    /// Asks the announce loop to refresh now (rate-limited to once per 5 s).
    pub fn request_reannounce(&self) {
        // Anyone can trigger this by claiming an unknown fingerprint, and every announce costs the tracker RSA
        // work: at most one early announce per 5 s (the regular interval still applies).
        let mut last = self.last_reannounce.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            *last = Some(Instant::now());
            self.reannounce.notify_one();
        }
    }

    /// Waits for the next successful announce.
    pub async fn wait_announced(&self) {
        self.announced.notified().await
    }

    /// The key and edge of a current neighbor.
    pub fn neighbor_by_fp(&self, fp: &Fingerprint) -> Option<(PublicKey, NeighborId)> {
        self.neighbors.lock().unwrap_or_else(|e| e.into_inner()).get(fp).map(|n| (n.key.clone(), n.nid))
    }

    /// Number of current neighbors (per the tracker).
    pub fn neighbor_count(&self) -> usize {
        self.neighbors.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Closes links over edges that are no longer in our neighbor table (the tracker dropped or renumbered
    /// the edge, e.g. after it restarted) once they carry no circuits. Circuits on them finish undisturbed;
    /// new circuits never use them (TCs name current edges).
    fn retire_stale_links(&self) {
        let current: std::collections::HashSet<NeighborId> =
            self.neighbors.lock().unwrap_or_else(|e| e.into_inner()).values().map(|n| n.nid).collect();
        let links: Vec<Arc<Link>> = self.links.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for l in links.into_iter().filter(|l| !current.contains(&l.nid) && l.circuits() == 0) {
            info!(peer = %l.peer.short(), "retiring a link whose edge the tracker no longer lists");
            l.close("edge no longer current");
        }
    }

    /// Dials the neighbors we are responsible for: exactly one link per pair, dialed by the side with the
    /// smaller fingerprint.
    fn reconcile_links(self: &Arc<Self>) {
        let me = self.fingerprint();
        let neighbors: Vec<(Fingerprint, NeighborEntry)> =
            self.neighbors.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, v.clone())).collect();
        for (fp, n) in neighbors {
            if fp <= me || self.link(n.nid).is_some() {
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
            let current = self.neighbors.lock().unwrap_or_else(|e| e.into_inner()).get(&fp).map(|e| (e.nid, e.addr));
            match current {
                Some((nid, now)) if nid == n.nid => {
                    if now != addr {
                        debug!(peer = %fp.short(), "neighbor moved; dialing its new address");
                        addr = now;
                        backoff = Duration::from_millis(250);
                    }
                }
                _ => return,
            }
            match link::dial(self.clone(), n.nid, addr, n.key.clone()).await {
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
                            self.report(FailureReport {
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
                let changed = self.table_change.notified();
                let moved =
                    self.neighbors.lock().unwrap_or_else(|e| e.into_inner()).get(&fp).is_none_or(|e| e.addr != addr);
                if moved || tokio::time::timeout_at(deadline, changed).await.is_err() {
                    break;
                }
            }
        }
    }

    // ---- links ----

    pub(crate) fn install_link(&self, link: Arc<Link>) {
        let old = self.links.lock().unwrap_or_else(|e| e.into_inner()).insert(link.nid, link);
        if let Some(old) = old {
            // A neighbor that restarted dials again; the new link replaces the old one.
            old.close("replaced by a newer link to the same neighbor");
        }
        self.link_change.notify_waiters();
    }

    pub(crate) fn link_down(self: &Arc<Self>, link: &Arc<Link>) {
        {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            if links.get(&link.nid).is_some_and(|l| Arc::ptr_eq(l, link)) {
                links.remove(&link.nid);
            }
        }
        // Every circuit on the link breaks, in both directions.
        let routes: Vec<(u32, Route)> = link.routes_lock().drain().collect();
        for (_, route) in routes {
            match route {
                Route::Relay(rc, _) => {
                    debug!(circ = rc.in_id, reason = %BreakReason::LinkFailed, "relayed circuit broken: a link failed");
                    self.teardown_relay(&rc, BreakReason::LinkFailed, Some(rc.tag), None)
                }
                Route::Endpoint(ep) => {
                    info!(circ = ep.circ_id, role = ?ep.role, reason = %BreakReason::LinkFailed, "circuit broken: its link failed");
                    ep.closed(BreakReason::LinkFailed);
                    if ep.role == anomos_proto::circuit::Role::Requester {
                        self.report_broken(&ep, BreakReason::LinkFailed, None);
                    }
                }
                Route::Opening(_) => {}
            }
        }
        self.link_change.notify_waiters();
        // If the neighbor does not come back soon, tell the tracker (whichever side dialed), so new paths
        // avoid it until it announces again.
        let node = self.clone();
        let nid = link.nid;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let still_neighbor =
                node.neighbors.lock().unwrap_or_else(|e| e.into_inner()).values().any(|n| n.nid == nid);
            if still_neighbor && node.link(nid).is_none() {
                info!(neighbor = ?nid, "neighbor did not come back; reporting it");
                node.report(FailureReport {
                    kind: FailureKind::NeighborUnreachable,
                    neighbor: Some(nid),
                    circuit: None,
                    hop_tag: None,
                });
            }
        });
    }

    /// DATA and control cells queued on all links (what this peer is buffering).
    pub fn queued_cells(&self) -> usize {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).values().map(|l| l.writer.total_queued()).sum()
    }

    /// The live link over an edge.
    pub fn link(&self, nid: NeighborId) -> Option<Arc<Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).get(&nid).cloned()
    }

    /// Number of live links.
    pub fn link_count(&self) -> usize {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits up to `max` for the link over `nid` to be up.
    pub async fn wait_link(&self, nid: NeighborId, max: Duration) -> Option<Arc<Link>> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let notified = self.link_change.notified();
            if let Some(l) = self.link(nid) {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.link(nid);
            }
        }
    }

    // ---- circuits ----

    /// Reserves a circuit slot, or `None` at the limit.
    pub fn try_circuit(&self) -> Option<CircuitGuard> {
        let prev = self.circuits.fetch_add(1, Ordering::Relaxed);
        let guard = CircuitGuard(self.circuits.clone());
        (prev < self.cfg.max_circuits).then_some(guard)
    }

    /// Circuits alive here (relayed and endpoints).
    pub fn circuit_count(&self) -> usize {
        self.circuits.load(Ordering::Relaxed)
    }

    /// Records a replay tag; false if it was seen before (or the cache is full of unexpired tags).
    pub(crate) fn replay_check(&self, tag: [u8; 16], expires: u64) -> bool {
        let mut rc = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        let horizon = expires + self.cfg.clock_skew.as_secs();
        if rc.seen.contains_key(&tag) {
            return false;
        }
        if rc.seen.len() >= rc.cap {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            rc.seen.retain(|_, exp| *exp >= now);
            if rc.seen.len() >= rc.cap {
                return false;
            }
        }
        rc.seen.insert(tag, horizon);
        true
    }

    /// Asks the tracker for circuits and opens them; returns those that opened.
    pub async fn request_circuits(self: &Arc<Self>, req: CircuitRequest) -> Result<Vec<CircuitStream>, PeerError> {
        let grants = self.request_grants(req).await?;
        let opens = grants.iter().map(|g| self.open_circuit(g));
        let results = futures_join_all(opens).await;
        let mut out = Vec::new();
        for r in results {
            match r {
                Ok(s) => out.push(s),
                Err(e) => warn!("circuit did not open: {e}"),
            }
        }
        Ok(out)
    }

    /// Asks the tracker for circuit grants.
    pub async fn request_grants(&self, req: CircuitRequest) -> Result<Vec<CircuitGrant>, PeerError> {
        match self.tracker.request(&ToTracker::RequestCircuits(req)).await? {
            FromTracker::Circuits(c) => Ok(c.circuits),
            other => Err(PeerError::Tracker(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sends a failure report in the background.
    pub fn report(&self, report: FailureReport) {
        let tracker = self.tracker.clone();
        tokio::spawn(async move {
            if let Err(e) = tracker.request(&ToTracker::Report(report)).await {
                debug!("failure report not delivered: {e}");
            }
        });
    }

    pub(crate) fn report_denied(&self, ep: &Endpoint, reason: DenyReason, tag: Option<[u8; 16]>) {
        warn!(circ = ep.circ_id, %reason, "circuit denied");
        self.report(FailureReport {
            kind: FailureKind::CircuitDenied(reason.code()),
            neighbor: None,
            circuit: ep.grant.get().copied(),
            hop_tag: tag,
        });
    }

    pub(crate) fn report_broken(&self, ep: &Endpoint, reason: BreakReason, tag: Option<[u8; 16]>) {
        self.report(FailureReport {
            kind: FailureKind::CircuitBroken(reason.code()),
            neighbor: None,
            circuit: ep.grant.get().copied(),
            hop_tag: tag,
        });
    }
}

/// Runs futures concurrently on the current task and collects their outputs in order (what
/// `futures::join_all` does, without the dependency).
pub async fn futures_join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}
