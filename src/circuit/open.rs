//! OPEN at a hop: admission (id, rate, the neighbor's share of circuit slots), the peel off the I/O path, the
//! checks of SPEC §4.7 (edge, loop, expiry, replay), and becoming a relay or a target.
//!
//! Every refusal is answered (DENY with its reason, within the time the checks take: the only wait is for a
//! link to the next hop that we expect to come up, at most `link_wait`) and logged, except when the neighbor
//! broke the opening meanwhile: then its id may already carry a new circuit, and nothing is sent for the old one.

use std::sync::Arc;

use anomos_proto::cell::{BreakReason, Cell, CircId, Command, DenyReason};
use anomos_proto::circuit::{HopLayer, Role};
use anomos_proto::crypto::Secret;
use anomos_proto::tc::{self, LayerKind, TC_LEN};
use anomos_proto::ProtoError;
use tracing::{debug, info, warn};

use super::endpoint::{Endpoint, EndpointParts};
use super::limit::OpenAdmission;
use super::relay::{Dir, RelayCircuit, RelayParts, Side};
use super::replay::ReplayRefusal;
use super::router::Router;
use super::stream::CircuitStream;
use super::table::{LinkCircuits, Opening, OpeningState, Route};
use crate::link::budget::Unit;
use crate::link::writer::{Drain, PushError};

/// An OPEN admitted and being peeled here.
struct Peeling {
    lc: Arc<LinkCircuits>,
    id: CircId,
    op: Arc<Opening>,
    slot: Unit,
}

impl Router {
    /// Denies an OPEN that was never admitted (no state was created for it).
    fn deny_unadmitted(&self, lc: &LinkCircuits, id: CircId, reason: DenyReason) {
        self.stats.denied(reason);
        let _ = lc.link.writer.push_control(Cell::deny(id, reason, None));
    }

    /// An OPEN arrived on `lc`'s link.
    pub(super) fn on_open(self: &Arc<Self>, lc: &Arc<LinkCircuits>, cell: Cell) {
        let id = cell.circ_id;
        if !lc.is_remote_id(id) || lc.get(id).is_some() {
            warn!(link = %lc.link.peer.short(), circ = id, "OPEN on an id that is not the sender's to use");
            self.deny_unadmitted(lc, id, DenyReason::Protocol);
            return;
        }
        // Each OPEN costs an RSA decryption: a link gets `open_rate` per second (with a burst); beyond that
        // OPENs are refused unpeeled, and a link that keeps flooding is closed.
        match lc.admit_open() {
            OpenAdmission::Admit => {}
            OpenAdmission::Deny => {
                debug!(link = %lc.link.peer.short(), circ = id, "OPEN over the link's rate; denied unpeeled");
                self.deny_unadmitted(lc, id, DenyReason::CircuitLimit);
                return;
            }
            OpenAdmission::Abuse => {
                warn!(link = %lc.link.peer.short(), rate = self.cfg.open_rate, burst = self.cfg.open_burst,
                    "closing link: OPEN flood (far over the per-link OPEN rate)");
                lc.link.close("OPEN flood");
                return;
            }
        }
        if self.is_shutting_down() || lc.link.refuses_opens(anomos_net::rt::now()) {
            // (A link that lost a crossing takes no new circuits once the neighbor has seen the other link.)
            self.deny_unadmitted(lc, id, DenyReason::CircuitLimit);
            return;
        }
        // A fair share of the circuit slots per neighbor: when slots run low, the neighbor holding the most is
        // refused first.
        let slot = match Unit::take(&lc.slots) {
            Ok(s) => s,
            Err(o) => {
                info!(link = %lc.link.peer.short(), circ = id, held = o.held, fair_part = o.fair_part, used = o.used,
                    "circuit denied: circuit-limit (the neighbor holds more than its share of the circuit slots)");
                self.deny_unadmitted(lc, id, DenyReason::CircuitLimit);
                return;
            }
        };
        let Ok(tc_bytes) = cell.open_tc().map(Box::new) else {
            self.deny_unadmitted(lc, id, DenyReason::Protocol);
            return;
        };
        let op = Opening::new(lc.link.cells.clone());
        if !lc.insert_new(id, Route::Opening(op.clone())) {
            self.deny_unadmitted(lc, id, DenyReason::Protocol);
            return;
        }
        let router = self.clone();
        let p = Peeling { lc: lc.clone(), id, op, slot };
        #[cfg(test)]
        let hook = self.peel_hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tokio::spawn(async move {
            let key = router.identity.clone();
            let peeled = anomos_net::rt::spawn_blocking(move || {
                let r = tc::peel(&tc_bytes, &key);
                #[cfg(test)]
                if let Some(h) = hook {
                    h(&r);
                }
                r
            })
            .await;
            router.peeled(p, peeled).await;
        });
    }

