//! `anomos bench`: the performance figures of issue 6, measured in one run on a local overlay (127.0.0.1).
//!
//! The relays whose CPU and memory are measured run as separate `anomos peer` processes (this executable),
//! started with a tracker process the same way `anomos demo` does; CPU comes from `/proc/<pid>/stat`
//! (utime + stime), memory from `/proc/<pid>/status` (VmRSS). The requester and the targets (a bulk
//! sender, a circuit holder, a chain server) are nodes inside this process. Each overlay has only the peers
//! it needs (so every relay on a path is a measured process; the tracker's degree makes the graph complete)
//! and runs on a tokio runtime of its own, shut down before the next overlay starts:
//!
//! * **overlay A**: tracker, 3 relay processes, requester, bulk target: single-circuit throughput over 1, 2
//!   and 3 relays (2, 3 and 4 onion layers), relay CPU per MB, circuit build latency.
//! * **overlay C**: tracker, 3 relay processes, requester, one chain target: chain sync over 4 circuits, next
//!   to the same chain code over 4 direct TCP connections (messages framed `len u32 BE || bytes` and pumped
//!   into [`CircuitStream::memory_pair`] streams).
//! * **overlay B** (a fresh one per run): tracker, 1 relay process, requester, a target that holds circuits:
//!   every circuit crosses that one relay: opens per second and RSS per idle circuit.
//!
//! Before the overlays, the same run measures raw loopback TCP, raw AES-256-GCM, AES-256-CTR and RSA-OAEP on
//! this machine; the crypto bound of each throughput figure is derived from them (docs/PERFORMANCE.md has the
//! formula). Every figure is measured `--runs` times (default 3; `--quick`: once, with smaller sizes) and
//! reported as median and spread (min–max) next to its target. Targets are reported, never asserted: the exit
//! status is 0 unless the bench itself failed.
//!
//! Results go to stdout (a table, or one JSON object with `--json`); progress goes to stderr. Use
//! `anomos --log-level warn bench` to keep this process's per-circuit log lines out of the way.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::btc::NetParams;
use anomos_proto::cell::{CELL_LEN, CELL_PAYLOAD_LEN};
use anomos_proto::circuit::{MAX_MESSAGE, RECORD_DATA_MAX};
use anomos_proto::crypto::{AeadCounter, CtrLayer, Secret};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind};
use anomos_proto::tracker::{CircuitGrant, CircuitRequest, FromTracker, ToTracker};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use super::procs::{spawn_ready, Proc, TempRoot};

mod wan;
use crate::chain::{self, ChainService, ChainStore, SyncOptions};
use crate::circuit::CircuitStream;
use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::node::{Node, Service};
use crate::tracker_client::{fetch_tracker_key, TrackerSession};

/// Flags of `anomos bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// CI smoke run: every figure once, with small sizes (under a minute even in a debug build).
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure (default 3; 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: Option<u32>,
    /// Only these figure groups (comma separated): raw, bulk, build, sync, opens, wan. `bulk` implies `raw`.
    /// `wan` (the overlay across an emulated WAN: root and wanemu needed, see docs/PERFORMANCE.md) is part of the
    /// full bench, and of a `--quick` one only when named.
    #[arg(long, value_delimiter = ',', value_parser = ["raw", "bulk", "build", "sync", "opens", "wan"])]
    pub only: Vec<String>,
    /// wanemu's `wan.sh` for the `wan` group (default: $ANOMOS_WANEMU, or ../shared/tools/wanemu/wan.sh).
    #[arg(long, value_name = "PATH")]
    pub wanemu: Option<PathBuf>,
    /// (Internal, for the `wan` group) serve raw TCP on ADDR and exit.
    #[arg(long, hide = true, value_name = "ADDR")]
    pub raw_serve: Option<String>,
    /// (Internal) bytes `--raw-serve` sends.
    #[arg(long, hide = true, default_value_t = 100_000_000)]
    pub raw_bytes: u64,
    /// (Internal, for the `wan` group) read raw TCP from ADDR and print the rate.
    #[arg(long, hide = true, value_name = "ADDR")]
    pub raw_fetch: Option<String>,
    /// MB (10^6 bytes) moved per throughput run (default 256; 16 with --quick).
    #[arg(long, value_name = "MB")]
    pub bulk_mb: Option<u64>,
    /// Circuits held open at the measured relay for the memory figure (default 10000; 500 with --quick).
    #[arg(long, value_name = "N")]
    pub idle_circuits: Option<usize>,
    /// Regtest blocks of about 100 KB synced (default 1000; 100 with --quick).
    #[arg(long, value_name = "N")]
    pub blocks: Option<u32>,
    /// Flow-control window (cells) of every peer, relays and in-process nodes (default: the peers' default).
    #[arg(long, value_name = "CELLS", value_parser = clap::value_parser!(u32).range(4..=4096))]
    pub window: Option<u32>,
    /// Worker threads of each relay process (default: the cores divided among the relays and the bench process,
    /// at least 1; 0: one per core, the peer's own default).
    #[arg(long, value_name = "N")]
    pub relay_threads: Option<usize>,
    /// Circuit builds timed per run (default 50; 10 with --quick).
    #[arg(long, value_name = "N")]
    pub builds: Option<usize>,
    /// Keep the temporary directory (process logs, keys) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// What the bench changes in the peers it starts.
#[derive(Clone, Copy, Debug)]
struct Tune {
    window: Option<u32>,
    relay_threads: Option<usize>,
}

/// Sizes of one bench run.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    runs: usize,
    only: Vec<String>,
    bulk_bytes: u64,
    chunk: usize,
    idle_circuits: usize,
    warm_circuits: usize,
    concurrency: usize,
    blocks: u32,
    block_bytes: usize,
    builds: usize,
    crypto_time: Duration,
    tune: Tune,
    tcp_bytes: u64,
    settle: Duration,
    wanemu: Option<PathBuf>,
}

impl Plan {
    fn new(a: &BenchArgs) -> Plan {
        let q = a.quick;
        Plan {
            quick: q,
            runs: a.runs.map(|r| r as usize).unwrap_or(if q { 1 } else { 3 }),
            only: a.only.clone(),
            bulk_bytes: a.bulk_mb.unwrap_or(if q { 16 } else { 256 }).max(1) * 1_000_000,
            chunk: 64 * RECORD_DATA_MAX,
            idle_circuits: a.idle_circuits.unwrap_or(if q { 500 } else { 10_000 }).max(1),
            warm_circuits: if q { 64 } else { 256 },
            concurrency: 64,
            blocks: a.blocks.unwrap_or(if q { 100 } else { 1000 }).max(1),
            block_bytes: 100_000,
            builds: a.builds.unwrap_or(if q { 10 } else { 50 }).max(1),
            crypto_time: Duration::from_millis(if q { 150 } else { 500 }),
            tune: Tune { window: a.window, relay_threads: a.relay_threads },
            tcp_bytes: if q { 256 << 20 } else { 1 << 30 },
            // A relay's open timer holds each new circuit for the open timeout (10 s), and tokio's idle
            // blocking threads (RSA peels) live 10 s: memory is read once both are gone.
            settle: Duration::from_millis(10_600),
            wanemu: a.wanemu.clone(),
        }
    }

