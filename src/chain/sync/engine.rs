//! The sync engine: one task that owns every circuit's state, hears their readers and drives the handshake,
//! headers, blocks and replacements (the parent module documents the behaviour).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use anomos_proto::btc::ServiceFlags;
use anomos_proto::btc::{check_block, check_linkage, BtcError, GetHeadersMessage, Inventory, Message, NetParams};
use anomos_proto::cell::BreakReason;
use bitcoin::block::Header;
use bitcoin::{Block, BlockHash, Txid};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::chain::mine::unix_now;
use crate::chain::store::no_stop;
use crate::chain::validate::{check_block_contextual, check_genesis_header, check_header};
use crate::chain::wire::{decode_circuit_message, version_message, MIN_PEER_VERSION, PROTOCOL_VERSION};
use crate::chain::{read, write, ChainError, SharedStore, MAX_HEADERS};
use crate::circuit::{CircuitSender, CircuitStream};

use super::*;

mod blocks;
mod io;

use io::{reader, writer};

/// Runs the engine over `streams` (checked by [`super::run_sync`]) until it is done.
pub(super) async fn drive<F: FnMut(SyncEvent)>(
    streams: Vec<CircuitStream>,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    source: Option<CircuitSource>,
    on_event: F,
) -> Result<SyncReport, ChainError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let target = if opts.circuits > 0 { opts.circuits } else { streams.len().max(1) };
    // The first height whose block we lack (the first `getheaders` asks from just below it).
    let low_water = {
        let s = read(store);
        let first = s.missing_from(0).next().map(|(h, _)| h);
        first.unwrap_or_else(|| s.best_tip().1.saturating_add(1))
    };
    let mut engine = Engine {
        params,
        store,
        opts,
        on_event,
        source,
        events_tx: tx,
        events: rx,
        circuits: BTreeMap::new(),
        next_id: 0,
        in_flight: HashMap::new(),
        storing: HashSet::new(),
        to_store: Vec::new(),
        writing: false,
        low_water,
        headers_new: 0,
        first_done_at: None,
        blocks: 0,
        requested: 0,
        refetched: 0,
        bytes: 0,
        peer_errors: Vec::new(),
        replaced: 0,
        requesting: false,
        next_request: Instant::now(),
        backoff: Duration::from_millis(500),
        target,
        synced: false,
        last_tip: None,
        seen_txs: HashSet::new(),
        next_probe: 0,
    };
    for s in streams {
        engine.add_circuit(s, false);
    }
    if engine.circuits.is_empty() {
        engine.want_circuits();
    }
    engine.run().await
}

/// What the engine tells a circuit's reader task.
enum Ctl {
    Abort(BreakReason),
    Close,
}

/// What the engine hears.
enum Ev {
    /// A message from circuit `id` (`checked`: the context-free block checks, for blocks).
    Msg { id: usize, bytes: u64, msg: Result<Message, ChainError>, checked: Option<Result<(), BtcError>> },
    /// Circuit `id` ended.
    Closed { id: usize, err: PeerError },
    /// Fresh circuits from the source.
    Circuits(Vec<CircuitStream>),
    /// A commit of blocks finished.
    Stored { hashes: Vec<BlockHash>, result: Result<usize, ChainError> },
}

