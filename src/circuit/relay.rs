//! The Relayer: a circuit passing through this peer, between an in-link (toward the requester) and an
//! out-link (toward the target).
//!
//! Each DATA cell gets this hop's onion layer (stripped going forward, added going backward) and moves to the
//! other link's queue for that circuit. Flow control is hop by hop: the sender on each side may have at most
//! `window` DATA cells outstanding; we return credit (SENDME) only when cells have left on the other link.
//! So this relay never holds more than `window` cells per circuit and direction, however slow the next reader is,
//! and a slow reader makes the sender wait. A sender that exceeds its credit breaks the circuit. Each direction's
//! window is auto-tuned between the announced window and its maximum (`window.rs`).
//!
//! A relayed circuit holds its two links (to queue cells) and only weak handles to their route tables (to leave
//! them when it ends), so tables and circuits never keep each other alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anomos_proto::cell::{BreakReason, Cell, CircId, Command, DenyReason};
use anomos_proto::circuit::HopLayer;
use tracing::{debug, info, warn};

use super::table::LinkCircuits;
use super::window::Tuner;
use super::Trace;
use crate::link::budget::Unit;
use crate::link::writer::{OnDrain, PushError};
use crate::link::Link;
use crate::stats::Stats;

/// Direction of travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Requester → target (arrives on the in-link).
    Fwd,
    /// Target → requester (arrives on the out-link).
    Bwd,
}

impl Dir {
    /// The writer drain lane of cells travelling this way.
    pub fn lane(self) -> u8 {
        match self {
            Dir::Fwd => 0,
            Dir::Bwd => 1,
        }
    }
}

struct Credit {
    /// DATA cells the sender may still send us.
    allow: u32,
    /// Cells forwarded since we last returned credit.
    drained: u32,
    /// The window: `allow + queued + drained` (+ credit withheld while it shrinks).
    tuner: Tuner,
}

impl Credit {
    fn new(window: u32, max: u32) -> Credit {
        Credit { allow: window, drained: 0, tuner: Tuner::new(window, max) }
    }
}

/// Sends `credit` back as SENDMEs (more than one when it exceeds a SENDME's u16).
pub(crate) fn send_credit(link: &Link, id: CircId, mut credit: u32) {
    while credit > 0 {
        let n = credit.min(u32::from(u16::MAX));
        credit -= n;
        let _ = link.writer.push_control(Cell::sendme(id, n as u16));
    }
}

/// Whether the node's cell pool (seen through a link's share) is more than a quarter used: windows stop growing.
pub(crate) fn pool_tight(link: &Link) -> bool {
    let pool = link.cells.pool();
    pool.used().saturating_mul(4) > pool.cap()
}

/// One side of a relayed circuit.
pub struct Side {
    /// The link.
    pub link: Arc<Link>,
    /// Its circuit table (weak: the table holds the circuit).
    pub circuits: Weak<LinkCircuits>,
    /// The circuit's id there.
    pub id: CircId,
}

impl Side {
    /// A side on `lc` with id `id`.
    pub fn on(lc: &Arc<LinkCircuits>, id: CircId) -> Side {
        Side { link: lc.link.clone(), circuits: Arc::downgrade(lc), id }
    }
}

/// One relayed circuit.
pub struct RelayCircuit {
    /// Toward the requester.
    pub inward: Side,
    /// Toward the target.
    pub outward: Side,
    /// This hop's replay tag (put into BREAKs we originate so the tracker can place the failure).
    pub tag: [u8; 16],
    /// The serial of the opening this circuit was peeled from (its in-link entry until replaced).
    pub opened_from: u64,
    /// Set when CONFIRM has passed back through us.
    confirmed: AtomicBool,
    /// Set once, by whoever tears the circuit down first.
    closed: AtomicBool,
    layer: Mutex<HopLayer>,
    fwd: Mutex<Credit>,
    bwd: Mutex<Credit>,
    batch: u32,
    stats: Arc<Stats>,
    trace: Option<Arc<Trace>>,
    _slot: Unit,
}

/// What a relayed circuit is built from.
pub struct RelayParts {
    /// Toward the requester.
    pub inward: Side,
    /// Toward the target.
    pub outward: Side,
    /// This hop's onion layer.
    pub layer: HopLayer,
    /// This hop's replay tag.
    pub tag: [u8; 16],
    /// The opening it was peeled from.
    pub opened_from: u64,
    /// Our receive window on both sides (where it starts).
    pub window: u32,
    /// The largest it may grow to.
    pub max_window: u32,
    /// SENDME batch.
    pub batch: u32,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Debug trace of relayed payloads.
    pub trace: Option<Arc<Trace>>,
    /// The circuit slot it holds while alive.
    pub slot: Unit,
}

