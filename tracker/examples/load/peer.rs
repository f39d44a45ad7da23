//! One simulated peer: its own 127.x address, where it answers the tracker's reachability probes, and a
//! tracker client that behaves like the real one (`src/tracker_client.rs`): one session, reused while it has been
//! idle for less than `reuse_idle` (30 s, as the peer does), otherwise replaced; a kept session the tracker
//! closed is replaced once. Announces follow the interval the tracker hands out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::PublicKey;
use anomos_proto::ids::ChainId;
use anomos_proto::link::{decode_probe_body, PROBE_MAGIC};
use anomos_proto::tracker::{self, Announce, FromTracker, ToTracker, TrackerChannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::time::timeout;

use crate::keys::PeerKey;
use crate::stats::Stats;

/// The probe answer's signed label (`anomos_proto::link`'s, private there). Were it to change, every probe would
/// fail and the run would show it as `tracker:Unreachable` errors.
const SIG_PROBE: &[u8] = b"anomos probe v1";
/// The real client's I/O timeout per step.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// What every peer shares.
pub struct Ctx {
    pub tracker: SocketAddr,
    /// Further addresses of a replicated tracker (`examples/replicas.rs`); empty for one tracker. With them a peer
    /// starts at address k mod n and fails over as the real client does: on a failed connect (1.5 s at most), a
    /// failed or timed-out request or an `Unavailable` reply it moves to the next address and asks there.
    pub replicas: Vec<SocketAddr>,
    pub tracker_key: PublicKey,
    pub chains: Vec<ChainId>,
    pub reuse_idle: Duration,
    /// Move each peer's announces to a random phase after its first one.
    pub spread: bool,
    pub start: Instant,
    pub stats: Stats,
    pub stop: watch::Receiver<bool>,
}

/// The loopback address of peer `k`: 127.A.B.C with C in 1..=254, starting at 127.10.0.1 (127.0.0.1 is the
/// tracker's). Linux answers the whole of 127/8 on `lo`.
pub fn addr_of(k: usize, port: u16) -> SocketAddr {
    let (c, rest) = (1 + k % 254, k / 254);
    let (b, a) = (rest % 256, 10 + rest / 256);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, a as u8, b as u8, c as u8)), port)
}

struct Session {
    stream: TcpStream,
    chan: TrackerChannel,
}

fn err_kind(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        // EMFILE: the generator itself is out of descriptors (its open-file limit, not the tracker's doing).
        Some(24) => "io:EMFILE".into(),
        _ => format!("io:{:?}", e.kind()),
    }
}

