//! The overlay runtime in one process (real sockets on 127.0.0.1, real tracker): circuits open over
//! multi-hop paths, carry ordered messages both ways, hold back a sender when the reader stops, and
//! refuse a replayed tracking code.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Duration;

mod inproc;

use anomos::{CircuitStream, Service};
use anomos_proto::identity::Identity;
use anomos_proto::ids::ChainId;
use anomos_proto::tracker::CircuitRequest;

/// Echoes every message back.
struct Echo;
impl Service for Echo {
    fn accept(&self, mut stream: CircuitStream) {
        tokio::spawn(async move {
            while let Ok(m) = stream.recv().await {
                if m == b"stop-reading" {
                    // Stay open but never read again.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                if stream.send(m).await.is_err() {
                    break;
                }
            }
        });
    }
}

type Overlay = inproc::InProc;

async fn overlay(peers: usize, servers: usize, window: u32) -> Overlay {
    overlay_with(peers, servers, |_| window).await
}

/// An overlay of `peers` relays and `servers` echo targets, whose node `i` uses receive window `window(i)`.
async fn overlay_with(peers: usize, servers: usize, window: impl Fn(usize) -> u32) -> Overlay {
    let specs = (0..peers + servers)
        .map(|i| inproc::NodeSpec {
            window: window(i),
            serve: (i >= peers).then(|| ("echo", Arc::new(Echo) as Arc<dyn Service>)),
        })
        .collect();
    inproc::overlay(specs).await
}

async fn open(o: &Overlay, requester: usize, relays: u8) -> CircuitStream {
    open_on(o, requester, relays, "echo").await
}

