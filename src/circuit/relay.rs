//! The Relayer: a circuit passing through this peer, between an in-link (toward the requester) and an
//! out-link (toward the target).
//!
//! Each DATA cell gets this hop's onion layer (stripped going forward, added going backward) and moves to the
//! other link's queue for that circuit. Flow control is hop by hop: the sender on each side may have at most
//! `window` DATA cells outstanding; we return credit (SENDME) only when cells have left on the other link.
//! So this relay never holds more than `window` cells per circuit and direction, however slow the next reader is,
//! and a slow reader makes the sender wait. A sender that exceeds its credit breaks the circuit.

use std::sync::{Arc, Mutex};

use anomos_proto::cell::{BreakReason, Cell, CircId};
use anomos_proto::circuit::HopLayer;

use crate::link::writer::PushError;
use crate::link::Link;
use crate::node::{CircuitGuard, Trace};

/// Direction of travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Requester → target (arrives on the in-link).
    Fwd,
    /// Target → requester (arrives on the out-link).
    Bwd,
}

#[derive(Default)]
struct Credit {
    /// DATA cells the sender may still send us.
    allow: u32,
    /// Cells forwarded since we last returned credit.
    drained: u32,
}

/// One relayed circuit.
pub struct RelayCircuit {
    /// Toward the requester.
    pub in_link: Arc<Link>,
    /// Circuit id on the in-link.
    pub in_id: CircId,
    /// Toward the target.
    pub out_link: Arc<Link>,
    /// Circuit id on the out-link.
    pub out_id: CircId,
    /// This hop's replay tag (put into BREAKs we originate so the tracker can place the failure).
    pub tag: [u8; 16],
    /// Set when CONFIRM has passed back through us.
    pub confirmed: std::sync::atomic::AtomicBool,
    layer: Mutex<HopLayer>,
    fwd: Mutex<Credit>,
    bwd: Mutex<Credit>,
    batch: u32,
    trace: Option<Arc<Trace>>,
    _guard: CircuitGuard,
}

impl RelayCircuit {
    /// A new relayed circuit; both senders start with `window` credit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_link: Arc<Link>,
        in_id: CircId,
        out_link: Arc<Link>,
        out_id: CircId,
        layer: HopLayer,
        tag: [u8; 16],
        window: u32,
        batch: u32,
        trace: Option<Arc<Trace>>,
        guard: CircuitGuard,
    ) -> Self {
        RelayCircuit {
            in_link,
            in_id,
            out_link,
            out_id,
            tag,
            confirmed: std::sync::atomic::AtomicBool::new(false),
            layer: Mutex::new(layer),
            fwd: Mutex::new(Credit { allow: window, drained: 0 }),
            bwd: Mutex::new(Credit { allow: window, drained: 0 }),
            batch,
            trace,
            _guard: guard,
        }
    }

    fn credit(&self, dir: Dir) -> std::sync::MutexGuard<'_, Credit> {
        match dir {
            Dir::Fwd => self.fwd.lock(),
            Dir::Bwd => self.bwd.lock(),
        }
        .unwrap_or_else(|e| e.into_inner())
    }

    /// Relays one DATA cell that arrived travelling in `dir`.
    pub fn data(&self, dir: Dir, mut cell: Cell) -> Result<(), BreakReason> {
        {
            let mut c = self.credit(dir);
            if c.allow == 0 {
                let (from, _) = self.prev_hop(dir);
                tracing::warn!(circ = self.in_id, ?dir, from = %from.peer.short(), "DATA beyond credit");
                return Err(BreakReason::Protocol);
            }
            c.allow -= 1;
        }
        let before = self.trace.as_ref().map(|_| cell.payload.to_vec());
        {
            // Only this direction's reader task calls us for `dir`, so counters advance in arrival order.
            let mut layer = self.layer.lock().unwrap_or_else(|e| e.into_inner());
            match dir {
                Dir::Fwd => layer.forward(&mut cell.payload[..]),
                Dir::Bwd => layer.backward(&mut cell.payload[..]),
            }
        }
        if let (Some(t), Some(b)) = (&self.trace, before) {
            t.record(self.out_id, dir, &b, &cell.payload[..]);
        }
        let (link, id) = self.next_hop(dir);
        cell.circ_id = id;
        link.writer.push(cell).map_err(|e| match e {
            PushError::Full => BreakReason::Resources,
            PushError::Closed | PushError::NoCircuit => BreakReason::LinkFailed,
        })
    }

    /// Where a cell travelling in `dir` goes next.
    pub fn next_hop(&self, dir: Dir) -> (&Arc<Link>, CircId) {
        match dir {
            Dir::Fwd => (&self.out_link, self.out_id),
            Dir::Bwd => (&self.in_link, self.in_id),
        }
    }

    /// Where a cell travelling in `dir` came from.
    pub fn prev_hop(&self, dir: Dir) -> (&Arc<Link>, CircId) {
        match dir {
            Dir::Fwd => (&self.in_link, self.in_id),
            Dir::Bwd => (&self.out_link, self.out_id),
        }
    }

    /// A cell travelling in `dir` has left on the next link: return credit to its sender in batches.
    pub fn drained(&self, dir: Dir) {
        let grant = {
            let mut c = self.credit(dir);
            c.drained += 1;
            if c.drained >= self.batch {
                c.drained -= self.batch;
                c.allow += self.batch;
                true
            } else {
                false
            }
        };
        if grant {
            let (link, id) = self.prev_hop(dir);
            let _ = link.writer.push_control(Cell::sendme(id, self.batch as u16));
        }
    }
}
