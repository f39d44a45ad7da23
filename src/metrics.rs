//! The peer's Prometheus metrics (`--metrics ADDR`, `GET /metrics`): a `prometheus-client` [`Collector`] that
//! reads the node at each scrape, served by the responder in [`anomos_tracker::metrics`]. Every counter is
//! incremented where its event happens (see [`crate::node::Stats`]); gauges are read at scrape time. Label sets
//! are enums: the protocol's DENY and BREAK reasons, and the roles, results and phases below.
//! docs/OPERATORS.md lists every metric; docs/grafana/anomos.json charts them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use anomos_proto::cell::{BreakReason, DenyReason};
use anomos_tracker::metrics::{self as m, Collector, DescriptorEncoder, Label, LabelEnum, Registry};

use crate::node::Node;

anomos_tracker::label_enum!(
    /// A circuit's role at this peer (`anomos_peer_circuits`, `anomos_peer_circuits_opened_total`).
    Role, "role" {
        /// Through us.
        Relay => "relay",
        /// Ours (the tracker granted it to us).
        Origin => "origin",
        /// Ending here.
        Target => "target",
        /// OPEN being peeled.
        Opening => "opening",
    }
);

anomos_tracker::label_enum!(
    /// An announce's result (`anomos_peer_announces_total`).
    AnnounceResult, "result" {
        /// Accepted by the tracker.
        Ok => "ok",
        /// Failed or refused.
        Failed => "failed",
    }
);

anomos_tracker::label_enum!(
    /// The chain sync's phase (`anomos_peer_sync_phase`), as `SyncProgress::phase_name` names it.
    SyncPhase, "phase" {
        /// Not fetching.
        Idle => "idle",
        /// Fetching headers.
        Headers => "headers",
        /// Fetching blocks.
        Blocks => "blocks",
        /// Caught up.
        Synced => "synced",
    }
);

/// Reads the node at each scrape (weak: a scrape after shutdown reports nothing).
struct PeerCollector(Weak<Node>);

impl std::fmt::Debug for PeerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCollector")
    }
}

impl Collector for PeerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        match self.0.upgrade() {
            Some(node) => encode(&node, &mut enc),
            None => Ok(()),
        }
    }
}

/// The registry of the peer's metrics.
pub fn registry(node: &Arc<Node>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(PeerCollector(Arc::downgrade(node))));
    r
}

/// The text exposition of the node's metrics now.
pub fn render(node: &Arc<Node>) -> String {
    m::encode(&registry(node))
}

