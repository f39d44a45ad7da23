//! Tracker load generator (issue 16): starts a real `anomos-tracker` process and N simulated peers that speak the
//! real protocol, each with its own key and its own 127.x address with a live probe responder, announcing at the
//! real interval, then adds a circuit-request load, and prints what the tracker sustained next to the targets.
//!
//! ```text
//! cargo build --release -p anomos-tracker
//! cargo run --release -p anomos-tracker --example load -- --peers 10000 --restart
//! ```
//!
//! Phases, each bounded: keys (a prime pool, see `load/keys.rs`; cached in the temp dir), join (peers start at
//! `--join-rate` per second; ends when all have announced once or after `--join-timeout`), steady (`--duration`
//! seconds of announces only: announce latency, tracker CPU per announce, RSS), circuits (`--circuit-secs` of
//! `--circuit-rate` requests per second from random joined peers, on top of the announces), and with `--restart`
//! a restart of the tracker (`load/restart.rs`: time to the first grant, neighbor entries kept). The generator and
//! the tracker share the machine: the generator's own CPU time is printed too (it signs every probe answer and
//! every session Hello with RSA, about as much work as the tracker does per announce).
//!
//! It raises its open-file limit with `prlimit` (to `--nofile` where allowed, else to the hard limit), and the
//! tracker inherits it. Peers resume their tracker sessions on a new connection per request (SPEC §3.4), so they
//! hold no descriptor between requests on either side; all peers' probe responders share one listening socket.
//! Requests the tracker sheds ("busy, retry later": `Full`, or a connection closed before the ServerHello) are
//! counted as retries, apart from errors (`load/stats.rs`).
//! The last line is machine-readable:
//! `peers=N joined=… join_s=… announce_p99_ms=… cpu_per_announce_ms=… grant_p99_ms=… errors=…`.
// Measurement code: a failed assumption should fail loudly, not skew the numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

#[path = "load/keys.rs"]
mod keys;
#[path = "load/peer.rs"]
mod peer;
#[path = "load/restart.rs"]
mod restart;
#[path = "load/stats.rs"]
mod stats;
#[path = "load/tracker_io.rs"]
mod tracker_io;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::ChainId;
use clap::Parser;
use rand::seq::SliceRandom;

use peer::{Ctx, Peer};
use stats::{fmt_errors, pct, Stats};
use tracker_io::{counter, fetch_key, tracker_counters};

