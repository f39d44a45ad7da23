//! The chain service and sync over in-memory circuits: a full 500-block sync, parallel download,
//! malicious responders (bad merkle root, bad proof of work, unlinked headers, garbage), and the
//! anonymity of what we say (no addresses in `version`, empty `addr`).
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use anomos::chain::wire::{BtcPeer, USER_AGENT};
use anomos::chain::{
    self, mine_regtest, serve_stream, sync, sync_with, ChainError, ChainService, ChainStore, Invalid, SharedStore,
    SyncOptions, SyncPhase,
};
use anomos::{CircuitStream, Service};
use anomos_proto::btc::{
    encode_message, BtcError, GetHeadersMessage, Inventory, Message, NetParams, ServiceFlags, VersionMessage,
};
use bitcoin::hashes::Hash;
use bitcoin::{Amount, BlockHash, Txid};

const WAIT: Duration = Duration::from_secs(10);

fn regtest() -> NetParams {
    NetParams::regtest()
}

/// A regtest store with `n` mined blocks, and how long mining took.
fn mined(n: u32, txs_per_block: usize) -> (SharedStore, Duration) {
    let mut store = ChainStore::new(regtest()).unwrap();
    let t = Instant::now();
    mine_regtest(&mut store, n, txs_per_block).unwrap();
    (chain::shared(store), t.elapsed())
}

fn empty_store() -> SharedStore {
    chain::shared(ChainStore::new(regtest()).unwrap())
}

fn tip(store: &SharedStore) -> (BlockHash, u32) {
    store.read().unwrap().best_tip()
}

/// Both stores have the same best chain and the same block bytes on it.
fn assert_same_chain(a: &SharedStore, b: &SharedStore) {
    let (a, b) = (a.read().unwrap(), b.read().unwrap());
    assert_eq!(a.best_tip(), b.best_tip());
    for h in 0..=a.best_tip().1 {
        let hash = a.hash_at(h).unwrap();
        assert_eq!(b.hash_at(h), Some(hash));
        assert_eq!(a.block_bytes(&hash).unwrap().unwrap(), b.block_bytes(&hash).unwrap().unwrap());
    }
}

fn assert_anonymous_version(v: &VersionMessage) {
    for addr in [&v.receiver, &v.sender] {
        assert_eq!(addr.address, [0u16; 8], "address revealed: {addr:?}");
        assert_eq!(addr.port, 0);
        assert_eq!(addr.services, ServiceFlags::NONE);
    }
    assert_eq!(v.user_agent, USER_AGENT);
    assert!(!v.relay);
    assert_eq!(v.timestamp % 60, 0, "timestamp is rounded to the minute");
}

#[tokio::test]
async fn sync_500_blocks_over_a_memory_circuit() {
    let params = regtest();
    let (server, mine_time) = mined(500, 0);
    let service = ChainService::new(server.clone());
    let (client_end, server_end) = CircuitStream::memory_pair();
    service.accept(server_end);

    let client = empty_store();
    let mut updates = Vec::new();
    let report = sync(client_end, &params, &client, |p| updates.push(p)).await.unwrap();

    assert_eq!(report.headers, 500);
    assert_eq!(report.blocks, 500);
    assert_eq!((report.tip, report.height), tip(&server));
    assert!(report.peer_errors.is_empty());
    assert_eq!(tip(&client), tip(&server));
    assert_eq!(client.read().unwrap().block_count(), 501);
    assert_same_chain(&server, &client);

    assert_eq!(updates.first().map(|p| (p.phase, p.header_height)), Some((SyncPhase::Headers, 500)));
    let last = updates.last().unwrap();
    assert_eq!((last.phase, last.blocks_done, last.blocks_total), (SyncPhase::Blocks, 500, 500));
    assert!(updates.windows(2).all(|w| w[0].bytes <= w[1].bytes));
    assert!(report.bytes >= last.bytes);

    // A second sync has nothing to do.
    let (client_end, server_end) = CircuitStream::memory_pair();
    service.accept(server_end);
    let again = sync(client_end, &params, &client, |_| {}).await.unwrap();
    assert_eq!((again.headers, again.blocks), (0, 0));

    println!(
        "TIMING mine 500 regtest blocks: {mine_time:?}; sync 500 headers + blocks: {:?} ({} bytes received)",
        report.elapsed, report.bytes
    );
}

