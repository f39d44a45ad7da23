//! Unit tests of the circuit layer: a [`Router`] driven cell by cell over in-memory links (no sockets, no
//! node). A link here is a real [`Link`] whose writer is never run: the test injects cells into the sink the
//! router returned for it and reads what the router queued with `take_written` (which also runs the drain
//! hooks, as a written cell would). Two routers can be joined by a [`Pump`] that moves cells both ways.

mod admission;
mod endpoints;
mod relay;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anomos_proto::cell::{Cell, CircId, Command, DenyReason, DIALER_CIRC_BIT};
use anomos_proto::crypto::Secret;
use anomos_proto::identity::{Identity, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, TC_LEN};

use super::replay::ReplayCache;
use super::{CircuitConfig, LinkDirectory, Reporter, Router, RouterParts, Service};
use crate::link::budget::Pool;
use crate::link::{CellSink, Link, LinkSettings};
use crate::stats::{unix_now, Stats};

/// The committed vector keys (no key generation in unit tests).
pub(super) fn identity(i: usize) -> Arc<Identity> {
    let pem = match i {
        0 => include_str!("../../../proto/tests/vectors/keys/id0_2048.pem"),
        1 => include_str!("../../../proto/tests/vectors/keys/id1_2048.pem"),
        _ => include_str!("../../../proto/tests/vectors/keys/id2_2048.pem"),
    };
    Arc::new(Identity::from_pkcs8_pem(pem).expect("vector key"))
}

/// Live links by NeighborID, and the edges the test says are expected.
#[derive(Default)]
pub(super) struct TestDir {
    links: Mutex<HashMap<NeighborId, Arc<Link>>>,
    expected: Mutex<HashSet<NeighborId>>,
    pub(super) refreshes: Mutex<usize>,
}

impl TestDir {
    pub(super) fn expect(&self, nid: NeighborId) {
        self.expected.lock().unwrap().insert(nid);
    }
}

