//! Support for the hardening tests (`faults.rs`, `hostile.rs`, `anonymity.rs`, `netns.rs`):
//!
//! * [`P`]/[`Net`]: `anomos` processes (tracker and peers) that can be killed, stopped (SIGSTOP), continued
//!   and restarted with the same key and port, optionally inside a network namespace;
//! * log helpers that strip colours and read each line's timestamp;
//! * [`Proxy`] (`proxy.rs`): a loopback TCP proxy that records every byte it forwards (a link or tracker observer);
//! * [`RawPeer`]/[`RawLink`] (`raw.rs`): a neighbor built from `anomos-proto` alone, which announces to the tracker and
//!   completes link handshakes, and then sends whatever the test wants — including what no correct peer sends;
//! * tracking codes built by the test itself (`codes.rs`);
//! * in-process peers and Bitcoin messages over circuits (`inproc.rs`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::cell::{Cell, CircId, CELL_LEN, DIALER_CIRC_BIT, SEALED_CELL_LEN};
use anomos_proto::crypto::Secret;
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::link::{self as plink, Acceptor, CellOpener, CellSealer, Dialer, LinkCipher, HELLO_LEN};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, TC_LEN};
use anomos_proto::tracker::{Announce, FromTracker, NeighborInfo, ToTracker};

/// The `anomos` binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_anomos")
}

/// Process-heavy tests of one test binary run one at a time (their timing assertions need the CPU).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs an async test body on its own 2-worker runtime, one such test at a time (see [`serial`]).
pub fn serial_async<F: std::future::Future>(f: F) -> F::Output {
    let _serial = serial();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

/// Unix seconds.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

// ---------------------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------------------

/// A running `anomos` process that printed its ready line.
pub struct P {
    pub name: String,
    args: Vec<String>,
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    pub child: Child,
    pub listen: String,
    pub fingerprint: String,
    /// Log files, one per start (the current one last).
    pub logs: Vec<PathBuf>,
    /// Stdout lines after the ready line.
    pub stdout: mpsc::Receiver<String>,
    /// Every stdout line read so far through [`P::lines_until`].
    pub seen: Vec<String>,
}

fn start_process(
    name: &str,
    prefix: &[String],
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> (Child, mpsc::Receiver<String>, String) {
    let (program, rest): (String, Vec<String>) = match prefix.split_first() {
        Some((p, r)) => (p.clone(), r.iter().cloned().chain(std::iter::once(exe().to_string())).collect()),
        None => (exe().to_string(), Vec::new()),
    };
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .args(args)
        .env("RUST_LOG", std::env::var("ANOMOS_TEST_LOG").unwrap_or_else(|_| "info".into()))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = loop {
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(l) if l.contains(" ready ") => break l,
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                panic!("{name} did not become ready; log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
            }
        }
    };
    (child, rx, line)
}

fn ready_field(line: &str, k: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_default().to_string()
}

impl P {
    /// Starts `anomos <args>` (under `prefix`, e.g. `ip netns exec NS`) and waits for its ready line.
    pub fn start(name: &str, args: Vec<String>, dir: &Path, prefix: Vec<String>, env: Vec<(String, String)>) -> P {
        let log = dir.join(format!("{name}.log"));
        let (child, stdout, line) = start_process(name, &prefix, &args, &env, &log);
        P {
            name: name.into(),
            args,
            prefix,
            env,
            dir: dir.to_path_buf(),
            child,
            listen: ready_field(&line, "listen="),
            fingerprint: ready_field(&line, "fingerprint="),
            logs: vec![log],
            stdout,
            seen: Vec::new(),
        }
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.listen.parse().unwrap()
    }

    /// The fingerprint.
    pub fn fp(&self) -> Fingerprint {
        Fingerprint::from_hex(&self.fingerprint).unwrap()
    }

    /// First 8 hex digits of the fingerprint (what logs show).
    pub fn short(&self) -> String {
        self.fingerprint[..8].to_string()
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap().success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts the process again with the same arguments, key (data dir) and port; kills it first if needed.
    pub fn restart(&mut self) {
        let listen = self.listen.clone();
        self.restart_on(&listen);
    }

    /// Starts the process again with the same arguments and key (data dir), listening on `listen`.
    pub fn restart_on(&mut self, listen: &str) {
        self.kill();
        let mut args = self.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = listen.to_string();
        }
        let log = self.dir.join(format!("{}.{}.log", self.name, self.logs.len()));
        let (child, stdout, line) = start_process(&self.name, &self.prefix, &args, &self.env, &log);
        self.child = child;
        self.stdout = stdout;
        assert_eq!(ready_field(&line, "fingerprint="), self.fingerprint, "restarted with the same key");
        self.listen = ready_field(&line, "listen=");
        self.logs.push(log);
    }

    /// All logs of all starts, colours stripped.
    pub fn log_text(&self) -> String {
        self.logs.iter().map(|l| strip_ansi(&std::fs::read_to_string(l).unwrap_or_default())).collect()
    }

    /// The log of the current start.
    pub fn current_log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.logs.last().unwrap()).unwrap_or_default())
    }

    /// Resident set size in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Reads stdout lines (recording them in `seen`) until one satisfies `pred`, or `timeout`.
    pub fn lines_until(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.stdout.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until the current log has a line containing all of `pats` (polling), up to `timeout`.
    pub fn wait_log(&self, pats: &[&str], timeout: Duration) -> Option<LogLine> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = log_lines(&self.log_text()).into_iter().find(|l| pats.iter().all(|p| l.text.contains(p))) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log has a line at or after `after_ms` containing all of `pats`, up to `timeout`.
    pub fn wait_log_after(&self, after_ms: u128, pats: &[&str], timeout: Duration) -> Option<LogLine> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = first_after(&self.log_text(), after_ms, pats) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts the process is up and never panicked.
    pub fn assert_healthy(&mut self) {
        let log = self.log_text();
        assert!(self.alive(), "{} exited; log:\n{log}", self.name);
        assert!(!log.contains("panicked"), "{} panicked; log:\n{log}", self.name);
    }
}

