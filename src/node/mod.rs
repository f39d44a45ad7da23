//! The peer node: wires the layers together and runs the node's own tasks.
//!
//! * `listener.rs`: the one listening port (connection limits, link handshakes, probes);
//! * `neighbors.rs`: the announce loop and which neighbors get dialed;
//! * `dial.rs`: the dial loops (backoff, unreachable neighbors) and knocks on new edges;
//! * `registry.rs`: the neighbor table, the live links ([`crate::circuit::LinkDirectory`]) and the
//!   [`crate::link::LinkHost`] links report to;
//! * `status.rs`: what the node shows of itself.
//!
//! The circuit layer ([`Router`]) gets only the handles it needs; the node keeps the tracker session (announces,
//! circuit requests, and the task that delivers the router's failure reports), the replay cache's file, and the
//! shutdown sequence.

mod dial;
mod listener;
mod neighbors;
mod registry;
pub mod status;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_net::{Listener, Net};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::tracker::{CircuitGrant, CircuitRequest, FailureReport, FromTracker, ToTracker};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::circuit::replay::ReplayCache;
pub use crate::circuit::replay::{write_atomic, REPLAY_CAP, REPLAY_FILE};
pub use crate::circuit::Service;
use crate::circuit::{CircuitConfig, CircuitStream, LinkDirectory, Reporter, Router, RouterParts, Trace};
use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::link::budget::Pool;
use crate::link::{Link, LinkSettings};
pub use crate::stats::{unix_now, Stats};
use crate::tracker_client::TrackerClient;
pub use dial::{dial_backoff, Unreachable};
use listener::ConnTable;
use registry::{Host, Links, Neighbors};
pub use status::{
    ChainInfo, CircuitsByRole, Gauges, LinkInfo, ShutdownSummary, SyncGauges, TrackerState, UpstreamHealth,
    UpstreamInfo,
};

/// How often the replay cache is written (if it changed). A crash loses at most the tags seen since.
pub const REPLAY_SAVE_EVERY: Duration = Duration::from_secs(15);
/// Failure reports queued for the tracker at most (more are dropped: they are advisory).
const REPORT_QUEUE: usize = 256;

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
    /// Counters.
    pub stats: Arc<Stats>,
    /// The node-wide pool of queued DATA cells, shared fairly by the neighbors.
    pub budget: Arc<Pool>,
    control_cells: Arc<Pool>,
    router: Arc<Router>,
    links: Arc<Links>,
    host: Arc<Host>,
    neighbors: Arc<Neighbors>,
    link_settings: LinkSettings,
    reporter: Reporter,
    reports: Mutex<Option<mpsc::Receiver<FailureReport>>>,
    /// Our session with the tracker (announces, circuit requests, reports).
    tracker: Arc<TrackerClient>,
    /// Our version-2 tracker sessions' probe keys (the tracker client installs, the listener answers).
    probe_keys: Arc<crate::probe_keys::ProbeKeys>,
    announced: Notify,
    dialing: Mutex<HashSet<NeighborId>>,
    dial_troubles: dial::DialTroubles,
    conns: Mutex<ConnTable>,
    tracker_state: Mutex<TrackerState>,
    chain: Mutex<Option<ChainInfo>>,
    upstream: Mutex<Option<UpstreamInfo>>,
    /// Progress of a running sync.
    pub sync: SyncGauges,
    /// When the node was built.
    pub started: Instant,
    /// Unix time the node was built.
    pub started_unix: u64,
    /// The control socket, once it is listening (removed on shutdown).
    control_path: Mutex<Option<PathBuf>>,
}

impl Node {
    /// Binds the listening port (TCP) and builds the node (nothing runs until [`Node::start`]).
    pub async fn bind(
        cfg: PeerConfig,
        identity: Identity,
        tracker_key: PublicKey,
        service: Option<Arc<dyn Service>>,
    ) -> Result<(Arc<Self>, Box<dyn Listener>), PeerError> {
        Self::bind_on(anomos_net::tcp(), cfg, identity, tracker_key, service).await
    }

