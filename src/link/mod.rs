//! Neighbor links: the handshake over TCP (dial and accept, `handshake.rs`), the reader loop, and the fair,
//! flow-controlled writer (`writer.rs`) with the node's fair-share pools (`budget.rs`).
//!
//! A link is up once the handshake authenticated the neighbor the tracker named *and* the first sealed cell
//! (a PADDING) opened, which proves the other side derived the same keys, i.e. knows the NeighborID.
//! One reader task and one writer task per link.
//!
//! This layer knows nothing of circuits. What it needs from above comes through [`LinkHost`]: who the neighbors
//! are (for the acceptor's AUTH check), and where an up link's cells go (a [`CellSink`] the host hands back when
//! the link comes up) and its end is reported.

pub mod budget;
mod handshake;
pub mod rtt;
pub mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::cell::{Cell, CELL_LEN, SEALED_CELL_LEN};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::LinkCipher;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use budget::{Pool, Share};
pub use handshake::{accept, dial, is_refusal, is_refused, HANDSHAKE_TIMEOUT, REFUSAL_RECHECK};
use writer::LinkWriter;

/// Why a link ends whose first cell did not open under the link keys.
const KEY_CONFIRMATION_FAILED: &str = "key confirmation failed (NeighborID mismatch?)";
/// Why a link ends whose first cell was not a valid key-confirmation PADDING.
const BAD_CONFIRMATION_CELL: &str = "bad key-confirmation cell";
/// Why a link ends that the host did not take (it is shutting down).
const NOT_ACCEPTED: &str = "not accepted by the node (shutting down)";

/// How long a link that began to drain (it lost a crossing, SPEC §5.2) still takes OPENs: those the neighbor sent
/// before it saw the other link come up. Later ones are refused `circuit-limit`, so a neighbor cannot keep two
/// links' worth of OPEN rate and circuit-slot shares.
pub const DRAINING_OPENS: Duration = Duration::from_millis(1500);

/// The link reader's buffer: about 16 cells per read syscall when cells arrive back to back.
const READ_BUF: usize = 64 * 1024;

/// A link-level protocol violation: the link is closed with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation(pub &'static str);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Where the cells of an up link go (the circuit layer). Called on the link's reader task, one cell at a time in
/// arrival order; it must not block.
pub trait CellSink: Send + Sync {
    /// One cell arrived. An error closes the link (a link-level protocol violation).
    fn cell(&self, cell: Cell) -> Result<(), Violation>;
}

/// What a link needs from the node: its neighbors (for the handshake) and where its life events go.
pub trait LinkHost: Send + Sync + 'static {
    /// The key and edge of a current neighbor, by fingerprint (the acceptor's AUTH check).
    fn neighbor(&self, fp: &Fingerprint) -> Option<(PublicKey, NeighborId)>;
    /// Whether a new incoming link over `nid` must be refused as `Busy` (at the link limit).
    fn busy(&self, nid: NeighborId) -> bool;
    /// Whether a link over `nid` is up (a dialer whose handshake saw one come up meanwhile gives its own up).
    fn has_link(&self, nid: NeighborId) -> bool;
    /// A dialer at `from` claiming `fp` was refused (unknown key, or a signature that did not verify): perhaps an
    /// edge we have not learned of yet. The host asks for a fresh neighbor table (rate-limited) and remembers that
    /// `fp` is trying to reach us from `from` (so that its own dial to `fp`, if it is the dialer, waits for this
    /// link first, when `fp`'s address is `from`: the claim is unverified).
    fn stranger(&self, fp: &Fingerprint, from: std::net::IpAddr);
    /// Resolves when the neighbor table is next replaced, or after `max`.
    fn table_refreshed(&self, max: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// The link is up (key confirmed). Returns where its cells go, or `None` to close it at once.
    fn up(&self, link: &Arc<Link>) -> Option<Arc<dyn CellSink>>;
    /// A link that was up has ended, for `reason`.
    fn down(&self, link: &Arc<Link>, reason: &str);
}