impl LinkDirectory for TestDir {
    fn link(&self, nid: NeighborId) -> Option<Arc<Link>> {
        self.links.lock().unwrap().get(&nid).cloned()
    }
    fn expects(&self, nid: NeighborId) -> bool {
        self.expected.lock().unwrap().contains(&nid) || self.link(nid).is_some()
    }
    fn refresh(&self) {
        *self.refreshes.lock().unwrap() += 1;
    }
    fn wait_new_edge(
        &self,
        nid: NeighborId,
        _max: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<Link>>> + Send + '_>> {
        // As if the refreshed table came back at once without the edge.
        Box::pin(async move { self.link(nid) })
    }
    fn wait_link(
        &self,
        nid: NeighborId,
        max: Duration,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<Link>>> + Send + '_>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + max;
            loop {
                if let Some(l) = self.link(nid) {
                    return Some(l);
                }
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }
}

/// A service that echoes every message back.
pub(super) struct Echo;

impl Service for Echo {
    fn accept(&self, mut stream: super::CircuitStream) {
        tokio::spawn(async move {
            while let Ok(m) = stream.recv().await {
                if stream.send(m).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// One router under test, with its pools and directory.
pub(super) struct Peer {
    pub(super) id: Arc<Identity>,
    pub(super) router: Arc<Router>,
    pub(super) dir: Arc<TestDir>,
    pub(super) cells: Arc<Pool>,
    pub(super) control: Arc<Pool>,
    pub(super) stats: Arc<Stats>,
    pub(super) reports: Mutex<tokio::sync::mpsc::Receiver<anomos_proto::tracker::FailureReport>>,
}

/// Knobs of a test peer.
pub(super) struct Knobs {
    pub(super) window: u32,
    /// The largest a receive window may grow to (0: the window, no growth).
    pub(super) max_window: u32,
    pub(super) max_cells: usize,
    pub(super) max_circuits: usize,
    pub(super) serve: bool,
    pub(super) link_wait: Duration,
    /// Seconds this peer's wall clock is ahead of the true one (negative: behind).
    pub(super) skew: i64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            window: 8,
            max_window: 0,
            max_cells: 10_000,
            max_circuits: 1000,
            serve: false,
            link_wait: Duration::from_millis(300),
            skew: 0,
        }
    }
}

impl Peer {
    pub(super) fn new(key: usize, k: Knobs) -> Peer {
        let id = identity(key);
        let dir = Arc::new(TestDir::default());
        let cells = Pool::new("cells", k.max_cells);
        let control = Pool::new("control", usize::MAX);
        let stats = Arc::new(Stats::default());
        let (reporter, reports) = Reporter::channel(64);
        let router = Router::new(RouterParts {
            cfg: CircuitConfig {
                window: k.window,
                max_window: k.max_window.max(k.window),
                sendme_batch: (k.window / 4).max(1),
                open_timeout: Duration::from_secs(2),
                clock_skew: Duration::from_secs(60),
                open_rate: 1000,
                open_burst: 1000,
                serve: if k.serve { vec![chain()] } else { Vec::new() },
                link_wait: k.link_wait,
                origin_link_wait: Duration::from_millis(500),
            },
            identity: id.clone(),
            clock: anomos_net::Clock::skewed(k.skew),
            links: dir.clone(),
            reporter,
            service: k.serve.then(|| Arc::new(Echo) as Arc<dyn Service>),
            stats: stats.clone(),
            trace: None,
            slots: Pool::new("slots", k.max_circuits),
            cells: cells.clone(),
            replay: ReplayCache::new(10_000),
        });
        Peer { id, router, dir, cells, control, stats, reports: Mutex::new(reports) }
    }

    /// A link to a neighbor over `nid` (we dial it if `dialer`), attached to the router.
    pub(super) fn link(&self, nid: u64, peer: usize, dialer: bool, window: u32) -> Wire {
        let settings = LinkSettings {
            identity: self.id.clone(),
            queue_cap: 1000,
            window,
            max_window: window,
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            cells: self.cells.clone(),
            control: self.control.clone(),
            net: anomos_net::tcp(),
        };
        let link = Link::new(NeighborId(nid), identity(peer).fingerprint(), dialer, &settings);
        link.set_send_window(window, window);
        let sink = self.router.attach(&link);
        self.dir.links.lock().unwrap().insert(NeighborId(nid), link.clone());
        Wire { link, sink, out: Mutex::new(Vec::new()), next_id: Mutex::new(1) }
    }

    pub(super) fn public(&self) -> PublicKey {
        self.id.public().clone()
    }
}

/// One in-memory link as the far neighbor sees it: what we send it, what it sent us.
pub(super) struct Wire {
    pub(super) link: Arc<Link>,
    pub(super) sink: Arc<dyn CellSink>,
    out: Mutex<Vec<Cell>>,
    next_id: Mutex<u32>,
}

impl Wire {
    /// The neighbor sends a cell.
    pub(super) fn send(&self, cell: Cell) {
        self.sink.cell(cell).expect("no link-level violation");
    }

    /// A fresh id from the neighbor's half.
    pub(super) fn id(&self) -> CircId {
        let mut n = self.next_id.lock().unwrap();
        *n += 1;
        if self.link.dialer {
            *n
        } else {
            *n | DIALER_CIRC_BIT
        }
    }

    /// Everything the router has queued toward the neighbor so far (taken off the queues, drains run).
    pub(super) fn drain(&self) -> Vec<Cell> {
        let mut out = self.out.lock().unwrap();
        out.extend(self.link.writer.take_written());
        std::mem::take(&mut *out)
    }

    /// Waits (up to 3 s) for the first queued cell matching `pred`; cells before it are dropped, cells after
    /// it stay for the next call.
    pub(super) async fn wait(&self, what: &str, pred: impl Fn(&Cell) -> bool) -> Cell {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            {
                let mut out = self.out.lock().unwrap();
                out.extend(self.link.writer.take_written());
                if let Some(i) = out.iter().position(&pred) {
                    let c = out.remove(i);
                    out.drain(..i);
                    return c;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no {what} within 3 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for a cell `cmd` on circuit `id`.
    pub(super) async fn wait_on(&self, id: CircId, cmd: Command) -> Cell {
        self.wait(&format!("{cmd:?} on {id:#x}"), |c| c.circ_id == id && c.command == cmd).await
    }

    /// Whether nothing on circuit `id` (other than SENDME) arrives within `t`.
    pub(super) async fn quiet_on(&self, id: CircId, t: Duration) -> bool {
        tokio::time::sleep(t).await;
        !self.drain().iter().any(|c| c.circ_id == id && c.command != Command::Sendme)
    }
}

/// The chain the test targets serve.
pub(super) fn chain() -> ChainId {
    ChainId::new("regtest").expect("chain id")
}

/// A layer for a hop: `prev` edge, relay to `next` (or target if `None`), expiring `expires`.
pub(super) fn layer(prev: u64, next: Option<u64>, expires: u64) -> Layer {
    let mut tag = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut tag);
    let kind = match next {
        Some(n) => LayerKind::Relay { next: NeighborId(n) },
        None => LayerKind::Target { chain: chain(), session: [7; 16], e2e_secret: Secret([9; 32]) },
    };
    Layer { prev: NeighborId(prev), kind, hop_secret: Secret([3; 32]), expires, replay_tag: tag }
}

/// A TC through `hops` (key, layer).
pub(super) fn tc(hops: Vec<(PublicKey, Layer)>) -> Box<[u8; TC_LEN]> {
    let specs: Vec<HopSpec> = hops.into_iter().map(|(key, layer)| HopSpec { key, layer }).collect();
    tc::build(&specs, &mut rand::rngs::OsRng).expect("tc")
}

/// Soon enough to be valid.
pub(super) fn soon() -> u64 {
    unix_now() + 120
}

/// The DENY reason of a cell.
pub(super) fn deny_reason(c: &Cell) -> DenyReason {
    assert_eq!(c.command, Command::Deny, "expected DENY, got {c:?}");
    c.deny_fields().expect("deny fields").0
}

/// A DATA cell with a recognisable payload.
pub(super) fn data(id: CircId, mark: u8) -> Cell {
    let mut c = Cell::new(id, Command::Data);
    c.payload[..4].copy_from_slice(&[mark; 4]);
    c
}
