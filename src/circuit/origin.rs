//! Opening our own circuits (the requester side, SPEC §7.3) from a tracker grant.

use std::sync::Arc;
use std::time::Duration;

use anomos_proto::cell::{BreakReason, Cell, DenyReason};
use anomos_proto::circuit::Role;
use anomos_proto::crypto::Secret;
use anomos_proto::tracker::{CircuitGrant, FailureKind, FailureReport};

use super::endpoint::{Endpoint, EndpointParts};
use super::router::Router;
use super::stream::CircuitStream;
use super::table::Route;
use crate::error::PeerError;
use crate::link::budget::Unit;
use crate::link::writer::{Drain, OnDrain};

impl Router {
    /// Opens the circuit a tracker grant describes and returns its stream once the end-to-end session is up.
    pub async fn open_circuit(self: &Arc<Self>, grant: &CircuitGrant) -> Result<CircuitStream, PeerError> {
        if self.is_shutting_down() {
            return Err(PeerError::ShuttingDown);
        }
        let Some(link) = self.links.wait_link(grant.first_hop, self.cfg.origin_link_wait).await else {
            // Our own link to the first hop is not up (it died, or never came up): as when it fails under an open
            // circuit, an untagged link-failed report names the circuit, and the tracker, which knows the path it
            // issued, takes the first hop for the suspect (SPEC §3.10).
            self.reporter.report(FailureReport {
                kind: FailureKind::CircuitBroken(BreakReason::LinkFailed.code()),
                neighbor: None,
                circuit: Some(grant.circuit),
                hop_tag: None,
            });
            return Err(PeerError::NoLink(format!("{:?}", grant.first_hop)));
        };
        let lc = self.circuits_of(&link).ok_or_else(|| PeerError::NoLink(format!("{:?}", grant.first_hop)))?;
        let slot = Unit::take(&self.local_slots).map_err(|_| PeerError::Denied(DenyReason::CircuitLimit))?;
        let id = lc.alloc_id();
        let ne = Endpoint::create(EndpointParts {
            on: &lc,
            circ_id: id,
            role: Role::Requester,
            hop_secrets: &grant.secrets(),
            e2e_secret: &Secret(grant.e2e_secret),
            window: self.cfg.window,
            max_window: self.cfg.max_window,
            batch: self.cfg.sendme_batch,
            opened_from: None,
            slot,
        })?;
        let ep = ne.endpoint.clone();
        let _ = ep.grant.set(grant.circuit);
        let weak: std::sync::Weak<dyn OnDrain> = Arc::downgrade(&ep) as _;
        let (credit, max) = (link.send_window(), link.max_send_window());
        link.writer.add_circuit(id, credit, max, Drain::to(weak, 0), self.local_cells.clone());
        if !lc.insert_new(id, Route::Endpoint(ep.clone())) {
            link.writer.remove_circuit(id);
            return Err(PeerError::Internal(format!("circuit id {id:#x} allocated twice")));
        }
        let tc = grant.tc_array()?;
        link.writer.push(Cell::open(id, &tc)).map_err(|_| PeerError::NoLink("link closed".into()))?;
        // Pipelined behind the OPEN. If the circuit was already refused (a DENY can come back before we get
        // here) this push fails; the outcome then arrives on `opened`, which is what we report.
        let _ = ep.send_hello(ne.hello);
        match tokio::time::timeout(self.cfg.open_timeout + Duration::from_secs(2), ne.opened).await {
            Ok(Ok(Ok(()))) => Ok(CircuitStream::from_endpoint(ep, ne.events, Some(self.reporter.clone()))),
            Ok(Ok(Err(e))) => {
                if ep.leave_table() {
                    link.writer.remove_circuit(id);
                }
                Err(e)
            }
            _ => {
                ep.abort(BreakReason::Timeout);
                self.report_broken(&ep, BreakReason::Timeout, None);
                Err(PeerError::Timeout("circuit open"))
            }
        }
    }
}
