//! The operator surface with real processes on 127.0.0.1: `--metrics` (Prometheus text exposition) on the
//! tracker and on peers, `anomos status` over the local control socket, graceful shutdown on SIGTERM/SIGINT
//! (BREAK to the neighbors, exit 0, replay cache persisted and reloaded).
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harden::*;

/// GET `path` from `addr`; returns (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {out:?}"));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status code");
    if code == 200 {
        // Header names are case-insensitive (hyper writes them in lower case).
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("content length");
        assert_eq!(len, body.len(), "content length");
    }
    (code, body.to_string())
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Parses a text exposition strictly: every line is `# HELP`, `# TYPE` (counter/gauge) or a sample of a
/// family declared (HELP and TYPE) before it, label values properly quoted and escaped, values numbers.
/// Returns `name{labels}` → value (labels in their order of appearance, unescaped).
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut helped = std::collections::HashSet::new();
    let mut typed = HashMap::new();
    let mut out = HashMap::new();
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(valid_name(name) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_string()), "HELP twice: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE: {line}"));
            assert!(valid_name(name) && matches!(t, "counter" | "gauge" | "histogram"), "{line}");
            assert!(typed.insert(name.to_string(), t.to_string()).is_none(), "TYPE twice: {line}");
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, String::new()),
                Some((n, rest)) => {
                    let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                    let mut parsed = Vec::new();
                    let mut chars = body.chars().peekable();
                    while chars.peek().is_some() {
                        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                        assert!(valid_name(&key), "label name {key:?} in {line}");
                        assert_eq!(chars.next(), Some('"'), "label value not quoted: {line}");
                        let mut v = String::new();
                        loop {
                            match chars.next() {
                                Some('\\') => match chars.next() {
                                    Some('\\') => v.push('\\'),
                                    Some('"') => v.push('"'),
                                    Some('n') => v.push('\n'),
                                    other => panic!("bad escape {other:?} in {line}"),
                                },
                                Some('"') => break,
                                Some(c) => v.push(c),
                                None => panic!("unterminated label value: {line}"),
                            }
                        }
                        parsed.push(format!("{key}=\"{v}\""));
                        match chars.next() {
                            None => break,
                            Some(',') => {}
                            Some(c) => panic!("unexpected {c:?} after a label in {line}"),
                        }
                    }
                    (n, format!("{{{}}}", parsed.join(",")))
                }
            };
            assert!(valid_name(name), "{line}");
            // A histogram's samples are its family's name with `_bucket`, `_sum` or `_count`.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.get(*f).is_some_and(|t| t == "histogram")))
                .unwrap_or(name);
            assert!(helped.contains(family) && typed.contains_key(family), "sample before HELP/TYPE: {line}");
            if typed[family] == "counter" {
                assert!(value >= 0.0, "negative counter: {line}");
            }
            assert!(out.insert(format!("{name}{labels}"), value).is_none(), "duplicate series: {line}");
        }
    }
    out
}

fn scrape(addr: &str) -> HashMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    parse_exposition(&body)
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        panic!("no series {series}; have {keys:?}")
    })
}

/// The `… metrics listen=ADDR` line a process prints after its ready line.
fn metrics_addr(p: &mut P) -> String {
    let l = p
        .lines_until(Duration::from_secs(10), |l| l.contains(" metrics listen="))
        .unwrap_or_else(|| panic!("{} printed no metrics line: {:?}", p.name, p.seen));
    field(&l, "listen").unwrap().to_string()
}

