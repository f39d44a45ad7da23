//! The peer's Prometheus exposition (`--metrics ADDR`, `GET /metrics`), served by the responder in
//! [`anomos_tracker::metrics`]. Every counter is incremented where its event happens (see
//! [`crate::node::Stats`]); gauges are read at scrape time. docs/OPERATORS.md lists every metric.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anomos_tracker::metrics::{Exposition, Kind};

use crate::node::Node;

/// Deny reasons always exposed (0 until seen).
const DENY_REASONS: &[&str] = &[
    "bad-tc",
    "circuit-limit",
    "expired",
    "no-such-chain",
    "no-such-neighbor",
    "not-neighbor",
    "protocol",
    "replayed",
    "timeout",
    "wrong-link",
];

/// Break reasons always exposed (0 until seen).
const BREAK_REASONS: &[&str] =
    &["finished", "integrity", "link-failed", "misbehaving", "protocol", "resources", "shutdown", "timeout"];

/// Renders the node's metrics.
pub fn render(node: &Node) -> String {
    let st = &node.stats;
    let g = node.gauges();
    let roles = node.circuits_by_role();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut e = Exposition::new();
    e.single("anomos_peer_start_time_seconds", Kind::Gauge, "Unix time the peer started.", node.started_unix as f64);
    e.single("anomos_peer_links", Kind::Gauge, "Live neighbor links.", g.links as f64);
    e.single("anomos_peer_neighbors", Kind::Gauge, "Neighbors the tracker assigned us.", node.neighbor_count() as f64);
    e.single("anomos_peer_links_opened_total", Kind::Counter, "Neighbor links that came up.", ld(&st.links_opened));
    e.single("anomos_peer_links_closed_total", Kind::Counter, "Neighbor links that went down.", ld(&st.links_closed));
    e.single(
        "anomos_peer_connections",
        Kind::Gauge,
        "Incoming connections open (handshaking, links, probes).",
        g.conns as f64,
    );
    e.by_label(
        "anomos_peer_circuits",
        Kind::Gauge,
        "Circuits alive here by role: relay (through us), origin (ours), target (ending here), opening (OPEN being \
         peeled).",
        "role",
        [("relay", roles.relay), ("origin", roles.origin), ("target", roles.target), ("opening", roles.opening)]
            .into_iter()
            .map(|(r, n)| (r.to_string(), n as f64)),
    );
    e.single("anomos_peer_circuits_max", Kind::Gauge, "Circuit limit (--max-circuits).", node.cfg.max_circuits as f64);
    e.by_label(
        "anomos_peer_circuits_opened_total",
        Kind::Counter,
        "Circuits opened since start by role (origin: circuits the tracker granted us).",
        "role",
        [("relay", ld(&st.relay_opened)), ("target", ld(&st.target_opened)), ("origin", ld(&st.circuits_granted))]
            .into_iter()
            .map(|(r, n)| (r.to_string(), n)),
    );
    e.single("anomos_peer_cells_relayed_total", Kind::Counter, "DATA cells relayed.", ld(&st.cells_relayed));
    e.single("anomos_peer_bytes_relayed_total", Kind::Counter, "DATA payload bytes relayed.", ld(&st.bytes_relayed));
    e.by_label(
        "anomos_peer_denies_sent_total",
        Kind::Counter,
        "OPENs this peer refused, by DENY reason.",
        "reason",
        st.denies_sent.snapshot(DENY_REASONS),
    );
    e.by_label(
        "anomos_peer_denies_received_total",
        Kind::Counter,
        "Our own circuits refused by a hop, by DENY reason.",
        "reason",
        st.denies_received.snapshot(DENY_REASONS),
    );
    e.by_label(
        "anomos_peer_breaks_total",
        Kind::Counter,
        "Circuits broken that this peer saw fail or tore down itself (link failures, breaks of our own circuits, \
         shutdown), by BREAK reason.",
        "reason",
        st.breaks.snapshot(BREAK_REASONS),
    );
    e.single(
        "anomos_peer_queued_cells",
        Kind::Gauge,
        "Cells queued on all links (the buffer in use).",
        g.queued_cells as f64,
    );
    e.single(
        "anomos_peer_queued_cells_budget",
        Kind::Gauge,
        "The node's buffer budget in cells (--max-queued-cells).",
        node.budget.cap() as f64,
    );
    e.single("anomos_peer_max_link_queue", Kind::Gauge, "Cells queued on the fullest link.", g.max_link_queue as f64);
    e.by_label(
        "anomos_peer_announces_total",
        Kind::Counter,
        "Announces to the tracker by result.",
        "result",
        [("ok", ld(&st.announces_ok)), ("failed", ld(&st.announces_failed))]
            .into_iter()
            .map(|(r, n)| (r.to_string(), n)),
    );
    let ts = node.tracker_state();
    e.single(
        "anomos_peer_last_announce_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the last successful announce (0: none yet).",
        ts.last_ok_unix.unwrap_or(0) as f64,
    );
    e.single("anomos_peer_replay_cache_tags", Kind::Gauge, "Replay tags remembered.", node.replay_len() as f64);
    if let Some(c) = node.chain_info() {
        let (height, headers, blocks) = {
            let s = crate::chain::read(&c.store);
            (s.best_tip().1, s.header_count().saturating_sub(1), s.block_count().saturating_sub(1))
        };
        let labels = [("chain", c.name.as_str()), ("role", c.role)];
        e.family("anomos_peer_chain_height", Kind::Gauge, "Height of the best chain in the store.");
        e.sample("anomos_peer_chain_height", &labels, f64::from(height));
        e.family("anomos_peer_chain_headers", Kind::Gauge, "Headers stored (genesis not counted).");
        e.sample("anomos_peer_chain_headers", &labels, headers as f64);
        e.family("anomos_peer_chain_blocks", Kind::Gauge, "Block bodies stored (genesis not counted).");
        e.sample("anomos_peer_chain_blocks", &labels, blocks as f64);
    }
    let sync = &node.sync;
    e.by_label(
        "anomos_peer_sync_phase",
        Kind::Gauge,
        "1 for the sync's current phase (idle when this peer does not fetch).",
        "phase",
        ["idle", "headers", "blocks", "synced"]
            .into_iter()
            .map(|p| (p.to_string(), if sync.phase_name() == p { 1.0 } else { 0.0 })),
    );
    e.single(
        "anomos_peer_sync_header_height",
        Kind::Gauge,
        "Best header height during a sync.",
        ld(&sync.header_height),
    );
    e.single("anomos_peer_sync_blocks_done", Kind::Gauge, "Blocks stored by the running sync.", ld(&sync.blocks_done));
    e.single(
        "anomos_peer_sync_blocks_total",
        Kind::Gauge,
        "Blocks the running sync has to fetch (done + missing, as far as known).",
        ld(&sync.blocks_total),
    );
    e.finish()
}

/// Starts the metrics responder if the node's configuration asks for it; returns the bound address.
pub async fn start(node: &Arc<Node>) -> Result<Option<std::net::SocketAddr>, crate::PeerError> {
    let Some(addr) = node.cfg.metrics else {
        return Ok(None);
    };
    let n = Arc::downgrade(node);
    let render: anomos_tracker::metrics::Render = Arc::new(move || match n.upgrade() {
        Some(node) => render(&node),
        None => String::new(),
    });
    let (bound, _task) = anomos_tracker::metrics::serve(addr, render)
        .await
        .map_err(|e| crate::PeerError::Config(format!("--metrics {addr}: {e}")))?;
    Ok(Some(bound))
}
