//! The serving side: answers Bitcoin P2P requests arriving over circuits that end here.
//!
//! [`ChainService`] is the node's [`Service`]: each accepted circuit gets a task running
//! [`serve_stream`]. The conversation must open with `version` (answered with our anonymous
//! `version` and `verack`); then:
//!
//! | request                      | answer                                                 |
//! |------------------------------|--------------------------------------------------------|
//! | `ping`                       | `pong`                                                 |
//! | `getheaders`                 | `headers`, at most 2000 from the locator (Core's rules)|
//! | `getdata` (blocks)           | one `block` each; a `notfound` for those we lack       |
//! | `getaddr`                    | an empty `addr` (we never reveal addresses)            |
//! | `mempool`                    | an empty `inv`                                         |
//! | `verack`, `sendheaders`, `feefilter`, `pong`, anything else | nothing              |
//!
//! A message that is not exactly one valid envelope of our network (bad magic, checksum,
//! command, oversize, undecodable payload), a first message other than `version`, an oversized
//! locator or `getdata`, or silence past the timeouts ends the conversation: the stream is
//! dropped, which breaks the circuit. Nothing the peer sends can panic the task.

use std::time::Duration;

use anomos_proto::btc::{Envelope, Inventory, Message, NetParams, ServiceFlags};
use bitcoin::{Block, BlockHash};
use tracing::{debug, info, warn};

use super::wire::{version_message, BtcPeer, MIN_PEER_VERSION};
use super::{read, ChainError, SharedStore, MAX_HEADERS, MAX_INV, MAX_LOCATOR};
use crate::circuit::endpoint::CircuitStream;
use crate::node::Service;

/// How long a new circuit may take to send `version`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an established conversation may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Serves the chain in a store to requesters.
#[derive(Clone)]
pub struct ChainService {
    params: NetParams,
    store: SharedStore,
}

impl ChainService {
    /// Serves `store`, on the store's network.
    pub fn new(store: SharedStore) -> ChainService {
        let params = read(&store).params().clone();
        ChainService { params, store }
    }

    /// The network served.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// The store served (shared with sync).
    pub fn store(&self) -> &SharedStore {
        &self.store
    }
}

impl Service for ChainService {
    fn accept(&self, stream: CircuitStream) {
        let (params, store) = (self.params.clone(), self.store.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match serve_stream(stream, &params, &store).await {
                        Ok(()) => debug!("chain circuit ended"),
                        Err(e) => info!("closing chain circuit: {e}"),
                    }
                });
            }
            Err(_) => warn!("chain service: no async runtime, dropping circuit"),
        }
    }
}

/// Runs one conversation until the peer leaves (`Ok`) or misbehaves (`Err`; the stream is
/// dropped on return either way, which breaks the circuit).
pub async fn serve_stream(stream: CircuitStream, params: &NetParams, store: &SharedStore) -> Result<(), ChainError> {
    let mut peer = BtcPeer::new(stream, params.magic);
    let mut handshaken = false;
    loop {
        let limit = if handshaken { IDLE_TIMEOUT } else { HANDSHAKE_TIMEOUT };
        let msg = match peer.recv_timeout(limit, "the next request").await {
            Ok(m) => m,
            // The circuit ended: the peer is done.
            Err(ChainError::Circuit(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !handshaken {
            let Message::Version(v) = msg else {
                return Err(ChainError::Protocol(format!("'{}' before 'version'", msg.command())));
            };
            if v.version < MIN_PEER_VERSION {
                return Err(ChainError::Protocol(format!("protocol version {} is too old", v.version)));
            }
            handshaken = true;
            let height = read(store).best_tip().1;
            peer.send(&Message::Version(version_message(ServiceFlags::NETWORK, height))).await?;
            peer.send(&Message::Verack).await?;
            continue;
        }
        match msg {
            Message::Ping(nonce) => peer.send(&Message::Pong(nonce)).await?,
            Message::GetHeaders(req) => {
                if req.locator_hashes.len() > MAX_LOCATOR {
                    return Err(ChainError::Protocol(format!("locator of {} hashes", req.locator_hashes.len())));
                }
                let headers = read(store).headers_after(&req.locator_hashes, &req.stop_hash, MAX_HEADERS);
                peer.send(&Message::Headers(headers)).await?;
            }
            Message::GetData(items) => serve_getdata(&mut peer, params, store, items).await?,
            Message::GetAddr => peer.send(&Message::Addr(Vec::new())).await?,
            Message::MemPool => peer.send(&Message::Inv(Vec::new())).await?,
            Message::Version(_) => debug!("duplicate version ignored"),
            Message::Verack | Message::SendHeaders | Message::FeeFilter(_) | Message::Pong(_) => {}
            other => debug!(command = other.command(), "ignored"),
        }
    }
}

/// Sends the requested blocks in order, then one `notfound` for everything we lack.
async fn serve_getdata(
    peer: &mut BtcPeer,
    params: &NetParams,
    store: &SharedStore,
    items: Vec<Inventory>,
) -> Result<(), ChainError> {
    if items.len() > MAX_INV {
        return Err(ChainError::Protocol(format!("getdata of {} items", items.len())));
    }
    let mut missing = Vec::new();
    for item in items {
        let (hash, witness) = match item {
            Inventory::Block(h) => (h, false),
            Inventory::WitnessBlock(h) => (h, true),
            other => {
                missing.push(other);
                continue;
            }
        };
        // The lock is released before the await below.
        let raw = read(store).block_bytes(&hash)?;
        match raw {
            Some(raw) => {
                let payload = block_payload(&hash, raw, witness)?;
                let env = Envelope { magic: params.magic, command: "block".into(), payload };
                peer.send_envelope(&env).await?;
            }
            None => missing.push(item),
        }
    }
    if !missing.is_empty() {
        peer.send(&Message::NotFound(missing)).await?;
    }
    Ok(())
}

/// A stored block as a `block` payload: as stored for witness requests; without witness data
/// for plain `MSG_BLOCK` requests (re-serialized only if there is any).
fn block_payload(hash: &BlockHash, raw: Vec<u8>, witness: bool) -> Result<Vec<u8>, ChainError> {
    if witness {
        return Ok(raw);
    }
    let mut block: Block = bitcoin::consensus::deserialize(&raw)
        .map_err(|e| ChainError::Store(format!("stored block {hash} does not decode: {e}")))?;
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