/// Runs `anomos status --data-dir DIR [--json]`.
fn status(dir: &Path, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(exe());
    cmd.args(["status", "--data-dir", dir.to_str().unwrap()]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(dir: &Path) -> serde_json::Value {
    let (ok, out, err) = status(dir, true);
    assert!(ok, "status failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

/// Waits for the process to exit (up to `timeout`); its exit status.
fn wait_exit(p: &mut P, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "{} did not exit; log:\n{}", p.name, p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_and_status_report_what_a_fetch_did() {
    let _serial = serial();
    let mut net = Net::new(&["--metrics", "127.0.0.1:0"]);
    let tracker_metrics = metrics_addr(&mut net.tracker);
    let mut relay_metrics = Vec::new();
    for i in 0..3 {
        let p = net.add_peer(&format!("relay{i}"), &["--metrics", "127.0.0.1:0"]);
        relay_metrics.push(metrics_addr(&mut net.peers[p]));
    }
    let server = net.add_peer("server", &["--serve", "regtest", "--mine", "40", "--metrics", "127.0.0.1:0"]);
    let server_metrics = metrics_addr(&mut net.peers[server]);

    // Before any circuit: the counters exist and are zero.
    let before = scrape(&tracker_metrics);
    assert_eq!(get(&before, "anomos_tracker_circuits_issued_total"), 0.0);
    assert_eq!(get(&before, "anomos_tracker_refused_total{reason=\"no-path\"}"), 0.0);
    let relayed_before: f64 = relay_metrics.iter().map(|a| get(&scrape(a), "anomos_peer_cells_relayed_total")).sum();
    assert_eq!(relayed_before, 0.0);
    assert_eq!(http_get(&tracker_metrics, "/").0, 404);
    assert_eq!(http_get(&relay_metrics[0], "/metrics/x").0, 404);

    let mut fetch =
        net.spawn_fetch("requester", &["--chain", "regtest", "--relays", "2", "--circuits", "1", "--timeout", "120"]);
    let done = finish_fetch(&mut fetch, Duration::from_secs(150));
    assert_full_chain(&done, 40);
    assert!(wait_exit(&mut fetch, Duration::from_secs(30)).success(), "fetch failed:\n{}", fetch.log_text());
    assert!(fetch.log_text().contains("shutdown:"), "no shutdown line:\n{}", fetch.log_text());

    // The tracker counted the announces and the circuit it issued.
    let t = scrape(&tracker_metrics);
    assert!(get(&t, "anomos_tracker_circuits_issued_total") >= 1.0, "{t:?}");
    assert!(get(&t, "anomos_tracker_circuit_requests_total") >= 1.0);
    assert!(get(&t, "anomos_tracker_announces_total") >= 5.0, "{t:?}");
    assert!(get(&t, "anomos_tracker_peers") >= 4.0, "{t:?}");
    assert!(get(&t, "anomos_tracker_sessions_total") >= 5.0, "{t:?}");

    // Two relays carried the circuit: cells and bytes relayed moved, each counted a relayed circuit.
    let relays: Vec<_> = relay_metrics.iter().map(|a| scrape(a)).collect();
    let cells: f64 = relays.iter().map(|m| get(m, "anomos_peer_cells_relayed_total")).sum();
    let bytes: f64 = relays.iter().map(|m| get(m, "anomos_peer_bytes_relayed_total")).sum();
    let opened: f64 = relays.iter().map(|m| get(m, "anomos_peer_circuits_opened_total{role=\"relay\"}")).sum();
    assert!(cells >= 80.0, "cells relayed {cells}");
    assert!(bytes >= cells * 100.0, "bytes relayed {bytes} for {cells} cells");
    assert_eq!(opened, 2.0, "relayed circuits opened");
    // The fetch ended its circuit when it stopped: each relay counted that circuit's end exactly once.
    let breaks = |m: &HashMap<String, f64>| -> f64 {
        m.iter().filter(|(k, _)| k.starts_with("anomos_peer_breaks_total{")).map(|(_, v)| v).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        let ended: f64 = relay_metrics.iter().map(|a| breaks(&scrape(a))).sum();
        if ended >= 2.0 || Instant::now() > deadline {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ended, 2.0, "relayed circuit ends counted");
    for m in &relays {
        assert!(get(m, "anomos_peer_links") >= 1.0);
        assert!(get(m, "anomos_peer_queued_cells_budget") > 0.0);
        assert!(get(m, "anomos_peer_last_announce_timestamp_seconds") > 1.6e9);
        assert!(get(m, "anomos_peer_announces_total{result=\"ok\"}") >= 1.0);
    }

    // The serving peer: one circuit to it as target, its chain height.
    let s = scrape(&server_metrics);
    assert!(get(&s, "anomos_peer_circuits_opened_total{role=\"target\"}") >= 1.0, "{s:?}");
    assert_eq!(get(&s, "anomos_peer_chain_height{chain=\"regtest\",role=\"serving\"}"), 40.0);
    assert_eq!(get(&s, "anomos_peer_chain_blocks{chain=\"regtest\",role=\"serving\"}"), 40.0);

    // `anomos status` over the control socket.
    let server_dir = net.dir.path().join("server");
    let v = status_json(&server_dir);
    assert!(v["links"].as_array().is_some_and(|l| !l.is_empty()), "{v}");
    for l in v["links"].as_array().unwrap() {
        assert!(matches!(l["direction"].as_str(), Some("in" | "out")), "{l}");
        assert!(l["peer"].as_str().is_some_and(|p| p.len() == 8), "{l}");
        assert!(l["age_secs"].is_u64() && l["queued_cells"].is_u64(), "{l}");
    }
    assert_eq!(v["chain"]["height"], 40, "{v}");
    assert_eq!(v["chain"]["role"], "serving", "{v}");
    assert_eq!(v["fingerprint"], net.peers[server].fingerprint.as_str());
    assert!(v["tracker"]["last_announce_ok_unix"].as_u64().is_some_and(|t| t > 1_600_000_000), "{v}");
    assert!(v["tracker"]["neighbors"].as_u64().is_some_and(|n| n >= 1), "{v}");
    for role in ["relay", "origin", "target", "opening"] {
        assert!(v["circuits"][role].is_u64(), "{v}");
    }
    let relay_v = status_json(&net.dir.path().join("relay0"));
    assert!(relay_v["chain"].is_null(), "a relay serves no chain: {relay_v}");
    let (ok, table, _) = status(&server_dir, false);
    assert!(ok && table.contains("links") && table.contains("height 40"), "{table}");

    // The socket is private, and a directory without a running peer gets a clear error.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(server_dir.join("control.sock")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let (ok, _, err) = status(&net.dir.path().join("requester"), false);
    assert!(!ok && err.contains("cannot reach a running peer"), "{err}");
    assert!(!net.dir.path().join("requester").join("control.sock").exists(), "the fetch removed its socket");
    for p in net.peers.iter_mut() {
        p.assert_healthy();
    }
}

#[test]
fn sigterm_on_a_relay_mid_fetch_breaks_the_circuit_promptly_exits_zero_and_keeps_the_replay_cache() {
    let _serial = serial();
    let mut net = Net::new(&[]);
    let traces: Vec<_> = (0..5).map(|i| net.dir.path().join(format!("relay{i}.trace"))).collect();
    for (i, t) in traces.iter().enumerate() {
        net.add_peer(&format!("relay{i}"), &["--cell-trace", t.to_str().unwrap()]);
    }
    let server = net.add_peer("server", &["--serve", "regtest", "--mine", "2500", "--mine-txs", "10"]);
    net.peers[server].wait_log(&["mined regtest blocks"], Duration::from_secs(60)).expect("mined");
    let mut fetch =
        net.spawn_fetch("requester", &["--chain", "regtest", "--relays", "2", "--circuits", "1", "--timeout", "240"]);
    fetch.lines_until(Duration::from_secs(120), |l| l.starts_with("progress blocks=")).expect("blocks flowing");
    // `status` on the running fetch: its circuit, its links, the sync under way.
    let v = status_json(&net.dir.path().join("requester"));
    assert_eq!(v["circuits"]["origin"], 1, "{v}");
    assert!(v["links"].as_array().is_some_and(|l| !l.is_empty()), "{v}");
    assert_eq!(v["chain"]["role"], "fetching", "{v}");
    assert!(matches!(v["sync"]["phase"].as_str(), Some("blocks" | "synced")), "{v}");
    assert!(v["sync"]["blocks_done"].as_u64().is_some_and(|n| n >= 1), "{v}");
    // The victim relays the live circuit now (a relay that only saw a first attempt which
    // failed, say a refused OPEN, has a trace too but nothing left to break).
    let victim = (0..traces.len())
        .find(|&i| status_json(&net.dir.path().join(format!("relay{i}")))["circuits"]["relay"].as_u64() >= Some(1))
        .expect("a relay on the path");
    let signalled = unix_ms();
    net.peers[victim].signal("TERM");

    // The relay exits by itself with status 0, after one shutdown line saying what it tore down.
    let status = wait_exit(&mut net.peers[victim], Duration::from_secs(10));
    let exited_ms = unix_ms().saturating_sub(signalled);
    let log = net.peers[victim].log_text();
    assert!(status.success(), "relay exit status {status:?}; log:\n{log}");
    let line = log.lines().find(|l| l.contains("shutdown:")).unwrap_or_else(|| panic!("no shutdown line:\n{log}"));
    let broken: u64 = field(line, "circuits_broken").and_then(|v| v.parse().ok()).expect("circuits_broken");
    assert!(broken >= 1, "{line}");
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("relay{victim} exited after {exited_ms} ms: {line}");

    // The requester learns promptly: its circuit broke with reason shutdown (not a link timeout).
    let failed = fetch
        .lines_until(Duration::from_secs(30), |l| l.starts_with("event circuit-failed"))
        .unwrap_or_else(|| panic!("requester never saw the break: {:?}", fetch.seen));
    let seen_ms: u128 = field(&failed, "unix_ms").and_then(|v| v.parse().ok()).expect("unix_ms");
    let after = seen_ms.saturating_sub(signalled);
    eprintln!("requester saw the break after {after} ms: {failed}");
    assert!(after < 2000, "requester noticed after {after} ms");
    let srv = net.peers[server]
        .wait_log_after(signalled, &["circuit broken"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("serving peer never saw the break:\n{}", net.peers[server].log_text()));
    assert!(srv.text.contains("shutdown"), "the serving peer's circuit broke for another reason: {}", srv.text);

    // The replay cache was written (0600) with the tag of the circuit it relayed; a restart loads it.
    let data_dir = net.dir.path().join(format!("relay{victim}"));
    let cache = data_dir.join("replay-cache.bin");
    let meta = std::fs::metadata(&cache).unwrap_or_else(|e| panic!("{}: {e}", cache.display()));
    assert!(meta.len() >= 8 + 4 + 24 + 8, "replay cache holds no tag ({} bytes)", meta.len());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    assert!(!data_dir.join("control.sock").exists(), "control socket not removed");
    net.peers[victim].restart();
    let loaded = net.peers[victim].wait_log(&["replay cache loaded"], Duration::from_secs(10)).expect("cache loaded");
    let tags: u64 = field(&loaded.text, "tags").and_then(|v| v.parse().ok()).expect("tags");
    assert!(tags >= 1, "{}", loaded.text);

    // The sync completes on a replacement circuit.
    let done = finish_fetch(&mut fetch, Duration::from_secs(200));
    assert_full_chain(&done, 2500);
}

#[test]
fn the_tracker_and_a_peer_stop_cleanly_on_sigint_and_a_stale_socket_is_replaced() {
    let _serial = serial();
    let mut net = Net::new(&[]);
    let p = net.add_peer("relay0", &[]);
    let dir = net.dir.path().join("relay0");
    assert!(status_json(&dir)["fingerprint"].is_string());

    net.peers[p].signal("INT");
    let st = wait_exit(&mut net.peers[p], Duration::from_secs(10));
    assert!(st.success(), "peer exit {st:?}:\n{}", net.peers[p].log_text());
    assert!(net.peers[p].log_text().contains("shutdown:"));
    assert!(!dir.join("control.sock").exists());

    // A socket file left behind (as after kill -9) does not stop the next start.
    #[cfg(unix)]
    {
        let stale = std::os::unix::net::UnixListener::bind(dir.join("control.sock")).unwrap();
        drop(stale);
        assert!(dir.join("control.sock").exists());
        net.peers[p].restart();
        assert!(net.peers[p].log_text().contains("replacing a stale control socket"));
        assert!(status_json(&dir)["fingerprint"].is_string());
    }

    net.tracker.signal("INT");
    let st = wait_exit(&mut net.tracker, Duration::from_secs(10));
    assert!(st.success(), "tracker exit {st:?}:\n{}", net.tracker.log_text());
    assert!(net.tracker.log_text().contains("shutdown:"), "{}", net.tracker.log_text());
}
