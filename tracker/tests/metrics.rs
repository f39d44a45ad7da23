//! The `anomos-tracker` binary's operator surface: `--metrics` serves a valid Prometheus exposition whose
//! counters move with real requests, a non-loopback metrics address is refused without
//! `--metrics-allow-remote`, and SIGTERM stops the tracker with status 0.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anomos_proto::tracker::KEY_FETCH_MAGIC;

struct Tracker {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Tracker {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_anomos-tracker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", dir.path().join("t").to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("log")).unwrap()))
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Tracker { child, lines, _dir: dir }
}

fn line_with(t: &Tracker, pat: &str) -> String {
    loop {
        let l = t.lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no line with {pat}"));
        if l.contains(pat) {
            return l;
        }
    }
}

fn field(line: &str, k: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}=")[..]).map(str::to_string)).unwrap()
}

fn scrape(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (h, b) = out.split_once("\r\n\r\n").unwrap();
    (h.to_string(), b.to_string())
}

/// Every line is HELP/TYPE or a sample of a declared family; returns the samples.
fn samples(body: &str) -> Vec<(String, f64)> {
    let mut declared = std::collections::HashSet::new();
    let mut out = Vec::new();
    for l in body.lines() {
        if let Some(r) = l.strip_prefix("# HELP ").or_else(|| l.strip_prefix("# TYPE ")) {
            let (name, rest) = r.split_once(' ').unwrap();
            assert!(!rest.is_empty(), "{l}");
            if l.starts_with("# TYPE") {
                assert!(rest == "counter" || rest == "gauge" || rest == "histogram", "{l}");
                declared.insert(name.to_string());
            }
            continue;
        }
        let (series, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
        let name = series.split('{').next().unwrap();
        // A histogram's samples are its family's name with `_bucket`, `_sum` or `_count`.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
            .unwrap_or(name);
        assert!(declared.contains(family), "sample of an undeclared family: {l}");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{l}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}') && labels.contains("=\""), "{l}");
            }
        }
        out.push((series.to_string(), v.parse().unwrap_or_else(|_| panic!("bad value in {l}"))));
    }
    out
}

fn value(s: &[(String, f64)], series: &str) -> f64 {
    s.iter().find(|(k, _)| k == series).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {series} in {s:?}"))
}

#[test]
fn metrics_move_with_requests_and_sigterm_exits_zero() {
    let mut t = start(&["--metrics", "127.0.0.1:0"]);
    let ready = line_with(&t, " ready ");
    let listen = field(&ready, "listen");
    let metrics = field(&line_with(&t, "metrics listen="), "listen");

    let (head, body) = scrape(&metrics, "/metrics");
    // An HTTP/1.0 request gets an HTTP/1.0 answer; header names are case-insensitive (hyper writes lower case).
    assert!(head.starts_with("HTTP/1.0 200") && head.to_ascii_lowercase().contains("version=0.0.4"), "{head}");
    let s0 = samples(&body);
    assert_eq!(value(&s0, "anomos_tracker_key_fetches_total"), 0.0);
    assert_eq!(value(&s0, "anomos_tracker_peers"), 0.0);

    // Two key fetches and a garbage connection (a failed handshake).
    for _ in 0..2 {
        let mut s = TcpStream::connect(&listen).unwrap();
        s.write_all(&KEY_FETCH_MAGIC).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert!(!buf.is_empty());
    }
    {
        let mut s = TcpStream::connect(&listen).unwrap();
        s.write_all(&[0xff; 12]).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s1 = samples(&scrape(&metrics, "/metrics").1);
        let fetches = value(&s1, "anomos_tracker_key_fetches_total");
        let refused = value(&s1, "anomos_tracker_refused_total{reason=\"handshake\"}");
        if fetches == 2.0 && refused >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "counters did not move: fetches {fetches}, refused {refused}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(scrape(&metrics, "/other").0.starts_with("HTTP/1.0 404"));

    Command::new("kill").args(["-TERM", &t.child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = t.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "tracker did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_non_loopback_metrics_address_needs_the_flag() {
    let mut t = start(&["--metrics", "0.0.0.0:0"]);
    let st = t.child.wait().unwrap();
    assert!(!st.success(), "started with public metrics and no --metrics-allow-remote");
    let mut t = start(&["--metrics", "0.0.0.0:0", "--metrics-allow-remote"]);
    let _ = line_with(&t, " ready ");
    let addr = field(&line_with(&t, "metrics listen="), "listen");
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    let _ = t.child.kill();
}