/// Load generator for anomos-tracker (issue 16).
#[derive(Parser, Debug)]
struct Args {
    /// Simulated peers.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// New peers started per second during the join phase (offered rate).
    #[arg(long, default_value_t = 1000.0)]
    join_rate: f64,
    /// Longest join phase in seconds [default: peers / join-rate + 120].
    #[arg(long)]
    join_timeout: Option<u64>,
    /// Seconds of steady announcing measured after the join (at least one announce interval to see every peer).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seconds of circuit-request load after the steady phase (0: none).
    #[arg(long, default_value_t = 30)]
    circuit_secs: u64,
    /// Circuit requests per second during the circuit phase (1 circuit each).
    #[arg(long, default_value_t = 20.0)]
    circuit_rate: f64,
    /// Relays per requested path (2 relays + the target = 3 hops).
    #[arg(long, default_value_t = 2)]
    relays: u8,
    /// The tracker's `--interval` (30 s is its default): the interval it hands out to up to 1,000 announces a
    /// second; a larger overlay is handed a longer one (its `--announce-rate`), which the peers follow.
    #[arg(long, default_value_t = 30)]
    interval: u32,
    /// Keep each peer's connection open between requests (reused while idle under --reuse-idle-secs), as the client
    /// did before session tickets, instead of resuming the session on a new connection per request (SPEC §3.4).
    /// Every peer then holds a descriptor on each side: the open-file limit bounds the peers.
    #[arg(long)]
    no_resume: bool,
    /// The tracker channel version the simulated peers speak: 2 (the tracker's certified static key, probes
    /// answered by a MAC: one RSA operation per join, the peer's Hello) or 1 (three per join).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=2))]
    channel_version: u16,
    /// With --no-resume: reuse a peer's connection while it has been idle for less than this (the old client's
    /// 75 s). 0 closes it after each request (a full session set-up per request).
    #[arg(long, default_value_t = 75)]
    reuse_idle_secs: u64,
    /// Finally restart the tracker (SIGTERM, start on the same address and data directory) and measure: time to
    /// the first circuit granted again, and the share of neighbor-table entries kept once every peer re-announced.
    #[arg(long)]
    restart: bool,
    /// Longest wait for the peers' re-announces after the restart [default: 2 × the longest interval handed out
    /// + 60 s].
    #[arg(long)]
    restart_wait_secs: Option<u64>,
    /// Keep the working directory (the tracker's log and state database) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Keep the announce phases the join gave (the real peer adds no jitter: peers that joined within seconds
    /// announce within seconds of each other, every interval). By default each peer's second announce comes after
    /// a random fraction of the interval, so the steady phase sees the spread of peers that joined over hours.
    #[arg(long)]
    no_spread: bool,
    /// Port every simulated peer listens on (each on its own 127.x address).
    #[arg(long, default_value_t = 17_001)]
    peer_port: u16,
    /// The tracker binary [default: anomos-tracker next to this example's target directory].
    #[arg(long)]
    tracker_bin: Option<PathBuf>,
    /// Extra tracker argument (repeatable), e.g. `--tracker-arg=--max-sessions=100000`.
    #[arg(long, allow_hyphen_values = true)]
    tracker_arg: Vec<String>,
    /// Open-file limit set for the tracker and the generator.
    #[arg(long, default_value_t = 1_048_576)]
    nofile: u64,
    /// Generator threads that sign (probe answers first, then Hellos).
    #[arg(long, default_value_t = 1)]
    sign_threads: usize,
    /// Full session set-ups (Hello signatures) the generator runs at once; more peers wait their turn (the
    /// generator's own pacing: each real peer would sign on its own machine).
    #[arg(long, default_value_t = 64)]
    handshakes_at_once: usize,
    /// Tracker connections the generator opens at once (its own open-file limit is shared by all simulated peers;
    /// requests beyond wait for a slot, and that wait is not counted in their latency).
    #[arg(long, default_value_t = 8000)]
    conns_at_once: usize,
    /// Seed of the key pool (keys are cached per seed in the temp dir).
    #[arg(long, default_value_t = 16)]
    key_seed: u64,
}

fn tracker_bin(args: &Args) -> Result<PathBuf, String> {
    if let Some(b) = &args.tracker_bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/examples/load → target/release/anomos-tracker
    let bin = exe.parent().and_then(|p| p.parent()).map(|p| p.join("anomos-tracker")).ok_or("no target dir")?;
    if !bin.exists() {
        return Err(format!("{} not found: run `cargo build --release -p anomos-tracker` first", bin.display()));
    }
    Ok(bin)
}

/// Kills the tracker when the generator ends, however it ends.
struct TrackerProc(Child);

