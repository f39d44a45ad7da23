//! `anomos fetch`: join the overlay as a peer, ask the tracker for circuits to peers serving a chain, and sync
//! that chain over them (headers first, then blocks in parallel), validating everything, into the store in
//! `<data-dir>/chain-<name>.redb`. A circuit that sends something invalid is broken and its target reported;
//! one that stalls is broken; either is replaced with a fresh circuit from the tracker while the others go on.
//! What was stored survives a crash: a rerun resumes and never downloads a stored block again. With
//! `--follow`, the circuits stay open after the sync: each new block announced is fetched, validated and
//! printed as a `tip …` line, each transaction announced as a `tx …` line.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::btc::NetParams;
use anomos_proto::ids::ChainId;
use anomos_proto::tracker::CircuitRequest;
use clap::Args;
use tracing::info;

use super::chain::NetArgs;
use super::{launch, NodeArgs};
use crate::chain::sync::{run_sync, CircuitSource, SyncEvent, SyncOptions, SyncPhase};
use crate::chain::{self, SharedStore};
use crate::circuit::CircuitStream;
use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::node::Node;

/// Flags of `anomos fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Chain to fetch (mainnet, testnet3, testnet4, signet, regtest, or a custom network's name with
    /// --network-magic and --genesis).
    #[arg(long, default_value = "regtest")]
    pub chain: String,
    #[command(flatten)]
    pub net: NetArgs,
    /// Circuits to sync over in parallel, to distinct serving peers (as many as the tracker finds, up to this).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub circuits: u8,
    /// Relays per circuit (hops = relays + 1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=6))]
    pub relays: u8,
    /// Blocks requested and not yet received, per circuit.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub window: u16,
    /// A circuit with requests outstanding that delivers no block for this many seconds is replaced.
    #[arg(long, default_value_t = 10.0)]
    pub stall_timeout: f64,
    /// Give up if the initial sync is not done after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Keep the circuits open after the sync and follow new blocks and announced transactions.
    #[arg(long)]
    pub follow: bool,
    /// Milliseconds between the plain `progress …` lines printed when stdout is not a terminal (0: one line per
    /// block, for scripts that act on progress).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub progress_interval: u64,
}

/// What to fetch and how.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The network.
    pub params: NetParams,
    /// Parallel circuits.
    pub circuits: u8,
    /// Relays per circuit.
    pub relays: u8,
    /// Deadline of the initial sync.
    pub deadline: Duration,
    /// Blocks in flight per circuit.
    pub window: usize,
    /// Stall timeout.
    pub stall_timeout: Duration,
    /// Follow after the initial sync (never returns then).
    pub follow: bool,
    /// Time between plain progress lines (not on a terminal).
    pub progress_interval: Duration,
}

impl FetchOptions {
    /// Defaults for `params`: 4 circuits of 2 relays, 300 s, window 16, 10 s stall timeout.
    pub fn new(params: NetParams) -> FetchOptions {
        FetchOptions {
            params,
            circuits: 4,
            relays: 2,
            deadline: Duration::from_secs(300),
            window: 16,
            stall_timeout: Duration::from_secs(10),
            follow: false,
            progress_interval: Duration::from_secs(1),
        }
    }
}

/// What a fetch did.
#[derive(Debug)]
pub struct FetchReport {
    /// Chain name.
    pub chain: String,
    /// Hops of each circuit used.
    pub hops: Vec<usize>,
    /// Circuits added after the start (replacing ones that failed or stalled).
    pub replaced: usize,
    /// Headers stored.
    pub headers: u64,
    /// Blocks downloaded, validated and stored by this run.
    pub blocks: u64,
    /// Blocks in the store before this run (genesis not counted).
    pub stored_before: u64,
    /// Blocks requested by this run.
    pub requested: u64,
    /// Blocks received that were already stored.
    pub refetched: u64,
    /// Bytes received (Bitcoin envelopes).
    pub bytes: u64,
    /// Best height.
    pub height: u32,
    /// Best tip.
    pub tip: String,
    /// Wall time from start to done.
    pub elapsed: Duration,
    /// Time of the sync itself (circuits open to done).
    pub sync_time: Duration,
    /// Whether a signal stopped the fetch before it was done (the node was shut down gracefully).
    pub interrupted: bool,
}

