//! One simulated peer: its own 127.x address, where it answers the tracker's reachability probes, and a
//! tracker client that behaves like the real one (`src/tracker_client/`): one session, opened with a full
//! handshake and a ticket request (sent one after the other; the real client pipelines them with its first request,
//! SPEC §3.4, which saves round trips but no tracker work), then resumed on a new connection for every request (the
//! real client keeps a
//! connection for 2 s after a request; a simulated peer makes no second request within 2 s, so it closes at once
//! and holds no descriptor between requests). With `--no-resume` it keeps the session's connection instead while
//! idle under `reuse_idle` (75 s, the client before session tickets). Announces follow the interval the tracker
//! hands out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::PublicKey;
use anomos_proto::ids::ChainId;
use anomos_proto::link::{decode_probe_body, PROBE_MAGIC};
use anomos_proto::probe_v2::{
    decode_probe_v2, ProbeAuth, PROBE_UNKNOWN, PROBE_V2_ANSWER_LEN, PROBE_V2_LEN, PROBE_VERSION_2,
};
use anomos_proto::tracker::{self, Announce, FromTracker, ResumeAnswer, Ticket, ToTracker, TrackerChannel};
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

/// The generator's RSA signing, on its own threads: probe answers first (the tracker gives them 5 s), then
/// session Hellos. Signing inline on the async workers let a join wave's Hellos delay probe answers past the
/// tracker's timeout and the peers' next frames past the tracker's idle timeout: errors of the generator, not of
/// the tracker. Each simulated peer would sign on its own machine; here they share these threads.
pub struct Signer {
    queue: std::sync::Mutex<(std::collections::VecDeque<Job>, std::collections::VecDeque<Job>)>,
    ready: std::sync::Condvar,
}

type Job = (Arc<Peer>, Vec<u8>, tokio::sync::oneshot::Sender<Result<Vec<u8>, String>>);

impl Signer {
    /// `threads` signing threads.
    pub fn start(threads: usize) -> Arc<Self> {
        let s = Arc::new(Signer { queue: std::sync::Mutex::default(), ready: std::sync::Condvar::new() });
        for _ in 0..threads.max(1) {
            let s = Arc::clone(&s);
            std::thread::spawn(move || loop {
                let job = {
                    let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if let Some(j) = q.0.pop_front().or_else(|| q.1.pop_front()) {
                            break j;
                        }
                        q = s.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                };
                let (peer, msg, tx) = job;
                let _ = tx.send(peer.key.sign(&msg));
            });
        }
        s
    }

    /// Signs `msg` with `peer`'s key; `probe` answers go before Hellos.
    pub async fn sign(&self, peer: &Arc<Peer>, msg: Vec<u8>, probe: bool) -> Result<Vec<u8>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let lane = if probe { &mut q.0 } else { &mut q.1 };
            lane.push_back((Arc::clone(peer), msg, tx));
        }
        self.ready.notify_one();
        rx.await.map_err(|_| "sign: signer gone".to_string())?
    }
}

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
    /// Resume sessions with tickets (the real client); false: keep connections (`--no-resume`).
    pub resume: bool,
    /// Move each peer's announces to a random phase after its first one.
    pub spread: bool,
    pub start: Instant,
    pub stats: Stats,
    pub stop: watch::Receiver<bool>,
    pub signer: Arc<Signer>,
    /// Full session set-ups (a Hello signature each) the generator runs at once; more peers wait their turn.
    pub handshakes: tokio::sync::Semaphore,
    /// The tracker channel version the peers speak (2: the tracker's certified static key, probes answered by
    /// a MAC; 1: an OAEP decryption at the tracker and a signed probe answer per join).
    pub channel_version: u16,
    /// Tracker connections the generator has open at once (its open-file limit is shared by 100,000 simulated
    /// peers that would each have their own): a request waits for a slot before it connects. Latencies are
    /// measured from the slot, so the generator's own queue is not counted as the tracker's.
    pub conns: tokio::sync::Semaphore,
    /// The longest announce interval the tracker has handed out (it grows with the overlay: `--announce-rate`).
    pub longest_interval: std::sync::atomic::AtomicU32,
    /// When the latest peer joined (ms since `start`): a table answered before it may have lost an edge since
    /// (a newcomer splits edges).
    pub last_join_ms: AtomicU64,
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