    /// [`Node::bind`] over the transport `net` (a simulated network in `tests/simulation.rs`). The node dials
    /// neighbors and the tracker and listens through it.
    pub async fn bind_on(
        net: Net,
        cfg: PeerConfig,
        identity: Identity,
        tracker_key: PublicKey,
        service: Option<Arc<dyn Service>>,
    ) -> Result<(Arc<Self>, Box<dyn Listener>), PeerError> {
        cfg.validate().map_err(PeerError::Config)?;
        let listener = net.bind(cfg.listen).await?;
        let listen_addr = listener.local_addr()?;
        let trace = match &cfg.cell_trace {
            Some(p) => Some(Arc::new(Trace::open(p)?)),
            None => None,
        };
        let identity = Arc::new(identity);
        let stats = Arc::new(Stats::default());
        let budget = Pool::new("queued cells", cfg.max_queued_cells);
        let control_cells = Pool::new("queued control cells", usize::MAX);
        let neighbors = Arc::new(Neighbors::default());
        let links = Links::new(neighbors.clone(), identity.fingerprint());
        let (reporter, reports) = Reporter::channel(REPORT_QUEUE);
        let clock = net.clock();
        let replay = ReplayCache::load(&cfg.data_dir.join(REPLAY_FILE), clock.unix_now(), REPLAY_CAP);
        let router = Router::new(RouterParts {
            cfg: CircuitConfig {
                window: cfg.circuit_window,
                max_window: cfg.circuit_window_max.max(cfg.circuit_window),
                sendme_batch: cfg.sendme_batch(),
                open_timeout: cfg.open_timeout,
                clock_skew: cfg.clock_skew,
                open_rate: cfg.open_rate,
                open_burst: cfg.open_burst,
                serve: cfg.serve.clone(),
                link_wait: Duration::from_secs(3),
                origin_link_wait: Duration::from_secs(5),
            },
            identity: identity.clone(),
            clock,
            links: links.clone(),
            reporter: reporter.clone(),
            service,
            stats: stats.clone(),
            trace,
            slots: Pool::new("circuit slots", cfg.max_circuits),
            cells: budget.clone(),
            replay,
        });
        let host = Arc::new(Host {
            links: links.clone(),
            neighbors: neighbors.clone(),
            router: router.clone(),
            stats: stats.clone(),
            reporter: reporter.clone(),
            max_links: cfg.max_links,
        });
        let link_settings = LinkSettings {
            identity: identity.clone(),
            queue_cap: cfg.link_queue_cap,
            window: cfg.circuit_window,
            max_window: cfg.circuit_window_max.max(cfg.circuit_window),
            keepalive: cfg.keepalive,
            idle_timeout: cfg.link_idle_timeout,
            cells: budget.clone(),
            control: control_cells.clone(),
            net: net.clone(),
        };
        let probe_keys = Arc::new(crate::probe_keys::ProbeKeys::default());
        let tracker = Arc::new(
            TrackerClient::with_addrs(net, cfg.tracker_addrs(), tracker_key.clone(), identity.clone())
                .with_probe_keys(probe_keys.clone()),
        );
        let node = Arc::new(Node {
            cfg,
            identity,
            tracker_key,
            listen_addr,
            stats,
            budget,
            control_cells,
            router,
            links,
            host,
            neighbors,
            link_settings,
            reporter,
            reports: Mutex::new(Some(reports)),
            tracker,
            probe_keys,
            announced: Notify::new(),
            dialing: Mutex::new(HashSet::new()),
            dial_troubles: dial::DialTroubles::default(),
            conns: Mutex::new(ConnTable::default()),
            tracker_state: Mutex::new(TrackerState::default()),
            chain: Mutex::new(None),
            upstream: Mutex::new(None),
            sync: SyncGauges::default(),
            started: Instant::now(),
            started_unix: unix_now(),
            control_path: Mutex::new(None),
        });
        Ok((node, listener))
    }

