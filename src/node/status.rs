//! What a node shows of itself (to `status`, metrics and tests): gauges, links, the chain, sync progress, the
//! tracker session's state, and what shutdown tore down.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::circuit::CircuitsByRole;

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

/// A chain served from another node's P2P port (`--upstream`), for `status`.
#[derive(Clone)]
pub struct UpstreamInfo {
    /// The chain's name.
    pub name: String,
    /// The upstream node's address (`HOST:PORT`).
    pub addr: String,
    /// What the last connection attempt to it found.
    pub health: Arc<UpstreamHealth>,
}

/// The outcome of the last connection attempt to an upstream node.
#[derive(Default)]
pub struct UpstreamHealth(Mutex<Option<(u64, Option<String>)>>);

impl UpstreamHealth {
    /// Records an attempt (now): `Ok` if it connected, else why not.
    pub fn record(&self, r: Result<(), String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((crate::stats::unix_now(), r.err()));
    }

    /// The last attempt: (unix time, error if it failed); `None` before the first.
    pub fn last(&self) -> Option<(u64, Option<String>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Progress of a running sync (set by `fetch`), for `status` and metrics.
#[derive(Default)]
pub struct SyncGauges {
    /// 0 idle, 1 headers, 2 blocks, 3 synced.
    pub phase: AtomicU8,
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

/// What the tracker session looks like.
#[derive(Debug, Clone, Default)]
pub struct TrackerState {
    /// Unix time of the last successful announce.
    pub last_ok_unix: Option<u64>,
    /// The last announce error (cleared by a success).
    pub last_error: Option<String>,
}

/// What [`super::Node::shutdown`] tore down.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShutdownSummary {
    /// Circuits broken with BREAK(shutdown).
    pub circuits: usize,
    /// Links closed.
    pub links: usize,
    /// Replay tags persisted.
    pub replay_tags: usize,
}

/// A snapshot of what a node holds (for the `stats` log line, tests and monitoring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Live neighbor links.
    pub links: usize,
    /// Circuits alive here (relayed and endpoints).
    pub circuits: usize,
    /// Cells queued on all links (DATA bounded by `max_queued_cells`, plus control cells).
    pub queued_cells: usize,
    /// Cells queued on the fullest link.
    pub max_link_queue: usize,
    /// Incoming connections open (handshaking, links, probes).
    pub conns: usize,
}
