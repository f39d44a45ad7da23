//! Serving peers that play games with a requester's sync (SPEC open issue 26): well-formed messages whose meaning
//! or timing is hostile. Each game used to keep a sync from finishing, or to end it at a stale tip; now each
//! costs the offending circuit and the sync completes from an honest one. Every sync runs under a deadline, so a
//! regression fails rather than hangs.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use anomos::chain::wire::BtcPeer;
use anomos::chain::{self, mine_regtest, sync_with, ChainError, ChainService, ChainStore, SharedStore, SyncOptions};
use anomos::{CircuitStream, Service};
use anomos_proto::btc::{Inventory, Message, NetParams, ServiceFlags};
use bitcoin::hashes::Hash;
use bitcoin::BlockHash;

/// Longest any sync here may take (each finishes in a few seconds when the engine is right).
const DEADLINE: Duration = Duration::from_secs(30);

/// Syncs `client` over `circuits` (no replacements) under [`DEADLINE`].
async fn sync_all(
    circuits: Vec<CircuitStream>,
    client: &SharedStore,
    opts: SyncOptions,
) -> Result<chain::SyncReport, ChainError> {
    let params = regtest();
    let run = sync_with(circuits, &params, client, &opts, |_| {});
    tokio::time::timeout(DEADLINE, run).await.expect("the sync never finished")
}

fn regtest() -> NetParams {
    NetParams::regtest()
}

fn mined(n: u32) -> SharedStore {
    let mut store = ChainStore::new(regtest()).unwrap();
    mine_regtest(&mut store, n, 0).unwrap();
    chain::shared(store)
}

fn empty_store() -> SharedStore {
    chain::shared(ChainStore::new(regtest()).unwrap())
}

fn height(store: &SharedStore) -> u32 {
    store.read().unwrap().best_tip().1
}

/// What a game-playing serving peer does besides shaking hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Game {
    /// Answers `getheaders` honestly, never sends a requested block, and sends a block nobody asked for (one the
    /// requester does not know) every 300 ms.
    JunkBlocks,
    /// Never answers `getheaders`; announces an unknown block (`inv`) every 300 ms.
    InvOnly,
    /// Answers every `getheaders` with the same first 2,000 headers.
    RepeatHeaders,
    /// Answers `getheaders` honestly and every `getdata` with `notfound`.
    NotFoundAll,
    /// Answers every `getheaders` at once with no headers.
    EmptyHeaders,
    /// Answers every `getheaders` with no headers and every `getdata` with `notfound`: a peer with nothing.
    Bare,
    /// Answers every `getheaders` with no headers, ignores `getdata`, answers pings: Bitcoin Core behind a bridge
    /// that lacks the blocks (it sends no `notfound` for blocks).
    Skip,
}

