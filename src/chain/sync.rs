//! The requesting side: bring a store up to serving peers' best chain over several circuits,
//! replace circuits that misbehave or stall, and (optionally) keep following new blocks.
//!
//! [`run_sync`] drives one engine task; every circuit has a reader task (decodes each message
//! and runs the context-free block checks, so those run in parallel) and a writer task (sends
//! in order without ever blocking the engine). Per circuit:
//!
//! 1. **Handshake**: our anonymous `version` (see [`super::wire`]), their `version` answered
//!    with `verack`, then `sendheaders` when following.
//! 2. **Headers first**: `getheaders` with our locator, repeated from the last received header
//!    while replies are full (2000). Every circuit does this, so a liar is caught whichever it
//!    is. Each new header is checked before it is stored: linkage, proof of work against nBits
//!    and the network's limit, difficulty (retargets), timestamps (after the median of the
//!    previous 11, at most 2 hours ahead of our clock) and version; a batch is stored with the
//!    best-chain change it causes in one atomic write. A chain with more work wins (reorg).
//!    A custom network's store learns its genesis header first (`getheaders` with an empty
//!    locator and the genesis hash as stop).
//! 3. **Blocks**: best-chain blocks we lack, oldest first, are spread over the ready circuits,
//!    at most `window` outstanding per circuit (`getdata`). A block must be one we asked that
//!    circuit for; it is checked (merkle root, no duplicate txs, size/weight, coinbase, witness
//!    commitment, BIP 34) and stored; blocks arriving while a commit runs are committed
//!    together in the next. A block we know but did not ask that circuit for is a wrong
//!    answer (misbehaving); a block we do not know, not asked for, is ignored (unsolicited).
//!    `notfound` moves the block to other circuits.
//!
//! A circuit that sends something invalid is broken with [`BreakReason::Misbehaving`] (which
//! also reports its target to the tracker); one that **stalls** (requests outstanding and no
//! block for `stall_timeout`), or does not finish its handshake or answer `getheaders` in
//! time, is broken with [`BreakReason::Timeout`]. Its outstanding requests go to the other
//! circuits, and a [`CircuitSource`], if given, is asked for a fresh circuit to replace it.
//!
//! Without `follow`, the sync ends once some circuit's headers ran out (a reply below 2000),
//! no `getheaders` is outstanding and every best-chain block is stored. With `follow`, it then
//! reports [`SyncEvent::Synced`] and goes on: announced headers (`sendheaders`) and `inv`s of
//! blocks lead to `getheaders`/`getdata`; each new stored best tip is a [`SyncEvent::NewTip`],
//! each announced transaction a [`SyncEvent::Tx`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::btc::{check_block, check_linkage, BtcError, GetHeadersMessage, Inventory, Message, NetParams};
use anomos_proto::btc::{ServiceFlags, VersionMessage};
use anomos_proto::cell::BreakReason;
use bitcoin::block::Header;
use bitcoin::{Block, BlockHash, Txid};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::mine::unix_now;
use super::store::no_stop;
use super::validate::{check_block_contextual, check_genesis_header, check_header};
use super::wire::{decode_circuit_message, version_message, BtcPeer, MIN_PEER_VERSION, PROTOCOL_VERSION};
use super::{read, write, ChainError, SharedStore, MAX_HEADERS};
use crate::circuit::{CircuitSender, CircuitStream};
use crate::error::PeerError;

/// Tuning of a sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Blocks requested and not yet received, per circuit.
    pub window: usize,
    /// Time for the whole version/verack exchange.
    pub handshake_timeout: Duration,
    /// Longest wait for a `headers` answer.
    pub request_timeout: Duration,
    /// A circuit with blocks outstanding that delivers none for this long has stalled.
    pub stall_timeout: Duration,
    /// Keep the circuits open after the initial sync and follow new blocks.
    pub follow: bool,
    /// Circuits to keep open when a [`CircuitSource`] can replace them (0: as many as given).
    pub circuits: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            window: 16,
            handshake_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(10),
            follow: false,
            circuits: 0,
        }
    }
}

/// A future yielding fresh circuits.
pub type CircuitFuture = Pin<Box<dyn Future<Output = Vec<CircuitStream>> + Send>>;

/// Asked for `n` fresh circuits to serving peers whenever circuits are lost; may yield fewer
/// (or none: asked again later, with backoff).
pub type CircuitSource = Box<dyn FnMut(usize) -> CircuitFuture + Send>;

/// Which part of the sync is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// Fetching and validating headers.
    Headers,
    /// Fetching and validating blocks.
    Blocks,
}