#[tokio::test]
async fn parallel_sync_over_three_circuits_with_bigger_blocks() {
    let params = regtest();
    let (server, mine_time) = mined(300, 20);
    let service = ChainService::new(server.clone());
    let mut client_ends = Vec::new();
    for _ in 0..3 {
        let (client_end, server_end) = CircuitStream::memory_pair();
        service.accept(server_end);
        client_ends.push(client_end);
    }
    let client = empty_store();
    let opts = SyncOptions { window: 8, ..SyncOptions::default() };
    let report = sync_with(client_ends, &params, &client, &opts, |_| {}).await.unwrap();
    assert_eq!((report.headers, report.blocks), (300, 300));
    assert!(report.peer_errors.is_empty(), "{:?}", report.peer_errors);
    assert_same_chain(&server, &client);
    let block = client.read().unwrap().block(&report.tip).unwrap().unwrap();
    assert_eq!(block.txdata.len(), 21);
    println!(
        "TIMING mine 300 blocks x 21 txs: {mine_time:?}; parallel sync over 3 circuits: {:?} ({} bytes)",
        report.elapsed, report.bytes
    );
}

/// How a test responder misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evil {
    Honest,
    /// The block at height 5 comes with a changed coinbase (header kept: merkle root mismatch).
    BadMerkle,
    /// The last header of the reply does not meet its target.
    BadPow,
    /// Header #10 of the reply points to an unknown parent.
    NoLink,
    /// Every getdata is first answered with a block nobody asked for.
    Unsolicited,
    /// A getdata is answered with bytes of another network.
    Garbage,
}

/// A hand-written serving peer over `stream` that serves `chain` and misbehaves as told.
/// Returns the `version` the requester sent, once the circuit is closed.
async fn responder(stream: CircuitStream, chain: SharedStore, evil: Evil) -> Option<VersionMessage> {
    let magic = regtest().magic;
    let mut peer = BtcPeer::new(stream, magic);
    let mut theirs = None;
    // The requester may close at any time: then stop and report what it said.
    macro_rules! send {
        ($e:expr) => {
            if $e.await.is_err() {
                break;
            }
        };
    }
    while let Ok(msg) = peer.recv().await {
        match msg {
            Message::Version(v) => {
                theirs = Some(v);
                let height = tip(&chain).1;
                send!(peer.send(&Message::Version(chain::wire::version_message(ServiceFlags::NETWORK, height, false))));
                send!(peer.send(&Message::Verack));
            }
            Message::GetHeaders(req) => {
                let mut headers = chain.read().unwrap().headers_after(&req.locator_hashes, &req.stop_hash, 2000);
                match evil {
                    Evil::BadPow => {
                        if let Some(last) = headers.last_mut() {
                            while last.validate_pow(last.target()).is_ok() {
                                last.nonce += 1;
                            }
                        }
                    }
                    Evil::NoLink if headers.len() > 10 => {
                        headers[10].prev_blockhash = BlockHash::from_byte_array([7; 32])
                    }
                    _ => {}
                }
                send!(peer.send(&Message::Headers(headers)));
            }
            Message::GetData(items) => {
                if evil == Evil::Garbage {
                    send!(peer.send_envelope(&Message::Ping(1).to_envelope(NetParams::mainnet().magic)));
                    continue;
                }
                if evil == Evil::Unsolicited {
                    let mut stranger = chain.read().unwrap().block(&tip(&chain).0).unwrap().unwrap();
                    stranger.header.time += 1;
                    send!(peer.send(&Message::Block(stranger)));
                }
                let mut missing = Vec::new();
                for item in items {
                    let Inventory::WitnessBlock(hash) = item else { continue };
                    let (block, height) = {
                        let c = chain.read().unwrap();
                        (c.block(&hash).unwrap(), c.height_of(&hash))
                    };
                    let Some(mut block) = block else {
                        missing.push(item);
                        continue;
                    };
                    if evil == Evil::BadMerkle && height == Some(5) {
                        block.txdata[0].output[0].value += Amount::from_sat(1);
                    }
                    send!(peer.send(&Message::Block(block)));
                }
                if !missing.is_empty() {
                    send!(peer.send(&Message::NotFound(missing)));
                }
            }
            Message::Ping(n) => peer.send(&Message::Pong(n)).await.ok()?,
            _ => {}
        }
    }
    theirs
}

