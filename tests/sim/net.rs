//! The simulated network: every host's connections are in-memory pipes of this process, driven by tokio's paused
//! clock on the simulation's one thread.
//!
//! A connection is two pipes (one per direction). A write is delivered as a segment after the pipe's latency
//! (drawn per connection from the seed, plus per-write jitter and a bandwidth term), in order within the
//! connection, so segments of different connections reorder freely. Each pipe holds at most `cap` bytes in
//! flight and unread: a reader that does not read stalls its writer (a slow reader). Faults: a partition holds
//! the segments between two hosts (and connects between them hang until the caller's timeout) until healed; a
//! cut resets one connection at both ends; a killed host's connections are all reset, its listeners vanish, and
//! everything its old incarnation still tries fails.
//!
//! Every send, delivery, connect, accept and fault is hashed into the trace (with the simulated time in
//! microseconds), the fingerprint of a run that `same_seed_same_trace` compares.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use anomos_net::{BoxFuture, Clock, Conn, Listener, ReadHalf, Stream, Transport, WriteHalf};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

mod stream;
use stream::SimListener;
pub use stream::SimStream;

/// A host of the simulation (index into the network's hosts).
pub type HostId = usize;

/// How links behave, drawn once per run from the seed.
#[derive(Debug, Clone)]
pub struct NetParams {
    /// Latency range of a connection (one way).
    pub latency: (Duration, Duration),
    /// Extra per-write jitter at most (segments of one connection stay in order).
    pub jitter: Duration,
    /// Bytes per millisecond of a connection (bandwidth), range.
    pub bytes_per_ms: (u64, u64),
    /// Bytes in flight and unread per direction (the receive window).
    pub cap: usize,
    /// Probability that a new connection gets a small window (a slow path, e.g. a congested link).
    pub slow_conn: f64,
}

struct Pipe {
    id: u64,
    from: HostId,
    to: HostId,
    segs: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes written and not yet read.
    inflight: usize,
    cap: usize,
    last_at: Instant,
    latency: Duration,
    jitter: Duration,
    bytes_per_ms: u64,
    write_closed: bool,
    reset: bool,
    reader_gone: bool,
    held: bool,
    rd_waker: Option<Waker>,
    wr_waker: Option<Waker>,
    rng: StdRng,
    trace: Arc<Mutex<Trace>>,
}

type PipeRef = Arc<Mutex<Pipe>>;

fn lock(p: &PipeRef) -> std::sync::MutexGuard<'_, Pipe> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pipe {
    fn wake_all(&mut self) {
        if let Some(w) = self.rd_waker.take() {
            w.wake();
        }
        if let Some(w) = self.wr_waker.take() {
            w.wake();
        }
    }
}

struct HostState {
    ip: IpAddr,
    incarnation: u64,
    alive: bool,
    /// Seconds its wall clock is ahead of the true one (negative: behind).
    skew: i64,
}

struct ListenerEntry {
    host: HostId,
    incarnation: u64,
    tx: mpsc::UnboundedSender<Conn>,
}

struct State {
    params: NetParams,
    rng: StdRng,
    hosts: Vec<HostState>,
    listeners: BTreeMap<SocketAddr, ListenerEntry>,
    next_port: BTreeMap<HostId, u16>,
    partitions: BTreeSet<(HostId, HostId)>,
    pipes: Vec<Weak<Mutex<Pipe>>>,
    next_conn: u64,
    trace: Arc<Mutex<Trace>>,
}

/// The fingerprint of a run: a hash of every network event and of the events the harness records, in order
/// (and, when `log` is on, the events themselves, for diffing two runs).
pub struct Trace {
    hasher: std::collections::hash_map::DefaultHasher,
    /// Events recorded (when logging).
    pub log: Option<Vec<String>>,
    /// Events so far.
    pub events: u64,
    start: Instant,
}

impl Trace {
    fn new(log: bool) -> Self {
        Trace {
            hasher: std::collections::hash_map::DefaultHasher::new(),
            log: log.then(Vec::new),
            events: 0,
            start: Instant::now(),
        }
    }

    /// Records one event.
    pub fn record(&mut self, what: std::fmt::Arguments<'_>) {
        let t = self.start.elapsed().as_micros();
        let s = format!("{t} {what}");
        s.hash(&mut self.hasher);
        self.events += 1;
        if let Some(l) = &mut self.log {
            l.push(s);
        }
    }

    /// The hash so far.
    pub fn hash(&self) -> u64 {
        self.hasher.finish()
    }
}

fn trace(t: &Mutex<Trace>, what: std::fmt::Arguments<'_>) {
    t.lock().unwrap_or_else(|e| e.into_inner()).record(what);
}

/// The network (cheap to clone).
#[derive(Clone)]
pub struct SimNet(Arc<Mutex<State>>);