/// Reported after each `headers` reply and each stored batch of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// What is running.
    pub phase: SyncPhase,
    /// Height of our best header.
    pub header_height: u32,
    /// Blocks stored so far in this sync.
    pub blocks_done: u64,
    /// Blocks this sync has to fetch as far as known now (done + missing).
    pub blocks_total: u64,
    /// Bytes received so far, envelopes included.
    pub bytes: u64,
}

/// What happens during a sync, as it happens.
#[derive(Debug)]
pub enum SyncEvent {
    /// Progress.
    Progress(SyncProgress),
    /// A circuit was broken (it misbehaved, stalled, or closed) and dropped.
    CircuitFailed {
        /// Its index (the circuits given are 0.., replacements numbered on).
        circuit: usize,
        /// What went wrong.
        error: String,
        /// Whether it was broken as misbehaving (and its target reported).
        misbehaving: bool,
    },
    /// A replacement circuit joined.
    CircuitAdded {
        /// Its index.
        circuit: usize,
        /// Its onion layers.
        hops: usize,
    },
    /// The initial sync is complete (follow mode goes on).
    Synced {
        /// Best height.
        height: u32,
        /// Best tip.
        tip: BlockHash,
        /// Blocks stored so far.
        blocks: u64,
    },
    /// Follow mode: a new best block is stored.
    NewTip {
        /// Its height.
        height: u32,
        /// Its hash.
        hash: BlockHash,
    },
    /// Follow mode: a serving peer announced a transaction.
    Tx(Txid),
}

/// What a sync did.
#[derive(Debug)]
pub struct SyncReport {
    /// New headers stored.
    pub headers: u64,
    /// Blocks downloaded and stored.
    pub blocks: u64,
    /// Blocks requested (`getdata` items) over all circuits.
    pub requested: u64,
    /// Blocks received that were already stored or being stored (should be 0).
    pub refetched: u64,
    /// Bytes received over all circuits, envelopes included.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Our best tip afterwards.
    pub tip: BlockHash,
    /// Its height.
    pub height: u32,
    /// Circuits (by index) that failed; they were broken (misbehaving ones reported).
    pub peer_errors: Vec<(usize, ChainError)>,
    /// Replacement circuits that joined.
    pub replaced: usize,
}

/// Syncs `store` from the peer at the other end of `stream`, with default options.
pub async fn sync(
    stream: CircuitStream,
    params: &NetParams,
    store: &SharedStore,
    progress: impl FnMut(SyncProgress),
) -> Result<SyncReport, ChainError> {
    sync_with(vec![stream], params, store, &SyncOptions::default(), progress).await
}

/// Syncs `store` over several circuits to serving peers (no replacements, no following).
///
/// Fails if every circuit failed before the work was done (with the first circuit's error).
/// Circuits that failed while others completed the work are listed in
/// [`SyncReport::peer_errors`].
pub async fn sync_with(
    streams: Vec<CircuitStream>,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    mut progress: impl FnMut(SyncProgress),
) -> Result<SyncReport, ChainError> {
    let opts = SyncOptions { follow: false, ..opts.clone() };
    run_sync(streams, params, store, &opts, None, |e| {
        if let SyncEvent::Progress(p) = e {
            progress(p)
        }
    })
    .await
}

/// Runs a sync (see the module documentation). Without `opts.follow` it returns once synced;
/// with it, only on a store failure or when no circuit is left and none can be had.
pub async fn run_sync(
    streams: Vec<CircuitStream>,
    params: &NetParams,
    store: &SharedStore,
    opts: &SyncOptions,
    source: Option<CircuitSource>,
    on_event: impl FnMut(SyncEvent),
) -> Result<SyncReport, ChainError> {
    {
        let s = read(store);
        if s.params().magic != params.magic || s.params().genesis_hash != params.genesis_hash {
            return Err(ChainError::Params(format!(
                "store is for {}, sync asked for {}",
                s.params().name,
                params.name
            )));
        }
    }
    if streams.is_empty() && source.is_none() {
        return Err(ChainError::Params("no circuits to sync over".into()));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let target = if opts.circuits > 0 { opts.circuits } else { streams.len().max(1) };
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
        low_water: 0,
        epoch: Instant::now(),
        headers_new: 0,
        headers_done: false,
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
    };
    for s in streams {
        engine.add_circuit(s, false);
    }
    if engine.circuits.is_empty() {
        engine.want_circuits();
    }
    engine.run().await
}

