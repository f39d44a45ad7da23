//! What the circuit layer keeps per link: the table `circuit id → Route`, the id allocator, the OPEN rate limiter
//! and the neighbor's share of the node's circuit slots.
//!
//! **Lock discipline** (why no interleaving of cells can deadlock a peer): a route table's lock is a leaf — it is
//! held only to read or change one entry, never while taking any other lock, and no guard ever leaves this file.
//! A circuit's own locks (an opening's buffer, a relay's credit and layer, an endpoint's state) may be held while
//! queueing on a link writer, whose lock is a leaf too. So no code path holds two links' locks, or one lock
//! twice, and the order "circuit → writer" is the only nesting there is.
//!
//! Entries are removed and replaced **by identity** (the `Arc` they hold), never by id alone: an id freed by a
//! BREAK may be reused by the neighbor at once, and the late end of the old circuit must not touch the new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anomos_proto::cell::{BreakReason, Cell, CircId, DIALER_CIRC_BIT};

use super::endpoint::Endpoint;
use super::limit::{OpenAdmission, OpenLimiter};
use super::relay::{Dir, RelayCircuit};
use crate::link::budget::Share;
use crate::link::Link;

/// What a circuit id on a link leads to.
#[derive(Clone)]
pub enum Route {
    /// OPEN received, TC being peeled; pipelined DATA buffered.
    Opening(Arc<Opening>),
    /// A relayed circuit; `Dir::Fwd` if this link is its in-link (cells arriving here travel forward).
    Relay(Arc<RelayCircuit>, Dir),
    /// We are an end of this circuit.
    Endpoint(Arc<Endpoint>),
}