/// Syncs from a responder; returns the sync's result, the client store and the requester's
/// `version` as the responder saw it (the responder must see the circuit closed).
async fn sync_from(evil: Evil, n: u32) -> (Result<chain::SyncReport, ChainError>, SharedStore, VersionMessage) {
    let (server, _) = mined(n, 1);
    let (client_end, server_end) = CircuitStream::memory_pair();
    let task = tokio::spawn(responder(server_end, server, evil));
    let client = empty_store();
    let opts = SyncOptions { request_timeout: Duration::from_secs(2), ..SyncOptions::default() };
    let result = sync_with(vec![client_end], &regtest(), &client, &opts, |_| {}).await;
    let version =
        tokio::time::timeout(WAIT, task).await.expect("circuit not closed").unwrap().expect("no version received");
    (result, client, version)
}

#[tokio::test]
async fn honest_responder_and_unsolicited_blocks() {
    for evil in [Evil::Honest, Evil::Unsolicited] {
        let (result, client, version) = sync_from(evil, 40).await;
        let report = result.unwrap();
        assert_eq!((report.headers, report.blocks), (40, 40), "{evil:?}");
        assert_eq!(client.read().unwrap().block_count(), 41);
        assert_anonymous_version(&version);
        assert_eq!(version.services, ServiceFlags::NONE);
        assert_eq!(version.start_height, 0);
    }
}

#[tokio::test]
async fn bad_merkle_root_is_detected() {
    let (result, client, version) = sync_from(Evil::BadMerkle, 20).await;
    let err = result.unwrap_err();
    assert!(err.is_peer_fault());
    assert!(
        matches!(&err, ChainError::InvalidBlock { hash, reason } if matches!(**reason, Invalid::Consensus(BtcError::BadMerkleRoot { .. })) && client.read().unwrap().height_of(hash) == Some(5)),
        "{err}"
    );
    let c = client.read().unwrap();
    assert!(!c.has_block(&c.hash_at(5).unwrap()));
    assert_anonymous_version(&version);
}

#[tokio::test]
async fn bad_proof_of_work_is_detected() {
    let (result, client, _) = sync_from(Evil::BadPow, 20).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, ChainError::InvalidHeader { reason, .. } if matches!(**reason, Invalid::Consensus(BtcError::BadPow { .. }))),
        "{err}"
    );
    assert!(err.is_peer_fault());
    // The valid headers before it were kept, no blocks were fetched.
    assert_eq!(tip(&client).1, 19);
    assert_eq!(client.read().unwrap().block_count(), 1);
}

#[tokio::test]
async fn unlinked_header_is_detected() {
    let (result, client, _) = sync_from(Evil::NoLink, 20).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, ChainError::InvalidHeader { reason, .. } if matches!(**reason, Invalid::Consensus(BtcError::BadLinkage { .. }))),
        "{err}"
    );
    assert_eq!(tip(&client).1, 10);
}

#[tokio::test]
async fn garbage_from_the_server_is_detected() {
    let (result, _, _) = sync_from(Evil::Garbage, 20).await;
    let err = result.unwrap_err();
    assert!(matches!(err, ChainError::Malformed(BtcError::BadMagic { .. })), "{err}");
}