impl Drop for TrackerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the tracker (it inherits the generator's open-file limit) and reads its ready line; returns the
/// process, its address and its fingerprint.
type Started = (TrackerProc, SocketAddr, Fingerprint, Option<SocketAddr>);

fn start_tracker(args: &Args, dir: &std::path::Path, listen: &str) -> Result<Started, String> {
    let bin = tracker_bin(args)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("tracker.log"))
        .map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--listen",
        listen,
        "--metrics",
        "127.0.0.1:0",
        "--log-level",
        "warn",
        "--interval",
        &args.interval.to_string(),
        // Simulated peers fill 127.A.B.1–254, so a /24 holds up to 254 of them: lift the per-/24 admission
        // limit (issue 14), keep the per-address one (each peer has its own address).
        "--max-per-ipv4-24",
        "0",
    ]);
    cmd.arg("--data-dir").arg(dir.join("tracker")).args(&args.tracker_arg);
    let child =
        cmd.stdout(Stdio::piped()).stderr(log).spawn().map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut proc = TrackerProc(child);
    let out = proc.0.stdout.take().ok_or("no tracker stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let log = std::fs::read_to_string(dir.join("tracker.log")).unwrap_or_default();
            return Err(format!("the tracker printed no ready line; its log:\n{log}"));
        };
        if let Some(rest) = line.strip_prefix("anomos-tracker ready ") {
            let field = |k: &str| rest.split_whitespace().find_map(|f| f.strip_prefix(k)).map(str::to_string);
            let addr = field("listen=").and_then(|a| a.parse().ok()).ok_or("ready line without listen=")?;
            let fp = field("fingerprint=").ok_or("ready line without fingerprint=")?;
            let fp = Fingerprint::from_hex(&fp).map_err(|e| e.to_string())?;
            // The metrics line follows at once (we pass --metrics).
            let metrics = rx
                .recv_timeout(Duration::from_secs(10))
                .ok()
                .and_then(|l| l.strip_prefix("anomos-tracker metrics listen=").and_then(|a| a.trim().parse().ok()));
            return Ok((proc, addr, fp, metrics));
        }
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}")
    }
}

