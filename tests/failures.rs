//! What an operator sees when something fails (issue 17, points 2, 3, 5 and 6), with real processes on
//! 127.0.0.1: a killed relay is reported by its dialing neighbor at once and avoided by the tracker, then redialed
//! with backoff and shown by `status` (warned once); a serving peer whose `--upstream` node is down says so in
//! `status`, and the bridge that used it logs the circuit's BREAK reason; a chain nobody serves is refused
//! with the tracker's reason within seconds, not after the bridge's whole circuit timeout.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anomos_proto::btc::{Envelope, NetParams};
use harden::*;

fn status(dir: &Path, json: bool) -> String {
    let mut c = Command::new(exe());
    c.args(["status", "--data-dir", dir.to_str().unwrap()]);
    if json {
        c.arg("--json");
    }
    String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
}

fn status_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&status(dir, true)).unwrap_or_default()
}

/// Polls `f` every 200 ms for up to `limit`.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `version` envelope of `chain`, as an unmodified node sends first.
fn version_envelope(chain: &str) -> Vec<u8> {
    use bitcoin::p2p::address::Address;
    use bitcoin::p2p::message_network::VersionMessage;
    use bitcoin::p2p::ServiceFlags;
    let a: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let v = VersionMessage::new(
        ServiceFlags::NONE,
        1_700_000_000,
        Address::new(&a, ServiceFlags::NONE),
        Address::new(&a, ServiceFlags::NONE),
        7,
        "/test:0.1/".into(),
        0,
    );
    let magic = NetParams::by_name(chain).unwrap().magic;
    Envelope::new(magic, "version", bitcoin::consensus::serialize(&v)).unwrap().try_encode().unwrap()
}

/// Connects a client to a bridge, sends `version`, and waits (up to 60 s) for the bridge to close the
/// connection; returns how long that took.
fn bridged_client_until_closed(bridge: &str, chain: &str) -> Duration {
    let mut c = TcpStream::connect(bridge).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let t = Instant::now();
    c.write_all(&version_envelope(chain)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return t.elapsed(),
            Ok(_) => {}
        }
    }
}

fn bridge_addr(p: &mut P) -> String {
    let l = p
        .lines_until(Duration::from_secs(20), |l| l.contains("bridge ready"))
        .unwrap_or_else(|| panic!("{}: no bridge ready line: {:?}", p.name, p.seen));
    field(&l, "listen").unwrap().to_string()
}

