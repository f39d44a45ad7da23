//! One simulated run: a real tracker and real peers (honest and hostile) on the simulated network, a workload of
//! honest circuits, faults and hostile cells drawn from the seed, and the invariants checked as it runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anomos::{CircuitStream, Node, PeerConfig, PeerError, Service};
use anomos_net::Transport;
use anomos_proto::cell::{BreakReason, Cell, CircId, Command, DenyReason, DIALER_CIRC_BIT};
use anomos_proto::circuit::HopLayer;
use anomos_proto::crypto::Secret;
use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind};
use anomos_proto::tracker::{CircuitRequest, FailureKind, FailureReport};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::keys;
use super::net::{HostId, NetParams, SimHost, SimNet};

mod chain;
mod checks;
mod faults;
mod hostile;
mod liar;

/// The chain every serving peer serves (an echo service).
pub const CHAIN: &str = "simnet";
/// What the simulated wall clock says at the start.
pub const EPOCH: u64 = 1_800_000_000;
const TRACKER_PORT: u16 = 7700;
const PEER_PORT: u16 = 8633;
/// Most seconds a host's clock is off (either way).
const SKEW: i64 = 25;

#[derive(Parser)]
struct T {
    #[command(flatten)]
    a: anomos_tracker::TrackerArgs,
}

/// What the watchdog thread sees of a run: simulated seconds so far and the last thing the harness did.
#[derive(Default)]
pub struct Progress {
    /// Simulated seconds since the run started (advanced by the run's main loop).
    pub secs: AtomicU64,
    /// The last fault or hostile action.
    pub last: Mutex<String>,
}

/// What went wrong in a run (the first violated invariant).
#[derive(Debug, Clone)]
pub struct Violation {
    /// Simulated time it was seen at.
    pub at: Duration,
    /// What.
    pub what: String,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The trace's hash and event count.
    pub trace: (u64, u64),
    /// Simulated time the run took.
    pub sim_time: Duration,
    /// Counters (for the summary).
    pub stats: BTreeMap<&'static str, u64>,
    /// The first violated invariant, if any.
    pub violation: Option<Violation>,
    /// The trace's events (when logging).
    pub log: Vec<String>,
}

/// The knobs of a run: the defaults, or a deliberately smaller scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Honest peers (range drawn from).
    pub honest: (usize, usize),
    /// Hostile peers (range drawn from).
    pub hostile: (usize, usize),
    /// Simulated time of the fault phase.
    pub faults_for: Duration,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario { honest: (10, 24), hostile: (1, 4), faults_for: Duration::from_secs(90) }
    }
}

/// Shared between the run's tasks: the first violation and counters.
#[derive(Default)]
struct Shared {
    violation: Mutex<Option<Violation>>,
    stats: Mutex<BTreeMap<&'static str, u64>>,
}

impl Shared {
    fn fail(&self, start: Instant, what: String) {
        let mut v = self.violation.lock().unwrap();
        if v.is_none() {
            *v = Some(Violation { at: start.elapsed(), what });
        }
    }

    fn count(&self, what: &'static str) {
        *self.stats.lock().unwrap().entry(what).or_default() += 1;
    }

    fn failed(&self) -> bool {
        self.violation.lock().unwrap().is_some()
    }
}