/// Connects `sock` to the tracker at `to`; with replicas within 1.5 s (as the real client, which then fails over).
async fn connect(ctx: &Ctx, sock: TcpSocket, to: SocketAddr) -> Result<TcpStream, String> {
    let limit = if ctx.replicas.is_empty() { IO_TIMEOUT } else { Duration::from_millis(1500) };
    match timeout(limit, sock.connect(to)).await {
        Err(_) => Err("timeout:connect".into()),
        Ok(Err(e)) => Err(err_kind(&e)),
        Ok(Ok(s)) => Ok(s),
    }
}

impl Session {
    async fn connect(ctx: &Ctx, peer: &Arc<Peer>, from: IpAddr, to: SocketAddr) -> Result<Self, String> {
        let sock = TcpSocket::new_v4().map_err(|e| err_kind(&e))?;
        sock.bind(SocketAddr::new(from, 0)).map_err(|e| err_kind(&e))?;
        let mut stream = connect(ctx, sock, to).await?;
        stream.set_nodelay(true).map_err(|e| err_kind(&e))?;
        // The tracker sheds a connection before any work when too many channel set-ups are in progress (or every
        // connection slot is taken): a closed connection is its "busy, retry later".
        let shed = |e: String| match e.as_str() {
            "io:UnexpectedEof" | "io:ConnectionReset" => "shed:closed-before-hello".to_string(),
            _ => e,
        };
        let (chan, th) = if ctx.channel_version >= tracker::TRACKER_VERSION_2 {
            let (hello, handshake) = TrackerChannel::connect_v2(&mut rand::rngs::OsRng, &ctx.tracker_key)
                .map_err(|e| format!("proto:{e}"))?;
            io("hello", stream.write_all(&hello)).await?;
            let mut e_t = [0u8; tracker::EPHEMERAL_LEN];
            io("hello", stream.read_exact(&mut e_t)).await.map_err(shed)?;
            let mut len = [0u8; 2];
            io("hello", stream.read_exact(&mut len)).await?;
            let len = TrackerChannel::server_hello_v2_cert_len(len).map_err(|e| format!("proto:{e}"))?;
            let mut cert = vec![0u8; len];
            io("hello", stream.read_exact(&mut cert)).await?;
            let c = handshake.finish(&e_t, &cert, anomos_net::rt::unix_now()).map_err(|e| format!("proto:{e}"))?;
            (c.channel, Some(c.th))
        } else {
            let (hello, handshake) =
                TrackerChannel::connect(&mut rand::rngs::OsRng, &ctx.tracker_key).map_err(|e| format!("proto:{e}"))?;
            io("hello", stream.write_all(&hello)).await?;
            let mut reply = [0u8; tracker::EPHEMERAL_LEN];
            io("hello", stream.read_exact(&mut reply)).await.map_err(shed)?;
            (handshake.finish(&reply).map_err(|e| format!("proto:{e}"))?, None)
        };
        let mut s = Session { stream, chan };
        let nonce = match s.recv().await? {
            FromTracker::Challenge { nonce } => nonce,
            other => return Err(format!("unexpected:{other:?}")),
        };
        let fp = ctx.tracker_key.fingerprint();
        let signed = match &th {
            Some(th) => tracker::hello_v2_signed_bytes(&fp, &nonce, th),
            None => tracker::hello_signed_bytes(&fp, &nonce),
        };
        let signature = ctx.signer.sign(peer, signed, false).await?;
        match s.request(&ToTracker::Hello { public_key: peer.key.der.clone(), signature }).await? {
            FromTracker::Welcome { .. } => {
                if th.is_some() {
                    // The session's probe key, for this peer's probe answers (the newest two kept).
                    let auth = ProbeAuth::derive(s.chan.resumption_secret(), &peer.key.fingerprint)
                        .map_err(|e| format!("proto:{e}"))?;
                    let mut keys = peer.probe_keys.lock().unwrap_or_else(|e| e.into_inner());
                    keys.insert(0, auth);
                    keys.truncate(2);
                }
                Ok(s)
            }
            other => Err(format!("unexpected:{other:?}")),
        }
    }

