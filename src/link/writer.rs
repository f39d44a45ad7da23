//! The sending side of a link: per-circuit queues, credit-based flow control and fair scheduling.
//!
//! Every circuit on a link has one ordered queue here. A queue's head may be sent when it is not DATA, or when
//! the circuit has credit (granted by SENDMEs from the far side of this link). The writer task takes one cell
//! per ready circuit in turn (round-robin), so one busy circuit cannot starve the others; link-level cells
//! (SENDME, PADDING) go first. Cells are sealed into one buffer per batch and written with a single syscall.
//! When a DATA cell has actually been written, the queue's [`Drain`] hook runs: a relay then returns credit
//! to its upstream, an endpoint lets its application send one more cell.
//!
//! Memory is bounded three ways: per circuit by flow control (at most one window of DATA), per link by
//! `cap`, and per node by the cell [`Pool`](super::budget::Pool): every circuit queue is charged to the
//! [`Share`] of the neighbor responsible for it (the one that opened the circuit at this hop), so when the node's
//! pool is tight the neighbor using the most is refused first, never an innocent one (`budget.rs`). Control cells
//! are few per circuit (a SENDME per quarter window, one BREAK/DENY/ACKBREAK); they are bounded per link by `cap`
//! (a neighbor that makes us queue more of them does not read, and its link is closed) and counted in a pool of
//! their own, outside the fairness rule, so no neighbor's DATA can ever make another neighbor's link fail.
//! A write that makes no progress for the stall timeout (the neighbor stopped reading without closing)
//! ends the writer, which takes the link down.
//!
//! Cell payloads (4 KiB boxes) circulate through a small process-wide pool ([`payload_box`] /
//! [`recycle_payloads`]): the link reader decodes into a box from it and the writer gives the box back once the
//! cell is on the wire, so relaying allocates nothing per cell. (Allocated on one task and freed on another,
//! 32 at a time, fresh boxes made glibc trim and regrow its heap constantly: 17 % of a relay's CPU in page
//! faults; docs/PERFORMANCE.md.)

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anomos_proto::cell::{Cell, CircId, Command, CELL_LEN, CELL_PAYLOAD_LEN, SEALED_CELL_LEN};
use anomos_proto::link::CellSealer;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use super::budget::{OverShare, Share};
use super::rtt::RttProbe;

/// Most cells sealed into one write.
const BATCH: usize = 32;

/// A cell payload buffer.
pub type Payload = Box<[u8; CELL_PAYLOAD_LEN]>;

/// Most payload buffers the pool keeps (4 MiB): enough for the cells in flight through a busy relay, small
/// enough not to matter next to the node's cell budget.
const POOL_MAX: usize = 1024;