async fn open_on(o: &Overlay, requester: usize, relays: u8, chain: &str) -> CircuitStream {
    for _ in 0..50 {
        let req = CircuitRequest { chain: ChainId::new(chain).unwrap(), count: 1, relays };
        if let Ok(mut v) = o.nodes[requester].request_circuits(req).await {
            if let Some(s) = v.pop() {
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no circuit opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_over_three_hops_in_order_both_ways() {
    let o = overlay(6, 1, 128).await;
    let mut s = open(&o, 0, 2).await;
    assert_eq!(s.hops, 3);
    // Small, record-sized and multi-record messages; order must hold.
    let sizes = [0usize, 1, 4093, 4094, 10_000, 300_000, 5];
    for (i, &n) in sizes.iter().enumerate() {
        let msg: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
        s.send(msg.clone()).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), msg, "message {i} ({n} bytes)");
    }
    // Pipelined: many messages in flight (more than a window of cells).
    let sender = s.sender();
    let writer = tokio::spawn(async move {
        for i in 0..300u32 {
            sender.send(i.to_be_bytes().repeat(1000)).await.unwrap();
        }
    });
    for i in 0..300u32 {
        assert_eq!(s.recv().await.unwrap(), i.to_be_bytes().repeat(1000));
    }
    writer.await.unwrap();
    let relayed: u64 = o.nodes.iter().map(|n| n.stats.cells_relayed.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(relayed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_different_windows_carry_bulk_data() {
    // Each side starts a circuit with the credit its neighbor announced; a mismatch would break bulk
    // circuits with a credit violation.
    let windows = [128u32, 16, 64, 300, 8, 32, 128];
    let o = overlay_with(6, 1, |i| windows[i]).await;
    let mut s = open(&o, 0, 3).await;
    let sender = s.sender();
    let w = tokio::spawn(async move {
        for i in 0..40u32 {
            sender.send(vec![i as u8; 60_000]).await.unwrap();
        }
    });
    for i in 0..40u32 {
        assert_eq!(s.recv().await.unwrap(), vec![i as u8; 60_000]);
    }
    w.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_makes_the_sender_wait() {
    let o = overlay(5, 1, 16).await;
    let s = open(&o, 0, 2).await;
    s.send(b"stop-reading".to_vec()).await.unwrap();
    // The far end reads no more: after window-many cells per hop are buffered, our sends must block.
    let sender = s.sender();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent2 = sent.clone();
    let t = tokio::spawn(async move {
        for _ in 0..10_000 {
            if sender.send(vec![7u8; 4093]).await.is_err() {
                break;
            }
            sent2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = sent.load(std::sync::atomic::Ordering::Relaxed);
    // window 16 at each of 3 relays + target buffer (4 MiB of undelivered messages ≈ 1000 cells) + our queue.
    assert!(n < 1_300, "sender was not held back: {n} cells accepted");
    assert!(n > 16, "nothing flowed: {n}");
    // What the relays hold: at most one window per circuit and direction at each hop (the bound SPEC §8
    // promises), however much the sender wants to send.
    let relays_queued: usize = o.nodes[1..].iter().map(|n| n.queued_cells()).sum();
    assert!(relays_queued <= 4 * 16, "relays buffer {relays_queued} cells, more than a window per hop");
    let requester_queued = o.nodes[0].queued_cells();
    assert!(requester_queued <= 16, "requester queued {requester_queued} cells beyond its window");
    eprintln!("stalled reader: sender accepted {n} cells; relays hold {relays_queued}, requester {requester_queued}");
    t.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_wrong_link_and_non_neighbor_opens_are_refused() {
    use anomos::PeerError;
    use anomos_proto::cell::DenyReason;
    let o = overlay(6, 1, 128).await;
    let a = &o.nodes[0];
    let mut grant = None;
    for _ in 0..50 {
        let req = CircuitRequest { chain: ChainId::new("echo").unwrap(), count: 1, relays: 2 };
        if let Ok(mut g) = a.request_grants(req).await {
            if let Some(g) = g.pop() {
                grant = Some(g);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grant = grant.expect("grant");
    let first = a.open_circuit(&grant).await.expect("first use of the TC opens");
    // The same TC again: the first relay has seen its replay tag.
    match a.open_circuit(&grant).await {
        Err(PeerError::Denied(DenyReason::Replayed)) => {}
        other => panic!("replay not refused: {:?}", other.map(|_| ())),
    }
    drop(first);

    // Who is the first relay? (Only the test can tell: it holds every identity.)
    let tc = grant.tc_array().unwrap();
    let r1 = o.nodes.iter().find(|n| anomos_proto::tc::peel(&tc, &n.identity).is_ok()).expect("first relay");
    // Another neighbor of the first relay presents A's TC over its own edge (the next hop always qualifies).
    let mut g2 = a
        .request_grants(CircuitRequest { chain: ChainId::new("echo").unwrap(), count: 1, relays: 2 })
        .await
        .unwrap()
        .pop()
        .unwrap();
    let tc2 = g2.tc_array().unwrap();
    let r1b = o.nodes.iter().find(|n| anomos_proto::tc::peel(&tc2, &n.identity).is_ok()).unwrap();
    let b = o
        .nodes
        .iter()
        .find(|n| {
            n.fingerprint() != a.fingerprint()
                && n.fingerprint() != r1b.fingerprint()
                && n.neighbor_by_fp(&r1b.fingerprint()).is_some()
        })
        .expect("the first relay has a neighbor besides the requester");
    let (_, nid) = b.neighbor_by_fp(&r1b.fingerprint()).unwrap();
    g2.first_hop = nid;
    match b.open_circuit(&g2).await {
        Err(PeerError::Denied(DenyReason::WrongLink)) => {}
        other => panic!("wrong-link TC not refused: {:?}", other.map(|_| ())),
    }

    // A peer that is not r1's neighbor (a key the tracker never placed next to it) cannot complete a link
    // handshake with it.
    {
        use anomos_proto::link::{auth_frame_len, Dialer, HELLO_LEN};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stranger = Identity::generate(&mut rand::rngs::OsRng, 2048).unwrap();
        let mut s = tokio::net::TcpStream::connect(r1.listen_addr).await.unwrap();
        let (d, hello) =
            Dialer::start(&mut rand::rngs::OsRng, r1.identity.public().clone(), anomos_proto::ids::NeighborId(1));
        s.write_all(&hello).await.unwrap();
        let mut reply = [0u8; HELLO_LEN];
        s.read_exact(&mut reply).await.unwrap();
        let (d, auth) = d.on_reply(&reply, &stranger, &mut rand::rngs::OsRng).unwrap();
        s.write_all(&auth).await.unwrap();
        let mut p = [0u8; 2];
        s.read_exact(&mut p).await.unwrap();
        let mut msg = vec![0u8; 2 + auth_frame_len(p).unwrap()];
        msg[..2].copy_from_slice(&p);
        s.read_exact(&mut msg[2..]).await.unwrap();
        let err = d.on_auth_reply(&msg).err().expect("stranger refused");
        assert!(err.to_string().contains("Refused"), "{err}");
        // And the connection is closed: an OPEN-sized write gets no answer.
        let _ = s.write_all(&[0u8; anomos_proto::cell::SEALED_CELL_LEN]).await;
        let mut buf = [0u8; 1];
        assert!(matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_))));
    }
    // The overlay still works for everyone else.
    let mut s = open(&o, 1, 2).await;
    s.send(b"still here".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn echo_round_trip_latency() {
    let o = overlay(6, 1, 128).await;
    for relays in 1..=3u8 {
        let mut s = open(&o, 0, relays).await;
        let t = std::time::Instant::now();
        for i in 0..200u32 {
            s.send(i.to_be_bytes().to_vec()).await.unwrap();
            s.recv().await.unwrap();
        }
        eprintln!("RTT over {} hops: {:.3} ms", relays + 1, t.elapsed().as_secs_f64() * 1000.0 / 200.0);
    }
}

/// A target serving a chain breaks the circuit of a requester that breaks the Bitcoin protocol with
/// `misbehaving`, not with the `finished` of a clean close (SPEC open issue 13), so the requester can tell a
/// refusal from the end of a conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_target_breaks_a_misbehaving_requester_with_misbehaving() {
    use anomos::chain::{shared, ChainService, ChainStore};
    use anomos_proto::btc::{encode_message, Message, NetParams};
    use anomos_proto::cell::BreakReason;

    let store = shared(ChainStore::new(NetParams::regtest()).unwrap());
    let specs = (0..4)
        .map(|i| inproc::NodeSpec {
            window: 128,
            serve: (i == 3).then(|| ("regtest", Arc::new(ChainService::new(store.clone())) as Arc<dyn Service>)),
        })
        .collect();
    let o = inproc::overlay(specs).await;
    let magic = NetParams::regtest().magic;

    // A well-behaved conversation first: version is answered.
    let mut good = open_on(&o, 0, 1, "regtest").await;
    let version = anomos::chain::wire::version_message(anomos_proto::btc::ServiceFlags::NONE, 0, false);
    good.send(encode_message(magic, &Message::Version(version))).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), good.recv()).await.expect("no answer");
    assert!(answer.is_ok(), "version was not answered: {answer:?}");

    // A ping before version: the target breaks the circuit as misbehaving.
    let mut bad = open_on(&o, 0, 1, "regtest").await;
    bad.send(encode_message(magic, &Message::Ping(1))).await.unwrap();
    let r =
        tokio::time::timeout(Duration::from_secs(20), bad.recv()).await.expect("circuit neither answered nor broken");
    assert!(matches!(r, Err(anomos::PeerError::Broken(BreakReason::Misbehaving))), "{r:?}");
}