/// Sends our `version` and waits for the peer's `version` (answered with `verack`) and
/// `verack`. Returns the peer's `version`. (For single-purpose conversations such as
/// `anomos send-tx`; [`run_sync`] shakes hands inside its engine.)
pub async fn handshake(
    peer: &mut BtcPeer,
    our_height: u32,
    relay: bool,
    limit: Duration,
) -> Result<VersionMessage, ChainError> {
    peer.send(&Message::Version(version_message(ServiceFlags::NONE, our_height, relay))).await?;
    let deadline = Instant::now() + limit;
    let (mut theirs, mut verack): (Option<VersionMessage>, bool) = (None, false);
    loop {
        if let (Some(v), true) = (&theirs, verack) {
            return Ok(v.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv_timeout(left, "the handshake").await? {
            Message::Version(v) if theirs.is_none() => {
                if v.version < MIN_PEER_VERSION {
                    return Err(ChainError::Protocol(format!("protocol version {} is too old", v.version)));
                }
                peer.send(&Message::Verack).await?;
                theirs = Some(v);
            }
            Message::Verack => verack = true,
            Message::Ping(n) => peer.send(&Message::Pong(n)).await?,
            other => debug!(command = other.command(), "ignored during handshake"),
        }
    }
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
    /// When a `block` last arrived (ms since the engine's epoch; written by the reader).
    last_block: Arc<AtomicU64>,
    /// An outstanding `getheaders` (and when it was sent).
    headers_req: Option<Instant>,
    /// Blocks this circuit answered `notfound` for.
    refused: HashSet<BlockHash>,
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
    epoch: Instant,
    headers_new: u64,
    /// Some circuit's headers ran out (a reply below 2000).
    headers_done: bool,
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
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Reads one circuit: decodes every message (checking blocks context-free) for the engine,
/// until the circuit ends or the engine says to abort or close it.
async fn reader(
    id: usize,
    mut stream: CircuitStream,
    magic: [u8; 4],
    events: mpsc::UnboundedSender<Ev>,
    mut ctl: oneshot::Receiver<Ctl>,
    last_block: Arc<AtomicU64>,
    epoch: Instant,
) {
    loop {
        tokio::select! {
            c = &mut ctl => {
                match c {
                    Ok(Ctl::Abort(r)) => stream.abort(r),
                    Ok(Ctl::Close) => stream.close().await,
                    Err(_) => drop(stream),
                }
                return;
            }
            r = stream.recv() => match r {
                Ok(raw) => {
                    let bytes = raw.len() as u64;
                    let msg = decode_circuit_message(&raw, magic);
                    drop(raw);
                    let checked = match &msg {
                        Ok(Message::Block(b)) => {
                            last_block.store(millis_since(epoch), Ordering::Relaxed);
                            Some(check_block(b))
                        }
                        _ => None,
                    };
                    if events.send(Ev::Msg { id, bytes, msg, checked }).is_err() {
                        return;
                    }
                }
                Err(err) => {
                    let _ = events.send(Ev::Closed { id, err });
                    return;
                }
            }
        }
    }
}

/// Sends one circuit's messages in order.
async fn writer(sender: CircuitSender, mut out: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(m) = out.recv().await {
        if sender.send(m).await.is_err() {
            return;
        }
    }
}

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
        if !self.headers_done || self.writing || !self.to_store.is_empty() || !self.in_flight.is_empty() {
            return false;
        }
        // (A circuit still shaking hands holds up nothing: its pipelined `getheaders` counts once it is ready.)
        if self.circuits.values().any(|c| c.ready && c.headers_req.is_some()) {
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
        let last_block = Arc::new(AtomicU64::new(0));
        tokio::spawn(writer(stream.sender(), out_rx));
        tokio::spawn(reader(
            id,
            stream,
            self.params.magic,
            self.events_tx.clone(),
            ctl_rx,
            last_block.clone(),
            self.epoch,
        ));
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
            last_block,
            headers_req: None,
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
        let now_ms = millis_since(self.epoch);
        let mut failed = Vec::new();
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
                let since_block = Duration::from_millis(now_ms.saturating_sub(c.last_block.load(Ordering::Relaxed)));
                if since_wait.min(since_block) > self.opts.stall_timeout {
                    failed.push((*id, ChainError::Timeout("blocks (stalled)")));
                }
            }
        }
        for (id, e) in failed {
            self.fail(id, e);
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
            _ if !ready => debug!(circuit = id, "ignored during the handshake"),
            Message::Headers(headers) => self.on_headers(id, headers)?,
            Message::Block(block) => self.on_block(id, block, checked)?,
            Message::NotFound(items) => {
                let Some(c) = self.circuits.get_mut(&id) else { return Ok(()) };
                for item in items {
                    if let Inventory::Block(h) | Inventory::WitnessBlock(h) = item {
                        if let Some(pos) = c.in_flight.iter().position(|x| *x == h) {
                            c.in_flight.remove(pos);
                            c.refused.insert(h);
                            self.in_flight.remove(&h);
                            debug!(circuit = id, %h, "block not found there; asking others");
                        }
                    }
                }
                self.assign();
            }
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

    /// Sends `getheaders` with our locator (or, unrooted, for the genesis header).
    fn get_headers(&mut self, id: usize, stop: BlockHash) {
        let (locator, stop) = {
            let s = read(self.store);
            if s.is_rooted() {
                (s.locator(), stop)
            } else {
                (Vec::new(), self.params.genesis_hash)
            }
        };
        self.send_getheaders(id, locator, stop);
    }

    fn send_getheaders(&mut self, id: usize, locator_hashes: Vec<BlockHash>, stop_hash: BlockHash) {
        if let Some(c) = self.circuits.get_mut(&id) {
            c.headers_req = Some(Instant::now());
        }
        let req = GetHeadersMessage { version: PROTOCOL_VERSION, locator_hashes, stop_hash };
        self.send(id, &Message::GetHeaders(req));
    }

    fn on_headers(&mut self, id: usize, headers: Vec<Header>) -> Result<(), ChainError> {
        if headers.len() > MAX_HEADERS {
            return Err(ChainError::Protocol(format!("{} headers in one message", headers.len())));
        }
        let answer = match self.circuits.get_mut(&id) {
            Some(c) => c.headers_req.take().is_some(),
            None => return Ok(()),
        };
        let Some(first) = headers.first().copied() else {
            if answer {
                self.headers_done = true;
            }
            return Ok(());
        };
        let rooted = read(self.store).is_rooted();
        if !rooted {
            check_genesis_header(self.params, &first)?;
            let params = self.params;
            self.headers_new +=
                write(self.store).insert_headers_checked(&[first], |_, h| check_genesis_header(params, h))? as u64;
            info!(genesis = %first.block_hash(), "learned the genesis header of {}", params.name);
            self.low_water = 0;
            self.get_headers(id, no_stop());
            return Ok(());
        }
        // An announcement that does not connect: ask for the headers between.
        if !answer && read(self.store).entry(&first.prev_blockhash).is_none() {
            let last = headers.last().map_or(first.block_hash(), Header::block_hash);
            self.get_headers(id, last);
            return Ok(());
        }
        for pair in headers.windows(2) {
            if let [a, b] = pair {
                if let Err(e) = check_linkage(a, b) {
                    // Keep what is valid before the break, then fail.
                    let upto = headers.iter().position(|h| h == b).unwrap_or(0);
                    self.accept_headers(headers.get(..upto).unwrap_or_default())?;
                    return Err(ChainError::invalid_header(b.block_hash(), e));
                }
            }
        }
        let before = read(self.store).best_tip();
        self.accept_headers(&headers)?;
        if answer {
            if headers.len() == MAX_HEADERS {
                let last = headers.last().map_or(first.block_hash(), Header::block_hash);
                let locator = read(self.store).locator_from(&last);
                self.send_getheaders(id, locator, no_stop());
            } else {
                self.headers_done = true;
            }
        }
        if read(self.store).best_tip() != before {
            if !read(self.store).is_active(&before.0) {
                // A reorg: heights at and below the old tip may hold other blocks now.
                self.low_water = 0;
            }
            self.assign();
        }
        Ok(())
    }

    /// Checks and stores headers (in one write); counts the new ones.
    fn accept_headers(&mut self, headers: &[Header]) -> Result<(), ChainError> {
        if headers.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        let params = self.params;
        let result = write(self.store)
            .insert_headers_checked(headers, |s, h| check_header(s, params, h, now).map(|_| ()))
            .map(|n| n as u64);
        let new = match &result {
            Ok(n) => *n,
            Err(_) => 0,
        };
        self.headers_new += new;
        let n = result?;
        if n > 0 {
            self.progress(SyncPhase::Headers);
        }
        Ok(())
    }

    fn on_block(&mut self, id: usize, block: Block, checked: Option<Result<(), BtcError>>) -> Result<(), ChainError> {
        let hash = block.block_hash();
        let Some(c) = self.circuits.get_mut(&id) else { return Ok(()) };
        let Some(pos) = c.in_flight.iter().position(|h| *h == hash) else {
            // A block we know but did not ask this circuit for is a wrong answer to a getdata
            // (requests are answered once, in order); one we do not know is unsolicited.
            if read(self.store).entry(&hash).is_some() {
                return Err(ChainError::Protocol(format!("sent block {hash}, which we did not ask it for")));
            }
            debug!(circuit = id, %hash, "unsolicited block ignored");
            return Ok(());
        };
        c.in_flight.remove(pos);
        if c.in_flight.is_empty() {
            c.waiting_since = Instant::now();
        }
        self.in_flight.remove(&hash);
        if read(self.store).has_block(&hash) || self.storing.contains(&hash) {
            self.refetched += 1;
        }
        if let Some(Err(e)) = checked {
            return Err(ChainError::invalid_block(hash, e));
        }
        if checked.is_none() {
            check_block(&block).map_err(|e| ChainError::invalid_block(hash, e))?;
        }
        let height = read(self.store)
            .height_of(&hash)
            .ok_or_else(|| ChainError::Store(format!("block {hash} has no header")))?;
        check_block_contextual(&block, self.params, height)?;
        self.to_store.push(block);
        self.flush_blocks();
        self.assign();
        Ok(())
    }

    /// Starts a commit of the waiting blocks unless one is running.
    fn flush_blocks(&mut self) {
        if self.writing || self.to_store.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_store);
        let hashes: Vec<BlockHash> = batch.iter().map(Block::block_hash).collect();
        self.storing.extend(hashes.iter().copied());
        self.writing = true;
        let store = self.store.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let result = anomos_net::rt::spawn_blocking(move || write(&store).insert_blocks(&batch))
                .await
                .unwrap_or_else(|e| Err(ChainError::Store(format!("store task: {e}"))));
            let _ = tx.send(Ev::Stored { hashes, result });
        });
    }

    /// Spreads missing best-chain blocks over ready circuits with free slots.
    fn assign(&mut self) {
        let budget = self.opts.window.max(1) * self.circuits.len().max(1) * 2;
        if self.storing.len() + self.to_store.len() >= budget {
            return;
        }
        let free: Vec<(usize, usize)> = self
            .circuits
            .iter()
            .filter(|(_, c)| c.ready)
            .map(|(id, c)| (*id, self.opts.window.saturating_sub(c.in_flight.len())))
            .filter(|(_, n)| *n > 0)
            .collect();
        if free.is_empty() {
            return;
        }
        let want: usize = free.iter().map(|(_, n)| n).sum::<usize>() * 2;
        let candidates: Vec<BlockHash> = {
            let s = read(self.store);
            let mut first_missing = None;
            let mut out = Vec::new();
            for (height, hash) in s.missing_from(self.low_water) {
                first_missing.get_or_insert(height);
                if self.in_flight.contains_key(&hash) || self.storing.contains(&hash) {
                    continue;
                }
                if self.to_store.iter().any(|b| b.block_hash() == hash) {
                    continue;
                }
                out.push(hash);
                if out.len() >= want {
                    break;
                }
            }
            if s.is_rooted() {
                self.low_water = first_missing.unwrap_or_else(|| s.best_tip().1.saturating_add(1));
            }
            out
        };
        let mut taken: HashSet<BlockHash> = HashSet::new();
        for (id, n) in free {
            let Some(c) = self.circuits.get_mut(&id) else { continue };
            let mine: Vec<BlockHash> =
                candidates.iter().filter(|h| !taken.contains(*h) && !c.refused.contains(*h)).take(n).copied().collect();
            if mine.is_empty() {
                continue;
            }
            if c.in_flight.is_empty() {
                c.waiting_since = Instant::now();
            }
            c.in_flight.extend_from_slice(&mine);
            self.requested += mine.len() as u64;
            for h in &mine {
                taken.insert(*h);
                self.in_flight.insert(*h, id);
            }
            self.send(id, &Message::GetData(mine.into_iter().map(Inventory::WitnessBlock).collect()));
        }
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
        ChainError::Circuit(PeerError::Broken(r)) => ChainError::Circuit(PeerError::Broken(*r)),
        ChainError::Circuit(p) => ChainError::Protocol(format!("circuit: {p}")),
        ChainError::UnknownParent { hash, prev } => ChainError::UnknownParent { hash: *hash, prev: *prev },
        ChainError::Store(s) => ChainError::Store(s.clone()),
        ChainError::Params(s) => ChainError::Params(s.clone()),
    }
}
