//! A fresh overlay, as an operator starts one (issue 17, points 1 and 7): with the default-like announce interval
//! a new peer's links must come up without waiting for its neighbors' next announce, a fresh peer must open its
//! first circuit as soon as a path exists, and a normal start-up must log nothing at WARN or ERROR and no
//! handshake refusal at INFO (expected start-up races are DEBUG).
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harden::*;

fn status_json(dir: &Path) -> Option<serde_json::Value> {
    let out = Command::new(exe()).args(["status", "--json", "--data-dir", dir.to_str().unwrap()]).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// (live links, neighbors) of a running peer, per its status.
fn links_and_neighbors(dir: &Path) -> (usize, u64) {
    let v = status_json(dir).unwrap_or_default();
    let links = v.get("links").and_then(|l| l.as_array()).map_or(0, Vec::len);
    let nbrs = v.pointer("/tracker/neighbors").and_then(|n| n.as_u64()).unwrap_or(0);
    (links, nbrs)
}

/// Log lines an operator would have to look at: WARN or ERROR, or a handshake refusal above DEBUG.
fn noise(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or("");
            matches!(level, "WARN" | "ERROR")
                || (level != "DEBUG" && level != "TRACE" && (l.contains("link refused") || l.contains("Refused")))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn fresh_overlay_links_up_without_waiting_for_announces_and_logs_quietly() {
    let _serial = serial();
    // A long interval, so that only the start-up mechanisms (knock, refresh on refusal) can bring links up in
    // time: an edge's dialer that learned of it only at its next announce would need up to 60 s.
    let mut net = Net::new_interval(60, &[]);
    let server = net.add_peer("server", &["--serve", "regtest", "--mine", "20"]);
    for i in 0..4 {
        net.add_peer(&format!("relay{i}"), &[]);
    }
    let started = Instant::now();
    // Every peer has a link to each of its neighbors, well before anyone's next announce.
    let names: Vec<String> = net.peers.iter().map(|p| p.name.clone()).collect();
    let all_up = |net: &Net| {
        names.iter().all(|n| {
            let (links, nbrs) = links_and_neighbors(&net.dir.path().join(n));
            nbrs > 0 && links as u64 >= nbrs
        })
    };
    while !all_up(&net) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let overlay_ms = started.elapsed().as_millis();
    let report: Vec<String> = names
        .iter()
        .map(|n| {
            let (l, k) = links_and_neighbors(&net.dir.path().join(n));
            format!("{n}: {l}/{k}")
        })
        .collect();
    let overlay_up = all_up(&net);

    // A fresh peer opens its first circuit as soon as a path exists.
    let t = Instant::now();
    let mut fetch = net.spawn_fetch("requester", &["--chain", "regtest", "--relays", "1", "--circuits", "1"]);
    let line = fetch
        .wait_log(&["circuits open"], Duration::from_secs(40))
        .unwrap_or_else(|| panic!("no circuit within 40 s; log:\n{}", fetch.log_text()));
    let first_circuit_ms = t.elapsed().as_millis();
    finish_fetch(&mut fetch, Duration::from_secs(60));
    eprintln!(
        "startup: all links up {overlay_ms} ms after the last of 5 peers was ready; fresh peer's first circuit \
         {first_circuit_ms} ms after it was started ({})",
        line.text
    );
    assert!(overlay_up, "links still missing {overlay_ms} ms after the last peer started: {report:?}");
    // Generous bound (the interval is 60 s; a fetch waits up to 10 s for links it expects before it asks).
    assert!(first_circuit_ms < 25_000, "first circuit took {first_circuit_ms} ms");

    // Start-up is until the fresh peer's first circuit opened (the fetch then finishes and leaves, and its
    // neighbors rightly report it).
    let until = line.ms;
    let mut logs: Vec<(String, String)> = net.all_logs();
    logs.push(("requester".into(), fetch.log_text()));
    let noisy: Vec<String> = logs
        .iter()
        .flat_map(|(n, l)| {
            let startup: String = log_lines(l).into_iter().filter(|x| x.ms <= until).map(|x| x.text + "\n").collect();
            noise(&startup).into_iter().map(move |x| format!("{n}: {x}"))
        })
        .collect();
    assert!(noisy.is_empty(), "a normal start-up logged lines an operator must read:\n{}", noisy.join("\n"));
    net.peers[server].assert_healthy();
}
