//! Support for the hardening tests (`faults.rs`, `hostile.rs`, `anonymity.rs`, `netns.rs`):
//!
//! * [`P`]/[`Net`]: `anomos` processes (tracker and peers) that can be killed, stopped (SIGSTOP), continued
//!   and restarted with the same key and port, optionally inside a network namespace;
//! * log helpers that strip colours and read each line's timestamp;
//! * [`Proxy`]: a loopback TCP proxy that records every byte it forwards (a link or tracker observer);
//! * [`RawPeer`]/[`RawLink`]: a neighbor built from `anomos-proto` alone, which announces to the tracker and
//!   completes link handshakes, and then sends whatever the test wants — including what no correct peer sends;
//! * tracking codes built by the test itself.
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

// ---------------------------------------------------------------------------------------------------------
// A recording TCP proxy
// ---------------------------------------------------------------------------------------------------------

/// One recorded byte stream (a connection in one direction).
type Recording = Arc<Mutex<Vec<u8>>>;

/// Forwards connections from `addr` to a target and records every byte, per connection and direction.
pub struct Proxy {
    pub addr: SocketAddr,
    streams: Arc<Mutex<Vec<Recording>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy on a free loopback port toward `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let streams: Arc<Mutex<Vec<Recording>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (streams.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(a) = conn else { continue };
                let Ok(b) = std::net::TcpStream::connect(target) else { continue };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    let rec = Arc::new(Mutex::new(Vec::new()));
                    st.lock().unwrap().push(rec.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Proxy { addr, streams, stop }
    }

    /// Everything recorded so far, one byte string per connection and direction.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.streams.lock().unwrap().iter().map(|s| s.lock().unwrap().clone()).collect()
    }

    /// Total bytes recorded.
    pub fn total(&self) -> usize {
        self.recorded().iter().map(Vec::len).sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------------------
// A raw peer: the protocol from anomos-proto, driven by the test
// ---------------------------------------------------------------------------------------------------------

/// One neighbor as the tracker described it.
#[derive(Clone)]
pub struct Nb {
    pub key: PublicKey,
    pub nid: NeighborId,
    pub addr: SocketAddr,
}

type Table = Arc<Mutex<HashMap<Fingerprint, Nb>>>;

/// A peer of the overlay made of protocol pieces: it answers probes, announces, and completes link
/// handshakes; everything after that is up to the test.
pub struct RawPeer {
    pub id: Arc<Identity>,
    pub addr: SocketAddr,
    tracker: SocketAddr,
    tracker_key: PublicKey,
    table: Table,
    incoming: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<RawLink>>,
}

impl RawPeer {
    /// A new identity listening on a free loopback port (not yet announced).
    pub async fn start(tracker: SocketAddr, tracker_fp: &Fingerprint) -> Arc<RawPeer> {
        Self::start_below(tracker, tracker_fp, &[]).await
    }

    /// Like [`start`](Self::start), with a fingerprint smaller than all of `others`: we dial them (SPEC §5.2),
    /// they never dial us, so the only links between us are the ones the test makes.
    pub async fn start_below(tracker: SocketAddr, tracker_fp: &Fingerprint, others: &[Fingerprint]) -> Arc<RawPeer> {
        let min = others.iter().min().copied();
        // Peers started after `Net::preset_high_key` leave at least a quarter of the space below them.
        const TRIES: usize = 200;
        let id = tokio::task::spawn_blocking(move || {
            (0..TRIES)
                .map(|_| Identity::generate(&mut rand::rngs::OsRng, 2048).unwrap())
                .find(|id| min.is_none_or(|m| id.fingerprint() < m))
        })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no fingerprint below {min:?} in {TRIES} keys: preset the peers' keys high"));
        let id = Arc::new(id);
        let tracker_key = anomos::tracker_client::fetch_tracker_key(tracker, tracker_fp).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table: Table = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (id2, table2) = (id.clone(), table.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                let (id, table, tx) = (id2.clone(), table2.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(Some(link)) = raw_accept(s, &id, &table).await {
                        let _ = tx.send(link);
                    }
                });
            }
        });
        Arc::new(RawPeer { id, addr, tracker, tracker_key, table, incoming: tokio::sync::Mutex::new(rx) })
    }

    /// Our fingerprint.
    pub fn fp(&self) -> Fingerprint {
        self.id.fingerprint()
    }

    /// Announces (the tracker probes us) and takes the reply as our neighbor table.
    pub async fn announce(&self) -> Vec<NeighborInfo> {
        let mut s =
            anomos::tracker_client::TrackerSession::connect(self.tracker, &self.tracker_key, &self.id).await.unwrap();
        let reply = s
            .request(&ToTracker::Announce(Announce { listen: self.addr, chains: Vec::new(), family: Vec::new() }))
            .await
            .unwrap();
        let FromTracker::Announced(a) = reply else { panic!("announce: {reply:?}") };
        let mut t = self.table.lock().unwrap();
        t.clear();
        for n in &a.neighbors {
            let key = PublicKey::from_der(&n.public_key).unwrap();
            t.insert(key.fingerprint(), Nb { key, nid: n.id, addr: n.addr });
        }
        a.neighbors
    }

    /// Keeps announcing every `every` (so the tracker keeps us and our edges).
    pub fn keep_announcing(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let m = me.clone();
                // A failed announce (tracker busy) is retried next time.
                let _ = tokio::spawn(async move { m.announce().await }).await;
            }
        })
    }

    /// Announces until `fp` is our neighbor (or panics after 30 s).
    pub async fn wait_neighbor(&self, fp: &Fingerprint) -> Nb {
        for _ in 0..60 {
            self.announce().await;
            if let Some(n) = self.neighbor(fp) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{} never became our neighbor", fp.short())
    }

    /// A neighbor from the last announce.
    pub fn neighbor(&self, fp: &Fingerprint) -> Option<Nb> {
        self.table.lock().unwrap().get(fp).cloned()
    }

    /// A link to neighbor `fp`: dialed if our fingerprint is the smaller one, else accepted when it dials us.
    pub async fn link(&self, fp: &Fingerprint) -> RawLink {
        let n = self.wait_neighbor(fp).await;
        if self.fp() < *fp {
            for _ in 0..40 {
                match self.dial(n.addr, n.key.clone(), n.nid).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
            panic!("could not link to {}", fp.short());
        }
        let mut rx = self.incoming.lock().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(l)) if l.peer == *fp => return l,
                Ok(Some(_)) => continue,
                _ => panic!("{} never dialed us", fp.short()),
            }
        }
    }

    /// Dials `addr` for a link over edge `nid` to the key `key` (any nid: a wrong one fails key confirmation).
    pub async fn dial(&self, addr: SocketAddr, key: PublicKey, nid: NeighborId) -> Result<RawLink, String> {
        self.dial_recording(addr, key, nid).await.map(|(l, _, _)| l)
    }

    /// [`dial`](Self::dial), also returning the HELLO and AUTH we sent (to replay them).
    pub async fn dial_recording(
        &self,
        addr: SocketAddr,
        key: PublicKey,
        nid: NeighborId,
    ) -> Result<(RawLink, Vec<u8>, Vec<u8>), String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.set_nodelay(true).unwrap();
        let peer = key.fingerprint();
        let (d, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
        write(&mut s, &hello).await?;
        let mut reply = [0u8; HELLO_LEN];
        read(&mut s, &mut reply).await?;
        let id = self.id.clone();
        let (d, auth) = tokio::task::spawn_blocking(move || d.on_reply(&reply, &id, &mut rand::rngs::OsRng))
            .await
            .unwrap()
            .map_err(|e| e.to_string())?;
        write(&mut s, &auth).await?;
        let msg = read_auth(&mut s).await?;
        let cipher = d.on_auth_reply(&msg).map_err(|e| e.to_string())?;
        Ok((RawLink::up(s, cipher, peer).await?, hello.to_vec(), auth))
    }

    /// Starts a handshake by hand: connects, sends HELLO, reads REPLY; returns the stream and what is needed
    /// to build AUTH.
    pub async fn hello(
        &self,
        addr: SocketAddr,
        key: PublicKey,
        nid: NeighborId,
    ) -> (tokio::net::TcpStream, Dialer, [u8; HELLO_LEN]) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (d, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
        write(&mut s, &hello).await.unwrap();
        let mut reply = [0u8; HELLO_LEN];
        read(&mut s, &mut reply).await.unwrap();
        (s, d, reply)
    }
}

async fn write(s: &mut tokio::net::TcpStream, b: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    s.write_all(b).await.map_err(|e| e.to_string())
}

async fn read(s: &mut tokio::net::TcpStream, b: &mut [u8]) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(b))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn read_auth(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, String> {
    let mut p = [0u8; 2];
    read(s, &mut p).await?;
    let len = plink::auth_frame_len(p).map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; 2 + len];
    msg[..2].copy_from_slice(&p);
    read(s, &mut msg[2..]).await?;
    Ok(msg)
}

async fn raw_accept(
    mut s: tokio::net::TcpStream,
    id: &Arc<Identity>,
    table: &Table,
) -> Result<Option<RawLink>, String> {
    let mut magic = [0u8; 8];
    read(&mut s, &mut magic).await?;
    if magic == plink::PROBE_MAGIC {
        let mut body = [0u8; 34];
        read(&mut s, &mut body).await?;
        let nonce = plink::decode_probe_body(&body).map_err(|e| e.to_string())?;
        let answer = plink::answer_probe(id, &nonce, &mut rand::rngs::OsRng);
        write(&mut s, &answer).await?;
        return Ok(None);
    }
    if magic != plink::LINK_MAGIC {
        return Ok(None);
    }
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(&magic);
    read(&mut s, &mut hello[8..]).await?;
    let (acc, reply) = Acceptor::start(&mut rand::rngs::OsRng, &hello).map_err(|e| e.to_string())?;
    write(&mut s, &reply).await?;
    let auth = read_auth(&mut s).await?;
    let (id, table) = (id.clone(), table.clone());
    let out = tokio::task::spawn_blocking(move || {
        acc.on_auth(
            &auth,
            &id,
            &mut rand::rngs::OsRng,
            |fp| table.lock().unwrap().get(fp).map(|n| (n.key.clone(), n.nid)),
            |_| false,
        )
    })
    .await
    .unwrap()
    .map_err(|e| e.to_string())?;
    write(&mut s, &out.reply).await?;
    let cipher = out.result.map_err(|e| e.to_string())?;
    let peer = cipher.peer;
    RawLink::up(s, cipher, peer).await.map(Some)
}

/// An established link, driven cell by cell by the test.
pub struct RawLink {
    pub stream: tokio::net::TcpStream,
    sealer: CellSealer,
    opener: CellOpener,
    pub dialer: bool,
    pub nid: NeighborId,
    pub peer: Fingerprint,
    next_id: u32,
    /// The window the neighbor announced in its first cell.
    pub peer_window: u16,
}

impl RawLink {
    async fn up(s: tokio::net::TcpStream, cipher: LinkCipher, peer: Fingerprint) -> Result<RawLink, String> {
        let (dialer, nid) = (cipher.dialer, cipher.nid);
        let (sealer, opener) = cipher.split();
        let mut l = RawLink { stream: s, sealer, opener, dialer, nid, peer, next_id: 1, peer_window: 0 };
        l.send(&Cell::link_params(128)).await?;
        let first = l.recv(Duration::from_secs(10)).await.ok_or("no key-confirmation cell")?;
        l.peer_window = first.link_params_window().map_err(|e| e.to_string())?;
        Ok(l)
    }

    /// Seals a cell (advancing our counter) and returns the bytes to write.
    pub fn seal(&mut self, cell: &Cell) -> Vec<u8> {
        let mut buf = vec![0u8; SEALED_CELL_LEN];
        let plain: &mut [u8; CELL_LEN] = (&mut buf[..CELL_LEN]).try_into().unwrap();
        cell.encode_into(plain);
        self.sealer.seal_in_place(&mut buf).unwrap();
        buf
    }

    /// Sends one cell.
    pub async fn send(&mut self, cell: &Cell) -> Result<(), String> {
        let b = self.seal(cell);
        self.send_raw(&b).await
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, b: &[u8]) -> Result<(), String> {
        write(&mut self.stream, b).await
    }

    /// The next cell other than PADDING, or `None` on close, error or timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Cell> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut buf = vec![0u8; SEALED_CELL_LEN];
            tokio::time::timeout_at(deadline, self.stream.read_exact(&mut buf)).await.ok()?.ok()?;
            self.opener.open_in_place(&mut buf).ok()?;
            let cell = Cell::decode(&buf[..CELL_LEN]).ok()?;
            if cell.command != anomos_proto::cell::Command::Padding || cell.link_params_window().is_ok() {
                return Some(cell);
            }
        }
    }

    /// The next cell on circuit `id` (skipping others and SENDMEs unless `sendme`).
    pub async fn recv_on(&mut self, id: CircId, timeout: Duration) -> Option<Cell> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let c = self.recv(left).await?;
            if c.circ_id == id && c.command != anomos_proto::cell::Command::Sendme {
                return Some(c);
            }
        }
    }

    /// Whether the other side closes the connection within `timeout` (everything read meanwhile is dropped).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// A fresh circuit id from our half.
    pub fn alloc_id(&mut self) -> CircId {
        let n = self.next_id;
        self.next_id += 1;
        if self.dialer {
            n | DIALER_CIRC_BIT
        } else {
            n
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tracking codes built by the test
// ---------------------------------------------------------------------------------------------------------

/// Secrets of a circuit the test built.
pub struct Built {
    pub tc: Box<[u8; TC_LEN]>,
    pub hop_secrets: Vec<Secret>,
    pub e2e: Secret,
    pub tags: Vec<[u8; 16]>,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

/// Builds a TC for hops `(key, prev edge)`: all but the last relay to the next hop's `prev`; the last is the
/// target serving `chain`. `expires` is unix seconds.
pub fn build_tc(hops: &[(PublicKey, NeighborId)], chain: &str, expires: u64) -> Built {
    let e2e = Secret(random());
    let mut specs = Vec::new();
    let mut hop_secrets = Vec::new();
    let mut tags = Vec::new();
    for (i, (key, prev)) in hops.iter().enumerate() {
        let hop_secret = Secret(random());
        let tag = random();
        let kind = match hops.get(i + 1) {
            Some((_, next)) => LayerKind::Relay { next: *next },
            None => {
                LayerKind::Target { chain: ChainId::new(chain).unwrap(), session: random(), e2e_secret: e2e.clone() }
            }
        };
        hop_secrets.push(hop_secret.clone());
        tags.push(tag);
        specs.push(HopSpec {
            key: key.clone(),
            layer: Layer { prev: *prev, kind, hop_secret, expires, replay_tag: tag },
        });
    }
    let tc = tc::build(&specs, &mut rand::rngs::OsRng).unwrap();
    Built { tc, hop_secrets, e2e, tags }
}

/// A grant for [`anomos::Node::open_circuit`] from a TC the test built (`first_hop`: the requester's edge).
pub fn grant(b: &Built, first_hop: NeighborId, expires: u64) -> anomos_proto::tracker::CircuitGrant {
    anomos_proto::tracker::CircuitGrant {
        circuit: u64::from_be_bytes(random()),
        first_hop,
        tc: b.tc.to_vec(),
        hop_secrets: b.hop_secrets.iter().map(|s| s.0).collect(),
        e2e_secret: b.e2e.0,
        session: random(),
        expires,
    }
}

/// Every 16-byte window of `b`, for "does any of these appear" searches.
pub fn windows16(b: &[u8]) -> std::collections::HashSet<[u8; 16]> {
    b.windows(16).map(|w| w.try_into().unwrap()).collect()
}

/// Whether any 16-byte window of `hay` is in `set`.
pub fn any_window(hay: &[u8], set: &std::collections::HashSet<[u8; 16]>) -> bool {
    hay.windows(16).any(|w| set.contains(<&[u8; 16]>::try_from(w).unwrap()))
}

// ---------------------------------------------------------------------------------------------------------
// In-process peers and Bitcoin over circuits
// ---------------------------------------------------------------------------------------------------------

/// An in-process peer of `net` (serving `chain` with `service`, if given), in `dir`.
pub async fn node_in(
    net: &Net,
    dir: &Path,
    service: Option<(&str, Arc<dyn anomos::Service>)>,
    tweak: impl FnOnce(&mut anomos::PeerConfig),
) -> Arc<anomos::Node> {
    let mut cfg = anomos::PeerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        net.tracker_addr(),
        net.tracker.fingerprint.clone(),
        dir.to_path_buf(),
    );
    let service = service.map(|(chain, s)| {
        cfg.serve = vec![ChainId::new(chain).unwrap()];
        s
    });
    tweak(&mut cfg);
    let id = tokio::task::spawn_blocking(|| Identity::generate(&mut rand::rngs::OsRng, 2048)).await.unwrap().unwrap();
    let key = anomos::tracker_client::fetch_tracker_key(cfg.tracker, &net.tracker_fp()).await.unwrap();
    let (node, l) = anomos::Node::bind(cfg, id, key, service).await.unwrap();
    node.start(l);
    node
}

/// Opens one circuit to a peer serving `chain` through `relays` relays (retrying up to 60 s).
pub async fn circuit(node: &Arc<anomos::Node>, chain: &str, relays: u8) -> anomos::CircuitStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if node.link_count() > 0 {
            let req = anomos_proto::tracker::CircuitRequest { chain: ChainId::new(chain).unwrap(), count: 1, relays };
            if let Ok(mut v) = node.request_circuits(req).await {
                if let Some(s) = v.pop() {
                    return s;
                }
            }
        }
        assert!(Instant::now() < deadline, "no circuit to {chain} opened");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The regtest network magic.
pub fn regtest_magic() -> [u8; 4] {
    anomos_proto::btc::NetParams::regtest().magic
}

/// A `version` message revealing nothing.
pub fn btc_version() -> anomos_proto::btc::Message {
    use anomos_proto::btc::{Address, ServiceFlags, VersionMessage};
    let none = Address::new(&SocketAddr::from(([0u16; 8], 0)), ServiceFlags::NONE);
    let mut v = VersionMessage::new(
        ServiceFlags::NONE,
        (unix_secs() - unix_secs() % 60) as i64,
        none.clone(),
        none,
        rand::random(),
        "/anomos:0.1.0/".into(),
        0,
    );
    v.version = 70016;
    v.relay = false;
    anomos_proto::btc::Message::Version(v)
}

/// Waits for a message satisfying `pred` (up to 20 s); false if the circuit ends first.
pub async fn btc_until(
    s: &mut anomos::CircuitStream,
    pred: impl Fn(&anomos_proto::btc::Message) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, s.recv()).await.map_err(|_| "timeout".to_string())?;
        let m = m.map_err(|e| e.to_string())?;
        if let Ok(Some((msg, _))) = anomos_proto::btc::decode_message(&m, regtest_magic()) {
            if pred(&msg) {
                return Ok(());
            }
        }
    }
}

/// The Bitcoin handshake over a circuit to a serving peer.
pub async fn btc_handshake(s: &mut anomos::CircuitStream) -> Result<(), String> {
    use anomos_proto::btc::{encode_message, Message};
    s.send(encode_message(regtest_magic(), &btc_version())).await.map_err(|e| e.to_string())?;
    btc_until(s, |m| matches!(m, Message::Verack)).await?;
    s.send(encode_message(regtest_magic(), &Message::Verack)).await.map_err(|e| e.to_string())
}

/// One ping/pong over a circuit.
pub async fn btc_ping(s: &mut anomos::CircuitStream) -> Result<(), String> {
    use anomos_proto::btc::{encode_message, Message};
    let n: u64 = rand::random();
    s.send(encode_message(regtest_magic(), &Message::Ping(n))).await.map_err(|e| e.to_string())?;
    btc_until(s, |m| matches!(m, Message::Pong(x) if *x == n)).await
}

/// Pings over a circuit in the background, counting answers; stops at the first failure.
pub struct Pinger {
    pub ok: Arc<std::sync::atomic::AtomicUsize>,
    pub failed: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Pinger {
    /// Starts pinging every 100 ms over `s` (handshake first).
    pub fn start(mut s: anomos::CircuitStream) -> Pinger {
        let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(None));
        let (ok2, failed2) = (ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = btc_handshake(&mut s).await {
                *failed2.lock().unwrap() = Some(format!("handshake: {e}"));
                return;
            }
            loop {
                match btc_ping(&mut s).await {
                    Ok(()) => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *failed2.lock().unwrap() = Some(e);
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Pinger { ok, failed, task }
    }

    /// Asserts the circuit is still carrying pings (three more within 10 s).
    pub async fn assert_moving(&self, when: &str) {
        let start = self.ok.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::Relaxed) < start + 3 {
            if let Some(e) = self.failed.lock().unwrap().clone() {
                panic!("the bystander circuit failed ({when}): {e}");
            }
            assert!(Instant::now() < deadline, "the bystander circuit stalled ({when})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.task.abort();
    }
}