#[tokio::test]
async fn a_failing_circuit_hands_its_work_to_the_others() {
    let params = regtest();
    let (server, _) = mined(200, 0);
    let service = ChainService::new(server.clone());
    let (good, server_end) = CircuitStream::memory_pair();
    service.accept(server_end);
    let (bad, bad_end) = CircuitStream::memory_pair();
    let evil = tokio::spawn(responder(bad_end, server.clone(), Evil::BadMerkle));
    let (garbage, garbage_end) = CircuitStream::memory_pair();
    tokio::spawn(responder(garbage_end, server.clone(), Evil::Garbage));

    let client = empty_store();
    let opts = SyncOptions { window: 4, request_timeout: Duration::from_secs(2), ..SyncOptions::default() };
    let report = sync_with(vec![good, bad, garbage], &params, &client, &opts, |_| {}).await.unwrap();
    assert_eq!(report.blocks, 200);
    assert_same_chain(&server, &client);
    // The garbage sender always fails; the merkle liar only if it was the one asked for block 5.
    for (i, e) in &report.peer_errors {
        match i {
            1 => assert!(
                matches!(
                    e,
                    ChainError::InvalidBlock { .. }
                    if matches!(e.invalid(), Some((_, Invalid::Consensus(BtcError::BadMerkleRoot { .. }))))
                ),
                "{e}"
            ),
            2 => assert!(matches!(e, ChainError::Malformed(BtcError::BadMagic { .. })), "{e}"),
            _ => panic!("the honest circuit failed: {e}"),
        }
    }
    assert!(report.peer_errors.iter().any(|(i, _)| *i == 2));
    println!("failed circuits: {:?}", report.peer_errors);
    // Every circuit is closed at the end, the liar's too.
    assert!(tokio::time::timeout(WAIT, evil).await.is_ok());
}

/// Handshake with a `ChainService` by hand; returns its `version`.
async fn handshake_by_hand(peer: &mut BtcPeer) -> VersionMessage {
    peer.send(&Message::Version(chain::wire::version_message(ServiceFlags::NONE, 0, false))).await.unwrap();
    let Message::Version(v) = peer.recv().await.unwrap() else { panic!("expected version") };
    assert_eq!(peer.recv().await.unwrap(), Message::Verack);
    peer.send(&Message::Verack).await.unwrap();
    v
}

#[tokio::test]
async fn server_reveals_no_addresses_and_answers_the_small_requests() {
    let (server, _) = mined(20, 0);
    let (client_end, server_end) = CircuitStream::memory_pair();
    ChainService::new(server.clone()).accept(server_end);
    let mut peer = BtcPeer::new(client_end, regtest().magic);

    let v = handshake_by_hand(&mut peer).await;
    assert_anonymous_version(&v);
    assert_eq!(v.start_height, 20);
    assert_eq!(v.services, ServiceFlags::NETWORK);

    peer.send(&Message::GetAddr).await.unwrap();
    assert_eq!(peer.recv().await.unwrap(), Message::Addr(vec![]));

    // Silently accepted: no answer, so the pong is the next message.
    for quiet in [
        Message::SendHeaders,
        Message::FeeFilter(1000),
        Message::Unknown { command: "sendcmpct".into(), payload: vec![0; 9] },
        Message::Verack,
    ] {
        peer.send(&quiet).await.unwrap();
    }
    peer.send(&Message::Ping(99)).await.unwrap();
    assert_eq!(peer.recv().await.unwrap(), Message::Pong(99));

    peer.send(&Message::MemPool).await.unwrap();
    assert_eq!(peer.recv().await.unwrap(), Message::Inv(vec![]));

    let unknown =
        [Inventory::Block(BlockHash::from_byte_array([1; 32])), Inventory::Transaction(Txid::from_byte_array([2; 32]))];
    let known = tip(&server).0;
    peer.send(&Message::GetData(vec![unknown[0], Inventory::Block(known), unknown[1]])).await.unwrap();
    let Message::Block(b) = peer.recv().await.unwrap() else { panic!("expected block") };
    assert_eq!(b.block_hash(), known);
    assert_eq!(peer.recv().await.unwrap(), Message::NotFound(unknown.to_vec()));

    // getheaders: from genesis; an empty locator asks for the stop header alone.
    let genesis = regtest().genesis_hash;
    let gh = |locator_hashes, stop_hash| {
        Message::GetHeaders(GetHeadersMessage { version: 70016, locator_hashes, stop_hash })
    };
    peer.send(&gh(vec![genesis], BlockHash::all_zeros())).await.unwrap();
    let Message::Headers(h) = peer.recv().await.unwrap() else { panic!("expected headers") };
    assert_eq!(h.len(), 20);
    peer.send(&gh(vec![], known)).await.unwrap();
    let Message::Headers(h) = peer.recv().await.unwrap() else { panic!("expected headers") };
    assert_eq!(h.iter().map(|h| h.block_hash()).collect::<Vec<_>>(), vec![known]);
}