impl SimNet {
    /// A network whose draws come from `seed`.
    pub fn new(seed: u64, params: NetParams, log: bool) -> Self {
        SimNet(Arc::new(Mutex::new(State {
            params,
            rng: StdRng::seed_from_u64(seed ^ 0x6e65_7477_6f72_6b00),
            hosts: Vec::new(),
            listeners: BTreeMap::new(),
            next_port: BTreeMap::new(),
            partitions: BTreeSet::new(),
            pipes: Vec::new(),
            next_conn: 1,
            trace: Arc::new(Mutex::new(Trace::new(log))),
        })))
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a host; its address is 10.(id / 250).(id % 250 + 1).1 (one /24 each; these addresses exist only in
    /// this process).
    pub fn add_host(&self) -> HostId {
        let mut st = self.st();
        let id = st.hosts.len();
        let ip = IpAddr::V4(Ipv4Addr::new(10, (id / 250) as u8, (id % 250 + 1) as u8, 1));
        st.hosts.push(HostState { ip, incarnation: 1, alive: true, skew: 0 });
        id
    }

    /// Sets the host's clock skew (seconds ahead of the true clock; negative: behind).
    pub fn set_skew(&self, h: HostId, secs: i64) {
        let mut st = self.st();
        st.hosts[h].skew = secs;
        trace(&st.trace, format_args!("skew host={h} {secs:+}s"));
    }

    /// The host's address.
    pub fn ip(&self, h: HostId) -> IpAddr {
        self.st().hosts[h].ip
    }

    /// The transport handle of the host's current incarnation.
    pub fn transport(&self, h: HostId) -> Arc<SimHost> {
        let incarnation = self.st().hosts[h].incarnation;
        Arc::new(SimHost { net: self.clone(), host: h, incarnation })
    }

    /// Records a harness event in the trace.
    pub fn record(&self, what: std::fmt::Arguments<'_>) {
        trace(&self.st().trace, what);
    }

    /// The trace's hash and event count.
    pub fn trace_hash(&self) -> (u64, u64) {
        let st = self.st();
        let t = st.trace.lock().unwrap_or_else(|e| e.into_inner());
        (t.hash(), t.events)
    }

    /// The logged events (if logging).
    pub fn trace_log(&self) -> Vec<String> {
        self.st().trace.lock().unwrap_or_else(|e| e.into_inner()).log.clone().unwrap_or_default()
    }

    fn live_pipes(st: &mut State) -> Vec<PipeRef> {
        st.pipes.retain(|w| w.strong_count() > 0);
        st.pipes.iter().filter_map(Weak::upgrade).collect()
    }

    /// Kills a host: every connection of it is reset, its listeners vanish, its current incarnation can do
    /// nothing more. [`SimNet::restart`] gives it a new incarnation (same address).
    pub fn kill(&self, h: HostId) {
        let mut st = self.st();
        st.hosts[h].alive = false;
        st.listeners.retain(|_, l| l.host != h);
        trace(&st.trace, format_args!("kill host={h}"));
        for p in Self::live_pipes(&mut st) {
            let mut p = lock(&p);
            if p.from == h || p.to == h {
                p.reset = true;
                p.wake_all();
            }
        }
    }

    /// A killed host comes back (a new incarnation, same address); returns its transport.
    pub fn restart(&self, h: HostId) -> Arc<SimHost> {
        {
            let mut st = self.st();
            st.hosts[h].alive = true;
            st.hosts[h].incarnation += 1;
            trace(&st.trace, format_args!("restart host={h}"));
        }
        self.transport(h)
    }

    /// Whether the host's current incarnation is up.
    pub fn is_alive(&self, h: HostId) -> bool {
        self.st().hosts[h].alive
    }

    /// Partitions `a` from `b` (both ways) until [`SimNet::heal`]: segments between them are held, connects hang.
    pub fn partition(&self, a: HostId, b: HostId) {
        let mut st = self.st();
        st.partitions.insert((a.min(b), a.max(b)));
        trace(&st.trace, format_args!("partition {a} {b}"));
        for p in Self::live_pipes(&mut st) {
            let mut p = lock(&p);
            if (p.from, p.to) == (a, b) || (p.from, p.to) == (b, a) {
                p.held = true;
            }
        }
    }

    /// Ends every partition: held segments are delivered.
    pub fn heal(&self) {
        let mut st = self.st();
        st.partitions.clear();
        trace(&st.trace, format_args!("heal"));
        for p in Self::live_pipes(&mut st) {
            let mut p = lock(&p);
            if p.held {
                p.held = false;
                p.wake_all();
            }
        }
    }

    /// Resets one live connection between two different hosts chosen by `pick` (an index, modulo their number);
    /// returns the hosts it joined.
    pub fn cut_one(&self, pick: usize) -> Option<(HostId, HostId)> {
        let mut st = self.st();
        let pipes: Vec<PipeRef> = Self::live_pipes(&mut st)
            .into_iter()
            .filter(|p| {
                let q = lock(p);
                !q.reset && q.from != q.to
            })
            .collect();
        if pipes.is_empty() {
            return None;
        }
        let chosen = pipes[pick % pipes.len()].clone();
        let (id, from, to) = {
            let p = lock(&chosen);
            (p.id, p.from, p.to)
        };
        trace(&st.trace, format_args!("cut conn={id} {from}-{to}"));
        // Both directions of the connection share its id.
        for p in &pipes {
            let mut p = lock(p);
            if p.id == id {
                p.reset = true;
                p.wake_all();
            }
        }
        Some((from, to))
    }

    fn partitioned(st: &State, a: HostId, b: HostId) -> bool {
        st.partitions.contains(&(a.min(b), a.max(b)))
    }

    fn new_pipe(st: &mut State, id: u64, from: HostId, to: HostId, latency: Duration, cap: usize, bw: u64) -> PipeRef {
        let seed = st.rng.gen();
        let held = Self::partitioned(st, from, to);
        let p = Arc::new(Mutex::new(Pipe {
            id,
            from,
            to,
            segs: VecDeque::new(),
            inflight: 0,
            cap,
            last_at: Instant::now(),
            latency,
            jitter: st.params.jitter,
            bytes_per_ms: bw,
            write_closed: false,
            reset: false,
            reader_gone: false,
            held,
            rd_waker: None,
            wr_waker: None,
            rng: StdRng::seed_from_u64(seed),
            trace: st.trace.clone(),
        }));
        st.pipes.push(Arc::downgrade(&p));
        p
    }
}

/// One host's transport (one incarnation of it).
pub struct SimHost {
    net: SimNet,
    /// The host.
    pub host: HostId,
    incarnation: u64,
}

impl SimHost {
    fn alive(&self, st: &State) -> bool {
        let h = &st.hosts[self.host];
        h.alive && h.incarnation == self.incarnation
    }
}

fn dead() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "host is down")
}