impl FetchReport {
    /// Prints the summary (on an interrupted fetch, only a log line).
    pub fn print(&self) {
        if self.interrupted {
            info!(
                blocks = self.blocks,
                height = self.height,
                time = format!("{:.2}s", self.elapsed.as_secs_f64()),
                "fetch interrupted by a signal; what was stored is kept and a rerun resumes"
            );
            return;
        }
        if std::io::stderr().is_terminal() {
            let mut hops: Vec<usize> = self.hops.clone();
            hops.sort_unstable();
            hops.dedup();
            let hops: Vec<String> = hops.iter().map(usize::to_string).collect();
            eprintln!(
                "fetched {} blocks ({:.2} MB) of {} to height {} in {:.1}s over {} circuit{} ({} hops{})",
                self.blocks,
                self.bytes as f64 / 1e6,
                self.chain,
                self.height,
                self.elapsed.as_secs_f64(),
                self.hops.len(),
                if self.hops.len() == 1 { "" } else { "s" },
                hops.join("/"),
                if self.replaced > 0 { format!(", {} replaced", self.replaced) } else { String::new() }
            );
        }
        println!(
            "fetched chain={} headers={} blocks={} bytes={} height={} tip={} circuits={} hops={:?} replaced={} \
             stored_before={} requested={} refetched={} sync_time={:.2}s time={:.2}s",
            self.chain,
            self.headers,
            self.blocks,
            self.bytes,
            self.height,
            self.tip,
            self.hops.len(),
            self.hops,
            self.replaced,
            self.stored_before,
            self.requested,
            self.refetched,
            self.sync_time.as_secs_f64(),
            self.elapsed.as_secs_f64()
        );
        println!(
            "validated: header linkage, proof of work, difficulty, timestamps, merkle roots, witness commitments, \
             sizes, duplicate txs, BIP34 heights"
        );
        flush();
    }
}

fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Opens circuits: waits for the node's links, asks the tracker, retries until some open or `deadline`. While
/// the overlay is still forming the tracker may find fewer serving peers than asked for: fewer are taken only
/// after [`FILL_WAIT`] of asking. Returns the circuits that opened and how many the tracker issued (distinct
/// serving peers it found): the sync keeps that many open, replacing any that did not open or fail later.
async fn initial_circuits(
    node: &Arc<Node>,
    req: &CircuitRequest,
    deadline: Instant,
) -> Result<(Vec<CircuitStream>, usize), PeerError> {
    let mut best: Vec<CircuitStream> = Vec::new();
    let mut issued_max = 0;
    let mut first_success: Option<Instant> = None;
    let started = Instant::now();
    let (mut last_links, mut links_changed) = (0, Instant::now());
    loop {
        if Instant::now() > deadline {
            return Err(PeerError::Timeout("fetch deadline"));
        }
        // Circuits need the requester's own links up: all of them, or as many as came up until no new one did
        // for a while (a restarted peer's neighbors reconnect one by one; a dead neighbor never does). Not just
        // the first: the tracker does not know which are up, and a grant whose first hop has no link after the
        // wait of `open_circuit` is reported against that hop (SPEC §3.10). A new peer's links come up together
        // (its knocks go at once, SPEC §5.2), so this costs little; the wait ends when the last one comes up.
        // The tracker needs a serving peer announced.
        let links = node.edges_up();
        if links != last_links {
            (last_links, links_changed) = (links, Instant::now());
        }
        let settled = links >= node.neighbor_count() || links_changed.elapsed() >= LINKS_SETTLE;
        if links == 0 || (!settled && started.elapsed() < LINK_WAIT) {
            node.wait_link_change(Duration::from_millis(100)).await;
            continue;
        }
        match node.request_grants(req.clone()).await {
            Ok(grants) if !grants.is_empty() => {
                issued_max = issued_max.max(grants.len());
                let opened = crate::node::futures_join_all(grants.iter().map(|g| node.open_circuit(g))).await;
                let mut streams = Vec::new();
                for r in opened {
                    match r {
                        Ok(s) => streams.push(s),
                        Err(e) => info!("circuit did not open: {e}"),
                    }
                }
                if !streams.is_empty() {
                    first_success.get_or_insert_with(Instant::now);
                }
                if streams.len() > best.len() {
                    best = streams;
                }
            }
            Ok(_) => info!("no circuit issued yet; retrying"),
            Err(e) => info!("circuit request failed ({e}); retrying"),
        }
        let waited = first_success.is_some_and(|t| t.elapsed() >= FILL_WAIT);
        if best.len() >= usize::from(req.count) || (waited && !best.is_empty()) {
            return Ok((best, issued_max));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long to keep asking for the full number of circuits once some opened.
pub const FILL_WAIT: Duration = Duration::from_secs(3);

/// How long to wait for links to all our neighbors before asking for circuits anyway.
pub const LINK_WAIT: Duration = Duration::from_secs(10);

/// Links count as settled when no new one came up for this long.
pub const LINKS_SETTLE: Duration = Duration::from_secs(2);

/// A [`CircuitSource`] asking the tracker (through `node`) for replacement circuits.
pub fn circuit_source(node: Arc<Node>, chain: ChainId, relays: u8) -> CircuitSource {
    Box::new(move |n| {
        let (node, chain) = (node.clone(), chain.clone());
        Box::pin(async move {
            let count = u8::try_from(n).unwrap_or(u8::MAX).max(1);
            match node.request_circuits(CircuitRequest { chain, count, relays }).await {
                Ok(s) => s,
                Err(e) => {
                    info!("replacement circuit request failed: {e}");
                    Vec::new()
                }
            }
        })
    })
}

/// Progress bars for headers and blocks (on stderr, when it is a terminal).
struct Bars {
    headers: indicatif::ProgressBar,
    blocks: indicatif::ProgressBar,
    /// When the blocks phase began (for the rate).
    started: std::cell::Cell<Option<Instant>>,
}

impl Bars {
    fn new() -> Bars {
        use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let headers = multi.add(ProgressBar::new_spinner());
        headers.set_style(
            ProgressStyle::with_template("{spinner:.cyan} headers {pos:>8}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        headers.set_message("waiting for circuits");
        headers.enable_steady_tick(Duration::from_millis(120));
        let blocks = multi.add(ProgressBar::new(0));
        blocks.set_style(
            ProgressStyle::with_template("  blocks  [{bar:32.green/white}] {pos}/{len}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        super::set_progress_bars(Some(multi));
        Bars { headers, blocks, started: std::cell::Cell::new(None) }
    }

    fn update(&self, p: &crate::chain::SyncProgress) {
        // Headers go on arriving while the first blocks are fetched: the count keeps moving.
        self.headers.set_position(u64::from(p.header_height));
        self.headers.set_message(if p.phase == SyncPhase::Blocks { "" } else { "syncing" });
        if p.phase == SyncPhase::Blocks {
            let t0 = self.started.get().unwrap_or_else(|| {
                let now = Instant::now();
                self.started.set(Some(now));
                now
            });
            let secs = t0.elapsed().as_secs_f64();
            self.blocks.set_length(p.blocks_total);
            self.blocks.set_position(p.blocks_done);
            let rate = p.blocks_done as f64 / secs.max(1e-3);
            let eta = if secs > 1.0 && rate > 0.0 {
                let left = p.blocks_total.saturating_sub(p.blocks_done) as f64 / rate;
                format!(", {rate:.0} blocks/s, eta {}", indicatif::HumanDuration(Duration::from_secs_f64(left)))
            } else {
                String::new()
            };
            self.blocks.set_message(format!("{:.1} MB{eta}", p.bytes as f64 / 1e6));
        }
    }

    /// Prints a line above the bars.
    fn println(&self, line: &str) {
        self.blocks.suspend(|| {
            println!("{line}");
            flush();
        });
    }

    fn finish(&self) {
        if !self.headers.is_finished() {
            self.headers.finish_with_message("done");
        }
        self.blocks.finish();
        super::set_progress_bars(None);
    }

    /// Leaves the bars where they are (interrupted).
    fn abandon(&self) {
        self.headers.abandon();
        self.blocks.abandon_with_message("interrupted");
        super::set_progress_bars(None);
    }
}

/// Runs a fetch with a fresh peer started from `cfg`, into the store in its data directory. On SIGINT or
/// SIGTERM the node is shut down gracefully and the report says `interrupted`.
pub async fn fetch(cfg: PeerConfig, opts: &FetchOptions) -> Result<FetchReport, PeerError> {
    let started = Instant::now();
    let params = opts.params.clone();
    let chain_id = ChainId::new(&params.name).map_err(|e| PeerError::Config(e.to_string()))?;
    super::ensure_private_dir(&cfg.data_dir)?;
    let store: SharedStore = chain::shared(chain::open_store(&cfg.data_dir, &params)?);
    let stored_before = {
        let s = chain::read(&store);
        let (tip, height) = s.best_tip();
        let blocks = s.block_count().saturating_sub(1) as u64;
        println!(
            "store chain={} path={} headers={} blocks={blocks} height={height} tip={tip}",
            params.name,
            chain::store_path(&cfg.data_dir, &params).display(),
            s.header_count().saturating_sub(1)
        );
        blocks
    };
    let signal = super::first_signal();
    tokio::pin!(signal);
    let node = tokio::select! {
        n = launch(cfg, None) => n?,
        () = &mut signal => {
            drop(store);
            info!("shutdown: interrupted before the peer started");
            return Ok(FetchReport {
                chain: params.name.clone(),
                hops: Vec::new(),
                replaced: 0,
                headers: 0,
                blocks: 0,
                stored_before,
                requested: 0,
                refetched: 0,
                bytes: 0,
                height: 0,
                tip: String::new(),
                elapsed: started.elapsed(),
                sync_time: Duration::ZERO,
                interrupted: true,
            });
        }
    };
    node.set_chain(crate::node::ChainInfo { name: params.name.clone(), role: "fetching", store: store.clone() });
    let interrupted_report = |node_blocks: u64, height: u32| FetchReport {
        chain: params.name.clone(),
        hops: Vec::new(),
        replaced: 0,
        headers: 0,
        blocks: node_blocks,
        stored_before,
        requested: 0,
        refetched: 0,
        bytes: 0,
        height,
        tip: String::new(),
        elapsed: started.elapsed(),
        sync_time: Duration::ZERO,
        interrupted: true,
    };
    let deadline = started + opts.deadline;
    let req = CircuitRequest { chain: chain_id.clone(), count: opts.circuits, relays: opts.relays };
    let bars = std::io::stderr().is_terminal().then(Bars::new);
    let (streams, issued) = tokio::select! {
        r = initial_circuits(&node, &req, deadline) => r?,
        () = &mut signal => {
            if let Some(b) = &bars { b.abandon(); }
            super::shutdown(&node, Some(&store)).await;
            return Ok(interrupted_report(0, 0));
        }
    };
    if let Some(b) = &bars {
        b.headers.set_message(format!("{} circuit{} open", streams.len(), if streams.len() == 1 { "" } else { "s" }));
    }
    let sync_started = Instant::now();
    let mut hops: Vec<usize> = streams.iter().map(|s| s.hops).collect();
    info!(circuits = streams.len(), ?hops, "circuits open; syncing");
    if !std::io::stdout().is_terminal() {
        println!("event circuits-open unix_ms={} circuits={}", unix_ms(), streams.len());
        flush();
    }
    let sync_opts = SyncOptions {
        window: opts.window,
        stall_timeout: opts.stall_timeout,
        follow: opts.follow,
        // As many circuits as the tracker found distinct serving peers; lost ones are replaced.
        circuits: issued.max(streams.len()),
        ..SyncOptions::default()
    };
    let tty = std::io::stdout().is_terminal();
    let gauges = &node.sync;
    let out = |line: String| match &bars {
        Some(b) => b.println(&line),
        None => {
            println!("{line}");
            flush();
        }
    };
    let mut last_print = Instant::now();
    let synced = Arc::new(AtomicBool::new(false));
    let synced_flag = synced.clone();
    let follow = opts.follow;
    let name = params.name.clone();
    let mut added_hops = Vec::new();
    // The first stored block is reported at once (then at most once a second, or 10/s on a terminal), so a
    // watcher knows blocks are flowing even when a sync takes under a second.
    let mut first_block_reported = false;
    let on_event = |e: SyncEvent| match e {
        SyncEvent::Progress(p) => {
            gauges.phase.store(if p.phase == SyncPhase::Headers { 1 } else { 2 }, Ordering::Relaxed);
            gauges.header_height.store(u64::from(p.header_height), Ordering::Relaxed);
            gauges.blocks_done.store(p.blocks_done, Ordering::Relaxed);
            gauges.blocks_total.store(p.blocks_total, Ordering::Relaxed);
            if let Some(b) = &bars {
                b.update(&p);
                return;
            }
            let first_block = !first_block_reported && p.phase == SyncPhase::Blocks && p.blocks_done > 0;
            let every = if tty { Duration::from_millis(100) } else { opts.progress_interval };
            if first_block || last_print.elapsed() >= every {
                first_block_reported |= first_block;
                last_print = Instant::now();
                match p.phase {
                    SyncPhase::Headers => println!("progress headers height={}", p.header_height),
                    SyncPhase::Blocks => {
                        println!("progress blocks={}/{} bytes={}", p.blocks_done, p.blocks_total, p.bytes)
                    }
                }
                flush();
            }
        }
        SyncEvent::CircuitFailed { circuit, error, misbehaving } => {
            out(format!(
                "event circuit-failed unix_ms={} circuit={circuit} misbehaving={misbehaving} error={error}",
                unix_ms()
            ));
        }
        SyncEvent::CircuitAdded { circuit, hops } => {
            added_hops.push(hops);
            out(format!("event circuit-added unix_ms={} circuit={circuit} hops={hops}", unix_ms()));
        }
        SyncEvent::Synced { height, tip, blocks } => {
            synced_flag.store(true, Ordering::Relaxed);
            gauges.phase.store(3, Ordering::Relaxed);
            if let Some(b) = &bars {
                b.finish();
            }
            if follow {
                out(format!(
                    "synced chain={name} height={height} tip={tip} blocks={blocks} time={:.2}s; following",
                    sync_started.elapsed().as_secs_f64()
                ));
            }
        }
        SyncEvent::NewTip { height, hash } => {
            out(format!("tip height={height} hash={hash} unix_ms={}", unix_ms()));
        }
        SyncEvent::Tx(txid) => {
            out(format!("tx txid={txid} unix_ms={}", unix_ms()));
        }
    };
    let source = circuit_source(node.clone(), chain_id, opts.relays);
    let sync = run_sync(streams, &params, &store, &sync_opts, Some(source), on_event);
    // The deadline applies to the initial sync only.
    let watchdog = async {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
        if synced.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    let report = tokio::select! {
        r = sync => r.map_err(PeerError::from),
        () = watchdog => Err(PeerError::Timeout("fetch deadline")),
        () = &mut signal => {
            if let Some(b) = &bars { b.abandon(); }
            let (blocks, height) = {
                let s = chain::read(&store);
                ((s.block_count().saturating_sub(1) as u64).saturating_sub(stored_before), s.best_tip().1)
            };
            super::shutdown(&node, Some(&store)).await;
            return Ok(interrupted_report(blocks, height));
        }
    };
    if let Some(b) = &bars {
        if report.is_ok() {
            b.finish();
        } else {
            b.abandon();
        }
    }
    // Done (or failed): tear the node down gracefully either way.
    super::shutdown(&node, Some(&store)).await;
    let report = report?;
    hops.extend(added_hops);
    Ok(FetchReport {
        chain: params.name.clone(),
        hops,
        replaced: report.replaced,
        headers: report.headers,
        blocks: report.blocks,
        stored_before,
        requested: report.requested,
        refetched: report.refetched,
        bytes: report.bytes,
        height: report.height,
        tip: report.tip.to_string(),
        elapsed: started.elapsed(),
        sync_time: sync_started.elapsed(),
        interrupted: false,
    })
}

/// Runs `anomos fetch`.
pub async fn run(args: &FetchArgs) -> Result<(), PeerError> {
    let opts = FetchOptions {
        params: args.net.params(&args.chain)?,
        circuits: args.circuits,
        relays: args.relays,
        deadline: Duration::from_secs(args.timeout),
        window: usize::from(args.window),
        stall_timeout: Duration::from_secs_f64(args.stall_timeout.clamp(0.5, 3600.0)),
        follow: args.follow,
        progress_interval: Duration::from_millis(args.progress_interval),
    };
    let report = fetch(args.node.config(), &opts).await?;
    report.print();
    Ok(())
}