/// Feeds `wire` (after a handshake, if asked) to `serve_stream` and expects it to end with a
/// peer-fault error and the circuit closed, without panicking.
async fn expect_rejected(wire: Vec<u8>, handshake_first: bool) -> ChainError {
    let (server, _) = mined(3, 0);
    let (client_end, server_end) = CircuitStream::memory_pair();
    let task = tokio::spawn(async move { serve_stream(server_end, &regtest(), &server).await });
    let mut peer = BtcPeer::new(client_end, regtest().magic);
    if handshake_first {
        handshake_by_hand(&mut peer).await;
    }
    let raw = peer.into_stream();
    raw.send(wire).await.unwrap();
    let err = tokio::time::timeout(WAIT, task)
        .await
        .expect("server kept the circuit open")
        .expect("server panicked")
        .unwrap_err();
    assert!(err.is_peer_fault(), "{err}");
    let mut raw = raw;
    assert!(tokio::time::timeout(WAIT, raw.recv()).await.unwrap().is_err(), "circuit not closed");
    err
}

#[tokio::test]
async fn garbage_closes_the_circuit() {
    let magic = regtest().magic;
    let ping = encode_message(magic, &Message::Ping(5));

    let err = expect_rejected(encode_message(NetParams::mainnet().magic, &Message::Ping(5)), true).await;
    assert!(matches!(err, ChainError::Malformed(BtcError::BadMagic { .. })), "{err}");

    let mut bad_sum = ping.clone();
    *bad_sum.last_mut().unwrap() ^= 1;
    let err = expect_rejected(bad_sum, true).await;
    assert!(matches!(err, ChainError::Malformed(BtcError::BadChecksum { .. })), "{err}");

    let mut oversize = ping.clone();
    oversize[16..20].copy_from_slice(&4_000_001u32.to_le_bytes());
    let err = expect_rejected(oversize, true).await;
    assert!(matches!(err, ChainError::Malformed(BtcError::PayloadTooLarge(_))), "{err}");

    let err = expect_rejected(ping[..30].to_vec(), true).await;
    assert!(matches!(err, ChainError::Protocol(_)), "{err}");
    let mut two = ping.clone();
    two.extend_from_slice(&ping);
    assert!(matches!(expect_rejected(two, true).await, ChainError::Protocol(_)));
    assert!(matches!(expect_rejected(Vec::new(), true).await, ChainError::Protocol(_)));

    // A payload that does not decode as its command.
    let mut env = Message::Ping(5).to_envelope(magic);
    env.command = "headers".into();
    env.payload = vec![0xfd, 0xff, 0xff];
    let err = expect_rejected(env.encode(), true).await;
    assert!(matches!(err, ChainError::Malformed(BtcError::Decode(_))), "{err}");

    // Anything but version first; a locator that is too long.
    assert!(matches!(expect_rejected(ping.clone(), false).await, ChainError::Protocol(_)));
    let long = Message::GetHeaders(GetHeadersMessage {
        version: 70016,
        locator_hashes: vec![BlockHash::all_zeros(); 102],
        stop_hash: BlockHash::all_zeros(),
    });
    assert!(matches!(expect_rejected(encode_message(magic, &long), true).await, ChainError::Protocol(_)));

    // Random bytes.
    let noise: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    expect_rejected(noise, false).await;
}

