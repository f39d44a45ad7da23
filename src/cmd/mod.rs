//! The command-line surface: one module per subcommand, plus what they share (node flags, start-up).

pub mod bench;
pub mod chain;
pub mod completions;
pub mod demo;
pub mod fetch;
pub mod keygen;
pub mod peer;
mod procs;
pub mod send_tx;
pub mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::identity::{self, Fingerprint};
use clap::Args;
use tracing::{info, warn};

use crate::config::PeerConfig;
use crate::error::PeerError;
use crate::node::{Node, Service};
use crate::tracker_client::fetch_tracker_key_version;

/// Flags every command that runs a peer shares.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The one TCP address this peer listens on (links and the tracker's reachability probe).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8633")]
    pub listen: SocketAddr,
    /// Address to announce instead of the bound one (e.g. behind port forwarding).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,
    /// Tracker address; for a tracker run as replicas, every replica's address, comma-separated (the peer starts
    /// at a random one and moves to the next at once when one fails; all must present the pinned key).
    #[arg(long, value_name = "ADDR[,ADDR…]", env = "ANOMOS_TRACKER", value_delimiter = ',', required = true)]
    pub tracker: Vec<SocketAddr>,
    /// Pinned tracker key fingerprint (hex SHA-256 of its SubjectPublicKeyInfo; printed by the tracker at start).
    #[arg(long, value_name = "HEX", env = "ANOMOS_TRACKER_FP")]
    pub tracker_fp: String,
    /// Data directory (identity key `peer.key`, state); created with mode 0700.
    #[arg(long, value_name = "DIR", default_value = "./anomos-data")]
    pub data_dir: PathBuf,
    /// Size of a newly generated identity key.
    #[arg(long, default_value_t = 2048, value_parser = crate::cmd::parse_key_bits)]
    pub key_bits: usize,
    /// Most circuits (relayed and endpoints) at once, shared fairly by the neighbors: once half are in use, a
    /// neighbor holding more than its part gets DENY(circuit-limit).
    #[arg(long, default_value_t = 10_000)]
    pub max_circuits: usize,
    /// Most neighbor links at once.
    #[arg(long, default_value_t = 64)]
    pub max_links: usize,
    /// Flow-control window in cells per circuit and direction where every circuit starts (each hop buffers at
    /// most its current window).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(4..=4096))]
    pub circuit_window: u32,
    /// Largest window a busy circuit's may grow to on a long path (auto-tuned to twice the bandwidth × delay of
    /// each hop; 4.2 KB per cell per circuit and direction at most). Set it to --circuit-window to turn growth off.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(4..=16384))]
    pub circuit_window_max: u32,
    /// Most cells queued on one link in total.
    #[arg(long, default_value_t = 65_536)]
    pub link_queue_cap: usize,
    /// Most cells queued on all links together: the node's buffer budget (about 4.2 KB per cell), shared fairly
    /// by the neighbors. Once half is used, circuits of a neighbor holding more than its part break with
    /// `resources`.
    #[arg(long, value_name = "CELLS", default_value_t = 131_072)]
    pub max_queued_cells: usize,
    /// Seconds without any cell from a neighbor (or without progress writing to it) after which its link is
    /// considered dead and its circuits are broken.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = crate::cmd::parse_secs)]
    pub link_idle_timeout: Duration,
    /// Seconds of silence on a link after which we send PADDING (must be below --link-idle-timeout).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = crate::cmd::parse_secs)]
    pub keepalive: Duration,
    /// Seconds an incoming connection has to complete its handshake (or probe) before it is closed.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = crate::cmd::parse_secs)]
    pub handshake_timeout: Duration,
    /// Most incoming connections at once on the listening port (handshakes, links, probes).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_conns: usize,
    /// Most incoming connections at once from one IP address (on a single-host test overlay, at least the
    /// number of peers).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_conns_per_ip: usize,
    /// OPENs per second a neighbor may send on its link (each costs an RSA decryption); more are denied
    /// with `circuit-limit` without being peeled.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub open_rate: u32,
    /// Burst of OPENs allowed above --open-rate. A neighbor that keeps sending OPENs after being refused
    /// for rate (another burst's worth) has its link closed.
    #[arg(long, value_name = "N", default_value_t = 400)]
    pub open_burst: u32,
    /// Seconds between `stats` log lines (links, circuits, queued cells, counters); 0 = never.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = crate::cmd::parse_secs_or_zero)]
    pub stats_interval: Duration,
    /// Debug: append every relayed DATA payload (before/after this hop's layer) to FILE.
    #[arg(long, value_name = "FILE", hide = true)]
    pub cell_trace: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics, text format) on this address, e.g. 127.0.0.1:9633
    /// [default: off]. Only loopback addresses, unless --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Allow --metrics on a non-loopback address (the counters describe this node's traffic; anyone who can
    /// reach the port sees them).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Serve the local control endpoint `<data-dir>/control.sock` (mode 0600) that `anomos status` asks.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub control: bool,
}

