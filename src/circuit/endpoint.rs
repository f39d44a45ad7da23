//! Circuit endpoints (the requester's and the target's end) and the message stream they offer upward.
//!
//! An endpoint owns the onion (all layers at the requester, its own layer at the target) and the end-to-end
//! session. Outgoing messages are fragmented into records, sealed, onion-wrapped and queued on the link; the
//! application can have at most `window` cells queued (it waits for the writer to drain them, which in turn
//! waits for credit from the next hop). Incoming cells are unwrapped, opened, reassembled and delivered in
//! order. Credit goes back to the sender only while the application keeps up: undelivered messages are capped
//! at [`RECV_BUFFER`] bytes, after which the sender is made to wait. The stream the application holds is in
//! `stream.rs`.

use std::sync::{Arc, Mutex, Weak};

use anomos_proto::cell::{BreakReason, Cell, CircId, Command, CELL_PAYLOAD_LEN};
use anomos_proto::circuit::{
    fragments, E2eHandshake, E2eSession, HopLayer, OnionStack, Reassembler, RecordType, Role, MAX_MESSAGE,
};
use anomos_proto::crypto::Secret;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::relay::{pool_tight, send_credit};
use super::table::LinkCircuits;
use super::window::Tuner;
use crate::error::PeerError;
use crate::link::budget::Unit;
use crate::link::writer::{payload_box, recycle_payloads, OnDrain, Payload};
use crate::link::Link;

/// Bytes of delivered-but-unread messages above which an endpoint stops returning credit.
pub const RECV_BUFFER: usize = 4 * 1024 * 1024;
/// Longest a send waits for room in the window: the far end returns credit as its application reads, and one
/// that reads nothing for this long (or withholds credit on purpose) gets the circuit broken with `timeout`, so
/// what a circuit holds here (a serving task, a bridge's upstream slot) is freed. Found in review, session 10: 32
/// circuits that asked for blocks and never returned credit held every upstream slot of a bridge for ever.
pub const CREDIT_STALL: std::time::Duration = std::time::Duration::from_secs(60);

enum Onion {
    Requester(OnionStack),
    Target(Box<HopLayer>),
}

impl Onion {
    fn wrap_out(&mut self, p: &mut [u8]) {
        match self {
            Onion::Requester(s) => s.wrap_forward(p),
            Onion::Target(h) => h.backward(p),
        }
    }
    fn unwrap_in(&mut self, p: &mut [u8]) {
        match self {
            Onion::Requester(s) => s.unwrap_backward(p),
            Onion::Target(h) => h.forward(p),
        }
    }
    fn hops(&self) -> usize {
        match self {
            Onion::Requester(s) => s.len(),
            Onion::Target(_) => 0,
        }
    }
}

struct State {
    onion: Onion,
    hs: Option<E2eHandshake>,
    session: Option<E2eSession>,
    reasm: Reassembler,
    allow: u32,
    unacked: u32,
    /// Our receive window (auto-tuned, `window.rs`).
    tuner: Tuner,
    buffered: usize,
    opened: Option<oneshot::Sender<Result<(), PeerError>>>,
    closed: bool,
    /// Why the circuit ended, once a BREAK or a link failure ended it (a later send fails with it).
    ended_by: Option<BreakReason>,
}

/// What the application receives.
#[derive(Debug)]
pub enum StreamEvent {
    /// One complete message.
    Message(Vec<u8>),
    /// The circuit ended.
    Closed(BreakReason),
}

/// One end of a circuit.
pub struct Endpoint {
    /// The link the circuit leaves on.
    pub link: Arc<Link>,
    /// That link's circuit table (weak: the table holds us).
    pub circuits: Weak<LinkCircuits>,
    /// Its id there.
    pub circ_id: CircId,
    /// Target side: the serial of the opening we were peeled from (our table entry until replaced).
    pub opened_from: Option<u64>,
    /// Requester or target.
    pub role: Role,
    st: Mutex<State>,
    permits: Semaphore,
    events: mpsc::UnboundedSender<StreamEvent>,
    batch: u32,
    /// Cells we may have queued toward the next hop (the neighbor's announced window).
    window: u32,
    /// The tracker's handle for this circuit (requester side), for failure reports.
    pub grant: std::sync::OnceLock<u64>,
    _slot: Unit,
}

/// Where an endpoint lives and what it starts with.
pub struct EndpointParts<'a> {
    /// The link's circuit state.
    pub on: &'a Arc<LinkCircuits>,
    /// The circuit id there.
    pub circ_id: CircId,
    /// Requester or target.
    pub role: Role,
    /// Requester: every hop's secret; target: its own.
    pub hop_secrets: &'a [Secret],
    /// The end-to-end secret.
    pub e2e_secret: &'a Secret,
    /// Our receive window (where it starts).
    pub window: u32,
    /// The largest it may grow to.
    pub max_window: u32,
    /// SENDME batch.
    pub batch: u32,
    /// Target side: the opening it comes from.
    pub opened_from: Option<u64>,
    /// The circuit slot it holds while alive.
    pub slot: Unit,
}