/// A serving peer over `stream` for `chain`, playing `game`.
async fn player(stream: CircuitStream, chain: SharedStore, game: Game) {
    let mut peer = BtcPeer::new(stream, regtest().magic);
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut n = 0u8;
    loop {
        let msg = tokio::select! {
            m = peer.recv() => match m { Ok(m) => m, Err(_) => return },
            _ = tick.tick() => {
                n = n.wrapping_add(1);
                let sent = match game {
                    Game::JunkBlocks => {
                        let mut junk = {
                            let c = chain.read().unwrap();
                            c.block(&c.best_tip().0).unwrap().unwrap()
                        };
                        junk.header.time += u32::from(n);
                        peer.send(&Message::Block(junk)).await
                    }
                    Game::InvOnly => peer.send(&Message::Inv(vec![Inventory::Block(BlockHash::from_byte_array([n; 32]))])).await,
                    _ => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
                continue;
            }
        };
        let sent = match msg {
            Message::Version(_) => {
                let h = chain.read().unwrap().best_tip().1;
                let v = chain::wire::version_message(ServiceFlags::NETWORK, h, false);
                match peer.send(&Message::Version(v)).await {
                    Ok(()) => peer.send(&Message::Verack).await,
                    Err(e) => Err(e),
                }
            }
            Message::GetHeaders(req) => {
                let headers = match game {
                    Game::InvOnly => continue,
                    Game::EmptyHeaders | Game::Bare | Game::Skip => Vec::new(),
                    Game::RepeatHeaders => {
                        let genesis = regtest().genesis_hash;
                        chain.read().unwrap().headers_after(&[genesis], &BlockHash::all_zeros(), 2000)
                    }
                    _ => chain.read().unwrap().headers_after(&req.locator_hashes, &req.stop_hash, 2000),
                };
                peer.send(&Message::Headers(headers)).await
            }
            Message::GetData(items) if matches!(game, Game::NotFoundAll | Game::Bare) => {
                peer.send(&Message::NotFound(items)).await
            }
            Message::Ping(x) => peer.send(&Message::Pong(x)).await,
            _ => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A circuit to `game` played over `chain`.
fn playing(chain: &SharedStore, game: Game) -> CircuitStream {
    let (ours, theirs) = CircuitStream::memory_pair();
    tokio::spawn(player(theirs, chain.clone(), game));
    ours
}

/// A circuit to an honest serving peer of `chain`.
fn honest(chain: &SharedStore) -> CircuitStream {
    let (ours, theirs) = CircuitStream::memory_pair();
    ChainService::new(chain.clone()).accept(theirs);
    ours
}

/// A source that hands out the given circuits once.
fn source_of(streams: Vec<CircuitStream>) -> chain::CircuitSource {
    let pool = std::sync::Arc::new(std::sync::Mutex::new(streams));
    Box::new(move |n| {
        let mut p = pool.lock().unwrap();
        let k = n.min(p.len());
        let got: Vec<CircuitStream> = p.drain(..k).collect();
        Box::pin(async move { got })
    })
}

/// A block nobody asked for used to count as progress: a staller that sent one every 300 ms kept its requested
/// blocks for ever. Now it stalls out and a replacement finishes the sync; as it answers the stall's `ping`, it
/// is withholding the blocks (misbehaving, reported), not stalled by the network.
#[tokio::test]
async fn junk_blocks_do_not_keep_a_staller_alive() {
    let server = mined(60);
    let client = empty_store();
    let opts = SyncOptions { stall_timeout: Duration::from_secs(1), circuits: 1, ..SyncOptions::default() };
    let params = regtest();
    let run = chain::run_sync(
        vec![playing(&server, Game::JunkBlocks)],
        &params,
        &client,
        &opts,
        Some(source_of(vec![honest(&server)])),
        |_| {},
    );
    let report = tokio::time::timeout(DEADLINE, run).await.expect("the sync never finished").unwrap();
    assert_eq!((report.blocks, report.replaced), (60, 1));
    assert!(matches!(report.peer_errors[..], [(0, ChainError::Withheld(_))]), "{:?}", report.peer_errors);
    assert_eq!(report.peer_errors[0].1.break_reason(), anomos_proto::cell::BreakReason::Misbehaving);
}

/// An `inv` of an unknown block made the engine ask for headers again and re-armed the request timeout: a
/// circuit that never answered `getheaders` but announced a block every 300 ms held up the end for ever.
#[tokio::test]
async fn announcements_do_not_rearm_an_unanswered_headers_request() {
    let server = mined(50);
    let client = empty_store();
    let opts = SyncOptions { request_timeout: Duration::from_secs(1), ..SyncOptions::default() };
    let circuits = vec![honest(&server), playing(&server, Game::InvOnly)];
    let report = sync_all(circuits, &client, opts).await.unwrap();
    assert_eq!(report.blocks, 50);
    assert!(matches!(report.peer_errors[..], [(1, ChainError::Timeout("headers"))]), "{:?}", report.peer_errors);
}

/// The same full `headers` answer again and again was followed by another request for ever.
#[tokio::test]
async fn the_same_full_headers_answer_again_is_a_protocol_violation() {
    let server = mined(2_001);
    let client = empty_store();
    let err = sync_all(vec![playing(&server, Game::RepeatHeaders)], &client, SyncOptions::default()).await.unwrap_err();
    assert!(matches!(&err, ChainError::Protocol(m) if m.contains("adds nothing")), "{err}");
    assert!(err.is_peer_fault());
    assert_eq!(height(&client), 2_000, "the first answer was kept");
}

/// `notfound` for every block cost the circuit nothing: alone, it left nothing in flight and no timer running,
/// and the sync hung. Now a circuit that sent the headers of the blocks it then refuses withholds them
/// (misbehaving, reported), and one that claimed nothing is dropped (not blamed) once nobody else can serve what
/// it refused: the sync ends rather than hangs.
#[tokio::test]
async fn notfound_for_everything_ends_the_circuit() {
    let server = mined(20);
    let client = empty_store();
    let circuits = vec![playing(&server, Game::NotFoundAll), playing(&server, Game::Bare)];
    let mut failed = Vec::new();
    let (params, opts) = (regtest(), SyncOptions::default());
    let run = chain::run_sync(circuits, &params, &client, &opts, None, |e| {
        if let chain::SyncEvent::CircuitFailed { circuit, error, misbehaving } = e {
            failed.push((circuit, misbehaving, error));
        }
    });
    let err = tokio::time::timeout(DEADLINE, run).await.expect("the sync never finished").unwrap_err();
    assert!(matches!(err, ChainError::Withheld(_)), "{err}");
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed.iter().any(|(c, m, e)| *c == 0 && *m && e.contains("withheld")), "{failed:?}");
    assert!(failed.iter().any(|(c, m, e)| *c == 1 && !*m && e.contains("does not have")), "{failed:?}");
    // Beside an honest circuit the sync completes.
    let client = empty_store();
    let circuits = vec![playing(&server, Game::NotFoundAll), honest(&server)];
    let report = sync_all(circuits, &client, SyncOptions::default()).await.unwrap();
    assert_eq!(report.blocks, 20);
}

/// One circuit's empty `headers` ended the whole sync: a fast liar that answered before the honest circuits
/// were ready ended it at the genesis block. Now every ready circuit's headers must run out, and a circuit
/// still shaking hands holds up the end for a grace period.
#[tokio::test]
async fn a_fast_empty_headers_answer_does_not_end_the_sync_at_a_stale_tip() {
    let server = mined(50);
    let client = empty_store();
    // The honest end starts answering 300 ms late (what the requester sent waits in the circuit meanwhile).
    let (late, late_end) = CircuitStream::memory_pair();
    let s = server.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ChainService::new(s).accept(late_end);
    });
    let circuits = vec![playing(&server, Game::EmptyHeaders), late];
    let report = sync_all(circuits, &client, SyncOptions::default()).await.unwrap();
    assert_eq!((report.height, report.blocks), (50, 50));
    assert_eq!(height(&client), 50);
}

// ---- a requester's games against a serving peer ----

/// A made-up spend of outpoint `[i; 32]:0` with an output script of `script` bytes.
fn made_up_tx(i: u32, script: usize) -> bitcoin::Transaction {
    let mut txid = [0u8; 32];
    txid[..4].copy_from_slice(&i.to_le_bytes());
    bitcoin::Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::ZERO,
        input: vec![bitcoin::TxIn {
            previous_output: bitcoin::OutPoint { txid: bitcoin::Txid::from_byte_array(txid), vout: 0 },
            ..bitcoin::TxIn::default()
        }],
        output: vec![bitcoin::TxOut {
            value: bitcoin::Amount::from_sat(1_000),
            script_pubkey: bitcoin::ScriptBuf::from_bytes(vec![0x51; script]),
        }],
    }
}

