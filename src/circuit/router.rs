//! The [`Router`]: the circuit layer's state (per-link circuit tables, circuit slots, replay cache) and the
//! dispatch of every cell an up link delivers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anomos_net::Clock;
use anomos_proto::cell::{BreakReason, Cell, CircId, Command, DenyReason};
use anomos_proto::circuit::Role;
use anomos_proto::identity::Identity;
use anomos_proto::ids::NeighborId;
use anomos_proto::tracker::{FailureKind, FailureReport};
use tracing::{debug, info, warn};

use super::endpoint::Endpoint;
use super::relay::Dir;
use super::replay::{write_atomic, ReplayCache, ReplayRefusal};
use super::table::{LinkCircuits, Opening, OpeningState, Route};
use super::{CircuitConfig, CircuitsByRole, LinkDirectory, Reporter, Service, Trace};
use crate::error::PeerError;
use crate::link::budget::{Pool, Share};
use crate::link::{CellSink, Link, Violation};
use crate::stats::Stats;

/// What a [`Router`] is built from: the narrow handles the circuit layer needs, nothing more.
pub struct RouterParts {
    /// Settings.
    pub cfg: CircuitConfig,
    /// Our identity (peels OPENs).
    pub identity: Arc<Identity>,
    /// Our host's wall clock (TC expiries, the replay cache).
    pub clock: Clock,
    /// Live links by NeighborID.
    pub links: Arc<dyn LinkDirectory>,
    /// Failure reports for the tracker.
    pub reporter: Reporter,
    /// Who takes circuits that end here.
    pub service: Option<Arc<dyn Service>>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Debug trace of relayed payloads.
    pub trace: Option<Arc<Trace>>,
    /// The node's circuit slots (`--max-circuits`).
    pub slots: Arc<Pool>,
    /// The node's pool of queued DATA cells (our own circuits get a share of it too).
    pub cells: Arc<Pool>,
    /// The replay cache (loaded from disk by the caller).
    pub replay: ReplayCache,
}

/// The circuit layer of one peer.
pub struct Router {
    pub(super) cfg: CircuitConfig,
    pub(super) identity: Arc<Identity>,
    pub(super) clock: Clock,
    pub(super) links: Arc<dyn LinkDirectory>,
    pub(super) reporter: Reporter,
    pub(super) service: Option<Arc<dyn Service>>,
    pub(super) stats: Arc<Stats>,
    pub(super) trace: Option<Arc<Trace>>,
    attached: Mutex<HashMap<u64, Arc<LinkCircuits>>>,
    slots: Arc<Pool>,
    /// Our own circuits' share of the slots and of the cell pool.
    pub(super) local_slots: Arc<Share>,
    pub(super) local_cells: Arc<Share>,
    replay: Mutex<ReplayCache>,
    shutting_down: AtomicBool,
    /// Test hook: runs in `open_relay` between finding the out-link and installing the circuit on it.
    #[cfg(test)]
    pub(super) install_hook: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Test hook: runs on the blocking peel thread right after each peel, with its result.
    #[cfg(test)]
    pub(super) peel_hook: Mutex<Option<PeelHook>>,
}

/// A test hook called with every peel's result.
#[cfg(test)]
pub(super) type PeelHook = Arc<dyn Fn(&anomos_proto::Result<anomos_proto::tc::Peeled>) + Send + Sync>;

/// The sink an up link's reader hands its cells to.
struct LinkSink {
    router: Arc<Router>,
    lc: Arc<LinkCircuits>,
}

impl CellSink for LinkSink {
    fn cell(&self, cell: Cell) -> Result<(), Violation> {
        self.router.on_cell(&self.lc, cell)
    }
}

impl Router {
    /// A router over the handles given.
    pub fn new(p: RouterParts) -> Arc<Router> {
        Arc::new(Router {
            local_slots: p.slots.share(),
            local_cells: p.cells.share(),
            cfg: p.cfg,
            identity: p.identity,
            clock: p.clock,
            links: p.links,
            reporter: p.reporter,
            service: p.service,
            stats: p.stats,
            trace: p.trace,
            attached: Mutex::new(HashMap::new()),
            slots: p.slots,
            replay: Mutex::new(p.replay),
            shutting_down: AtomicBool::new(false),
            #[cfg(test)]
            install_hook: Mutex::new(None),
            #[cfg(test)]
            peel_hook: Mutex::new(None),
        })
    }

