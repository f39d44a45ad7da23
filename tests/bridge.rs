//! Bridges (src/bridge): unmodified Bitcoin P2P software on both ends of a circuit, in one process over real
//! sockets on 127.0.0.1 (tracker, relays, requester and serving peers as in tests/runtime.rs).
//!
//! * A raw P2P client on the bridge port of requester A syncs headers and blocks from serving peer B's
//!   `ChainService`, one new circuit per connection; TCP close tears the circuit down to B; a circuit that
//!   B breaks closes the TCP connection.
//! * Garbage (bad magic, bad checksum, oversized length) closes only the connection that sent it.
//! * Both bridges: B serves with `UpstreamService` pointing at a TCP "Bitcoin node" U; a downstream node D
//!   (our chain code behind a TCP adapter, like U) syncs U's chain through the overlay. Both adapters put
//!   real addresses into `version` (as an unmodified node may); neither end ever sees the other's.
//! * python-bitcoinlib (a client we did not write) through the bridge, if installed.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod btcnode;
mod inproc;

use btcnode::*;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos::bridge::{BridgeOptions, BridgeStats, ClientBridge, UpstreamService};
use anomos::chain::wire::USER_AGENT;
use anomos::chain::{self, mine_regtest, ChainService, ChainStore, SharedStore};
use anomos::{CircuitStream, Node, Service};
use anomos_proto::btc::{
    check_block, check_header_pow, check_linkage, encode_message, Address, Envelope, EnvelopeReader, GetHeadersMessage,
    Inventory, Message, NetParams, ServiceFlags, VersionMessage,
};
use bitcoin::block::Header;
use bitcoin::hashes::Hash;
use bitcoin::BlockHash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Longest wait for any single step.
const WAIT: Duration = Duration::from_secs(30);

fn regtest() -> NetParams {
    NetParams::regtest()
}

// ---- the overlay ----

struct Overlay {
    /// The requester (runs the client bridge).
    a: Arc<Node>,
    /// The serving peer.
    b: Arc<Node>,
    o: inproc::InProc,
}

/// A tracker, `peers` peers without a service (the first is the requester A) and one peer B serving regtest
/// with `service`, all on 127.0.0.1.
async fn overlay(peers: usize, service: Arc<dyn Service>) -> Overlay {
    let mut specs: Vec<inproc::NodeSpec> = (0..peers).map(|_| inproc::relay()).collect();
    specs.push(inproc::NodeSpec { window: 128, serve: Some(("regtest", service)) });
    let o = inproc::overlay(specs).await;
    Overlay { a: o.nodes[0].clone(), b: o.nodes[peers].clone(), o }
}

/// A client bridge on requester A, on 127.0.0.1 with an ephemeral port, 2 relays per circuit.
async fn start_bridge(o: &Overlay, opts: BridgeOptions) -> (SocketAddr, Arc<BridgeStats>) {
    let bridge = ClientBridge::bind(o.a.clone(), "127.0.0.1:0".parse().unwrap(), regtest(), 2, opts).await.unwrap();
    let (addr, stats) = (bridge.local_addr(), bridge.stats());
    tokio::spawn(bridge.run());
    (addr, stats)
}

fn mined(n: u32, txs: usize) -> SharedStore {
    let mut store = ChainStore::new(regtest()).unwrap();
    mine_regtest(&mut store, n, txs).unwrap();
    chain::shared(store)
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    BridgeStats::get(c)
}

