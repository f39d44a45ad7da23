//! The sending side of a link: per-circuit queues, credit-based flow control and fair scheduling.
//!
//! Every circuit on a link has one ordered queue here. A queue's head may be sent when it is not DATA, or when
//! the circuit has credit (granted by SENDMEs from the far side of this link). The writer task takes one cell
//! per ready circuit in turn (round-robin), so one busy circuit cannot starve the others; link-level cells
//! (SENDME, PADDING) go first. Cells are sealed into one buffer per batch and written with a single syscall.
//! When a DATA cell has actually been written, the queue's [`Drain`] hook runs: a relay then returns credit
//! to its upstream, an endpoint lets its application send one more cell.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use anomos_proto::cell::{Cell, CircId, Command, CELL_LEN, SEALED_CELL_LEN};
use anomos_proto::link::CellSealer;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::circuit::endpoint::Endpoint;
use crate::circuit::relay::{Dir, RelayCircuit};

/// Most cells sealed into one write.
const BATCH: usize = 32;

/// What happens when a DATA cell of a queue has left for the wire.
#[derive(Clone)]
pub enum Drain {
    /// Nothing (e.g. no flow control on this queue).
    None,
    /// A relay forwarded a cell in direction `Dir`: give credit back upstream.
    Relay(Weak<RelayCircuit>, Dir),
    /// An endpoint sent a cell: its application may queue another.
    Endpoint(Weak<Endpoint>),
}

struct CircQueue {
    cells: VecDeque<Cell>,
    credit: u32,
    /// Credit above this is a peer granting more than its window allows; it is clamped.
    max_credit: u32,
    drain: Drain,
    in_ready: bool,
}

#[derive(Default)]
struct State {
    control: VecDeque<Cell>,
    queues: HashMap<CircId, CircQueue>,
    ready: VecDeque<CircId>,
    queued: usize,
    closed: bool,
}

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The link is closed.
    Closed,
    /// No queue for this circuit (already torn down).
    NoCircuit,
    /// The link's queue cap was reached.
    Full,
}

/// The shared handle circuits use to send on a link.
pub struct LinkWriter {
    st: Mutex<State>,
    wake: Notify,
    cap: usize,
}

impl LinkWriter {
    /// A writer whose queues hold at most `cap` cells in total.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(LinkWriter { st: Mutex::new(State::default()), wake: Notify::new(), cap })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the state itself stays consistent (no multi-step invariants
        // across panics), so keep going rather than cascade.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the queue for a circuit with its initial send credit.
    pub fn add_circuit(&self, id: CircId, credit: u32, drain: Drain) {
        let mut st = self.lock();
        let max_credit = credit.max(1).saturating_mul(2);
        st.queues.insert(id, CircQueue { cells: VecDeque::new(), credit, max_credit, drain, in_ready: false });
    }

    /// Removes a circuit's queue, dropping what it still held; returns how many cells were dropped.
    pub fn remove_circuit(&self, id: CircId) -> usize {
        let mut st = self.lock();
        let n = st.queues.remove(&id).map(|q| q.cells.len()).unwrap_or(0);
        st.queued -= n;
        n
    }