fn encode(node: &Node, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let st = &node.stats;
    let g = node.gauges();
    let roles = node.circuits_by_role();
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let n = |v: usize| v as u64;
    m::gauge(e, "anomos_peer_start_time_seconds", "Unix time the peer started.", node.started_unix)?;
    m::gauge(e, "anomos_peer_links", "Live neighbor links.", n(g.links))?;
    m::gauge(e, "anomos_peer_neighbors", "Neighbors the tracker assigned us.", n(node.neighbor_count()))?;
    m::counter(e, "anomos_peer_links_opened", "Neighbor links that came up.", ld(&st.links_opened))?;
    m::counter(e, "anomos_peer_links_closed", "Neighbor links that went down.", ld(&st.links_closed))?;
    m::gauge(e, "anomos_peer_connections", "Incoming connections open (handshaking, links, probes).", n(g.conns))?;
    m::gauge_by(
        e,
        "anomos_peer_circuits",
        "Circuits alive here by role: relay (through us), origin (ours), target (ending here), opening (OPEN being \
         peeled).",
        Role::all().iter().map(|r| {
            let v = match r {
                Role::Relay => roles.relay,
                Role::Origin => roles.origin,
                Role::Target => roles.target,
                Role::Opening => roles.opening,
            };
            (Label(*r), n(v))
        }),
    )?;
    m::gauge(e, "anomos_peer_circuits_max", "Circuit limit (--max-circuits).", n(node.cfg.max_circuits))?;
    m::counter_by(
        e,
        "anomos_peer_circuits_opened",
        "Circuits opened since start by role (origin: circuits the tracker granted us).",
        [Role::Relay, Role::Target, Role::Origin].into_iter().map(|r| {
            let v = match r {
                Role::Relay => ld(&st.relay_opened),
                Role::Target => ld(&st.target_opened),
                Role::Origin | Role::Opening => ld(&st.circuits_granted),
            };
            (Label(r), v)
        }),
    )?;
    m::counter(e, "anomos_peer_cells_relayed", "DATA cells relayed.", ld(&st.cells_relayed))?;
    m::counter(e, "anomos_peer_bytes_relayed", "DATA payload bytes relayed.", ld(&st.bytes_relayed))?;
    m::counter_by(
        e,
        "anomos_peer_denies_sent",
        "OPENs this peer refused, by DENY reason.",
        st.denies_sent.by::<DenyReason>(),
    )?;
    m::counter_by(
        e,
        "anomos_peer_denies_received",
        "Our own circuits refused by a hop, by DENY reason.",
        st.denies_received.by::<DenyReason>(),
    )?;
    m::counter_by(
        e,
        "anomos_peer_breaks",
        "Circuits broken that this peer saw fail or tore down itself (link failures, breaks of our own circuits, \
         shutdown), by BREAK reason.",
        st.breaks.by::<BreakReason>(),
    )?;
    m::gauge(e, "anomos_peer_queued_cells", "Cells queued on all links (the buffer in use).", n(g.queued_cells))?;
    m::gauge(
        e,
        "anomos_peer_queued_cells_budget",
        "The node's buffer budget in cells (--max-queued-cells).",
        n(node.budget.cap()),
    )?;
    m::gauge(e, "anomos_peer_max_link_queue", "Cells queued on the fullest link.", n(g.max_link_queue))?;
    m::counter_by(
        e,
        "anomos_peer_announces",
        "Announces to the tracker by result.",
        [(Label(AnnounceResult::Ok), ld(&st.announces_ok)), (Label(AnnounceResult::Failed), ld(&st.announces_failed))],
    )?;
    let ts = node.tracker_state();
    m::gauge(
        e,
        "anomos_peer_last_announce_timestamp_seconds",
        "Unix time of the last successful announce (0: none yet).",
        ts.last_ok_unix.unwrap_or(0),
    )?;
    m::gauge(e, "anomos_peer_replay_cache_tags", "Replay tags remembered.", n(node.replay_len()))?;
    if let Some(c) = node.chain_info() {
        let (height, headers, blocks) = {
            let s = crate::chain::read(&c.store);
            (s.best_tip().1, s.header_count().saturating_sub(1), s.block_count().saturating_sub(1))
        };
        // The chain's name is configuration, not an enum: one series per served or fetched chain.
        let labels = || [("chain", c.name.as_str()), ("role", c.role)];
        let chain_gauge =
            |e: &mut DescriptorEncoder, name: &str, help: &str, v: u64| m::gauge_by(e, name, help, [(labels(), v)]);
        chain_gauge(e, "anomos_peer_chain_height", "Height of the best chain in the store.", u64::from(height))?;
        chain_gauge(e, "anomos_peer_chain_headers", "Headers stored (genesis not counted).", headers as u64)?;
        chain_gauge(e, "anomos_peer_chain_blocks", "Block bodies stored (genesis not counted).", blocks as u64)?;
    }
    let sync = &node.sync;
    let phase = sync.phase_name();
    m::gauge_by(
        e,
        "anomos_peer_sync_phase",
        "1 for the sync's current phase (idle when this peer does not fetch).",
        SyncPhase::all().iter().map(|p| (Label(*p), u64::from(p.as_str() == phase))),
    )?;
    m::gauge(e, "anomos_peer_sync_header_height", "Best header height during a sync.", ld(&sync.header_height))?;
    m::gauge(e, "anomos_peer_sync_blocks_done", "Blocks stored by the running sync.", ld(&sync.blocks_done))?;
    m::gauge(
        e,
        "anomos_peer_sync_blocks_total",
        "Blocks the running sync has to fetch (done + missing, as far as known).",
        ld(&sync.blocks_total),
    )
}

/// Starts the metrics responder if the node's configuration asks for it; returns the bound address.
pub async fn start(node: &Arc<Node>) -> Result<Option<std::net::SocketAddr>, crate::PeerError> {
    let Some(addr) = node.cfg.metrics else {
        return Ok(None);
    };
    let (bound, _task) = m::serve(addr, Arc::new(registry(node)))
        .await
        .map_err(|e| crate::PeerError::Config(format!("--metrics {addr}: {e}")))?;
    Ok(Some(bound))
}