async fn io<T>(what: &str, f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, String> {
    match timeout(IO_TIMEOUT, f).await {
        Err(_) => Err(format!("timeout:{what}")),
        Ok(Err(e)) => Err(err_kind(&e)),
        Ok(Ok(x)) => Ok(x),
    }
}

impl Session {
    async fn connect(ctx: &Ctx, key: &PeerKey, from: IpAddr, to: SocketAddr) -> Result<Self, String> {
        let sock = TcpSocket::new_v4().map_err(|e| err_kind(&e))?;
        sock.bind(SocketAddr::new(from, 0)).map_err(|e| err_kind(&e))?;
        let connect_timeout = if ctx.replicas.is_empty() { IO_TIMEOUT } else { Duration::from_millis(1500) };
        let mut stream = match timeout(connect_timeout, sock.connect(to)).await {
            Err(_) => return Err("timeout:connect".into()),
            Ok(Err(e)) => return Err(err_kind(&e)),
            Ok(Ok(s)) => s,
        };
        stream.set_nodelay(true).map_err(|e| err_kind(&e))?;
        let (hello, handshake) =
            TrackerChannel::connect(&mut rand::rngs::OsRng, &ctx.tracker_key).map_err(|e| format!("proto:{e}"))?;
        io("hello", stream.write_all(&hello)).await?;
        let mut reply = [0u8; tracker::EPHEMERAL_LEN];
        io("hello", stream.read_exact(&mut reply)).await?;
        let chan = handshake.finish(&reply).map_err(|e| format!("proto:{e}"))?;
        let mut s = Session { stream, chan };
        let nonce = match s.recv().await? {
            FromTracker::Challenge { nonce } => nonce,
            other => return Err(format!("unexpected:{other:?}")),
        };
        let signature = key.sign(&tracker::hello_signed_bytes(&ctx.tracker_key.fingerprint(), &nonce))?;
        match s.request(&ToTracker::Hello { public_key: key.der.clone(), signature }).await? {
            FromTracker::Welcome { .. } => Ok(s),
            other => Err(format!("unexpected:{other:?}")),
        }
    }

    async fn recv(&mut self) -> Result<FromTracker, String> {
        let mut len = [0u8; 4];
        io("reply", self.stream.read_exact(&mut len)).await?;
        let n = TrackerChannel::frame_len(len).map_err(|e| format!("proto:{e}"))?;
        let mut body = vec![0u8; n];
        io("reply", self.stream.read_exact(&mut body)).await?;
        let msg: FromTracker = self.chan.open(&body).map_err(|e| format!("proto:{e}"))?;
        msg.validate().map_err(|e| format!("proto:{e}"))?;
        Ok(msg)
    }

    /// One request and its reply; a tracker error reply becomes `tracker:<code>`.
    async fn request(&mut self, msg: &ToTracker) -> Result<FromTracker, String> {
        let frame = self.chan.seal(msg).map_err(|e| format!("proto:{e}"))?;
        io("send", self.stream.write_all(&frame)).await?;
        match self.recv().await? {
            FromTracker::Error(e) => Err(format!("tracker:{:?}", e.code)),
            reply => Ok(reply),
        }
    }
}

/// A simulated peer.
pub struct Peer {
    pub listen: SocketAddr,
    key: PeerKey,
    session: Mutex<Option<(Session, Instant)>>,
    /// Index of the tracker address in use (with replicas).
    at: std::sync::atomic::AtomicUsize,
    /// Requests that moved to another replica.
    pub failovers: AtomicU64,
    pub joined: AtomicBool,
    /// Successful announces so far.
    pub announces: AtomicU64,
    /// The neighbor table of the last announce reply: (NeighborID, address).
    pub table: std::sync::Mutex<Vec<(u64, SocketAddr)>>,
}

impl Peer {
    /// A peer at `addr_of(k, port)`; the shared listener ([`answer_probes`]) answers its probes.
    pub fn new(k: usize, key: PeerKey, port: u16) -> Arc<Self> {
        Arc::new(Peer {
            listen: addr_of(k, port),
            key,
            session: Mutex::new(None),
            at: std::sync::atomic::AtomicUsize::new(k),
            failovers: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            announces: AtomicU64::new(0),
            table: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The tracker address in use.
    fn addr(&self, ctx: &Ctx) -> SocketAddr {
        let n = ctx.replicas.len() + 1;
        match self.at.load(Ordering::Relaxed) % n {
            0 => ctx.tracker,
            i => ctx.replicas[i - 1],
        }
    }

    /// Sends `msg` as the real client does; returns the reply and how long the session set-up took, if any. With
    /// replicas, a failure that moves the real client to the next address does so here (each address once).
    pub async fn request(&self, ctx: &Ctx, msg: &ToTracker) -> Result<(FromTracker, Option<Duration>), String> {
        let n = ctx.replicas.len() + 1;
        let mut r = self.request_once(ctx, msg).await;
        for _ in 1..n {
            match &r {
                Err(e) if e.contains("io:") || e.contains("timeout:") || e.ends_with("tracker:Unavailable") => {
                    *self.session.lock().await = None;
                    self.at.fetch_add(1, Ordering::Relaxed);
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    r = self.request_once(ctx, msg).await;
                }
                _ => break,
            }
        }
        r
    }

    async fn request_once(&self, ctx: &Ctx, msg: &ToTracker) -> Result<(FromTracker, Option<Duration>), String> {
        let mut slot = self.session.lock().await;
        if let Some((mut s, used)) = slot.take() {
            if used.elapsed() < ctx.reuse_idle {
                match s.request(msg).await {
                    Err(e) if e.starts_with("io:") => {} // closed by the tracker: reconnect once
                    r => {
                        if r.is_ok() || r.as_ref().is_err_and(|e| e.starts_with("tracker:")) {
                            *slot = Some((s, Instant::now()));
                        }
                        return r.map(|reply| (reply, None));
                    }
                }
            }
        }
        let t = Instant::now();
        let to = self.addr(ctx);
        let mut s = Session::connect(ctx, &self.key, self.listen.ip(), to).await.map_err(|e| format!("session/{e}"))?;
        let setup = t.elapsed();
        ctx.stats.sessions.record(ctx.start, setup);
        let r = s.request(msg).await;
        let keep = !ctx.reuse_idle.is_zero();
        if keep && (r.is_ok() || r.as_ref().is_err_and(|e| e.starts_with("tracker:"))) {
            *slot = Some((s, Instant::now()));
        }
        r.map(|reply| (reply, Some(setup)))
    }

    /// Announces at the tracker's interval until stopped; after a failure retries after 1, 2, 4 … 30 s.
    pub async fn run(self: Arc<Self>, ctx: Arc<Ctx>, joined_from: Instant) {
        let mut stop = ctx.stop.clone();
        let mut backoff = Duration::from_secs(1);
        let msg = ToTracker::Announce(Announce { listen: self.listen, chains: ctx.chains.clone(), family: Vec::new() });
        loop {
            let t = Instant::now();
            let wait = match self.request(&ctx, &msg).await {
                Ok((FromTracker::Announced(a), setup)) => {
                    let total = t.elapsed();
                    ctx.stats.announce_total.record(ctx.start, total);
                    ctx.stats.announces.record(ctx.start, total - setup.unwrap_or_default());
                    let interval = Duration::from_secs(u64::from(a.interval_secs.clamp(1, 3600)));
                    *self.table.lock().unwrap_or_else(|e| e.into_inner()) =
                        a.neighbors.iter().map(|n| (n.id.0, n.addr)).collect();
                    self.announces.fetch_add(1, Ordering::Relaxed);
                    backoff = Duration::from_secs(1);
                    if !self.joined.swap(true, Ordering::Relaxed) {
                        ctx.stats.joins.record(ctx.start, joined_from.elapsed());
                        if ctx.spread {
                            // Once, a random phase: as if the peers had joined over a long time.
                            interval.mul_f64(rand::random::<f64>())
                        } else {
                            interval
                        }
                    } else {
                        interval
                    }
                }
                other => {
                    let kind = match other {
                        Ok((reply, _)) => format!("unexpected:{reply:?}"),
                        Err(e) => e,
                    };
                    ctx.stats.error(ctx.start, format!("announce/{kind}"));
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One circuit request; the latency is recorded when at least one circuit was granted. Returns whether one
    /// was.
    pub async fn request_circuit(&self, ctx: &Ctx, chain: ChainId, relays: u8) -> bool {
        let t = Instant::now();
        let req = ToTracker::RequestCircuits(tracker::CircuitRequest { chain, count: 1, relays });
        match self.request(ctx, &req).await {
            Ok((FromTracker::Circuits(c), _)) if !c.circuits.is_empty() => {
                ctx.stats.grants.record(ctx.start, t.elapsed());
                return true;
            }
            Ok((FromTracker::Circuits(_), _)) => ctx.stats.error(ctx.start, "circuit/empty"),
            Ok((reply, _)) => ctx.stats.error(ctx.start, format!("circuit/unexpected:{reply:?}")),
            Err(e) => ctx.stats.error(ctx.start, format!("circuit/{e}")),
        }
        false
    }
}

/// The probe responder of every peer: `"ANOMOSP1" | ver | nonce` in, `der_len | der | sig_len | PSS(label | nonce
/// | der)` out, as `anomos_proto::link::answer_probe` builds it, signed by the peer whose address the tracker
/// dialed.
///
/// One socket listens on 0.0.0.0:`port` for all of them: it receives connections to every 127.x address, and the
/// address a connection arrived at says which peer is asked. (One listener per peer would cost a descriptor
/// each, and a container's hard limit, 20,000 here, would then stop the run at half the peers.) Connections from
/// outside 127/8 or to an address that is no peer's are closed unanswered.
pub async fn answer_probes(ctx: Arc<Ctx>, peers: Arc<HashMap<SocketAddr, Arc<Peer>>>, port: u16) -> Result<(), String> {
    let listener = TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
        .await
        .map_err(|e| format!("probe listener on port {port}: {e}"))?;
    tokio::spawn(async move {
        let mut stop = ctx.stop.clone();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let Ok((s, from)) = accepted else {
                ctx.stats.error(ctx.start, "probe/accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let peer = s.local_addr().ok().and_then(|a| peers.get(&a).cloned());
            let Some(peer) = peer.filter(|_| from.ip().is_loopback()) else { continue };
            tokio::spawn(answer_probe(Arc::clone(&ctx), peer, s));
        }
    });
    Ok(())
}

async fn answer_probe(ctx: Arc<Ctx>, peer: Arc<Peer>, mut s: TcpStream) {
    let t = Instant::now();
    let mut probe = [0u8; 42];
    if io("probe", s.read_exact(&mut probe)).await.is_err() || probe[..8] != PROBE_MAGIC {
        ctx.stats.error(ctx.start, "probe/bad");
        return;
    }
    let Ok(nonce) = decode_probe_body(&probe[8..]) else {
        ctx.stats.error(ctx.start, "probe/bad");
        return;
    };
    let der = &peer.key.der;
    let Ok(sig) = peer.key.sign(&[SIG_PROBE, &nonce, der].concat()) else {
        ctx.stats.error(ctx.start, "probe/sign");
        return;
    };
    let mut out = Vec::with_capacity(4 + der.len() + sig.len());
    out.extend_from_slice(&(der.len() as u16).to_be_bytes());
    out.extend_from_slice(der);
    out.extend_from_slice(&(sig.len() as u16).to_be_bytes());
    out.extend_from_slice(&sig);
    match io("probe", s.write_all(&out)).await {
        Ok(()) => ctx.stats.probes.record(ctx.start, t.elapsed()),
        Err(_) => ctx.stats.error(ctx.start, "probe/write"),
    }
}