static POOL: Mutex<Vec<Payload>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Payload>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A payload buffer from the pool, or a new one. Its contents are arbitrary (a previous cell's): the caller
/// overwrites all of it (e.g. [`Cell::decode_reusing`]).
pub fn payload_box() -> Payload {
    pool().pop().unwrap_or_else(|| Box::new([0u8; CELL_PAYLOAD_LEN]))
}

/// Gives payload buffers back to the pool (beyond its size they are freed).
pub fn recycle_payloads(bufs: impl IntoIterator<Item = Payload>) {
    let mut p = pool();
    for b in bufs {
        if p.len() < POOL_MAX {
            p.push(b);
        }
    }
}

/// Told when a DATA cell of a queue has left for the wire: a relay then returns credit to its upstream, an
/// endpoint lets its application send one more cell. The link layer knows nothing else of what is behind it.
pub trait OnDrain: Send + Sync {
    /// One DATA cell of a queue registered with this hook and `lane` was written.
    fn drained(&self, lane: u8);
}

/// What happens when a DATA cell of a queue has left for the wire: nothing, or a hook (held weakly: a circuit
/// that is gone is not kept alive by cells still queued for it).
#[derive(Clone, Default)]
pub struct Drain(Option<(Weak<dyn OnDrain>, u8)>);

impl Drain {
    /// No hook.
    pub fn none() -> Self {
        Drain(None)
    }

    /// Calls `hook.drained(lane)` for every DATA cell written.
    pub fn to(hook: Weak<dyn OnDrain>, lane: u8) -> Self {
        Drain(Some((hook, lane)))
    }

    fn run(&self) {
        if let Some((hook, lane)) = &self.0 {
            if let Some(h) = hook.upgrade() {
                h.drained(*lane);
            }
        }
    }
}

struct CircQueue {
    cells: VecDeque<Cell>,
    credit: u32,
    /// Credit above this is a neighbor granting more than its window allows: a protocol violation.
    max_credit: u32,
    drain: Drain,
    /// Who is charged for the cells queued here.
    share: Arc<Share>,
    in_ready: bool,
}

#[derive(Default)]
struct State {
    control: VecDeque<Cell>,
    queues: HashMap<CircId, CircQueue>,
    ready: VecDeque<CircId>,
    /// Cells in `queues` (not counting `control`).
    queued: usize,
    closed: bool,
    /// Why the writer gave up, if it did on its own (control queue overflow, write stall).
    failure: Option<&'static str>,
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
    /// The node's cell pool is tight and the neighbor charged for this circuit holds more than its fair part.
    OverShare(OverShare),
}

/// A SENDME granted more credit than the receiver's window allows (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditOverflow {
    /// Credit the queue had.
    pub had: u32,
    /// Credit the SENDME added.
    pub added: u32,
    /// The most it may hold.
    pub max: u32,
}

/// The shared handle circuits use to send on a link.
pub struct LinkWriter {
    st: Mutex<State>,
    wake: Notify,
    /// Signalled once when the link is closed (by anyone) so the reader can stop too.
    closed: Notify,
    cap: usize,
    /// Control cells queued here, counted in the node's control pool.
    control: Arc<Share>,
    /// The socket's smoothed RTT in µs (0: unknown), refreshed by the writer task.
    rtt_us: AtomicU32,
}

/// How often the writer task re-reads the socket's RTT while it writes.
const RTT_REFRESH: Duration = Duration::from_millis(100);

/// The RTT published is the lowest sample of this long (BBR's min-RTT filter): the kernel's smoothed RTT also
/// carries queueing and, on a loaded host, scheduling delay, which would grow windows on a loopback or LAN hop.
const RTT_MIN_WINDOW: Duration = Duration::from_secs(10);

impl LinkWriter {
    /// A writer whose circuit queues hold at most `cap` cells in total (each charged to its circuit's share of
    /// the node's cell pool) and whose control queue holds at most `cap` cells (counted in `control`).
    pub fn new(cap: usize, control: Arc<Share>) -> Arc<Self> {
        Arc::new(LinkWriter {
            st: Mutex::new(State::default()),
            wake: Notify::new(),
            closed: Notify::new(),
            cap,
            control,
            rtt_us: AtomicU32::new(0),
        })
    }

