//! The `anomos` command: run a relay peer, fetch a chain over circuits, or run a whole local demo overlay.

use std::path::PathBuf;
use std::process::ExitCode;

use anomos::cmd::{bench, chain, completions, demo, fetch, keygen, peer, send_tx, status, LogArgs};
use anomos_tracker::config_file;
use clap::{Parser, Subcommand};

/// anomos — an anonymizing relay overlay that carries Bitcoin-wire traffic over onion circuits.
#[derive(Parser)]
#[command(name = "anomos", version, about, propagate_version = true)]
struct Cli {
    /// TOML config file: top-level keys apply to every subcommand with that flag, `[peer]`, `[fetch]`, …
    /// `[anomos-tracker]` to one. Environment variables (`ANOMOS_<FLAG>`) override it, flags override both.
    #[arg(long, global = true, value_name = "FILE", env = "ANOMOS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a peer: relay circuits for the overlay and optionally serve a chain.
    Peer(peer::PeerArgs),
    /// Join the overlay and sync a chain over anonymous circuits.
    Fetch(fetch::FetchArgs),
    /// Broadcast a transaction anonymously to a peer serving its chain.
    SendTx(send_tx::SendTxArgs),
    /// Work on a chain store offline: import real blocks, print what it holds.
    Chain(chain::ChainArgs),
    /// Start a local overlay (tracker, relays, a serving peer) as separate processes and fetch a chain over it.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency, CPU and memory on a local overlay against the performance targets.
    Bench(bench::BenchArgs),
    /// Generate an identity key (PKCS#8 PEM, mode 0600) and print its fingerprint.
    Keygen(keygen::KeygenArgs),
    /// Ask a running peer (its local control endpoint) for its links, circuits, chain height and tracker state.
    Status(status::StatusArgs),
    /// Run the tracker (same as the `anomos-tracker` binary).
    Tracker(anomos_tracker::TrackerArgs),
    /// Print a shell completion script (for `anomos` or `anomos-tracker`).
    Completions(completions::CompletionsArgs),
}

fn main() -> ExitCode {
    let cli: Cli = config_file::parse(&config_file::ANOMOS);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Cmd::Peer(a) = &cli.cmd {
        if a.threads > 0 {
            rt.worker_threads(usize::from(a.threads));
        }
    }
    match rt.enable_all().build() {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => {
            eprintln!("anomos: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    if let Cmd::Completions(a) = &cli.cmd {
        return match completions::run(
            a,
            config_file::with_env(<Cli as clap::CommandFactory>::command(), &config_file::ANOMOS),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("anomos: {e}");
                ExitCode::FAILURE
            }
        };
    }
    cli.log.init();
    let result = match &cli.cmd {
        Cmd::Peer(a) => peer::run(a).await,
        Cmd::Fetch(a) => fetch::run(a).await,
        Cmd::SendTx(a) => send_tx::run(a).await,
        Cmd::Chain(a) => chain::run(a),
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Bench(a) => bench::run(a).await,
        Cmd::Keygen(a) => keygen::run(a),
        Cmd::Status(a) => status::run(a).await,
        Cmd::Completions(_) => unreachable!("handled before logging starts"),
        Cmd::Tracker(a) => {
            anomos_tracker::run(a.clone(), None).await.map_err(|e| anomos::PeerError::Tracker(e.to_string()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anomos: {e}");
            ExitCode::FAILURE
        }
    }
}