impl NodeArgs {
    /// The peer configuration these flags describe.
    pub fn config(&self) -> PeerConfig {
        let first = self.tracker.first().copied().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700)));
        let mut c = PeerConfig::new(self.listen, first, self.tracker_fp.clone(), self.data_dir.clone());
        c.tracker_replicas = self.tracker.iter().skip(1).copied().collect();
        c.advertise = self.advertise;
        c.key_bits = self.key_bits;
        c.max_circuits = self.max_circuits;
        c.max_links = self.max_links;
        c.circuit_window = self.circuit_window;
        c.circuit_window_max = self.circuit_window_max.max(self.circuit_window);
        c.link_queue_cap = self.link_queue_cap;
        c.max_queued_cells = self.max_queued_cells;
        c.link_idle_timeout = self.link_idle_timeout;
        c.keepalive = self.keepalive;
        c.handshake_timeout = self.handshake_timeout;
        c.max_conns = self.max_conns;
        c.max_conns_per_ip = self.max_conns_per_ip;
        c.open_rate = self.open_rate;
        c.open_burst = self.open_burst;
        c.stats_interval = self.stats_interval;
        c.cell_trace = self.cell_trace.clone();
        c.metrics = self.metrics;
        c.metrics_allow_remote = self.metrics_allow_remote;
        c.control = self.control;
        c
    }
}

/// Parses an identity key size (2048 or 3072).
pub fn parse_key_bits(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(b) if identity::ALLOWED_KEY_BITS.contains(&b) => Ok(b),
        _ => Err(format!("{s}: key size must be 2048 or 3072")),
    }
}

/// Parses a positive number of seconds (fractions allowed, e.g. `0.5`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    match parse_secs_or_zero(s)? {
        d if d.is_zero() => Err(format!("{s}: must be more than 0 seconds")),
        d => Ok(d),
    }
}

