//! A requester that lies to the chain-serving peers: over a real circuit it sends Bitcoin messages valid in form
//! but hostile in content (fake and unsolicited headers and blocks, transactions spending nothing, locators and
//! requests of random and of oversized lengths, a second `version`, unknown commands), never reading faster than
//! it likes, then a `ping`.
//!
//! The invariant: the serving peer either answers the `ping` or ends the circuit with a reason within a bound, and
//! its transaction pool stays within its cap; that the honest syncs still complete is checked by [`super::chain`].

use anomos::chain::wire::version_message;
use anomos::chain::MAX_LOCATOR;
use anomos_proto::btc::NetParams as ChainParams;
use anomos_proto::btc::{Address, GetBlocksMessage, GetHeadersMessage, Inventory, Message, ServiceFlags};
use bitcoin::block::{Header, Version};
use bitcoin::hashes::Hash;
use bitcoin::{absolute, transaction, Amount, BlockHash, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut};
use bitcoin::{CompactTarget, TxMerkleNode, Txid, Witness};

use super::chain::{self, Reference};
use super::*;

/// How long the serving peer has to answer the final `ping` (or end the circuit).
const BOUND: Duration = Duration::from_secs(90);

fn hash32(rng: &mut StdRng) -> [u8; 32] {
    let mut h = [0u8; 32];
    rng.fill_bytes(&mut h);
    h
}

fn block_hash(rng: &mut StdRng, r: &Reference) -> BlockHash {
    if rng.gen_bool(0.5) {
        r.hash_at(rng.gen_range(0..=r.height()))
    } else {
        BlockHash::from_byte_array(hash32(rng))
    }
}

fn inventory(rng: &mut StdRng, r: &Reference, max: usize) -> Vec<Inventory> {
    (0..rng.gen_range(0..=max))
        .map(|_| match rng.gen_range(0..3) {
            0 => Inventory::Block(block_hash(rng, r)),
            1 => Inventory::Transaction(Txid::from_byte_array(hash32(rng))),
            _ => Inventory::WitnessBlock(block_hash(rng, r)),
        })
        .collect()
}

fn locator(rng: &mut StdRng, r: &Reference) -> Vec<BlockHash> {
    // Now and then one over the limit: the serving peer must end the circuit (misbehaving), not serve it.
    let n = if rng.gen_bool(0.1) { MAX_LOCATOR + 1 + rng.gen_range(0..50) } else { rng.gen_range(0..=MAX_LOCATOR) };
    (0..n).map(|_| block_hash(rng, r)).collect()
}

fn header(rng: &mut StdRng, r: &Reference) -> Header {
    Header {
        version: Version::from_consensus(rng.gen()),
        prev_blockhash: block_hash(rng, r),
        merkle_root: TxMerkleNode::from_byte_array(hash32(rng)),
        time: rng.gen(),
        bits: if rng.gen_bool(0.5) {
            CompactTarget::from_consensus(0x207f_ffff)
        } else {
            CompactTarget::from_consensus(rng.gen())
        },
        nonce: rng.gen(),
    }
}

/// A transaction that spends outputs that do not exist (well formed; a pool without UTXOs may keep it).
fn tx(rng: &mut StdRng) -> Transaction {
    Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: (0..rng.gen_range(0..=3))
            .map(|_| TxIn {
                previous_output: OutPoint { txid: Txid::from_byte_array(hash32(rng)), vout: rng.gen_range(0..4) },
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            })
            .collect(),
        output: (0..rng.gen_range(0..=2))
            .map(|_| TxOut {
                value: Amount::from_sat(rng.gen_range(0..=2_100_000_000_000_000)),
                script_pubkey: ScriptBuf::from_bytes((0..rng.gen_range(0..40)).map(|_| rng.gen()).collect()),
            })
            .collect(),
    }
}

/// One lie.
fn lie(rng: &mut StdRng, r: &Reference) -> Message {
    match rng.gen_range(0..16) {
        0 => Message::Headers((0..rng.gen_range(1..=8)).map(|_| header(rng, r)).collect()),
        1 => Message::Inv(inventory(rng, r, 300)),
        2 => Message::GetData(inventory(rng, r, 300)),
        3 => Message::GetHeaders(GetHeadersMessage {
            version: 70016,
            locator_hashes: locator(rng, r),
            stop_hash: if rng.gen_bool(0.5) { BlockHash::all_zeros() } else { block_hash(rng, r) },
        }),
        4 => Message::GetBlocks(GetBlocksMessage {
            version: 70016,
            locator_hashes: locator(rng, r),
            stop_hash: block_hash(rng, r),
        }),
        5 => Message::Tx(tx(rng)),
        6 => {
            // A served block, unsolicited, sometimes altered.
            let mut b = r.block(rng.gen_range(0..=r.height()));
            if rng.gen_bool(0.5) {
                b.header.nonce = rng.gen();
            }
            Message::Block(b)
        }
        7 => Message::Addr(
            (0..rng.gen_range(0..30))
                .map(|_| {
                    let a = SocketAddr::from((rng.gen::<[u8; 4]>(), rng.gen::<u16>()));
                    (rng.gen(), Address::new(&a, ServiceFlags::NETWORK))
                })
                .collect(),
        ),
        8 => Message::Version(version_message(ServiceFlags::NONE, rng.gen(), rng.gen())),
        9 => Message::Ping(rng.gen()),
        10 => Message::MemPool,
        11 => Message::NotFound(inventory(rng, r, 100)),
        12 => Message::FeeFilter(rng.gen()),
        13 => Message::SendHeaders,
        14 => Message::GetAddr,
        _ => Message::Unknown {
            command: "lies".into(),
            payload: (0..rng.gen_range(0..3000)).map(|_| rng.gen()).collect(),
        },
    }
}

