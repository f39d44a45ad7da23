//! The overlay as real processes on 127.0.0.1: a tracker, relay peers and serving peers, each an `anomos`
//! process; the requester is `anomos fetch`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{spawn, unix_ms, Overlay};

/// Parses a `--cell-trace` file: (circuit, direction, payload in, payload out) per relayed cell.
fn trace(path: &std::path::Path) -> Vec<(String, String, Vec<u8>, Vec<u8>)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let (c, d, a, b) = (it.next()?, it.next()?, it.next()?, it.next()?);
            Some((c.to_string(), d.to_string(), hex::decode(a).ok()?, hex::decode(b).ok()?))
        })
        .collect()
}

#[test]
fn fetch_500_blocks_over_three_hop_circuits_and_relays_never_forward_what_they_receive() {
    let mut o = Overlay::new();
    let traces: Vec<_> = (0..6).map(|i| o.dir.path().join(format!("relay{i}.trace"))).collect();
    for (i, t) in traces.iter().enumerate() {
        o.add_peer(&format!("relay{i}"), &["--cell-trace", t.to_str().unwrap()]);
    }
    o.add_peer("server", &["--serve", "regtest", "--mine", "500"]);
    let t = Instant::now();
    let (ok, out, log) = o.fetch("requester", &["--chain", "regtest", "--relays", "2"], Duration::from_secs(180));
    assert!(ok, "fetch failed:\n{out}\n{log}");
    eprintln!(
        "fetch took {:.2}s: {}",
        t.elapsed().as_secs_f64(),
        out.lines().find(|l| l.starts_with("fetched")).unwrap_or("")
    );
    assert!(out.contains("headers=500 blocks=500"), "{out}");
    assert!(out.contains("height=500"), "{out}");
    assert!(out.contains("hops=[3]"), "{out}");

    // At the link of every relay on the path: no 16-byte window of a DATA payload it received appears in
    // any payload it sent (the per-hop onion layer changes every byte).
    let mut relays_on_path = 0;
    for path in &traces {
        let cells = trace(path);
        if cells.is_empty() {
            continue;
        }
        relays_on_path += 1;
        let mut received: HashSet<[u8; 16]> = HashSet::new();
        for (_, _, inp, _) in &cells {
            for w in inp.windows(16) {
                received.insert(w.try_into().unwrap());
            }
        }
        for (c, d, _, out) in &cells {
            for w in out.windows(16) {
                assert!(
                    !received.contains(w),
                    "relay {} forwarded received bytes on circuit {c} ({d})",
                    path.display()
                );
            }
        }
        assert!(cells.iter().any(|(_, d, _, _)| d == "fwd") && cells.iter().any(|(_, d, _, _)| d == "bwd"));
    }
    assert!(relays_on_path >= 2, "a 3-hop circuit crosses two relays; traces found on {relays_on_path}");
}

#[test]
fn killing_a_relay_mid_fetch_breaks_within_a_second_and_the_fetch_completes_on_fresh_circuits() {
    let mut o = Overlay::new();
    let traces: Vec<_> = (0..6).map(|i| o.dir.path().join(format!("relay{i}.trace"))).collect();
    for (i, t) in traces.iter().enumerate() {
        o.add_peer(&format!("relay{i}"), &["--cell-trace", t.to_str().unwrap()]);
    }
    o.add_peer("server", &["--serve", "regtest", "--mine", "1500", "--mine-txs", "10"]);
    let mut args: Vec<String> = vec!["fetch".into()];
    args.extend(o.peer_args("requester"));
    args.extend(["--chain", "regtest", "--relays", "2", "--timeout", "240"].map(String::from));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let fetch = spawn("requester", &a, o.dir.path());

    // Wait until blocks are flowing, then kill a relay that carries the circuit.
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        let Ok(line) = fetch.stdout.recv_timeout(Duration::from_secs(30)) else { break };
        lines.push(line.clone());
        if killed_at.is_none() && line.starts_with("progress blocks=") {
            let on_path: Vec<usize> =
                (0..6).filter(|&i| std::fs::metadata(&traces[i]).map(|m| m.len() > 0).unwrap_or(false)).collect();
            let victim = *on_path.first().expect("a relay on the path");
            o.peers[victim].kill();
            killed_at = Some(unix_ms());
            eprintln!("killed relay{victim} at {}", killed_at.unwrap());
        }
        if line.starts_with("event circuit-failed") {
            let at: u128 = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("unix_ms="))
                .and_then(|v| v.parse().ok())
                .expect("timestamp");
            let killed = killed_at.expect("a failure only after the kill");
            eprintln!("requester saw the break {} ms after the kill: {line}", at.saturating_sub(killed));
            assert!(at.saturating_sub(killed) < 1000, "break noticed after {} ms", at - killed);
        }
        if line.starts_with("fetched") {
            break;
        }
    }
    assert!(killed_at.is_some(), "never saw blocks flowing: {lines:?}\n{}", fetch.log_text());
    assert!(lines.iter().any(|l| l.starts_with("event circuit-failed")), "no break seen: {lines:?}");
    let done = lines
        .iter()
        .find(|l| l.starts_with("fetched"))
        .unwrap_or_else(|| panic!("fetch did not finish: {lines:?}\n{}", fetch.log_text()));
    assert!(done.contains("blocks=1500") && done.contains("height=1500"), "{done}");
}
