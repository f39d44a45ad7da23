//! The peer node: its one listening port, its place in the overlay (announce loop, neighbor links), and the
//! state every circuit shares (links, replay cache, circuit count, statistics).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anomos_proto::cell::{BreakReason, DenyReason};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{self as plink, LINK_MAGIC, PROBE_MAGIC};
use anomos_proto::tracker::{
    Announce, CircuitGrant, CircuitRequest, FailureKind, FailureReport, FromTracker, ToTracker,
};
use anomos_tracker::metrics::LabeledCounter;
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

/// Counters (monotonic), incremented where each event happens; `--metrics` exposes them.
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
    /// OPENs denied (by this hop).
    pub denied: AtomicU64,
    /// OPENs this hop denied, by reason.
    pub denies_sent: LabeledCounter,
    /// DENYs our own circuits received, by reason.
    pub denies_received: LabeledCounter,
    /// Circuits broken that this node saw or caused (link failures, breaks reported to us as requester,
    /// shutdown), by reason.
    pub breaks: LabeledCounter,
    /// Circuits granted to us by the tracker (origin side).
    pub circuits_granted: AtomicU64,
    /// Links that came up.
    pub links_opened: AtomicU64,
    /// Links that went down.
    pub links_closed: AtomicU64,
    /// Successful announces.
    pub announces_ok: AtomicU64,
    /// Failed announces.
    pub announces_failed: AtomicU64,
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
    pub(crate) fn denied(&self, r: DenyReason) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        self.denies_sent.inc(r.as_str());
    }
    /// A circuit broke (counted by reason).
    pub(crate) fn broken(&self, r: BreakReason) {
        self.breaks.inc(r.as_str());
    }
}

/// The chain a node serves or fetches, for `status` and metrics.
#[derive(Clone)]
pub struct ChainInfo {
    /// The chain's name.
    pub name: String,
    /// `serving` or `fetching`.
    pub role: &'static str,
    /// The store.
    pub store: crate::chain::SharedStore,
}

/// Progress of a running sync (set by `fetch`), for `status` and metrics.
#[derive(Default)]
pub struct SyncGauges {
    /// 0 idle, 1 headers, 2 blocks, 3 synced.
    pub phase: std::sync::atomic::AtomicU8,
    /// Best header height.
    pub header_height: AtomicU64,
    /// Blocks stored by this sync.
    pub blocks_done: AtomicU64,
    /// Blocks this sync has to fetch (done + missing).
    pub blocks_total: AtomicU64,
}

impl SyncGauges {
    /// The phase's name.
    pub fn phase_name(&self) -> &'static str {
        match self.phase.load(Ordering::Relaxed) {
            1 => "headers",
            2 => "blocks",
            3 => "synced",
            _ => "idle",
        }
    }
}

/// One live link, as `status` shows it.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// The neighbor's fingerprint (short form).
    pub peer: String,
    /// `out` if we dialed, `in` if it did.
    pub direction: &'static str,
    /// How long the link has been up.
    pub age: Duration,
    /// Cells queued toward the neighbor (DATA and control).
    pub queued_cells: usize,
    /// Circuits on the link.
    pub circuits: usize,
}

/// Circuits alive here, by role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CircuitsByRole {
    /// Relayed through us.
    pub relay: usize,
    /// Opened by us (we are the requester).
    pub origin: usize,
    /// Ending at us (we are the target).
    pub target: usize,
    /// OPENs being peeled.
    pub opening: usize,
}

/// What the tracker session looks like.
#[derive(Debug, Clone, Default)]
pub struct TrackerState {
    /// Unix time of the last successful announce.
    pub last_ok_unix: Option<u64>,
    /// The last announce error (cleared by a success).
    pub last_error: Option<String>,
}

/// What [`Node::shutdown`] tore down.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShutdownSummary {
    /// Circuits broken with BREAK(shutdown).
    pub circuits: usize,
    /// Links closed.
    pub links: usize,
    /// Replay tags persisted.
    pub replay_tags: usize,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

