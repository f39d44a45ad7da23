//! Anonymity properties as tests, against live processes (SPEC §11): what a link observer, a tracker
//! observer, the logs, and each end of a circuit can learn. (The per-hop unlinkability of relayed
//! ciphertext is `tests/overlay.rs`.)
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anomos::Node;
use anomos_proto::identity::Identity;
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::tc::{self, Layer, LayerKind};
use anomos_proto::tracker::{CircuitGrant, CircuitRequest};
use bitcoin::hashes::Hash;
use harden::*;

/// Byte forms of an address: text, IPv4+port (network order), and the bincode form of the tracker protocol.
fn addr_forms(a: SocketAddr) -> Vec<(String, Vec<u8>)> {
    let SocketAddr::V4(v4) = a else { panic!("IPv4 only") };
    let ip = v4.ip().octets();
    let port = v4.port();
    let mut bin = ip.to_vec();
    bin.extend_from_slice(&port.to_be_bytes());
    let mut bincode = ip.to_vec();
    bincode.push(0xfb);
    bincode.extend_from_slice(&port.to_le_bytes());
    vec![
        (format!("address {a} (text)"), a.to_string().into_bytes()),
        (format!("address {a}"), bin),
        (format!("address {a} (bincode)"), bincode),
    ]
}

fn nid_forms(n: NeighborId) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("nid {:016x}", n.0), n.0.to_be_bytes().to_vec()),
        (format!("nid {:016x} LE", n.0), n.0.to_le_bytes().to_vec()),
    ]
}

/// What a circuit's TC says at every hop: the layers and the TC each hop received.
struct Peeled {
    layers: Vec<Layer>,
    tcs: Vec<Vec<u8>>,
}

/// Peels a grant's TC with the hops' own keys (the test can read every key file).
fn peel_all(grant: &CircuitGrant, ids: &[Identity]) -> Peeled {
    let mut tc = grant.tc_array().unwrap();
    let mut out = Peeled { layers: Vec::new(), tcs: vec![tc.to_vec()] };
    loop {
        let p = ids.iter().find_map(|id| tc::peel(&tc, id).ok()).expect("some hop peels the layer");
        out.layers.push(p.layer);
        match p.next {
            Some(next) => {
                out.tcs.push(next.to_vec());
                tc = next;
            }
            None => return out,
        }
    }
}

/// Named byte strings to look for.
type Needles = Vec<(String, Vec<u8>)>;

/// Everything about one circuit that must never appear in clear: secrets, tags, NeighborIDs, chain, TCs.
fn circuit_needles(grant: &CircuitGrant, peeled: &Peeled) -> (Needles, HashSet<[u8; 16]>) {
    let mut v = Vec::new();
    for (i, s) in grant.hop_secrets.iter().enumerate() {
        v.push((format!("hop secret {i}"), s.to_vec()));
    }
    v.push(("e2e secret".into(), grant.e2e_secret.to_vec()));
    v.push(("session".into(), grant.session.to_vec()));
    for (i, l) in peeled.layers.iter().enumerate() {
        v.push((format!("replay tag {i}"), l.replay_tag.to_vec()));
        v.extend(nid_forms(l.prev));
        if let LayerKind::Relay { next } = l.kind {
            v.extend(nid_forms(next));
        }
    }
    v.push(("chain id".into(), b"regtest".to_vec()));
    let mut windows = HashSet::new();
    for t in &peeled.tcs {
        windows.extend(windows16(t));
    }
    (v, windows)
}

/// Asserts no needle and no TC window occurs in any recorded stream.
fn assert_absent(what: &str, streams: &[Vec<u8>], needles: &[(String, Vec<u8>)], windows: &HashSet<[u8; 16]>) {
    for (i, s) in streams.iter().enumerate() {
        for (name, n) in needles {
            assert!(!contains(s, n), "{what}: {name} appears in clear in stream {i}");
        }
        assert!(!any_window(s, windows), "{what}: 16 bytes of a tracking code appear in stream {i}");
    }
}

