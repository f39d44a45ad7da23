//! The serving side: answers Bitcoin P2P requests arriving over circuits that end here, and
//! announces new blocks and transactions on every open circuit.
//!
//! [`ChainService`] is the node's [`Service`]: each accepted circuit gets a task running one
//! conversation. It must open with `version` (answered with our anonymous `version` and
//! `verack`); then:
//!
//! | request                      | answer                                                     |
//! |------------------------------|------------------------------------------------------------|
//! | `ping`                       | `pong`                                                     |
//! | `getheaders`                 | `headers`, at most 2000 from the locator (Core's rules)    |
//! | `getblocks`                  | `inv` of at most 500 best-chain blocks after the locator   |
//! | `getdata` (blocks, txs)      | one `block`/`tx` each; one `notfound` for those we lack    |
//! | `mempool`                    | `inv` of the pool's transactions                           |
//! | `tx`                         | checked into the pool and announced on the other circuits; |
//! |                              | a `reject` says why not                                    |
//! | `getaddr`                    | an empty `addr` (we never reveal addresses)                |
//! | `sendheaders`                | new blocks are announced with `headers` instead of `inv`   |
//! | `feefilter`, `verack`, `pong`, `inv`, anything else | nothing                             |
//!
//! Announcements: [`ChainService::announce_block`] (after mining) sends the new header (to
//! peers that sent `sendheaders`) or an `inv` to every open conversation;
//! a transaction that enters the pool is announced with `inv` to every other conversation whose
//! `version` asked for transaction relay.
//!
//! A message that is not exactly one valid envelope of our network (bad magic, checksum,
//! command, oversize, undecodable payload), a first message other than `version`, an oversized
//! locator or `getdata`, or silence past the timeouts ends the conversation: the stream is
//! dropped, which breaks the circuit. Nothing the peer sends can panic the task.
//!
//! For tests only, [`Misbehave`] makes a service lie (`anomos peer --misbehave …`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::btc::{Envelope, Inventory, Message, NetParams, Reject, ServiceFlags};
use anomos_proto::cell::BreakReason;
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, Transaction, Txid};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::mine::unix_now;
use super::validate::check_pool_tx;
use super::wire::{version_message, BtcPeer, MIN_PEER_VERSION};
use super::{read, write, ChainError, SharedStore, MAX_HEADERS, MAX_INV, MAX_LOCATOR};
use crate::circuit::CircuitStream;
use crate::node::Service;

mod txs;
pub use txs::{TxAllowance, POOL_SHARE_BYTES, TXS_PER_MINUTE, TX_BURST};

/// How long a new circuit may take to send `version`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an established conversation may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Most block hashes in a `getblocks` answer (Bitcoin Core's limit).
pub const MAX_GETBLOCKS: usize = 500;

/// **Tests only**: how a serving peer lies, to prove requesters detect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehave {
    /// Every served block has a changed coinbase (its header, hence its hash, kept): the merkle
    /// root no longer matches.
    BadMerkle,
    /// The last header of every `headers` answer has a nonce that misses the target (an answer
    /// with nothing new carries our tip header, so mangled).
    BadPow,
    /// `getdata` for a block is answered with another block of the chain (the genesis block).
    WrongBlock,
    /// Headers are answered honestly, `getdata` for a block never, and a block nobody asked for (one the
    /// requester cannot know) is sent every [`JUNK_EVERY`]: a staller that looks busy (SPEC open issue 26).
    Stall,
    /// `getdata` for a block is answered with `notfound`, always.
    NotFound,
}

/// How often a [`Misbehave::Stall`] service sends a junk block.
pub const JUNK_EVERY: Duration = Duration::from_secs(3);

impl std::str::FromStr for Misbehave {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bad-merkle" => Ok(Misbehave::BadMerkle),
            "bad-pow" => Ok(Misbehave::BadPow),
            "wrong-block" => Ok(Misbehave::WrongBlock),
            "stall" => Ok(Misbehave::Stall),
            "not-found" => Ok(Misbehave::NotFound),
            _ => Err(format!("{s}: expected bad-merkle, bad-pow, wrong-block, stall or not-found")),
        }
    }
}

/// Something to tell every open conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// A new best block.
    Block(BlockHash),
    /// A transaction entered the pool through conversation `from`.
    Tx {
        /// Its txid.
        txid: Txid,
        /// The conversation it came from (not told about it again).
        from: u64,
    },
}

/// Serves the chain in a store to requesters.
#[derive(Clone)]
pub struct ChainService {
    params: NetParams,
    store: SharedStore,
    announce: broadcast::Sender<Announcement>,
    misbehave: Option<Misbehave>,
    next_id: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
}