impl Drop for P {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        let _ = Command::new("kill").arg("-CONT").arg(self.pid().to_string()).stderr(Stdio::null()).status();
        self.kill();
    }
}

/// A tracker and peers as processes on 127.0.0.1, each with its own data dir and log in a temporary dir.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub tracker: P,
    pub peers: Vec<P>,
    /// Extra flags for every peer.
    pub peer_flags: Vec<String>,
    /// Extra environment for every process started from now on (e.g. `RUST_LOG=debug`).
    pub env: Vec<(String, String)>,
    /// The tracker address peers are told (default: the tracker's own; e.g. a proxy in front of it).
    pub tracker_via: Option<String>,
}

impl Net {
    /// Starts a tracker (`--allow-same-ip --interval 2` plus `extra`).
    pub fn new(extra: &[&str]) -> Net {
        Self::new_with_env(extra, &[])
    }

    /// [`new`](Self::new) with extra environment for every process (the tracker included).
    pub fn new_with_env(extra: &[&str], env: &[(&str, &str)]) -> Net {
        Self::new_full(2, extra, env)
    }

    /// A tracker handing out an announce interval of `interval` seconds (the default is 30: a peer learns of an
    /// edge the tracker made after its last announce only that late, unless the overlay brings it in earlier).
    pub fn new_interval(interval: u32, extra: &[&str]) -> Net {
        Self::new_full(interval, extra, &[])
    }