/// `name  value  (target …, met / NOT met)`.
fn line(name: &str, value: String, target: &str, met: Option<bool>) {
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "",
    };
    println!("  {name:<34} {value:>12}   target {target} {verdict}");
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let n = args.peers.max(1);
    let pid = std::process::id();
    let mut raise = Command::new("prlimit");
    raise.arg(format!("--pid={pid}")).arg(format!("--nofile={0}:{0}", args.nofile));
    if !raise.stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        // Without CAP_SYS_RESOURCE (e.g. in a container) at least the soft limit can go up to the hard one.
        raise = Command::new("sh");
        raise.args(["-c", &format!("prlimit --pid={pid} --nofile=$(ulimit -Hn):$(ulimit -Hn)")]);
        let _ = raise.status();
    }
    let limit = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let limit = limit.lines().find(|l| l.starts_with("Max open files")).unwrap_or("Max open files ?").to_string();
    eprintln!("load: {} (the tracker inherits it)", limit.split_whitespace().collect::<Vec<_>>().join(" "));
    let dir = tempfile::Builder::new().prefix("anomos-load-").tempdir().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let pool = keys::KeyPool::load_or_generate(n, args.key_seed, &std::env::temp_dir())?;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads);
    let peer_keys = std::thread::scope(|sc| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                let pool = &pool;
                sc.spawn(move || (t * chunk..((t + 1) * chunk).min(n)).map(|k| pool.key(k)).collect::<Vec<_>>())
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for p in parts {
            all.extend(p.join().map_err(|_| "key thread panicked".to_string())?);
        }
        all.into_iter().collect::<Result<Vec<_>, String>>()
    })?;
    eprintln!("load: {n} keys ready in {:.1} s", t.elapsed().as_secs_f64());
    // What one simulated peer's RSA signature costs here (each join takes two: Hello and probe answer).
    let t = Instant::now();
    for i in 0..200u32 {
        peer_keys[0].sign(&i.to_be_bytes())?;
    }
    eprintln!("load: one RSA-2048 PSS signature takes {:.0} µs here", t.elapsed().as_secs_f64() * 1e6 / 200.0);

    let (mut tracker_proc, addr, fp, metrics) = start_tracker(&args, dir.path(), "127.0.0.1:0")?;
    let tpid = tracker_proc.0.id();
    let tracker_key = fetch_key(addr, &fp).await?;
    eprintln!("load: tracker pid {tpid} at {addr}; joining {n} peers at {} /s", args.join_rate);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let chain = ChainId::new("regtest").map_err(|e| e.to_string())?;
    let ctx = Arc::new(Ctx {
        tracker: addr,
        replicas: Vec::new(),
        tracker_key,
        chains: vec![chain.clone()],
        reuse_idle: if args.no_resume { Duration::from_secs(args.reuse_idle_secs) } else { Duration::ZERO },
        resume: !args.no_resume,
        spread: !args.no_spread,
        start: Instant::now(),
        stats: Stats::default(),
        stop: stop_rx,
        signer: peer::Signer::start(args.sign_threads),
        handshakes: tokio::sync::Semaphore::new(args.handshakes_at_once.max(1)),
        channel_version: args.channel_version,
        conns: tokio::sync::Semaphore::new(args.conns_at_once.max(1)),
        longest_interval: Default::default(),
        last_join_ms: AtomicU64::new(0),
    });
    let s = &ctx.stats;
    let since = |t: Instant| t.duration_since(ctx.start).as_secs_f32();

    // Join: start peers at the offered rate.
    let join_start = Instant::now();
    // NaN where /proc could not be read (e.g. the generator itself out of descriptors): printed as NaN, not 0.
    let cpu = || stats::cpu_time(tpid).map_or(f64::NAN, |d| d.as_secs_f64());
    let rss = |p: u32| stats::rss(p).map_or(f64::NAN, |b| b as f64);
    let (rss0, cpu0) = (rss(tpid), cpu());
    // The tracker's open descriptors, sampled every second: the most it held is what its open-file limit must allow.
    let max_fds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (max_fds, mut stop) = (Arc::clone(&max_fds), ctx.stop.clone());
        tokio::spawn(async move {
            loop {
                if let Some(n) = stats::fds(tpid) {
                    max_fds.fetch_max(n, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }
    let peers: Vec<Arc<Peer>> =
        peer_keys.into_iter().enumerate().map(|(k, key)| Peer::new(k, key, args.peer_port)).collect();
    let by_addr: HashMap<SocketAddr, Arc<Peer>> = peers.iter().map(|p| (p.listen, Arc::clone(p))).collect();
    peer::answer_probes(Arc::clone(&ctx), Arc::new(by_addr), args.peer_port).await?;
    let join_timeout = Duration::from_secs(args.join_timeout.unwrap_or((n as f64 / args.join_rate) as u64 + 120));
    let spacing = Duration::from_secs_f64(1.0 / args.join_rate.max(0.001));
    for (k, p) in peers.iter().enumerate() {
        tokio::time::sleep_until((join_start + spacing.mul_f64(k as f64)).into()).await;
        tokio::spawn(Arc::clone(p).run(Arc::clone(&ctx), Instant::now()));
        if join_start.elapsed() > join_timeout {
            break;
        }
        if k % 1000 == 999 {
            let joined = peers.iter().filter(|p| p.joined.load(Ordering::Relaxed)).count();
            eprintln!("load: {} started, {joined} joined, {:.0} s", k + 1, join_start.elapsed().as_secs_f64());
        }
    }
    let joined = || peers.iter().filter(|p| p.joined.load(Ordering::Relaxed)).count();
    while joined() < peers.len() && join_start.elapsed() < join_timeout {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let join_end = Instant::now();
    let join_n = joined();
    // The join time is the wall time from the first peer started to the last one's first successful announce
    // (polled every 200 ms; NaN if not all joined); the slowest single join is printed next to it.
    let join_s = if join_n == n { join_end.duration_since(join_start).as_secs_f64() } else { f64::NAN };
    let slowest = s.joins.window(0.0, f32::MAX).last().map_or(f64::NAN, |ms| f64::from(*ms) / 1000.0);
    let join_cpu = cpu() - cpu0;
    eprintln!("load: {join_n}/{n} joined in {join_s:.1} s; steady phase of {} s", args.duration);

    // Steady: announces only.
    let (st0, cpu1, gcpu1) = (Instant::now(), cpu(), stats::cpu_time(pid));
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let (st1, cpu2, gcpu2) = (Instant::now(), cpu(), stats::cpu_time(pid));
    let (rss1, grss) = (rss(tpid), rss(pid));
    let fds1 = stats::fds(tpid).map_or("?".to_string(), |n| n.to_string());
    let steady_ann = s.announce_total.window(since(st0), since(st1));
    let steady_req = s.announces.window(since(st0), since(st1));
    let steady_sess = s.sessions.window(since(st0), since(st1));
    let steady_res = s.resumes.window(since(st0), since(st1));
    let steady_err = s.errors(since(st0), since(st1));
    let steady_cpu = cpu2 - cpu1;
    let cpu_per_ann = steady_cpu * 1000.0 / steady_ann.len().max(1) as f64;

    // Circuits, on top of the announces (the tracker's own latency histogram read before and after).
    let hist0 = match metrics {
        Some(m) => tracker_counters(m).await,
        None => Vec::new(),
    };
    let ct0 = Instant::now();
    if args.circuit_secs > 0 && args.circuit_rate > 0.0 {
        eprintln!("load: circuit phase: {} requests/s for {} s", args.circuit_rate, args.circuit_secs);
        let live: Vec<Arc<Peer>> = peers.iter().filter(|p| p.joined.load(Ordering::Relaxed)).cloned().collect();
        let every = Duration::from_secs_f64(1.0 / args.circuit_rate);
        let mut k = 0u64;
        while !live.is_empty() && ct0.elapsed() < Duration::from_secs(args.circuit_secs) {
            tokio::time::sleep_until((ct0 + every.mul_f64(k as f64)).into()).await;
            k += 1;
            let p = Arc::clone(live.choose(&mut rand::thread_rng()).ok_or("no peer")?);
            let (ctx, chain, relays) = (Arc::clone(&ctx), chain.clone(), args.relays);
            tokio::spawn(async move { p.request_circuit(&ctx, chain, relays).await });
        }
        tokio::time::sleep(Duration::from_secs(2)).await; // let the last requests finish
    }
    let ct1 = Instant::now();
    let cpu3 = cpu();
    let grants = s.grants.window(since(ct0), since(ct1));
    let circ_err = s.errors(since(ct0), since(ct1));
    let all_err = s.errors(0.0, f32::MAX);
    let tracker_alive = tracker_proc.0.try_wait().ok().flatten().is_none();
    let counters = match metrics {
        Some(m) if tracker_alive => tracker_counters(m).await,
        _ => Vec::new(),
    };
    let lock_max_us = counter(&counters, "anomos_tracker_state_lock_max_hold_microseconds");
    let lock_mean_us = counter(&counters, "anomos_tracker_state_lock_hold_microseconds_total")
        / counter(&counters, "anomos_tracker_state_lock_holds_total");
    let restarted = if args.restart && tracker_alive {
        eprintln!("load: restarting the tracker (SIGTERM, then the same address and data directory)");
        let before = restart::snapshot(&peers, ctx.last_join_ms.load(Ordering::Relaxed));
        let sigterm = Instant::now();
        let stop_s = restart::stop(tpid, || tracker_proc.0.try_wait().ok().flatten().is_some()).await?;
        let t = Instant::now();
        let (proc2, _, _, _) = start_tracker(&args, dir.path(), &addr.to_string())?;
        let start_s = t.elapsed().as_secs_f64();
        tracker_proc = proc2;
        let longest = ctx.longest_interval.load(Ordering::Relaxed).max(args.interval);
        let wait = Duration::from_secs(args.restart_wait_secs.unwrap_or(u64::from(longest) * 2 + 60));
        let r =
            restart::measure(&ctx, &peers, &before, sigterm, stop_s, start_s, chain.clone(), args.relays, wait).await;
        Some(r)
    } else {
        None
    };
    let _ = stop_tx.send(true);

    let dur = st1.duration_since(st0).as_secs_f64();
    println!(
        "anomos-tracker load: {n} simulated peers, announce interval {} s (longest handed out {} s), tracker pid {tpid}",
        args.interval,
        ctx.longest_interval.load(Ordering::Relaxed)
    );
    println!("join ({} new/s offered):", args.join_rate);
    line("peers joined", format!("{join_n}/{n}"), "100,000 peers held", None);
    line("join time (s, all peers)", format!("{join_s:.1}"), "<= 150 s for 100,000", None);
    line("slowest join (s, start to first announce)", format!("{slowest:.1}"), "-", None);
    line("joins/s", format!("{:.0}", join_n as f64 / join_end.duration_since(join_start).as_secs_f64()), "-", None);
    line("errors during join", fmt_errors(&s.errors(0.0, since(join_end))), "0", None);
    line("retries during join (shed, backed off)", fmt_errors(&s.retries(0.0, since(join_end))), "-", None);
    line("tracker CPU during join (s)", format!("{join_cpu:.1}"), "-", None);
    println!("steady ({dur:.0} s, announces only):");
    line("announces", steady_ann.len().to_string(), "-", None);
    line("announces/s", format!("{:.0}", steady_ann.len() as f64 / dur), "-", None);
    line("announce p50 (ms, incl. session)", ms(pct(&steady_ann, 50.0)), "-", None);
    let p99 = pct(&steady_ann, 99.0);
    line("announce p99 (ms, incl. session)", ms(p99), "<= 50 ms", Some(p99 <= 50.0));
    line(
        "announce request p50/p99 (ms)",
        format!("{}/{}", ms(pct(&steady_req, 50.0)), ms(pct(&steady_req, 99.0))),
        "-",
        None,
    );
    line("sessions set up / p99 (ms)", format!("{}/{}", steady_sess.len(), ms(pct(&steady_sess, 99.0))), "-", None);
    line(
        "sessions resumed / p50/p99 (ms)",
        format!("{}/{}/{}", steady_res.len(), ms(pct(&steady_res, 50.0)), ms(pct(&steady_res, 99.0))),
        "-",
        None,
    );
    line("tracker CPU per announce (ms)", format!("{cpu_per_ann:.3}"), "<= 0.3 ms", Some(cpu_per_ann <= 0.3));
    line("tracker CPU (% of one core)", format!("{:.0}", steady_cpu / dur * 100.0), "-", None);
    if let (Some(a), Some(b)) = (gcpu1, gcpu2) {
        line("generator CPU (% of one core)", format!("{:.0}", (b - a).as_secs_f64() / dur * 100.0), "-", None);
    }
    let per_peer = (rss1 - rss0) / join_n.max(1) as f64;
    line("tracker RSS (MB)", format!("{:.1}", rss1 / 1e6), "-", None);
    line("tracker RSS per peer (KB)", format!("{:.1}", per_peer / 1e3), "-", None);
    line("generator RSS per peer (KB)", format!("{:.1}", grss / n as f64 / 1e3), "-", None);
    line("tracker open fds (end of steady / most)", format!("{fds1}/{}", max_fds.load(Ordering::Relaxed)), "-", None);
    line("errors (steady)", fmt_errors(&steady_err), "0", None);
    let cdur = ct1.duration_since(ct0).as_secs_f64();
    let gp99 = pct(&grants, 99.0);
    println!(
        "circuits ({} s + {:.0} s to finish, {} requests/s offered, {} relays + target):",
        args.circuit_secs,
        cdur - args.circuit_secs as f64,
        args.circuit_rate,
        args.relays
    );
    line("grants/s", format!("{:.1}", grants.len() as f64 / (args.circuit_secs as f64).max(1e-9)), "-", None);
    line("grant p50 (ms)", ms(pct(&grants, 50.0)), "-", None);
    line("grant p99 (ms)", ms(gp99), "<= 20 ms", Some(gp99 <= 20.0));
    let tq = |q| tracker_io::tracker_quantile_ms(&hist0, &counters, "circuits", q);
    line("grant p50/p99 in the tracker (ms)", format!("{}/{}", ms(tq(0.5)), ms(tq(0.99))), "read to reply", None);
    let circ_cpu = (cpu3 - cpu2) * 1000.0;
    let circ_ann = s.announce_total.window(since(ct0), since(ct1)).len() as f64;
    line("tracker CPU during circuits (s)", format!("{:.1}", circ_cpu / 1000.0), "-", None);
    let per_grant = (circ_cpu - circ_ann * cpu_per_ann).max(0.0) / grants.len().max(1) as f64;
    line("tracker CPU per grant (ms)", format!("{per_grant:.2}"), "(CPU less the announces')", None);
    line("errors (circuits)", fmt_errors(&circ_err), "0", None);
    line("errors (whole run)", fmt_errors(&all_err), "0", None);
    let all_retries = s.retries(0.0, f32::MAX);
    line("retries (whole run, shed, backed off)", fmt_errors(&all_retries), "-", None);
    let notes = s.notes(0.0, f32::MAX);
    if !notes.is_empty() {
        line("notes", fmt_errors(&notes), "-", None);
    }
    println!("tracker's own counters at the end:");
    for c in counters.iter().filter(|c| !c.contains("_bucket{")) {
        println!("  {c}");
    }
    line("state lock: longest hold (ms)", ms(lock_max_us / 1000.0), "-", None);
    let lock_cpu_us = counter(&counters, "anomos_tracker_state_lock_max_hold_cpu_microseconds");
    line("state lock: most CPU in one hold (ms)", ms(lock_cpu_us / 1000.0), "-", None);
    line("state lock: mean hold (ms)", format!("{:.4}", lock_mean_us / 1000.0), "-", None);
    line("tracker still running", tracker_alive.to_string(), "true", Some(tracker_alive));
    let mut restart_tail = String::new();
    if let Some(r) = &restarted {
        println!("restart (SIGTERM, same address and data directory, all peers running):");
        line("stop (s)", format!("{:.2}", r.stop_s), "-", None);
        line("start incl. state load (s)", format!("{:.2}", r.start_s), "-", None);
        line("first grant after SIGTERM (s)", format!("{:.2}", r.grant_s), "<= 5 s", Some(r.grant_s <= 5.0));
        line("peers re-announced", format!("{}/{}", r.reannounced, r.joined), "-", None);
        line("last re-announce after SIGTERM (s)", format!("{:.1}", r.reannounce_s), "-", None);
        line(
            "neighbor entries kept (%)",
            format!(
                "{:.2} ({}/{}; tables of {} peers answered after the last join)",
                r.kept_pct(),
                r.kept,
                r.entries,
                r.compared
            ),
            "100 %",
            Some(r.compared > 0 && r.kept == r.entries),
        );
        line("errors (restart)", fmt_errors(&r.errors), "only while down", None);
        restart_tail = format!(" restart_edges_kept_pct={:.2} restart_grant_s={:.2}", r.kept_pct(), r.grant_s);
    }
    if !tracker_alive {
        let log = std::fs::read_to_string(dir.path().join("tracker.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("load: the tracker exited; the end of its log:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    let err_total: u64 = all_err.values().sum();
    let retry_total: u64 = all_retries.values().sum();
    println!(
        "peers={n} joined={join_n} join_s={join_s:.1} announce_p99_ms={} cpu_per_announce_ms={cpu_per_ann:.3} grant_p99_ms={} errors={err_total} retries={retry_total}{restart_tail}",
        ms(p99),
        ms(gp99)
    );
    drop(tracker_proc);
    if args.keep {
        eprintln!("load: kept {}", dir.keep().display());
    }
    Ok(())
}