/// An echo service: every message comes back; how each circuit ended is kept by its token.
struct Echo {
    net: SimNet,
    ends: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl Service for Echo {
    fn accept(&self, mut stream: CircuitStream) {
        let ends = self.ends.clone();
        let net = self.net.clone();
        tokio::spawn(async move {
            let mut token = None;
            let why = loop {
                match stream.recv().await {
                    Ok(m) => {
                        if token.is_none() && m.len() >= 8 {
                            token = Some(u64::from_be_bytes(m[..8].try_into().unwrap()));
                        }
                        if let Err(e) = stream.send(m).await {
                            break format!("{e}");
                        }
                    }
                    Err(e) => break format!("{e}"),
                }
            };
            if let Some(t) = token {
                net.record(format_args!("target end token={t} {why}"));
                ends.lock().unwrap().insert(t, why);
            }
        });
    }
}

struct Peer {
    host: HostId,
    key: usize,
    dir: tempfile::TempDir,
    serving: bool,
    /// Serves the regtest chain (honestly or not).
    chain: Option<chain::Role>,
    hostile: bool,
    node: Option<Arc<Node>>,
    addr: SocketAddr,
}

struct World {
    seed: u64,
    net: SimNet,
    start: Instant,
    shared: Arc<Shared>,
    tracker_host: HostId,
    tracker_addr: SocketAddr,
    tracker_dir: tempfile::TempDir,
    tracker_fp: Fingerprint,
    tracker_task: Option<JoinHandle<()>>,
    peers: Vec<Peer>,
    ends: Arc<Mutex<BTreeMap<u64, String>>>,
    observer: Arc<SimHost>,
    progress: Arc<Progress>,
    /// The regtest chain the chain-serving peers serve.
    chain: Arc<chain::Reference>,
    /// Chain syncs under way.
    syncs: chain::Syncs,
}

fn peer_config(
    tracker: SocketAddr,
    fp: &Fingerprint,
    addr: SocketAddr,
    dir: &std::path::Path,
    serve: Option<ChainId>,
) -> PeerConfig {
    let mut cfg = PeerConfig::new(addr, tracker, fp.to_hex(), dir.to_path_buf());
    cfg.stats_interval = Duration::ZERO;
    cfg.control = false;
    cfg.max_conns_per_ip = 64;
    cfg.max_queued_cells = 16_384;
    cfg.max_circuits = 2_000;
    cfg.link_queue_cap = 8_192;
    // A fixed window: auto-tuning needs an RTT, which a simulated link does not report.
    cfg.circuit_window_max = cfg.circuit_window;
    cfg.serve = serve.into_iter().collect();
    cfg
}

impl World {
    fn record(&self, what: std::fmt::Arguments<'_>) {
        let line = what.to_string();
        self.net.record(format_args!("{line}"));
        *self.progress.last.lock().unwrap() = format!("{:.1} s: {line}", self.start.elapsed().as_secs_f64());
    }

    fn fail(&self, what: String) {
        self.shared.fail(self.start, what);
    }

    async fn start_tracker(&mut self) {
        let t = if self.tracker_task.is_some() {
            self.net.restart(self.tracker_host)
        } else {
            self.net.transport(self.tracker_host)
        };
        let dir = self.tracker_dir.path().to_str().unwrap().to_string();
        let listen = self.tracker_addr.to_string();
        let args = T::parse_from([
            "t",
            "--listen",
            &listen,
            "--data-dir",
            &dir,
            "--allow-same-ip",
            "--interval",
            "2",
            "--neighbors",
            "4",
        ])
        .a;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let start = self.start;
        self.tracker_task = Some(tokio::spawn(async move {
            if let Err(e) = anomos_tracker::run_on(t, args, Some(tx), std::future::pending()).await {
                shared.fail(start, format!("tracker ended: {e}"));
            }
        }));
        // A tracker that does not start has recorded why (`tracker ended: …`): the run then ends with that
        // violation instead of a panic of this thread (seed 1100951).
        let Ok(ready) = rx.await else { return };
        assert_eq!(ready.fingerprint, self.tracker_fp);
    }