/// One circuit, as the engine sees it.
struct Circ {
    out: mpsc::UnboundedSender<Vec<u8>>,
    ctl: Option<oneshot::Sender<Ctl>>,
    created: Instant,
    got_version: bool,
    got_verack: bool,
    ready: bool,
    /// Blocks asked for and not received, in request order.
    in_flight: Vec<BlockHash>,
    /// When `in_flight` last went from empty to non-empty.
    waiting_since: Instant,
    /// When a block it was asked for last arrived (one nobody asked for does not count: a junk block every few
    /// seconds would otherwise keep a staller's requests from moving, SPEC open issue 26).
    last_block: Instant,
    /// An outstanding `getheaders` (and when the oldest unanswered one was sent: a `getheaders` sent while one
    /// is outstanding does not move it, so an `inv` every minute cannot keep a silent circuit alive).
    headers_req: Option<Instant>,
    /// Height of the first locator entry of the outstanding `getheaders` (a full answer must reach past it).
    headers_from: u32,
    /// The outstanding `getheaders` asks from the last header of an answer that added nothing: its answer must.
    headers_strict: bool,
    /// Asked for headers while a request was outstanding: ask once it is answered.
    headers_again: bool,
    /// Its headers ran out: it answered a `getheaders` with fewer than 2,000.
    headers_done: bool,
    /// Blocks this circuit answered `notfound` for.
    refused: HashSet<BlockHash>,
    /// The `ping` sent halfway through a stall, and whether its `pong` came back: the target answers pings, so
    /// the stall is its own (requests are answered in order), not the network's.
    probe: Option<u64>,
    probe_answered: bool,
    /// The highest header it sent in this conversation (hash, height): it claims every block up to it.
    sent_headers_to: Option<(BlockHash, u32)>,
}

struct Engine<'a, F: FnMut(SyncEvent)> {
    params: &'a NetParams,
    store: &'a SharedStore,
    opts: &'a SyncOptions,
    on_event: F,
    source: Option<CircuitSource>,
    events_tx: mpsc::UnboundedSender<Ev>,
    events: mpsc::UnboundedReceiver<Ev>,
    circuits: BTreeMap<usize, Circ>,
    next_id: usize,
    /// Requested blocks and the circuit asked.
    in_flight: HashMap<BlockHash, usize>,
    /// Blocks in the running commit.
    storing: HashSet<BlockHash>,
    /// Checked blocks waiting for the next commit.
    to_store: Vec<Block>,
    writing: bool,
    /// No block below this height is missing.
    low_water: u32,
    headers_new: u64,
    /// When the first circuit's headers ran out (circuits still shaking hands hold up the end until
    /// [`END_GRACE`] after it).
    first_done_at: Option<Instant>,
    blocks: u64,
    requested: u64,
    refetched: u64,
    bytes: u64,
    peer_errors: Vec<(usize, ChainError)>,
    replaced: usize,
    /// A request to the circuit source is running.
    requesting: bool,
    next_request: Instant,
    backoff: Duration,
    target: usize,
    synced: bool,
    last_tip: Option<BlockHash>,
    seen_txs: HashSet<Txid>,
    /// The last stall probe's `ping` nonce.
    next_probe: u64,
}

/// How long after the first circuit's headers ran out a circuit still shaking hands holds up the end of the
/// initial sync: a fast liar's empty `headers` must not end it at a stale tip while honest circuits are still
/// coming up, and a silent circuit must not hold it up for its whole handshake timeout.
const END_GRACE: Duration = Duration::from_secs(3);

/// Blocks one circuit may answer `notfound` for before it is dropped (as finished, not blamed: an honest serving
/// peer may still be fetching bodies) for another.
const MAX_REFUSED: usize = 8;