    /// The link's smoothed RTT, if known (a TCP link on Linux, once it has carried data).
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(u64::from(us))),
        }
    }

    /// Records the link's RTT (the writer task does; tests pretend).
    pub fn set_rtt(&self, rtt: Option<Duration>) {
        let us = rtt.map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(1));
        self.rtt_us.store(us, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the state itself stays consistent (no multi-step invariants
        // across panics), so keep going rather than cascade.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the queue for a circuit with its initial send credit (the neighbor's announced window); credit
    /// beyond `max_credit` (the largest window it announced) is a violation. Its cells are charged to `share`.
    pub fn add_circuit(&self, id: CircId, credit: u32, max_credit: u32, drain: Drain, share: Arc<Share>) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        let max_credit = max_credit.max(credit).max(1);
        let q = CircQueue { cells: VecDeque::new(), credit, max_credit, drain, share, in_ready: false };
        // An id reused while its old queue still held cells (e.g. an ordered BREAK not yet sent): forget them.
        if let Some(old) = st.queues.insert(id, q) {
            st.queued -= old.cells.len();
            old.share.give(old.cells.len());
        }
    }

    /// Removes a circuit's queue, dropping what it still held; returns how many cells were dropped.
    pub fn remove_circuit(&self, id: CircId) -> usize {
        let mut st = self.lock();
        let Some(q) = st.queues.remove(&id) else { return 0 };
        let n = q.cells.len();
        st.queued -= n;
        q.share.give(n);
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
        q.share.try_take(1).map_err(PushError::OverShare)?;
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
        // Control cells are few (one SENDME per quarter window per circuit, one DENY/BREAK per circuit); a
        // neighbor that makes us queue more than the cap of them is flooding us while not reading: its link is
        // closed. Nothing another neighbor does can fill this queue, so no innocent link is closed here.
        if st.control.len() >= self.cap {
            drop(st);
            self.fail("control queue overflow (neighbor sends but does not read)");
            return Err(PushError::Full);
        }
        st.control.push_back(cell);
        self.control.take_unchecked(1);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Adds send credit to a circuit (from a SENDME). Credit beyond the largest window the neighbor announced is
    /// refused (nothing is added): no receiver that keeps its own window can grant it.
    pub fn add_credit(&self, id: CircId, n: u32) -> Result<(), CreditOverflow> {
        let mut st = self.lock();
        let Some(q) = st.queues.get_mut(&id) else { return Ok(()) };
        let total = q.credit.saturating_add(n);
        if total > q.max_credit {
            return Err(CreditOverflow { had: q.credit, added: n, max: q.max_credit });
        }
        q.credit = total;
        let newly_ready = !q.in_ready && sendable(q);
        if newly_ready {
            q.in_ready = true;
            st.ready.push_back(id);
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Cells queued on a circuit (for tests/metrics).
    pub fn queued(&self, id: CircId) -> usize {
        self.lock().queues.get(&id).map(|q| q.cells.len()).unwrap_or(0)
    }

    /// Cells queued on the whole link.
    pub fn total_queued(&self) -> usize {
        self.lock().queued
    }

    /// Cells in the control queue (for tests/metrics).
    pub fn control_queued(&self) -> usize {
        self.lock().control.len()
    }

    /// Marks the link closed; queued cells are dropped and the writer task ends.
    pub fn close(&self) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.closed = true;
        for (_, q) in st.queues.drain() {
            q.share.give(q.cells.len());
        }
        self.control.give(st.control.len());
        st.control.clear();
        st.ready.clear();
        st.queued = 0;
        drop(st);
        self.wake.notify_one();
        self.closed.notify_waiters();
        self.closed.notify_one();
    }

    /// Closes the link because of a problem the writer detected itself.
    fn fail(&self, why: &'static str) {
        self.lock().failure.get_or_insert(why);
        self.close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Resolves once the link is closed; returns why, when the writer closed it on its own.
    pub async fn wait_closed(&self) -> Option<&'static str> {
        loop {
            let notified = self.closed.notified();
            {
                let st = self.lock();
                if st.closed {
                    return st.failure;
                }
            }
            notified.await;
        }
    }

    /// Takes the next batch: control cells first, then one cell per ready circuit in turn.
    fn next_batch(&self, out: &mut Vec<(Cell, Drain)>) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        while out.len() < BATCH {
            if let Some(c) = st.control.pop_front() {
                self.control.give(1);
                out.push((c, Drain::none()));
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
            q.share.give(1);
            let drain = if cell.command == Command::Data {
                q.credit -= 1;
                q.drain.clone()
            } else {
                Drain::none()
            };
            if cell.command == Command::Break {
                // An ordered BREAK is the circuit's last cell on this link.
                if let Some(q) = queues.remove(&id) {
                    *queued -= q.cells.len();
                    q.share.give(q.cells.len());
                }
            } else if sendable(q) {
                q.in_ready = true;
                ready.push_back(id);
            }
            out.push((cell, drain));
        }
        true
    }

    /// The writer task: runs until the link closes or the socket fails. `keepalive` PADDING keeps an idle
    /// link visibly alive for the other side's idle timeout; a write that makes no progress for `stall`
    /// (the neighbor stopped reading) fails the link; `rtt` (if any) is read every 100 ms while writing. Whatever
    /// ends it, the link is closed on return.
    pub async fn run<W: AsyncWriteExt + Unpin>(
        self: Arc<Self>,
        sock: W,
        sealer: CellSealer,
        keepalive: Duration,
        stall: Duration,
        rtt: Option<RttProbe>,
    ) -> std::io::Result<()> {
        let r = self.clone().write_loop(sock, sealer, keepalive, stall, rtt).await;
        match &r {
            Ok(()) => self.close(),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => self.fail("write stalled (neighbor stopped reading)"),
            Err(_) => self.fail("write failed"),
        }
        r
    }

    async fn write_loop<W: AsyncWriteExt + Unpin>(
        self: Arc<Self>,
        mut sock: W,
        mut sealer: CellSealer,
        keepalive: Duration,
        stall: Duration,
        mut rtt: Option<RttProbe>,
    ) -> std::io::Result<()> {
        let mut rtt_read: Option<Instant> = None;
        let mut rtt_min: Option<(Duration, Instant)> = None;
        let mut batch: Vec<(Cell, Drain)> = Vec::with_capacity(BATCH);
        let (mut spent, mut drains) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
        let mut buf = vec![0u8; BATCH * SEALED_CELL_LEN];
        loop {
            batch.clear();
            if !self.next_batch(&mut batch) {
                return Ok(());
            }
            if batch.is_empty() {
                tokio::select! {
                    biased; // in order: the same outcome in every run of a simulation
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(keepalive) => {
                        let _ = self.push_control(Cell::padding());
                    }
                }
                continue;
            }
            // `batch` holds at most BATCH cells, the size of `buf`: the checked `get_mut` never fails.
            let out = buf
                .get_mut(..batch.len() * SEALED_CELL_LEN)
                .ok_or_else(|| std::io::Error::other("cell batch larger than the write buffer"))?;
            for ((cell, _), slot) in batch.iter().zip(out.chunks_exact_mut(SEALED_CELL_LEN)) {
                let (plain, _) = slot
                    .split_first_chunk_mut::<CELL_LEN>()
                    .ok_or_else(|| std::io::Error::other("sealed cell slot shorter than a cell"))?;
                cell.encode_into(plain);
                sealer.seal_in_place(slot).map_err(std::io::Error::other)?;
            }
            tokio::time::timeout(stall, sock.write_all(out))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            if let Some(probe) = rtt.as_mut() {
                if rtt_read.is_none_or(|t| anomos_net::rt::since(t) >= RTT_REFRESH) {
                    let now = anomos_net::rt::now();
                    rtt_read = Some(now);
                    if let Some(d) = probe() {
                        match rtt_min {
                            Some((m, at)) if d > m && now.duration_since(at) < RTT_MIN_WINDOW => {}
                            _ => {
                                rtt_min = Some((d, now));
                                self.set_rtt(Some(d));
                            }
                        }
                    }
                }
            }
            for (cell, drain) in batch.drain(..) {
                spent.push(cell.payload);
                drains.push(drain);
            }
            recycle_payloads(spent.drain(..));
            for drain in drains.drain(..) {
                drain.run();
            }
        }
    }

    /// What the writer task would write next (control cells first, then round robin), taken off the queues as if
    /// written, with their drain hooks run. For tests that drive links in memory without a socket.
    #[cfg(test)]
    pub(crate) fn take_written(&self) -> Vec<Cell> {
        let mut all = Vec::new();
        loop {
            let mut batch = Vec::new();
            if !self.next_batch(&mut batch) || batch.is_empty() {
                return all;
            }
            for (cell, drain) in batch {
                drain.run();
                all.push(cell);
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

#[cfg(test)]
mod tests;