/// Parts handed back when an endpoint is created.
pub struct NewEndpoint {
    /// The endpoint (install it as the circuit's route).
    pub endpoint: Arc<Endpoint>,
    /// Our sealed HELLO, to send as the first DATA once the circuit exists on the link.
    pub hello: Box<[u8; CELL_PAYLOAD_LEN]>,
    /// Resolves when the end-to-end session is up (requester) — or fails with DENY/BREAK.
    pub opened: oneshot::Receiver<Result<(), PeerError>>,
    /// Incoming messages.
    pub events: mpsc::UnboundedReceiver<StreamEvent>,
}

impl Endpoint {
    /// Creates an endpoint. For the requester `hop_secrets` are all layers; for the target, its own one.
    pub fn create(p: EndpointParts<'_>) -> Result<NewEndpoint, PeerError> {
        let EndpointParts { on, circ_id, role, hop_secrets, e2e_secret, window, max_window, batch, opened_from, slot } =
            p;
        let link = on.link.clone();
        // We let the other side send `window` cells (our announced receive window); we may send as many as
        // the link's neighbor announced.
        let send_window = link.send_window();
        let onion = match role {
            Role::Requester => Onion::Requester(OnionStack::new(hop_secrets)),
            Role::Target => Onion::Target(Box::new(HopLayer::new(
                hop_secrets.first().ok_or(PeerError::Internal("a target endpoint without its hop secret".into()))?,
            ))),
        };
        let mut hello = Box::new([0u8; CELL_PAYLOAD_LEN]);
        let hs = E2eHandshake::start(role, e2e_secret, &mut rand::rngs::OsRng, &mut hello)?;
        let (otx, orx) = oneshot::channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let endpoint = Arc::new(Endpoint {
            link,
            circuits: Arc::downgrade(on),
            circ_id,
            opened_from,
            role,
            st: Mutex::new(State {
                onion,
                hs: Some(hs),
                session: None,
                reasm: Reassembler::new(MAX_MESSAGE),
                allow: window,
                unacked: 0,
                tuner: Tuner::new(window, max_window),
                buffered: 0,
                opened: Some(otx),
                closed: false,
                ended_by: None,
            }),
            permits: Semaphore::new(send_window as usize),
            events: etx,
            batch,
            window: send_window,
            grant: std::sync::OnceLock::new(),
            _slot: slot,
        });
        Ok(NewEndpoint { endpoint, hello, opened: orx, events: erx })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of onion layers (requester side).
    pub fn hops(&self) -> usize {
        self.lock().onion.hops()
    }

    /// Queues our HELLO (already sealed) as the circuit's first DATA.
    pub fn send_hello(&self, mut hello: Box<[u8; CELL_PAYLOAD_LEN]>) -> Result<(), PeerError> {
        if let Ok(p) = self.permits.try_acquire() {
            p.forget();
        }
        let mut st = self.lock();
        st.onion.wrap_out(&mut hello[..]);
        let cell = Cell { circ_id: self.circ_id, command: Command::Data, payload: hello };
        self.link.writer.push(cell).map_err(|_| PeerError::Broken(BreakReason::LinkFailed))
    }

    /// Sends one message (fragmenting it); waits while the window is full.
    pub async fn send(&self, msg: &[u8]) -> Result<(), PeerError> {
        if msg.len() > MAX_MESSAGE {
            return Err(PeerError::Proto(anomos_proto::ProtoError::TooLarge {
                what: "circuit message",
                len: msg.len(),
                limit: MAX_MESSAGE,
            }));
        }
        for (kind, data) in fragments(msg) {
            self.send_record(kind, data).await?;
        }
        Ok(())
    }

    async fn send_record(&self, kind: RecordType, data: &[u8]) -> Result<(), PeerError> {
        // A send on an ended circuit fails with the reason it ended (a BREAK's), not a bare `finished`: the bridge
        // logs it, and "upstream-unavailable" is what its operator needs to read.
        let ended = |st: &State| PeerError::Broken(st.ended_by.unwrap_or(BreakReason::Finished));
        let permit = match tokio::time::timeout(CREDIT_STALL, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(ended(&self.lock())),
            Err(_) => {
                tracing::info!(circ = self.circ_id, role = ?self.role, "no send credit for {CREDIT_STALL:?}: breaking the circuit");
                self.abort(BreakReason::Timeout);
                return Err(PeerError::Broken(BreakReason::Timeout));
            }
        };
        permit.forget();
        let mut st = self.lock();
        if st.closed {
            return Err(ended(&st));
        }
        let session = st.session.as_mut().ok_or(PeerError::Broken(BreakReason::Protocol))?;
        // `seal` writes the whole payload, so a recycled buffer needs no zeroing.
        let mut cell = Cell { circ_id: self.circ_id, command: Command::Data, payload: payload_box() };
        session.seal(kind, data, &mut cell.payload)?;
        st.onion.wrap_out(&mut cell.payload[..]);
        self.link.writer.push(cell).map_err(|_| PeerError::Broken(BreakReason::LinkFailed))
    }

    /// Leaves the link's circuit table (if the entry there is still ours); true if it was.
    pub fn leave_table(&self) -> bool {
        self.circuits.upgrade().and_then(|lc| lc.remove_if(self.circ_id, |r| r.is_endpoint(self))).is_some()
    }

    /// Handles an incoming DATA cell. An error means the circuit must be broken with that reason.
    pub fn on_data(&self, mut cell: Cell) -> Result<(), BreakReason> {
        let r = self.on_payload(&mut cell.payload);
        recycle_payloads([cell.payload]);
        r
    }

    fn on_payload(&self, payload: &mut Payload) -> Result<(), BreakReason> {
        let mut st = self.lock();
        if st.closed {
            return Ok(());
        }
        if st.allow == 0 {
            tracing::warn!(circ = self.circ_id, role = ?self.role, "DATA beyond credit");
            return Err(BreakReason::Protocol);
        }
        st.allow -= 1;
        st.unacked += 1;
        st.onion.unwrap_in(&mut payload[..]);
        if let Some(hs) = st.hs.take() {
            let session = hs.finish(payload).map_err(|_| BreakReason::Integrity)?;
            st.session = Some(session);
            if let Some(tx) = st.opened.take() {
                let _ = tx.send(Ok(()));
            }
            self.grant(&mut st);
            return Ok(());
        }
        let Some(session) = st.session.as_mut() else { return Err(BreakReason::Protocol) };
        let (kind, data) = session.open(payload).map_err(|_| BreakReason::Integrity)?;
        match kind {
            RecordType::Close => {
                st.closed = true;
                let _ = self.events.send(StreamEvent::Closed(BreakReason::Finished));
                return Ok(());
            }
            RecordType::Hello => return Err(BreakReason::Protocol),
            RecordType::Part | RecordType::End => {
                if let Some(msg) = st.reasm.push(kind, data).map_err(|_| BreakReason::Protocol)? {
                    st.buffered += msg.len();
                    let _ = self.events.send(StreamEvent::Message(msg));
                }
            }
        }
        self.grant(&mut st);
        Ok(())
    }

    /// The application consumed a message of `len` bytes.
    pub fn consumed(&self, len: usize) {
        let mut st = self.lock();
        st.buffered = st.buffered.saturating_sub(len);
        self.grant(&mut st);
    }

    fn grant(&self, st: &mut State) {
        while st.unacked >= self.batch && st.buffered <= RECV_BUFFER {
            st.unacked -= self.batch;
            let rtt = self.link.writer.rtt();
            // Delivered but unread messages are what waits here.
            let queued = u32::try_from(st.buffered / CELL_PAYLOAD_LEN).unwrap_or(u32::MAX);
            let g = st.tuner.on_drained(self.batch, anomos_net::rt::now(), rtt, pool_tight(&self.link), queued);
            st.allow += g;
            send_credit(&self.link, self.circ_id, g);
        }
    }

    /// The circuit was refused (requester, before it opened).
    pub fn denied(&self, err: PeerError) {
        let mut st = self.lock();
        st.closed = true;
        if let Some(tx) = st.opened.take() {
            let _ = tx.send(Err(err));
        }
        self.permits.close();
    }

    /// The circuit ended (BREAK received, link failed, or local close).
    pub fn closed(&self, reason: BreakReason) {
        let mut st = self.lock();
        st.closed = true;
        st.ended_by.get_or_insert(reason);
        if let Some(tx) = st.opened.take() {
            let _ = tx.send(Err(PeerError::Broken(reason)));
        }
        let _ = self.events.send(StreamEvent::Closed(reason));
        self.permits.close();
    }

    /// Ends the circuit now: leaves the table, drops what was queued, sends BREAK `reason` (if the entry was
    /// still ours) and tells the application.
    pub fn abort(&self, reason: BreakReason) {
        if self.leave_table() {
            self.link.writer.remove_circuit(self.circ_id);
            let _ = self.link.writer.push_control(Cell::brk(self.circ_id, reason, None));
        }
        self.closed(reason);
    }

    /// Sends a Close record and waits until everything queued has left (then [`abort`](Self::abort) with
    /// `finished` ends it).
    pub async fn finish(&self) {
        let _ = self.send_record(RecordType::Close, &[]).await;
        // All permits back = our queue on the link is empty.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.permits.acquire_many(self.window)).await;
    }
}

impl OnDrain for Endpoint {
    /// One of our DATA cells has been written: the application may queue another.
    fn drained(&self, _lane: u8) {
        self.permits.add_permits(1);
    }
}
