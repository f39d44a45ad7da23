//! Circuits on this peer: how each incoming cell is routed, how OPENs are admitted and peeled, and how
//! circuits are torn down.
//!
//! Every link keeps a table `circuit id → Route`. A cell arriving on a link is looked up there:
//! * `Opening`: the OPEN is being peeled (an RSA decryption, done off the reader task); DATA that the
//!   requester pipelined behind the OPEN waits in a small buffer (at most one window).
//! * `Relay`: relayed circuit; the route says whether this link is its in-link or its out-link.
//! * `Endpoint`: we are the requester or the target.
//!
//! Cells for unknown ids (e.g. after a BREAK crossed them) are dropped.

pub mod endpoint;
pub mod relay;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anomos_proto::cell::{BreakReason, Cell, CircId, Command, DenyReason};
use anomos_proto::circuit::Role;
use anomos_proto::crypto::Secret;
use anomos_proto::tc::{self, LayerKind, TC_LEN};
use anomos_proto::tracker::CircuitGrant;
use tracing::{debug, info, warn};

use crate::error::PeerError;
use crate::link::writer::Drain;
use crate::link::{Link, OpenAdmission};
use crate::node::Node;
use endpoint::{CircuitStream, Endpoint};
use relay::{Dir, RelayCircuit};

/// What a circuit id on a link leads to.
#[derive(Clone)]
pub enum Route {
    /// OPEN received, TC being peeled; pipelined DATA buffered.
    Opening(Arc<Mutex<Vec<Cell>>>),
    /// A relayed circuit; `Dir::Fwd` if this link is its in-link (cells arriving here travel forward).
    Relay(Arc<RelayCircuit>, Dir),
    /// We are an end of this circuit.
    Endpoint(Arc<Endpoint>),
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Node {
    /// Routes one cell that arrived on `link`. Returns an error only for link-level protocol violations
    /// (the link is then closed); circuit-level problems break just that circuit.
    pub fn handle_cell(self: &Arc<Self>, link: &Arc<Link>, cell: Cell) -> Result<(), &'static str> {
        let id = cell.circ_id;
        match cell.command {
            Command::Padding => Ok(()),
            Command::Open => {
                self.on_open(link, cell);
                Ok(())
            }
            Command::Sendme => {
                let credit = cell.sendme_credit().map_err(|_| "SENDME with zero credit")?;
                // Credit from the far side of this link lets us send more DATA on this link for this circuit.
                link.writer.add_credit(id, credit as u32);
                Ok(())
            }
            Command::AckBreak => Ok(()),
            _ => {
                let route = link.route(id);
                match (route, cell.command) {
                    (None, _) => {
                        debug!(link = %link.peer.short(), circ = id, cmd = ?cell.command, "cell for unknown circuit dropped");
                        Ok(())
                    }
                    (Some(Route::Opening(buf)), Command::Data) => {
                        let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                        if b.len() >= self.cfg.circuit_window as usize {
                            drop(b);
                            warn!(link = %link.peer.short(), circ = id, "circuit broken: DATA beyond credit while opening");
                            link.remove_route(id);
                            self.send_break(link, id, BreakReason::Protocol, None);
                        } else {
                            b.push(cell);
                        }
                        Ok(())
                    }
                    (Some(Route::Opening(_)), Command::Break) => {
                        // Acknowledged like a BREAK on any circuit we hold (SPEC §7.6); the peel still completes.
                        link.remove_route(id);
                        let _ = link.writer.push_control(Cell::new(id, Command::AckBreak));
                        Ok(())
                    }
                    (Some(Route::Opening(_)), _) => Ok(()),
                    (Some(Route::Relay(rc, dir)), cmd) => {
                        self.relay_cell(&rc, dir, cmd, cell);
                        Ok(())
                    }
                    (Some(Route::Endpoint(ep)), cmd) => {
                        self.endpoint_cell(&ep, cmd, cell);
                        Ok(())
                    }
                }
            }
        }
    }