    /// Refuses an admitted OPEN with `reason` — unless the neighbor broke it meanwhile (then nothing is sent).
    fn refuse(&self, p: &Peeling, reason: DenyReason, tag: Option<[u8; 16]>) {
        self.refuse_at(&p.lc, p.id, &p.op, reason, tag)
    }

    fn refuse_at(&self, lc: &LinkCircuits, id: CircId, op: &Arc<Opening>, reason: DenyReason, tag: Option<[u8; 16]>) {
        let r = Route::Opening(op.clone());
        if !op.abandon(BreakReason::Protocol) || lc.remove_if(id, |x| x.same(&r)).is_none() {
            debug!(circ = id, %reason, "refusal not sent: the neighbor broke the circuit while it was peeled");
            return;
        }
        self.stats.denied(reason);
        info!(link = %lc.link.peer.short(), circ = id, %reason, "circuit denied");
        lc.link.writer.remove_circuit(id);
        let _ = lc.link.writer.push_control(Cell::deny(id, reason, tag));
    }

    async fn peeled(
        self: &Arc<Self>,
        p: Peeling,
        peeled: Result<Result<tc::Peeled, ProtoError>, tokio::task::JoinError>,
    ) {
        let peeled = match peeled {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                info!(link = %p.lc.link.peer.short(), circ = p.id, error = %e, "tracking code did not peel");
                return self.refuse(&p, DenyReason::BadTc, None);
            }
            Err(e) => {
                warn!(circ = p.id, "peel task failed: {e}");
                return self.refuse(&p, DenyReason::BadTc, None);
            }
        };
        let layer = peeled.layer;
        let tag = Some(layer.replay_tag);
        if layer.prev != p.lc.link.nid {
            return self.refuse(&p, DenyReason::WrongLink, tag);
        }
        match layer.check_expiry(self.clock.unix_now(), self.cfg.clock_skew.as_secs()) {
            Ok(()) => {}
            Err(e @ ProtoError::ExpiryTooFar { .. }) => {
                warn!(link = %p.lc.link.peer.short(), circ = p.id, "circuit denied: expired ({e}; no tracker issues such a layer)");
                return self.refuse(&p, DenyReason::Expired, tag);
            }
            Err(_) => return self.refuse(&p, DenyReason::Expired, tag),
        }
        match self.replay_check(layer.replay_tag, layer.expires, layer.prev) {
            Ok(()) => {}
            Err(ReplayRefusal::Seen) => return self.refuse(&p, DenyReason::Replayed, tag),
            Err(ReplayRefusal::EdgeOverShare { held, fair_part }) => {
                warn!(link = %p.lc.link.peer.short(), circ = p.id, held, fair_part,
                    "circuit denied: replayed (replay cache tight and this edge holds more than its share)");
                return self.refuse(&p, DenyReason::Replayed, tag);
            }
        }
        match layer.kind {
            LayerKind::Relay { next } => {
                if next == p.lc.link.nid {
                    warn!(link = %p.lc.link.peer.short(), circ = p.id, "circuit denied: loop (the next hop is the edge the OPEN came in on)");
                    return self.refuse(&p, DenyReason::Loop, tag);
                }
                let Some(next_tc) = peeled.next else {
                    return self.refuse(&p, DenyReason::BadTc, tag);
                };
                self.open_relay(p, next, next_tc, HopLayer::new(&layer.hop_secret), layer.replay_tag).await;
            }
            LayerKind::Target { chain, e2e_secret, .. } => {
                if !self.cfg.serve.contains(&chain) || self.service.is_none() {
                    return self.refuse(&p, DenyReason::NoSuchChain, tag);
                }
                self.open_target(p, &layer.hop_secret, &e2e_secret);
            }
        }
    }

    async fn open_relay(
        self: &Arc<Self>,
        p: Peeling,
        next: anomos_proto::ids::NeighborId,
        next_tc: Box<[u8; TC_LEN]>,
        layer: HopLayer,
        tag: [u8; 16],
    ) {
        if !matches!(p.op.state(), OpeningState::Buffering) {
            return; // broken by the neighbor while it was peeled: nothing to open downstream
        }
        // Wait for the next hop's link (at most `link_wait`) if it is an edge of ours that is not up yet. An edge we
        // do not know may be one the tracker made after our last announce: ask for a fresh table (rate-limited) and
        // wait the same, but give up as soon as a fresh table still lacks it. Meanwhile the OPEN holds only its
        // sender's shares of our slots and cells.
        let out = match self.links.link(next) {
            Some(l) => Some(l),
            None if self.links.expects(next) => self.links.wait_link(next, self.cfg.link_wait).await,
            None => {
                self.links.refresh();
                self.links.wait_new_edge(next, self.cfg.link_wait).await
            }
        };
        let Some(out_lc) = out.as_deref().and_then(|l| self.circuits_of(l)) else {
            return self.refuse(&p, DenyReason::NoSuchNeighbor, Some(tag));
        };
        if out_lc.link.serial == p.lc.link.serial {
            warn!(link = %p.lc.link.peer.short(), circ = p.id, "circuit denied: loop (the next hop's link is the one the OPEN came in on)");
            return self.refuse(&p, DenyReason::Loop, Some(tag));
        }
        #[cfg(test)]
        {
            // (Cloned out first: the hook must not run under the hook's own lock.)
            let hook = self.install_hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        let Peeling { lc, id, op, slot } = p;
        let out_id = out_lc.alloc_id();
        let rc = RelayCircuit::new(RelayParts {
            inward: Side::on(&lc, id),
            outward: Side::on(&out_lc, out_id),
            layer,
            tag,
            opened_from: op.serial,
            window: self.cfg.window,
            max_window: self.cfg.max_window,
            batch: self.cfg.sendme_batch,
            stats: self.stats.clone(),
            trace: self.trace.clone(),
            slot,
        });
        // Both queues are charged to the neighbor that opened the circuit.
        let payer = lc.link.cells.clone();
        let weak: std::sync::Weak<dyn crate::link::writer::OnDrain> = Arc::downgrade(&rc) as _;
        let out_w = &out_lc.link.writer;
        let (out_l, in_l) = (&out_lc.link, &lc.link);
        let fwd = Drain::to(weak.clone(), Dir::Fwd.lane());
        out_w.add_circuit(out_id, out_l.send_window(), out_l.max_send_window(), fwd, payer.clone());
        let bwd = Drain::to(weak, Dir::Bwd.lane());
        in_l.writer.add_circuit(id, in_l.send_window(), in_l.max_send_window(), bwd, payer);
        let installed = out_lc.insert_new(out_id, Route::Relay(rc.clone(), Dir::Bwd));
        let pushed = if installed { out_w.push(Cell::open(out_id, &next_tc)) } else { Err(PushError::NoCircuit) };
        if let Err(e) = pushed {
            out_lc.remove_if(out_id, |r| r.is_relay(&rc));
            out_w.remove_circuit(out_id);
            // Over its share of the node's cell budget, the opener is refused as for slots; otherwise the
            // out-link went away under us.
            let reason = match e {
                PushError::OverShare(_) | PushError::Full => DenyReason::CircuitLimit,
                PushError::Closed | PushError::NoCircuit => DenyReason::NoSuchNeighbor,
            };
            return self.refuse_at(&lc, id, &op, reason, Some(tag));
        }
        // The DATA buffered behind the OPEN goes through first, in order; then the opening is the relay.
        let failed = match op.complete(OpeningState::Relay(rc.clone()), |c| rc.data(Dir::Fwd, c)) {
            Ok(failed) => {
                lc.replace(id, &Route::Opening(op), Route::Relay(rc.clone(), Dir::Fwd));
                failed
            }
            Err(state) => {
                // The neighbor broke it while we set it up: pass that on downstream.
                let reason = match state {
                    OpeningState::Gone(r) => r,
                    _ => BreakReason::Protocol,
                };
                rc.teardown(reason, None, Some(Dir::Fwd));
                return;
            }
        };
        if let Some(reason) = failed {
            warn!(circ = id, %reason, "relayed circuit broken while passing on its buffered DATA");
            rc.teardown(reason, Some(tag), None);
            return;
        }
        self.stats.relay_opened();
        debug!(in_link = %lc.link.peer.short(), out_link = %out_lc.link.peer.short(), "relaying circuit");
        // Open timeout: no CONFIRM (or any backward traffic) in time → DENY upstream, BREAK downstream.
        let timeout = self.cfg.open_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            rc.open_timed_out();
        });
    }

    fn open_target(self: &Arc<Self>, p: Peeling, hop_secret: &Secret, e2e: &Secret) {
        let Peeling { lc, id, op, slot } = p;
        let created = Endpoint::create(EndpointParts {
            on: &lc,
            circ_id: id,
            role: Role::Target,
            hop_secrets: std::slice::from_ref(hop_secret),
            e2e_secret: e2e,
            window: self.cfg.window,
            max_window: self.cfg.max_window,
            batch: self.cfg.sendme_batch,
            opened_from: Some(op.serial),
            slot,
        });
        let ne = match created {
            Ok(ne) => ne,
            Err(e) => {
                warn!(circ = id, "target endpoint not created: {e}");
                return self.refuse_at(&lc, id, &op, DenyReason::Protocol, None);
            }
        };
        let ep = ne.endpoint.clone();
        let weak: std::sync::Weak<dyn crate::link::writer::OnDrain> = Arc::downgrade(&ep) as _;
        let l = &lc.link;
        l.writer.add_circuit(id, l.send_window(), l.max_send_window(), Drain::to(weak, 0), l.cells.clone());
        let _ = lc.link.writer.push(Cell::new(id, Command::Confirm));
        let _ = ep.send_hello(ne.hello);
        let failed = match op.complete(OpeningState::Target(ep.clone()), |c| ep.on_data(c)) {
            Ok(failed) => {
                lc.replace(id, &Route::Opening(op), Route::Endpoint(ep.clone()));
                failed
            }
            Err(state) => {
                lc.link.writer.remove_circuit(id);
                ep.closed(match state {
                    OpeningState::Gone(r) => r,
                    _ => BreakReason::Protocol,
                });
                return;
            }
        };
        if let Some(reason) = failed {
            warn!(circ = id, %reason, "circuit broken: bad DATA from the requester");
            self.end_endpoint(&ep, reason);
            return;
        }
        self.stats.target_opened();
        info!(circ = id, "circuit opened to us as target");
        let router = self.clone();
        tokio::spawn(async move {
            // The session is up once the requester's HELLO arrived (possibly already, from the buffer).
            match tokio::time::timeout(router.cfg.open_timeout, ne.opened).await {
                Ok(Ok(Ok(()))) => {
                    if let Some(svc) = &router.service {
                        svc.accept(CircuitStream::from_endpoint(ep, ne.events, None));
                    }
                }
                _ => router.end_endpoint(&ep, BreakReason::Timeout),
            }
        });
    }
}