impl RelayCircuit {
    /// A new relayed circuit; both senders start with `window` credit.
    pub fn new(p: RelayParts) -> Arc<Self> {
        Arc::new(RelayCircuit {
            inward: p.inward,
            outward: p.outward,
            tag: p.tag,
            opened_from: p.opened_from,
            confirmed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            layer: Mutex::new(p.layer),
            fwd: Mutex::new(Credit::new(p.window, p.max_window)),
            bwd: Mutex::new(Credit::new(p.window, p.max_window)),
            batch: p.batch,
            stats: p.stats,
            trace: p.trace,
            _slot: p.slot,
        })
    }

    fn credit(&self, dir: Dir) -> std::sync::MutexGuard<'_, Credit> {
        match dir {
            Dir::Fwd => self.fwd.lock(),
            Dir::Bwd => self.bwd.lock(),
        }
        .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether CONFIRM has come back through us.
    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Whether the circuit has been torn down.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Relays one DATA cell that arrived travelling in `dir`.
    pub fn data(&self, dir: Dir, mut cell: Cell) -> Result<(), BreakReason> {
        {
            let mut c = self.credit(dir);
            if c.allow == 0 {
                let from = self.prev_hop(dir);
                warn!(circ = self.inward.id, ?dir, from = %from.link.peer.short(), "DATA beyond credit");
                return Err(BreakReason::Protocol);
            }
            c.allow -= 1;
        }
        let before = self.trace.as_ref().map(|_| cell.payload.to_vec());
        let len = cell.payload.len() as u64;
        {
            // Only this direction's reader task calls us for `dir`, so counters advance in arrival order.
            let mut layer = self.layer.lock().unwrap_or_else(|e| e.into_inner());
            match dir {
                Dir::Fwd => layer.forward(&mut cell.payload[..]),
                Dir::Bwd => layer.backward(&mut cell.payload[..]),
            }
        }
        if let (Some(t), Some(b)) = (&self.trace, before) {
            t.record(self.outward.id, dir, &b, &cell.payload[..]);
        }
        let next = self.next_hop(dir);
        cell.circ_id = next.id;
        next.link.writer.push(cell).map_err(|e| match e {
            PushError::Full | PushError::OverShare(_) => BreakReason::Resources,
            PushError::Closed | PushError::NoCircuit => BreakReason::LinkFailed,
        })?;
        self.stats.relayed(len);
        Ok(())
    }

    /// Where a cell travelling in `dir` goes next.
    pub fn next_hop(&self, dir: Dir) -> &Side {
        match dir {
            Dir::Fwd => &self.outward,
            Dir::Bwd => &self.inward,
        }
    }

    /// Where a cell travelling in `dir` came from.
    pub fn prev_hop(&self, dir: Dir) -> &Side {
        match dir {
            Dir::Fwd => &self.inward,
            Dir::Bwd => &self.outward,
        }
    }

    /// Handles a cell of this circuit that arrived travelling in `dir` (SENDME is handled by the caller).
    pub fn on_cell(&self, dir: Dir, cell: Cell) {
        match cell.command {
            Command::Data => {
                if let Err(reason) = self.data(dir, cell) {
                    warn!(circ = self.inward.id, ?dir, %reason, "relayed circuit broken");
                    self.teardown(reason, Some(self.tag), None);
                }
            }
            Command::Confirm if dir == Dir::Bwd => {
                self.confirmed.store(true, Ordering::Relaxed);
                let _ = self.inward.link.writer.push(Cell::new(self.inward.id, Command::Confirm));
            }
            Command::Deny if dir == Dir::Bwd => {
                // Pass the refusal back (its tag names the hop that refused) and forget the circuit. A refusal
                // without a tag came from our successor, which did not peel (it was full or over its rate): we
                // say so with our own tag, so that the requester's report names the hop after us, and an untagged
                // `circuit-limit` reaching a requester can only come from its first hop (SPEC §7.5).
                if self.close_once() {
                    let mut c = match cell.deny_fields() {
                        Ok((DenyReason::CircuitLimit, None)) => {
                            Cell::deny(self.inward.id, DenyReason::NextRefused, Some(self.tag))
                        }
                        _ => cell,
                    };
                    c.circ_id = self.inward.id;
                    self.leave_tables();
                    self.outward.link.writer.remove_circuit(self.outward.id);
                    self.inward.link.writer.remove_circuit(self.inward.id);
                    let _ = self.inward.link.writer.push_control(c);
                }
            }
            Command::Break => {
                let (reason, tag) = cell.break_fields().unwrap_or((BreakReason::Protocol, None));
                let from = self.prev_hop(dir);
                let _ = from.link.writer.push_control(Cell::new(from.id, Command::AckBreak));
                debug!(circ = self.inward.id, ?dir, %reason, "BREAK relayed");
                self.teardown(reason, tag, Some(dir));
            }
            other => {
                warn!(circ = self.inward.id, cmd = ?other, ?dir, "unexpected cell on relayed circuit");
                self.teardown(BreakReason::Protocol, Some(self.tag), None);
            }
        }
    }