    /// Resumes the session of `ticket` (SPEC §3.4); `None` when the tracker does not hold it.
    async fn resume(ctx: &Ctx, ticket: &Ticket, from: IpAddr, to: SocketAddr) -> Result<Option<Self>, String> {
        let sock = TcpSocket::new_v4().map_err(|e| err_kind(&e))?;
        sock.bind(SocketAddr::new(from, 0)).map_err(|e| err_kind(&e))?;
        let mut stream = connect(ctx, sock, to).await?;
        stream.set_nodelay(true).map_err(|e| err_kind(&e))?;
        let (hello, hs) = TrackerChannel::resume(&mut rand::rngs::OsRng, &ctx.tracker_key.fingerprint(), ticket)
            .map_err(|e| format!("proto:{e}"))?;
        io("resume", stream.write_all(&hello)).await?;
        let mut status = [0u8; 1];
        // Closed before any answer: the tracker's connection limit (close at once), or a tracker stopping.
        io("resume", stream.read_exact(&mut status)).await.map_err(|e| match e.as_str() {
            "io:UnexpectedEof" | "io:ConnectionReset" => "shed:closed-before-answer".to_string(),
            _ => e,
        })?;
        if ResumeAnswer::from_byte(status[0]).map_err(|e| format!("proto:{e}"))? == ResumeAnswer::Unknown {
            return Ok(None);
        }
        let mut e_t = [0u8; tracker::EPHEMERAL_LEN];
        io("resume", stream.read_exact(&mut e_t)).await?;
        let chan = hs.finish(&e_t).map_err(|e| format!("proto:{e}"))?;
        Ok(Some(Session { stream, chan }))
    }

