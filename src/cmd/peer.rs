//! `anomos peer`: relay for the overlay and, with `--serve`, serve a chain to circuits that end here.
//!
//! A served chain lives in `<data-dir>/chain-<name>.redb` (see [`crate::chain::db`]): blocks
//! imported with `anomos chain import` or mined here survive restarts. On regtest the peer can
//! mine at start (`--mine N`: up to height N) and then every `--mine-interval` seconds,
//! announcing each new block on every open circuit; mined blocks also take the pool's
//! transactions.

use std::sync::Arc;
use std::time::Duration;

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::ChainId;
use anomos_proto::tracker::MAX_FAMILY;
use clap::Args;
use tracing::{info, warn};

use super::chain::NetArgs;
use super::{launch, NodeArgs};
use crate::chain::{self, ChainService, Misbehave, SharedStore};
use crate::error::PeerError;
use crate::node::Service;

/// Flags of `anomos peer`.
#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Serve this chain to circuits that end here (mainnet, testnet3, testnet4, signet, regtest, or a custom
    /// network's name with --network-magic and --genesis). Stored in <data-dir>/chain-<name>.redb.
    #[arg(long, value_name = "CHAIN")]
    pub serve: Option<String>,
    /// Fingerprint (hex) of another peer run by the same operator; repeat or separate with commas (at most 32).
    /// The tracker keeps two peers off one path when both declare each other (SPEC §3.10).
    #[arg(long, value_name = "FP", value_delimiter = ',', value_parser = parse_fingerprint)]
    pub family: Vec<Fingerprint>,
    #[command(flatten)]
    pub net: NetArgs,
    /// Mine regtest blocks at start until the chain is this high (needs `--serve regtest`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub mine: u32,
    /// Extra transactions in each mined block (1-in-2-out P2WPKH-shaped, 222 bytes each: 100 make ~22 KB blocks).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub mine_txs: usize,
    /// Mine a new regtest block every SECS seconds and announce it on every open circuit.
    #[arg(long, value_name = "SECS")]
    pub mine_interval: Option<f64>,
    /// FOR TESTS ONLY: serve lies (bad-merkle, bad-pow, wrong-block) or play for time (stall, not-found) so
    /// requesters' detection can be tested.
    #[arg(long, value_name = "MODE", hide = true)]
    pub misbehave: Option<Misbehave>,
    /// Serve `--serve CHAIN` from a Bitcoin node's P2P port instead of our own store: each incoming circuit is
    /// joined to a new connection to HOST:PORT, messages relayed unchanged (but see --bridge-scrub-version).
    #[arg(long, value_name = "HOST:PORT", requires = "serve")]
    pub upstream: Option<String>,
    /// Open a local port for unmodified Bitcoin-P2P clients: each connection is carried over a new circuit to a
    /// peer serving --bridge-chain.
    #[arg(long, value_name = "ADDR")]
    pub bridge: Option<std::net::SocketAddr>,
    /// Chain the bridge's clients speak.
    #[arg(long, value_name = "CHAIN", default_value = "regtest")]
    pub bridge_chain: String,
    /// Relays per bridge circuit (hops = relays + 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=6))]
    pub bridge_relays: u8,
    /// Clear the addresses in `version` messages crossing a bridge (an unmodified node may put a routable
    /// address there). `false` relays every message byte for byte.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub bridge_scrub_version: bool,
    /// Worker threads of the async runtime (0: one per core). Several peers sharing a small host run faster with
    /// fewer each: on 2 cores, 3 relays with 1 thread each spent about a fifth less CPU per MB relayed than with
    /// 2 (docs/PERFORMANCE.md). TC peels run on a separate blocking pool either way.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub threads: u16,
}

fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    Fingerprint::from_hex(s.trim()).map_err(|e| format!("{s:?}: not a fingerprint (64 hex digits): {e}"))
}

/// The chain a peer serves and the service that serves it.
pub type Served = (ChainId, ChainService);