#[test]
fn upstream_down_is_shown_by_status_and_reaches_the_bridge_log_and_no_path_is_prompt() {
    let _serial = serial();
    let mut net = Net::new(&[]);
    for i in 0..3 {
        net.add_peer(&format!("relay{i}"), &[]);
    }
    let dead = format!("127.0.0.1:{}", free_port());
    let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let live_addr = live.local_addr().unwrap().to_string();
    let down = net.add_peer("server", &["--serve", "regtest", "--upstream", &dead]);
    let up = net.add_peer("server2", &["--serve", "signet", "--upstream", &live_addr]);
    let b = net.add_peer("bridge", &["--bridge", "127.0.0.1:0", "--bridge-chain", "regtest"]);
    let bridge = bridge_addr(&mut net.peers[b]);
    let b4 = net.add_peer("bridge4", &["--bridge", "127.0.0.1:0", "--bridge-chain", "testnet4"]);
    let bridge4 = bridge_addr(&mut net.peers[b4]);

    // Point 5: status says what is served and how, and whether the upstream node answers.
    let dir = net.dir.path().join("server");
    let v = eventually(Duration::from_secs(20), || {
        let v = status_json(&dir);
        v.pointer("/chain/upstream/reachable").and_then(|r| r.as_bool()).is_some().then_some(v)
    })
    .unwrap_or_else(|| panic!("no upstream state in status: {}", status(&dir, true)));
    assert_eq!(v.pointer("/chain/source").and_then(|s| s.as_str()), Some("upstream"), "{v}");
    assert_eq!(v.pointer("/chain/name").and_then(|s| s.as_str()), Some("regtest"), "{v}");
    assert_eq!(v.pointer("/chain/upstream/addr").and_then(|s| s.as_str()), Some(dead.as_str()), "{v}");
    assert_eq!(v.pointer("/chain/upstream/reachable").and_then(|r| r.as_bool()), Some(false), "{v}");
    let text = status(&dir, false);
    assert!(text.contains(&format!("regtest (serving via upstream node {dead}: UNREACHABLE")), "{text}");
    assert!(!text.contains("relay only"), "{text}");
    let dir2 = net.dir.path().join("server2");
    let text2 = eventually(Duration::from_secs(20), || {
        let t = status(&dir2, false);
        t.contains("reachable, checked").then_some(t)
    })
    .unwrap_or_else(|| panic!("server2: {}", status(&dir2, false)));
    assert!(text2.contains(&format!("signet (serving via upstream node {live_addr}: reachable")), "{text2}");
    assert!(net.peers[down].wait_log(&["WARN", "upstream node not reachable"], Duration::from_secs(5)).is_some());

    // Point 6: the circuit to the serving peer opens, its upstream connect fails, and the bridge's log says why.
    let took = bridged_client_until_closed(&bridge, "regtest");
    let line = net.peers[b]
        .wait_log(&["WARN", "bridged connection ended", "upstream-unavailable"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("bridge log has no reason:\n{}", net.peers[b].log_text()));
    eprintln!("upstream down: connection closed after {} ms; bridge: {}", took.as_millis(), line.text);
    assert!(net.peers[down]
        .wait_log(&["breaking the circuit (upstream-unavailable)"], Duration::from_secs(5))
        .is_some());

    // A chain nobody serves: the tracker's "no path" at once in the bridge's log, the client closed well before the
    // 30 s circuit timeout.
    let took = bridged_client_until_closed(&bridge4, "testnet4");
    let log4 = net.peers[b4].log_text();
    let warned = log_lines(&log4)
        .into_iter()
        .find(|l| l.text.contains("WARN") && l.text.contains("no path"))
        .unwrap_or_else(|| panic!("no WARN with the tracker's reason:\n{log4}"));
    eprintln!("chain nobody serves: connection closed after {} ms; bridge: {}", took.as_millis(), warned.text);
    assert!(took < Duration::from_secs(20), "closed only after {took:?}");
    drop(live);
    let _ = up;
}

#[test]
fn a_killed_relay_is_reported_at_once_avoided_and_redialed_with_backoff() {
    let _serial = serial();
    // Interval 10 s: the dead relay's edges stay in its neighbors' tables until it expires (30 s), long enough to
    // watch the redials.
    let mut net = Net::new_interval(10, &[]);
    for i in 0..5 {
        net.add_peer(&format!("relay{i}"), &[]);
    }
    assert!(net.wait_links(2, Duration::from_secs(30)), "links did not come up");
    std::thread::sleep(Duration::from_secs(3));
    // The victim: a relay with a neighbor of smaller fingerprint, the side that dials their edge (SPEC §5.2), so
    // that neighbor's dial loop sees it die.
    let (victim, dialer) = net
        .peers
        .iter()
        .enumerate()
        .find_map(|(i, p)| {
            let v = status_json(&net.dir.path().join(&p.name));
            let links = v.get("links")?.as_array()?.clone();
            links.iter().find_map(|l| {
                let short = l["peer"].as_str()?;
                let d = net.peers.iter().position(|q| q.fingerprint.starts_with(short))?;
                (net.peers[d].fingerprint < p.fingerprint).then_some((i, d))
            })
        })
        .expect("some relay has a neighbor with a smaller fingerprint");
    let short = net.peers[victim].short();
    let killed_ms = unix_ms();
    net.peers[victim].kill();

    // Point 2: the dialing neighbor reports it at once (its first redial failed), the tracker probes and avoids it.
    net.peers[dialer]
        .wait_log_after(
            killed_ms,
            &["link dropped and a redial failed", "reported to the tracker", &short],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("dialer did not report at once:\n{}", net.peers[dialer].log_text()));
    let warn = net.peers[dialer]
        .wait_log_after(killed_ms, &["WARN", "neighbor unreachable", &short], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("dialer did not warn:\n{}", net.peers[dialer].log_text()));
    assert!(warn.text.contains("failures=3"), "{}", warn.text);
    let reported = net
        .tracker
        .wait_log_after(killed_ms, &["neighbor reported unreachable", &short], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("tracker heard nothing:\n{}", net.tracker.log_text()));
    let avoided = net
        .tracker
        .wait_log_after(killed_ms, &["avoided=", &short], Duration::from_secs(15))
        .unwrap_or_else(|| panic!("tracker did not avoid it:\n{}", net.tracker.log_text()));
    eprintln!(
        "killed relay {short}: reported to the tracker after {} ms, avoided after {} ms",
        reported.ms.saturating_sub(killed_ms),
        avoided.ms.saturating_sub(killed_ms)
    );

    // Point 3: redialed with backoff, warned once, shown by status.
    std::thread::sleep(Duration::from_secs(8));
    let dir = net.dir.path().join(&net.peers[dialer].name);
    let v = status_json(&dir);
    let entry = v["unreachable"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["peer"] == short.as_str()).cloned())
        .unwrap_or_else(|| panic!("status does not show {short} unreachable: {v}"));
    let dials = entry["failed_dials"].as_u64().unwrap();
    assert!((2..=8).contains(&dials), "failed dials in ~8 s with backoff from 250 ms: {entry}");
    assert!(status(&dir, false).contains("unreachable neighbors 1"), "{}", status(&dir, false));
    let log = net.peers[dialer].log_text();
    let warns = log.lines().filter(|l| l.contains("WARN") && l.contains("neighbor unreachable")).count();
    assert_eq!(warns, 1, "warned more than once:\n{log}");
    assert!(!log.lines().any(|l| l.contains(" INFO ") && l.contains("dial failed:")), "dial failures at INFO:\n{log}");
}