    /// Asks for the session's ticket.
    async fn ticket(&mut self) -> Result<(Ticket, Duration), String> {
        match self.request(&ToTracker::Resumable).await? {
            FromTracker::Ticket { ticket, lifetime_secs } => Ok((
                Ticket { id: ticket, secret: self.chan.resumption_secret().clone() },
                Duration::from_secs(u64::from(lifetime_secs)),
            )),
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

/// A reply, how long a full session set-up took (if one was needed), and the whole request from its connection
/// slot on, less any wait for the generator's own handshake slot.
pub type Reply = (FromTracker, Option<Duration>, Duration);

/// A simulated peer's session: the kept connection (`--no-resume`) and the ticket (its last use, lifetime).
#[derive(Default)]
struct PeerSession {
    conn: Option<(Session, Instant)>,
    ticket: Option<(Ticket, Instant, Duration)>,
}

/// A ticket is not presented within this margin of its lifetime (as the real client).
const TICKET_MARGIN: Duration = Duration::from_secs(10);

/// A simulated peer.
pub struct Peer {
    pub listen: SocketAddr,
    key: PeerKey,
    session: Mutex<PeerSession>,
    /// Index of the tracker address in use (with replicas).
    at: std::sync::atomic::AtomicUsize,
    /// Requests that moved to another replica.
    pub failovers: AtomicU64,
    pub joined: AtomicBool,
    /// Successful announces so far.
    pub announces: AtomicU64,
    /// When the last of them was answered (ms since the generator's start).
    pub last_announce_ms: AtomicU64,
    /// The neighbor table of the last announce reply: (NeighborID, address).
    pub table: std::sync::Mutex<Vec<(u64, SocketAddr)>>,
    /// Its version-2 sessions' probe keys, newest first (at most two).
    probe_keys: std::sync::Mutex<Vec<ProbeAuth>>,
}

impl Peer {
    /// A peer at `addr_of(k, port)`; the shared listener ([`answer_probes`]) answers its probes.
    pub fn new(k: usize, key: PeerKey, port: u16) -> Arc<Self> {
        Arc::new(Peer {
            listen: addr_of(k, port),
            key,
            session: Mutex::new(PeerSession::default()),
            at: std::sync::atomic::AtomicUsize::new(k),
            failovers: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            announces: AtomicU64::new(0),
            last_announce_ms: AtomicU64::new(0),
            table: std::sync::Mutex::new(Vec::new()),
            probe_keys: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The tracker address in use.
    fn addr(&self, ctx: &Ctx) -> SocketAddr {
        let n = ctx.replicas.len() + 1;
        match self.at.load(Ordering::Relaxed) % n {
            0 => ctx.tracker,
            i => ctx.replicas.get(i - 1).copied().unwrap_or(ctx.tracker),
        }
    }

    /// Sends `msg` as the real client does; returns the reply and how long the session set-up took, if it needed
    /// a full one (resumptions are recorded as `resumes`). With replicas, a failure that moves the real client to
    /// the next address does so here (each address once; the session, and its ticket, belong to one replica).
    pub async fn request(self: &Arc<Self>, ctx: &Ctx, msg: &ToTracker) -> Result<Reply, String> {
        let n = ctx.replicas.len() + 1;
        let mut r = self.request_once(ctx, msg).await;
        for _ in 1..n {
            match &r {
                Err(e) if e.contains("io:") || e.contains("timeout:") || e.ends_with("tracker:Unavailable") => {
                    *self.session.lock().await = PeerSession::default();
                    self.at.fetch_add(1, Ordering::Relaxed);
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    r = self.request_once(ctx, msg).await;
                }
                _ => break,
            }
        }
        r
    }

    /// One request at the current address.
    async fn request_once(self: &Arc<Self>, ctx: &Ctx, msg: &ToTracker) -> Result<Reply, String> {
        // A peer that will need a full set-up takes its handshake slot before its connection slot: the other way
        // round, peers waiting for one of the 64 handshake slots held the connection slots that resuming peers
        // needed, their announces came too late and they expired.
        let full = {
            let slot = self.session.lock().await;
            let fresh = slot.ticket.as_ref().is_some_and(|(_, used, life)| used.elapsed() + TICKET_MARGIN < *life);
            !(fresh || slot.conn.as_ref().is_some_and(|(_, used)| used.elapsed() < ctx.reuse_idle))
        };
        let _turn = if full { Some(ctx.handshakes.acquire().await.map_err(|_| "closed".to_string())?) } else { None };
        let _conn = ctx.conns.acquire().await.map_err(|_| "closed".to_string())?;
        let t0 = Instant::now();
        let (reply, setup, waited) = self.request_now(ctx, msg, full).await?;
        Ok((reply, setup, t0.elapsed().saturating_sub(waited)))
    }

    /// [`Peer::request`] once it has a connection slot; also returns how long it waited for the generator's own
    /// handshake slot.
    async fn request_now(
        self: &Arc<Self>,
        ctx: &Ctx,
        msg: &ToTracker,
        has_turn: bool,
    ) -> Result<(FromTracker, Option<Duration>, Duration), String> {
        let mut slot = self.session.lock().await;
        if let Some((mut s, used)) = slot.conn.take() {
            if used.elapsed() < ctx.reuse_idle {
                match s.request(msg).await {
                    Err(e) if e.starts_with("io:") => {} // closed by the tracker: reconnect once
                    r => {
                        if r.is_ok() || r.as_ref().is_err_and(|e| e.starts_with("tracker:")) {
                            slot.conn = Some((s, Instant::now()));
                        }
                        return r.map(|reply| (reply, None, Duration::ZERO));
                    }
                }
            }
        }
        let fresh = slot.ticket.as_ref().filter(|(_, used, life)| used.elapsed() + TICKET_MARGIN < *life);
        if let Some((ticket, _, _)) = fresh.cloned() {
            let t = Instant::now();
            match Session::resume(ctx, &ticket, self.listen.ip(), self.addr(ctx))
                .await
                .map_err(|e| format!("resume/{e}"))?
            {
                Some(mut s) => {
                    ctx.stats.resumes.record(ctx.start, t.elapsed());
                    let r = s.request(msg).await;
                    if r.is_ok() || r.as_ref().is_err_and(|e| e.starts_with("tracker:")) {
                        if let Some((_, used, _)) = slot.ticket.as_mut() {
                            *used = Instant::now();
                        }
                    }
                    return r.map(|reply| (reply, None, Duration::ZERO)); // the connection closes here (dropped)
                }
                None => {
                    ctx.stats.note(ctx.start, "resume/unknown-ticket (full handshake instead)");
                    slot.ticket = None;
                }
            }
        }
        // The generator's own pacing of Hello signatures: the wait is not the tracker's, so it is left out.
        let w = Instant::now();
        let _turn =
            if has_turn { None } else { Some(ctx.handshakes.acquire().await.map_err(|_| "closed".to_string())?) };
        let waited = w.elapsed();
        let t = Instant::now();
        let mut s =
            Session::connect(ctx, self, self.listen.ip(), self.addr(ctx)).await.map_err(|e| format!("session/{e}"))?;
        if ctx.resume {
            let (ticket, life) = s.ticket().await.map_err(|e| format!("session/ticket/{e}"))?;
            slot.ticket = Some((ticket, Instant::now(), life));
        }
        let setup = t.elapsed();
        ctx.stats.sessions.record(ctx.start, setup);
        let r = s.request(msg).await;
        let keep = !ctx.resume && !ctx.reuse_idle.is_zero();
        if keep && (r.is_ok() || r.as_ref().is_err_and(|e| e.starts_with("tracker:"))) {
            slot.conn = Some((s, Instant::now()));
        }
        r.map(|reply| (reply, Some(setup), waited))
    }

    /// Announces at the tracker's interval until stopped; after a failure retries after 0.5, 1, 2 … 30 s
    /// (jittered), as the real peer does.
    pub async fn run(self: Arc<Self>, ctx: Arc<Ctx>, joined_from: Instant) {
        let mut stop = ctx.stop.clone();
        let mut backoff = Duration::from_millis(500);
        let msg = ToTracker::Announce(Announce { listen: self.listen, chains: ctx.chains.clone(), family: Vec::new() });
        loop {
            let wait = match self.request(&ctx, &msg).await {
                Ok((FromTracker::Announced(a), setup, took)) => {
                    // Latencies of announces by peers that have joined (a join is measured by `joins`).
                    if self.joined.load(Ordering::Relaxed) {
                        ctx.stats.announce_total.record(ctx.start, took);
                        ctx.stats.announces.record(ctx.start, took.saturating_sub(setup.unwrap_or_default()));
                    }
                    let interval = Duration::from_secs(u64::from(a.interval_secs.clamp(1, 3600)));
                    ctx.longest_interval.fetch_max(a.interval_secs.clamp(1, 3600), Ordering::Relaxed);
                    *self.table.lock().unwrap_or_else(|e| e.into_inner()) =
                        a.neighbors.iter().map(|n| (n.id.0, n.addr)).collect();
                    self.announces.fetch_add(1, Ordering::Relaxed);
                    let now_ms = ctx.start.elapsed().as_millis() as u64;
                    self.last_announce_ms.store(now_ms, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    if !self.joined.swap(true, Ordering::Relaxed) {
                        ctx.stats.joins.record(ctx.start, joined_from.elapsed());
                        ctx.last_join_ms.fetch_max(now_ms, Ordering::Relaxed);
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
                        Ok((reply, _, _)) => format!("unexpected:{reply:?}"),
                        Err(e) => e,
                    };
                    ctx.stats.failure(ctx.start, format!("announce/{kind}"));
                    // Jittered, as the real peer (src/node/neighbors.rs).
                    let w = backoff.mul_f64(0.5 + rand::random::<f64>());
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
    pub async fn request_circuit(self: &Arc<Self>, ctx: &Ctx, chain: ChainId, relays: u8) -> bool {
        let req = ToTracker::RequestCircuits(tracker::CircuitRequest { chain, count: 1, relays });
        match self.request(ctx, &req).await {
            Ok((FromTracker::Circuits(c), setup, took)) if !c.circuits.is_empty() => {
                // A full session set-up, if one was needed, is counted (the peer waited for it); the wait for
                // the generator's own handshake slot is not.
                let _ = setup;
                ctx.stats.grants.record(ctx.start, took);
                return true;
            }
            Ok((FromTracker::Circuits(_), _, _)) => ctx.stats.error(ctx.start, "circuit/empty"),
            Ok((reply, _, _)) => ctx.stats.error(ctx.start, format!("circuit/unexpected:{reply:?}")),
            Err(e) => ctx.stats.failure(ctx.start, format!("circuit/{e}")),
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
    let mut probe = [0u8; PROBE_V2_LEN];
    if io("probe", s.read_exact(&mut probe[..10])).await.is_err() || probe[..8] != PROBE_MAGIC {
        ctx.stats.error(ctx.start, "probe/bad");
        return;
    }
    if u16::from_be_bytes([probe[8], probe[9]]) == PROBE_VERSION_2 {
        // A MAC under the session's probe key, as the real listener answers (`src/probe_keys.rs`): no signature.
        let parsed = match io("probe", s.read_exact(&mut probe[10..])).await {
            Ok(_) => decode_probe_v2(&probe[8..]),
            Err(_) => {
                ctx.stats.error(ctx.start, "probe/bad");
                return;
            }
        };
        let Ok(p) = parsed else {
            ctx.stats.error(ctx.start, "probe/bad");
            return;
        };
        let answer = {
            let keys = peer.probe_keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter().find(|a| a.owns(&p)).map(|a| a.answer(&p, peer.listen))
        };
        let answer = answer.unwrap_or_else(|| {
            let mut a = [0u8; PROBE_V2_ANSWER_LEN];
            a[0] = PROBE_UNKNOWN;
            a
        });
        match io("probe", s.write_all(&answer)).await {
            Ok(()) => ctx.stats.probes.record(ctx.start, t.elapsed()),
            Err(_) => ctx.stats.error(ctx.start, "probe/write"),
        }
        return;
    }
    if io("probe", s.read_exact(&mut probe[10..42])).await.is_err() {
        ctx.stats.error(ctx.start, "probe/bad");
        return;
    }
    let Ok(nonce) = decode_probe_body(&probe[8..42]) else {
        ctx.stats.error(ctx.start, "probe/bad");
        return;
    };
    let der = &peer.key.der;
    let Ok(sig) = ctx.signer.sign(&peer, [SIG_PROBE, &nonce, der].concat(), true).await else {
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