    async fn start_peer(&mut self, i: usize, restart: bool) {
        let p = &self.peers[i];
        let t: Arc<dyn Transport> = if restart { self.net.restart(p.host) } else { self.net.transport(p.host) };
        let serve = match (p.serving, p.chain) {
            (true, _) => Some(ChainId::new(CHAIN).unwrap()),
            (false, Some(_)) => Some(chain::chain_id()),
            (false, None) => None,
        };
        let mut cfg = peer_config(self.tracker_addr, &self.tracker_fp, p.addr, p.dir.path(), serve);
        if p.hostile {
            // Hostile peers relay nothing (every OPEN through them is denied circuit-limit): a relay that silently
            // drops a circuit's cells stalls that circuit until the application gives up on it (the chain sync's
            // stall timeout), which no relay-level invariant can rule out. So the "deliver or break" invariant
            // concerns circuits over honest peers only, and hostile peers attack from the side, over their links.
            cfg.max_circuits = 1;
        }
        let id = keys::pool()[p.key].clone();
        let tkey = keys::pool()[0].public().clone();
        let service: Option<Arc<dyn Service>> = match (p.serving, p.chain) {
            (true, _) => Some(Arc::new(Echo { net: self.net.clone(), ends: self.ends.clone() })),
            (false, Some(role)) => Some(chain::service(&self.chain, role)),
            (false, None) => None,
        };
        match Node::bind_on(t, cfg, id, tkey, service).await {
            Ok((node, l)) => {
                node.start(l);
                self.peers[i].node = Some(node);
            }
            Err(e) => self.fail(format!("peer {i} did not start: {e}")),
        }
    }

