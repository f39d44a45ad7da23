//! Tracker replicas under load (issue 16): an etcd (started here from the PATH on free loopback ports, or
//! `--etcd URL`), `--replicas` real `anomos-tracker --etcd` processes sharing one key, and N simulated peers of the
//! load generator (`load/peer.rs`: their own keys and 127.x addresses, live probe responders, the real announce
//! interval) spread over the replicas and failing over as the real client does. After the join and a warm-up of
//! circuit requests, one replica is killed (SIGKILL) while the load goes on; printed: requests failed after the
//! kill, the slowest request across the failover, grant and announce latencies before and after, etcd's share.
//!
//! ```text
//! cargo build --release -p anomos-tracker --features etcd
//! cargo run --release -p anomos-tracker --features etcd --example replicas -- --peers 1000
//! ```
//!
//! The last line is machine-readable:
//! `replicas=3 peers=N joined=… killed=1 circuits_after_kill=… circuits_failed_after_kill=… slowest_after_kill_ms=…
//! grant_p99_ms=… announce_p99_ms=… errors=…`.
// Measurement code: a failed assumption should fail loudly, not skew the numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "load/keys.rs"]
mod keys;
#[path = "load/peer.rs"]
mod peer;
// Shared with examples/load.rs, which also reads the tracker's CPU time, memory and descriptors.
#[allow(dead_code)]
#[path = "load/stats.rs"]
mod stats;
// Shared with examples/load.rs, which also reads the tracker's metrics.
#[allow(dead_code)]
#[path = "load/tracker_io.rs"]
mod tracker_io;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::ChainId;
use clap::Parser;
use rand::seq::SliceRandom;

use peer::{Ctx, Peer};
use stats::{fmt_errors, pct, Stats};

/// Tracker replicas on etcd under load, one killed (issue 16).
#[derive(Parser, Debug)]
struct Args {
    /// Simulated peers.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Tracker replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// An etcd to use (its client URL) [default: one started here from `etcd` on the PATH, data in a temp dir].
    #[arg(long)]
    etcd: Option<String>,
    /// New peers started per second during the join.
    #[arg(long, default_value_t = 200.0)]
    join_rate: f64,
    /// Announce interval the replicas hand out.
    #[arg(long, default_value_t = 30)]
    interval: u32,
    /// Circuit requests per second (1 circuit, `--relays` relays each) during the warm-up and after the kill.
    #[arg(long, default_value_t = 50.0)]
    circuit_rate: f64,
    /// Relays per requested path.
    #[arg(long, default_value_t = 2)]
    relays: u8,
    /// Seconds of circuit load before the kill.
    #[arg(long, default_value_t = 15)]
    warm_secs: u64,
    /// Seconds of circuit load after the kill.
    #[arg(long, default_value_t = 30)]
    after_secs: u64,
    /// Port every simulated peer listens on (each on its own 127.x address).
    #[arg(long, default_value_t = 17_101)]
    peer_port: u16,
    /// The tracker binary [default: anomos-tracker next to this example's target directory, built with
    /// `--features etcd`].
    #[arg(long)]
    tracker_bin: Option<PathBuf>,
    /// Seed of the key pool (shared with `examples/load.rs`'s cache).
    #[arg(long, default_value_t = 16)]
    key_seed: u64,
    /// Keep the working directory (logs) and print where it is.
    #[arg(long)]
    keep: bool,
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_etcd(dir: &Path) -> Result<(Proc, String), String> {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| e.to_string())?;
    let child = Command::new("etcd")
        .args(["--name", "load", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("load={peer_url}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting etcd (Debian: apt-get install etcd-server): {e}"))?;
    let proc = Proc(child);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("etcd did not start within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, url))
}

fn tracker_bin(args: &Args) -> Result<PathBuf, String> {
    if let Some(b) = &args.tracker_bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.parent().and_then(|p| p.parent()).map(|p| p.join("anomos-tracker")).ok_or("no target dir")?;
    if !bin.exists() {
        return Err(format!("{} not found: `cargo build --release -p anomos-tracker --features etcd`", bin.display()));
    }
    Ok(bin)
}

/// Starts replica `i` (data in `dir/r<i>`, the key copied from replica 0's) and reads its ready line.
fn start_replica(
    args: &Args,
    dir: &Path,
    i: usize,
    etcd: &str,
    prefix: &str,
) -> Result<(Proc, SocketAddr, Fingerprint), String> {
    let data = dir.join(format!("r{i}"));
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    if i > 0 {
        std::fs::copy(dir.join("r0/tracker.key"), data.join("tracker.key")).map_err(|e| e.to_string())?;
    }
    let log = std::fs::File::create(dir.join(format!("r{i}.log"))).map_err(|e| e.to_string())?;
    let mut child = Command::new(tracker_bin(args)?)
        .args(["--listen", "127.0.0.1:0", "--log-level", "warn", "--interval", &args.interval.to_string()])
        .args(["--max-per-ipv4-24", "0", "--etcd", etcd, "--etcd-prefix", prefix])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).map_err(|e| e.to_string())?;
    let proc = Proc(child);
    let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(k)).map(str::to_string);
    let (Some(addr), Some(fp)) = (field("listen="), field("fingerprint=")) else {
        let log = std::fs::read_to_string(dir.join(format!("r{i}.log"))).unwrap_or_default();
        return Err(format!("replica {i} printed no ready line; its log:\n{log}"));
    };
    Ok((proc, addr.parse().map_err(|e| format!("{e}"))?, Fingerprint::from_hex(&fp).map_err(|e| e.to_string())?))
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}")
    }
}

