//! The overlay as real processes on 127.0.0.1: a tracker, relay peers and serving peers, each an `anomos`
//! process; the requester is `anomos fetch`. (Faults — relays, servers and the tracker killed mid-sync —
//! are in `tests/faults.rs`.)
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Overlay;

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
    // Every circuit (fetch may use several) has 3 hops.
    let hops = out.split("hops=[").nth(1).and_then(|r| r.split(']').next()).expect("hops in the summary");
    assert!(!hops.is_empty() && hops.split(", ").all(|h| h == "3"), "{out}");

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