/// Parses a number of seconds, zero allowed (fractions allowed; at most one day).
pub fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s}: a number of seconds (0..=86400) expected")),
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PeerError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Loads or creates the identity, fetches and checks the tracker key, binds and starts the node, and prints
/// the `anomos peer ready …` line on stdout.
pub async fn launch(cfg: PeerConfig, service: Option<Arc<dyn Service>>) -> Result<Arc<Node>, PeerError> {
    cfg.validate().map_err(PeerError::Config)?;
    let pinned = Fingerprint::from_hex(&cfg.tracker_fp).map_err(|e| PeerError::Config(format!("--tracker-fp: {e}")))?;
    ensure_private_dir(&cfg.data_dir)?;
    let key_path = cfg.data_dir.join("peer.key");
    let bits = cfg.key_bits;
    // A new key takes a few hundred milliseconds: it is made while the tracker's key is fetched. A key file that
    // cannot be read ends the start at once, even while the tracker is unreachable.
    let mut identity = tokio::task::spawn_blocking(move || identity::load_or_create_identity(&key_path, bits));
    let mut made = None;
    let fetched = {
        let fetch = tracker_key_with_retries(&cfg, &pinned);
        tokio::pin!(fetch);
        loop {
            tokio::select! {
                r = &mut fetch => break r,
                r = &mut identity, if made.is_none() => {
                    made = Some(r.map_err(|e| PeerError::Config(e.to_string()))??);
                }
            }
        }
    };
    // The key is made (and saved) before anything returns, an error included (so an identity error is the one
    // reported even when the tracker was refused too).
    let (id, created) = match made {
        Some(m) => m,
        None => identity.await.map_err(|e| PeerError::Config(e.to_string()))??,
    };
    let (tracker_key, offered) = fetched?;
    if created {
        info!(fingerprint = %id.fingerprint(), "created a new identity key");
    }
    crate::control::check_private(&cfg.data_dir);
    let (node, listener) = Node::bind(cfg, id, tracker_key, service).await?;
    if let (addr, Some(version)) = offered {
        node.tracker_offers(addr, version).await;
    }
    if node.cfg.control {
        // Before anything runs: a second peer on the same data directory is refused here.
        if let Some(path) = crate::control::start(&node).await? {
            info!(path = %path.display(), "control endpoint listening (anomos status)");
        }
    }
    node.start(listener);
    let metrics = crate::metrics::start(&node).await?;
    info!(listen = %node.listen_addr, fingerprint = %node.fingerprint(), "peer started");
    println!("anomos peer ready listen={} fingerprint={}", node.listen_addr, node.fingerprint());
    if let Some(addr) = metrics {
        println!("anomos peer metrics listen={addr}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok(node)
}

/// The tracker's key, checked against `pinned`, and the channel version offered with it, from the first of the
/// configured addresses that answers. The tracker may not be up yet: keeps trying, with backoff. A key that does not
/// match the pin is fatal. With several addresses (a replicated tracker) each is tried in turn; every one must
/// present the pinned key.
async fn tracker_key_with_retries(
    cfg: &PeerConfig,
    pinned: &Fingerprint,
) -> Result<(anomos_proto::identity::PublicKey, (std::net::SocketAddr, Option<u16>)), PeerError> {
    let mut backoff = Duration::from_millis(200);
    let addrs = cfg.tracker_addrs();
    let mut at = 0usize;
    loop {
        let addr = addrs.get(at % addrs.len().max(1)).copied().unwrap_or(cfg.tracker);
        at += 1;
        match fetch_tracker_key_version(addr, pinned).await {
            Ok((k, version)) => return Ok((k, (addr, version))),
            Err(PeerError::Proto(e)) => return Err(PeerError::Config(format!("refusing the tracker at {addr}: {e}"))),
            Err(e) if !at.is_multiple_of(addrs.len().max(1)) => {
                info!("tracker {addr} not reachable ({e}); trying the next address")
            }
            Err(e) => {
                warn!("tracker {addr} not reachable yet ({e}); retrying in {:.1}s", backoff.as_secs_f64());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// How long shutdown gives the BREAK cells to reach the neighbors before the links close.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Resolves on the first SIGINT or SIGTERM, and then arranges for a second one to end the process at once
/// (status 130). The handlers are installed when this is called.
pub fn first_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    let signal = anomos_tracker::shutdown_signal();
    async move {
        signal.await;
        info!("signal received: shutting down (a second signal exits at once)");
        let again = anomos_tracker::shutdown_signal();
        tokio::spawn(async move {
            again.await;
            eprintln!("anomos: second signal: exiting at once");
            std::process::exit(130);
        });
    }
}

/// Makes everything in a chain store durable and closes its database file cleanly (the store handed to
/// other holders is replaced by an empty in-memory one, so nothing can write to the file afterwards).
pub fn close_store(store: &crate::chain::SharedStore) -> Result<(), crate::chain::ChainError> {
    let mut s = crate::chain::write(store);
    s.set_durable(true);
    s.flush()?;
    let params = s.params().clone();
    let empty = crate::chain::ChainStore::open(params, Box::new(crate::chain::MemoryBackend::default()))?;
    let closed = std::mem::replace(&mut *s, empty);
    drop(s);
    drop(closed); // drops the redb Database: a clean close, no repair at the next open
    Ok(())
}

/// Graceful shutdown of a node (and its chain store, if any): BREAK(shutdown) on every circuit, links
/// closed, replay cache persisted, control socket removed, store flushed and closed. Logs one `shutdown`
/// line saying what was torn down.
pub async fn shutdown(node: &Arc<Node>, store: Option<&crate::chain::SharedStore>) {
    let sum = node.shutdown(SHUTDOWN_FLUSH).await;
    let store_state = match store {
        None => "none".to_string(),
        Some(st) => {
            let st = st.clone();
            match tokio::task::spawn_blocking(move || close_store(&st)).await {
                Ok(Ok(())) => "flushed and closed".to_string(),
                Ok(Err(e)) => format!("close failed: {e}"),
                Err(e) => format!("close failed: {e}"),
            }
        }
    };
    info!(
        circuits_broken = sum.circuits,
        links_closed = sum.links,
        replay_tags_saved = sum.replay_tags,
        chain_store = %store_state,
        "shutdown: circuits broken with BREAK(shutdown), links closed, replay cache saved, control socket removed"
    );
}

/// Logging flags shared by every binary.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log level (overridden by RUST_LOG).
    #[arg(long, global = true, default_value = "info", env = "ANOMOS_LOG_LEVEL")]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl LogArgs {
    /// Installs the tracing subscriber (logs go to stderr; stdout is for results).
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&self.log_level));
        // Colours only on a terminal: log files stay plain text.
        use std::io::IsTerminal;
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(|| LogWriter(Vec::new()))
            .with_ansi(std::io::stderr().is_terminal());
        if self.log_format == "json" {
            b.json().init();
        } else {
            b.init();
        }
    }
}

/// Progress bars being drawn on stderr now (log lines are printed above them instead of through them).
static BARS: std::sync::Mutex<Option<indicatif::MultiProgress>> = std::sync::Mutex::new(None);

/// Registers (or, with `None`, removes) the progress bars log lines must not tear.
pub fn set_progress_bars(bars: Option<indicatif::MultiProgress>) {
    *BARS.lock().unwrap_or_else(|e| e.into_inner()) = bars;
}

/// Prints `f`'s output above the progress bars if any are drawn (else just runs it).
pub fn above_bars<R>(f: impl FnOnce() -> R) -> R {
    let bars = BARS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match bars {
        Some(m) => m.suspend(f),
        None => f(),
    }
}

/// One log event, written to stderr in one piece when dropped (above any progress bars).
struct LogWriter(Vec<u8>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        above_bars(|| {
            use std::io::Write;
            let _ = std::io::stderr().lock().write_all(&self.0);
        });
    }
}