impl<F: FnMut(SyncEvent)> Engine<'_, F> {
    async fn run(mut self) -> Result<SyncReport, ChainError> {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.synced && self.initial_done() {
                self.synced = true;
                let (tip, height) = read(self.store).best_tip();
                self.last_tip = Some(tip);
                if !self.opts.follow {
                    for (_, mut c) in std::mem::take(&mut self.circuits) {
                        if let Some(ctl) = c.ctl.take() {
                            let _ = ctl.send(Ctl::Close);
                        }
                    }
                    return Ok(self.report(started));
                }
                (self.on_event)(SyncEvent::Synced { height, tip, blocks: self.blocks });
            }
            if self.circuits.is_empty() && self.source.is_none() && !self.writing {
                let err = match self.peer_errors.first() {
                    Some((_, e)) => clone_error(e),
                    None => ChainError::Protocol("every circuit closed".into()),
                };
                return Err(err);
            }
            tokio::select! {
                biased;
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_ev(ev)?,
                    None => return Err(ChainError::Protocol("engine channel closed".into())),
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn report(&self, started: Instant) -> SyncReport {
        let (tip, height) = read(self.store).best_tip();
        SyncReport {
            headers: self.headers_new,
            blocks: self.blocks,
            requested: self.requested,
            refetched: self.refetched,
            bytes: self.bytes,
            elapsed: started.elapsed(),
            tip,
            height,
            peer_errors: self.peer_errors.iter().map(|(i, e)| (*i, clone_error(e))).collect(),
            replaced: self.replaced,
        }
    }

    fn initial_done(&mut self) -> bool {
        let Some(first_done) = self.first_done_at else { return false };
        if self.writing || !self.to_store.is_empty() || !self.in_flight.is_empty() {
            return false;
        }
        // Every ready circuit's headers ran out, and none is asked again: one circuit's empty answer does not end
        // the sync while another knows more (SPEC open issue 26). A circuit still shaking hands holds it up for
        // `END_GRACE` after the first ran out.
        let grace_over = Instant::now() >= first_done + END_GRACE;
        if self
            .circuits
            .values()
            .any(|c| if c.ready { !c.headers_done || c.headers_req.is_some() } else { !grace_over })
        {
            return false;
        }
        let s = read(self.store);
        s.is_rooted() && s.missing_from(self.low_water).next().is_none()
    }

    fn add_circuit(&mut self, stream: CircuitStream, replacement: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let hops = stream.hops;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = oneshot::channel();
        tokio::spawn(writer(stream.sender(), out_rx));
        tokio::spawn(reader(id, stream, self.params.magic, self.events_tx.clone(), ctl_rx));
        let now = Instant::now();
        let c = Circ {
            out: out_tx,
            ctl: Some(ctl_tx),
            created: now,
            got_version: false,
            got_verack: false,
            ready: false,
            in_flight: Vec::new(),
            waiting_since: now,
            last_block: now,
            headers_req: None,
            headers_from: 0,
            headers_strict: false,
            headers_again: false,
            headers_done: false,
            probe: None,
            probe_answered: false,
            sent_headers_to: None,
            refused: HashSet::new(),
        };
        self.circuits.insert(id, c);
        let height = read(self.store).best_tip().1;
        self.send(id, &Message::Version(version_message(ServiceFlags::NONE, height, self.opts.follow)));
        // Pipelined behind the version (SPEC §9): the headers come back with the target's version and verack, one
        // circuit round trip sooner. (A serving peer answers requests after `version`; the upstream bridge holds
        // them for a Bitcoin node until our `verack`.)
        self.get_headers(id, no_stop());
        if replacement {
            self.replaced += 1;
            info!(circuit = id, hops, "replacement circuit added");
            (self.on_event)(SyncEvent::CircuitAdded { circuit: id, hops });
        }
    }

    fn send(&mut self, id: usize, msg: &Message) {
        if let Some(c) = self.circuits.get(&id) {
            match msg.to_envelope(self.params.magic).try_encode() {
                Ok(bytes) => {
                    let _ = c.out.send(bytes);
                }
                Err(e) => warn!("cannot encode '{}': {e}", msg.command()),
            }
        }
    }

    /// Drops circuit `id` after `err`: breaks it (as misbehaving if it sent something invalid),
    /// hands its requests to the others and asks for a replacement.
    fn fail(&mut self, id: usize, err: ChainError) {
        let Some(mut c) = self.circuits.remove(&id) else { return };
        for h in c.in_flight.drain(..) {
            self.in_flight.remove(&h);
        }
        let reason = err.break_reason();
        let misbehaving = reason == BreakReason::Misbehaving;
        if let Some(ctl) = c.ctl.take() {
            let _ = ctl.send(Ctl::Abort(reason));
        }
        warn!(circuit = id, misbehaving, "circuit dropped: {err}");
        (self.on_event)(SyncEvent::CircuitFailed { circuit: id, error: err.to_string(), misbehaving });
        self.peer_errors.push((id, err));
        self.want_circuits();
        self.assign();
    }

    /// Asks the source for circuits up to the target, unless a request is running or backing off.
    fn want_circuits(&mut self) {
        if self.requesting || Instant::now() < self.next_request || (self.synced && !self.opts.follow) {
            return;
        }
        let Some(source) = self.source.as_mut() else { return };
        let want = self.target.saturating_sub(self.circuits.len());
        if want == 0 {
            return;
        }
        self.requesting = true;
        let fut = source(want);
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let got = fut.await;
            let _ = tx.send(Ev::Circuits(got));
        });
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let mut failed = Vec::new();
        let mut probes = Vec::new();
        for (id, c) in &self.circuits {
            if !c.ready {
                if now.duration_since(c.created) > self.opts.handshake_timeout {
                    failed.push((*id, ChainError::Timeout("the handshake")));
                }
                continue;
            }
            if let Some(t) = c.headers_req {
                if now.duration_since(t) > self.opts.request_timeout {
                    failed.push((*id, ChainError::Timeout("headers")));
                    continue;
                }
            }
            if !c.in_flight.is_empty() {
                let since_wait = now.duration_since(c.waiting_since);
                let since_block = now.duration_since(c.last_block);
                let stalled_for = since_wait.min(since_block);
                if stalled_for > self.opts.stall_timeout {
                    // A target that answers pings but not `getdata` for a block it sent the header of withholds it
                    // (misbehaving, reported); a stall with no `pong`, or for a block it never claimed (Bitcoin
                    // Core behind a bridge skips blocks it lacks without `notfound`), is a timeout (not blamed).
                    let claimed = c.in_flight.first().is_some_and(|h| blocks::announced(self.store, c, h));
                    let err = if c.probe_answered && claimed {
                        ChainError::Withheld("blocks")
                    } else {
                        ChainError::Timeout("blocks (stalled)")
                    };
                    failed.push((*id, err));
                } else if stalled_for > self.opts.stall_timeout / 2 && c.probe.is_none() {
                    probes.push(*id);
                }
            }
        }
        for (id, e) in failed {
            self.fail(id, e);
        }
        for id in probes {
            self.next_probe = self.next_probe.wrapping_add(1);
            let nonce = self.next_probe;
            if let Some(c) = self.circuits.get_mut(&id) {
                c.probe = Some(nonce);
            }
            self.send(id, &Message::Ping(nonce));
        }
        self.want_circuits();
    }

    fn on_ev(&mut self, ev: Ev) -> Result<(), ChainError> {
        match ev {
            Ev::Msg { id, bytes, msg, checked } => {
                if !self.circuits.contains_key(&id) {
                    return Ok(());
                }
                self.bytes += bytes;
                match msg.and_then(|m| self.on_msg(id, m, checked)) {
                    Ok(()) => {}
                    Err(e @ (ChainError::Store(_) | ChainError::Params(_))) => return Err(e),
                    Err(e) => self.fail(id, e),
                }
            }
            Ev::Closed { id, err } => {
                if self.circuits.contains_key(&id) {
                    self.fail(id, ChainError::Circuit(err));
                }
            }
            Ev::Circuits(streams) => {
                self.requesting = false;
                if streams.is_empty() {
                    self.next_request = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
                } else {
                    self.backoff = Duration::from_millis(500);
                }
                for s in streams {
                    self.add_circuit(s, true);
                }
            }
            Ev::Stored { hashes, result } => {
                self.writing = false;
                for h in &hashes {
                    self.storing.remove(h);
                }
                let n = result?;
                self.blocks += n as u64;
                self.progress(SyncPhase::Blocks);
                self.flush_blocks();
                self.assign();
                self.new_tip();
            }
        }
        Ok(())
    }

    fn on_msg(&mut self, id: usize, msg: Message, checked: Option<Result<(), BtcError>>) -> Result<(), ChainError> {
        let ready = self.circuits.get(&id).is_some_and(|c| c.ready);
        match msg {
            Message::Version(v) => {
                let Some(c) = self.circuits.get_mut(&id) else { return Ok(()) };
                if c.got_version {
                    return Ok(());
                }
                if v.version < MIN_PEER_VERSION {
                    return Err(ChainError::Protocol(format!("protocol version {} is too old", v.version)));
                }
                c.got_version = true;
                self.send(id, &Message::Verack);
                self.maybe_ready(id);
            }
            Message::Verack => {
                if let Some(c) = self.circuits.get_mut(&id) {
                    c.got_verack = true;
                }
                self.maybe_ready(id);
            }
            Message::Ping(n) => self.send(id, &Message::Pong(n)),
            Message::Pong(n) => {
                if let Some(c) = self.circuits.get_mut(&id).filter(|c| c.probe == Some(n)) {
                    c.probe_answered = true;
                }
            }
            _ if !ready => debug!(circuit = id, "ignored during the handshake"),
            Message::Headers(headers) => self.on_headers(id, headers)?,
            Message::Block(block) => self.on_block(id, block, checked)?,
            Message::NotFound(items) => self.on_not_found(id, items)?,
            Message::Inv(items) => {
                let mut unknown_block = None;
                for item in items {
                    match item {
                        Inventory::Block(h) | Inventory::WitnessBlock(h) if read(self.store).entry(&h).is_none() => {
                            unknown_block = Some(h);
                        }
                        Inventory::Transaction(t) | Inventory::WitnessTransaction(t) => {
                            if self.seen_txs.len() > 100_000 {
                                self.seen_txs.clear();
                            }
                            if self.seen_txs.insert(t) {
                                (self.on_event)(SyncEvent::Tx(t));
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(h) = unknown_block {
                    self.get_headers(id, h);
                }
            }
            other => debug!(circuit = id, command = other.command(), "ignored"),
        }
        Ok(())
    }

    fn maybe_ready(&mut self, id: usize) {
        let Some(c) = self.circuits.get_mut(&id) else { return };
        if c.ready || !c.got_version || !c.got_verack {
            return;
        }
        c.ready = true;
        // The pipelined `getheaders` is normally still outstanding (its answer follows the verack).
        let headers_idle = c.headers_req.is_none();
        debug!(circuit = id, "handshake done");
        if self.opts.follow {
            self.send(id, &Message::SendHeaders);
        }
        if headers_idle {
            self.get_headers(id, no_stop());
        }
        self.assign();
    }

    fn progress(&mut self, phase: SyncPhase) {
        let (header_height, missing) = {
            let s = read(self.store);
            (s.best_tip().1, s.missing_from(self.low_water).count() as u64)
        };
        let p = SyncProgress {
            phase,
            header_height,
            blocks_done: self.blocks,
            blocks_total: self.blocks + missing,
            bytes: self.bytes,
        };
        (self.on_event)(SyncEvent::Progress(p));
    }

    /// After the initial sync: reports a newly stored best tip.
    fn new_tip(&mut self) {
        if !self.synced {
            return;
        }
        let (tip, height) = read(self.store).best_tip();
        if self.last_tip != Some(tip) && read(self.store).has_block(&tip) {
            self.last_tip = Some(tip);
            (self.on_event)(SyncEvent::NewTip { height, hash: tip });
        }
    }
}

/// A copy of an error for reports (circuit errors keep their text).
fn clone_error(e: &ChainError) -> ChainError {
    match e {
        ChainError::Malformed(b) => ChainError::Malformed(b.clone()),
        ChainError::Protocol(s) => ChainError::Protocol(s.clone()),
        ChainError::InvalidHeader { hash, reason } => ChainError::InvalidHeader { hash: *hash, reason: reason.clone() },
        ChainError::InvalidBlock { hash, reason } => ChainError::InvalidBlock { hash: *hash, reason: reason.clone() },
        ChainError::NotFound(h) => ChainError::NotFound(*h),
        ChainError::Timeout(w) => ChainError::Timeout(w),
        ChainError::Withheld(w) => ChainError::Withheld(w),
        ChainError::Circuit(PeerError::Broken(r)) => ChainError::Circuit(PeerError::Broken(*r)),
        ChainError::Circuit(p) => ChainError::Protocol(format!("circuit: {p}")),
        ChainError::UnknownParent { hash, prev } => ChainError::UnknownParent { hash: *hash, prev: *prev },
        ChainError::Store(s) => ChainError::Store(s.clone()),
        ChainError::Params(s) => ChainError::Params(s.clone()),
    }
}
