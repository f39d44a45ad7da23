//! `anomos fetch`: join the overlay as a peer, ask the tracker for circuits to peers serving a chain, and sync
//! that chain over them (headers first, then blocks in parallel), validating everything. A circuit that fails
//! is reported to the tracker and replaced with fresh ones; what was already stored is kept.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anomos_proto::btc::NetParams;
use anomos_proto::ids::ChainId;
use anomos_proto::tracker::CircuitRequest;
use clap::Args;
use tracing::{info, warn};

use super::{launch, NodeArgs};
use crate::chain::sync::{sync_with, SyncOptions, SyncPhase, SyncProgress};
use crate::chain::{self, ChainStore};
use crate::config::PeerConfig;
use crate::error::PeerError;

/// Flags of `anomos fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Chain to fetch.
    #[arg(long, default_value = "regtest")]
    pub chain: String,
    /// Circuits to sync over in parallel, to distinct serving peers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub circuits: u8,
    /// Relays per circuit (hops = relays + 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=6))]
    pub relays: u8,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// What to fetch and how.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Chain name.
    pub chain: String,
    /// Parallel circuits.
    pub circuits: u8,
    /// Relays per circuit.
    pub relays: u8,
    /// Overall deadline.
    pub deadline: Duration,
}

/// What a fetch did.
#[derive(Debug)]
pub struct FetchReport {
    /// Chain name.
    pub chain: String,
    /// Hops of each circuit used (of the last, successful attempt).
    pub hops: Vec<usize>,
    /// Circuits that failed and were replaced.
    pub replaced: usize,
    /// Headers stored.
    pub headers: u64,
    /// Blocks stored and validated.
    pub blocks: u64,
    /// Bytes received (Bitcoin envelopes).
    pub bytes: u64,
    /// Best height.
    pub height: u32,
    /// Best tip.
    pub tip: String,
    /// Wall time from start to done.
    pub elapsed: Duration,
}

impl FetchReport {
    /// Prints the summary.
    pub fn print(&self) {
        println!(
            "fetched chain={} headers={} blocks={} bytes={} height={} tip={} circuits={} hops={:?} replaced={} time={:.2}s",
            self.chain,
            self.headers,
            self.blocks,
            self.bytes,
            self.height,
            self.tip,
            self.hops.len(),
            self.hops,
            self.replaced,
            self.elapsed.as_secs_f64()
        );
        println!(
            "validated: header linkage, proof of work, difficulty, timestamps, merkle roots, witness commitments, BIP34 heights"
        );
    }
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Runs a fetch with a fresh peer started from `cfg`.
pub async fn fetch(cfg: PeerConfig, opts: &FetchOptions) -> Result<FetchReport, PeerError> {
    let started = Instant::now();
    let params =
        NetParams::by_name(&opts.chain).ok_or_else(|| PeerError::Config(format!("unknown chain {:?}", opts.chain)))?;
    let chain_id = ChainId::new(&params.name).map_err(|e| PeerError::Config(e.to_string()))?;
    let store = chain::shared(ChainStore::new(params.clone())?);
    let node = launch(cfg, None).await?;
    let deadline = started + opts.deadline;
    let tty = std::io::stdout().is_terminal();
    let mut replaced = 0usize;
    let mut totals = (0u64, 0u64, 0u64);
    loop {
        if Instant::now() > deadline {
            return Err(PeerError::Timeout("fetch deadline"));
        }
        // Circuits need the requester's own links up; the tracker needs a serving peer announced.
        if node.link_count() == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let req = CircuitRequest { chain: chain_id.clone(), count: opts.circuits, relays: opts.relays };
        let streams = match node.request_circuits(req).await {
            Ok(s) if !s.is_empty() => s,
            Ok(_) => {
                info!("no circuit could be opened yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => {
                info!("circuit request failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let hops: Vec<usize> = streams.iter().map(|s| s.hops).collect();
        info!(circuits = streams.len(), ?hops, "circuits open; syncing");
        let mut last_print = Instant::now();
        let progress = |p: SyncProgress| {
            if last_print.elapsed() >= Duration::from_millis(if tty { 100 } else { 1000 }) {
                last_print = Instant::now();
                match p.phase {
                    SyncPhase::Headers => println!("progress headers height={}", p.header_height),
                    SyncPhase::Blocks => {
                        println!("progress blocks={}/{} bytes={}", p.blocks_done, p.blocks_total, p.bytes)
                    }
                }
            }
        };
        let opts_sync = SyncOptions::default();
        match sync_with(streams, &params, &store, &opts_sync, progress).await {
            Ok(report) => {
                totals.0 += report.headers;
                totals.1 += report.blocks;
                totals.2 += report.bytes;
                replaced += report.peer_errors.len();
                for (i, e) in &report.peer_errors {
                    println!("event circuit-failed unix_ms={} circuit={i} error={e}", unix_ms());
                }
                return Ok(FetchReport {
                    chain: params.name.clone(),
                    hops,
                    replaced,
                    headers: totals.0,
                    blocks: totals.1,
                    bytes: totals.2,
                    height: report.height,
                    tip: report.tip.to_string(),
                    elapsed: started.elapsed(),
                });
            }
            Err(e) => {
                // Everything stored so far stays; fresh circuits (the tracker now avoids what was reported)
                // continue from there.
                println!("event circuit-failed unix_ms={} error={e}", unix_ms());
                warn!("sync over these circuits failed: {e}; requesting fresh circuits");
                replaced += hops.len();
                {
                    let s = chain::read(&store);
                    totals.1 = s.block_count().saturating_sub(1) as u64;
                    totals.0 = s.header_count().saturating_sub(1) as u64;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs `anomos fetch`.
pub async fn run(args: &FetchArgs) -> Result<(), PeerError> {
    let opts = FetchOptions {
        chain: args.chain.clone(),
        circuits: args.circuits,
        relays: args.relays,
        deadline: Duration::from_secs(args.timeout),
    };
    let report = fetch(args.node.config(), &opts).await?;
    report.print();
    Ok(())
}
