//! What the load generator records: latencies with the time they ended, counters, errors by kind, and the
//! tracker process' CPU time and memory from /proc.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of request: `(seconds since start when it ended, latency in ms)` of each success.
#[derive(Default)]
pub struct Series(Mutex<Vec<(f32, f32)>>);

impl Series {
    pub fn record(&self, start: Instant, took: Duration) {
        let at = start.elapsed().as_secs_f32();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((at, took.as_secs_f32() * 1000.0));
    }

    /// The latencies of the requests that ended within `[from, to)` seconds, sorted.
    pub fn window(&self, from: f32, to: f32) -> Vec<f32> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<f32> = all.iter().filter(|(at, _)| *at >= from && *at < to).map(|(_, ms)| *ms).collect();
        v.sort_by(f32::total_cmp);
        v
    }
}

/// The `p`-th percentile (0..=100) of sorted values, NaN when empty.
pub fn pct(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

/// Everything the peers and the circuit driver report.
#[derive(Default)]
pub struct Stats {
    /// Full session set-ups (connect, channel, Hello/Welcome, and the ticket request).
    pub sessions: Series,
    /// Session resumptions with a ticket (connect, ResumeHello, the tracker's answer).
    pub resumes: Series,
    /// Announce request → reply (the tracker's probe of our listener included).
    pub announces: Series,
    /// What the peer waited for one announce: session set-up when it needed one, plus the announce.
    pub announce_total: Series,
    /// First successful announce of each peer, measured from the start of the join phase.
    pub joins: Series,
    /// Circuit request → reply with at least one grant.
    pub grants: Series,
    /// Probes answered by the simulated peers.
    pub probes: Series,
    /// Failures by kind, with the time they happened.
    errors: Mutex<Vec<(f32, String)>>,
    /// The tracker's "busy, retry later" answers, by kind: `tracker:Full` (every probe slot busy, or no room) and
    /// a connection closed before the ServerHello (too many channel set-ups in progress, or every connection slot
    /// taken). The protocol defines both as shedding that the peer answers by backing off and retrying (SPEC §3.4,
    /// §3.9), so they are not errors; they are printed, and counted in the last line as `retries=`.
    retries: Mutex<Vec<(f32, String)>>,
    /// Events worth a count that are neither (a ticket the tracker no longer held, e.g. after its restart).
    notes: Mutex<Vec<(f32, String)>>,
}

impl Stats {
    pub fn error(&self, start: Instant, kind: impl Into<String>) {
        let at = start.elapsed().as_secs_f32();
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).push((at, kind.into()));
    }

    /// A failed request: a retry if the tracker shed it (see `retries`), else an error.
    pub fn failure(&self, start: Instant, kind: String) {
        let shed = kind.contains("tracker:Full") || kind.contains("shed:");
        let at = start.elapsed().as_secs_f32();
        let list = if shed { &self.retries } else { &self.errors };
        list.lock().unwrap_or_else(|e| e.into_inner()).push((at, kind));
    }

    pub fn note(&self, start: Instant, kind: impl Into<String>) {
        let at = start.elapsed().as_secs_f32();
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).push((at, kind.into()));
    }

    /// Errors by kind within `[from, to)` seconds.
    pub fn errors(&self, from: f32, to: f32) -> BTreeMap<String, u64> {
        count(&self.errors, from, to)
    }

    /// Retries (shed requests) by kind within `[from, to)` seconds.
    pub fn retries(&self, from: f32, to: f32) -> BTreeMap<String, u64> {
        count(&self.retries, from, to)
    }

    /// Notes by kind within `[from, to)` seconds.
    pub fn notes(&self, from: f32, to: f32) -> BTreeMap<String, u64> {
        count(&self.notes, from, to)
    }
}

fn count(list: &Mutex<Vec<(f32, String)>>, from: f32, to: f32) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (at, k) in list.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if *at >= from && *at < to {
            *m.entry(k.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// `kind=count,kind=count` or `0`.
pub fn fmt_errors(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "0".into();
    }
    m.iter().map(|(k, n)| format!("{k}:{n}")).collect::<Vec<_>>().join(",")
}

/// A process' user + system CPU time so far (`/proc/<pid>/stat` fields 14 and 15).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain numbers.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we run on).
fn clock_ticks() -> u64 {
    static T: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A process' resident memory in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
