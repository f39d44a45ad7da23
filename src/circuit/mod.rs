//! Circuits on this peer: routing of every cell that arrives on a link, admission and peeling of OPENs, the
//! Relayer, endpoints and the message stream the chain layer uses.
//!
//! The layer sits on top of `link` and below `node`. It never reaches up: what it needs comes in as narrow
//! handles when the [`Router`] is built — a [`LinkDirectory`] of live links by NeighborID (what arti calls a
//! channel provider), a [`Reporter`] channel for failure reports to the tracker, the [`Service`] that takes
//! circuits ending here, its [`CircuitConfig`], the node's identity (to peel OPENs) and counters. Links hand it
//! their cells through the [`crate::link::CellSink`] it returns from [`Router::attach`].
//!
//! Files: `router.rs` (per-link state, cell dispatch, link up/down, shutdown), `open.rs` (OPEN admission, peel,
//! checks, becoming a relay or a target), `origin.rs` (opening our own circuits), `relay.rs` (the Relayer),
//! `endpoint.rs` and `stream.rs` (circuit ends and the message stream), `table.rs` (the route table and its lock
//! discipline), `limit.rs` (the OPEN rate limit), `replay.rs` (the replay cache),
//! `window.rs` (receive-window auto-tuning).

pub mod endpoint;
mod limit;
mod open;
mod origin;
pub mod relay;
pub mod replay;
mod router;
pub mod stream;
pub mod table;
#[cfg(test)]
mod tests;
pub mod window;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::tracker::FailureReport;
use tokio::sync::mpsc;
use tracing::debug;

use crate::link::Link;
pub use limit::{OpenAdmission, OpenLimiter, TokenBucket};
use relay::Dir;
pub use router::{Router, RouterParts};
pub use stream::{CircuitSender, CircuitStream};

/// What serves circuits that end here (the chain node).
pub trait Service: Send + Sync + 'static {
    /// Takes a new incoming circuit (its end-to-end session is up).
    fn accept(&self, stream: CircuitStream);
}

/// Live links by NeighborID, as the circuit layer sees them (implemented by the node's link registry).
pub trait LinkDirectory: Send + Sync + 'static {
    /// The live link over `nid`, if any.
    fn link(&self, nid: NeighborId) -> Option<Arc<Link>>;
    /// Whether `nid` is an edge we expect a link over (the tracker listed it to us), up or not yet.
    fn expects(&self, nid: NeighborId) -> bool;
    /// Asks for a fresh neighbor table (an OPEN named an edge we do not know: perhaps one the tracker made after
    /// our last announce). Rate-limited by the implementation.
    fn refresh(&self);
    /// Waits up to `max` for the link over `nid`.
    fn wait_link(&self, nid: NeighborId, max: Duration)
        -> Pin<Box<dyn Future<Output = Option<Arc<Link>>> + Send + '_>>;
    /// Waits up to `max` for the link over `nid`, an edge we did not know; gives up at once when our neighbor table
    /// is replaced and still does not list `nid` (the tracker does not know that edge either).
    fn wait_new_edge(
        &self,
        nid: NeighborId,
        max: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<Link>>> + Send + '_>>;
}

/// Where failure reports for the tracker go: a bounded queue that a task of the node drains. A report that
/// does not fit is dropped (and logged): reports are advisory, and a flood must not grow memory.
#[derive(Clone)]
pub struct Reporter(mpsc::Sender<FailureReport>);

impl Reporter {
    /// A reporter and the receiving end of its queue (`cap` reports).
    pub fn channel(cap: usize) -> (Reporter, mpsc::Receiver<FailureReport>) {
        let (tx, rx) = mpsc::channel(cap.max(1));
        (Reporter(tx), rx)
    }

    /// Queues a report (dropped if the queue is full).
    pub fn report(&self, r: FailureReport) {
        if let Err(e) = self.0.try_send(r) {
            debug!("failure report dropped: {e}");
        }
    }
}

/// The circuit layer's settings (from the peer's configuration).
#[derive(Debug, Clone)]
pub struct CircuitConfig {
    /// Our receive window per circuit and direction (cells): where every circuit starts.
    pub window: u32,
    /// The largest a circuit's receive window may grow to (auto-tuning, `window.rs`).
    pub max_window: u32,
    /// Credit is returned in batches of this many cells.
    pub sendme_batch: u32,
    /// How long a hop waits for CONFIRM/DENY from downstream (and an endpoint for the session).
    pub open_timeout: Duration,
    /// Tolerated clock skew for TC expiry.
    pub clock_skew: Duration,
    /// OPENs per second one link may send.
    pub open_rate: u32,
    /// Burst of OPENs above the rate.
    pub open_burst: u32,
    /// Chains served as a target.
    pub serve: Vec<ChainId>,
    /// How long a relay waits for the link to the next hop to come up.
    pub link_wait: Duration,
    /// How long the requester waits for its link to the first hop.
    pub origin_link_wait: Duration,
}

/// Debug trace of relayed DATA payloads (hex, one line per cell: `circ dir in out`), for anonymity tests.
pub struct Trace(Mutex<std::io::BufWriter<std::fs::File>>);

impl Trace {
    /// Appends to `path`.
    pub fn open(path: &Path) -> std::io::Result<Trace> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Trace(Mutex::new(std::io::BufWriter::new(f))))
    }

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