    fn close_once(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// Leaves both route tables (only the entries that are still this circuit's).
    fn leave_tables(&self) {
        for side in [&self.inward, &self.outward] {
            if let Some(lc) = side.circuits.upgrade() {
                lc.remove_if(side.id, |r| r.is_relay(self));
            }
        }
    }

    /// Tears the circuit down once and sends BREAK to the side(s) that did not send it. `from` is the direction
    /// of travel of the BREAK we received, if any.
    pub fn teardown(&self, reason: BreakReason, tag: Option<[u8; 16]>, from: Option<Dir>) {
        if !self.close_once() {
            return;
        }
        self.leave_tables();
        self.stats.broken(reason);
        for (dir, side) in [(Dir::Fwd, &self.outward), (Dir::Bwd, &self.inward)] {
            let w = &side.link.writer;
            match from {
                // The side the BREAK came from is done: drop what we still had queued for it.
                Some(d) if d != dir => {
                    w.remove_circuit(side.id);
                }
                // A graceful end passes on behind the data already queued in its direction.
                Some(_) if reason == BreakReason::Finished => {
                    if w.push(Cell::brk(side.id, reason, tag)).is_err() {
                        w.remove_circuit(side.id);
                        let _ = w.push_control(Cell::brk(side.id, reason, tag));
                    }
                }
                // Failures (and locally detected problems, which go both ways) jump the queue.
                _ => {
                    w.remove_circuit(side.id);
                    let _ = w.push_control(Cell::brk(side.id, reason, tag));
                }
            }
        }
    }

    /// The open timer fired: if no CONFIRM came back, BREAK `timeout` downstream and DENY `timeout` (with our
    /// tag) upstream.
    pub fn open_timed_out(&self) {
        if self.is_confirmed() || !self.close_once() {
            return;
        }
        info!(circ = self.inward.id, "no CONFIRM from downstream in time");
        self.leave_tables();
        self.stats.denied(DenyReason::Timeout);
        let (o, i) = (&self.outward, &self.inward);
        o.link.writer.remove_circuit(o.id);
        let _ = o.link.writer.push_control(Cell::brk(o.id, BreakReason::Timeout, None));
        i.link.writer.remove_circuit(i.id);
        let _ = i.link.writer.push_control(Cell::deny(i.id, DenyReason::Timeout, Some(self.tag)));
    }
}

impl OnDrain for RelayCircuit {
    /// A cell travelling in the lane's direction has left on the next link: return credit to its sender in
    /// batches.
    fn drained(&self, lane: u8) {
        let dir = if lane == Dir::Fwd.lane() { Dir::Fwd } else { Dir::Bwd };
        let (prev, next) = (self.prev_hop(dir), self.next_hop(dir));
        let grant = {
            let mut c = self.credit(dir);
            c.drained += 1;
            if c.drained >= self.batch {
                c.drained -= self.batch;
                let rtt = prev.link.writer.rtt();
                // (The next link's writer lock is a leaf: taking it under our credit lock cannot deadlock.)
                let queued = u32::try_from(next.link.writer.queued(next.id)).unwrap_or(u32::MAX);
                let tight = pool_tight(&prev.link);
                let g = c.tuner.on_drained(self.batch, anomos_net::rt::now(), rtt, tight, queued);
                c.allow += g;
                g
            } else {
                0
            }
        };
        send_credit(&prev.link, prev.id, grant);
    }
}