    /// Every link's circuit table, in link order (not the map's: the same order in every run of a simulation).
    fn tables(&self) -> Vec<Arc<LinkCircuits>> {
        let mut v: Vec<(u64, Arc<LinkCircuits>)> = self.attached().iter().map(|(k, lc)| (*k, lc.clone())).collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, lc)| lc).collect()
    }

    fn attached(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LinkCircuits>>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A link came up: its circuit state, and the sink its cells go to.
    pub fn attach(self: &Arc<Self>, link: &Arc<Link>) -> Arc<dyn CellSink> {
        let lc = LinkCircuits::new(link.clone(), self.slots.share(), self.cfg.open_rate, self.cfg.open_burst);
        self.attached().insert(link.serial, lc.clone());
        Arc::new(LinkSink { router: self.clone(), lc })
    }

    /// The circuit state of an attached link.
    pub fn circuits_of(&self, link: &Link) -> Option<Arc<LinkCircuits>> {
        self.attached().get(&link.serial).cloned()
    }

    /// Circuits on a link.
    pub fn circuits_on(&self, link: &Link) -> usize {
        self.circuits_of(link).map(|lc| lc.len()).unwrap_or(0)
    }

    /// A link went down: every circuit on it breaks, in both directions.
    pub fn detach(&self, link: &Link) {
        let Some(lc) = self.attached().remove(&link.serial) else { return };
        for (_, route) in lc.drain() {
            match route {
                Route::Relay(rc, _) => {
                    debug!(circ = rc.inward.id, reason = %BreakReason::LinkFailed, "relayed circuit broken: a link failed");
                    rc.teardown(BreakReason::LinkFailed, Some(rc.tag), None);
                }
                Route::Endpoint(ep) => self.endpoint_link_failed(&ep),
                Route::Opening(op) => match op.state() {
                    OpeningState::Relay(rc) => rc.teardown(BreakReason::LinkFailed, Some(rc.tag), None),
                    OpeningState::Target(ep) => self.endpoint_link_failed(&ep),
                    _ => {
                        op.abandon(BreakReason::LinkFailed);
                    }
                },
            }
        }
    }

    fn endpoint_link_failed(&self, ep: &Arc<Endpoint>) {
        self.stats.broken(BreakReason::LinkFailed);
        info!(circ = ep.circ_id, role = ?ep.role, reason = %BreakReason::LinkFailed, "circuit broken: its link failed");
        ep.closed(BreakReason::LinkFailed);
        if ep.role == Role::Requester {
            self.report_broken(ep, BreakReason::LinkFailed, None);
        }
    }

    /// Whether shutdown has begun (no new circuits).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Graceful shutdown of the circuit layer: refuses new circuits and breaks every one with BREAK(shutdown)
    /// (relayed ones in both directions). Returns how many circuits it broke.
    pub fn shutdown(&self) -> usize {
        self.shutting_down.store(true, Ordering::Relaxed);
        let tables = self.tables();
        let snapshots: Vec<_> = tables.into_iter().map(|lc| (lc.snapshot(), lc)).collect();
        // Relayed circuits are counted before any is torn down: a relay circuit has a route on each of its two
        // links, and tearing it down from its out-link's route first closed it before its in-link's was counted.
        let mut circuits = snapshots
            .iter()
            .flat_map(|(routes, _)| routes.iter())
            .filter(|(_, r)| matches!(r, Route::Relay(rc, Dir::Fwd) if !rc.is_closed()))
            .count();
        for (routes, lc) in snapshots {
            for (id, route) in routes {
                match route {
                    Route::Relay(rc, _) => {
                        rc.teardown(BreakReason::Shutdown, Some(rc.tag), None);
                    }
                    Route::Endpoint(ep) => {
                        circuits += 1;
                        self.stats.broken(BreakReason::Shutdown);
                        ep.abort(BreakReason::Shutdown);
                    }
                    // An OPEN still being peeled: the hop before us waits for CONFIRM; tell it now.
                    Route::Opening(op) => {
                        let r = Route::Opening(op.clone());
                        if op.abandon(BreakReason::Shutdown) && lc.remove_if(id, |x| x.same(&r)).is_some() {
                            send_break(&lc.link, id, BreakReason::Shutdown, None);
                        }
                    }
                }
            }
        }
        circuits
    }

    /// Circuits alive here, by role (a relayed circuit is counted once, on its in-link).
    pub fn by_role(&self) -> CircuitsByRole {
        let tables = self.tables();
        let mut c = CircuitsByRole::default();
        for lc in tables {
            for (_, r) in lc.snapshot() {
                match r {
                    Route::Opening(_) => c.opening += 1,
                    Route::Relay(_, Dir::Fwd) => c.relay += 1,
                    Route::Relay(_, Dir::Bwd) => {}
                    Route::Endpoint(ep) if ep.role == Role::Requester => c.origin += 1,
                    Route::Endpoint(_) => c.target += 1,
                }
            }
        }
        c
    }

    /// Circuit slots in use (relayed circuits and endpoints).
    pub fn circuit_count(&self) -> usize {
        self.slots.used()
    }

    /// Routes one cell that arrived on `lc`'s link. An error is a link-level protocol violation (the link is
    /// closed); circuit-level problems break just that circuit.
    pub(super) fn on_cell(self: &Arc<Self>, lc: &Arc<LinkCircuits>, cell: Cell) -> Result<(), Violation> {
        let id = cell.circ_id;
        match cell.command {
            Command::Padding => Ok(()),
            Command::Open => {
                self.on_open(lc, cell);
                Ok(())
            }
            Command::Sendme => {
                let credit = cell.sendme_credit().map_err(|_| Violation("SENDME with zero credit"))?;
                // Credit from the far side of this link lets us send more DATA on this link for this circuit.
                if lc.get(id).is_none() {
                    debug!(link = %lc.link.peer.short(), circ = id, "SENDME for unknown circuit ignored");
                    return Ok(());
                }
                if let Err(o) = lc.link.writer.add_credit(id, u32::from(credit)) {
                    warn!(link = %lc.link.peer.short(), circ = id, had = o.had, added = o.added, max = o.max,
                        "circuit broken: SENDME beyond the window (credit overflow)");
                    self.break_route(lc, id, BreakReason::Protocol);
                }
                Ok(())
            }
            Command::AckBreak => Ok(()),
            _ => {
                match lc.get(id) {
                    None => {
                        debug!(link = %lc.link.peer.short(), circ = id, cmd = ?cell.command, "cell for unknown circuit dropped")
                    }
                    Some(Route::Opening(op)) => self.opening_cell(lc, id, &op, cell),
                    Some(Route::Relay(rc, dir)) => rc.on_cell(dir, cell),
                    Some(Route::Endpoint(ep)) => self.endpoint_cell(&ep, cell),
                }
                Ok(())
            }
        }
    }

    /// Breaks whatever circuit `id` is on `lc` with `reason` (detected here, so BREAK goes every way).
    fn break_route(&self, lc: &Arc<LinkCircuits>, id: CircId, reason: BreakReason) {
        match lc.get(id) {
            Some(Route::Relay(rc, _)) => rc.teardown(reason, Some(rc.tag), None),
            Some(Route::Endpoint(ep)) => self.end_endpoint(&ep, reason),
            Some(Route::Opening(op)) => match op.state() {
                OpeningState::Relay(rc) => rc.teardown(reason, Some(rc.tag), None),
                OpeningState::Target(ep) => self.end_endpoint(&ep, reason),
                _ => self.drop_opening(lc, id, &op, reason),
            },
            None => {}
        }
    }

    /// Ends an opening we are breaking ourselves: forgotten, BREAK upstream.
    fn drop_opening(&self, lc: &Arc<LinkCircuits>, id: CircId, op: &Arc<Opening>, reason: BreakReason) {
        let r = Route::Opening(op.clone());
        if op.abandon(reason) && lc.remove_if(id, |x| x.same(&r)).is_some() {
            send_break(&lc.link, id, reason, None);
        }
    }

    /// A cell for an OPEN still being peeled (or one that has just become a circuit).
    fn opening_cell(self: &Arc<Self>, lc: &Arc<LinkCircuits>, id: CircId, op: &Arc<Opening>, cell: Cell) {
        let cell = match cell.command {
            Command::Data => match op.buffer(cell, self.cfg.window) {
                Ok(None) => return,
                Ok(Some((_, cell))) => cell,
                Err(reason) => {
                    warn!(link = %lc.link.peer.short(), circ = id, %reason,
                        "circuit broken while opening: DATA beyond the window, or the neighbor is over its share of the cell budget");
                    self.drop_opening(lc, id, op, reason);
                    return;
                }
            },
            Command::Break => {
                // Acknowledged like a BREAK on any circuit we hold (SPEC §7.6). The peel still completes (the
                // replay tag is recorded) but answers nothing: the id is free for the neighbor again.
                let (reason, _) = cell.break_fields().unwrap_or((BreakReason::Protocol, None));
                let r = Route::Opening(op.clone());
                if op.abandon(reason) {
                    if lc.remove_if(id, |x| x.same(&r)).is_some() {
                        let _ = lc.link.writer.push_control(Cell::new(id, Command::AckBreak));
                    }
                    return;
                }
                cell
            }
            _ => cell,
        };
        // The opening has become a circuit since the lookup: the cell is that circuit's.
        match op.state() {
            OpeningState::Relay(rc) => rc.on_cell(Dir::Fwd, cell),
            OpeningState::Target(ep) => self.endpoint_cell(&ep, cell),
            OpeningState::Buffering | OpeningState::Gone(_) => {
                debug!(link = %lc.link.peer.short(), circ = id, cmd = ?cell.command, "cell for an opening circuit ignored")
            }
        }
    }

    /// A cell for a circuit that ends here.
    fn endpoint_cell(&self, ep: &Arc<Endpoint>, cell: Cell) {
        match cell.command {
            Command::Data => {
                if let Err(reason) = ep.on_data(cell) {
                    warn!(circ = ep.circ_id, role = ?ep.role, %reason, "circuit broken: bad DATA from the other side");
                    self.end_endpoint(ep, reason);
                }
            }
            Command::Confirm if ep.role == Role::Requester => debug!(circ = ep.circ_id, "circuit confirmed"),
            Command::Deny if ep.role == Role::Requester => {
                let (reason, tag) = cell.deny_fields().unwrap_or((DenyReason::Protocol, None));
                if ep.leave_table() {
                    ep.link.writer.remove_circuit(ep.circ_id);
                }
                ep.denied(PeerError::Denied(reason));
                warn!(circ = ep.circ_id, %reason, "circuit denied");
                self.stats.denies_received.inc(reason.as_str());
                self.reporter.report(FailureReport {
                    kind: FailureKind::CircuitDenied(reason.code()),
                    neighbor: None,
                    circuit: ep.grant.get().copied(),
                    hop_tag: tag,
                });
            }
            Command::Break => {
                let (reason, tag) = cell.break_fields().unwrap_or((BreakReason::Protocol, None));
                let _ = ep.link.writer.push_control(Cell::new(ep.circ_id, Command::AckBreak));
                if ep.leave_table() {
                    ep.link.writer.remove_circuit(ep.circ_id);
                }
                info!(circ = ep.circ_id, role = ?ep.role, %reason, "circuit broken by the other side");
                if ep.role == Role::Target {
                    self.stats.broken(reason); // the requester's are counted when reported
                }
                ep.closed(reason);
                if ep.role == Role::Requester && reason != BreakReason::Finished {
                    self.report_broken(ep, reason, tag);
                }
            }
            other => {
                warn!(circ = ep.circ_id, cmd = ?other, "unexpected cell at endpoint");
                self.end_endpoint(ep, BreakReason::Protocol);
            }
        }
    }

    /// Ends an endpoint we are breaking ourselves: BREAK `reason` to the other side.
    pub(super) fn end_endpoint(&self, ep: &Arc<Endpoint>, reason: BreakReason) {
        ep.abort(reason);
    }

    /// Reports a broken circuit of ours to the tracker.
    pub(super) fn report_broken(&self, ep: &Endpoint, reason: BreakReason, tag: Option<[u8; 16]>) {
        // Link failures were counted where the link went down.
        if reason != BreakReason::LinkFailed {
            self.stats.broken(reason);
        }
        self.reporter.report(FailureReport {
            kind: FailureKind::CircuitBroken(reason.code()),
            neighbor: None,
            circuit: ep.grant.get().copied(),
            hop_tag: tag,
        });
    }

    /// Records a replay tag that arrived over `edge` (until its expiry plus the skew tolerance).
    pub(super) fn replay_check(&self, tag: [u8; 16], expires: u64, edge: NeighborId) -> Result<(), ReplayRefusal> {
        let horizon = expires.saturating_add(self.cfg.clock_skew.as_secs());
        self.replay.lock().unwrap_or_else(|e| e.into_inner()).check(tag, horizon, edge, self.clock.unix_now())
    }

    /// Replay tags remembered now.
    pub fn replay_len(&self) -> usize {
        self.replay.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Writes the replay cache to `path` if it changed since the last write (or always, with `force`). Returns
    /// the number of tags written, or `None` if nothing was written. Blocking (call it off the async workers).
    pub fn save_replay(&self, path: &Path, force: bool) -> Option<usize> {
        let (data, version, n) = {
            let rc = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            if !force && !rc.dirty() {
                return None;
            }
            let data = rc.encode(self.clock.unix_now());
            let n = (data.len() - 20) / 32;
            (data, rc.version(), n)
        };
        match write_atomic(path, &data) {
            Ok(()) => {
                self.replay.lock().unwrap_or_else(|e| e.into_inner()).mark_saved(version);
                debug!(tags = n, "replay cache saved");
                Some(n)
            }
            Err(e) => {
                warn!(path = %path.display(), "replay cache not saved: {e}");
                None
            }
        }
    }
}

/// Drops what was queued for circuit `id` on `link` and sends BREAK ahead of other traffic.
pub(super) fn send_break(link: &Link, id: CircId, reason: BreakReason, tag: Option<[u8; 16]>) {
    link.writer.remove_circuit(id);
    let _ = link.writer.push_control(Cell::brk(id, reason, tag));
}