impl ChainService {
    /// Serves `store`, on the store's network.
    pub fn new(store: SharedStore) -> ChainService {
        let params = read(&store).params().clone();
        let (announce, _) = broadcast::channel(1024);
        ChainService {
            params,
            store,
            announce,
            misbehave: None,
            next_id: Arc::new(AtomicU64::new(1)),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// **Tests only**: makes this service lie as told.
    pub fn with_misbehave(mut self, m: Option<Misbehave>) -> ChainService {
        self.misbehave = m;
        self
    }

    /// The network served.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// The store served (shared with sync).
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Conversations open now.
    pub fn open_circuits(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Announces a new best block on every open conversation.
    pub fn announce_block(&self, hash: BlockHash) {
        let _ = self.announce.send(Announcement::Block(hash));
    }

    /// Runs one conversation (see [`serve_stream`]).
    pub async fn serve(&self, stream: CircuitStream) -> Result<(), ChainError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        let peer = BtcPeer::new(stream, self.params.magic);
        let txs = TxAllowance::new(tokio::time::Instant::now());
        let mut conv = Conversation { svc: self, id, peer, handshaken: false, send_headers: false, relay: false, txs };
        let r = conv.run().await;
        self.open.fetch_sub(1, Ordering::Relaxed);
        // A requester that broke the protocol (or went silent) gets its circuit broken with that reason, not the
        // `finished` of a clean close, so it can tell a refusal from the end of a conversation.
        if let Err(e) = &r {
            let reason = e.break_reason();
            if reason != BreakReason::Finished {
                conv.peer.into_stream().abort(reason);
            }
        }
        r
    }
}

impl Service for ChainService {
    fn accept(&self, stream: CircuitStream) {
        let svc = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match svc.serve(stream).await {
                        Ok(()) => debug!("chain circuit ended"),
                        Err(e) => info!("closing chain circuit: {e}"),
                    }
                });
            }
            Err(_) => warn!("chain service: no async runtime, dropping circuit"),
        }
    }
}

/// Runs one conversation over `stream` for the chain in `store` until the peer leaves (`Ok`) or
/// misbehaves (`Err`). The circuit is broken on return: with `misbehaving` or `timeout` when the requester broke
/// the protocol or went silent ([`ChainError::break_reason`]), `finished` otherwise.
pub async fn serve_stream(stream: CircuitStream, params: &NetParams, store: &SharedStore) -> Result<(), ChainError> {
    let svc = ChainService::new(store.clone());
    if svc.params.magic != params.magic {
        return Err(ChainError::Params(format!("store is for {}, not {}", svc.params.name, params.name)));
    }
    svc.serve(stream).await
}

/// One requester's conversation.
struct Conversation<'a> {
    svc: &'a ChainService,
    id: u64,
    peer: BtcPeer,
    handshaken: bool,
    /// They sent `sendheaders`.
    send_headers: bool,
    /// Their `version` asked for transaction announcements.
    relay: bool,
    /// How many more transactions they may hand the pool.
    txs: TxAllowance,
}

