//! What the tracker does with each request, independent of how it arrived: announce (with its reachability
//! check), circuit requests, failure reports, and periodic expiry.
//!
//! All state sits in one [`State`] behind a timed `std::sync::Mutex`; it is never held across an `.await` (the
//! probe, the tracking-code RSA work and the database writes happen outside it), and every step under it costs
//! O(degree^hops) at most, never O(peers): the holds are measured (`anomos_tracker_state_lock_*`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::tracker::{
    Announce, AnnounceReply, CircuitReply, CircuitRequest, ErrorCode, FailureKind, FailureReport, FromTracker,
    NeighborInfo, TrackerError as WireError, MAX_NEIGHBORS, MAX_TEXT,
};
use rand::rngs::{OsRng, StdRng};
use rand::SeedableRng;
use tracing::{debug, info, warn};

use crate::circuits::{self, CircuitBook, REMEMBER_AFTER_EXPIRY};
use crate::config::TrackerArgs;
use crate::graph::{Graph, GraphError, Scope};
use crate::metrics::{
    self, Collector, Counter, EnumCounter, EnumHistogram, Refusal, Registry, ReportKind, RequestKind,
};
use crate::probe::{self, PROBE_TIMEOUT};
use crate::store::Store;
use crate::timed_lock::{TimedGuard, TimedMutex};

mod persist;
mod replica;
mod reports;

pub(crate) use persist::Restored;

/// Requests with more onion layers than this build their tracking codes on the blocking pool.
const INLINE_LAYERS: usize = 8;

/// The tracker's mutable state.
struct State {
    graph: Graph<PublicKey>,
    book: CircuitBook,
    /// For graph choices and the secrets planned under the lock (a CSPRNG seeded from the OS).
    rng: StdRng,
    /// Failure reports per reporter in the current window: (window start, reports).
    reports: HashMap<Fingerprint, (Instant, u32)>,
    /// Peers reported unreachable whose re-probe is running.
    probing: HashSet<Fingerprint>,
    /// With replicas: the revisions at which the graph holds the shared records (empty otherwise).
    revs: crate::replica::Revisions,
}

/// Failure reports one peer may make per [`REPORT_WINDOW`]; more are acknowledged and ignored. Each report can
/// take a peer out of paths (or make the tracker probe one), so a reporter must not be able to do it at will.
pub const REPORTS_PER_WINDOW: u32 = 20;
/// The window of [`REPORTS_PER_WINDOW`].
pub const REPORT_WINDOW: Duration = Duration::from_secs(60);
/// Distinct reporters whose circuit reports (denied, broken, misbehaving) must blame a peer that still answers
/// its probe, within [`crate::graph::BLAME_LASTS`], before it is left out of everyone's paths; below that it is
/// left out of the reporters' own paths only. One peer's word cannot take another out of the overlay (SPEC open
/// issue 7).
pub use crate::graph::CORROBORATING_REPORTERS;

/// The tracker's counters (what `--metrics` exposes), incremented where each event happens.
#[derive(Debug, Default)]
pub(crate) struct TrackerMetrics {
    /// Successful announces.
    pub(crate) announces: Counter,
    /// Announces of peers the tracker did not know.
    pub(crate) new_peers: Counter,
    /// Circuit requests received (valid ones).
    pub(crate) circuit_requests: Counter,
    /// Circuits (tracking codes) issued.
    pub(crate) circuits_issued: Counter,
    /// Requests and connections refused, by reason.
    pub(crate) refused: EnumCounter<Refusal>,
    /// Failure reports, by kind.
    pub(crate) reports: EnumCounter<ReportKind>,
    /// Peers expired for silence.
    pub(crate) expired: Counter,
    /// Sessions authenticated (full handshakes).
    pub(crate) sessions: Counter,
    /// Sessions resumed on a new connection with a ticket.
    pub(crate) resumptions: Counter,
    /// Key fetches answered.
    pub(crate) key_fetches: Counter,
    /// Time from a request read to its reply written, by kind.
    pub(crate) requests: EnumHistogram<RequestKind>,
}

/// How long an announce that needs a reachability probe waits for one of the probe slots
/// ([`TrackerArgs::probes_limit`]) before it is refused with `Full` (the peer retries later). With the probe's own
/// 5 s, an announce is answered within 10 s, inside the peer's 15 s read timeout.
const PROBE_SLOT_WAIT: Duration = Duration::from_secs(5);