    fn relay_cell(self: &Arc<Self>, rc: &Arc<RelayCircuit>, dir: Dir, cmd: Command, cell: Cell) {
        match cmd {
            Command::Data => {
                let len = cell.payload.len() as u64;
                match rc.data(dir, cell) {
                    Ok(()) => self.stats.relayed(len),
                    Err(reason) => {
                        warn!(circ = rc.in_id, ?dir, %reason, "relayed circuit broken");
                        self.teardown_relay(rc, reason, Some(rc.tag), None);
                    }
                }
            }
            Command::Confirm if dir == Dir::Bwd => {
                rc.confirmed.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = rc.in_link.writer.push(Cell::new(rc.in_id, Command::Confirm));
            }
            Command::Deny if dir == Dir::Bwd => {
                // Pass the refusal back unchanged (its tag names the hop that refused) and forget the circuit.
                let mut c = cell;
                c.circ_id = rc.in_id;
                rc.out_link.remove_route(rc.out_id);
                rc.out_link.writer.remove_circuit(rc.out_id);
                rc.in_link.remove_route(rc.in_id);
                rc.in_link.writer.remove_circuit(rc.in_id);
                let _ = rc.in_link.writer.push_control(c);
            }
            Command::Break => {
                let (reason, tag) = cell.break_fields().unwrap_or((BreakReason::Protocol, None));
                let (from, from_id) = rc.prev_hop(dir);
                let _ = from.writer.push_control(Cell::new(from_id, Command::AckBreak));
                debug!(circ = rc.in_id, ?dir, %reason, "BREAK relayed");
                self.teardown_relay(rc, reason, tag, Some(dir));
            }
            other => {
                warn!(circ = rc.in_id, cmd = ?other, ?dir, "unexpected cell on relayed circuit");
                self.teardown_relay(rc, BreakReason::Protocol, Some(rc.tag), None);
            }
        }
    }

    /// Removes a relayed circuit and sends BREAK to the side(s) that did not send it. `from` is the direction
    /// of travel of the BREAK we received, if any.
    pub(crate) fn teardown_relay(
        &self,
        rc: &Arc<RelayCircuit>,
        reason: BreakReason,
        tag: Option<[u8; 16]>,
        from: Option<Dir>,
    ) {
        let in_removed = rc.in_link.remove_route(rc.in_id).is_some();
        let out_removed = rc.out_link.remove_route(rc.out_id).is_some();
        if !in_removed && !out_removed {
            return;
        }
        self.stats.broken(reason);
        for (dir, link, id) in [(Dir::Fwd, &rc.out_link, rc.out_id), (Dir::Bwd, &rc.in_link, rc.in_id)] {
            match from {
                // The side the BREAK came from is done: drop what we still had queued for it.
                Some(d) if d != dir => {
                    link.writer.remove_circuit(id);
                }
                // A graceful end passes on behind the data already queued in its direction.
                Some(_) if reason == BreakReason::Finished => {
                    if link.writer.push(Cell::brk(id, reason, tag)).is_err() {
                        let _ = link.writer.push_control(Cell::brk(id, reason, tag));
                    }
                }
                // Failures (and locally detected problems, which go both ways) jump the queue.
                _ => {
                    link.writer.remove_circuit(id);
                    let _ = link.writer.push_control(Cell::brk(id, reason, tag));
                }
            }
        }
    }

    fn endpoint_cell(self: &Arc<Self>, ep: &Arc<Endpoint>, cmd: Command, cell: Cell) {
        match cmd {
            Command::Data => {
                if let Err(reason) = ep.on_data(cell) {
                    warn!(circ = ep.circ_id, role = ?ep.role, %reason, "circuit broken: bad DATA from the other side");
                    ep.closed(reason);
                    self.remove_endpoint(ep, Some(reason));
                }
            }
            Command::Confirm if ep.role == Role::Requester => debug!(circ = ep.circ_id, "circuit confirmed"),
            Command::Deny if ep.role == Role::Requester => {
                let (reason, tag) = cell.deny_fields().unwrap_or((DenyReason::Protocol, None));
                ep.link.remove_route(ep.circ_id);
                ep.link.writer.remove_circuit(ep.circ_id);
                ep.denied(PeerError::Denied(reason));
                self.report_denied(ep, reason, tag);
            }
            Command::Break => {
                let (reason, tag) = cell.break_fields().unwrap_or((BreakReason::Protocol, None));
                let _ = ep.link.writer.push_control(Cell::new(ep.circ_id, Command::AckBreak));
                ep.link.remove_route(ep.circ_id);
                ep.link.writer.remove_circuit(ep.circ_id);
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
                ep.closed(BreakReason::Protocol);
                self.remove_endpoint(ep, Some(BreakReason::Protocol));
            }
        }
    }