/// Hex runs (16+ digits) in a text, lowercased.
fn hex_runs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            cur.push(c.to_ascii_lowercase());
        } else {
            if cur.len() >= 16 {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    out
}

async fn grant(node: &Arc<Node>, relays: u8) -> CircuitGrant {
    for _ in 0..100 {
        if node.link_count() > 0 {
            let req = CircuitRequest { chain: ChainId::new("regtest").unwrap(), count: 1, relays };
            if let Ok(mut g) = node.request_grants(req).await {
                if let Some(g) = g.pop() {
                    return g;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("no grant")
}

/// A grant whose circuit opened and carried the Bitcoin handshake, some pings and a header download. (At start-up a
/// neighbor may dial us while we dial it; since SPEC revision 13 the crossing link drains instead of replacing the
/// one the circuit opened on, so no retry is needed: CI in session 11 saw one break before.)
async fn grant_and_use(node: &Arc<Node>, relays: u8) -> CircuitGrant {
    let g = grant(node, relays).await;
    match node.open_circuit(&g).await {
        Ok(s) => {
            use_circuit(s).await;
            g
        }
        Err(e) => panic!("circuit opens: {e:?}"),
    }
}

/// Does the Bitcoin handshake, some pings and a header download over an open circuit.
async fn use_circuit(mut s: anomos::CircuitStream) {
    btc_handshake(&mut s).await.unwrap();
    for _ in 0..10 {
        btc_ping(&mut s).await.unwrap();
    }
    use anomos_proto::btc::{encode_message, GetHeadersMessage, Message, NetParams};
    let genesis = NetParams::regtest().genesis_hash;
    let gh = GetHeadersMessage::new(vec![genesis], bitcoin::BlockHash::from_byte_array([0; 32]));
    s.send(encode_message(regtest_magic(), &Message::GetHeaders(gh))).await.unwrap();
    btc_until(&mut s, |m| matches!(m, Message::Headers(h) if !h.is_empty())).await.unwrap();
}

#[test]
fn link_observers_see_no_identifiers_secrets_or_addresses_and_logs_hold_no_secrets() {
    serial_async(async {
        let mut net = Net::new_with_env(&["--neighbors", "4"], &[("RUST_LOG", "debug")]);
        // Every peer listens behind a recording proxy and announces the proxy: every link passes one.
        let mut proxies = Vec::new();
        let mut listens = Vec::new();
        for name in ["relay0", "relay1", "relay2", "relay3", "server"] {
            let port = free_port();
            let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let proxy = Proxy::start(listen);
            let adv = proxy.addr.to_string();
            let mut extra = vec!["--advertise", &adv];
            if name == "server" {
                extra.extend(["--serve", "regtest", "--mine", "200"]);
            }
            net.add_peer_at(name, &listen.to_string(), &extra);
            listens.push(listen);
            listens.push(proxy.addr);
            proxies.push(proxy);
        }
        let rport = free_port();
        let rlisten: SocketAddr = format!("127.0.0.1:{rport}").parse().unwrap();
        let rproxy = Proxy::start(rlisten);
        let dir = tempfile::tempdir().unwrap();
        let radv = rproxy.addr;
        let requester = node_in(&net, dir.path(), None, |c| {
            c.listen = rlisten;
            c.advertise = Some(radv);
        })
        .await;
        listens.extend([rlisten, radv]);
        proxies.push(rproxy);

        let g = grant_and_use(&requester, 2).await;
        let ids: Vec<Identity> =
            ["relay0", "relay1", "relay2", "relay3", "server"].iter().map(|n| net.identity(n)).collect();
        let peeled = peel_all(&g, &ids);
        assert_eq!(peeled.layers.len(), 3, "two relays and the target");

        let (mut needles, windows) = circuit_needles(&g, &peeled);
        for p in &net.peers {
            needles.push((format!("fingerprint of {}", p.name), p.fp().0.to_vec()));
            if let Some((_, nid)) = requester.neighbor_by_fp(&p.fp()) {
                needles.extend(nid_forms(nid));
            }
        }
        needles.push(("requester fingerprint".into(), requester.fingerprint().0.to_vec()));
        for a in &listens {
            needles.extend(addr_forms(*a));
        }
        needles.push(("user agent".into(), b"/anomos:0.1.0/".to_vec()));
        let mut version = regtest_magic().to_vec();
        version.extend_from_slice(b"version\0");
        needles.push(("bitcoin version header".into(), version));

        let recorded: Vec<(SocketAddr, Vec<u8>)> =
            proxies.iter().flat_map(|p| p.recorded().into_iter().map(|s| (p.addr, s))).collect();
        let streams: Vec<Vec<u8>> = recorded.iter().map(|(_, s)| s.clone()).collect();
        let total: usize = streams.iter().map(Vec::len).sum();
        eprintln!(
            "recorded {} link streams, {total} bytes; {} needles, {} TC windows",
            streams.len(),
            needles.len(),
            windows.len()
        );
        assert!(total > 100_000, "too little traffic recorded: {total}");
        assert!(streams.iter().any(|s| contains(s, b"ANOMOSL1")), "no link handshake recorded");
        // A version-2 reachability probe names the address it probes (SPEC §3.9): the address of the listener it
        // reached, which an observer of that connection sees as its destination anyway. That address, in a
        // probe, is the one exception.
        for (at, s) in &recorded {
            let own: Vec<Vec<u8>> = match s.starts_with(&anomos_proto::link::PROBE_MAGIC) {
                true => addr_forms(*at).into_iter().map(|(_, b)| b).collect(),
                false => Vec::new(),
            };
            let others: Needles = needles.iter().filter(|(_, n)| !own.contains(n)).cloned().collect();
            assert_absent("link traffic", std::slice::from_ref(s), &others, &windows);
        }
        assert!(
            recorded.iter().any(|(_, s)| s.starts_with(&anomos_proto::link::PROBE_MAGIC)),
            "no probe recorded: the exception above is not exercised"
        );

        // Logs (debug level, every process) never hold a secret, a NeighborID, a replay tag or TC bytes.
        let mut secret_hex: Vec<(String, String)> = Vec::new();
        for (i, s) in g.hop_secrets.iter().enumerate() {
            secret_hex.push((format!("hop secret {i}"), hex::encode(s)));
        }
        secret_hex.push(("e2e secret".into(), hex::encode(g.e2e_secret)));
        for (i, l) in peeled.layers.iter().enumerate() {
            secret_hex.push((format!("replay tag {i}"), hex::encode(l.replay_tag)));
            secret_hex.push((format!("prev nid {i}"), format!("{:016x}", l.prev.0)));
        }
        let mut nid_dec: Vec<String> = peeled.layers.iter().map(|l| l.prev.0.to_string()).collect();
        for p in &net.peers {
            if let Some((_, nid)) = requester.neighbor_by_fp(&p.fp()) {
                secret_hex.push((format!("nid to {}", p.name), format!("{:016x}", nid.0)));
                nid_dec.push(nid.0.to_string());
            }
        }
        let logs = net.all_logs();
        let bytes: usize = logs.iter().map(|(_, l)| l.len()).sum();
        eprintln!("checking {} logs ({bytes} bytes at debug level)", logs.len());
        assert!(logs.iter().all(|(_, l)| l.contains(" DEBUG ")), "logs are not at debug level");
        for (name, log) in &logs {
            let runs = hex_runs(log);
            for (what, h) in &secret_hex {
                assert!(!runs.iter().any(|r| r.contains(h.as_str())), "{what} in the log of {name}");
            }
            for r in &runs {
                if let Ok(b) = hex::decode(&r[..r.len() & !1]) {
                    assert!(!any_window(&b, &windows), "TC bytes in the log of {name}");
                }
            }
            for d in &nid_dec {
                assert!(!log.contains(d.as_str()), "a NeighborID (decimal) in the log of {name}");
            }
        }
    })
}

#[test]
fn a_tracker_observer_learns_nothing_and_a_wrong_tracker_key_is_refused() {
    serial_async(async {
        let mut net = Net::new(&[]);
        let tproxy = Proxy::start(net.tracker_addr());
        net.tracker_via = Some(tproxy.addr.to_string());
        for i in 0..3 {
            net.add_peer(&format!("relay{i}"), &[]);
        }
        net.add_peer("server", &["--serve", "regtest", "--mine", "50"]);
        let dir = tempfile::tempdir().unwrap();
        let via = tproxy.addr;
        let requester = node_in(&net, dir.path(), None, |c| c.tracker = via).await;
        let g = grant_and_use(&requester, 2).await;
        let ids: Vec<Identity> = ["relay0", "relay1", "relay2", "server"].iter().map(|n| net.identity(n)).collect();
        let peeled = peel_all(&g, &ids);
        let (mut needles, windows) = circuit_needles(&g, &peeled);
        for p in &net.peers {
            needles.extend(addr_forms(p.addr()));
            needles.push((format!("key of {}", p.name), net.identity(&p.name).public().der().to_vec()));
            needles.push((format!("fingerprint of {}", p.name), p.fp().0.to_vec()));
            if let Some((_, nid)) = requester.neighbor_by_fp(&p.fp()) {
                needles.extend(nid_forms(nid));
            }
        }
        needles.extend(addr_forms(requester.listen_addr));
        needles.push(("requester key".into(), requester.identity.public().der().to_vec()));
        let streams = tproxy.recorded();
        let tracker_der =
            anomos::tracker_client::fetch_tracker_key(net.tracker_addr(), &net.tracker_fp()).await.unwrap();
        eprintln!("recorded {} tracker streams, {} bytes", streams.len(), tproxy.total());
        assert!(streams.iter().any(|s| contains(s, b"ANOMOST1")), "no tracker session recorded");
        assert!(streams.iter().any(|s| contains(s, tracker_der.der())), "the (public) key fetch was not recorded");
        assert_absent("tracker traffic", &streams, &needles, &windows);

        // A peer pinned to the real tracker refuses an impostor at the tracker's address (another key).
        let impostor = P::start(
            "impostor",
            ["tracker", "--listen", "127.0.0.1:0", "--data-dir", net.dir.path().join("impostor").to_str().unwrap()]
                .map(String::from)
                .to_vec(),
            net.dir.path(),
            Vec::new(),
            Vec::new(),
        );
        let mut args: Vec<String> = vec!["peer".into()];
        args.extend(net.join_args("fooled"));
        let i = args.iter().position(|a| a == "--tracker").unwrap();
        args[i + 1] = impostor.listen.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(exe()).args(&args).env("NO_COLOR", "1").output().unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("refusing the tracker"), "{err}");
        assert!(!impostor.log_text().contains("new peer announced"));
    })
}

#[test]
fn neither_end_of_a_circuit_logs_or_stores_the_others_address() {
    let _serial = serial();
    let mut net = Net::new_with_env(&[], &[("RUST_LOG", "debug")]);
    for i in 0..4 {
        net.add_peer(&format!("relay{i}"), &[]);
    }
    let server = net.add_peer("server", &["--serve", "regtest", "--mine", "300"]);
    let mut fetch = net.spawn_fetch("requester", &["--chain", "regtest", "--relays", "2", "--circuits", "1"]);
    assert_full_chain(&finish_fetch(&mut fetch, Duration::from_secs(120)), 300);
    let srv = &net.peers[server];
    assert!(srv.log_text().contains("circuit opened to us as target"), "the server served no circuit");
    let files = |d: &std::path::Path| -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    v.push(std::fs::read(e.path()).unwrap_or_default());
                }
            }
        }
        v
    };
    for (who, log, dir, other, other_addr) in [
        ("target", srv.log_text(), net.dir.path().join("server"), "requester", fetch.addr()),
        ("requester", fetch.log_text(), net.dir.path().join("requester"), "target", srv.addr()),
    ] {
        let forms = addr_forms(other_addr);
        assert!(!log.contains(&other_addr.to_string()), "the {who}'s log holds the {other}'s address");
        for f in files(&dir) {
            for (name, n) in &forms {
                assert!(!contains(&f, n), "the {who}'s state holds the {other}'s {name}");
            }
        }
    }
}