/// Replay tags seen, with their expiry (Unix seconds, clock skew included); bounded.
pub(crate) struct ReplayCache {
    seen: HashMap<[u8; 16], u64>,
    cap: usize,
    /// Bumped on every insert; compared with `saved` to skip writing an unchanged cache.
    version: u64,
    saved: u64,
}

/// File name of the persisted replay cache in the data directory.
pub const REPLAY_FILE: &str = "replay-cache.bin";
/// How often the replay cache is written (if it changed). A crash loses at most the tags seen since.
pub const REPLAY_SAVE_EVERY: Duration = Duration::from_secs(15);
/// Most replay tags remembered (and persisted: 24 bytes each).
pub const REPLAY_CAP: usize = 1_000_000;
const REPLAY_MAGIC: &[u8; 8] = b"ANRPLY01";

/// FNV-1a 64, to detect a damaged file (not a security measure: the file is ours, mode 0600).
fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl ReplayCache {
    pub(crate) fn new(cap: usize) -> Self {
        ReplayCache { seen: HashMap::new(), cap, version: 0, saved: 0 }
    }

    /// Records `tag` (until `horizon`); false if seen before or full of unexpired tags.
    pub(crate) fn check(&mut self, tag: [u8; 16], horizon: u64, now: u64) -> bool {
        if self.seen.contains_key(&tag) {
            return false;
        }
        if self.seen.len() >= self.cap {
            self.seen.retain(|_, exp| *exp >= now);
            if self.seen.len() >= self.cap {
                return false;
            }
        }
        self.seen.insert(tag, horizon);
        self.version += 1;
        true
    }

    /// Number of tags held.
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }

    /// The file image of the unexpired tags: magic, count (u32 BE), count × (tag, expiry u64 BE), FNV-1a 64.
    pub(crate) fn encode(&self, now: u64) -> Vec<u8> {
        let live: Vec<_> = self.seen.iter().filter(|(_, &e)| e >= now).collect();
        let mut out = Vec::with_capacity(8 + 4 + live.len() * 24 + 8);
        out.extend_from_slice(REPLAY_MAGIC);
        out.extend_from_slice(&(live.len() as u32).to_be_bytes());
        for (tag, exp) in live {
            out.extend_from_slice(tag);
            out.extend_from_slice(&exp.to_be_bytes());
        }
        let sum = fnv64(&out);
        out.extend_from_slice(&sum.to_be_bytes());
        out
    }

    /// Parses a file image, dropping tags expired at `now`; an error names what is wrong.
    pub(crate) fn decode(data: &[u8], now: u64, cap: usize) -> Result<ReplayCache, String> {
        if data.len() < 20 || &data[..8] != REPLAY_MAGIC {
            return Err("not a replay cache file".into());
        }
        let (body, sum) = data.split_at(data.len() - 8);
        if fnv64(body) != u64::from_be_bytes(sum.try_into().map_err(|_| "short")?) {
            return Err("checksum mismatch".into());
        }
        let count = u32::from_be_bytes(body[8..12].try_into().map_err(|_| "short")?) as usize;
        if count > cap || body.len() != 12 + count * 24 {
            return Err(format!("{count} entries do not fit the file or the limit of {cap}"));
        }
        let mut rc = ReplayCache::new(cap);
        for e in body[12..].chunks_exact(24) {
            let exp = u64::from_be_bytes(e[16..].try_into().map_err(|_| "short")?);
            if exp >= now {
                let mut tag = [0u8; 16];
                tag.copy_from_slice(&e[..16]);
                rc.seen.insert(tag, exp);
            }
        }
        Ok(rc)
    }

    /// Loads `path`: missing → empty; unreadable or damaged → a warning and empty (never fatal).
    pub(crate) fn load(path: &Path, now: u64, cap: usize) -> ReplayCache {
        match std::fs::read(path) {
            Ok(data) => match ReplayCache::decode(&data, now, cap) {
                Ok(rc) => {
                    info!(path = %path.display(), tags = rc.len(), "replay cache loaded");
                    rc
                }
                Err(e) => {
                    warn!(path = %path.display(), "replay cache file ignored ({e}); starting with an empty cache");
                    ReplayCache::new(cap)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReplayCache::new(cap),
            Err(e) => {
                warn!(path = %path.display(), "replay cache not readable ({e}); starting with an empty cache");
                ReplayCache::new(cap)
            }
        }
    }
}

/// Writes `data` to `path` atomically: a temporary file (mode 0600) in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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
    /// When each live link came up.
    link_since: Mutex<HashMap<NeighborId, Instant>>,
    /// The last announce's outcome.
    tracker_state: Mutex<TrackerState>,
    /// The chain served or fetched here, if any.
    chain: Mutex<Option<ChainInfo>>,
    /// Progress of a running sync.
    pub sync: SyncGauges,
    /// When the node was built.
    pub started: Instant,
    /// Unix time the node was built.
    pub started_unix: u64,
    /// Set once shutdown began: no new circuits, no new links.
    shutting_down: AtomicBool,
    /// The control socket, once it is listening (removed on shutdown).
    control_path: Mutex<Option<PathBuf>>,
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
        let replay_path = cfg.data_dir.join(REPLAY_FILE);
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
            replay: Mutex::new(ReplayCache::load(&replay_path, unix_now(), REPLAY_CAP)),
            circuits: Arc::new(AtomicUsize::new(0)),
            reannounce: Notify::new(),
            announced: Notify::new(),
            last_reannounce: Mutex::new(None),
            conns: Mutex::new(ConnTable::default()),
            budget: Budget::new(cfg_budget),
            tracker,
            link_since: Mutex::new(HashMap::new()),
            tracker_state: Mutex::new(TrackerState::default()),
            chain: Mutex::new(None),
            sync: SyncGauges::default(),
            started: Instant::now(),
            started_unix: unix_now(),
            shutting_down: AtomicBool::new(false),
            control_path: Mutex::new(None),
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
        tokio::spawn(self.clone().replay_save_loop());
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
            let _ = tokio::task::spawn_blocking(move || node.save_replay(false)).await;
        }
    }

    /// Where the replay cache is persisted.
    pub fn replay_path(&self) -> PathBuf {
        self.cfg.data_dir.join(REPLAY_FILE)
    }

    /// Writes the replay cache if it changed since the last write (or always, with `force`). Returns the
    /// number of tags written, or `None` if nothing was written.
    pub fn save_replay(&self, force: bool) -> Option<usize> {
        let (data, version, n) = {
            let rc = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            if !force && rc.version == rc.saved {
                return None;
            }
            let data = rc.encode(unix_now());
            let n = (data.len() - 20) / 24;
            (data, rc.version, n)
        };
        match write_atomic(&self.replay_path(), &data) {
            Ok(()) => {
                let mut rc = self.replay.lock().unwrap_or_else(|e| e.into_inner());
                rc.saved = rc.saved.max(version);
                debug!(tags = n, "replay cache saved");
                Some(n)
            }
            Err(e) => {
                warn!(path = %self.replay_path().display(), "replay cache not saved: {e}");
                None
            }
        }
    }

    /// Replay tags remembered now.
    pub fn replay_len(&self) -> usize {
        self.replay.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Records the control socket's path (removed on shutdown).
    pub fn set_control_path(&self, path: PathBuf) {
        *self.control_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// Tells `status` and metrics which chain this node serves or fetches.
    pub fn set_chain(&self, info: ChainInfo) {
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// The chain served or fetched here.
    pub fn chain_info(&self) -> Option<ChainInfo> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last announce's outcome.
    pub fn tracker_state(&self) -> TrackerState {
        self.tracker_state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every live link, with its age and queue.
    pub fn link_infos(&self) -> Vec<LinkInfo> {
        let links: Vec<Arc<Link>> = self.links.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let since = self.link_since.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out: Vec<LinkInfo> = links
            .iter()
            .map(|l| LinkInfo {
                peer: l.peer.short(),
                direction: if l.dialer { "out" } else { "in" },
                age: since.get(&l.nid).map(|t| t.elapsed()).unwrap_or_default(),
                queued_cells: l.writer.total_queued() + l.writer.control_queued(),
                circuits: l.circuits(),
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Circuits alive here, by role (a relayed circuit is counted once, on its in-link).
    pub fn circuits_by_role(&self) -> CircuitsByRole {
        let links: Vec<Arc<Link>> = self.links.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut c = CircuitsByRole::default();
        for l in links {
            for r in l.routes_lock().values() {
                match r {
                    Route::Opening(_) => c.opening += 1,
                    Route::Relay(_, Dir::Fwd) => c.relay += 1,
                    Route::Relay(_, Dir::Bwd) => {}
                    Route::Endpoint(ep) if ep.role == anomos_proto::circuit::Role::Requester => c.origin += 1,
                    Route::Endpoint(_) => c.target += 1,
                }
            }
        }
        c
    }

    /// Graceful shutdown: refuses new circuits, breaks every circuit with BREAK(shutdown) (relayed ones in
    /// both directions), gives the BREAKs up to `flush` to leave, closes the links, persists the replay cache
    /// and removes the control socket. Returns what was torn down. (The chain store is the caller's.)
    pub async fn shutdown(self: &Arc<Self>, flush: Duration) -> ShutdownSummary {
        self.shutting_down.store(true, Ordering::Relaxed);
        let links: Vec<Arc<Link>> = self.links.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut circuits = 0;
        // Snapshot every route first: tearing a relayed circuit down removes its routes on both links.
        let routes: Vec<(Arc<Link>, u32, Route)> = links
            .iter()
            .flat_map(|l| l.routes_lock().iter().map(|(id, r)| (l.clone(), *id, r.clone())).collect::<Vec<_>>())
            .collect();
        for (link, id, route) in routes {
            match route {
                Route::Relay(rc, dir) => {
                    if dir == Dir::Fwd {
                        circuits += 1; // counted in `stats` by `teardown_relay`
                    }
                    self.teardown_relay(&rc, BreakReason::Shutdown, Some(rc.tag), None);
                }
                Route::Endpoint(ep) => {
                    circuits += 1;
                    self.stats.broken(BreakReason::Shutdown);
                    crate::circuit::abort_endpoint(&ep, BreakReason::Shutdown);
                }
                // An OPEN still being peeled: the hop before us waits for CONFIRM; tell it now.
                Route::Opening(_) => {
                    if link.remove_route(id).is_some() {
                        self.send_break(&link, id, BreakReason::Shutdown, None);
                    }
                }
            }
        }
        // Let the BREAKs (control cells jump the queues) reach the neighbors before the sockets close.
        let deadline = Instant::now() + flush;
        while Instant::now() < deadline && links.iter().any(|l| l.writer.control_queued() > 0 && !l.writer.is_closed())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50).min(flush)).await;
        for l in &links {
            l.close("shutting down");
        }
        let node = self.clone();
        let replay_tags = tokio::task::spawn_blocking(move || node.save_replay(true)).await.ok().flatten().unwrap_or(0);
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
                _ = self.reannounce.notified() => {
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
        if self.is_shutting_down() {
            link.close("shutting down");
            return;
        }
        self.stats.links_opened.fetch_add(1, Ordering::Relaxed);
        self.link_since.lock().unwrap_or_else(|e| e.into_inner()).insert(link.nid, Instant::now());
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
                self.link_since.lock().unwrap_or_else(|e| e.into_inner()).remove(&link.nid);
            }
        }
        self.stats.links_closed.fetch_add(1, Ordering::Relaxed);
        // Every circuit on the link breaks, in both directions.
        let routes: Vec<(u32, Route)> = link.routes_lock().drain().collect();
        for (_, route) in routes {
            match route {
                Route::Relay(rc, _) => {
                    debug!(circ = rc.in_id, reason = %BreakReason::LinkFailed, "relayed circuit broken: a link failed");
                    self.teardown_relay(&rc, BreakReason::LinkFailed, Some(rc.tag), None)
                }
                Route::Endpoint(ep) => {
                    self.stats.broken(BreakReason::LinkFailed);
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
            if node.is_shutting_down() {
                return;
            }
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
        if self.is_shutting_down() {
            return None;
        }
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
        let horizon = expires.saturating_add(self.cfg.clock_skew.as_secs());
        self.replay.lock().unwrap_or_else(|e| e.into_inner()).check(tag, horizon, unix_now())
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
            FromTracker::Circuits(c) => {
                self.stats.circuits_granted.fetch_add(c.circuits.len() as u64, Ordering::Relaxed);
                Ok(c.circuits)
            }
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
        self.stats.denies_received.inc(reason.as_str());
        self.report(FailureReport {
            kind: FailureKind::CircuitDenied(reason.code()),
            neighbor: None,
            circuit: ep.grant.get().copied(),
            hop_tag: tag,
        });
    }

    pub(crate) fn report_broken(&self, ep: &Endpoint, reason: BreakReason, tag: Option<[u8; 16]>) {
        // Link failures were counted in `link_down`.
        if reason != BreakReason::LinkFailed {
            self.stats.broken(reason);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u8) -> [u8; 16] {
        [i; 16]
    }

    #[test]
    fn replay_cache_round_trips_and_drops_expired_tags() {
        let mut rc = ReplayCache::new(10);
        assert!(rc.check(tag(1), 1_000, 500));
        assert!(rc.check(tag(2), 2_000, 500));
        assert!(!rc.check(tag(1), 1_000, 500), "a tag is accepted once");
        let image = rc.encode(500);
        let back = ReplayCache::decode(&image, 500, 10).unwrap();
        assert_eq!(back.len(), 2);
        let mut back2 = ReplayCache::decode(&image, 1_500, 10).unwrap();
        assert_eq!(back2.len(), 1, "the tag expired at 1000 is dropped at load");
        assert!(!back2.check(tag(2), 2_000, 1_500), "a loaded tag is still refused");
        assert!(back2.check(tag(1), 3_000, 1_500), "an expired tag is forgotten");
    }

    #[test]
    fn damaged_or_oversized_files_are_refused() {
        let mut rc = ReplayCache::new(10);
        for i in 0..5 {
            rc.check(tag(i), 10_000, 0);
        }
        let image = rc.encode(0);
        let mut flipped = image.clone();
        flipped[20] ^= 1;
        assert!(ReplayCache::decode(&flipped, 0, 10).is_err(), "checksum");
        assert!(ReplayCache::decode(&image[..image.len() - 1], 0, 10).is_err(), "truncated");
        assert!(ReplayCache::decode(b"garbage", 0, 10).is_err());
        assert!(ReplayCache::decode(&image, 0, 4).is_err(), "more entries than the limit");
        assert_eq!(ReplayCache::decode(&image, 0, 10).unwrap().len(), 5);
    }

    #[test]
    fn load_survives_missing_and_corrupt_files_and_save_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPLAY_FILE);
        assert_eq!(ReplayCache::load(&path, 0, 10).len(), 0, "missing file: empty");
        std::fs::write(&path, b"not a cache at all, just bytes").unwrap();
        assert_eq!(ReplayCache::load(&path, 0, 10).len(), 0, "corrupt file: empty, no panic");
        let mut rc = ReplayCache::new(10);
        rc.check(tag(7), u64::MAX / 2, 0);
        write_atomic(&path, &rc.encode(0)).unwrap();
        assert!(!path.with_extension("tmp").exists(), "the temporary file was renamed");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let mut loaded = ReplayCache::load(&path, 0, 10);
        assert_eq!(loaded.len(), 1);
        assert!(!loaded.check(tag(7), u64::MAX / 2, 0), "the tag survived the restart");
    }
}