/// A requester that sent made-up transactions as fast as it could filled the pool (no input can be checked
/// without a UTXO set), each with a commit under the store's write lock. Now one circuit gets a burst of
/// `TX_BURST`, then `TXS_PER_MINUTE`, and the rest is refused with `reject` before it is checked or stored.
#[tokio::test]
async fn a_flood_of_transactions_fills_only_its_circuits_allowance() {
    let server = mined(5);
    let (ours, theirs) = CircuitStream::memory_pair();
    ChainService::new(server.clone()).accept(theirs);
    let mut peer = BtcPeer::new(ours, regtest().magic);
    peer.send(&Message::Version(chain::wire::version_message(ServiceFlags::NONE, 0, false))).await.unwrap();
    let Message::Version(_) = peer.recv().await.unwrap() else { panic!("expected version") };
    assert_eq!(peer.recv().await.unwrap(), Message::Verack);
    peer.send(&Message::Verack).await.unwrap();
    let sent = 200u32;
    for i in 0..sent {
        peer.send(&Message::Tx(made_up_tx(i, 100))).await.unwrap();
    }
    peer.send(&Message::Ping(7)).await.unwrap();
    let mut refused = 0;
    loop {
        match tokio::time::timeout(DEADLINE, peer.recv()).await.expect("no pong").unwrap() {
            Message::Pong(7) => break,
            Message::Reject(r) => {
                assert_eq!((r.message.as_str(), r.ccode), ("tx", 0x40), "{r:?}");
                assert!(r.reason.contains("rate"), "{r:?}");
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let pooled = server.read().unwrap().pool_txids().len();
    // The burst, plus what the rate refilled while the test ran (a second or so: one more at most).
    assert!((chain::TX_BURST as usize..=chain::TX_BURST as usize + 1).contains(&pooled), "{pooled} pooled");
    assert_eq!(pooled + refused, sent as usize);
}

/// The service's test-only time games (`anomos peer --misbehave stall|not-found`, what the simulator's lying
/// serving peers play): each costs its circuit and the honest one finishes the sync. The staller answers pings,
/// and the other refuses blocks whose headers it sent: both withhold (misbehaving).
#[tokio::test]
async fn the_services_stall_and_notfound_games_cost_their_circuits() {
    let server = mined(40);
    let mut ends = Vec::new();
    for m in [Some(chain::Misbehave::Stall), Some(chain::Misbehave::NotFound), None] {
        let (c, s) = CircuitStream::memory_pair();
        ChainService::new(server.clone()).with_misbehave(m).accept(s);
        ends.push(c);
    }
    let client = empty_store();
    let opts = SyncOptions { window: 4, stall_timeout: Duration::from_secs(1), ..SyncOptions::default() };
    let report = sync_all(ends, &client, opts).await.unwrap();
    assert_eq!((report.height, report.blocks), (40, 40));
    let failed: Vec<usize> = report.peer_errors.iter().map(|(i, _)| *i).collect();
    assert!(!failed.contains(&2), "the honest circuit failed: {:?}", report.peer_errors);
    for (i, e) in &report.peer_errors {
        match i {
            0 => assert!(matches!(e, ChainError::Withheld(_)), "{e}"),
            1 => assert!(matches!(e, ChainError::Withheld(_)), "{e}"),
            _ => {}
        }
    }
}

/// A target that answers pings but skips blocks it never claimed (Bitcoin Core behind a bridge that lacks them:
/// no `notfound`) is not withholding: it stalls out as a timeout, not blamed. (Withholding needs the headers.)
#[tokio::test]
async fn a_stall_on_blocks_the_target_never_claimed_is_a_timeout() {
    let server = mined(30);
    let client = empty_store();
    let opts = SyncOptions { window: 4, stall_timeout: Duration::from_secs(1), ..SyncOptions::default() };
    let circuits = vec![honest(&server), playing(&server, Game::Skip)];
    let report = sync_all(circuits, &client, opts).await.unwrap();
    assert_eq!(report.blocks, 30);
    for (i, e) in &report.peer_errors {
        assert_eq!(*i, 1, "{e}");
        assert!(matches!(e, ChainError::Timeout(_)), "{e}");
    }
}

/// An honest serving peer far behind us answers our locator from its first entry it knows, which past the first
/// eleven are sparse: a full answer of headers we have, ending below where we asked from. That is asked again
/// from its last header, not called the same answer again (a review of session 11's first version).
#[tokio::test]
async fn an_honest_peer_far_behind_us_is_not_a_repeat() {
    let ours = mined(10_000);
    // The peer has our first 7,900 blocks.
    let theirs = {
        let mut s = ChainStore::new(regtest()).unwrap();
        let o = ours.read().unwrap();
        for h in 1..=7_900 {
            let block = o.block(&o.hash_at(h).unwrap()).unwrap().unwrap();
            s.insert_block(&block).unwrap();
        }
        chain::shared(s)
    };
    let report = sync_all(vec![honest(&theirs)], &ours, SyncOptions::default()).await.unwrap();
    assert!(report.peer_errors.is_empty(), "{:?}", report.peer_errors);
    assert_eq!((report.headers, report.blocks, report.height), (0, 0, 10_000));
}