    fn alive(&self, i: usize) -> bool {
        self.net.is_alive(self.peers[i].host) && self.peers[i].node.is_some()
    }
}

/// Runs one seed.
pub async fn run(seed: u64, scenario: Scenario, log: bool, progress: Arc<Progress>) -> Outcome {
    let _sim = anomos_net::rt::simulate(seed, EPOCH);
    let mut rng = StdRng::seed_from_u64(seed);
    let lat_hi = Duration::from_millis(rng.gen_range(2..=120));
    let params = NetParams {
        latency: (Duration::from_micros(200), lat_hi),
        jitter: Duration::from_millis(rng.gen_range(0..=20)),
        bytes_per_ms: (200, rng.gen_range(500..=100_000)),
        cap: 256 * 1024,
        slow_conn: rng.gen_range(0.0..0.2),
    };
    let net = SimNet::new(seed, params.clone(), log);
    net.record(format_args!("seed {seed} params {params:?}"));
    let tracker_host = net.add_host();
    // Every host's wall clock is off by up to SKEW either way: two hosts differ by at most 2·SKEW, within the
    // clock-skew tolerance the peers allow (`--clock-skew`, 60 s; SPEC §4.7).
    net.set_skew(tracker_host, rng.gen_range(-SKEW..=SKEW));
    let observer = net.transport(net.add_host());
    let tracker_addr = SocketAddr::new(net.ip(tracker_host), TRACKER_PORT);
    let tracker_dir = tempfile::tempdir().unwrap();
    anomos_proto::identity::save_identity(&tracker_dir.path().join("tracker.key"), &keys::pool()[0]).unwrap();
    let honest = rng.gen_range(scenario.honest.0..=scenario.honest.1);
    let hostile = rng.gen_range(scenario.hostile.0..=scenario.hostile.1);
    let serving = rng.gen_range(2..=3).min(honest);
    let chain_roles = chain::Role::draw(&mut rng);
    let mut world = World {
        seed,
        net: net.clone(),
        start: Instant::now(),
        shared: Arc::new(Shared::default()),
        tracker_host,
        tracker_addr,
        tracker_dir,
        tracker_fp: keys::pool()[0].fingerprint(),
        tracker_task: None,
        peers: Vec::new(),
        ends: Arc::new(Mutex::new(BTreeMap::new())),
        observer,
        progress,
        chain: Arc::new(chain::Reference::mine()),
        syncs: Arc::default(),
    };
    world.record(format_args!("honest={honest} serving={serving} chain={chain_roles:?} hostile={hostile}"));
    // The watchdog's heartbeat: simulated seconds, whatever phase the run is in (it stops only if the thread does).
    let ticker = {
        let (progress, start) = (world.progress.clone(), world.start);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                progress.secs.store(start.elapsed().as_secs(), Ordering::Relaxed);
            }
        })
    };
    world.start_tracker().await;
    for i in 0..honest + hostile {
        let host = net.add_host();
        net.set_skew(host, rng.gen_range(-SKEW..=SKEW));
        world.peers.push(Peer {
            host,
            key: 1 + i,
            dir: tempfile::tempdir().unwrap(),
            serving: i < serving,
            chain: (i >= serving).then(|| chain_roles.get(i - serving).copied()).flatten(),
            hostile: i >= honest,
            node: None,
            addr: SocketAddr::new(net.ip(host), PEER_PORT),
        });
        let fp = keys::pool()[1 + i].fingerprint().short();
        let chain = world.peers[i].chain;
        world.record(format_args!(
            "peer {i} host={host} fp={fp} serving={} chain={chain:?} hostile={}",
            i < serving,
            i >= honest
        ));
        world.start_peer(i, false).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
    }
    // Let the overlay form.
    tokio::time::sleep(Duration::from_secs(10)).await;
    world.record(format_args!("formed"));
    let world = Arc::new(tokio::sync::Mutex::new(world));

    let faults_end = Instant::now() + scenario.faults_for;
    let mut tasks = Vec::new();
    // The honest workload: circuits from requesters to the serving peers, echoing numbered messages.
    for w in 0..3 {
        tasks.push(tokio::spawn(workload(world.clone(), StdRng::seed_from_u64(seed ^ ((w + 1) * 0x9e37)), faults_end)));
    }
    // Chain syncs.
    tasks.push(tokio::spawn(chain::workload(world.clone(), StdRng::seed_from_u64(seed ^ 0xc4a1), faults_end)));
    // Hostile peers.
    tasks.push(tokio::spawn(hostile::hostile_driver(world.clone(), StdRng::seed_from_u64(seed ^ 0xbad), faults_end)));
    // Faults.
    tasks.push(tokio::spawn(faults::faults(world.clone(), StdRng::seed_from_u64(seed ^ 0xfa17), faults_end)));
    // Invariants, continuously.
    let checker = tokio::spawn(checks::checker(world.clone()));

    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let w = world.lock().await;
        w.progress.secs.store(w.start.elapsed().as_secs(), Ordering::Relaxed);
        if Instant::now() >= faults_end || w.shared.failed() {
            break;
        }
    }
    for t in &tasks {
        t.abort();
    }
    // Recovery: heal, bring back everything dead, let it settle, then every honest peer must get a working circuit.
    let healed;
    {
        let mut w = world.lock().await;
        w.net.heal();
        w.record(format_args!("recovery"));
        healed = Instant::now();
        if !w.net.is_alive(w.tracker_host) {
            w.start_tracker().await;
        }
        for i in 0..w.peers.len() {
            if !w.net.is_alive(w.peers[i].host) {
                w.start_peer(i, true).await;
            }
        }
    }
    chain::start_one(&*world.lock().await, &mut StdRng::seed_from_u64(seed ^ 0xc4a2));
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        {
            let w = world.lock().await;
            w.progress.secs.store(w.start.elapsed().as_secs(), Ordering::Relaxed);
        }
    }
    if !world.lock().await.shared.failed() {
        checks::final_check(world.clone()).await;
    }
    chain::wait_all(world.clone(), healed).await;
    chain::stop(&*world.lock().await);
    checker.abort();
    ticker.abort();
    let w = world.lock().await;
    if let Some(t) = &w.tracker_task {
        t.abort();
    }
    let violation = w.shared.violation.lock().unwrap().clone();
    let stats = w.shared.stats.lock().unwrap().clone();
    let sim_time = w.start.elapsed();
    for p in &w.peers {
        if let Some(n) = &p.node {
            // Stop the nodes' loops (the runtime is dropped right after; nothing is flushed).
            n.request_reannounce();
        }
    }
    Outcome { trace: net.trace_hash(), sim_time, stats, violation, log: net.trace_log() }
}