async fn eventually(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_p2p_client_syncs_from_a_chain_service_over_new_circuits() {
    let t0 = Instant::now();
    let store = mined(50, 0);
    let o = overlay(5, Arc::new(ChainService::new(store.clone()))).await;
    let (baddr, stats) = start_bridge(&o, BridgeOptions::default()).await;
    let t = Instant::now();

    // One client: handshake, headers, blocks, ping.
    let mut c = RawPeer::connect(baddr).await;
    let v = c.handshake(revealing_version(baddr, "203.0.113.9:18444".parse().unwrap(), 0)).await;
    assert_eq!(v.user_agent, USER_AGENT);
    assert_eq!(v.start_height, 50);
    let n = headers_and_blocks(&mut c, &store).await;
    c.send(&Message::Ping(0xfeed)).await;
    assert_eq!(c.expect("pong").await, Message::Pong(0xfeed));
    eprintln!("raw client: handshake + {n} headers + 2 blocks + ping in {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(count(&stats.versions_scrubbed), 1, "the client's version was scrubbed");

    // A second client at the same time gets a circuit of its own.
    let mut c2 = RawPeer::connect(baddr).await;
    c2.handshake(revealing_version(baddr, "[::]:0".parse().unwrap(), 0)).await;
    assert_eq!(count(&stats.joined), 2);
    assert_eq!(count(&stats.active), 2);
    assert_eq!(o.b.stats.target_opened.load(std::sync::atomic::Ordering::Relaxed), 2, "one circuit per connection");
    assert_eq!(o.b.circuit_count(), 2);
    assert_eq!(headers_and_blocks(&mut c2, &store).await, 50);

    // TCP close tears the circuit down, all the way to B.
    drop(c);
    eventually("first circuit closed at B", WAIT, || o.b.circuit_count() == 1).await;
    c2.send(&Message::Ping(7)).await;
    assert_eq!(c2.expect("pong").await, Message::Pong(7), "the other connection is unaffected");
    drop(c2);
    eventually("both circuits closed at B", WAIT, || o.b.circuit_count() == 0).await;
    eventually("bridge connections finished", WAIT, || count(&stats.active) == 0).await;

    // A circuit that B breaks (a conversation not starting with `version`) closes the TCP connection.
    let mut c3 = RawPeer::connect(baddr).await;
    c3.send(&Message::Ping(1)).await;
    assert!(c3.closed_within(WAIT).await, "the bridge did not close the connection when the circuit broke");
    eprintln!("stats: {stats:?}");
    eprintln!("test took {:.2}s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_the_connection_that_sent_it() {
    let t0 = Instant::now();
    let store = mined(20, 0);
    let o = overlay(5, Arc::new(ChainService::new(store.clone()))).await;
    let (baddr, stats) = start_bridge(&o, BridgeOptions::default()).await;
    let me: SocketAddr = "[::]:0".parse().unwrap();

    let mut good = RawPeer::connect(baddr).await;
    good.handshake(revealing_version(baddr, me, 0)).await;
    let magic = regtest().magic;

    // 1. Not Bitcoin at all (bad magic), before any envelope: closed, and no circuit is spent on it.
    let mut g = RawPeer::connect(baddr).await;
    g.tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(g.closed_within(WAIT).await, "bad magic: connection not closed");
    assert_eq!(count(&stats.joined), 1, "a circuit was opened for garbage");

    // 2. Bad checksum in the middle of a conversation.
    let mut g = RawPeer::connect(baddr).await;
    g.handshake(revealing_version(baddr, me, 0)).await;
    let mut ping = encode_message(magic, &Message::Ping(5));
    ping[20] ^= 0xff;
    g.tcp.write_all(&ping).await.unwrap();
    assert!(g.closed_within(WAIT).await, "bad checksum: connection not closed");
    assert_eq!(count(&stats.bad_tcp_data), 1);

    // 3. An oversized length field: closed on the header alone, nothing allocated or awaited.
    let mut g = RawPeer::connect(baddr).await;
    g.handshake(revealing_version(baddr, me, 0)).await;
    let mut header = Vec::new();
    header.extend_from_slice(&magic);
    header.extend_from_slice(b"block\0\0\0\0\0\0\0");
    header.extend_from_slice(&4_000_001u32.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    g.tcp.write_all(&header).await.unwrap();
    assert!(g.closed_within(WAIT).await, "oversized length: connection not closed");
    assert_eq!(count(&stats.bad_tcp_data), 2);

    // 4. Another network's magic mid-conversation.
    let mut g = RawPeer::connect(baddr).await;
    g.handshake(revealing_version(baddr, me, 0)).await;
    g.tcp.write_all(&encode_message(NetParams::mainnet().magic, &Message::Ping(9))).await.unwrap();
    assert!(g.closed_within(WAIT).await, "wrong magic: connection not closed");
    assert_eq!(count(&stats.bad_tcp_data), 3);

    // 5. A header cut off by close: just a closed connection.
    let mut g = RawPeer::connect(baddr).await;
    g.handshake(revealing_version(baddr, me, 0)).await;
    g.tcp.write_all(&encode_message(magic, &Message::Ping(9))[..10]).await.unwrap();
    g.tcp.shutdown().await.unwrap();
    assert!(g.closed_within(WAIT).await);

    // The bridge still serves: the first connection goes on, and a new one works.
    good.send(&Message::Ping(42)).await;
    assert_eq!(good.expect("pong").await, Message::Pong(42));
    assert_eq!(headers_and_blocks(&mut good, &store).await, 20);
    let mut late = RawPeer::connect(baddr).await;
    late.handshake(revealing_version(baddr, me, 0)).await;
    assert_eq!(headers_and_blocks(&mut late, &store).await, 20);
    // The garbage connections' circuits are gone; the two good ones remain.
    eventually("garbage circuits closed at B", WAIT, || o.b.circuit_count() == 2).await;
    assert_eq!(count(&stats.refused), 1);
    eprintln!("stats: {stats:?}");
    eprintln!("test took {:.2}s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_unmodified_nodes_sync_through_both_bridges_without_learning_each_others_address() {
    let t0 = Instant::now();
    // U: the upstream node, on 127.0.0.9, with a chain of 200 blocks (3 extra transactions each).
    const U_IP: [u8; 4] = [127, 0, 0, 9];
    const D_IP: [u8; 4] = [127, 0, 0, 5];
    let u_store = mined(200, 3);
    let u = upstream_node("127.0.0.9", u_store.clone()).await;
    let upstream = Arc::new(UpstreamService::new(u.addr.to_string(), regtest()));
    let up_stats = upstream.stats();
    let o = overlay(5, upstream).await;
    let (baddr, stats) = start_bridge(&o, BridgeOptions::default()).await;

    // D: the downstream node, an empty store that syncs over a TCP connection from 127.0.0.5 to the bridge,
    // telling it its own address (127.0.0.5:18444).
    let t = Instant::now();
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(baddr).await.unwrap();
    let (mine, theirs) = CircuitStream::memory_pair();
    let d_log: Arc<Mutex<Transcript>> = Arc::default();
    let d_adapter = tcp_adapter(tcp, mine, Some((baddr, "127.0.0.5:18444".parse().unwrap())), d_log.clone());
    let d_store = chain::shared(ChainStore::new(regtest()).unwrap());
    let report = chain::sync(theirs, &regtest(), &d_store, |_| {}).await.unwrap();
    let took = t.elapsed();
    assert_eq!((report.headers, report.blocks, report.height), (200, 200, 200));
    {
        let (a, b) = (u_store.read().unwrap(), d_store.read().unwrap());
        assert_eq!(a.best_tip(), b.best_tip());
        for h in 1..=200 {
            let hash = a.hash_at(h).unwrap();
            assert_eq!(a.block_bytes(&hash).unwrap(), b.block_bytes(&hash).unwrap(), "block {h}");
        }
    }
    eprintln!("D synced 200 blocks ({} bytes) from U through both bridges in {:.2}s", report.bytes, took.as_secs_f64());

    // D is done: its connection closes, and so do the circuit and B's connection to U.
    tokio::time::timeout(WAIT, d_adapter).await.unwrap().unwrap();
    let (remote, u_log, u_adapter) = {
        let mut conns = u.conns.lock().unwrap();
        assert_eq!(conns.len(), 1, "one connection to U");
        conns.pop().unwrap()
    };
    tokio::time::timeout(WAIT, u_adapter).await.expect("B did not close its connection to U").unwrap();

    // U saw one connection, from the serving peer's side of loopback; never D's address.
    assert_eq!(remote.ip().to_string(), "127.0.0.1", "U was connected from {remote}");
    {
        let (d, u_t) = (d_log.lock().unwrap(), u_log.lock().unwrap());
        assert!(mentions(&d.outbound, D_IP), "D did tell its address");
        assert!(!mentions(&u_t.inbound, D_IP), "D's address reached U");
        assert!(mentions(&u_t.outbound, U_IP), "U did tell its address");
        assert!(!mentions(&d.inbound, U_IP), "U's address reached D");
        // Everything else arrived byte for byte, both ways.
        assert_relayed(&d.outbound, &u_t.inbound, "D to U");
        assert_relayed(&u_t.outbound, &d.inbound, "U to D");
        let blocks = d.inbound.iter().filter(|m| m[4..9] == *b"block").count();
        assert_eq!(blocks, 200);
        assert_eq!(count(&stats.versions_scrubbed), 1);
        assert_eq!(count(&up_stats.versions_scrubbed), 1);
    }

    // Unknown commands pass unchanged too; and when U ends the conversation (a `ping` before `version`),
    // both bridges close: U's connection, the circuit, the client's connection.
    let mut c = RawPeer::connect(baddr).await;
    let odd = Message::Unknown { command: "anomos-x".into(), payload: (0..=255u8).collect() };
    c.send(&odd).await;
    c.send(&Message::Ping(3)).await;
    assert!(c.closed_within(WAIT).await, "client connection not closed after U hung up");
    let log = u.conns.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(log.lock().unwrap().inbound[0], encode_message(regtest().magic, &odd));

    // With the scrub off (a second bridge on A), `version` too arrives byte for byte, addresses and all.
    let raw_opts = BridgeOptions { scrub_version: false, ..BridgeOptions::default() };
    let (raw_addr, raw_stats) = start_bridge(&o, raw_opts).await;
    let mut c = RawPeer::connect(raw_addr).await;
    let v = revealing_version(raw_addr, "127.0.0.5:18444".parse().unwrap(), 0);
    let sent = encode_message(regtest().magic, &Message::Version(v.clone()));
    c.handshake(v).await;
    let log = u.conns.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(log.lock().unwrap().inbound[0], sent, "version changed with the scrub off");
    assert_eq!(count(&raw_stats.versions_scrubbed), 0);
    eprintln!("bridge: {stats:?}\nupstream: {up_stats:?}");
    eprintln!("test took {:.2}s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_bitcoinlib_client_through_the_bridge() {
    let probe = std::process::Command::new("python3").args(["-c", "import bitcoin.messages"]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!(
                "skipped: python-bitcoinlib not installed (pip install python-bitcoinlib==0.12.2), or no python3"
            );
            return;
        }
    }
    let t0 = Instant::now();
    let store = mined(30, 2);
    let o = overlay(5, Arc::new(ChainService::new(store.clone()))).await;
    let (baddr, stats) = start_bridge(&o, BridgeOptions::default()).await;
    let (tip, height) = store.read().unwrap().best_tip();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bridge_client.py");
    let t = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .args([script, "--port", &baddr.port().to_string(), "--height", &height.to_string()])
            .args(["--tip", &tip.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python client timed out")
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("python client ({:.2}s): {stdout}{stderr}", t.elapsed().as_secs_f64());
    assert!(out.status.success(), "python client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("bridge_client ok"), "{stdout}");
    assert_eq!(count(&stats.joined), 1);
    eprintln!("test took {:.2}s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_the_serving_peer_back() {
    let t0 = Instant::now();
    // One big block (about 0.44 MB), asked for 128 times: about 56 MB the client will not read for a while.
    let store = mined(1, 3000);
    let (tip, _) = store.read().unwrap().best_tip();
    let block_len = store.read().unwrap().block_bytes(&tip).unwrap().unwrap().len();
    let o = overlay(5, Arc::new(ChainService::new(store.clone()))).await;
    let (baddr, stats) = start_bridge(&o, BridgeOptions::default()).await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let mut c = RawPeer {
        tcp: sock.connect(baddr).await.unwrap(),
        reader: EnvelopeReader::new(regtest().magic),
        magic: regtest().magic,
    };
    c.handshake(revealing_version(baddr, "[::]:0".parse().unwrap(), 0)).await;
    const N: usize = 128;
    let asked = N * block_len;
    c.send(&Message::GetData(vec![Inventory::WitnessBlock(tip); N])).await;

    // The client reads nothing: flow stops everywhere once the buffers on the way are full.
    let relayed = || o.o.nodes.iter().map(|n| n.stats.bytes_relayed.load(std::sync::atomic::Ordering::Relaxed)).max();
    let mut last = (relayed(), count(&stats.bytes_to_tcp));
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = (relayed(), count(&stats.bytes_to_tcp));
        if now == last {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "flow never stopped");
        last = now;
    }
    let (relayed_max, to_tcp) = (last.0.unwrap_or(0) as usize, last.1 as usize);
    eprintln!(
        "stalled: {asked} bytes asked, bridge wrote {to_tcp} to TCP, busiest relay carried {relayed_max} (cell payloads)"
    );
    // Held back: the bridge wrote at most what the sockets hold, and the relays carried far less than asked
    // (the bridge's circuit receive buffer, 4 MiB, plus a window per hop and the sockets).
    assert!(to_tcp < asked / 4, "the bridge kept writing: {to_tcp} of {asked}");
    assert!(relayed_max < asked / 2, "the serving peer was not held back: {relayed_max} of {asked}");

    // Reading again: everything arrives, intact.
    for i in 0..N {
        let Message::Block(b) = c.expect("block").await else { unreachable!() };
        assert_eq!(b.block_hash(), tip, "block {i}");
    }
    assert!(count(&stats.bytes_to_tcp) as usize >= asked);
    eprintln!("test took {:.2}s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_holds_the_client_back() {
    let t0 = Instant::now();
    // U accepts connections and never reads from them.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let u_addr = listener.local_addr().unwrap();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let h = held.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            h.lock().unwrap().push(tcp);
        }
    });
    let upstream = Arc::new(UpstreamService::new(u_addr.to_string(), regtest()));
    let up_stats = upstream.stats();
    let o = overlay(5, upstream).await;
    let (baddr, stats) = start_bridge(&o, BridgeOptions::default()).await;

    // The client writes 64 envelopes of 1 MB as fast as the bridge takes them.
    const N: usize = 64;
    let junk = encode_message(regtest().magic, &Message::Unknown { command: "junk".into(), payload: vec![7; 1 << 20] });
    let asked = N * junk.len();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = written.clone();
    let mut c = RawPeer::connect(baddr).await;
    let writer = tokio::spawn(async move {
        for _ in 0..N {
            if c.tcp.write_all(&junk).await.is_err() {
                return;
            }
            w.fetch_add(junk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let progress = || {
        (
            written.load(std::sync::atomic::Ordering::Relaxed),
            count(&stats.bytes_to_circuit),
            count(&up_stats.bytes_to_tcp),
        )
    };
    let mut last = progress();
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = progress();
        if now == last && now.2 > 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "flow never stopped");
        last = now;
    }
    let (client_wrote, into_circuit, to_u) = last;
    eprintln!(
        "stalled: client asked to write {asked}, wrote {client_wrote}; bridge sent {into_circuit} into the circuit; \
         B wrote {to_u} to U"
    );
    assert!(!writer.is_finished(), "the client was never held back");
    assert!(client_wrote < asked / 2, "the client wrote {client_wrote} of {asked}");
    assert!((into_circuit as usize) < asked / 2, "the bridge read on: {into_circuit} of {asked}");
    assert_eq!(held.lock().unwrap().len(), 1);
    writer.abort();
    eprintln!("test took {:.2}s", t0.elapsed().as_secs_f64());
}

/// SPEC open issue 26e: the upstream service's 32 connections had no idle limit, so circuits that went quiet
/// (or only answered the node's pings) held the slots for ever. A circuit over which nothing but ping/pong crossed
/// for `idle_timeout` gives up its slot (BREAK `timeout`) when every slot is taken; while one is free it stays (a
/// following requester may wait longer than that for a block); one that keeps asking keeps its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_requester_gives_up_its_upstream_slot_when_all_are_taken() {
    // U accepts connections and reads (and drops) what comes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let u_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let opts = BridgeOptions { max_connections: 2, idle_timeout: Duration::from_secs(1), ..BridgeOptions::default() };
    let upstream = UpstreamService::with_options(u_addr.to_string(), regtest(), opts);
    let stats = upstream.stats();
    let magic = regtest().magic;
    let join = |upstream: &UpstreamService| {
        let (ours, theirs) = CircuitStream::memory_pair();
        upstream.accept(theirs);
        ours
    };
    let version = revealing_version("127.0.0.1:8333".parse().unwrap(), "127.0.0.1:18444".parse().unwrap(), 0);
    let hello = |c: CircuitStream| {
        let v = version.clone();
        async move {
            c.send(encode_message(magic, &Message::Version(v))).await.unwrap();
            c.send(encode_message(magic, &Message::Verack)).await.unwrap();
            c
        }
    };
    let ask = Message::GetHeaders(GetHeadersMessage {
        version: 70016,
        locator_hashes: vec![regtest().genesis_hash],
        stop_hash: BlockHash::all_zeros(),
    });
    // Alone (a slot free), pinging only, for 2 s: kept.
    let mut idle = hello(join(&upstream)).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let _ = idle.send(encode_message(magic, &Message::Ping(1))).await;
        let r = tokio::time::timeout(Duration::from_millis(250), idle.recv()).await;
        assert!(r.is_err(), "the idle circuit ended while a slot was free: {r:?}");
    }
    assert_eq!(count(&stats.idle), 0);
    // A second requester takes the last slot and keeps asking: now the idle one gives its slot up.
    let busy = hello(join(&upstream)).await;
    let t1 = Instant::now();
    let mut idle_ended = None;
    while t1.elapsed() < Duration::from_secs(3) {
        let _ = idle.send(encode_message(magic, &Message::Ping(1))).await;
        busy.send(encode_message(magic, &ask)).await.expect("the active requester lost its circuit");
        if idle_ended.is_none() {
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(250), idle.recv()).await {
                idle_ended = Some((r.map(|_| ()), t1.elapsed()));
            }
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let (result, after) = idle_ended.expect("the idle requester kept its circuit with every slot taken");
    // (A memory circuit carries no BREAK reason; `idle` counts the splices that ended for idleness, each with
    // BREAK `timeout`.)
    assert!(result.is_err(), "{result:?}");
    assert!(after < Duration::from_secs(2), "broken after {after:?}");
    assert_eq!(count(&stats.idle), 1);
    // Its slot is free again: a third requester is joined, not refused.
    let _third = join(&upstream);
    eventually("the third requester joined", WAIT, || count(&stats.joined) == 3).await;
    assert_eq!(count(&stats.refused), 0);
}