#[tokio::test]
async fn sync_refuses_a_store_of_another_network() {
    let (client_end, _server_end) = CircuitStream::memory_pair();
    let err = sync(client_end, &NetParams::testnet4(), &empty_store(), |_| {}).await.unwrap_err();
    assert!(matches!(err, ChainError::Params(_)));
}

#[tokio::test]
async fn a_silent_circuit_does_not_hold_up_the_sync() {
    let (server, _) = mined(50, 0);
    let (good, server_end) = CircuitStream::memory_pair();
    ChainService::new(server.clone()).accept(server_end);
    let (silent, _silent_end) = CircuitStream::memory_pair();
    let client = empty_store();
    let t = Instant::now();
    let report = sync_with(vec![good, silent], &regtest(), &client, &SyncOptions::default(), |_| {}).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "waited for the silent circuit: {:?}", t.elapsed());
    assert_eq!(report.blocks, 50);
    assert!(report.peer_errors.is_empty());
    assert_same_chain(&server, &client);
}

// ---- the sync engine: replacement, wrong answers, following, reorgs, custom networks, restarts ----

/// A source that hands out the given circuits, one request at a time, and counts requests.
fn source_of(streams: Vec<CircuitStream>) -> (chain::CircuitSource, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let pool = std::sync::Arc::new(std::sync::Mutex::new(streams));
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = asked.clone();
    let src: chain::CircuitSource = Box::new(move |n| {
        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut p = pool.lock().unwrap();
        let k = n.min(p.len());
        let got: Vec<CircuitStream> = p.drain(..k).collect();
        Box::pin(async move { got })
    });
    (src, asked)
}

/// Waits for an event line containing `what`.
async fn expect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: String) -> Result<String, ()> {
    let fut = async move {
        loop {
            let e = rx.recv().await.expect("engine ended");
            if e.contains(&what) {
                return e;
            }
        }
    };
    tokio::time::timeout(WAIT, fut).await.map_err(|_| ())
}

