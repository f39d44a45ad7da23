//! The Grafana dashboard (docs/grafana/anomos.json) charts only metrics the processes export, and every metric
//! they export: each PromQL expression of its panels and template variables is checked against the metric
//! families of a real scrape of a tracker and of a peer serving a chain (so the chain metrics exist too).
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use harden::*;

fn dashboard() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/anomos.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Every PromQL expression of the dashboard: panel targets' `expr` (rows' nested panels too) and the queries of
/// template variables, each with where it is.
fn queries(d: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(ps: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in ps.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
                out.push((format!("panel {title:?}"), expr.to_string()));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).expect("variable query");
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

/// The metric names a PromQL expression refers to: its identifiers that start with `anomos_` (label names and
/// functions never do). Label matchers' quoted values are skipped.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            // A quoted label value: skip to its closing quote (with escapes).
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, c)) = chars.peek() {
                if !(c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                    break;
                }
                end = j + c.len_utf8();
                chars.next();
            }
            let word = &expr[i..end];
            if word.starts_with("anomos_") {
                names.push(word.to_string());
            }
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(r#"sum by (reason) (rate(anomos_a_total{instance=~"anomos_x", r!="\"anomos_y"}[5m])) / anomos_b"#),
        ["anomos_a_total", "anomos_b"]
    );
    assert_eq!(metric_names("label_values(anomos_peer_links, instance)"), ["anomos_peer_links"]);
}

/// The metric families (sample names) of the `/metrics` exposition at `addr`.
fn families(addr: &str) -> BTreeSet<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {out:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

fn metrics_addr(p: &mut P) -> String {
    let l = p
        .lines_until(Duration::from_secs(10), |l| l.contains(" metrics listen="))
        .unwrap_or_else(|| panic!("{} printed no metrics line: {:?}", p.name, p.seen));
    field(&l, "listen").unwrap().to_string()
}

#[test]
fn every_dashboard_query_names_an_exported_metric_and_every_metric_is_charted() {
    let _serial = serial();
    let mut net = Net::new(&["--metrics", "127.0.0.1:0"]);
    let tracker = metrics_addr(&mut net.tracker);
    let server = net.add_peer("server", &["--serve", "regtest", "--mine", "3", "--metrics", "127.0.0.1:0"]);
    let peer = metrics_addr(&mut net.peers[server]);
    let (tracker, peer) = (families(&tracker), families(&peer));
    assert!(tracker.iter().all(|n| n.starts_with("anomos_tracker_")), "{tracker:?}");
    assert!(peer.contains("anomos_peer_chain_height"), "a serving peer exports its chain metrics: {peer:?}");
    let exported: BTreeSet<String> = tracker.union(&peer).cloned().collect();

    let qs = queries(&dashboard());
    assert!(qs.len() > 20, "the dashboard has {} queries", qs.len());
    let mut charted = BTreeSet::new();
    for (place, expr) in &qs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: {expr:?} names no anomos metric");
        for n in names {
            assert!(exported.contains(&n), "{place}: {expr:?} names {n}, which neither process exports");
            charted.insert(n);
        }
    }
    let missing: Vec<_> = exported.difference(&charted).collect();
    assert!(missing.is_empty(), "exported but on no dashboard panel: {missing:?}");
}