    /// Removes an endpoint's route and, if `reason` is given, sends BREAK.
    pub(crate) fn remove_endpoint(&self, ep: &Arc<Endpoint>, reason: Option<BreakReason>) {
        if ep.link.remove_route(ep.circ_id).is_none() {
            return;
        }
        ep.link.writer.remove_circuit(ep.circ_id);
        if let Some(r) = reason {
            let _ = ep.link.writer.push_control(Cell::brk(ep.circ_id, r, None));
        }
    }

    pub(crate) fn send_break(&self, link: &Arc<Link>, id: CircId, reason: BreakReason, tag: Option<[u8; 16]>) {
        link.writer.remove_circuit(id);
        let _ = link.writer.push_control(Cell::brk(id, reason, tag));
    }

    fn deny(&self, link: &Arc<Link>, id: CircId, reason: DenyReason, tag: Option<[u8; 16]>) {
        self.stats.denied(reason);
        info!(link = %link.peer.short(), circ = id, %reason, "circuit denied");
        link.remove_route(id);
        link.writer.remove_circuit(id);
        let _ = link.writer.push_control(Cell::deny(id, reason, tag));
    }

    fn on_open(self: &Arc<Self>, link: &Arc<Link>, cell: Cell) {
        let id = cell.circ_id;
        if !link.is_remote_id(id) || link.route(id).is_some() {
            warn!(link = %link.peer.short(), circ = id, "OPEN on an id that is not the sender's to use");
            let _ = link.writer.push_control(Cell::deny(id, DenyReason::Protocol, None));
            return;
        }
        // Each OPEN costs an RSA decryption: a link gets `open_rate` per second (with a burst); beyond that
        // OPENs are refused unpeeled, and a link that keeps flooding is closed.
        match link.admit_open() {
            OpenAdmission::Admit => {}
            OpenAdmission::Deny => {
                self.stats.denied(DenyReason::CircuitLimit);
                debug!(link = %link.peer.short(), circ = id, "OPEN over the link's rate; denied unpeeled");
                let _ = link.writer.push_control(Cell::deny(id, DenyReason::CircuitLimit, None));
                return;
            }
            OpenAdmission::Abuse => {
                warn!(link = %link.peer.short(), rate = self.cfg.open_rate, burst = self.cfg.open_burst,
                    "closing link: OPEN flood (far over the per-link OPEN rate)");
                link.close("OPEN flood");
                return;
            }
        }
        let Some(guard) = self.try_circuit() else {
            self.deny(link, id, DenyReason::CircuitLimit, None);
            return;
        };
        let tc_bytes = match cell.open_tc() {
            Ok(t) => Box::new(t),
            Err(_) => return,
        };
        let buf = Arc::new(Mutex::new(Vec::new()));
        link.set_route(id, Route::Opening(buf.clone()));
        let node = self.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let id_key = node.identity.clone();
            let peeled = tokio::task::spawn_blocking(move || tc::peel(&tc_bytes, &id_key)).await;
            let peeled = match peeled {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    info!(link = %link.peer.short(), circ = id, error = %e, "tracking code did not peel");
                    node.deny(&link, id, DenyReason::BadTc, None);
                    return;
                }
                Err(_) => {
                    node.deny(&link, id, DenyReason::BadTc, None);
                    return;
                }
            };
            let layer = peeled.layer;
            let tag = Some(layer.replay_tag);
            if layer.prev != link.nid {
                node.deny(&link, id, DenyReason::WrongLink, tag);
                return;
            }
            if layer.check_expiry(now_secs(), node.cfg.clock_skew.as_secs()).is_err() {
                node.deny(&link, id, DenyReason::Expired, tag);
                return;
            }
            if !node.replay_check(layer.replay_tag, layer.expires) {
                node.deny(&link, id, DenyReason::Replayed, tag);
                return;
            }
            match layer.kind {
                LayerKind::Relay { next } => {
                    let Some(next_tc) = peeled.next else {
                        node.deny(&link, id, DenyReason::BadTc, tag);
                        return;
                    };
                    node.open_relay(link, id, next, next_tc, &layer.hop_secret, layer.replay_tag, buf, guard).await;
                }
                LayerKind::Target { chain, e2e_secret, .. } => {
                    if !node.cfg.serve.contains(&chain) || node.service.is_none() {
                        node.deny(&link, id, DenyReason::NoSuchChain, tag);
                        return;
                    }
                    node.open_target(link, id, &layer.hop_secret, &e2e_secret, buf, guard);
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_relay(
        self: &Arc<Self>,
        in_link: Arc<Link>,
        in_id: CircId,
        next: anomos_proto::ids::NeighborId,
        next_tc: Box<[u8; TC_LEN]>,
        hop_secret: &Secret,
        tag: [u8; 16],
        buf: Arc<Mutex<Vec<Cell>>>,
        guard: crate::node::CircuitGuard,
    ) {
        let Some(out_link) = self.wait_link(next, Duration::from_secs(3)).await else {
            self.deny(&in_link, in_id, DenyReason::NoSuchNeighbor, Some(tag));
            return;
        };
        let out_id = out_link.alloc_id();
        let w = self.cfg.circuit_window;
        let rc = Arc::new(RelayCircuit::new(
            in_link.clone(),
            in_id,
            out_link.clone(),
            out_id,
            anomos_proto::circuit::HopLayer::new(hop_secret),
            tag,
            w,
            self.cfg.sendme_batch(),
            self.trace.clone(),
            guard,
        ));
        {
            // Install atomically with respect to cells arriving on the in-link: they see either Opening (and
            // are buffered) or Relay (and are relayed after the buffer, which we flush under the same lock).
            let mut routes = in_link.routes_lock();
            if !matches!(routes.get(&in_id), Some(Route::Opening(b)) if Arc::ptr_eq(b, &buf)) {
                return; // broken while we were peeling
            }
            out_link.writer.add_circuit(out_id, out_link.send_window(), Drain::Relay(Arc::downgrade(&rc), Dir::Fwd));
            out_link.set_route(out_id, Route::Relay(rc.clone(), Dir::Bwd));
            in_link.writer.add_circuit(in_id, in_link.send_window(), Drain::Relay(Arc::downgrade(&rc), Dir::Bwd));
            if out_link.writer.push(Cell::open(out_id, &next_tc)).is_err() {
                drop(routes);
                out_link.remove_route(out_id);
                out_link.writer.remove_circuit(out_id);
                self.deny(&in_link, in_id, DenyReason::NoSuchNeighbor, Some(tag));
                return;
            }
            routes.insert(in_id, Route::Relay(rc.clone(), Dir::Fwd));
            let pending: Vec<Cell> = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
            for c in pending {
                if rc.data(Dir::Fwd, c).is_err() {
                    break;
                }
            }
        }
        self.stats.relay_opened();
        debug!(in_link = %in_link.peer.short(), out_link = %out_link.peer.short(), "relaying circuit");
        // Open timeout: no CONFIRM (or any backward traffic) in time → DENY upstream, BREAK downstream.
        let node = self.clone();
        let timeout = self.cfg.open_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if !rc.confirmed.load(std::sync::atomic::Ordering::Relaxed) && rc.in_link.route(rc.in_id).is_some() {
                info!(circ = rc.in_id, "no CONFIRM from downstream in time");
                rc.out_link.remove_route(rc.out_id);
                node.send_break(&rc.out_link, rc.out_id, BreakReason::Timeout, None);
                node.deny(&rc.in_link, rc.in_id, DenyReason::Timeout, Some(rc.tag));
            }
        });
    }