impl Route {
    /// Whether two routes are the same circuit object (not merely the same kind).
    pub fn same(&self, other: &Route) -> bool {
        match (self, other) {
            (Route::Opening(a), Route::Opening(b)) => Arc::ptr_eq(a, b),
            (Route::Relay(a, da), Route::Relay(b, db)) => Arc::ptr_eq(a, b) && da == db,
            (Route::Endpoint(a), Route::Endpoint(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether this entry belongs to relayed circuit `rc` (directly, or as the opening that became it; compared
    /// by serial, so this takes no other lock).
    pub fn is_relay(&self, rc: &RelayCircuit) -> bool {
        match self {
            Route::Relay(r, _) => std::ptr::eq(Arc::as_ptr(r), rc),
            Route::Opening(o) => o.serial == rc.opened_from,
            Route::Endpoint(_) => false,
        }
    }

    /// Whether this entry belongs to endpoint `ep` (directly, or as the opening that became it).
    pub fn is_endpoint(&self, ep: &Endpoint) -> bool {
        match self {
            Route::Endpoint(e) => std::ptr::eq(Arc::as_ptr(e), ep),
            Route::Opening(o) => Some(o.serial) == ep.opened_from,
            Route::Relay(..) => false,
        }
    }
}

static OPENING_SERIAL: AtomicU64 = AtomicU64::new(1);

/// What an OPEN being peeled has become.
#[derive(Clone)]
pub enum OpeningState {
    /// Still peeling; DATA behind the OPEN is buffered (charged to the opener's share of the cell pool).
    Buffering,
    /// It became a relayed circuit (the buffer went through it, in order).
    Relay(Arc<RelayCircuit>),
    /// It ended here: we are its target.
    Target(Arc<Endpoint>),
    /// It was broken (by the neighbor, or for breaking our limits) before it opened.
    Gone(BreakReason),
}

/// An OPEN being peeled: the state and the DATA that arrived behind it.
pub struct Opening {
    /// A number no other opening of this process has (what the circuit it becomes remembers).
    pub serial: u64,
    inner: Mutex<(OpeningState, Vec<Cell>)>,
    /// The opener's share of the node's cell pool; buffered cells are charged to it.
    pub share: Arc<Share>,
}

impl Opening {
    /// A new opening whose buffered cells are charged to `share`.
    pub fn new(share: Arc<Share>) -> Arc<Self> {
        let serial = OPENING_SERIAL.fetch_add(1, Ordering::Relaxed);
        Arc::new(Opening { serial, inner: Mutex::new((OpeningState::Buffering, Vec::new())), share })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (OpeningState, Vec<Cell>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> OpeningState {
        self.lock().0.clone()
    }

    /// Buffers one DATA cell behind the OPEN: `Ok(None)` if buffered, `Ok(Some(state))` if the opening has
    /// already become something else (the caller hands the cell there), `Err(reason)` if the buffer is full
    /// (`protocol`: more than our window) or the opener is over its share (`resources`).
    pub fn buffer(&self, cell: Cell, window: u32) -> Result<Option<(OpeningState, Cell)>, BreakReason> {
        let mut g = self.lock();
        if !matches!(g.0, OpeningState::Buffering) {
            return Ok(Some((g.0.clone(), cell)));
        }
        if g.1.len() >= window as usize {
            return Err(BreakReason::Protocol);
        }
        self.share.try_take(1).map_err(|_| BreakReason::Resources)?;
        g.1.push(cell);
        Ok(None)
    }

    /// Ends the opening (`Gone`), dropping the buffer; false if it had already become a circuit or ended.
    pub fn abandon(&self, reason: BreakReason) -> bool {
        let mut g = self.lock();
        if !matches!(g.0, OpeningState::Buffering) {
            return false;
        }
        g.0 = OpeningState::Gone(reason);
        self.share.give(g.1.len());
        g.1.clear();
        true
    }

    /// Completes the opening: under its lock, passes every buffered cell to `deliver` in arrival order and then
    /// sets `state`, so a cell arriving meanwhile waits and goes after them. Returns the state it had instead if
    /// it was no longer buffering (nothing is delivered then); otherwise `Some(reason)` if `deliver` failed (the
    /// flush stops there and the caller breaks the new circuit with that reason).
    pub fn complete(
        &self,
        state: OpeningState,
        mut deliver: impl FnMut(Cell) -> Result<(), BreakReason>,
    ) -> Result<Option<BreakReason>, OpeningState> {
        let mut g = self.lock();
        if !matches!(g.0, OpeningState::Buffering) {
            return Err(g.0.clone());
        }
        let cells = std::mem::take(&mut g.1);
        self.share.give(cells.len());
        let failed = cells.into_iter().find_map(|c| deliver(c).err());
        g.0 = state;
        Ok(failed)
    }

    /// Cells buffered now.
    pub fn buffered(&self) -> usize {
        self.lock().1.len()
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        let n = self.inner.get_mut().map(|g| g.1.len()).unwrap_or_else(|e| e.into_inner().1.len());
        self.share.give(n);
    }
}

/// The circuit layer's state for one link.
pub struct LinkCircuits {
    /// The link.
    pub link: Arc<Link>,
    /// The neighbor's share of the node's circuit slots (circuits it opens through or to us).
    pub slots: Arc<Share>,
    routes: Mutex<HashMap<CircId, Route>>,
    next_id: AtomicU32,
    opens: Mutex<OpenLimiter>,
}

impl LinkCircuits {
    /// Circuit state for `link`, with the OPEN rate limit given.
    pub fn new(link: Arc<Link>, slots: Arc<Share>, open_rate: u32, open_burst: u32) -> Arc<Self> {
        Arc::new(LinkCircuits {
            link,
            slots,
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            opens: Mutex::new(OpenLimiter::new(open_rate, open_burst)),
        })
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<CircId, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The route of a circuit id.
    pub fn get(&self, id: CircId) -> Option<Route> {
        self.routes().get(&id).cloned()
    }

    /// Installs a route on a free id; false (nothing changed) if the id is in use.
    pub fn insert_new(&self, id: CircId, route: Route) -> bool {
        match self.routes().entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(route);
                true
            }
        }
    }

    /// Replaces the entry of `id` with `new` if it is still `old` (by identity).
    pub fn replace(&self, id: CircId, old: &Route, new: Route) -> bool {
        let mut r = self.routes();
        match r.get_mut(&id) {
            Some(cur) if cur.same(old) => {
                *cur = new;
                true
            }
            _ => false,
        }
    }

    /// Removes the entry of `id` if `pred` says it is the caller's; returns it.
    pub fn remove_if(&self, id: CircId, pred: impl FnOnce(&Route) -> bool) -> Option<Route> {
        let mut r = self.routes();
        if r.get(&id).is_some_and(pred) {
            r.remove(&id)
        } else {
            None
        }
    }

    /// Removes every entry (the link is down); returns them in id order (not the map's: teardowns then happen in
    /// the same order in every run of a simulation).
    pub fn drain(&self) -> Vec<(CircId, Route)> {
        let mut v: Vec<(CircId, Route)> = self.routes().drain().collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }

    /// A copy of every entry, in id order.
    pub fn snapshot(&self) -> Vec<(CircId, Route)> {
        let mut v: Vec<(CircId, Route)> = self.routes().iter().map(|(id, r)| (*id, r.clone())).collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }

    /// Number of circuits on the link.
    pub fn len(&self) -> usize {
        self.routes().len()
    }

    /// Whether the link carries no circuit.
    pub fn is_empty(&self) -> bool {
        self.routes().is_empty()
    }

    /// A fresh circuit id from our half of the id space. Ids advance monotonically (wrapping after 2^31), so an
    /// id torn down with BREAK is not reused while late cells for it may still be in flight.
    pub fn alloc_id(&self) -> CircId {
        let routes = self.routes();
        loop {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed) & !DIALER_CIRC_BIT;
            if n == 0 {
                continue;
            }
            let id = if self.link.dialer { n | DIALER_CIRC_BIT } else { n };
            if !routes.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether `id` belongs to the other side's half (the only ids it may OPEN).
    pub fn is_remote_id(&self, id: CircId) -> bool {
        id != 0 && ((id & DIALER_CIRC_BIT != 0) != self.link.dialer)
    }

    /// Rate admission of one OPEN received on this link.
    pub fn admit_open(&self) -> OpenAdmission {
        self.opens.lock().unwrap_or_else(|e| e.into_inner()).admit()
    }
}
