//! Talking to the tracker: an encrypted, authenticated session (SPEC.md §3) that outlives its connection: after
//! the full handshake the client asks for a session ticket, closes the connection once it has been idle for
//! [`CONN_KEEP`], and resumes the session on a new connection with the ticket (no RSA on either side, §3.4).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anomos_net::{Net, Stream, Transport};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::probe_v2::ProbeAuth;
use anomos_proto::tracker::{self, FromTracker, ResumeAnswer, Ticket, ToTracker, TrackerChannel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

use crate::error::PeerError;

const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest one request may take as a whole, from waiting for the client's lock through reconnects and
/// failovers to the reply: the lock serializes a peer's announces, circuit requests and reports, so a tracker (or
/// path) that answers each step just inside its own timeout must not hold all of them for minutes (found in
/// review, session 10). Twice the tracker's longest answer (a probe wait and a probe, 10 s) and then some.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// A kept session older than this (since its last request) is replaced instead of reused: a tracker that issues
/// no tickets (before SPEC revision 8, with a fixed interval) closes sessions idle for its `--idle-timeout` (by
/// default 2 × its announce interval + 30 s, 90 s at the default 30 s interval, SPEC §3.4), and writing into one it already closed costs a round trip to find out. 75 s covers the
/// default interval with room for a late announce, so one session carries all of a peer's announces.
const REUSE_IDLE: Duration = Duration::from_secs(75);
/// A connection whose session has a ticket is reused while idle for less than this, and closed once it has been
/// idle this long: the tracker closes such connections after its `--conn-idle-timeout` (5 s by default), and a
/// peer holding no connection between announces is what lets one tracker serve 100,000 peers (SPEC §3.4).
pub const CONN_KEEP: Duration = Duration::from_secs(2);
/// A ticket is not presented within this margin of its lifetime (the tracker may have expired it already).
const TICKET_MARGIN: Duration = Duration::from_secs(10);
/// How long a tracker that did not issue a ticket is not asked again.
const NO_TICKETS_FOR: Duration = Duration::from_secs(600);
/// How long a tracker address whose version-2 handshake failed is spoken to in version 1 (SPEC open issue 27).
const V1_FALLBACK: Duration = Duration::from_secs(600);
/// With several tracker addresses (replicas), how long a TCP connect may take before the next address is tried:
/// a failover completes within 2 s even when a replica's host is gone without a reset (SPEC §3.10 "Replicas").
const FAILOVER_CONNECT: Duration = Duration::from_millis(1500);

/// An open session with the tracker, after Hello/Welcome.
pub struct TrackerSession {
    stream: Box<dyn Stream>,
    chan: TrackerChannel,
}

async fn read_frame(stream: &mut (impl AsyncRead + Unpin + ?Sized)) -> Result<Vec<u8>, PeerError> {
    let mut len = [0u8; 4];
    timeout(IO_TIMEOUT, stream.read_exact(&mut len)).await.map_err(|_| PeerError::Timeout("tracker reply"))??;
    let n = TrackerChannel::frame_len(len)?;
    let mut body = vec![0u8; n];
    timeout(IO_TIMEOUT, stream.read_exact(&mut body)).await.map_err(|_| PeerError::Timeout("tracker reply"))??;
    Ok(body)
}

impl TrackerSession {
    /// Connects, proves the channel to the pinned key, and authenticates with our identity.
    pub async fn connect(addr: SocketAddr, tracker_key: &PublicKey, me: &Identity) -> Result<Self, PeerError> {
        Self::connect_via(&anomos_net::Tcp, addr, tracker_key, me, IO_TIMEOUT).await
    }

    /// [`connect`](Self::connect) over the transport `net`, with its own time for the connect (a version-1
    /// channel: every tracker speaks it).
    pub async fn connect_via(
        net: &dyn Transport,
        addr: SocketAddr,
        tracker_key: &PublicKey,
        me: &Identity,
        connect_timeout: Duration,
    ) -> Result<Self, PeerError> {
        Self::connect_version(net, addr, tracker_key, me, connect_timeout, tracker::TRACKER_VERSION).await
    }

    /// [`connect_via`](Self::connect_via) with a channel of `version` (2: the tracker's certified static key, no
    /// RSA at the tracker; only for a tracker whose key fetch said it speaks it, [`tracker_version`]).
    pub async fn connect_version(
        net: &dyn Transport,
        addr: SocketAddr,
        tracker_key: &PublicKey,
        me: &Identity,
        connect_timeout: Duration,
        version: u16,
    ) -> Result<Self, PeerError> {
        let mut stream = timeout(connect_timeout, net.connect(addr))
            .await
            .map_err(|_| PeerError::Timeout("tracker connect"))??
            .stream;
        let (chan, th) = if version >= tracker::TRACKER_VERSION_2 {
            let (hello, handshake) = TrackerChannel::connect_v2(&mut rand::rngs::OsRng, tracker_key)?;
            stream.write_all(&hello).await?;
            let mut e_t = [0u8; tracker::EPHEMERAL_LEN];
            let mut len = [0u8; 2];
            for buf in [&mut e_t[..], &mut len[..]] {
                timeout(IO_TIMEOUT, stream.read_exact(buf))
                    .await
                    .map_err(|_| PeerError::Timeout("tracker hello"))??;
            }
            let mut cert = vec![0u8; TrackerChannel::server_hello_v2_cert_len(len)?];
            timeout(IO_TIMEOUT, stream.read_exact(&mut cert))
                .await
                .map_err(|_| PeerError::Timeout("tracker hello"))??;
            let c = handshake.finish(&e_t, &cert, net.clock().unix_now())?;
            (c.channel, Some(c.th))
        } else {
            let (hello, handshake) = TrackerChannel::connect(&mut rand::rngs::OsRng, tracker_key)?;
            stream.write_all(&hello).await?;
            let mut reply = [0u8; tracker::EPHEMERAL_LEN];
            timeout(IO_TIMEOUT, stream.read_exact(&mut reply))
                .await
                .map_err(|_| PeerError::Timeout("tracker hello"))??;
            (handshake.finish(&reply)?, None)
        };
        let mut s = TrackerSession { stream, chan };
        let nonce = match s.recv().await? {
            FromTracker::Challenge { nonce } => nonce,
            other => return Err(PeerError::Tracker(format!("expected challenge, got {other:?}"))),
        };
        let fp = tracker_key.fingerprint();
        let hello = match &th {
            Some(th) => tracker::make_hello_v2(me, &fp, &nonce, th, &mut rand::rngs::OsRng),
            None => tracker::make_hello(me, &fp, &nonce, &mut rand::rngs::OsRng),
        };
        match s.request(&hello).await? {
            FromTracker::Welcome { .. } => Ok(s),
            other => Err(PeerError::Tracker(format!("tracker refused hello: {other:?}"))),
        }
    }

    async fn recv(&mut self) -> Result<FromTracker, PeerError> {
        let body = read_frame(&mut self.stream).await?;
        // A frame that does not open under the session key means the other end is not the pinned tracker.
        let msg: FromTracker = self.chan.open(&body)?;
        msg.validate()?;
        Ok(msg)
    }

    /// Resumes the session of `ticket` on a new connection (`ResumeHello`, SPEC §3.4): `Ok(None)` when the
    /// tracker does not hold the ticket (expired, evicted, restarted: do a full handshake). The tracker is
    /// authenticated as for a full session: only it knows the resumption secret, so only its replies open.
    pub async fn resume(
        net: &dyn Transport,
        addr: SocketAddr,
        tracker_fp: &Fingerprint,
        ticket: &Ticket,
        connect_timeout: Duration,
    ) -> Result<Option<Self>, PeerError> {
        let mut stream = timeout(connect_timeout, net.connect(addr))
            .await
            .map_err(|_| PeerError::Timeout("tracker connect"))??
            .stream;
        let (hello, handshake) = TrackerChannel::resume(&mut rand::rngs::OsRng, tracker_fp, ticket)?;
        stream.write_all(&hello).await?;
        let mut status = [0u8; 1];
        timeout(IO_TIMEOUT, stream.read_exact(&mut status))
            .await
            .map_err(|_| PeerError::Timeout("tracker resume"))??;
        if ResumeAnswer::from_byte(status[0])? == ResumeAnswer::Unknown {
            return Ok(None);
        }
        let mut e_t = [0u8; tracker::EPHEMERAL_LEN];
        timeout(IO_TIMEOUT, stream.read_exact(&mut e_t)).await.map_err(|_| PeerError::Timeout("tracker resume"))??;
        Ok(Some(TrackerSession { chan: handshake.finish(&e_t)?, stream }))
    }

    /// Asks for a ticket for this session: `Ok(None)` when the tracker does not issue them (a tracker before
    /// SPEC revision 8 closes the connection on the unknown request; the caller then reconnects).
    async fn ticket(&mut self) -> Result<Option<(Ticket, Duration)>, PeerError> {
        match self.request(&ToTracker::Resumable).await? {
            FromTracker::Ticket { ticket, lifetime_secs } => {
                let t = Ticket { id: ticket, secret: self.chan.resumption_secret().clone() };
                Ok(Some((t, Duration::from_secs(u64::from(lifetime_secs)))))
            }
            _ => Ok(None),
        }
    }

    /// Sends one request and reads its reply; tracker errors become [`PeerError::Tracker`].
    pub async fn request(&mut self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        let frame = self.chan.seal(msg)?;
        timeout(IO_TIMEOUT, self.stream.write_all(&frame)).await.map_err(|_| PeerError::Timeout("tracker send"))??;
        match self.recv().await? {
            FromTracker::Error(e) if e.code == tracker::ErrorCode::NoPath => Err(PeerError::NoPath(e.message)),
            FromTracker::Error(e) => Err(PeerError::Tracker(format!("{:?}: {}", e.code, e.message))),
            reply => Ok(reply),
        }
    }
}

/// The node's tracker client: one session, opened on first use and kept by later requests (each new session
/// costs the tracker an RSA decryption and a signature check, and the requester two round trips). The session
/// survives its connection: the client asks for a ticket once, keeps a connection only for [`CONN_KEEP`] after a
/// request, and resumes the session on the next connection (one round trip, no RSA). Requests are serialized; a
/// kept connection the tracker has closed is replaced once, transparently. A tracker that issues no tickets gets
/// the connection kept for [`REUSE_IDLE`] instead.
///
/// Reuse links nothing new: every session is authenticated with the peer's identity anyway (SPEC.md §3).
///
/// A replicated tracker has several addresses (`--tracker a,b,c`): the client starts at a random one and stays
/// with it; when a connect or a read fails or times out, or the replica answers `Unavailable`, it moves to the next
/// at once and sends the request there (each address at most once per request).
pub struct TrackerClient {
    net: Net,
    addrs: Vec<SocketAddr>,
    /// Index in `addrs` of the replica in use.
    current: AtomicUsize,
    key: PublicKey,
    me: Arc<Identity>,
    state: Arc<tokio::sync::Mutex<ClientState>>,
    /// Where a version-2 session's probe key goes (the node's listener answers probes with it).
    probe_keys: Option<Arc<crate::probe_keys::ProbeKeys>>,
}

/// The client's session: an open connection (with when it was last used and a use counter for the closer), and
/// the ticket that resumes the session on the next one.
#[derive(Default)]
struct ClientState {
    conn: Option<(TrackerSession, Instant)>,
    /// The ticket, when it was last used, and its lifetime unused.
    ticket: Option<(Ticket, Instant, Duration)>,
    /// When the tracker last closed the connection on `Resumable` (it predates tickets, or the connection failed
    /// just then): keep connections instead, and ask again after [`NO_TICKETS_FOR`].
    no_tickets: Option<Instant>,
    uses: u64,
    /// The channel version each tracker address speaks, from its key fetch (SPEC open issue 27).
    versions: std::collections::HashMap<SocketAddr, u16>,
    /// Addresses whose version-2 handshake failed on its content (a certificate our clock refuses, say): version 1
    /// there until then.
    v1_until: std::collections::HashMap<SocketAddr, Instant>,
}

impl ClientState {
    /// How long a kept connection may have been idle to be reused.
    fn keep(&self) -> Duration {
        if self.ticket.is_some() {
            CONN_KEEP
        } else {
            REUSE_IDLE
        }
    }

    /// A ticket still well within its lifetime.
    fn fresh_ticket(&self) -> Option<Ticket> {
        let (t, used, life) = self.ticket.as_ref()?;
        (used.elapsed() + TICKET_MARGIN < *life).then(|| t.clone())
    }
}

impl TrackerClient {
    /// A client for the tracker at `addr` pinned to `key`; connects on the first request.
    pub fn new(net: Net, addr: SocketAddr, key: PublicKey, me: Arc<Identity>) -> Self {
        Self::with_addrs(net, vec![addr], key, me)
    }

    /// A client for a tracker reachable at any of `addrs` (its replicas, all presenting `key`).
    pub fn with_addrs(net: Net, addrs: Vec<SocketAddr>, key: PublicKey, me: Arc<Identity>) -> Self {
        let start = anomos_net::rt::with_rng(|r| rand::Rng::gen_range(r, 0..addrs.len().max(1)));
        TrackerClient { net, addrs, current: AtomicUsize::new(start), key, me, state: Arc::default(), probe_keys: None }
    }

    /// Installs each new version-2 session's probe key into `keys`.
    pub fn with_probe_keys(mut self, keys: Arc<crate::probe_keys::ProbeKeys>) -> Self {
        self.probe_keys = Some(keys);
        self
    }

    /// The address in use.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addrs.get(self.current.load(Ordering::Relaxed) % self.addrs.len().max(1)).copied()
    }

    /// Whether `e` moves the client to the next replica (only when it has several).
    fn fails_over(&self, e: &PeerError) -> bool {
        self.addrs.len() > 1
            && match e {
                PeerError::Io(_) | PeerError::Timeout(_) => true,
                PeerError::Tracker(m) => m.starts_with(UNAVAILABLE),
                _ => false,
            }
    }

    /// Moves to the next replica (the session, its connection and ticket, belonged to the one left).
    fn next(&self, st: &mut ClientState, why: &PeerError) {
        *st = ClientState { uses: st.uses, ..ClientState::default() };
        let from = self.addr();
        self.current.fetch_add(1, Ordering::Relaxed);
        tracing::info!("tracker {from:?} failed ({why}); using {:?}", self.addr());
    }

    /// Sends one request and reads its reply, over the kept connection if there is a fresh one, else over a
    /// resumed session, else over a new one; all of it within [`REQUEST_DEADLINE`].
    pub async fn request(&self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        timeout(REQUEST_DEADLINE, self.request_unbounded(msg))
            .await
            .map_err(|_| PeerError::Timeout("tracker request (the whole exchange)"))?
    }

    async fn request_unbounded(&self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        let mut st = self.state.lock().await;
        if let Some((mut s, used)) = st.conn.take() {
            if used.elapsed() < st.keep() {
                match s.request(msg).await {
                    // Only a closed connection is retried: the tracker never saw the request. A timeout or a
                    // tracker error is the answer (with replicas, the next replica is asked instead).
                    Err(PeerError::Io(e)) => tracing::debug!("kept tracker connection closed ({e}); reconnecting"),
                    Err(e) if self.fails_over(&e) => self.next(&mut st, &e),
                    r => {
                        self.keep(&mut st, s, &r);
                        return r;
                    }
                }
            }
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let last = tries >= self.addrs.len();
            let addr = self.addr().ok_or_else(|| PeerError::Config("no tracker address".into()))?;
            let wait = if last { IO_TIMEOUT } else { FAILOVER_CONNECT };
            let r = match self.session_at(&mut st, addr, wait).await {
                Ok(mut s) => {
                    let r = s.request(msg).await;
                    if !r.as_ref().is_err_and(|e| self.fails_over(e)) {
                        self.keep(&mut st, s, &r);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            match r {
                Err(e) if !last && self.fails_over(&e) => self.next(&mut st, &e),
                r => return r,
            }
        }
    }

    /// A session at `addr` (connect within `wait`): resumed with the ticket if it has a fresh one, else new.
    async fn session_at(
        &self,
        st: &mut ClientState,
        addr: SocketAddr,
        wait: Duration,
    ) -> Result<TrackerSession, PeerError> {
        if let Some(t) = st.fresh_ticket() {
            if let Some(s) = TrackerSession::resume(&*self.net, addr, &self.key.fingerprint(), &t, wait).await? {
                return Ok(s);
            }
            tracing::debug!("the tracker no longer holds our session ticket; new session");
            st.ticket = None;
        }
        self.open(st, addr, wait).await
    }

    /// Records the channel version the tracker at `addr` offered in a key fetch made before this client existed
    /// (at start-up), so its first session does not ask again.
    pub async fn offered(&self, addr: SocketAddr, version: u16) {
        self.state.lock().await.versions.insert(addr, version);
    }

    /// A new session (full handshake), with a ticket for the next connections if the tracker issues them.
    async fn open(&self, st: &mut ClientState, addr: SocketAddr, wait: Duration) -> Result<TrackerSession, PeerError> {
        let offered = match st.versions.get(&addr) {
            Some(v) => *v,
            None => {
                let (_, v) = tracker_key_version_via(&*self.net, addr, &self.key.fingerprint(), wait).await?;
                st.versions.insert(addr, v);
                v
            }
        };
        let v1_only = st.v1_until.get(&addr).is_some_and(|t| Instant::now() < *t);
        let version = if v1_only { tracker::TRACKER_VERSION } else { offered };
        let mut s = match TrackerSession::connect_version(&*self.net, addr, &self.key, &self.me, wait, version).await {
            Ok(s) => s,
            Err(e @ PeerError::Proto(_)) if version >= tracker::TRACKER_VERSION_2 => {
                // Refused on its content (a certificate our clock does not accept, say): version 1 at this address
                // for a while, then its offer is asked again.
                tracing::info!("tracker {addr}: channel version 2 failed ({e}); version 1 there for {V1_FALLBACK:?}");
                st.v1_until.insert(addr, Instant::now() + V1_FALLBACK);
                st.versions.remove(&addr);
                return Err(e);
            }
            Err(e @ PeerError::Io(_)) => {
                // Closed: perhaps busy, perhaps replaced by a tracker of another version; its offer is asked again.
                st.versions.remove(&addr);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.install_probe_key(&s, version)?;
        if st.no_tickets.is_some_and(|t| t.elapsed() < NO_TICKETS_FOR) {
            return Ok(s);
        }
        match s.ticket().await {
            Ok(Some((t, life))) => st.ticket = Some((t, Instant::now(), life)),
            Ok(None) | Err(PeerError::Tracker(_)) => st.no_tickets = Some(Instant::now()),
            Err(PeerError::Io(e)) => {
                tracing::info!(
                    "the tracker closed the session on a ticket request ({e}): it issues none; keeping sessions open"
                );
                st.no_tickets = Some(Instant::now());
                let s = TrackerSession::connect_version(&*self.net, addr, &self.key, &self.me, wait, version).await?;
                self.install_probe_key(&s, version)?;
                return Ok(s);
            }
            Err(e) => return Err(e),
        }
        Ok(s)
    }

    /// A new version-2 session's probe key goes to the listener: the tracker probes an address announced over
    /// this session with it (SPEC open issue 27).
    fn install_probe_key(&self, s: &TrackerSession, version: u16) -> Result<(), PeerError> {
        if let (true, Some(keys)) = (version >= tracker::TRACKER_VERSION_2, &self.probe_keys) {
            keys.install(ProbeAuth::derive(s.chan.resumption_secret(), &self.me.fingerprint())?);
        }
        Ok(())
    }

    /// Keeps the connection after a request that ended with `r` if it is still usable, marks the ticket used,
    /// and closes the connection once it has been idle for [`CONN_KEEP`] (when the session can resume).
    fn keep(&self, st: &mut ClientState, s: TrackerSession, r: &Result<FromTracker, PeerError>) {
        if !keeps_session(r) {
            return;
        }
        let now = Instant::now();
        st.conn = Some((s, now));
        st.uses = st.uses.wrapping_add(1);
        let Some((_, used, _)) = st.ticket.as_mut() else { return };
        *used = now;
        let (state, use_no) = (Arc::clone(&self.state), st.uses);
        tokio::spawn(async move {
            tokio::time::sleep(CONN_KEEP).await;
            let mut st = state.lock().await;
            if st.uses == use_no {
                st.conn = None; // idle since: close it (the session resumes on the next request)
            }
        });
    }
}

/// How [`TrackerSession::request`] words an `Unavailable` error reply.
const UNAVAILABLE: &str = "Unavailable:";

/// Whether a session is still usable after a request ended with `r`: it is after a reply, including a tracker
/// error reply; after a timeout or an I/O or decoding error its framing state is unknown.
fn keeps_session(r: &Result<FromTracker, PeerError>) -> bool {
    matches!(r, Ok(_) | Err(PeerError::Tracker(_) | PeerError::NoPath(_)))
}

/// Fetches the tracker's public key (over TCP) and checks it against the pinned fingerprint.
pub async fn fetch_tracker_key(
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
) -> Result<PublicKey, PeerError> {
    fetch_tracker_key_via(&anomos_net::Tcp, addr, pinned).await
}

/// [`fetch_tracker_key`], with the highest channel version the tracker offers (for [`TrackerClient::offered`]) when
/// it comes within [`TRAILER_WAIT`] of the key and reads well: only the key decides whether the fetch succeeded
/// (the trailer is not authenticated, SPEC §3.1; without it the client asks again at its first session).
pub async fn fetch_tracker_key_version(
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
) -> Result<(PublicKey, Option<u16>), PeerError> {
    let (key, mut s) = key_fetch(&anomos_net::Tcp, addr, pinned, IO_TIMEOUT).await?;
    Ok((key, version_trailer(&mut s, TRAILER_WAIT).await.ok()))
}

/// How long a start-up key fetch waits for the channel version after the key (the tracker writes both at once).
const TRAILER_WAIT: Duration = Duration::from_secs(1);

/// [`fetch_tracker_key`] over the transport `net`.
pub async fn fetch_tracker_key_via(
    net: &dyn Transport,
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
) -> Result<PublicKey, PeerError> {
    Ok(key_fetch(net, addr, pinned, IO_TIMEOUT).await?.0)
}

/// The tracker's key, as [`fetch_tracker_key_via`], and the highest channel version it speaks: what follows the
/// key until the tracker closes (nothing from a tracker before version 2, SPEC open issue 27).
pub async fn tracker_key_version_via(
    net: &dyn Transport,
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
    connect_timeout: Duration,
) -> Result<(PublicKey, u16), PeerError> {
    let (key, mut s) = key_fetch(net, addr, pinned, connect_timeout).await?;
    Ok((key, version_trailer(&mut s, IO_TIMEOUT).await?))
}

/// The channel version that follows the key of a key fetch, read until the tracker closes within `wait`: at most 3
/// bytes (2 expected; a later tracker may send more, ignored), none from a tracker before version 2.
async fn version_trailer(s: &mut Box<dyn Stream>, wait: Duration) -> Result<u16, PeerError> {
    let mut trailer = Vec::with_capacity(3);
    let mut limited = s.take(3);
    timeout(wait, limited.read_to_end(&mut trailer)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    Ok(tracker::key_answer_version(&trailer)?)
}

/// A key fetch (`ANOMOSK1`): the tracker's key, checked against the pin, and the connection (positioned after it).
async fn key_fetch(
    net: &dyn Transport,
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
    connect_timeout: Duration,
) -> Result<(PublicKey, Box<dyn Stream>), PeerError> {
    let mut s =
        timeout(connect_timeout, net.connect(addr)).await.map_err(|_| PeerError::Timeout("tracker connect"))??.stream;
    s.write_all(&tracker::KEY_FETCH_MAGIC).await?;
    let mut prefix = [0u8; 2];
    timeout(IO_TIMEOUT, s.read_exact(&mut prefix)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    let mut der = vec![0u8; tracker::key_answer_len(prefix)?];
    timeout(IO_TIMEOUT, s.read_exact(&mut der)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    Ok((tracker::check_fetched_key(&der, pinned)?, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anomos_proto::ids::ChainId;
    use anomos_proto::tracker::CircuitRequest;
    use rand::SeedableRng;

    /// A tracker in this process with `key`, stopped when `stop` is dropped or sent.
    async fn tracker(
        key: &Identity,
        dir: &std::path::Path,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        anomos_proto::identity::save_identity(&dir.join("tracker.key"), key).unwrap();
        let args = anomos_tracker::TrackerArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            allow_same_ip: true,
            max_peers: 16,
            ..Default::default()
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = anomos_tracker::run_until(args, Some(ready_tx), async {
                let _ = stop_rx.await;
            })
            .await;
        });
        (ready_rx.await.unwrap().listen, stop_tx, task)
    }

    fn circuits() -> ToTracker {
        ToTracker::RequestCircuits(CircuitRequest { chain: ChainId::new("regtest").unwrap(), count: 1, relays: 1 })
    }

    /// The tracker answers a peer that never announced with `UnknownPeer`: proof that a session got through.
    fn answered(r: &Result<FromTracker, PeerError>) -> bool {
        matches!(r, Err(PeerError::Tracker(m)) if m.starts_with("UnknownPeer"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_with_several_addresses_fails_over_within_two_seconds() {
        let mut rng = seeded();
        let tracker_key = Identity::generate(&mut rng, 2048).unwrap();
        let me = Arc::new(Identity::generate(&mut rng, 2048).unwrap());
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, stop_a, task_a) = tracker(&tracker_key, da.path()).await;
        let (b, _stop_b, _task_b) = tracker(&tracker_key, db.path()).await;
        // A port nobody listens on: its connect is refused.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();

        let client =
            TrackerClient::with_addrs(anomos_net::tcp(), vec![dead, a, b], tracker_key.public().clone(), me.clone());
        client.current.store(0, Ordering::Relaxed);
        let t = Instant::now();
        assert!(answered(&client.request(&circuits()).await));
        assert_eq!(client.addr(), Some(a), "a refused address is skipped");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        // The replica in use stops (its kept session closes): the next request is answered by the next one.
        let _ = stop_a.send(());
        task_a.await.unwrap();
        let t = Instant::now();
        assert!(answered(&client.request(&circuits()).await));
        assert!(t.elapsed() < Duration::from_secs(2), "failover took {:?}", t.elapsed());
        assert_eq!(client.addr(), Some(b));
        // And it stays there.
        assert!(answered(&client.request(&circuits()).await));
        assert_eq!(client.addr(), Some(b));

        // One address: the error is the answer, nothing else is tried.
        let single = TrackerClient::new(anomos_net::tcp(), dead, tracker_key.public().clone(), me);
        assert!(matches!(single.request(&circuits()).await, Err(PeerError::Io(_))));
    }

    /// Three "replicas" that accept and never answer: without the overall deadline the request took one connect
    /// and a 15 s read per address; now the whole exchange ends within `REQUEST_DEADLINE`, and a second request
    /// queued behind the first on the client's lock also gets its answer (a timeout) within the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_request_ends_within_its_deadline_however_the_tracker_stalls() {
        let mut rng = seeded();
        let tracker_key = Identity::generate(&mut rng, 2048).unwrap();
        let me = Arc::new(Identity::generate(&mut rng, 2048).unwrap());
        let mut addrs = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
            held.push(tokio::spawn(async move {
                let mut conns = Vec::new();
                while let Ok((c, _)) = l.accept().await {
                    conns.push(c);
                }
            }));
        }
        let client = Arc::new(TrackerClient::with_addrs(anomos_net::tcp(), addrs, tracker_key.public().clone(), me));
        let t = Instant::now();
        let other = {
            let c = client.clone();
            tokio::spawn(async move { c.request(&circuits()).await })
        };
        let r = client.request(&circuits()).await;
        assert!(matches!(r, Err(PeerError::Timeout(_))), "{r:?}");
        let r2 = other.await.unwrap();
        assert!(matches!(r2, Err(PeerError::Timeout(_))), "{r2:?}");
        assert!(t.elapsed() <= REQUEST_DEADLINE + Duration::from_secs(1), "{:?}", t.elapsed());
        for h in held {
            h.abort();
        }
    }

    /// A tracker of this revision says it speaks channel version 2 in its key fetch; a client then opens version-2
    /// sessions (no RSA at the tracker), and version 1 still works. A version-2 handshake pinned to another key
    /// fails on the certificate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_use_channel_version_2_when_the_tracker_speaks_it_and_version_1_still_works() {
        let mut rng = seeded();
        let tracker_key = Identity::generate(&mut rng, 2048).unwrap();
        let me = Identity::generate(&mut rng, 2048).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (a, _stop, _task) = tracker(&tracker_key, dir.path()).await;
        let tcp = anomos_net::tcp();
        let (key, version) = tracker_key_version_via(&*tcp, a, &tracker_key.fingerprint(), IO_TIMEOUT).await.unwrap();
        assert_eq!((key.fingerprint(), version), (tracker_key.fingerprint(), tracker::TRACKER_VERSION_2));
        for v in [tracker::TRACKER_VERSION_2, tracker::TRACKER_VERSION] {
            let mut s =
                TrackerSession::connect_version(&*tcp, a, tracker_key.public(), &me, IO_TIMEOUT, v).await.unwrap();
            assert!(answered(&s.request(&circuits()).await), "version {v}");
        }
        let other = Identity::generate(&mut rng, 2048).unwrap();
        let wrong = TrackerSession::connect_version(&*tcp, a, other.public(), &me, IO_TIMEOUT, 2).await;
        assert!(wrong.is_err());
        let client = TrackerClient::new(tcp, a, tracker_key.public().clone(), Arc::new(me));
        assert!(answered(&client.request(&circuits()).await));
        assert_eq!(client.state.lock().await.versions.get(&a), Some(&tracker::TRACKER_VERSION_2));
    }

    fn seeded() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }
}