/// A serving end that shakes hands and answers headers but never sends a block.
async fn staller(stream: CircuitStream, chain: SharedStore) {
    let mut peer = BtcPeer::new(stream, regtest().magic);
    while let Ok(msg) = peer.recv().await {
        match msg {
            Message::Version(_) => {
                let _ =
                    peer.send(&Message::Version(chain::wire::version_message(ServiceFlags::NETWORK, 0, false))).await;
                let _ = peer.send(&Message::Verack).await;
            }
            Message::GetHeaders(req) => {
                let headers = chain.read().unwrap().headers_after(&req.locator_hashes, &req.stop_hash, 2000);
                let _ = peer.send(&Message::Headers(headers)).await;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_stalled_circuit_loses_its_blocks_and_is_replaced() {
    let (server, _) = mined(120, 2);
    let (stalled, stalled_end) = CircuitStream::memory_pair();
    tokio::spawn(staller(stalled_end, server.clone()));
    let (fresh, fresh_end) = CircuitStream::memory_pair();
    ChainService::new(server.clone()).accept(fresh_end);
    let (source, asked) = source_of(vec![fresh]);
    let client = empty_store();
    let opts = SyncOptions { stall_timeout: Duration::from_secs(1), circuits: 1, ..SyncOptions::default() };
    let t = Instant::now();
    let mut failed = Vec::new();
    let report = chain::run_sync(vec![stalled], &regtest(), &client, &opts, Some(source), |e| {
        if let chain::SyncEvent::CircuitFailed { circuit, misbehaving, .. } = e {
            failed.push((circuit, misbehaving));
        }
    })
    .await
    .unwrap();
    assert_eq!(report.blocks, 120);
    assert_eq!(report.replaced, 1);
    assert_eq!(failed, vec![(0, false)], "the staller is dropped, not reported as misbehaving");
    assert!(matches!(report.peer_errors[0].1, ChainError::Timeout(_)), "{:?}", report.peer_errors);
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_same_chain(&server, &client);
}

#[tokio::test]
async fn wrong_blocks_and_lies_are_misbehaving_and_the_honest_circuit_finishes() {
    let (server, _) = mined(150, 3);
    let mut ends = Vec::new();
    for m in
        [None, Some(chain::Misbehave::WrongBlock), Some(chain::Misbehave::BadMerkle), Some(chain::Misbehave::BadPow)]
    {
        let (c, s) = CircuitStream::memory_pair();
        ChainService::new(server.clone()).with_misbehave(m).accept(s);
        ends.push(c);
    }
    let client = empty_store();
    let opts = SyncOptions { window: 4, ..SyncOptions::default() };
    let report = sync_with(ends, &regtest(), &client, &opts, |_| {}).await.unwrap();
    assert_eq!(report.blocks, 150);
    assert_same_chain(&server, &client);
    let errs: std::collections::HashMap<usize, String> =
        report.peer_errors.iter().map(|(i, e)| (*i, e.to_string())).collect();
    assert!(!errs.contains_key(&0), "{errs:?}");
    assert!(errs[&1].contains("did not ask"), "{errs:?}");
    assert!(errs[&2].contains("merkle"), "{errs:?}");
    assert!(matches!(
        report.peer_errors.iter().find(|(i, _)| *i == 3).map(|(_, e)| e),
        Some(ChainError::InvalidHeader { .. })
    ));
}

#[tokio::test]
async fn following_fetches_announced_blocks_follows_reorgs_and_hears_transactions() {
    let (server, _) = mined(30, 1);
    let service = ChainService::new(server.clone());
    let (client_end, server_end) = CircuitStream::memory_pair();
    service.accept(server_end);
    let client = empty_store();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = SyncOptions { follow: true, ..SyncOptions::default() };
    let c2 = client.clone();
    let task = tokio::spawn(async move {
        chain::run_sync(vec![client_end], &regtest(), &c2, &opts, None, |e| {
            let line = match e {
                chain::SyncEvent::Synced { .. } => "synced".to_string(),
                chain::SyncEvent::NewTip { height, hash } => format!("tip {height} {hash}"),
                chain::SyncEvent::Tx(t) => format!("tx {t}"),
                other => format!("{other:?}"),
            };
            let _ = tx.send(line);
        })
        .await
    });
    expect(&mut rx, "synced".into()).await.unwrap();

    // A new block, announced: fetched and reported as the new tip.
    let b31 = chain::mine_regtest(&mut server.write().unwrap(), 1, 2).unwrap()[0];
    service.announce_block(b31);
    expect(&mut rx, format!("tip 31 {b31}")).await.unwrap();

    // A longer branch from height 29 (reorg): announced by its tip only.
    let fork = server.read().unwrap().hash_at(29).unwrap();
    let mut side = fork;
    for _ in 0..4 {
        side = chain::mine_on(&mut server.write().unwrap(), side, 1).unwrap().block_hash();
    }
    assert_eq!(tip(&server), (side, 33));
    service.announce_block(side);
    expect(&mut rx, format!("tip 33 {side}")).await.unwrap();
    assert_eq!(tip(&client), (side, 33));
    assert!(client.read().unwrap().has_block(&b31), "the old branch's block stays stored");

    // A transaction another requester sends is announced to us (we asked for relay).
    let (sender, sender_end) = CircuitStream::memory_pair();
    service.accept(sender_end);
    let mut peer = BtcPeer::new(sender, regtest().magic);
    handshake_by_hand(&mut peer).await;
    let mut t = server.read().unwrap().block(&side).unwrap().unwrap().txdata[1].clone();
    t.input[0].previous_output.vout = 9;
    peer.send(&Message::Tx(t.clone())).await.unwrap();
    expect(&mut rx, format!("tx {}", t.compute_txid())).await.unwrap();
    assert!(server.read().unwrap().has_pool_tx(&t.compute_txid()));
    // The sender can ask for it back; an invalid one is rejected with a reason.
    peer.send(&Message::GetData(vec![Inventory::WitnessTransaction(t.compute_txid())])).await.unwrap();
    assert_eq!(peer.recv().await.unwrap(), Message::Tx(t.clone()));
    let mut coinbase = t.clone();
    coinbase.input[0].previous_output = bitcoin::OutPoint::null();
    peer.send(&Message::Tx(coinbase)).await.unwrap();
    let Message::Reject(r) = peer.recv().await.unwrap() else { panic!("expected reject") };
    assert_eq!(r.ccode, 0x10);
    peer.send(&Message::MemPool).await.unwrap();
    assert_eq!(peer.recv().await.unwrap(), Message::Inv(vec![Inventory::Transaction(t.compute_txid())]));
    task.abort();
}

#[tokio::test]
async fn a_custom_network_store_learns_its_genesis_from_the_peer() {
    let (regtest_chain, _) = mined(40, 1);
    let custom = NetParams::custom("mynet", [0xf0, 0x0d, 0xba, 0xbe], regtest().genesis_hash, 0);
    let genesis = regtest().genesis_block().unwrap();
    let mut server =
        ChainStore::open_with_genesis(custom.clone(), genesis, Box::new(chain::MemoryBackend::default())).unwrap();
    {
        let r = regtest_chain.read().unwrap();
        for h in 1..=40 {
            server.insert_block(&r.block(&r.hash_at(h).unwrap()).unwrap().unwrap()).unwrap();
        }
    }
    let server = chain::shared(server);
    let (client_end, server_end) = CircuitStream::memory_pair();
    ChainService::new(server.clone()).accept(server_end);
    let client = chain::shared(ChainStore::open(custom.clone(), Box::new(chain::MemoryBackend::default())).unwrap());
    assert!(!client.read().unwrap().is_rooted());
    let report = sync(client_end, &custom, &client, |_| {}).await.unwrap();
    assert_eq!((report.headers, report.blocks, report.height), (41, 41, 40));
    assert_same_chain(&server, &client);
}

#[tokio::test]
async fn a_persistent_store_resumes_without_fetching_stored_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let params = regtest();
    let (server, _) = mined(150, 2);
    // The first run sees a server with only 100 blocks.
    let partial = empty_store();
    {
        let s = server.read().unwrap();
        for h in 1..=100 {
            partial.write().unwrap().insert_block(&s.block(&s.hash_at(h).unwrap()).unwrap().unwrap()).unwrap();
        }
    }
    let client = chain::shared(chain::open_store(dir.path(), &params).unwrap());
    let (c, s) = CircuitStream::memory_pair();
    ChainService::new(partial).accept(s);
    let first = sync(c, &params, &client, |_| {}).await.unwrap();
    assert_eq!((first.blocks, first.requested), (100, 100));
    drop(client);

    let client = chain::shared(chain::open_store(dir.path(), &params).unwrap());
    assert_eq!(client.read().unwrap().block_count(), 101);
    let (c, s) = CircuitStream::memory_pair();
    ChainService::new(server.clone()).accept(s);
    let second = sync(c, &params, &client, |_| {}).await.unwrap();
    assert_eq!((second.headers, second.blocks, second.requested, second.refetched), (50, 50, 50, 0));
    assert_same_chain(&server, &client);
}