    /// Queues a cell on its circuit's ordered queue.
    pub fn push(&self, cell: Cell) -> Result<(), PushError> {
        let mut st = self.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        if st.queued >= self.cap {
            return Err(PushError::Full);
        }
        let id = cell.circ_id;
        let q = st.queues.get_mut(&id).ok_or(PushError::NoCircuit)?;
        q.cells.push_back(cell);
        let newly_ready = !q.in_ready && sendable(q);
        if newly_ready {
            q.in_ready = true;
        }
        st.queued += 1;
        if newly_ready {
            st.ready.push_back(id);
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Queues a cell that is not bound to circuit order (SENDME, PADDING, BREAK/DENY for unknown ids).
    pub fn push_control(&self, cell: Cell) -> Result<(), PushError> {
        let mut st = self.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        // Control cells are few (one SENDME per quarter window per circuit); a peer that makes us queue
        // more than the cap of them is stalling the link, which then gets closed.
        if st.control.len() >= self.cap {
            return Err(PushError::Full);
        }
        st.control.push_back(cell);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Adds send credit to a circuit (from a SENDME).
    pub fn add_credit(&self, id: CircId, n: u32) {
        let mut st = self.lock();
        let Some(q) = st.queues.get_mut(&id) else { return };
        q.credit = q.credit.saturating_add(n).min(q.max_credit);
        let newly_ready = !q.in_ready && sendable(q);
        if newly_ready {
            q.in_ready = true;
            st.ready.push_back(id);
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Cells queued on a circuit (for tests/metrics).
    pub fn queued(&self, id: CircId) -> usize {
        self.lock().queues.get(&id).map(|q| q.cells.len()).unwrap_or(0)
    }

    /// Cells queued on the whole link.
    pub fn total_queued(&self) -> usize {
        self.lock().queued
    }

    /// Marks the link closed; queued cells are dropped and the writer task ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queues.clear();
        st.control.clear();
        st.ready.clear();
        st.queued = 0;
        drop(st);
        self.wake.notify_one();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Takes the next batch: control cells first, then one cell per ready circuit in turn.
    fn next_batch(&self, out: &mut Vec<(Cell, Drain)>) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        while out.len() < BATCH {
            if let Some(c) = st.control.pop_front() {
                out.push((c, Drain::None));
                continue;
            }
            let Some(id) = st.ready.pop_front() else { break };
            let State { queues, ready, queued, .. } = &mut *st;
            let Some(q) = queues.get_mut(&id) else { continue };
            q.in_ready = false;
            if !sendable(q) {
                continue;
            }
            let Some(cell) = q.cells.pop_front() else { continue };
            *queued -= 1;
            let drain = if cell.command == Command::Data {
                q.credit -= 1;
                q.drain.clone()
            } else {
                Drain::None
            };
            if cell.command == Command::Break {
                // An ordered BREAK is the circuit's last cell on this link.
                let rest = q.cells.len();
                queues.remove(&id);
                *queued -= rest;
            } else if sendable(q) {
                q.in_ready = true;
                ready.push_back(id);
            }
            out.push((cell, drain));
        }
        true
    }

    /// The writer task: runs until the link closes or the socket fails. `keepalive` PADDING keeps an idle
    /// link visibly alive for the other side's idle timeout.
    pub async fn run<W: AsyncWriteExt + Unpin>(
        self: Arc<Self>,
        mut sock: W,
        mut sealer: CellSealer,
        keepalive: std::time::Duration,
    ) -> std::io::Result<()> {
        let mut batch: Vec<(Cell, Drain)> = Vec::with_capacity(BATCH);
        let mut buf = vec![0u8; BATCH * SEALED_CELL_LEN];
        loop {
            batch.clear();
            if !self.next_batch(&mut batch) {
                return Ok(());
            }
            if batch.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(keepalive) => {
                        let _ = self.push_control(Cell::padding());
                    }
                }
                continue;
            }
            for (i, (cell, _)) in batch.iter().enumerate() {
                let slot = &mut buf[i * SEALED_CELL_LEN..(i + 1) * SEALED_CELL_LEN];
                let plain: &mut [u8; CELL_LEN] = (&mut slot[..CELL_LEN]).try_into().map_err(std::io::Error::other)?;
                cell.encode_into(plain);
                sealer.seal_in_place(slot).map_err(std::io::Error::other)?;
            }
            sock.write_all(&buf[..batch.len() * SEALED_CELL_LEN]).await?;
            for (_, drain) in batch.drain(..) {
                match drain {
                    Drain::None => {}
                    Drain::Relay(c, dir) => {
                        if let Some(c) = c.upgrade() {
                            c.drained(dir);
                        }
                    }
                    Drain::Endpoint(e) => {
                        if let Some(e) = e.upgrade() {
                            e.drained();
                        }
                    }
                }
            }
        }
    }
}

fn sendable(q: &CircQueue) -> bool {
    match q.cells.front() {
        None => false,
        Some(c) => c.command != Command::Data || q.credit > 0,
    }
}