    fn open_target(
        self: &Arc<Self>,
        link: Arc<Link>,
        id: CircId,
        hop_secret: &Secret,
        e2e: &Secret,
        buf: Arc<Mutex<Vec<Cell>>>,
        guard: crate::node::CircuitGuard,
    ) {
        let w = self.cfg.circuit_window;
        let ne = match Endpoint::create(
            link.clone(),
            id,
            Role::Target,
            std::slice::from_ref(hop_secret),
            e2e,
            w,
            self.cfg.sendme_batch(),
            guard,
        ) {
            Ok(ne) => ne,
            Err(_) => {
                self.deny(&link, id, DenyReason::Protocol, None);
                return;
            }
        };
        let ep = ne.endpoint.clone();
        {
            let mut routes = link.routes_lock();
            if !matches!(routes.get(&id), Some(Route::Opening(b)) if Arc::ptr_eq(b, &buf)) {
                return;
            }
            link.writer.add_circuit(id, link.send_window(), Drain::Endpoint(Arc::downgrade(&ep)));
            let _ = link.writer.push(Cell::new(id, Command::Confirm));
            if ep.send_hello(ne.hello).is_err() {
                return;
            }
            routes.insert(id, Route::Endpoint(ep.clone()));
            let pending: Vec<Cell> = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
            for c in pending {
                if let Err(reason) = ep.on_data(c) {
                    drop(routes);
                    ep.closed(reason);
                    self.remove_endpoint(&ep, Some(reason));
                    return;
                }
            }
        }
        self.stats.target_opened();
        info!(circ = id, "circuit opened to us as target");
        let node = self.clone();
        tokio::spawn(async move {
            // The session is up once the requester's HELLO arrived (possibly already, from the buffer).
            match tokio::time::timeout(node.cfg.open_timeout, ne.opened).await {
                Ok(Ok(Ok(()))) => {
                    if let Some(svc) = &node.service {
                        svc.accept(CircuitStream::from_endpoint(ep, ne.events, None));
                    }
                }
                _ => {
                    ep.closed(BreakReason::Timeout);
                    node.remove_endpoint(&ep, Some(BreakReason::Timeout));
                }
            }
        });
    }

