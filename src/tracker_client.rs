//! Talking to the tracker: an encrypted, authenticated session (SPEC.md §3) that outlives its connection: after
//! the full handshake the client asks for a session ticket, closes the connection once it has been idle for
//! [`CONN_KEEP`], and resumes the session on a new connection with the ticket (no RSA on either side, §3.4).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::tracker::{self, FromTracker, ResumeAnswer, Ticket, ToTracker, TrackerChannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::error::PeerError;

const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// A kept session older than this (since its last request) is replaced instead of reused: the tracker closes
/// sessions idle for its `--idle-timeout` (by default 2 × its announce interval + 30 s, 90 s at the default 30 s
/// interval, SPEC §3.4), and writing into one it already closed costs a round trip to find out. 75 s covers the
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

/// An open session with the tracker, after Hello/Welcome.
pub struct TrackerSession {
    stream: TcpStream,
    chan: TrackerChannel,
}

async fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, PeerError> {
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
        let mut stream = timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::Timeout("tracker connect"))??;
        stream.set_nodelay(true)?;
        let (hello, handshake) = TrackerChannel::connect(&mut rand::rngs::OsRng, tracker_key)?;
        stream.write_all(&hello).await?;
        let mut reply = [0u8; tracker::EPHEMERAL_LEN];
        timeout(IO_TIMEOUT, stream.read_exact(&mut reply)).await.map_err(|_| PeerError::Timeout("tracker hello"))??;
        let chan = handshake.finish(&reply)?;
        let mut s = TrackerSession { stream, chan };
        let nonce = match s.recv().await? {
            FromTracker::Challenge { nonce } => nonce,
            other => return Err(PeerError::Tracker(format!("expected challenge, got {other:?}"))),
        };
        let hello = tracker::make_hello(me, &tracker_key.fingerprint(), &nonce, &mut rand::rngs::OsRng);
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
        addr: SocketAddr,
        tracker_fp: &Fingerprint,
        ticket: &Ticket,
    ) -> Result<Option<Self>, PeerError> {
        let mut stream = timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::Timeout("tracker connect"))??;
        stream.set_nodelay(true)?;
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
pub struct TrackerClient {
    addr: SocketAddr,
    key: PublicKey,
    me: Arc<Identity>,
    state: Arc<tokio::sync::Mutex<ClientState>>,
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
    pub fn new(addr: SocketAddr, key: PublicKey, me: Arc<Identity>) -> Self {
        TrackerClient { addr, key, me, state: Arc::default() }
    }

    /// Sends one request and reads its reply, over the kept connection if there is a fresh one, else over a
    /// resumed session, else over a new one.
    pub async fn request(&self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        let mut st = self.state.lock().await;
        if let Some((mut s, used)) = st.conn.take() {
            if used.elapsed() < st.keep() {
                match s.request(msg).await {
                    // Only a closed connection is retried: the tracker never saw the request. A timeout or a
                    // tracker error is the answer.
                    Err(PeerError::Io(e)) => tracing::debug!("kept tracker connection closed ({e}); reconnecting"),
                    r => {
                        self.keep(&mut st, s, &r);
                        return r;
                    }
                }
            }
        }
        let mut s = match st.fresh_ticket() {
            Some(t) => match TrackerSession::resume(self.addr, &self.key.fingerprint(), &t).await? {
                Some(s) => s,
                None => {
                    tracing::debug!("the tracker no longer holds our session ticket; new session");
                    st.ticket = None;
                    self.open(&mut st).await?
                }
            },
            None => self.open(&mut st).await?,
        };
        let r = s.request(msg).await;
        self.keep(&mut st, s, &r);
        r
    }

    /// A new session (full handshake), with a ticket for the next connections if the tracker issues them.
    async fn open(&self, st: &mut ClientState) -> Result<TrackerSession, PeerError> {
        let mut s = TrackerSession::connect(self.addr, &self.key, &self.me).await?;
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
                return TrackerSession::connect(self.addr, &self.key, &self.me).await;
            }
            Err(e) => return Err(e),
        }
        Ok(s)
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

/// Whether a session is still usable after a request ended with `r`: it is after a reply, including a tracker
/// error reply; after a timeout or an I/O or decoding error its framing state is unknown.
fn keeps_session(r: &Result<FromTracker, PeerError>) -> bool {
    matches!(r, Ok(_) | Err(PeerError::Tracker(_) | PeerError::NoPath(_)))
}

/// Fetches the tracker's public key and checks it against the pinned fingerprint.
pub async fn fetch_tracker_key(
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
) -> Result<PublicKey, PeerError> {
    let mut s =
        timeout(IO_TIMEOUT, TcpStream::connect(addr)).await.map_err(|_| PeerError::Timeout("tracker connect"))??;
    s.write_all(&tracker::KEY_FETCH_MAGIC).await?;
    let mut prefix = [0u8; 2];
    timeout(IO_TIMEOUT, s.read_exact(&mut prefix)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    let mut der = vec![0u8; tracker::key_answer_len(prefix)?];
    timeout(IO_TIMEOUT, s.read_exact(&mut der)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    Ok(tracker::check_fetched_key(&der, pinned)?)
}