/// The request handlers, shared by every session.
pub(crate) struct Service {
    args: TrackerArgs,
    state: TimedMutex<State>,
    /// Reachability probes running at once: newcomers' probes are bounded and paced by these slots.
    probes: tokio::sync::Semaphore,
    /// Announce probes in flight per address ([`crate::limits::PROBES_PER_ADDRESS`]).
    probing_addrs: Arc<crate::limits::AddressSlots>,
    /// The state database (`None` in unit tests and for replicas, and once closed at shutdown).
    store: std::sync::Mutex<Option<Arc<Store>>>,
    /// The state shared with other replicas (etcd), when `--etcd` is given.
    replica: Option<Arc<dyn crate::replica::Shared>>,
    /// Counters.
    pub(crate) metrics: TrackerMetrics,
    /// How reachability probes dial (TCP, or a simulated network).
    pub(crate) net: anomos_net::Net,
}

/// An error reply (message cut to what the protocol allows).
pub(crate) fn error_reply(code: ErrorCode, message: impl Into<String>) -> FromTracker {
    let mut message = message.into();
    if message.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    FromTracker::Error(WireError { code, message })
}

/// Addresses a peer can never be reached at.
fn unusable_listen_ip(ip: IpAddr) -> bool {
    ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

impl Service {
    /// A service over `graph` (empty, or restored from `store`).
    fn with_graph(args: TrackerArgs, mut graph: Graph<PublicKey>, store: Option<Arc<Store>>) -> Self {
        graph.presize();
        let state = State {
            graph,
            book: CircuitBook::new(args.max_pending_circuits),
            // From the OS (or, in a simulation, from its seed: the graph's choices then replay).
            rng: StdRng::from_seed(anomos_net::rt::seed_rng()),
            reports: HashMap::new(),
            probing: HashSet::new(),
            revs: Default::default(),
        };
        let probes = tokio::sync::Semaphore::new(args.probes_limit());
        Service {
            args,
            state: TimedMutex::new(state),
            probes,
            probing_addrs: Arc::default(),
            store: std::sync::Mutex::new(store),
            replica: None,
            net: anomos_net::tcp(),
            metrics: TrackerMetrics::default(),
        }
    }

    fn lock(&self, holder: &'static str) -> TimedGuard<'_, State> {
        self.state.lock(holder)
    }

    /// `Announce`: check reachability, record the peer, top it up, reply with its whole neighbor set.
    /// `remote_ip` is where the session came from: the announced address must be on the same host, so the
    /// reachability probe cannot be pointed at third parties (the tracker would be a reflector).
    /// With `probe` (a session on a version-2 channel), a probe needed is the version-2 one under that session's
    /// key; otherwise the version-1 one, signed by the peer's identity.
    pub(crate) async fn announce(
        &self,
        key: &PublicKey,
        ann: Announce,
        remote_ip: IpAddr,
        probe: Option<&anomos_proto::probe_v2::ProbeAuth>,
    ) -> FromTracker {
        if let Some(refused) = self.unavailable() {
            return refused;
        }
        let id = key.fingerprint();
        let listen = ann.listen;
        if unusable_listen_ip(listen.ip()) {
            warn!(peer = %id.short(), %listen, "announce refused: unusable listen address");
            self.metrics.refused.inc(Refusal::UnusableAddress);
            return error_reply(ErrorCode::BadRequest, format!("cannot reach a peer at {listen}"));
        }
        // Compared canonically: on a dual-stack socket an IPv4 peer's source reads as ::ffff:a.b.c.d.
        if !self.args.allow_foreign_announce && remote_ip.to_canonical() != listen.ip().to_canonical() {
            warn!(peer = %id.short(), %listen, from = %remote_ip, "announce refused: address is not the session's");
            self.metrics.refused.inc(Refusal::ForeignAddress);
            return error_reply(
                ErrorCode::BadRequest,
                format!("announced address {listen} is not the address this session comes from"),
            );
        }
        let needs_probe = {
            let st = self.lock("announce: admission");
            // Before the probe, so that an address over its limit costs the tracker no connection; checked again
            // (atomically with the insertion) by the graph after it.
            if let Err(GraphError::OverLimit(over)) = st.graph.admits(&id, listen.ip()) {
                warn!(peer = %id.short(), %listen, %over, "announce refused: address limit");
                self.metrics.refused.inc(Refusal::AddressLimit);
                return error_reply(ErrorCode::AddressLimit, over.to_string());
            }
            if st.graph.get(&id).is_none() && st.graph.len() >= self.args.max_peers {
                warn!(peer = %id.short(), peers = st.graph.len(), "announce refused: tracker full");
                self.metrics.refused.inc(Refusal::Full);
                return error_reply(ErrorCode::Full, "the tracker has no room for more peers");
            }
            // A known peer re-announcing the address it was probed at (and not avoided since) needs no probe: the
            // session proves its key, and the address is the session's own.
            !st.graph.get(&id).is_some_and(|p| p.addr == listen && !p.avoided)
        };
        if needs_probe {
            let Some(_mine) = self.probing_addrs.take(listen.ip(), crate::limits::PROBES_PER_ADDRESS) else {
                warn!(peer = %id.short(), %listen, "announce refused: this address's reachability checks are running");
                self.metrics.refused.inc(Refusal::ProbeBusy);
                return error_reply(
                    ErrorCode::Full,
                    "reachability checks of this address are running; announce again later",
                );
            };
            let Ok(Ok(_slot)) = tokio::time::timeout(PROBE_SLOT_WAIT, self.probes.acquire()).await else {
                warn!(peer = %id.short(), %listen, "announce refused: every probe slot busy");
                self.metrics.refused.inc(Refusal::ProbeBusy);
                return error_reply(ErrorCode::Full, "too many reachability checks running; announce again later");
            };
            let checked = probe::check_either(&*self.net, listen, &id, probe, PROBE_TIMEOUT).await;
            if let Err(e) = checked {
                warn!(peer = %id.short(), %listen, reason = %e, "announce refused: reachability check failed");
                self.metrics.refused.inc(Refusal::Unreachable);
                return error_reply(ErrorCode::Unreachable, format!("{listen} did not answer with your key: {e}"));
            }
        }

        // With replicas the changes are committed before the reply; after a conflict (another instance changed a
        // peer involved) the graph holds the shared state again and the announce is done again.
        let mut attempt = 0;
        let (done, neighbors, peers, interval) = loop {
            let (done, neighbors, peers, interval, staged) = {
                let mut st = self.lock("announce");
                let State { graph, rng, .. } = &mut *st;
                let interval = self.interval_for_announce(graph);
                let (chains, family) = (ann.chains.clone(), ann.family.clone());
                let done = match graph.announce_with_family(
                    id,
                    key.clone(),
                    listen,
                    chains,
                    family,
                    anomos_net::rt::now(),
                    rng,
                ) {
                    Ok(done) => done,
                    Err(GraphError::OverLimit(over)) => {
                        warn!(peer = %id.short(), %listen, %over, "announce refused: address limit");
                        self.metrics.refused.inc(Refusal::AddressLimit);
                        return error_reply(ErrorCode::AddressLimit, over.to_string());
                    }
                    Err(_) => {
                        warn!(peer = %id.short(), "announce refused: tracker full");
                        self.metrics.refused.inc(Refusal::Full);
                        return error_reply(ErrorCode::Full, "the tracker has no room for more peers");
                    }
                };
                let neighbors: Vec<NeighborInfo> = graph
                    .neighbors(&id)
                    .into_iter()
                    .take(MAX_NEIGHBORS)
                    .map(|(nid, _, p)| NeighborInfo { id: nid, addr: p.addr, public_key: p.key.der().to_vec() })
                    .collect();
                let peers = graph.len();
                let staged = self.stage(&mut st, Some(id));
                (done, neighbors, peers, interval, staged)
            };
            match self.commit(staged).await {
                Ok(()) => break (done, neighbors, peers, interval),
                Err(replica::Retry::Again) if attempt + 1 < replica::COMMIT_ATTEMPTS => {
                    attempt += 1;
                    debug!(peer = %id.short(), attempt, "announce conflicted with another replica; again");
                    Self::backoff(attempt).await;
                }
                Err(e) => {
                    let why = match e {
                        replica::Retry::Refuse(why) => why,
                        replica::Retry::Again => "its changes kept conflicting with other replicas'".into(),
                    };
                    warn!(peer = %id.short(), reason = %why, "announce refused: not shared");
                    self.metrics.refused.inc(Refusal::Unavailable);
                    return error_reply(
                        ErrorCode::Unavailable,
                        format!("this tracker replica cannot serve now ({why})"),
                    );
                }
            }
        };
        self.metrics.announces.inc();
        if done.is_new {
            self.metrics.new_peers.inc();
        }

        if done.is_new {
            info!(peer = %id.short(), %listen, neighbors = done.degree, peers, "new peer announced");
        } else if done.was_restored {
            info!(peer = %id.short(), %listen, neighbors = done.degree, added = done.added, "restored peer announced");
        } else if done.addr_changed || done.was_avoided || done.added > 0 {
            info!(
                peer = %id.short(), %listen, neighbors = done.degree, added = done.added,
                moved = done.addr_changed, readmitted = done.was_avoided, "peer announced"
            );
        } else {
            debug!(peer = %id.short(), neighbors = done.degree, "peer announced");
        }
        if done.added > 0 {
            info!(peer = %id.short(), added = done.added, degree = done.degree, "neighbors assigned");
        }
        FromTracker::Announced(AnnounceReply { interval_secs: interval, neighbors })
    }

    /// The interval to hand a peer announcing now (it grows with the overlay: `--announce-rate`), with the graph
    /// set to keep the peer live for [`EXPIRE_INTERVALS`](crate::config::EXPIRE_INTERVALS) of it. Replicas leave
    /// expiry to etcd's leases (their graph's `expire_after` stays "never") and hand out `--interval`.
    fn interval_for_announce(&self, graph: &mut Graph<PublicKey>) -> u32 {
        let interval = self.args.interval_for(graph.len());
        if !self.args.replicated() {
            graph.set_expire_after(TrackerArgs::expire_after_for(interval));
        }
        interval
    }

    /// `RequestCircuits`: find paths, build a tracking code per path, remember the circuits.
    pub(crate) async fn request_circuits(&self, peer: Fingerprint, req: CircuitRequest) -> FromTracker {
        // Our host's wall clock (a simulation skews it).
        let expires = self.net.clock().unix_now().saturating_add(self.args.tc_ttl);
        let forget_at = anomos_net::rt::now() + Duration::from_secs(self.args.tc_ttl) + REMEMBER_AFTER_EXPIRY;
        let relays = usize::from(req.relays);
        self.metrics.circuit_requests.inc();
        if let Some(refused) = self.unavailable() {
            return refused;
        }
        let plan = {
            let mut st = self.lock("grant: paths");
            let State { graph, book, rng, .. } = &mut *st;
            // Targets the requester already has circuits to come last: a replacement for a stalled or broken
            // circuit should not land on a peer another of its circuits uses.
            let busy = book.targets_in_use(&peer);
            let count = usize::from(req.count);
            let paths = match graph.find_paths_preferring(
                &peer,
                &req.chain,
                count,
                relays,
                &busy,
                anomos_net::rt::now(),
                rng,
            ) {
                Ok(paths) => paths,
                Err(GraphError::UnknownPeer) => {
                    info!(peer = %peer.short(), "circuit request refused: peer not announced");
                    self.metrics.refused.inc(Refusal::UnknownPeer);
                    return error_reply(ErrorCode::UnknownPeer, "announce first");
                }
                Err(_) => {
                    info!(peer = %peer.short(), chain = %req.chain, relays, "circuit request: no path");
                    self.metrics.refused.inc(Refusal::NoPath);
                    return error_reply(ErrorCode::NoPath, format!("no path with {relays} relays to {}", req.chain));
                }
            };
            circuits::plan(graph, book, &paths, &req.chain, expires, forget_at, rng)
        };
        let issued = if plan.layers() > INLINE_LAYERS {
            match anomos_net::rt::spawn_blocking(move || plan.build(&mut OsRng)).await {
                Ok(issued) => issued,
                Err(e) => {
                    warn!(peer = %peer.short(), error = %e, "building tracking codes failed");
                    Vec::new()
                }
            }
        } else {
            plan.build(&mut OsRng)
        };
        if issued.is_empty() {
            self.metrics.refused.inc(Refusal::NoPath);
            return error_reply(ErrorCode::NoPath, "no circuit could be built");
        }
        let mut grants = Vec::with_capacity(issued.len());
        {
            let mut st = self.lock("grant: record");
            for i in issued {
                st.book.insert(i.grant.circuit, i.record);
                grants.push(i.grant);
            }
        }
        self.metrics.circuits_issued.inc_by(grants.len() as u64);
        // The paths of one request have one length: the requested one, or longer where the graph had no such path.
        let hops = grants.first().map_or(0, |g| g.hop_secrets.len());
        info!(
            peer = %peer.short(), chain = %req.chain, requested = req.count, issued = grants.len(),
            relays, hops, "circuits issued"
        );
        FromTracker::Circuits(CircuitReply { circuits: grants })
    }

    /// The state lock's hold statistics.
    pub(crate) fn lock_stats(&self) -> crate::timed_lock::HoldStats {
        self.state.stats()
    }

    /// Peers, edges and remembered circuits now.
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        let st = self.lock("sizes");
        (st.graph.len(), st.graph.edge_count(), st.book.len())
    }

    /// Expires silent peers and forgets old circuits.
    pub(crate) fn housekeeping(&self) {
        let now = anomos_net::rt::now();
        let mut st = self.lock("housekeeping");
        let expired = st.graph.expire(now);
        let forgotten = st.book.prune(now);
        let (peers, edges, circuits) = (st.graph.len(), st.graph.edge_count(), st.book.len());
        drop(st);
        self.metrics.expired.inc_by(expired.len() as u64);
        for e in &expired {
            info!(peer = %e.id.short(), lost_edges = e.edges, peers, edges, "peer expired");
        }
        if forgotten > 0 {
            debug!(forgotten, remembered = circuits, "old circuits forgotten");
        }
    }
}

impl TrackerMetrics {
    /// The tracker's metrics registry: these counters, and `gauges` read at each scrape. Metric names are those
    /// of docs/OPERATORS.md (counters are registered without `_total`, which the exposition appends).
    pub(crate) fn registry(&self, gauges: impl Collector) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(gauges));
        r.register("anomos_tracker_sessions", "Sessions authenticated", self.sessions.clone());
        r.register("anomos_tracker_resumptions", "Sessions resumed with a ticket", self.resumptions.clone());
        r.register("anomos_tracker_key_fetches", "Key fetches answered", self.key_fetches.clone());
        r.register("anomos_tracker_announces", "Successful announces", self.announces.clone());
        r.register("anomos_tracker_new_peers", "Announces from peers the tracker did not know", self.new_peers.clone());
        r.register("anomos_tracker_peers_expired", "Peers expired for silence", self.expired.clone());
        r.register("anomos_tracker_circuit_requests", "Valid circuit requests received", self.circuit_requests.clone());
        r.register("anomos_tracker_circuits_issued", "Circuits (tracking codes) issued", self.circuits_issued.clone());
        self.refused.register(&mut r, "anomos_tracker_refused", "Requests and connections refused, by reason");
        self.reports.register(&mut r, "anomos_tracker_reports", "Failure reports received, by kind");
        self.requests.register(
            &mut r,
            "anomos_tracker_request_seconds",
            "Time from a request read to its reply written, by kind (the tracker's own share of a peer's wait)",
        );
        r
    }
}

