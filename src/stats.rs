//! The peer's counters (monotonic), incremented where each event happens; `--metrics` and `status` read them.
//! A leaf module: the link, circuit and node layers all count into one [`Stats`].

use std::sync::atomic::{AtomicU64, Ordering};

use anomos_proto::cell::{BreakReason, DenyReason};
use anomos_tracker::metrics::LabeledCounter;

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
    /// The tracker's reachability probes answered: version 1 (signed) and version 2 (a MAC, SPEC §3.9).
    pub probes_answered: [AtomicU64; 2],
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

/// Seconds since the Unix epoch (the simulated clock in a simulation: `anomos_net::rt`).
pub fn unix_now() -> u64 {
    anomos_net::rt::unix_now()
}