enum Plan {
    Refused(Duration),
    Hang,
    Up(Conn, Duration),
    Fail(io::Error),
}

impl SimHost {
    fn plan_connect(&self, addr: SocketAddr) -> Plan {
        let mut st = self.net.st();
        if !self.alive(&st) {
            return Plan::Fail(dead());
        }
        let (lo, hi) = st.params.latency;
        let latency = st.rng.gen_range(lo..=hi);
        let Some(l) = st.listeners.get(&addr) else {
            trace(&st.trace, format_args!("connect {} -> {addr} refused", self.host));
            return Plan::Refused(latency * 2);
        };
        let (to, tx) = (l.host, l.tx.clone());
        if SimNet::partitioned(&st, self.host, to) {
            trace(&st.trace, format_args!("connect {} -> {addr} hangs (partition)", self.host));
            return Plan::Hang;
        }
        let id = st.next_conn;
        st.next_conn += 1;
        let p_slow = st.params.slow_conn;
        let slow = st.rng.gen_bool(p_slow);
        let cap = if slow { 4 * 1024 } else { st.params.cap };
        let (blo, bhi) = st.params.bytes_per_ms;
        let bw = st.rng.gen_range(blo..=bhi);
        let up = SimNet::new_pipe(&mut st, id, self.host, to, latency, cap, bw);
        let down = SimNet::new_pipe(&mut st, id, to, self.host, latency, cap, bw);
        let port = {
            let p = st.next_port.entry(self.host).or_insert(40_000);
            *p = p.wrapping_add(1).max(40_000);
            *p
        };
        let local = SocketAddr::new(st.hosts[self.host].ip, port);
        trace(
            &st.trace,
            format_args!("connect conn={id} {} -> {to} {addr} latency={latency:?} cap={cap} bw={bw}", self.host),
        );
        let server = Conn { stream: Box::new(SimStream::new(up.clone(), down.clone())), peer: local, local: addr };
        if tx.send(server).is_err() {
            return Plan::Fail(io::Error::new(io::ErrorKind::ConnectionRefused, "listener closed"));
        }
        Plan::Up(Conn { stream: Box::new(SimStream::new(down, up)), peer: addr, local }, latency * 2)
    }
}

impl Transport for SimHost {
    fn clock(&self) -> Clock {
        Clock::skewed(self.net.st().hosts[self.host].skew)
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(async move {
            match self.plan_connect(addr) {
                Plan::Fail(e) => Err(e),
                Plan::Refused(after) => {
                    tokio::time::sleep(after).await;
                    Err(io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused"))
                }
                // A SYN into a partition: no answer; the caller's timeout decides.
                Plan::Hang => std::future::pending().await,
                Plan::Up(conn, rtt) => {
                    tokio::time::sleep(rtt).await;
                    Ok(conn)
                }
            }
        })
    }

    fn bind(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let mut st = self.net.st();
            if !self.alive(&st) {
                return Err(dead());
            }
            let ip = st.hosts[self.host].ip;
            let addr = if addr.port() == 0 {
                let p = st.next_port.entry(self.host).or_insert(40_000);
                *p += 1;
                SocketAddr::new(ip, *p)
            } else {
                SocketAddr::new(ip, addr.port())
            };
            if st.listeners.contains_key(&addr) {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "address in use"));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            st.listeners.insert(addr, ListenerEntry { host: self.host, incarnation: self.incarnation, tx });
            trace(&st.trace, format_args!("bind {} {addr}", self.host));
            Ok(Box::new(SimListener {
                net: self.net.clone(),
                host: self.host,
                incarnation: self.incarnation,
                addr,
                rx: tokio::sync::Mutex::new(rx),
            }) as Box<dyn Listener>)
        })
    }
}