    fn want(&self, group: &str) -> bool {
        if group == "wan" {
            return self.only.iter().any(|g| g == "wan") || (self.only.is_empty() && !self.quick);
        }
        self.only.is_empty()
            || self.only.iter().any(|g| g == group)
            || (group == "raw" && self.only.iter().any(|g| g == "bulk"))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Results

#[derive(Debug, Clone, Copy)]
enum Cmp {
    AtLeast,
    AtMost,
}

#[derive(Debug, Clone, Copy)]
struct Target {
    cmp: Cmp,
    value: f64,
}

impl Target {
    fn met(&self, v: f64) -> bool {
        match self.cmp {
            Cmp::AtLeast => v >= self.value,
            Cmp::AtMost => v <= self.value,
        }
    }
    fn text(&self, unit: &str) -> String {
        let op = match self.cmp {
            Cmp::AtLeast => "≥",
            Cmp::AtMost => "≤",
        };
        format!("{op} {} {unit}", fmt_num(self.value))
    }
}

fn at_least(value: f64) -> Option<Target> {
    Some(Target { cmp: Cmp::AtLeast, value })
}

fn at_most(value: f64) -> Option<Target> {
    Some(Target { cmp: Cmp::AtMost, value })
}

/// One line of the table: a figure, its value in each run, and its target.
#[derive(Debug, Clone)]
struct Row {
    key: String,
    name: String,
    unit: &'static str,
    values: Vec<f64>,
    target: Option<Target>,
}

impl Row {
    fn median(&self) -> f64 {
        median(&self.values)
    }
    fn pass(&self) -> Option<bool> {
        match (self.target, self.values.is_empty()) {
            (Some(t), false) => Some(t.met(self.median())),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Context numbers (bounds, components of a figure), by key.
    info: Vec<(String, f64)>,
    notes: Vec<String>,
}

impl Report {
    // Bounds: `i` is a position just found in `rows`, and `n - 1` indexes the row just pushed (so n >= 1).
    #[allow(clippy::indexing_slicing)]
    fn row(&mut self, key: &str, name: &str, unit: &'static str, target: Option<Target>) -> &mut Row {
        if let Some(i) = self.rows.iter().position(|r| r.key == key) {
            return &mut self.rows[i];
        }
        self.rows.push(Row { key: key.into(), name: name.into(), unit, values: Vec::new(), target });
        let n = self.rows.len();
        &mut self.rows[n - 1]
    }

    fn add(&mut self, key: &str, name: &str, unit: &'static str, target: Option<Target>, v: f64) {
        if v.is_finite() {
            self.row(key, name, unit, target).values.push(v);
        }
    }

    fn info(&mut self, key: &str, v: f64) {
        self.info.push((key.into(), v));
    }

    fn merge(&mut self, other: Report) {
        for r in other.rows {
            let row = self.row(&r.key, &r.name, r.unit, r.target);
            row.values.extend(r.values);
        }
        self.info.extend(other.info);
        self.notes.extend(other.notes);
    }

    fn median_of(&self, key: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.key == key).filter(|r| !r.values.is_empty()).map(Row::median)
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let hi = s.get(n / 2).copied().unwrap_or(f64::NAN);
    if n % 2 == 1 {
        hi
    } else {
        (s.get(n / 2 - 1).copied().unwrap_or(f64::NAN) + hi) / 2.0
    }
}

/// Nearest-rank percentile (`p` in 0..=100).
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s.get(rank.min(s.len()) - 1).copied().unwrap_or(f64::NAN)
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

// ---------------------------------------------------------------------------------------------------------
// /proc

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on every Linux this runs on).
const CLK_TCK: f64 = 100.0;

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / CLK_TCK)
}

/// Resident set size of a process, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn progress(quiet: bool, msg: impl std::fmt::Display) {
    if !quiet {
        eprintln!("bench: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Processes and overlays

/// Which optional flags this executable's subcommands know (they are passed only if present).
async fn help_text(sub: &str) -> String {
    let Ok(exe) = std::env::current_exe() else { return String::new() };
    match Command::new(exe).args([sub, "--help"]).stdin(Stdio::null()).output().await {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => String::new(),
    }
}

/// Sends `count` bytes of records on request: a message `bulk <bytes> <chunk>` is answered with `bytes`
/// bytes in messages of `chunk` bytes. Any other message is ignored; the circuit is held until it ends.
struct Bulk;

impl Service for Bulk {
    fn accept(&self, mut stream: CircuitStream) {
        tokio::spawn(async move {
            while let Ok(req) = stream.recv().await {
                let Some((total, chunk)) = parse_bulk(&req) else { continue };
                let sender = stream.sender();
                let mut left = total;
                while left > 0 {
                    let n = left.min(chunk as u64) as usize;
                    if sender.send(vec![0xa5u8; n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            }
        });
    }
}

fn parse_bulk(req: &[u8]) -> Option<(u64, usize)> {
    let s = std::str::from_utf8(req).ok()?;
    let mut w = s.split_whitespace();
    if w.next()? != "bulk" {
        return None;
    }
    let total: u64 = w.next()?.parse().ok()?;
    let chunk: usize = w.next()?.parse().ok()?;
    (1..=MAX_MESSAGE).contains(&chunk).then_some((total, chunk))
}

/// Receives `bytes` bytes after asking the bulk target for them; returns the time from the request to the
/// last byte.
async fn transfer(s: &mut CircuitStream, bytes: u64, chunk: usize) -> Result<Duration, PeerError> {
    let t = Instant::now();
    s.send(format!("bulk {bytes} {chunk}").into_bytes()).await?;
    let mut got = 0u64;
    while got < bytes {
        got += s.recv().await?.len() as u64;
    }
    Ok(t.elapsed())
}

/// A tracker and relay processes, and nodes in this process, on one overlay.
struct Overlay {
    tracker: SocketAddr,
    tracker_key: PublicKey,
    relays: Vec<Proc>,
    _tracker: Proc,
    nodes: Vec<Arc<Node>>,
    /// Worker threads each relay process was started with (0: one per core).
    relay_threads: usize,
}

/// What one in-process node serves.
struct NodeSpec {
    serve: Option<(ChainId, Arc<dyn Service>)>,
}

impl Overlay {
    /// Starts a tracker (degree: a complete graph of all peers), `relays` relay processes and the in-process
    /// nodes, and waits until every in-process node has a link to every other peer.
    async fn start(
        name: &str,
        root: &Path,
        relays: usize,
        specs: Vec<NodeSpec>,
        tune: Tune,
        quiet: bool,
    ) -> Result<Overlay, PeerError> {
        let window = tune.window;
        // Every process of the overlay shares this machine's cores; a relay with more worker threads than its
        // share only adds cross-thread wake-ups (docs/PERFORMANCE.md, revision 5).
        let relay_threads = tune.relay_threads.unwrap_or((cores() / (relays + 1)).max(1));
        let dir = root.join(name);
        super::ensure_private_dir(&dir)?;
        let d = |n: &str| dir.join(n).display().to_string();
        let peers = relays + specs.len();
        let thelp = help_text("tracker").await;
        let mut targs: Vec<String> = [
            "tracker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &d("tracker"),
            "--allow-same-ip",
            "--interval",
            "3",
            "--neighbors",
            &(peers - 1).clamp(1, 30).to_string(),
        ]
        .map(String::from)
        .to_vec();
        // Circuit builds and grant prefetches open many tracker sessions from 127.0.0.1.
        for (flag, v) in [("--hello-rate", "1000000"), ("--hello-burst", "1000000"), ("--max-sessions-per-ip", "4096")]
        {
            if thelp.contains(flag) {
                targs.extend([flag.to_string(), v.to_string()]);
            }
        }
        let (tracker, taddr, tfp) = spawn_ready("tracker", &targs, &dir.join("tracker.log")).await?;
        progress(quiet, format!("{name}: tracker {taddr}"));
        let tracker_addr: SocketAddr = taddr.parse().map_err(|e| PeerError::Process(format!("tracker addr: {e}")))?;
        let phelp = help_text("peer").await;
        let mut starts = Vec::new();
        for i in 0..relays {
            let rn = format!("relay{i}");
            let mut a: Vec<String> = [
                "--log-level",
                "warn",
                "peer",
                "--listen",
                "127.0.0.1:0",
                "--tracker",
                &taddr,
                "--tracker-fp",
                &tfp,
                "--data-dir",
                &d(&rn),
                "--max-circuits",
                "100000",
                "--stats-interval",
                "0",
            ]
            .map(String::from)
            .to_vec();
            if let Some(w) = window {
                a.extend(["--circuit-window".to_string(), w.to_string()]);
            }
            if phelp.contains("--threads") {
                a.extend(["--threads".to_string(), relay_threads.to_string()]);
            }
            // The measured relay must not refuse OPENs by rate, or hold back the single-host overlay.
            for (flag, v) in [
                ("--open-rate", "1000000"),
                ("--open-burst", "1000000"),
                ("--max-conns-per-ip", "4096"),
                ("--max-conns", "8192"),
            ] {
                if phelp.contains(flag) {
                    a.extend([flag.to_string(), v.to_string()]);
                }
            }
            starts.push((rn, a));
        }
        let spawned = crate::node::futures_join_all(starts.iter().map(|(n, a)| {
            let log = dir.join(format!("{n}.log"));
            async move { spawn_ready(n, a, &log).await }
        }))
        .await;
        let mut procs = Vec::new();
        for r in spawned {
            procs.push(r?.0);
        }
        let pinned = Fingerprint::from_hex(&tfp).map_err(|e| PeerError::Process(format!("tracker fp: {e}")))?;
        let tracker_key = fetch_tracker_key(tracker_addr, &pinned).await?;
        // Identities for the in-process nodes, generated in parallel.
        let ids = crate::node::futures_join_all(
            (0..specs.len()).map(|_| tokio::task::spawn_blocking(|| Identity::generate(&mut rand::rngs::OsRng, 2048))),
        )
        .await;
        let mut nodes = Vec::new();
        for (i, (spec, id)) in specs.into_iter().zip(ids).enumerate() {
            let id = id.map_err(|e| PeerError::Internal(e.to_string()))??;
            // A node keeps state in its data dir (the replay cache, saved every 15 s).
            let data_dir = dir.join(format!("node{i}"));
            super::ensure_private_dir(&data_dir)?;
            let mut cfg = PeerConfig::new(
                "127.0.0.1:0".parse().map_err(|e| PeerError::Internal(format!("{e}")))?,
                tracker_addr,
                tfp.clone(),
                data_dir,
            );
            cfg.max_circuits = 100_000;
            cfg.open_rate = 1_000_000;
            cfg.open_burst = 1_000_000;
            cfg.max_conns = 8192;
            cfg.max_conns_per_ip = 4096;
            cfg.stats_interval = Duration::ZERO;
            if let Some(w) = window {
                cfg.circuit_window = w;
            }
            let service = match spec.serve {
                Some((chain, svc)) => {
                    cfg.serve = vec![chain];
                    Some(svc)
                }
                None => None,
            };
            let (node, listener) = Node::bind(cfg, id, tracker_key.clone(), service).await?;
            node.start(listener);
            nodes.push(node);
        }
        let started = Instant::now();
        loop {
            let ready = nodes.iter().all(|n| n.neighbor_count() >= peers - 1 && n.link_count() >= peers - 1);
            if ready {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                progress(quiet, format!("{name}: not every link is up after 60 s; going on"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        progress(
            quiet,
            format!(
                "{name}: {relays} relay processes and {} nodes up in {:.1}s",
                nodes.len(),
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(Overlay { tracker: tracker_addr, tracker_key, relays: procs, _tracker: tracker, nodes, relay_threads })
    }

    fn relay_pids(&self) -> Vec<u32> {
        self.relays.iter().map(Proc::pid).collect()
    }

    fn relay_cpu(&self) -> f64 {
        self.relay_pids().into_iter().filter_map(cpu_secs).sum()
    }
}

/// Opens `count` circuits (to distinct targets) of `relays` relays for `chain`, retrying for up to 60 s
/// (links between relay processes may still be coming up).
async fn open_retry(node: &Arc<Node>, chain: &str, relays: u8, count: u8) -> Result<Vec<CircuitStream>, PeerError> {
    let chain = ChainId::new(chain).map_err(|e| PeerError::Internal(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = CircuitRequest { chain: chain.clone(), count, relays };
        match node.request_circuits(req).await {
            Ok(v) if v.len() == usize::from(count) => return Ok(v),
            Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(300)).await,
            Ok(v) => {
                return Err(PeerError::Process(format!(
                    "only {} of {count} circuits with {relays} relays opened",
                    v.len()
                )))
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Raw figures: loopback TCP, AES-256-GCM, AES-256-CTR, RSA-OAEP

/// Per-byte costs on one core, measured in this run.
#[derive(Debug, Clone, Copy)]
struct Costs {
    /// Seconds per byte of one GCM pass (seal or open).
    gcm: f64,
    /// Seconds per byte of one CTR pass.
    ctr: f64,
    /// CPU seconds per byte moved over loopback TCP (sender and receiver together).
    tcp_cpu: f64,
}

/// CPU time the calling thread has used, in seconds (`/proc/thread-self/schedstat`, nanoseconds), or `None`
/// where the kernel does not provide it.
fn thread_cpu() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

/// Runs `f` (which returns the units of work it did) `batch` times at a go for `budget` of wall time; returns
/// units per second of this thread's CPU time (wall time where that is unavailable), so that other load on
/// a shared machine does not count as cost.
fn per_cpu_second(budget: Duration, batch: u32, mut f: impl FnMut() -> u64) -> f64 {
    let (t, c0) = (Instant::now(), thread_cpu());
    let mut units = 0u64;
    while t.elapsed() < budget {
        for _ in 0..batch {
            units += f();
        }
    }
    let secs = match (c0, thread_cpu()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => t.elapsed().as_secs_f64(),
    };
    units as f64 / secs
}

/// MB per CPU-second of AES-256-GCM (seal + open of one link cell, counted as two passes) and of AES-256-CTR
/// (one DATA payload), on one core. Both go through the types the node itself uses ([`AeadCounter`] for link
/// cells and end-to-end records, [`CtrLayer`] for onion layers), so the crypto bound follows whatever
/// implementation the node runs.
fn raw_crypto(budget: Duration) -> (f64, f64) {
    let key = Secret([7u8; 32]);
    let mut seal = AeadCounter::new(&key);
    let mut open = AeadCounter::new(&key);
    let mut buf = vec![0x11u8; CELL_LEN];
    let gcm = per_cpu_second(budget, 16, || {
        let tag = seal.seal_in_place(b"", &mut buf).unwrap_or([0; 16]);
        let _ = open.open_in_place(b"", &mut buf, &tag, "bench");
        2 * CELL_LEN as u64
    }) / 1e6;
    let layer = CtrLayer::new(&key);
    let mut payload = vec![0u8; CELL_PAYLOAD_LEN];
    let mut i = 0u64;
    let ctr = per_cpu_second(budget, 16, || {
        layer.apply(i, &mut payload);
        i += 1;
        CELL_PAYLOAD_LEN as u64
    }) / 1e6;
    std::hint::black_box(&payload);
    (gcm, ctr)
}

/// One stream of `bytes` over loopback TCP between two threads of this process: MB/s (wall time), and CPU
/// seconds per byte of both threads together.
fn raw_tcp(bytes: u64) -> std::io::Result<(f64, f64)> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, f64)> {
        let c0 = thread_cpu().unwrap_or(0.0);
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((got, thread_cpu().unwrap_or(0.0) - c0));
            }
            got += n as u64;
        }
    });
    let c0 = thread_cpu().unwrap_or(0.0);
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    // One link write: a batch of 32 sealed cells.
    let buf = vec![0x5au8; 32 * 4133];
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let (got, rcpu) = reader.join().map_err(|_| std::io::Error::other("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    let cpu = thread_cpu().unwrap_or(0.0) - c0 + rcpu;
    Ok((got as f64 / secs / 1e6, cpu / got.max(1) as f64))
}

/// RSA-OAEP-2048 decryptions and tracking-code peels per CPU-second, on one core.
fn raw_rsa(budget: Duration) -> Result<(f64, f64), PeerError> {
    let mut rng = rand::rngs::OsRng;
    let id = Identity::generate(&mut rng, 2048)?;
    let ct = id.public().encrypt(&mut rng, &[7u8; 32])?;
    let rsa = per_cpu_second(budget, 1, || u64::from(id.decrypt(&ct, "bench").is_ok()));
    let layer = |kind: LayerKind, i: u8| Layer {
        prev: NeighborId(u64::from(i) + 1),
        kind,
        hop_secret: Secret([i; 32]),
        expires: u64::MAX,
        replay_tag: [i; 16],
    };
    let chain = ChainId::new("bench").map_err(|e| PeerError::Internal(e.to_string()))?;
    let hops = vec![
        HopSpec { key: id.public().clone(), layer: layer(LayerKind::Relay { next: NeighborId(9) }, 1) },
        HopSpec {
            key: id.public().clone(),
            layer: layer(LayerKind::Target { chain, session: [3; 16], e2e_secret: Secret([4; 32]) }, 2),
        },
    ];
    let tc = tc::build(&hops, &mut rng)?;
    let peel = per_cpu_second(budget, 1, || u64::from(tc::peel(&tc, &id).is_ok()));
    Ok((rsa, peel))
}

async fn raw_figures(plan: &Plan, rep: &mut Report, quiet: bool) -> Result<Costs, PeerError> {
    for run in 0..plan.runs {
        let budget = plan.crypto_time;
        let (gcm, ctr) = tokio::task::spawn_blocking(move || raw_crypto(budget))
            .await
            .map_err(|e| PeerError::Internal(e.to_string()))?;
        let bytes = plan.tcp_bytes;
        let (tcp, tcp_cpu) = tokio::task::spawn_blocking(move || raw_tcp(bytes))
            .await
            .map_err(|e| PeerError::Internal(e.to_string()))??;
        progress(quiet, format!("raw run {}: GCM {gcm:.0} MB/s, CTR {ctr:.0} MB/s, TCP {tcp:.0} MB/s", run + 1));
        rep.add("raw_gcm_mbps", "raw AES-256-GCM (seal+open, AWS-LC as the node), per core", "MB/s", None, gcm);
        rep.add("raw_ctr_mbps", "raw AES-256-CTR, per core", "MB/s", None, ctr);
        rep.add("raw_tcp_mbps", "raw loopback TCP, 1 stream", "MB/s", None, tcp);
        rep.add("raw_tcp_cpu_ms_per_mb", "raw loopback TCP CPU (both ends)", "ms/MB", None, tcp_cpu * 1e9);
    }
    let g = rep.median_of("raw_gcm_mbps").unwrap_or(f64::NAN);
    let c = rep.median_of("raw_ctr_mbps").unwrap_or(f64::NAN);
    let t = rep.median_of("raw_tcp_cpu_ms_per_mb").unwrap_or(f64::NAN);
    Ok(Costs { gcm: 1.0 / (g * 1e6), ctr: 1.0 / (c * 1e6), tcp_cpu: t / 1e9 })
}

/// Throughput bounds (bytes/s of application data) of one circuit with `hops` onion layers (relays + 1),
/// per docs/PERFORMANCE.md: (crypto bound over all cores, its busiest single stage, crypto+TCP bound).
fn bounds(c: &Costs, hops: usize, cores: usize) -> (f64, f64, f64) {
    let n = hops as f64;
    let (link, payload, record) = (CELL_LEN as f64, CELL_PAYLOAD_LEN as f64, (CELL_PAYLOAD_LEN - 16) as f64);
    let data = RECORD_DATA_MAX as f64;
    // Per cell: n links × (seal + open) over CELL_LEN, e2e seal + open over the record, 2n CTR passes.
    let cell_cpu = 2.0 * n * link * c.gcm + 2.0 * record * c.gcm + 2.0 * n * payload * c.ctr;
    let total = cores as f64 * data / cell_cpu;
    // The requester's reader task does its link open, n CTR layers and the e2e open in sequence.
    let stage = data / (link * c.gcm + n * payload * c.ctr + record * c.gcm);
    let tcp = n * (link + 16.0) * c.tcp_cpu;
    let with_tcp = cores as f64 * data / (cell_cpu + tcp);
    (total.min(stage), stage, with_tcp.min(stage))
}

/// The overlay's first (requesting) node.
fn first_node(o: &Overlay) -> Result<&Arc<Node>, PeerError> {
    o.nodes.first().ok_or_else(|| PeerError::Internal("overlay started without nodes".into()))
}

// ---------------------------------------------------------------------------------------------------------
// Overlay A: throughput, relay CPU, build latency, chain sync

async fn bulk_figures(o: &Overlay, plan: &Plan, costs: &Costs, rep: &mut Report, quiet: bool) -> Result<(), PeerError> {
    let req = first_node(o)?;
    for relays in 1..=3u8 {
        let hops = usize::from(relays) + 1;
        let (bound, stage, with_tcp) = bounds(costs, hops, cores());
        rep.info(&format!("bound_crypto_mbps_{hops}hops"), bound / 1e6);
        rep.info(&format!("bound_stage_mbps_{hops}hops"), stage / 1e6);
        rep.info(&format!("bound_crypto_tcp_mbps_{hops}hops"), with_tcp / 1e6);
        for run in 0..plan.runs {
            let mut s = open_retry(req, "bench", relays, 1).await?.remove(0);
            transfer(&mut s, 2_000_000, plan.chunk).await?;
            let (cpu0, own0) = (o.relay_cpu(), cpu_secs(std::process::id()).unwrap_or(0.0));
            let dt = transfer(&mut s, plan.bulk_bytes, plan.chunk).await?;
            let cpu = o.relay_cpu() - cpu0;
            // This process holds the requester and the bulk target (and an idle bench thread).
            let own = cpu_secs(std::process::id()).unwrap_or(0.0) - own0;
            drop(s);
            let mbps = plan.bulk_bytes as f64 / dt.as_secs_f64() / 1e6;
            let mb_relayed = plan.bulk_bytes as f64 / 1e6 * f64::from(relays);
            let ms_per_mb = cpu * 1e3 / mb_relayed;
            progress(
                quiet,
                format!(
                    "throughput {hops} hops run {}: {mbps:.1} MB/s ({:.0} % of bound {:.0}), relay CPU {ms_per_mb:.2} ms/MB",
                    run + 1,
                    100.0 * mbps * 1e6 / bound,
                    bound / 1e6
                ),
            );
            let (t_mbps, t_ratio, t_cpu) =
                if hops == 3 { (at_least(150.0), at_least(60.0), at_most(2.5)) } else { (None, None, None) };
            rep.add(
                &format!("throughput_{hops}hops_mbps"),
                &format!("throughput {hops} hops ({relays} relay{})", if relays > 1 { "s" } else { "" }),
                "MB/s",
                t_mbps,
                mbps,
            );
            rep.add(
                &format!("throughput_{hops}hops_pct_of_bound"),
                &format!("  … of crypto bound ({:.0} MB/s)", bound / 1e6),
                "%",
                t_ratio,
                100.0 * mbps * 1e6 / bound,
            );
            rep.add(
                &format!("relay_cpu_{hops}hops_ms_per_mb"),
                &format!("relay CPU per MB, {hops} hops"),
                "ms/MB",
                t_cpu,
                ms_per_mb,
            );
            rep.add(
                &format!("endpoint_cpu_{hops}hops_ms_per_mb"),
                "  requester + target CPU per MB (together)",
                "ms/MB",
                None,
                own * 1e3 / (plan.bulk_bytes as f64 / 1e6),
            );
        }
    }
    Ok(())
}

async fn build_figures(o: &Overlay, plan: &Plan, rep: &mut Report, quiet: bool) -> Result<(), PeerError> {
    let node = first_node(o)?;
    let chain = ChainId::new("bench").map_err(|e| PeerError::Internal(e.to_string()))?;
    // Links between relay processes are up once a circuit over every relay opened.
    drop(open_retry(node, "bench", 3, 1).await?);
    for run in 0..plan.runs {
        let (mut total, mut tracker, mut open) = (Vec::new(), Vec::new(), Vec::new());
        let mut failures = 0;
        while total.len() < plan.builds {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t0 = Instant::now();
            let request = CircuitRequest { chain: chain.clone(), count: 1, relays: 2 };
            let grant = match node.request_grants(request).await.ok().and_then(|g| g.into_iter().next()) {
                Some(g) => g,
                None => {
                    failures += 1;
                    if failures > 20 {
                        return Err(PeerError::Process("circuit builds keep failing".into()));
                    }
                    continue;
                }
            };
            let t1 = Instant::now();
            match node.open_circuit(&grant).await {
                Ok(s) => {
                    let t2 = Instant::now();
                    total.push((t2 - t0).as_secs_f64() * 1e3);
                    tracker.push((t1 - t0).as_secs_f64() * 1e3);
                    open.push((t2 - t1).as_secs_f64() * 1e3);
                    drop(s);
                }
                Err(_) => failures += 1,
            }
        }
        let (p50, p99) = (percentile(&total, 50.0), percentile(&total, 99.0));
        progress(
            quiet,
            format!(
                "circuit build run {}: p50 {p50:.2} ms, p99 {p99:.2} ms (tracker p50 {:.2} ms, open p50 {:.2} ms)",
                run + 1,
                percentile(&tracker, 50.0),
                percentile(&open, 50.0)
            ),
        );
        rep.add("build_p50_ms", "circuit build p50 (3 hops, incl. tracker)", "ms", at_most(8.0), p50);
        rep.add("build_p99_ms", "circuit build p99", "ms", None, p99);
        rep.add(
            "build_tracker_p50_ms",
            "  … tracker request p50 (node's kept session)",
            "ms",
            None,
            percentile(&tracker, 50.0),
        );
        rep.add("build_open_p50_ms", "  … OPEN to first e2e DATA p50", "ms", None, percentile(&open, 50.0));
        // For comparison only (not part of the build figure): the same request over a new tracker session each
        // time, as nodes did before they kept theirs open (TCP connect, the tracker's RSA decryption of the
        // ClientHello, our Hello signature and its verification).
        let mut fresh = Vec::new();
        for _ in 0..plan.builds.min(20) {
            let t = Instant::now();
            let mut s = TrackerSession::connect(o.tracker, &o.tracker_key, &node.identity).await?;
            let req = ToTracker::RequestCircuits(CircuitRequest { chain: chain.clone(), count: 1, relays: 2 });
            if matches!(s.request(&req).await, Ok(FromTracker::Circuits(_))) {
                fresh.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        rep.add(
            "build_tracker_new_session_p50_ms",
            "  (tracker request p50 over a new session each)",
            "ms",
            None,
            percentile(&fresh, 50.0),
        );
    }
    Ok(())
}

/// Pumps one direct TCP connection to and from a memory stream: each message is `len u32 BE || bytes`.
async fn pump(sock: TcpStream, mut side: CircuitStream) {
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let tx = side.sender();
    let up = async move {
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes(len) as usize;
            if n > MAX_MESSAGE {
                return;
            }
            let mut buf = vec![0u8; n];
            if rd.read_exact(&mut buf).await.is_err() || tx.send(buf).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        while let Ok(m) = side.recv().await {
            let len = (m.len() as u32).to_be_bytes();
            if wr.write_all(&len).await.is_err() || wr.write_all(&m).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Serves `svc` over direct TCP: every connection becomes a message stream handed to the service.
async fn direct_server(svc: Arc<dyn Service>) -> Result<SocketAddr, PeerError> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let (ours, theirs) = CircuitStream::memory_pair();
            svc.accept(theirs);
            tokio::spawn(pump(sock, ours));
        }
    });
    Ok(addr)
}

/// `n` message streams to a direct server.
async fn direct_streams(addr: SocketAddr, n: usize) -> Result<Vec<CircuitStream>, PeerError> {
    let mut out = Vec::new();
    for _ in 0..n {
        let sock = TcpStream::connect(addr).await?;
        let (ours, theirs) = CircuitStream::memory_pair();
        tokio::spawn(pump(sock, theirs));
        out.push(ours);
    }
    Ok(out)
}

/// Mines `blocks` regtest blocks of about `bytes` bytes each; returns the store and the transactions per
/// block used.
fn mine_chain(blocks: u32, bytes: usize) -> Result<(ChainStore, usize, usize), PeerError> {
    let params = NetParams::by_name("regtest").ok_or(PeerError::Internal("no regtest parameters".into()))?;
    // Size one block to find the transaction count that gives `bytes`.
    let mut probe = ChainStore::new(params.clone())?;
    let guess = 450usize;
    let empty = chain::mine_regtest(&mut probe, 1, 0)?;
    let full = chain::mine_regtest(&mut probe, 1, guess)?;
    let (Some(empty), Some(full)) = (empty.first(), full.first()) else {
        return Err(PeerError::Internal("mining one block returned no block".into()));
    };
    let base = probe.block(empty)?.map(|b| b.total_size()).unwrap_or(300);
    let size = probe.block(full)?.map(|b| b.total_size()).unwrap_or(100_000);
    let per_tx = (size.saturating_sub(base) as f64 / guess as f64).max(1.0);
    let txs = ((bytes.saturating_sub(base)) as f64 / per_tx).round() as usize;
    let mut store = ChainStore::new(params)?;
    let hashes = chain::mine_regtest(&mut store, blocks, txs)?;
    let last = hashes.last().and_then(|h| store.block(h).ok().flatten()).map(|b| b.total_size()).unwrap_or(0);
    Ok((store, txs, last))
}

async fn sync_figures(
    o: &Overlay,
    direct: SocketAddr,
    plan: &Plan,
    rep: &mut Report,
    quiet: bool,
) -> Result<(), PeerError> {
    let params = NetParams::by_name("regtest").ok_or(PeerError::Internal("no regtest parameters".into()))?;
    let node = first_node(o)?;
    for run in 0..plan.runs {
        let mut times = [0.0f64; 2];
        let mut mbps = [0.0f64; 2];
        // Alternate which goes first, so a load change on a shared machine hits both alike.
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let streams = if which == 0 {
                // One serving node: four requests of one circuit each (a request's circuits go to distinct
                // targets).
                let mut v = Vec::new();
                for _ in 0..4 {
                    v.extend(open_retry(node, "regtest", 2, 1).await?);
                }
                v
            } else {
                direct_streams(direct, 4).await?
            };
            let store = chain::shared(ChainStore::new(params.clone())?);
            let t = Instant::now();
            let r = chain::sync_with(streams, &params, &store, &SyncOptions::default(), |_| {})
                .await
                .map_err(PeerError::from)?;
            let secs = t.elapsed().as_secs_f64();
            if r.blocks < u64::from(plan.blocks) {
                return Err(PeerError::Chain(format!("synced {} of {} blocks", r.blocks, plan.blocks)));
            }
            if let (Some(t), Some(m)) = (times.get_mut(which), mbps.get_mut(which)) {
                *t = secs;
                *m = r.bytes as f64 / secs / 1e6;
            }
        }
        let ratio = 100.0 * times[1] / times[0];
        progress(
            quiet,
            format!(
                "chain sync run {}: circuits {:.2}s ({:.0} MB/s), direct TCP {:.2}s ({:.0} MB/s): {ratio:.0} %",
                run + 1,
                times[0],
                mbps[0],
                times[1],
                mbps[1]
            ),
        );
        rep.add(
            "sync_circuits_s",
            &format!("chain sync {} blocks, 4 circuits (3 hops)", plan.blocks),
            "s",
            None,
            times[0],
        );
        rep.add("sync_circuits_mbps", "  … over circuits", "MB/s", None, mbps[0]);
        rep.add("sync_direct_s", &format!("chain sync {} blocks, 4 direct TCP", plan.blocks), "s", None, times[1]);
        rep.add("sync_direct_mbps", "  … over direct TCP", "MB/s", None, mbps[1]);
        rep.add("sync_pct_of_direct", "chain sync circuits vs direct TCP", "%", at_least(50.0), ratio);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Overlay B: opens per second and memory per idle circuit at one relay

/// Holds every circuit opened to it until it ends.
struct Hold;

impl Service for Hold {
    fn accept(&self, mut stream: CircuitStream) {
        tokio::spawn(async move { while stream.recv().await.is_ok() {} });
    }
}

/// Fetches `n` grants for `chain` with one relay, over a few tracker sessions in parallel.
async fn prefetch_grants(o: &Overlay, node: &Arc<Node>, n: usize) -> Result<Vec<CircuitGrant>, PeerError> {
    let chain = ChainId::new("hold").map_err(|e| PeerError::Internal(e.to_string()))?;
    let sessions = 4usize;
    let tasks = (0..sessions).map(|i| {
        let (addr, key, id, chain) = (o.tracker, o.tracker_key.clone(), node.identity.clone(), chain.clone());
        let want = n / sessions + usize::from(i < n % sessions);
        async move {
            let mut s = TrackerSession::connect(addr, &key, &id).await?;
            let mut out = Vec::with_capacity(want);
            let mut misses = 0;
            while out.len() < want {
                let req = ToTracker::RequestCircuits(CircuitRequest { chain: chain.clone(), count: 1, relays: 1 });
                match s.request(&req).await {
                    Ok(FromTracker::Circuits(c)) if !c.circuits.is_empty() => out.extend(c.circuits),
                    _ => {
                        misses += 1;
                        if misses > 50 {
                            return Err(PeerError::Tracker("no grants".into()));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        s = TrackerSession::connect(addr, &key, &id).await?;
                    }
                }
            }
            Ok::<_, PeerError>(out)
        }
    });
    let mut all = Vec::with_capacity(n);
    for r in crate::node::futures_join_all(tasks).await {
        all.extend(r?);
    }
    Ok(all)
}

/// Opens a circuit for every grant, `concurrency` at a time; returns the streams that opened.
async fn open_many(node: &Arc<Node>, grants: Vec<CircuitGrant>, concurrency: usize) -> Vec<CircuitStream> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for g in grants {
        let Ok(permit) = sem.clone().acquire_owned().await else { break };
        let node = node.clone();
        tasks.spawn(async move {
            let r = node.open_circuit(&g).await;
            drop(permit);
            r.ok()
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(s)) = r {
            out.push(s);
        }
    }
    out
}

/// One run of overlay B (a fresh relay process, so that nothing from an earlier run is in its memory).
async fn opens_run(root: &Path, plan: &Plan, run: usize, quiet: bool) -> Result<Report, PeerError> {
    let mut rep = Report::default();
    let budget = plan.crypto_time * 2;
    let (rsa, peel) = tokio::task::spawn_blocking(move || raw_rsa(budget))
        .await
        .map_err(|e| PeerError::Internal(e.to_string()))??;
    progress(quiet, format!("RSA-OAEP-2048: {rsa:.0} decrypts/s, {peel:.0} TC peels/s per core"));
    rep.add("rsa_decrypts_per_s", "RSA-OAEP-2048 decrypts/s, per core", "/s", None, rsa);
    rep.add("tc_peels_per_s", "TC peels/s, per core", "/s", None, peel);
    let hold = ChainId::new("hold").map_err(|e| PeerError::Internal(e.to_string()))?;
    let specs = vec![NodeSpec { serve: None }, NodeSpec { serve: Some((hold, Arc::new(Hold) as Arc<dyn Service>)) }];
    let o = Overlay::start(&format!("overlay-b{}", run + 1), root, 1, specs, plan.tune, quiet).await?;
    let node = first_node(&o)?.clone();
    let relay =
        o.relay_pids().first().copied().ok_or_else(|| PeerError::Internal("overlay started without relays".into()))?;
    // Wait until a circuit opens (the relay's link to the target is up too).
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_many(&node, prefetch_grants(&o, &node, 1).await?, 1).await.is_empty() {
        if Instant::now() > deadline {
            return Err(PeerError::Process("no circuit opens through the relay".into()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let n = plan.idle_circuits;
    let mut grants = prefetch_grants(&o, &node, plan.warm_circuits + n).await?;
    let main = grants.split_off(plan.warm_circuits);
    // Warm-up: the relay's blocking threads and allocator arenas reach their working size; then wait until
    // the warm-up circuits' open timers and the idle blocking threads are gone.
    drop(open_many(&node, grants, plan.concurrency).await);
    tokio::time::sleep(plan.settle).await;
    let rss0 = rss_bytes(relay).unwrap_or(0);
    let cpu0 = cpu_secs(relay).unwrap_or(0.0);
    let t = Instant::now();
    let held = open_many(&node, main, plan.concurrency).await;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(relay).unwrap_or(0.0) - cpu0;
    let opened = held.len();
    tokio::time::sleep(plan.settle).await;
    let rss1 = rss_bytes(relay).unwrap_or(0);
    let opens = opened as f64 / secs;
    let per_circ = (rss1 as f64 - rss0 as f64) / opened.max(1) as f64;
    progress(
        quiet,
        format!(
            "opens run {}: {opened}/{n} opened, {opens:.0}/s, relay CPU {:.2} ms/open ({:.0} % of a core); \
             RSS {:.1} → {:.1} MiB = {:.0} B per idle circuit",
            run + 1,
            cpu * 1e3 / opened.max(1) as f64,
            100.0 * cpu / secs,
            rss0 as f64 / 1048576.0,
            rss1 as f64 / 1048576.0,
            per_circ
        ),
    );
    rep.add("opens_per_s", "circuit opens/s at one relay", "/s", at_least(400.0), opens);
    rep.add("opens_pct_of_rsa", "  … of its RSA decrypt rate", "%", at_least(75.0), 100.0 * opens / rsa);
    rep.add("relay_cpu_ms_per_open", "  relay CPU per open", "ms", None, cpu * 1e3 / opened.max(1) as f64);
    // The relay's own efficiency, free of the load generator (the requester and the target, which needs an RSA
    // decryption per circuit too, share the 2 cores): opens per CPU-second the relay spent, against RSA
    // decryptions per CPU-second of one thread (the relay peels each OPEN on one blocking thread).
    let per_cpu = opened as f64 / cpu.max(1e-9);
    rep.add("relay_opens_per_cpu_s", "  relay opens per relay CPU-second", "/s", None, per_cpu);
    rep.add("relay_opens_per_cpu_pct_of_rsa", "  … of the RSA decrypt rate", "%", None, 100.0 * per_cpu / rsa);
    rep.add("relay_cpu_pct_opening", "  relay CPU while opening", "% core", None, 100.0 * cpu / secs);
    rep.add(
        "rss_per_idle_circuit_kib",
        &format!("RSS per idle circuit ({n} held)"),
        "KiB",
        at_most(4.0),
        per_circ / 1024.0,
    );
    if opened < n {
        rep.notes.push(format!("opens run {}: only {opened} of {n} circuits opened", run + 1));
    }
    drop(held);
    Ok(rep)
}

// ---------------------------------------------------------------------------------------------------------
// Output

fn print_table(rep: &Report, plan: &Plan, load: (&str, &str), elapsed: Duration) {
    println!(
        "anomos bench{}: {} runs per figure, {} cores, load average {} (start) / {} (end), {:.0} s",
        if plan.quick { " --quick" } else { "" },
        plan.runs,
        cores(),
        load.0,
        load.1,
        elapsed.as_secs_f64()
    );
    let w = rep.rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(10).max(10);
    println!("| {:<w$} | {:>9} | {:>19} | {:<15} | {:<4} |", "figure", "median", "spread (min–max)", "target", "");
    println!("|{}|{}|{}|{}|{}|", "-".repeat(w + 2), "-".repeat(11), "-".repeat(21), "-".repeat(17), "-".repeat(6));
    for r in &rep.rows {
        let (lo, hi) = r.values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
        let spread = if r.values.len() > 1 { format!("{}–{}", fmt_num(lo), fmt_num(hi)) } else { String::new() };
        let target = r.target.map(|t| t.text(r.unit)).unwrap_or_default();
        let mark = match r.pass() {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "",
        };
        println!(
            "| {:<w$} | {:>9} | {:>19} | {:<15} | {:<4} |",
            r.name,
            format!("{} {}", fmt_num(r.median()), r.unit),
            spread,
            target,
            mark
        );
    }
    if !rep.info.is_empty() {
        let items: Vec<String> = rep.info.iter().map(|(k, v)| format!("{k}={}", fmt_num(*v))).collect();
        println!("context: {}", items.join(" "));
    }
    for n in &rep.notes {
        println!("note: {n}");
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn print_json(rep: &Report, plan: &Plan, load: (&str, &str), elapsed: Duration) {
    let mut o = String::from("{");
    let _ = write!(
        o,
        "\"quick\":{},\"runs\":{},\"cores\":{},\"load_start\":{},\"load_end\":{},\"elapsed_s\":{},\"rows\":[",
        plan.quick,
        plan.runs,
        cores(),
        json_str(load.0),
        json_str(load.1),
        json_num(elapsed.as_secs_f64())
    );
    for (i, r) in rep.rows.iter().enumerate() {
        let (lo, hi) = r.values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
        let values: Vec<String> = r.values.iter().map(|v| json_num(*v)).collect();
        let target = match r.target {
            Some(t) => format!(
                "{{\"op\":{},\"value\":{}}}",
                json_str(match t.cmp {
                    Cmp::AtLeast => ">=",
                    Cmp::AtMost => "<=",
                }),
                json_num(t.value)
            ),
            None => "null".into(),
        };
        let pass = r.pass().map(|p| p.to_string()).unwrap_or_else(|| "null".into());
        let _ = write!(
            o,
            "{}{{\"key\":{},\"name\":{},\"unit\":{},\"median\":{},\"min\":{},\"max\":{},\"values\":[{}],\"target\":{},\"pass\":{}}}",
            if i > 0 { "," } else { "" },
            json_str(&r.key),
            json_str(r.name.trim_start()),
            json_str(r.unit),
            json_num(r.median()),
            json_num(lo),
            json_num(hi),
            values.join(","),
            target,
            pass
        );
    }
    o.push_str("],\"context\":{");
    let info: Vec<String> = rep.info.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_num(*v))).collect();
    o.push_str(&info.join(","));
    o.push_str("},\"notes\":[");
    let notes: Vec<String> = rep.notes.iter().map(|n| json_str(n)).collect();
    o.push_str(&notes.join(","));
    o.push_str("]}");
    println!("{o}");
}

// ---------------------------------------------------------------------------------------------------------

/// Overlay A (see the module documentation): throughput, relay CPU, build latency.
async fn overlay_a(root: &Path, plan: &Plan, costs: Option<Costs>, quiet: bool) -> Result<Report, PeerError> {
    let mut rep = Report::default();
    let bench = ChainId::new("bench").map_err(|e| PeerError::Internal(e.to_string()))?;
    // Only the requester, the target and the relay processes: every relay of a path is a measured process.
    let specs = vec![NodeSpec { serve: None }, NodeSpec { serve: Some((bench, Arc::new(Bulk))) }];
    let o = Overlay::start("overlay-a", root, 3, specs, plan.tune, quiet).await?;
    rep.info("relay_threads", o.relay_threads as f64);
    if let (true, Some(c)) = (plan.want("bulk"), &costs) {
        bulk_figures(&o, plan, c, &mut rep, quiet).await?;
    }
    if plan.want("build") {
        build_figures(&o, plan, &mut rep, quiet).await?;
    }
    Ok(rep)
}

/// Overlay C: chain sync over 4 circuits (through the relay processes, to one serving node) against the same
/// chain code over 4 direct TCP connections to the same service.
async fn overlay_c(root: &Path, plan: &Plan, quiet: bool) -> Result<Report, PeerError> {
    let mut rep = Report::default();
    // The chain is mined before the overlay starts (it is setup, not measured).
    let (blocks, bytes) = (plan.blocks, plan.block_bytes);
    let t = Instant::now();
    let (store, txs, size) = tokio::task::spawn_blocking(move || mine_chain(blocks, bytes))
        .await
        .map_err(|e| PeerError::Internal(e.to_string()))??;
    progress(
        quiet,
        format!("mined {blocks} regtest blocks of {size} bytes ({txs} txs each) in {:.1}s", t.elapsed().as_secs_f64()),
    );
    rep.info("sync_block_bytes", size as f64);
    let svc = ChainService::new(chain::shared(store));
    let regtest = ChainId::new("regtest").map_err(|e| PeerError::Internal(e.to_string()))?;
    let specs =
        vec![NodeSpec { serve: None }, NodeSpec { serve: Some((regtest, Arc::new(svc.clone()) as Arc<dyn Service>)) }];
    let o = Overlay::start("overlay-c", root, 3, specs, plan.tune, quiet).await?;
    let direct = direct_server(Arc::new(svc)).await?;
    sync_figures(&o, direct, plan, &mut rep, quiet).await?;
    Ok(rep)
}

/// Runs `f` on a runtime of its own, which is shut down afterwards: the in-process nodes of an overlay have
/// no shutdown of their own, and must not keep running (and announcing) into the next measurement.
async fn on_own_runtime<F>(f: F) -> Result<Report, PeerError>
where
    F: std::future::Future<Output = Result<Report, PeerError>> + Send + 'static,
{
    /// Shuts the runtime down without blocking, also when the bench is interrupted while waiting for it
    /// (dropping a runtime inside another one's task would panic).
    struct Own(Option<tokio::runtime::Runtime>);
    impl Drop for Own {
        fn drop(&mut self) {
            if let Some(rt) = self.0.take() {
                rt.shutdown_background();
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cores()).enable_all().build()?;
    let task = rt.spawn(f);
    let rt = Own(Some(rt));
    let r = task.await;
    drop(rt);
    r.map_err(|e| PeerError::Internal(format!("bench task failed: {e}")))?
}

/// Runs `anomos bench`. SIGINT or SIGTERM stops it: the overlay's processes are killed, the working directory is
/// removed (unless `--keep`), and the exit status is non-zero.
pub async fn run(args: &BenchArgs) -> Result<(), PeerError> {
    if let Some(a) = &args.raw_serve {
        return wan::raw_serve(a, args.raw_bytes).await;
    }
    if let Some(a) = &args.raw_fetch {
        return wan::raw_fetch(a).await;
    }
    let signal = super::first_signal();
    let mut work = Box::pin(measure(args));
    tokio::select! {
        r = &mut work => return r,
        () = signal => {}
    }
    super::procs::kill_live_children();
    drop(work);
    Err(PeerError::Process("bench interrupted by a signal (its processes were killed)".into()))
}

async fn measure(args: &BenchArgs) -> Result<(), PeerError> {
    let plan = Plan::new(args);
    let quiet = false;
    let started = Instant::now();
    let load_start = loadavg();
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let root = TempRoot {
        path: std::env::temp_dir().join(format!("anomos-bench-{}-{nanos}", std::process::id())),
        keep: args.keep,
    };
    super::ensure_private_dir(&root.path)?;
    progress(quiet, format!("working in {} (load average {load_start}, {} cores)", root.path.display(), cores()));
    let mut rep = Report::default();

    let costs = if plan.want("raw") { Some(raw_figures(&plan, &mut rep, quiet).await?) } else { None };

    if plan.want("bulk") || plan.want("build") {
        let (root, plan) = (root.path.clone(), plan.clone());
        rep.merge(on_own_runtime(async move { overlay_a(&root, &plan, costs, quiet).await }).await?);
    }
    if plan.want("sync") {
        let (root, plan) = (root.path.clone(), plan.clone());
        rep.merge(on_own_runtime(async move { overlay_c(&root, &plan, quiet).await }).await?);
    }
    if plan.want("opens") {
        for run in 0..plan.runs {
            let (root, plan) = (root.path.clone(), plan.clone());
            rep.merge(on_own_runtime(async move { opens_run(&root, &plan, run, quiet).await }).await?);
        }
    }

    if plan.want("wan") {
        let (root, plan) = (root.path.clone(), plan.clone());
        rep.merge(
            on_own_runtime(async move {
                let mut rep = Report::default();
                wan::wan_figures(&root, &plan, &mut rep, quiet).await?;
                Ok(rep)
            })
            .await?,
        );
    }

    let load_end = loadavg();
    if args.json {
        print_json(&rep, &plan, (&load_start, &load_end), started.elapsed());
    } else {
        print_table(&rep, &plan, (&load_start, &load_end), started.elapsed());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn bulk_requests_parse() {
        assert_eq!(parse_bulk(b"bulk 1000 4093"), Some((1000, 4093)));
        assert_eq!(parse_bulk(b"bulk 1000 0"), None);
        assert_eq!(parse_bulk(b"hello"), None);
    }

    #[test]
    fn crypto_bound_counts_every_pass() {
        // With CTR free and no TCP cost, one cell of a 3-layer circuit costs 2·3 link GCM passes and 2 e2e
        // passes: 8 passes of ~4 KiB per 4093 bytes of data.
        let c = Costs { gcm: 1e-9, ctr: 0.0, tcp_cpu: 0.0 };
        let (total, stage, with_tcp) = bounds(&c, 3, 1);
        let per_cell = 6.0 * CELL_LEN as f64 + 2.0 * (CELL_PAYLOAD_LEN - 16) as f64;
        assert!((total - RECORD_DATA_MAX as f64 / (per_cell * 1e-9)).abs() < 1.0);
        assert!(stage > total);
        assert_eq!(with_tcp, total);
    }

    #[test]
    fn proc_readers_see_this_process() {
        let me = std::process::id();
        assert!(cpu_secs(me).is_some());
        assert!(rss_bytes(me).unwrap_or(0) > 0);
    }
}