    /// Starts the accept loop, the announce loop, the report task and (if configured) the stats log.
    pub fn start(self: &Arc<Self>, listener: Box<dyn Listener>) {
        tokio::spawn(self.clone().accept_loop(listener));
        tokio::spawn(self.clone().announce_loop());
        if !self.cfg.stats_interval.is_zero() {
            tokio::spawn(self.clone().stats_loop());
        }
        tokio::spawn(self.clone().replay_save_loop());
        if let Some(mut rx) = self.reports.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let tracker = self.tracker.clone();
            // One report at a time, from a bounded queue: a burst of failures costs the tracker session no more.
            tokio::spawn(async move {
                while let Some(r) = rx.recv().await {
                    if let Err(e) = tracker.request(&ToTracker::Report(r)).await {
                        debug!("failure report not delivered: {e}");
                    }
                }
            });
        }
    }

    async fn replay_save_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REPLAY_SAVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if self.is_shutting_down() {
                return;
            }
            let node = self.clone();
            let _ = anomos_net::rt::spawn_blocking(move || node.save_replay(false)).await;
        }
    }

    /// Where the replay cache is persisted.
    pub fn replay_path(&self) -> PathBuf {
        self.cfg.data_dir.join(REPLAY_FILE)
    }

    /// Writes the replay cache if it changed since the last write (or always, with `force`). Returns the
    /// number of tags written, or `None` if nothing was written.
    pub fn save_replay(&self, force: bool) -> Option<usize> {
        self.router.save_replay(&self.replay_path(), force)
    }

    /// Replay tags remembered now.
    pub fn replay_len(&self) -> usize {
        self.router.replay_len()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.router.is_shutting_down()
    }

    /// Records the control socket's path (removed on shutdown).
    pub fn set_control_path(&self, path: PathBuf) {
        *self.control_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// Tells `status` and metrics which chain this node serves or fetches.
    pub fn set_chain(&self, info: ChainInfo) {
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// Tells `status` that this node serves a chain from an upstream node (`--upstream`).
    pub fn set_upstream(&self, info: UpstreamInfo) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// The upstream node serving our chain, if any.
    pub fn upstream_info(&self) -> Option<UpstreamInfo> {
        self.upstream.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The chain served or fetched here.
    pub fn chain_info(&self) -> Option<ChainInfo> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The tracker's reachability probes this node answered: (version 1, version 2).
    pub fn probes_answered(&self) -> (u64, u64) {
        let [v1, v2] = &self.stats.probes_answered;
        (v1.load(Ordering::Relaxed), v2.load(Ordering::Relaxed))
    }

    /// The last announce's outcome.
    pub fn tracker_state(&self) -> TrackerState {
        self.tracker_state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every live link, with its age and queue.
    pub fn link_infos(&self) -> Vec<LinkInfo> {
        let mut out: Vec<LinkInfo> = self
            .links
            .all()
            .iter()
            .map(|l| LinkInfo {
                peer: l.peer.short(),
                direction: if l.dialer { "out" } else { "in" },
                age: l.since.elapsed(),
                queued_cells: l.writer.total_queued() + l.writer.control_queued(),
                circuits: self.router.circuits_on(l),
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Neighbors we dial and cannot reach (past a few failed dials), for `status`.
    pub fn unreachable_neighbors(&self) -> Vec<Unreachable> {
        self.dial_troubles.all()
    }

    /// Circuits alive here, by role (a relayed circuit is counted once, on its in-link).
    pub fn circuits_by_role(&self) -> CircuitsByRole {
        self.router.by_role()
    }

    /// Graceful shutdown: refuses new circuits, breaks every circuit with BREAK(shutdown) (relayed ones in
    /// both directions), gives the BREAKs up to `flush` to leave, closes the links, persists the replay cache
    /// and removes the control socket. Returns what was torn down. (The chain store is the caller's.)
    pub async fn shutdown(self: &Arc<Self>, flush: Duration) -> ShutdownSummary {
        let circuits = self.router.shutdown();
        let links = self.links.all();
        // Let the BREAKs (control cells jump the queues) reach the neighbors before the sockets close.
        let deadline = tokio::time::Instant::now() + flush;
        while tokio::time::Instant::now() < deadline
            && links.iter().any(|l| l.writer.control_queued() > 0 && !l.writer.is_closed())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50).min(flush)).await;
        for l in &links {
            l.close("shutting down");
        }
        let node = self.clone();
        let replay_tags =
            anomos_net::rt::spawn_blocking(move || node.save_replay(true)).await.ok().flatten().unwrap_or(0);
        if let Some(p) = self.control_path.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = std::fs::remove_file(p);
        }
        ShutdownSummary { circuits, links: links.len(), replay_tags }
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
        let links = self.links.all();
        let per_link = links.iter().map(|l| l.writer.total_queued() + l.writer.control_queued());
        Gauges {
            links: links.len(),
            circuits: self.circuit_count(),
            queued_cells: self.budget.used() + self.control_cells.used(),
            max_link_queue: per_link.max().unwrap_or(0),
            conns: self.conns.lock().unwrap_or_else(|e| e.into_inner()).total,
        }
    }

    /// DATA and control cells queued on all links (what this peer is buffering).
    pub fn queued_cells(&self) -> usize {
        self.budget.used() + self.control_cells.used()
    }

    /// Our fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Asks the announce loop to refresh soon (early announces are at least 2 s apart).
    pub fn request_reannounce(&self) {
        self.neighbors.request_reannounce();
    }

    /// Waits for the next successful announce.
    pub async fn wait_announced(&self) {
        self.announced.notified().await
    }

    /// The key and edge of a current neighbor.
    pub fn neighbor_by_fp(&self, fp: &Fingerprint) -> Option<(PublicKey, NeighborId)> {
        self.neighbors.get(fp).map(|n| (n.key, n.nid))
    }

    /// Number of current neighbors (per the tracker).
    pub fn neighbor_count(&self) -> usize {
        self.neighbors.len()
    }

    /// The live link over an edge.
    pub fn link(&self, nid: NeighborId) -> Option<Arc<Link>> {
        self.links.link(nid)
    }

    /// Number of live links.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Records the channel version the tracker at `addr` offered in the start-up key fetch (its first session then
    /// asks no second time).
    pub async fn tracker_offers(&self, addr: std::net::SocketAddr, version: u16) {
        self.tracker.offered(addr, version).await;
    }

    /// Number of edges of the current neighbor table with a link up.
    pub fn edges_up(&self) -> usize {
        self.links.edges_up()
    }

    /// Waits until a link comes up or goes down, or `max` passed.
    pub async fn wait_link_change(&self, max: Duration) {
        self.links.wait_change(max).await
    }

    /// Waits up to `max` for the link over `nid` to be up.
    pub async fn wait_link(&self, nid: NeighborId, max: Duration) -> Option<Arc<Link>> {
        self.links.wait_link(nid, max).await
    }

    /// Circuits alive here (relayed and endpoints).
    pub fn circuit_count(&self) -> usize {
        self.router.circuit_count()
    }

    /// Asks the tracker for circuits and opens them; returns those that opened.
    pub async fn request_circuits(self: &Arc<Self>, req: CircuitRequest) -> Result<Vec<CircuitStream>, PeerError> {
        let grants = self.request_grants(req).await?;
        let results = futures_join_all(grants.iter().map(|g| self.open_circuit(g))).await;
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
            FromTracker::Circuits(c) => {
                self.stats.circuits_granted.fetch_add(c.circuits.len() as u64, Ordering::Relaxed);
                Ok(c.circuits)
            }
            other => Err(PeerError::Tracker(format!("unexpected reply {other:?}"))),
        }
    }

    /// Opens the circuit a tracker grant describes (requester side) and returns its stream once the
    /// end-to-end session is up.
    pub async fn open_circuit(&self, grant: &CircuitGrant) -> Result<CircuitStream, PeerError> {
        self.router.open_circuit(grant).await
    }

    /// Queues a failure report for the tracker.
    pub fn report(&self, report: FailureReport) {
        self.reporter.report(report);
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
