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

mod costs;
mod figures;
mod host;
mod opens;
mod overlay;
mod report;
mod wan;
use crate::chain::{self, ChainService, ChainStore, SyncOptions};
use crate::circuit::CircuitStream;
use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::node::{Node, Service};
use crate::tracker_client::{fetch_tracker_key, TrackerSession};
use costs::*;
use figures::*;
use host::*;
use opens::*;
use overlay::*;
use report::*;

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