/// Settings and shared pools every link of a node uses.
#[derive(Clone)]
pub struct LinkSettings {
    /// Our identity (signs the handshake).
    pub identity: Arc<Identity>,
    /// Most cells queued on one link (circuit queues, and separately the control queue).
    pub queue_cap: usize,
    /// Our receive window per circuit, announced in the first cell.
    pub window: u32,
    /// The largest our window per circuit may grow to (auto-tuning, SPEC §8), announced with it.
    pub max_window: u32,
    /// PADDING after this long without other traffic.
    pub keepalive: Duration,
    /// A link that received nothing for this long is dead; so is one whose writes make no progress as long.
    pub idle_timeout: Duration,
    /// The node's pool of queued DATA cells (each link's neighbor gets a share).
    pub cells: Arc<Pool>,
    /// The node's count of queued control cells.
    pub control: Arc<Pool>,
    /// How links are dialed (TCP, or a simulated network).
    pub net: anomos_net::Net,
}

impl LinkSettings {
    /// Settings for unit tests: `id`, small queues, a 128-cell window, TCP.
    #[cfg(test)]
    pub(crate) fn for_tests(id: Arc<Identity>) -> LinkSettings {
        LinkSettings {
            identity: id,
            queue_cap: 100,
            window: 128,
            max_window: 128,
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            cells: Pool::new("cells", 10_000),
            control: Pool::new("control", usize::MAX),
            net: anomos_net::tcp(),
        }
    }
}

/// An established neighbor link.
pub struct Link {
    /// The edge.
    pub nid: NeighborId,
    /// The neighbor.
    pub peer: Fingerprint,
    /// Whether we dialed.
    pub dialer: bool,
    /// Sending side.
    pub writer: Arc<LinkWriter>,
    /// The neighbor's share of the node's cell pool: what is queued for circuits it opened is charged here.
    pub cells: Arc<Share>,
    /// A number no other link of this process has (links to one neighbor replace each other; this tells them
    /// apart).
    pub serial: u64,
    /// When the link came up.
    pub since: Instant,
    peer_window: AtomicU32,
    peer_max_window: AtomicU32,
    close_reason: Mutex<Option<&'static str>>,
    /// When it began to drain (it lost a crossing; on the clock of `anomos_net::rt::now`).
    draining_since: Mutex<Option<Instant>>,
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

impl Link {
    /// A link object over an authenticated edge (its tasks are not running; see [`run`]).
    pub fn new(nid: NeighborId, peer: Fingerprint, dialer: bool, settings: &LinkSettings) -> Arc<Link> {
        Arc::new(Link {
            nid,
            peer,
            dialer,
            writer: LinkWriter::new(settings.queue_cap, settings.control.share()),
            cells: settings.cells.share(),
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            since: Instant::now(),
            peer_window: AtomicU32::new(u32::from(anomos_proto::cell::MIN_WINDOW)),
            peer_max_window: AtomicU32::new(u32::from(anomos_proto::cell::MIN_WINDOW)),
            close_reason: Mutex::new(None),
            draining_since: Mutex::new(None),
        })
    }

    /// Marks the link as draining from `now` (the node's registry does, when it lost a crossing).
    pub fn set_draining(&self, now: Instant) {
        self.draining_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(now);
    }

    /// Ends draining: the link became the current one over its edge again (the one it lost to went down).
    pub fn clear_draining(&self) {
        *self.draining_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether an OPEN arriving at `now` is refused because the link has drained for over [`DRAINING_OPENS`].
    pub fn refuses_opens(&self, now: Instant) -> bool {
        self.draining_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| now.saturating_duration_since(t) > DRAINING_OPENS)
    }

    /// Closes the link (its reader and writer end, its circuits break) and records why.
    pub fn close(&self, why: &'static str) {
        self.close_reason.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
        self.writer.close();
    }

    /// Why [`close`](Self::close) was called, if it was.
    pub fn close_reason(&self) -> Option<&'static str> {
        *self.close_reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Credit each new circuit on this link starts with: the receive window the neighbor announced in its
    /// first cell (it enforces that, not ours).
    pub fn send_window(&self) -> u32 {
        self.peer_window.load(Ordering::Relaxed)
    }

    /// The largest window the neighbor announced it may grow a circuit to: credit beyond it is a violation.
    pub fn max_send_window(&self) -> u32 {
        self.peer_max_window.load(Ordering::Relaxed).max(self.send_window())
    }