/// One honest circuit: open from `from` to a serving peer over `relays` relays, echo `msgs` numbered messages;
/// each must come back once and in order, or the circuit must end with a reason (at both ends). Returns whether
/// it delivered everything.
async fn echo_circuit(
    world: &Arc<tokio::sync::Mutex<World>>,
    node: Arc<Node>,
    token: u64,
    relays: u8,
    msgs: usize,
    bound: Duration,
) -> Result<bool, String> {
    let req = CircuitRequest { chain: ChainId::new(CHAIN).unwrap(), count: 1, relays };
    let net = world.lock().await.net.clone();
    let streams = match tokio::time::timeout(bound, node.request_circuits(req)).await {
        Err(_) => return Err(format!("circuit request not answered within {bound:?}")),
        Ok(Err(e)) => {
            net.record(format_args!("circuit token={token} not granted: {}", short(&e)));
            return Ok(false);
        }
        Ok(Ok(s)) => s,
    };
    let Some(mut s) = streams.into_iter().next() else {
        net.record(format_args!("circuit token={token} did not open"));
        return Ok(false);
    };
    net.record(format_args!("circuit token={token} open hops={}", s.hops));
    for seq in 0..msgs as u64 {
        let mut m = token.to_be_bytes().to_vec();
        m.extend_from_slice(&seq.to_be_bytes());
        m.resize(16 + (seq as usize * 977) % 3000, (seq % 251) as u8);
        let sent = tokio::time::timeout(bound, s.send(m.clone())).await;
        let got = match sent {
            Err(_) => return Err(format!("circuit token={token}: send of message {seq} blocked for {bound:?}")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => match tokio::time::timeout(bound, s.recv()).await {
                Err(_) => {
                    return Err(format!(
                        "circuit token={token}: message {seq} neither echoed nor the circuit broken within {bound:?}"
                    ))
                }
                Ok(r) => r,
            },
        };
        match got {
            Ok(back) if back == m => {}
            Ok(back) => {
                let seq_back = back.get(8..16).map(|b| u64::from_be_bytes(b.try_into().unwrap()));
                return Err(format!(
                    "circuit token={token}: expected message {seq} back, got {} bytes (seq {seq_back:?}): out of order, duplicated or corrupted",
                    back.len()
                ));
            }
            Err(e) => {
                net.record(format_args!("circuit token={token} ended at {seq}: {}", short(&e)));
                if !matches!(e, PeerError::Broken(_)) {
                    return Err(format!("circuit token={token}: ended without a reason: {e}"));
                }
                return Ok(false);
            }
        }
    }
    s.close().await;
    net.record(format_args!("circuit token={token} delivered {msgs}"));
    Ok(true)
}

fn short(e: &PeerError) -> String {
    let s = e.to_string();
    s.chars().take(80).collect()
}

async fn workload(world: Arc<tokio::sync::Mutex<World>>, mut rng: StdRng, until: Instant) {
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..4000))).await;
        let (node, token) = {
            let w = world.lock().await;
            let honest: Vec<usize> = (0..w.peers.len()).filter(|&i| !w.peers[i].hostile && w.alive(i)).collect();
            if honest.is_empty() {
                continue;
            }
            let i = honest[rng.gen_range(0..honest.len())];
            (w.peers[i].node.clone().unwrap(), rng.next_u64())
        };
        let relays = rng.gen_range(1..=3);
        let msgs = rng.gen_range(1..=40);
        let w2 = world.clone();
        let shared = world.lock().await.shared.clone();
        let start = world.lock().await.start;
        tokio::spawn(async move {
            match echo_circuit(&w2, node, token, relays, msgs, Duration::from_secs(120)).await {
                Ok(true) => shared.count("circuits delivered"),
                Ok(false) => shared.count("circuits broken or refused"),
                Err(e) => shared.fail(start, e),
            }
        });
    }
}