/// The tracker's gauges, read at each scrape: graph sizes and open sessions.
pub(crate) struct TrackerGauges {
    /// The service (weak: a scrape after shutdown reports nothing).
    pub(crate) service: std::sync::Weak<Service>,
    /// Peer connections open now.
    pub(crate) open_sessions: Box<dyn Fn() -> usize + Send + Sync>,
    /// Session tickets held now.
    pub(crate) tickets: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for TrackerGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrackerGauges")
    }
}

impl Collector for TrackerGauges {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let Some(service) = self.service.upgrade() else { return Ok(()) };
        let (peers, edges, remembered) = service.sizes();
        let n = |v: usize| v as u64;
        metrics::gauge(&mut enc, "anomos_tracker_peers", "Peers announced and not expired.", n(peers))?;
        metrics::gauge(&mut enc, "anomos_tracker_edges", "Edges of the neighbor graph.", n(edges))?;
        metrics::gauge(
            &mut enc,
            "anomos_tracker_remembered_circuits",
            "Issued circuits remembered for failure reports.",
            n(remembered),
        )?;
        metrics::gauge(&mut enc, "anomos_tracker_sessions", "Peer connections open now.", n((self.open_sessions)()))?;
        metrics::gauge(&mut enc, "anomos_tracker_tickets", "Sessions resumable with a ticket.", n((self.tickets)()))?;
        let lock = service.lock_stats();
        metrics::gauge(
            &mut enc,
            "anomos_tracker_state_lock_max_hold_microseconds",
            "Longest single hold of the state lock since start.",
            lock.max_us,
        )?;
        metrics::gauge(
            &mut enc,
            "anomos_tracker_state_lock_max_hold_cpu_microseconds",
            "Most CPU time the holding thread spent in one hold of the state lock since start.",
            lock.max_cpu_us,
        )?;
        metrics::counter(
            &mut enc,
            "anomos_tracker_state_lock_hold_microseconds",
            "Time the state lock was held, all holds together.",
            lock.total_us,
        )?;
        metrics::counter(&mut enc, "anomos_tracker_state_lock_holds", "Holds of the state lock.", lock.holds)
    }
}
