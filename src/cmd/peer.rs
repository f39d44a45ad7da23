//! `anomos peer`: relay for the overlay and, with `--serve`, serve a chain to circuits that end here.

use std::sync::Arc;

use anomos_proto::btc::NetParams;
use anomos_proto::ids::ChainId;
use clap::Args;
use tracing::info;

use super::{launch, NodeArgs};
use crate::chain::{self, ChainService, ChainStore};
use crate::error::PeerError;
use crate::node::Service;

/// Flags of `anomos peer`.
#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Serve this chain to circuits that end here (mainnet, testnet3, testnet4, signet, regtest).
    #[arg(long, value_name = "CHAIN")]
    pub serve: Option<String>,
    /// Mine this many regtest blocks at start (needs `--serve regtest`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub mine: u32,
    /// Extra transactions in each mined block (makes blocks bigger).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub mine_txs: usize,
}

/// The chain a peer serves and the service that serves it.
pub type Served = (ChainId, Arc<dyn Service>);

/// Builds the chain service `--serve`/`--mine` ask for.
pub fn service(args: &PeerArgs) -> Result<Option<Served>, PeerError> {
    let Some(name) = &args.serve else {
        if args.mine > 0 {
            return Err(PeerError::Config("--mine needs --serve regtest".into()));
        }
        return Ok(None);
    };
    let params =
        NetParams::by_name(name).ok_or_else(|| PeerError::Config(format!("--serve: unknown chain {name:?}")))?;
    let chain = ChainId::new(&params.name).map_err(|e| PeerError::Config(format!("--serve: {e}")))?;
    let mut store = ChainStore::new(params.clone())?;
    if args.mine > 0 {
        if params.name != "regtest" {
            return Err(PeerError::Config("--mine works only with --serve regtest".into()));
        }
        let t = std::time::Instant::now();
        chain::mine::mine_regtest(&mut store, args.mine, args.mine_txs)?;
        let (tip, height) = store.best_tip();
        info!(blocks = args.mine, height, %tip, ms = t.elapsed().as_millis() as u64, "mined regtest blocks");
    }
    Ok(Some((chain, Arc::new(ChainService::new(chain::shared(store))))))
}

/// Runs `anomos peer` until interrupted.
pub async fn run(args: &PeerArgs) -> Result<(), PeerError> {
    let mut cfg = args.node.config();
    let svc = service(args)?;
    let svc = match svc {
        Some((chain, s)) => {
            cfg.serve = vec![chain];
            Some(s)
        }
        None => None,
    };
    let _node = launch(cfg, svc).await?;
    wait_for_shutdown().await;
    info!("shutting down");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