/// Opens the store and builds the chain service `--serve`/`--mine` ask for.
pub fn service(args: &PeerArgs) -> Result<Option<Served>, PeerError> {
    let Some(name) = &args.serve else {
        if args.mine > 0 || args.mine_interval.is_some() {
            return Err(PeerError::Config("--mine and --mine-interval need --serve regtest".into()));
        }
        return Ok(None);
    };
    let params = args.net.params(name)?;
    let chain = ChainId::new(&params.name).map_err(|e| PeerError::Config(format!("--serve: {e}")))?;
    let regtest = params.network == Some(bitcoin::Network::Regtest);
    if (args.mine > 0 || args.mine_interval.is_some()) && !regtest {
        return Err(PeerError::Config("--mine and --mine-interval work only with --serve regtest".into()));
    }
    let path = chain::store_path(&args.node.data_dir, &params);
    super::ensure_private_dir(&args.node.data_dir)?;
    let mut store = chain::open_store(&args.node.data_dir, &params)?;
    let have = store.best_tip().1;
    if args.mine > have {
        let t = std::time::Instant::now();
        store.set_durable(false);
        chain::mine::mine_regtest(&mut store, args.mine - have, args.mine_txs)?;
        store.set_durable(true);
        store.flush()?;
        let (tip, height) = store.best_tip();
        info!(blocks = args.mine - have, height, %tip, ms = t.elapsed().as_millis() as u64, "mined regtest blocks");
    }
    let (tip, height) = store.best_tip();
    println!(
        "serving chain={} height={height} tip={tip} blocks={} store={}",
        params.name,
        store.block_count().saturating_sub(1),
        path.display()
    );
    let svc = ChainService::new(chain::shared(store)).with_misbehave(args.misbehave);
    if let Some(m) = args.misbehave {
        warn!(mode = ?m, "TEST MODE: this peer serves invalid data on purpose");
    }
    Ok(Some((chain, svc)))
}

/// Mines a regtest block (with pool transactions) on the tip every `interval` and announces it.
pub fn spawn_miner(svc: ChainService, interval: Duration, txs_per_block: usize) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tick.tick().await;
            let store: SharedStore = svc.store().clone();
            let mined = tokio::task::spawn_blocking(move || {
                let mut s = chain::write(&store);
                let pool: Vec<bitcoin::Transaction> =
                    s.pool_txids().iter().take(2000).filter_map(|t| s.pool_tx(t)).collect();
                let n = pool.len();
                let tip = s.best_tip().0;
                chain::mine_block(&mut s, tip, txs_per_block, pool).map(|b| (b, n, s.best_tip().1))
            })
            .await;
            match mined {
                Ok(Ok((block, pool_txs, height))) => {
                    let hash = block.block_hash();
                    println!(
                        "mined height={height} hash={hash} txs={} pool_txs={pool_txs} size={}",
                        block.txdata.len(),
                        block.total_size()
                    );
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    svc.announce_block(hash);
                }
                Ok(Err(e)) => warn!("mining failed: {e}"),
                Err(e) => warn!("mining task failed: {e}"),
            }
        }
    });
}

/// Checks every flag that can be checked without creating anything, and binds the bridge's port (so a port in
/// use fails before the peer starts). Returns the bridge's listener and network.
async fn check(
    args: &PeerArgs,
    cfg: &crate::config::PeerConfig,
) -> Result<Option<(tokio::net::TcpListener, anomos_proto::btc::NetParams)>, PeerError> {
    cfg.validate().map_err(PeerError::Config)?;
    Fingerprint::from_hex(&cfg.tracker_fp).map_err(|e| PeerError::Config(format!("--tracker-fp: {e}")))?;
    if let Some(name) = &args.serve {
        let params = args.net.params(name)?;
        ChainId::new(&params.name).map_err(|e| PeerError::Config(format!("--serve: {e}")))?;
        let regtest = params.network == Some(bitcoin::Network::Regtest);
        if (args.mine > 0 || args.mine_interval.is_some()) && (!regtest || args.upstream.is_some()) {
            return Err(PeerError::Config(
                "--mine and --mine-interval work only with --serve regtest from our own store (not --upstream)".into(),
            ));
        }
    } else if args.mine > 0 || args.mine_interval.is_some() {
        return Err(PeerError::Config("--mine and --mine-interval need --serve regtest".into()));
    }
    if let Some(secs) = args.mine_interval {
        if !(0.05..=86_400.0).contains(&secs) {
            return Err(PeerError::Config("--mine-interval must be between 0.05 and 86400 seconds".into()));
        }
    }
    if let Some(up) = &args.upstream {
        match up.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
            _ => return Err(PeerError::Config(format!("--upstream {up:?}: expected HOST:PORT"))),
        }
    }
    let Some(listen) = args.bridge else { return Ok(None) };
    let params = args.net.params(&args.bridge_chain).map_err(|e| PeerError::Config(format!("--bridge-chain: {e}")))?;
    ChainId::new(&params.name).map_err(|e| PeerError::Config(format!("--bridge-chain: {e}")))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| PeerError::Config(format!("--bridge {listen}: cannot listen: {e}")))?;
    Ok(Some((listener, params)))
}

