//! `anomos demo`: a whole overlay on 127.0.0.1 — a tracker, relay peers and a serving peer as separate OS
//! processes (ephemeral ports, temporary data dirs, the tracker's fingerprint wired in) — then a fetch of a
//! regtest chain over multi-hop circuits from this process, a summary, and clean-up.

use std::time::Instant;

use clap::Args;

use super::procs::{spawn_ready, stop_all, TempRoot};
use crate::cmd::fetch::{self, FetchOptions};
use crate::error::PeerError;

/// Flags of `anomos demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Relay peers to start.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=32))]
    pub relays: u32,
    /// Regtest blocks the serving peer mines and the requester fetches.
    #[arg(long, default_value_t = 500)]
    pub blocks: u32,
    /// Relays per circuit (hops = relays + 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=6))]
    pub circuit_relays: u8,
    /// Circuits to open (to distinct serving peers; the demo starts this many serving peers).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    pub circuits: u8,
    /// Keep the temporary directory (logs, keys) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the demo.
pub async fn run(args: &DemoArgs) -> Result<(), PeerError> {
    let started = Instant::now();
    // A signal while the overlay starts stops what was started (the fetch handles its own signals later).
    let signal = super::first_signal();
    tokio::pin!(signal);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let root = TempRoot {
        path: std::env::temp_dir().join(format!("anomos-demo-{}-{nanos}", std::process::id())),
        keep: args.keep,
    };
    super::ensure_private_dir(&root.path)?;
    let dir = |n: &str| root.path.join(n).display().to_string();
    println!("demo: working in {}", root.path.display());

    let tracker_args =
        ["tracker", "--listen", "127.0.0.1:0", "--data-dir", &dir("tracker"), "--allow-same-ip", "--interval", "2"]
            .map(String::from);
    let tracker_log = root.path.join("tracker.log");
    let (tracker, taddr, tfp) = tokio::select! {
        r = spawn_ready("tracker", &tracker_args, &tracker_log) => r?,
        () = &mut signal => {
            println!("demo: interrupted while starting");
            return Ok(());
        }
    };
    println!("demo: tracker {taddr} fingerprint {}…", &tfp[..16]);
    let mut procs = vec![tracker];
    let peer_args = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["peer", "--listen", "127.0.0.1:0", "--tracker", &taddr, "--tracker-fp", &tfp, "--data-dir", &dir(name)]
                .map(String::from)
                .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut starts = Vec::new();
    for i in 0..args.relays {
        let name = format!("relay{i}");
        starts.push((name.clone(), peer_args(&name, &[])));
    }
    let blocks = args.blocks.to_string();
    for i in 0..args.circuits {
        let name = format!("server{i}");
        starts.push((name.clone(), peer_args(&name, &["--serve", "regtest", "--mine", &blocks])));
    }
    let spawning = crate::node::futures_join_all(starts.iter().map(|(name, a)| {
        let log = root.path.join(format!("{name}.log"));
        async move { spawn_ready(name, a, &log).await }
    }));
    let spawned = tokio::select! {
        s = spawning => s,
        () = &mut signal => {
            // Peers still starting are killed as their handles drop; the ones up stop gracefully.
            let clean = stop_all(&mut procs, std::time::Duration::from_secs(5)).await;
            println!("demo: interrupted while starting; {clean} process(es) stopped cleanly");
            return Ok(());
        }
    };
    for r in spawned {
        let (p, listen, fp) = r?;
        println!("demo: {:<8} {listen} fingerprint {}…", p.name, &fp[..16]);
        procs.push(p);
    }
    println!(
        "demo: {} processes up after {:.1}s; fetching {} regtest blocks over {}-hop circuits",
        procs.len(),
        started.elapsed().as_secs_f64(),
        args.blocks,
        args.circuit_relays + 1
    );

    let node_cfg = crate::config::PeerConfig::new(
        "127.0.0.1:0".parse().map_err(|e| PeerError::Internal(format!("{e}")))?,
        taddr.parse().map_err(|e| PeerError::Process(format!("tracker addr: {e}")))?,
        tfp.clone(),
        root.path.join("requester"),
    );
    let opts = FetchOptions {
        circuits: args.circuits,
        relays: args.circuit_relays,
        ..FetchOptions::new(anomos_proto::btc::NetParams::regtest())
    };
    let report = fetch::fetch(node_cfg, &opts).await;
    // Stop the overlay gracefully whatever happened (SIGTERM: circuits broken, stores closed).
    let n = procs.len();
    let clean = stop_all(&mut procs, std::time::Duration::from_secs(5)).await;
    let report = report?;
    report.print();
    if report.interrupted {
        println!("demo: interrupted; {clean} of {n} processes stopped cleanly");
        return Ok(());
    }
    if report.blocks < args.blocks as u64 {
        return Err(PeerError::Chain(format!("fetched {} of {} blocks", report.blocks, args.blocks)));
    }
    println!(
        "demo: done in {:.1}s, {clean} of {n} processes stopped cleanly{}",
        started.elapsed().as_secs_f64(),
        if args.keep { format!(", logs kept in {}", root.path.display()) } else { String::new() }
    );
    Ok(())
}
