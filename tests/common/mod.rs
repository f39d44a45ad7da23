//! Test harness: a tracker and peers as real `anomos` processes on 127.0.0.1, each with its own temporary
//! data dir and log file; killed when the harness is dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `anomos` binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_anomos")
}

/// A command running the binary under test without the developer's own settings (`ANOMOS_*`, `RUST_LOG`).
pub fn anomos() -> Command {
    let mut c = Command::new(exe());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ANOMOS_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c
}

/// A running process that printed its `ready` line.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub listen: String,
    pub fingerprint: String,
    pub log: PathBuf,
    /// Lines the process printed on stdout after its ready line.
    pub stdout: mpsc::Receiver<String>,
}

impl Proc {
    /// Resident set size in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `anomos <args>` with stdout piped and stderr (the log) to `log`.
fn start(args: &[&str], log: &Path) -> Child {
    Command::new(exe())
        .args(args)
        .env("RUST_LOG", std::env::var("ANOMOS_TEST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

/// Spawns `anomos <args>` and waits (up to 60 s) for its ready line.
pub fn spawn(name: &str, args: &[&str], dir: &Path) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let mut child = start(args, &log);
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
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.contains(" ready ") => break l,
            Ok(_) => continue,
            Err(_) => {
                panic!("{name} did not become ready; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    };
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_default().to_string();
    Proc { name: name.into(), child, listen: field("listen="), fingerprint: field("fingerprint="), log, stdout: rx }
}

/// A tracker plus peers.
pub struct Overlay {
    pub dir: tempfile::TempDir,
    pub tracker: Proc,
    pub peers: Vec<Proc>,
}

impl Overlay {
    /// Starts a tracker (short announce interval) and no peers.
    pub fn new() -> Overlay {
        let dir = tempfile::tempdir().unwrap();
        let tdir = dir.path().join("tracker");
        let tracker = spawn(
            "tracker",
            &[
                "tracker",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                tdir.to_str().unwrap(),
                "--allow-same-ip",
                "--interval",
                "2",
            ],
            dir.path(),
        );
        Overlay { dir, tracker, peers: Vec::new() }
    }

    /// Common peer flags for `name`.
    pub fn peer_args(&self, name: &str) -> Vec<String> {
        let d = self.dir.path().join(name);
        [
            "--listen",
            "127.0.0.1:0",
            "--tracker",
            &self.tracker.listen,
            "--tracker-fp",
            &self.tracker.fingerprint,
            "--data-dir",
            d.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts `anomos peer` with extra flags.
    pub fn add_peer(&mut self, name: &str, extra: &[&str]) -> usize {
        let mut args: Vec<String> = vec!["peer".into()];
        args.extend(self.peer_args(name));
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.peers.push(spawn(name, &a, self.dir.path()));
        self.peers.len() - 1
    }

    /// Runs `anomos fetch` with extra flags to completion; returns (success, stdout, log).
    pub fn fetch(&self, name: &str, extra: &[&str], timeout: Duration) -> (bool, String, String) {
        let mut args: Vec<String> = vec!["fetch".into()];
        args.extend(self.peer_args(name));
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(name, &a, self.dir.path(), timeout)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

/// Runs `anomos <args>` to completion (stderr to `<dir>/<name>.log`); returns (success, stdout, log).
pub fn run(name: &str, args: &[&str], dir: &Path, timeout: Duration) -> (bool, String, String) {
    let log = dir.join(format!("{name}.log"));
    let mut child = start(args, &log);
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = reader.join().unwrap_or_default();
    (status.is_some_and(|s| s.success()), stdout, std::fs::read_to_string(&log).unwrap_or_default())
}

/// Waits up to `timeout` for a stdout line of `p` that satisfies `pred`; every line seen is appended to
/// `seen`.
pub fn wait_line(p: &Proc, seen: &mut Vec<String>, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        match p.stdout.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if pred(&l) {
                    return Some(l);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => return None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// The value of `key=` in a `key=value …` line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("{key}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(k.as_str()))
}

impl Overlay {
    /// Starts `anomos fetch` with extra flags as a background process (it prints a ready line first).
    pub fn spawn_fetch(&self, name: &str, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec!["fetch".into()];
        args.extend(self.peer_args(name));
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(name, &a, self.dir.path())
    }

    /// Runs `anomos fetch` with extra flags to completion, listening on `listen` (e.g. the address of an earlier
    /// run with the same data dir, as a restarted peer with a fixed port would); returns (success, stdout, log).
    pub fn fetch_at(&self, name: &str, listen: &str, extra: &[&str], timeout: Duration) -> (bool, String, String) {
        let mut args: Vec<String> = vec!["fetch".into()];
        args.extend(self.peer_args(name).into_iter().map(|a| if a == "127.0.0.1:0" { listen.to_string() } else { a }));
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(name, &a, self.dir.path(), timeout)
    }

    /// Runs another `anomos` command that joins the overlay (`send-tx`) to completion.
    pub fn run_peer_cmd(&self, cmd: &str, name: &str, extra: &[&str], timeout: Duration) -> (bool, String, String) {
        let mut args: Vec<String> = vec![cmd.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.peer_args(name));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(name, &a, self.dir.path(), timeout)
    }

    /// The data directory of peer `name`.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
