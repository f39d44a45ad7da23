//! Talking to the tracker: an encrypted, authenticated session (SPEC.md §3) that outlives its connection: with
//! the full handshake's `Hello` the client asks for a session ticket (and sends its request, in one flight), closes the connection once it has been idle for
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

mod key_fetch;
mod session;

pub use key_fetch::{fetch_tracker_key, fetch_tracker_key_version, fetch_tracker_key_via, tracker_key_version_via};
pub use session::TrackerSession;

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
            let r = match self.exchange_at(&mut st, addr, wait, msg).await {
                Ok((s, r)) => {
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

    /// `msg` over a session at `addr` (connect within `wait`): resumed with the ticket if it has a fresh one, else
    /// a new one with `msg` sent right behind its `Hello`. The session, and the reply or why there is none.
    async fn exchange_at(
        &self,
        st: &mut ClientState,
        addr: SocketAddr,
        wait: Duration,
        msg: &ToTracker,
    ) -> Result<(TrackerSession, Result<FromTracker, PeerError>), PeerError> {
        if let Some(t) = st.fresh_ticket() {
            if let Some(mut s) = TrackerSession::resume(&*self.net, addr, &self.key.fingerprint(), &t, wait).await? {
                let r = s.request(msg).await;
                return Ok((s, r));
            }
            tracing::debug!("the tracker no longer holds our session ticket; new session");
            st.ticket = None;
        }
        self.open(st, addr, wait, msg).await
    }

    /// Records the channel version the tracker at `addr` offered in a key fetch made before this client existed
    /// (at start-up), so its first session does not ask again.
    pub async fn offered(&self, addr: SocketAddr, version: u16) {
        self.state.lock().await.versions.insert(addr, version);
    }

    /// A new session (full handshake) carrying `msg`, with a ticket for the next connections if the tracker issues
    /// them. `Hello`, `Resumable` and `msg` go in one flight, and their answers come back in order: a new session
    /// costs the connect, the channel's hello and one round trip, not three (SPEC §3.4 "Pipelining").
    async fn open(
        &self,
        st: &mut ClientState,
        addr: SocketAddr,
        wait: Duration,
        msg: &ToTracker,
    ) -> Result<(TrackerSession, Result<FromTracker, PeerError>), PeerError> {
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
        let ask_ticket = st.no_tickets.is_none_or(|t| t.elapsed() >= NO_TICKETS_FOR);
        let resumable = ToTracker::Resumable;
        let mut flight = vec![msg];
        if ask_ticket {
            flight.insert(0, &resumable);
        }
        let mut s = match self.authenticated(addr, wait, version, &flight).await {
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
        if ask_ticket {
            match s.reply().await {
                Ok(reply) => match s.ticket_of(&reply) {
                    Some((t, life)) => st.ticket = Some((t, Instant::now(), life)),
                    None => st.no_tickets = Some(Instant::now()),
                },
                Err(PeerError::Tracker(_)) => st.no_tickets = Some(Instant::now()),
                Err(PeerError::Io(e)) if version < tracker::TRACKER_VERSION_2 => {
                    // A tracker before revision 8 (it speaks version 1 only) closes on `Resumable`, so it read no
                    // further and `msg` was not seen: again without the ticket. A version-2 tracker issues tickets,
                    // so there the failure is the connection's, `msg` may have been handled, and it is the answer.
                    tracing::info!(
                        "the tracker closed the session on a ticket request ({e}): it issues none; keeping sessions open"
                    );
                    st.no_tickets = Some(Instant::now());
                    let mut s = self.authenticated(addr, wait, version, &[msg]).await?;
                    let r = s.reply().await;
                    return Ok((s, r));
                }
                Err(e) => return Err(e),
            }
        }
        let r = s.reply().await;
        Ok((s, r))
    }

    /// A new session of `version` at `addr` with `flight` sent right behind its `Hello`, once `Welcome` is read
    /// (their replies are next on the session).
    async fn authenticated(
        &self,
        addr: SocketAddr,
        wait: Duration,
        version: u16,
        flight: &[&ToTracker],
    ) -> Result<TrackerSession, PeerError> {
        let (mut s, hello) = TrackerSession::start(&*self.net, addr, &self.key, &self.me, wait, version).await?;
        // Before the announce behind the Hello can make the tracker probe us with this session's key. A session
        // that then fails leaves its key current and the one before it answering for `KEEP_PREVIOUS`; the next
        // session installs its own.
        self.install_probe_key(&s, version)?;
        let mut all = vec![&hello];
        all.extend_from_slice(flight);
        s.send_all(&all).await?;
        s.welcome().await?;
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

    /// A new session sends `Hello`, `Resumable` and the request in one flight (SPEC §3.4 "Pipelining"): a tracker
    /// that writes nothing after its `Challenge` until it holds all three still gets the request through, and they
    /// come in that order. A client that waited for `Welcome` (before revision 20) stalls here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_session_sends_hello_ticket_request_and_the_request_in_one_flight() {
        let mut rng = seeded();
        let tracker_key = Arc::new(Identity::generate(&mut rng, 2048).unwrap());
        let me = Arc::new(Identity::generate(&mut rng, 2048).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tk, me_fp) = (Arc::clone(&tracker_key), me.fingerprint());
        let tracker = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut header = [0u8; tracker::CLIENT_HELLO_HEADER];
            s.read_exact(&mut header).await.unwrap();
            let tracker::HelloHeader::V1 { ct_len } = tracker::parse_hello_header(&header).unwrap() else {
                panic!("a version-1 ClientHello was expected");
            };
            let mut rest = vec![0u8; ct_len + tracker::EPHEMERAL_LEN];
            s.read_exact(&mut rest).await.unwrap();
            let (reply, mut chan) = TrackerChannel::accept(&mut rand::rngs::OsRng, &tk, &rest).unwrap();
            s.write_all(&reply).await.unwrap();
            s.write_all(&chan.seal(&FromTracker::Challenge { nonce: [9; 32] }).unwrap()).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..3 {
                let body = session::read_frame(&mut s).await.unwrap();
                got.push(chan.open::<ToTracker>(&body).unwrap());
            }
            let unknown =
                tracker::TrackerError { code: tracker::ErrorCode::UnknownPeer, message: "never announced".into() };
            for m in [
                FromTracker::Welcome { peer_id: me_fp },
                FromTracker::Ticket { ticket: [5; tracker::TICKET_LEN], lifetime_secs: 90 },
                FromTracker::Error(unknown),
            ] {
                s.write_all(&chan.seal(&m).unwrap()).await.unwrap();
            }
            (got, s)
        });
        let client = TrackerClient::new(anomos_net::tcp(), addr, tracker_key.public().clone(), me);
        client.offered(addr, tracker::TRACKER_VERSION).await;
        let r = timeout(Duration::from_secs(10), client.request(&circuits())).await;
        let r = r.expect("the client stalled: it waited for Welcome before sending its request");
        assert!(answered(&r), "{r:?}");
        let (got, _conn) = tracker.await.unwrap();
        assert!(matches!(got[0], ToTracker::Hello { .. }), "{:?}", got[0]);
        assert_eq!(got[1], ToTracker::Resumable);
        assert_eq!(got[2], circuits());
        let st = client.state.lock().await;
        assert_eq!(st.ticket.as_ref().map(|(t, _, _)| t.id), Some([5; tracker::TICKET_LEN]), "the ticket was kept");
    }
}