/// Starts a lying conversation from peer `i` (its node is honest; its application is not).
pub(super) fn start(w: &World, i: usize, token: u64, mut rng: StdRng) {
    let Some(node) = w.peers[i].node.clone() else { return };
    let (net, shared, start, reference, tasks) =
        (w.net.clone(), w.shared.clone(), w.start, w.chain.clone(), w.syncs.clone());
    let relays = rng.gen_range(1..=3);
    w.record(format_args!("lying requester token={token} from peer {i} over {relays} relays"));
    let task_tasks = tasks.clone();
    let task = tokio::spawn(async move {
        let magic = ChainParams::regtest().magic;
        let req = CircuitRequest { chain: chain::chain_id(), count: 1, relays };
        // Up to three tries for a circuit (a path may cross a hostile peer that refuses it).
        let mut outcome = Ok(String::new());
        for _ in 0..3 {
            outcome = match tokio::time::timeout(BOUND, node.request_circuits(req.clone())).await {
                Err(_) => Err(format!("circuit request not answered within {BOUND:?}")),
                Ok(Err(e)) => Ok(format!("no circuit: {}", short(&e))),
                Ok(Ok(s)) => match s.into_iter().next() {
                    None => Ok("no circuit opened".to_string()),
                    Some(s) => {
                        outcome = converse(s, magic, &mut rng, &reference).await;
                        break;
                    }
                },
            };
            if outcome.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        match outcome {
            Ok(what) => {
                net.record(format_args!("lying requester token={token}: {what}"));
                shared.count("chain lying requesters");
            }
            Err(e) => shared.fail(start, format!("lying requester token={token} from peer {i}: {e}")),
        }
        task_tasks.lock().unwrap().remove(&token);
    });
    chain::register(&tasks, token, i, task);
}

/// A send under way.
type Sending = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PeerError>> + Send>>;

/// Sends the lies and a `ping`, reading answers as they come; the serving peer must answer the `ping` or end the
/// circuit with a reason within [`BOUND`].
async fn converse(mut s: CircuitStream, magic: [u8; 4], rng: &mut StdRng, r: &Reference) -> Result<String, String> {
    let mut out: Vec<Message> = Vec::new();
    if rng.gen_bool(0.9) {
        out.push(Message::Version(version_message(ServiceFlags::NONE, 0, rng.gen())));
    }
    for _ in 0..rng.gen_range(1..=40) {
        out.push(lie(rng, r));
    }
    let nonce = rng.gen();
    out.push(Message::Ping(nonce));
    let deadline = Instant::now() + BOUND;
    let sender = s.sender();
    let mut out = out.into_iter();
    let mut sending: Option<Sending> = None;
    let mut sent = 0usize;
    loop {
        if sending.is_none() {
            if let Some(m) = out.next() {
                let bytes = m.to_envelope(magic).try_encode().map_err(|e| format!("cannot encode a lie: {e}"))?;
                let sender = sender.clone();
                sending = Some(Box::pin(async move { sender.send(bytes).await }));
            }
        }
        tokio::select! {
            r = async { sending.as_mut().unwrap().await }, if sending.is_some() => {
                sending = None;
                sent += 1;
                if let Err(e) = r {
                    if !matches!(e, PeerError::Broken(_)) {
                        return Err(format!("a send failed without a reason: {e}"));
                    }
                    return Ok(format!("circuit broken after {sent} messages: {}", short(&e)));
                }
            }
            got = s.recv() => match got {
                Ok(bytes) => {
                    if let Ok(Message::Pong(n)) = anomos::chain::wire::decode_circuit_message(&bytes, magic) {
                        if n == nonce {
                            s.close().await;
                            return Ok(format!("answered after {sent} messages"));
                        }
                    }
                }
                Err(e @ PeerError::Broken(_)) => return Ok(format!("circuit broken after {sent} messages: {}", short(&e))),
                Err(e) => return Err(format!("the circuit ended without a reason after {sent} messages: {e}")),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("the serving peer neither answered the ping nor ended the circuit within {BOUND:?}"));
            }
        }
    }
}