    /// Requester: opens the circuit a tracker grant describes and returns its stream once the end-to-end
    /// session is up.
    pub async fn open_circuit(self: &Arc<Self>, grant: &CircuitGrant) -> Result<CircuitStream, PeerError> {
        let link = self
            .wait_link(grant.first_hop, Duration::from_secs(5))
            .await
            .ok_or_else(|| PeerError::NoLink(format!("{:?}", grant.first_hop)))?;
        let guard = self.try_circuit().ok_or(PeerError::Denied(DenyReason::CircuitLimit))?;
        let id = link.alloc_id();
        let w = self.cfg.circuit_window;
        let e2e = Secret(grant.e2e_secret);
        let ne = Endpoint::create(
            link.clone(),
            id,
            Role::Requester,
            &grant.secrets(),
            &e2e,
            w,
            self.cfg.sendme_batch(),
            guard,
        )?;
        let ep = ne.endpoint.clone();
        let _ = ep.grant.set(grant.circuit);
        link.writer.add_circuit(id, link.send_window(), Drain::Endpoint(Arc::downgrade(&ep)));
        link.set_route(id, Route::Endpoint(ep.clone()));
        let tc = grant.tc_array()?;
        link.writer.push(Cell::open(id, &tc)).map_err(|_| PeerError::NoLink("link closed".into()))?;
        // Pipelined behind the OPEN. If the circuit was already refused (a DENY can come back before we get
        // here) this push fails; the outcome then arrives on `opened`, which is what we report.
        let _ = ep.send_hello(ne.hello);
        match tokio::time::timeout(self.cfg.open_timeout + Duration::from_secs(2), ne.opened).await {
            Ok(Ok(Ok(()))) => Ok(CircuitStream::from_endpoint(ep, ne.events, Some(Arc::downgrade(self)))),
            Ok(Ok(Err(e))) => {
                self.remove_endpoint(&ep, None);
                Err(e)
            }
            _ => {
                self.remove_endpoint(&ep, Some(BreakReason::Timeout));
                self.report_broken(&ep, BreakReason::Timeout, None);
                Err(PeerError::Timeout("circuit open"))
            }
        }
    }
}

/// Graceful close of an endpoint (used by [`CircuitStream::close`]).
pub(crate) async fn close_endpoint(ep: &Arc<Endpoint>) {
    ep.finish().await;
    abort_endpoint(ep, BreakReason::Finished);
}

/// Immediate close of an endpoint.
pub(crate) fn abort_endpoint(ep: &Arc<Endpoint>, reason: BreakReason) {
    if ep.link.remove_route(ep.circ_id).is_some() {
        ep.link.writer.remove_circuit(ep.circ_id);
        let _ = ep.link.writer.push_control(Cell::brk(ep.circ_id, reason, None));
    }
    ep.closed(reason);
}