/// Circuit requests at `rate` per second from random joined peers for `secs` seconds.
async fn circuit_load(ctx: &Arc<Ctx>, live: &[Arc<Peer>], chain: &ChainId, relays: u8, rate: f64, secs: u64) {
    let t0 = Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut k = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep_until((t0 + every.mul_f64(k as f64)).into()).await;
        k += 1;
        let p = Arc::clone(live.choose(&mut rand::thread_rng()).unwrap());
        let (ctx, chain) = (Arc::clone(ctx), chain.clone());
        tokio::spawn(async move { p.request_circuit(&ctx, chain, relays).await });
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicas: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let n = args.peers.max(1);
    let dir = tempfile::Builder::new().prefix("anomos-replicas-").tempdir().map_err(|e| e.to_string())?;
    let (_etcd, url) = match &args.etcd {
        Some(u) => (None, u.clone()),
        None => {
            let (p, u) = start_etcd(dir.path())?;
            (Some(p), u)
        }
    };
    let prefix = format!("/anomos-load-{}/", std::process::id());
    let pool = keys::KeyPool::load_or_generate(n, args.key_seed, &std::env::temp_dir())?;
    let peer_keys: Vec<keys::PeerKey> = (0..n).map(|k| pool.key(k)).collect::<Result<_, _>>()?;

    let mut replicas = Vec::new();
    for i in 0..args.replicas.max(2) {
        replicas.push(start_replica(&args, dir.path(), i, &url, &prefix)?);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|(_, a, _)| *a).collect();
    let fp = replicas[0].2;
    let tracker_key = tracker_io::fetch_key(addrs[0], &fp).await?;
    eprintln!("replicas: etcd {url}, replicas at {addrs:?}; joining {n} peers at {} /s", args.join_rate);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let chain = ChainId::new("regtest").map_err(|e| e.to_string())?;
    let ctx = Arc::new(Ctx {
        tracker: addrs[0],
        replicas: addrs[1..].to_vec(),
        tracker_key,
        chains: vec![chain.clone()],
        // Sessions resume with tickets, as the real client's (SPEC §3.4); a ticket belongs to one replica, so a
        // peer that fails over opens a new session there.
        reuse_idle: Duration::ZERO,
        resume: true,
        spread: true,
        start: Instant::now(),
        stats: Stats::default(),
        stop: stop_rx,
        signer: peer::Signer::start(2),
        handshakes: tokio::sync::Semaphore::new(64),
        channel_version: 2,
        conns: tokio::sync::Semaphore::new(8000),
        longest_interval: Default::default(),
        last_join_ms: Default::default(),
    });
    let s = &ctx.stats;
    let since = |t: Instant| t.duration_since(ctx.start).as_secs_f32();
    let peers: Vec<Arc<Peer>> =
        peer_keys.into_iter().enumerate().map(|(k, key)| Peer::new(k, key, args.peer_port)).collect();
    let by_addr: HashMap<SocketAddr, Arc<Peer>> = peers.iter().map(|p| (p.listen, Arc::clone(p))).collect();
    peer::answer_probes(Arc::clone(&ctx), Arc::new(by_addr), args.peer_port).await?;
    let join_start = Instant::now();
    let spacing = Duration::from_secs_f64(1.0 / args.join_rate.max(0.001));
    for (k, p) in peers.iter().enumerate() {
        tokio::time::sleep_until((join_start + spacing.mul_f64(k as f64)).into()).await;
        tokio::spawn(Arc::clone(p).run(Arc::clone(&ctx), Instant::now()));
    }
    let joined = || peers.iter().filter(|p| p.joined.load(Ordering::Relaxed)).count();
    let join_timeout = Duration::from_secs((n as f64 / args.join_rate) as u64 + 120);
    while joined() < n && join_start.elapsed() < join_timeout {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let join_s = join_start.elapsed().as_secs_f64();
    let join_n = joined();
    eprintln!(
        "replicas: {join_n}/{n} joined in {join_s:.1} s; {} s of circuits, then replica 0 is killed",
        args.warm_secs
    );
    let live: Vec<Arc<Peer>> = peers.iter().filter(|p| p.joined.load(Ordering::Relaxed)).cloned().collect();
    if live.is_empty() {
        return Err("no peer joined".into());
    }

    let warm0 = Instant::now();
    circuit_load(&ctx, &live, &chain, args.relays, args.circuit_rate, args.warm_secs).await;
    let kill = Instant::now();
    let (mut killed, killed_addr, _) = replicas.remove(0);
    let _ = killed.0.kill();
    let _ = killed.0.wait();
    eprintln!("replicas: killed the replica at {killed_addr}; {} s of circuits on", args.after_secs);
    let failovers0: u64 = peers.iter().map(|p| p.failovers.load(Ordering::Relaxed)).sum();
    circuit_load(&ctx, &live, &chain, args.relays, args.circuit_rate, args.after_secs).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the last requests finish
    let end = Instant::now();
    let failovers: u64 = peers.iter().map(|p| p.failovers.load(Ordering::Relaxed)).sum::<u64>() - failovers0;
    let _ = stop_tx.send(true);

    let grants_before = s.grants.window(since(warm0), since(kill));
    let grants_after = s.grants.window(since(kill), since(end));
    let ann_before = s.announce_total.window(since(warm0), since(kill));
    let ann_after = s.announce_total.window(since(kill), since(end));
    let err_before = s.errors(since(warm0), since(kill));
    let err_after = s.errors(since(kill), since(end));
    let circ_failed_after: u64 = err_after.iter().filter(|(k, _)| k.starts_with("circuit/")).map(|(_, v)| v).sum();
    let all_err = s.errors(0.0, f32::MAX);
    let slowest = grants_after.last().copied().unwrap_or(f32::NAN).max(ann_after.last().copied().unwrap_or(f32::NAN));
    println!(
        "anomos-tracker replicas: {} replicas on etcd, {n} simulated peers, interval {} s, {} circuit requests/s ({} relays)",
        addrs.len(),
        args.interval,
        args.circuit_rate,
        args.relays
    );
    println!("  peers joined                       {join_n}/{n} in {join_s:.1} s");
    println!("  errors during the join             {}", fmt_errors(&s.errors(0.0, since(warm0))));
    println!("before the kill ({} s):", args.warm_secs);
    println!(
        "  grants / p50 / p99 (ms)            {} / {} / {}",
        grants_before.len(),
        ms(pct(&grants_before, 50.0)),
        ms(pct(&grants_before, 99.0))
    );
    println!(
        "  announces / p50 / p99 (ms)         {} / {} / {}",
        ann_before.len(),
        ms(pct(&ann_before, 50.0)),
        ms(pct(&ann_before, 99.0))
    );
    println!("  errors                             {}", fmt_errors(&err_before));
    println!("after killing one replica ({} s + 3 s to finish):", args.after_secs);
    println!(
        "  grants / p50 / p99 (ms)            {} / {} / {}",
        grants_after.len(),
        ms(pct(&grants_after, 50.0)),
        ms(pct(&grants_after, 99.0))
    );
    println!(
        "  announces / p50 / p99 (ms)         {} / {} / {}",
        ann_after.len(),
        ms(pct(&ann_after, 50.0)),
        ms(pct(&ann_after, 99.0))
    );
    println!("  requests that failed over          {failovers}");
    println!("  slowest request (ms, incl. failover) {}", ms(f64::from(slowest)));
    println!("  circuit requests failed            {circ_failed_after}   (target 0 after the peer's failover, <= 2 s)");
    println!("  errors                             {}", fmt_errors(&err_after));
    let err_total: u64 = all_err.values().sum();
    println!(
        "replicas={} peers={n} joined={join_n} killed=1 circuits_after_kill={} circuits_failed_after_kill={circ_failed_after} slowest_after_kill_ms={} grant_p99_ms={} announce_p99_ms={} errors={err_total}",
        addrs.len(),
        grants_after.len() as u64 + circ_failed_after,
        ms(f64::from(slowest)),
        ms(pct(&grants_after, 99.0)),
        ms(pct(&ann_after, 99.0)),
    );
    drop(replicas);
    if args.keep {
        eprintln!("replicas: kept {}", dir.keep().display());
    }
    Ok(())
}