impl Conversation<'_> {
    async fn run(&mut self) -> Result<(), ChainError> {
        let mut announcements = self.svc.announce.subscribe();
        let stall = self.svc.misbehave == Some(Misbehave::Stall);
        let mut junk = tokio::time::interval(JUNK_EVERY);
        let mut junk_sent = 0u32;
        loop {
            let limit = if self.handshaken { IDLE_TIMEOUT } else { HANDSHAKE_TIMEOUT };
            tokio::select! {
                // In order, so a simulation replays (a requester that floods requests delays only its own
                // announcements; the broadcast channel skips what it misses).
                biased;
                msg = self.peer.recv_timeout(limit, "the next request") => {
                    let msg = match msg {
                        Ok(m) => m,
                        // The circuit ended: the peer is done.
                        Err(ChainError::Circuit(_)) => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    self.handle(msg).await?;
                }
                a = announcements.recv(), if self.handshaken => match a {
                    Ok(a) => self.announce(a).await?,
                    Err(broadcast::error::RecvError::Lagged(n)) => debug!(missed = n, "announcements skipped"),
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                _ = junk.tick(), if stall && self.handshaken => {
                    junk_sent = junk_sent.wrapping_add(1);
                    let tip = {
                        let s = read(&self.svc.store);
                        s.block(&s.best_tip().0)?
                    };
                    if let Some(mut block) = tip {
                        block.header.time = block.header.time.wrapping_add(junk_sent);
                        self.peer.send(&Message::Block(block)).await?;
                    }
                }
            }
        }
    }

    async fn announce(&mut self, a: Announcement) -> Result<(), ChainError> {
        match a {
            Announcement::Block(hash) => {
                if self.send_headers {
                    let header = read(&self.svc.store).header(&hash);
                    if let Some(h) = header {
                        self.peer.send(&Message::Headers(vec![h])).await?;
                    }
                } else {
                    self.peer.send(&Message::Inv(vec![Inventory::Block(hash)])).await?;
                }
            }
            Announcement::Tx { txid, from } => {
                if from != self.id && self.relay {
                    self.peer.send(&Message::Inv(vec![Inventory::Transaction(txid)])).await?;
                }
            }
        }
        Ok(())
    }

    async fn handle(&mut self, msg: Message) -> Result<(), ChainError> {
        let store = &self.svc.store;
        if !self.handshaken {
            let Message::Version(v) = msg else {
                return Err(ChainError::Protocol(format!("'{}' before 'version'", msg.command())));
            };
            if v.version < MIN_PEER_VERSION {
                return Err(ChainError::Protocol(format!("protocol version {} is too old", v.version)));
            }
            self.handshaken = true;
            self.relay = v.relay;
            let height = read(store).best_tip().1;
            self.peer.send(&Message::Version(version_message(ServiceFlags::NETWORK, height, false))).await?;
            self.peer.send(&Message::Verack).await?;
            return Ok(());
        }
        match msg {
            Message::Ping(nonce) => self.peer.send(&Message::Pong(nonce)).await?,
            Message::GetHeaders(req) => {
                check_locator(&req.locator_hashes)?;
                // Only headers of blocks we can serve: a requester takes `notfound` for a block whose header we
                // sent as withholding (SPEC §9). A store still fetching bodies stops at its first gap.
                let mut headers = read(store).servable_headers_after(&req.locator_hashes, &req.stop_hash, MAX_HEADERS);
                if self.svc.misbehave == Some(Misbehave::BadPow) {
                    // With nothing new to send (the requester already has our chain from others), resend the
                    // tip: every answer lies, however the requester's circuits race.
                    if headers.is_empty() {
                        let s = read(store);
                        headers.extend(s.header(&s.best_tip().0));
                    }
                    if let Some(last) = headers.last_mut() {
                        while last.validate_pow(last.target()).is_ok() {
                            last.nonce = last.nonce.wrapping_add(1);
                        }
                    }
                }
                self.peer.send(&Message::Headers(headers)).await?;
            }
            Message::GetBlocks(req) => {
                check_locator(&req.locator_hashes)?;
                let hashes: Vec<Inventory> = read(store)
                    .headers_after(&req.locator_hashes, &req.stop_hash, MAX_GETBLOCKS)
                    .iter()
                    .map(|h| Inventory::Block(h.block_hash()))
                    .collect();
                self.peer.send(&Message::Inv(hashes)).await?;
            }
            Message::GetData(items) => self.getdata(items).await?,
            Message::GetAddr => self.peer.send(&Message::Addr(Vec::new())).await?,
            Message::MemPool => {
                let txids = read(store).pool_txids();
                let inv: Vec<Inventory> = txids.into_iter().take(MAX_INV).map(Inventory::Transaction).collect();
                self.peer.send(&Message::Inv(inv)).await?;
            }
            Message::Tx(tx) => self.receive_tx(tx).await?,
            Message::SendHeaders => self.send_headers = true,
            Message::Version(_) => debug!("duplicate version ignored"),
            Message::Verack | Message::FeeFilter(_) | Message::Pong(_) | Message::Inv(_) => {}
            other => debug!(command = other.command(), "ignored"),
        }
        Ok(())
    }

    /// A transaction from the requester: into the pool if it passes, then announced to others.
    async fn receive_tx(&mut self, tx: Transaction) -> Result<(), ChainError> {
        let txid = tx.compute_txid();
        let size = tx.total_size();
        // Beyond its rate or its share of the pool, refused before anything is checked or stored (0x40:
        // nonstandard, what Bitcoin Core answers for policy refusals).
        let allowed = self.txs.take(size, tokio::time::Instant::now()).map_err(|why| (0x40, why.to_string()));
        let verdict = match allowed.and_then(|()| check_pool_tx(&tx).map_err(|why| (0x10, why))) {
            Err(refused) => Err(refused),
            Ok(()) => {
                let store = self.svc.store.clone();
                let tx2 = tx.clone();
                let added = anomos_net::rt::spawn_blocking(move || write(&store).add_pool_tx(&tx2, unix_now()))
                    .await
                    .map_err(|e| ChainError::Store(format!("pool task: {e}")))??;
                added.map_err(|r| (if r == super::store::PoolReject::Duplicate { 0x12 } else { 0x10 }, r.to_string()))
            }
        };
        match verdict {
            Ok(_) => {
                self.txs.pooled(size);
                info!(%txid, size, "transaction accepted into the pool");
                let _ = self.svc.announce.send(Announcement::Tx { txid, from: self.id });
            }
            Err((ccode, reason)) => {
                // A flood is refused once per transaction: its refusals are not worth a line each.
                if ccode == 0x40 {
                    debug!(%txid, "transaction refused: {reason}");
                } else {
                    info!(%txid, "transaction refused: {reason}");
                }
                let reject =
                    Reject { message: "tx".into(), ccode, reason, hash: Some(txid.to_raw_hash().to_byte_array()) };
                self.peer.send(&Message::Reject(reject)).await?;
            }
        }
        Ok(())
    }

    /// Sends the requested blocks and transactions in order, then one `notfound` for everything
    /// we lack.
    async fn getdata(&mut self, items: Vec<Inventory>) -> Result<(), ChainError> {
        if items.len() > MAX_INV {
            return Err(ChainError::Protocol(format!("getdata of {} items", items.len())));
        }
        let magic = self.svc.params.magic;
        let mut missing = Vec::new();
        for item in items {
            match item {
                Inventory::Block(_) | Inventory::WitnessBlock(_) if self.svc.misbehave == Some(Misbehave::Stall) => {}
                Inventory::Block(_) | Inventory::WitnessBlock(_) if self.svc.misbehave == Some(Misbehave::NotFound) => {
                    missing.push(item);
                }
                Inventory::Block(h) | Inventory::WitnessBlock(h) => {
                    let witness = matches!(item, Inventory::WitnessBlock(_));
                    let Some(payload) = self.block_payload(&h, witness)? else {
                        missing.push(item);
                        continue;
                    };
                    self.peer.send_envelope(&Envelope { magic, command: "block".into(), payload }).await?;
                }
                Inventory::Transaction(t) | Inventory::WitnessTransaction(t) => {
                    let tx = read(&self.svc.store).relay_tx(&t);
                    match tx {
                        Some(mut tx) => {
                            if matches!(item, Inventory::Transaction(_)) {
                                tx.input.iter_mut().for_each(|i| i.witness.clear());
                            }
                            self.peer.send(&Message::Tx(tx)).await?;
                        }
                        None => missing.push(item),
                    }
                }
                other => missing.push(other),
            }
        }
        if !missing.is_empty() {
            self.peer.send(&Message::NotFound(missing)).await?;
        }
        Ok(())
    }

    /// A stored block as a `block` payload (see [`block_payload`]), with the test-only lies.
    fn block_payload(&self, hash: &BlockHash, witness: bool) -> Result<Option<Vec<u8>>, ChainError> {
        let store = read(&self.svc.store);
        let mut hash = *hash;
        if self.svc.misbehave == Some(Misbehave::WrongBlock) && store.height_of(&hash).is_some() {
            hash = self.svc.params.genesis_hash;
        }
        let Some(raw) = store.block_bytes(&hash)? else { return Ok(None) };
        drop(store);
        if self.svc.misbehave == Some(Misbehave::BadMerkle) {
            let mut block: Block = decode_stored(&hash, &raw)?;
            if let Some(out) = block.txdata.first_mut().and_then(|cb| cb.output.first_mut()) {
                out.value += bitcoin::Amount::from_sat(1);
            }
            return Ok(Some(bitcoin::consensus::serialize(&block)));
        }
        block_payload(&hash, raw, witness).map(Some)
    }
}

fn check_locator(locator: &[BlockHash]) -> Result<(), ChainError> {
    if locator.len() > MAX_LOCATOR {
        return Err(ChainError::Protocol(format!("locator of {} hashes", locator.len())));
    }
    Ok(())
}

fn decode_stored(hash: &BlockHash, raw: &[u8]) -> Result<Block, ChainError> {
    bitcoin::consensus::deserialize(raw)
        .map_err(|e| ChainError::Store(format!("stored block {hash} does not decode: {e}")))
}

/// A stored block as a `block` payload: as stored for witness requests; without witness data
/// for plain `MSG_BLOCK` requests (re-serialized only if there is any).
pub fn block_payload(hash: &BlockHash, raw: Vec<u8>, witness: bool) -> Result<Vec<u8>, ChainError> {
    if witness {
        return Ok(raw);
    }
    let mut block = decode_stored(hash, &raw)?;
    if block.txdata.iter().all(|tx| tx.input.iter().all(|i| i.witness.is_empty())) {
        return Ok(raw);
    }
    for tx in &mut block.txdata {
        for input in &mut tx.input {
            input.witness.clear();
        }
    }
    Ok(bitcoin::consensus::serialize(&block))
}