    fn new_full(interval: u32, extra: &[&str], env: &[(&str, &str)]) -> Net {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let dir = tempfile::tempdir().unwrap();
        let tdir = dir.path().join("tracker");
        let mut args: Vec<String> =
            ["tracker", "--listen", "127.0.0.1:0", "--data-dir", tdir.to_str().unwrap()].map(String::from).to_vec();
        args.extend(["--allow-same-ip".to_string(), "--interval".to_string(), interval.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let tracker = P::start("tracker", args, dir.path(), Vec::new(), env.clone());
        Net { dir, tracker, peers: Vec::new(), peer_flags: Vec::new(), env, tracker_via: None }
    }

    /// The flags that join a peer called `name` to this overlay (listen, tracker, pin, data dir).
    pub fn join_args(&self, name: &str) -> Vec<String> {
        let d = self.dir.path().join(name);
        let mut v: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--tracker",
            self.tracker_via.as_deref().unwrap_or(&self.tracker.listen),
            "--tracker-fp",
            &self.tracker.fingerprint,
            "--data-dir",
            d.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        v.extend(self.peer_flags.iter().cloned());
        v
    }

    /// Gives `name` (not started yet) an identity key whose fingerprint starts with a byte of at least 0x40, so
    /// that [`RawPeer::start_below`] finds a smaller one in a few draws (about 4 at worst). Left to chance, one
    /// peer drew `002f0d41…` and the raw peer needed some 1,400 RSA key generations.
    pub fn preset_high_key(&self, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let id = loop {
            let id = Identity::generate(&mut rand::rngs::OsRng, 2048).unwrap();
            if id.fingerprint().0[0] >= 0x40 {
                break id;
            }
        };
        anomos_proto::identity::save_identity(&d.join("peer.key"), &id).unwrap();
    }

    /// Starts `anomos peer` called `name` with extra flags; returns its index in `peers`.
    pub fn add_peer(&mut self, name: &str, extra: &[&str]) -> usize {
        self.add_peer_at(name, "127.0.0.1:0", extra)
    }

    /// [`add_peer`](Self::add_peer) listening on `listen`.
    pub fn add_peer_at(&mut self, name: &str, listen: &str, extra: &[&str]) -> usize {
        let mut args = vec!["peer".to_string()];
        args.extend(self.join_args(name));
        args[2] = listen.to_string();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.peers.push(P::start(name, args, self.dir.path(), Vec::new(), self.env.clone()));
        self.peers.len() - 1
    }

    /// Starts `anomos fetch` called `name` with extra flags (not added to `peers`).
    pub fn spawn_fetch(&self, name: &str, extra: &[&str]) -> P {
        let mut args = vec!["fetch".to_string()];
        args.extend(self.join_args(name));
        args.extend(extra.iter().map(|s| s.to_string()));
        P::start(name, args, self.dir.path(), Vec::new(), self.env.clone())
    }

    /// The tracker's address.
    pub fn tracker_addr(&self) -> SocketAddr {
        self.tracker.addr()
    }

    /// The tracker's fingerprint.
    pub fn tracker_fp(&self) -> Fingerprint {
        self.tracker.fp()
    }

    /// A peer's identity, read from its key file (tests may do what no one else can).
    pub fn identity(&self, name: &str) -> Identity {
        anomos_proto::identity::load_identity(&self.dir.path().join(name).join("peer.key")).unwrap()
    }

    /// Waits until every peer's log shows at least `n` links up (counting all starts), up to `timeout`.
    pub fn wait_links(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.peers.iter().all(|p| p.current_log().matches("link up").count() >= n) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Every log of the overlay (tracker and peers), by process name.
    pub fn all_logs(&self) -> Vec<(String, String)> {
        let mut v = vec![("tracker".to_string(), self.tracker.log_text())];
        v.extend(self.peers.iter().map(|p| (p.name.clone(), p.log_text())));
        v
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Keep the logs of a failed test.
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("anomos-failed-{}-{}", std::process::id(), unix_ms()));
            let _ = std::fs::create_dir_all(&keep);
            for e in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "log" || x == "trace") {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
            eprintln!("logs kept in {}", keep.display());
        }
    }
}

/// Runs a fetch to completion: the `fetched …` summary line, or a panic with its output.
pub fn finish_fetch(f: &mut P, timeout: Duration) -> String {
    match f.lines_until(timeout, |l| l.starts_with("fetched")) {
        Some(l) => l,
        None => panic!("fetch did not finish: {:?}\n{}", f.seen, f.log_text()),
    }
}

/// The value of `key=` in a `key=value …` line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("{key}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(k.as_str()))
}

/// Asserts a `fetched` line reports the whole chain of `n` blocks.
pub fn assert_full_chain(line: &str, n: u32) {
    assert_eq!(field(line, "height"), Some(n.to_string().as_str()), "{line}");
    assert_eq!(field(line, "blocks"), Some(n.to_string().as_str()), "{line}");
    assert_eq!(field(line, "headers"), Some(n.to_string().as_str()), "{line}");
}

// ---------------------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------------------

/// Removes ANSI colour sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One log line and its timestamp.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Unix milliseconds (0 if the line has no timestamp).
    pub ms: u128,
    pub text: String,
}

/// Parses `YYYY-MM-DDTHH:MM:SS.ffffffZ` into Unix milliseconds.
pub fn ts_ms(ts: &str) -> Option<u128> {
    let b = ts.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r).and_then(|x| x.parse::<i64>().ok());
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = ts[19..].trim_start_matches('.').trim_end_matches('Z');
    let ms_frac: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000 + ms_frac) as u128)
}

/// Splits a log into lines with their timestamps.
pub fn log_lines(text: &str) -> Vec<LogLine> {
    strip_ansi(text)
        .lines()
        .map(|l| LogLine { ms: l.split_whitespace().next().and_then(ts_ms).unwrap_or(0), text: l.to_string() })
        .collect()
}

/// The first line at or after `after_ms` containing all of `pats`.
pub fn first_after(text: &str, after_ms: u128, pats: &[&str]) -> Option<LogLine> {
    log_lines(text).into_iter().find(|l| l.ms >= after_ms && pats.iter().all(|p| l.text.contains(p)))
}

mod codes;
mod inproc;
mod proxy;
mod raw;
// Each test crate uses some of these helpers, none all (as `dead_code` above).
#[allow(unused_imports)]
pub use {codes::*, inproc::*, proxy::*, raw::*};