    /// Sets the window the neighbor announced, and its maximum (or, in tests, pretends it did).
    pub fn set_send_window(&self, w: u32, max: u32) {
        self.peer_window.store(w, Ordering::Relaxed);
        self.peer_max_window.store(max.max(w), Ordering::Relaxed);
    }
}

/// Runs an authenticated link over a socket's two halves until it ends: key confirmation, then every cell to
/// the sink the host gave for it. The host hears `down` for every link it heard `up` for.
pub async fn run<R, W>(
    host: Arc<dyn LinkHost>,
    settings: &LinkSettings,
    rd: R,
    wr: W,
    cipher: LinkCipher,
    rtt: Option<rtt::RttProbe>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let peer = cipher.peer;
    let link = Link::new(cipher.nid, peer, cipher.dialer, settings);
    let writer = link.writer.clone();
    let mut rd = BufReader::with_capacity(READ_BUF, rd);
    let (sealer, mut opener) = cipher.split();
    // Key confirmation and link parameters: our first cell announces our receive window and its maximum.
    let wire = |w: u32| u16::try_from(w).unwrap_or(u16::MAX);
    let _ = writer.push_control(Cell::link_params_growing(wire(settings.window), wire(settings.max_window)));
    let wtask = tokio::spawn(writer.clone().run(wr, sealer, settings.keepalive, settings.idle_timeout, rtt));
    let idle = settings.idle_timeout;
    let mut buf = vec![0u8; SEALED_CELL_LEN];
    let mut sink: Option<Arc<dyn CellSink>> = None;
    let reader = async {
        loop {
            // A whole cell already buffered needs no idle timer (the common case under load).
            let read = if rd.buffer().len() >= SEALED_CELL_LEN {
                rd.read_exact(&mut buf).await
            } else {
                match timeout(idle, rd.read_exact(&mut buf)).await {
                    Err(_) => break format!("idle timeout (no cell or keepalive for {idle:?})"),
                    Ok(r) => r,
                }
            };
            if let Err(e) = read {
                break format!("read: {e}");
            }
            if let Err(e) = opener.open_in_place(&mut buf) {
                break if sink.is_none() {
                    format!("{KEY_CONFIRMATION_FAILED}: {e}")
                } else {
                    format!("bad cell (authentication failed): {e}")
                };
            }
            let cell = match Cell::decode_reusing(buf.get(..CELL_LEN).unwrap_or_default(), writer::payload_box()) {
                Ok(c) => c,
                Err(e) => break format!("malformed cell: {e}"),
            };
            match &sink {
                Some(s) => {
                    if let Err(v) = s.cell(cell) {
                        break format!("protocol violation: {v}");
                    }
                }
                None => {
                    match cell.link_params_window().and_then(|w| Ok((w, cell.link_params_max_window()?))) {
                        Ok((w, max)) => link.set_send_window(u32::from(w), u32::from(max)),
                        Err(e) => break format!("{BAD_CONFIRMATION_CELL}: {e}"),
                    }
                    match host.up(&link) {
                        Some(s) => {
                            info!(peer = %peer.short(), dialer = link.dialer, "link up");
                            sink = Some(s);
                        }
                        None => break NOT_ACCEPTED.to_string(),
                    }
                }
            }
        }
    };
    // The link ends when the reader does, or when the writer gives up (write stall, control-queue overflow,
    // socket error) or the link is closed from elsewhere (replaced by a newer link, retired, OPEN flood).
    let reason: String = tokio::select! {
        // In order (the reader first): the same outcome in every run of a simulation.
        biased;
        r = reader => r,
        why = writer.wait_closed() => match why {
            Some(w) => w.to_string(),
            None => link.close_reason().unwrap_or("closed").to_string(),
        },
    };
    writer.close();
    wtask.abort();
    let host_refused = reason == NOT_ACCEPTED;
    let confirmation_failed =
        [KEY_CONFIRMATION_FAILED, BAD_CONFIRMATION_CELL, "malformed cell"].iter().any(|p| reason.starts_with(p));
    if sink.is_some() {
        info!(peer = %peer.short(), "link down: {reason}");
        host.down(&link, &reason);
    } else if host_refused {
        // The node is shutting down: a neighbor's link arriving now is expected, not an operator's concern.
        debug!(peer = %peer.short(), "link failed before it came up: {reason}");
    } else if confirmation_failed {
        // The neighbor authenticated but does not share the edge's keys (or sent garbage): worth a look.
        warn!(peer = %peer.short(), "link failed before it came up: {reason}");
    } else {
        // The connection ended during key confirmation (typically the neighbor stopped): it will be redialed.
        info!(peer = %peer.short(), "link failed before it came up: {reason}");
    }
    debug!(peer = %peer.short(), "link tasks finished");
}