/// Runs `anomos peer` until interrupted.
pub async fn run(args: &PeerArgs) -> Result<(), PeerError> {
    let signal = super::first_signal();
    tokio::pin!(signal);
    let mut cfg = args.node.config();
    // The whole configuration is checked before anything is created (data dir, key, store, sockets) or
    // announced: a mistake must not leave a half-started peer behind or print `ready` (issue 17).
    let bridge = check(args, &cfg).await?;
    if args.family.len() > MAX_FAMILY {
        return Err(PeerError::Config(format!("--family: {} peers (at most {MAX_FAMILY})", args.family.len())));
    }
    cfg.family = args.family.clone();
    let bridge_opts = crate::bridge::BridgeOptions { scrub_version: args.bridge_scrub_version, ..Default::default() };
    let upstream = match (&args.upstream, &args.serve) {
        (Some(up), Some(name)) => {
            if args.mine > 0 || args.mine_interval.is_some() {
                return Err(PeerError::Config("--mine cannot be used with --upstream".into()));
            }
            let params = args.net.params(name)?;
            cfg.serve = vec![ChainId::new(&params.name).map_err(|e| PeerError::Config(format!("--serve: {e}")))?];
            Some(Arc::new(crate::bridge::UpstreamService::with_options(up.clone(), params, bridge_opts.clone())))
        }
        _ => None,
    };
    let mut served_store = None;
    let svc = if let Some(u) = &upstream {
        Some(u.clone() as Arc<dyn Service>)
    } else {
        match service(args)? {
            Some((chain, s)) => {
                served_store = Some((chain.to_string(), s.store().clone()));
                cfg.serve = vec![chain];
                if let Some(secs) = args.mine_interval {
                    if !(0.05..=86_400.0).contains(&secs) {
                        return Err(PeerError::Config("--mine-interval must be between 0.05 and 86400 seconds".into()));
                    }
                    spawn_miner(s.clone(), Duration::from_secs_f64(secs), args.mine_txs);
                }
                Some(Arc::new(s) as Arc<dyn Service>)
            }
            None => None,
        }
    };
    let node = tokio::select! {
        n = launch(cfg, svc) => n?,
        () = &mut signal => {
            // Interrupted before the node ran (e.g. while waiting for the tracker): close the store cleanly.
            if let Some((_, store)) = &served_store {
                let _ = super::close_store(store);
            }
            info!("shutdown: interrupted before the peer started");
            return Ok(());
        }
    };
    if let Some(u) = upstream {
        let info =
            crate::node::UpstreamInfo { name: u.params().name.clone(), addr: u.addr().to_string(), health: u.health() };
        node.set_upstream(info);
        tokio::spawn(async move {
            match u.check().await {
                Ok(()) => info!(upstream = %u.addr(), "upstream node reachable"),
                Err(e) => warn!(
                    upstream = %u.addr(),
                    "upstream node not reachable ({e}): circuits to this peer break with upstream-unavailable until it is"
                ),
            }
        });
    }
    if let Some((name, store)) = &served_store {
        node.set_chain(crate::node::ChainInfo { name: name.clone(), role: "serving", store: store.clone() });
    }
    if let Some((listener, params)) = bridge {
        let b = match crate::bridge::ClientBridge::with_listener(
            node.clone(),
            listener,
            params.clone(),
            args.bridge_relays,
            bridge_opts,
        ) {
            Ok(b) => b,
            Err(e) => {
                // Checked before; still, never leave a running peer's control socket behind.
                super::shutdown(&node, served_store.as_ref().map(|(_, s)| s)).await;
                return Err(e);
            }
        };
        println!("anomos bridge ready listen={} chain={}", b.local_addr(), params.name);
        tokio::spawn(async move {
            if let Err(e) = b.run().await {
                tracing::warn!("bridge stopped: {e}");
            }
        });
    }
    signal.await;
    super::shutdown(&node, served_store.as_ref().map(|(_, s)| s)).await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown() {
    anomos_tracker::shutdown_signal().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: PeerArgs,
    }

    #[test]
    fn family_takes_fingerprints_repeated_or_comma_separated() {
        let (x, y, z) = ("ab".repeat(32), "cd".repeat(32), "ef".repeat(32));
        let fp = "00".repeat(32);
        let base = ["anomos-peer", "--tracker", "127.0.0.1:7700", "--tracker-fp", fp.as_str()];
        let p =
            P::try_parse_from(base.iter().copied().chain(["--family", &format!("{x},{y}"), "--family", &z])).unwrap();
        let want: Vec<Fingerprint> = [&x, &y, &z].iter().map(|h| Fingerprint::from_hex(h).unwrap()).collect();
        assert_eq!(p.a.family, want);
        assert!(P::try_parse_from(base.iter().copied()).unwrap().a.family.is_empty());
        assert!(P::try_parse_from(base.iter().copied().chain(["--family", "not-hex"])).is_err());
        assert!(P::try_parse_from(base.iter().copied().chain(["--family", "abcd"])).is_err(), "too short");
    }
}
