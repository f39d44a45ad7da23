//! Talking to the tracker: an encrypted, authenticated session (SPEC.md §3), kept open between requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anomos_net::{Net, Stream};
use anomos_proto::identity::{Identity, PublicKey};
use anomos_proto::tracker::{self, FromTracker, ToTracker, TrackerChannel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

use crate::error::PeerError;

const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// A kept session older than this (since its last request) is replaced instead of reused: the tracker closes
/// sessions idle for its `--idle-timeout` (by default 2 × its announce interval + 30 s, 90 s at the default 30 s
/// interval, SPEC §3.4), and writing into one it already closed costs a round trip to find out. 75 s covers the
/// default interval with room for a late announce, so one session carries all of a peer's announces.
const REUSE_IDLE: Duration = Duration::from_secs(75);

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
    /// Connects (TCP), proves the channel to the pinned key, and authenticates with our identity.
    pub async fn connect(addr: SocketAddr, tracker_key: &PublicKey, me: &Identity) -> Result<Self, PeerError> {
        Self::connect_via(&anomos_net::Tcp, addr, tracker_key, me).await
    }

    /// [`TrackerSession::connect`] over the transport `net`.
    pub async fn connect_via(
        net: &dyn anomos_net::Transport,
        addr: SocketAddr,
        tracker_key: &PublicKey,
        me: &Identity,
    ) -> Result<Self, PeerError> {
        let mut stream =
            timeout(IO_TIMEOUT, net.connect(addr)).await.map_err(|_| PeerError::Timeout("tracker connect"))??.stream;
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

/// The node's tracker client: one session, opened on first use and reused by later requests (each new session
/// costs the tracker an RSA decryption and a signature check, and the requester two round trips). Requests
/// are serialized over it; a session the tracker has closed is replaced once, transparently.
///
/// Reuse links nothing new: every session is authenticated with the peer's identity anyway (SPEC.md §3).
pub struct TrackerClient {
    net: Net,
    addr: SocketAddr,
    key: PublicKey,
    me: Arc<Identity>,
    session: tokio::sync::Mutex<Option<(TrackerSession, Instant)>>,
}

impl TrackerClient {
    /// A client for the tracker at `addr` pinned to `key`, reached over `net`; connects on the first request.
    pub fn new(net: Net, addr: SocketAddr, key: PublicKey, me: Arc<Identity>) -> Self {
        TrackerClient { net, addr, key, me, session: tokio::sync::Mutex::new(None) }
    }

    /// Sends one request and reads its reply, over the kept session if there is a fresh one.
    pub async fn request(&self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        let mut slot = self.session.lock().await;
        if let Some((mut s, used)) = slot.take() {
            if used.elapsed() < REUSE_IDLE {
                match s.request(msg).await {
                    // Only a closed connection is retried: the tracker never saw the request. A timeout or a
                    // tracker error is the answer.
                    Err(PeerError::Io(e)) => tracing::debug!("kept tracker session closed ({e}); reconnecting"),
                    r => {
                        if keeps_session(&r) {
                            *slot = Some((s, Instant::now()));
                        }
                        return r;
                    }
                }
            }
        }
        let mut s = TrackerSession::connect_via(&*self.net, self.addr, &self.key, &self.me).await?;
        let r = s.request(msg).await;
        if keeps_session(&r) {
            *slot = Some((s, Instant::now()));
        }
        r
    }
}

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

/// [`fetch_tracker_key`] over the transport `net`.
pub async fn fetch_tracker_key_via(
    net: &dyn anomos_net::Transport,
    addr: SocketAddr,
    pinned: &anomos_proto::identity::Fingerprint,
) -> Result<PublicKey, PeerError> {
    let mut s =
        timeout(IO_TIMEOUT, net.connect(addr)).await.map_err(|_| PeerError::Timeout("tracker connect"))??.stream;
    s.write_all(&tracker::KEY_FETCH_MAGIC).await?;
    let mut prefix = [0u8; 2];
    timeout(IO_TIMEOUT, s.read_exact(&mut prefix)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    let mut der = vec![0u8; tracker::key_answer_len(prefix)?];
    timeout(IO_TIMEOUT, s.read_exact(&mut der)).await.map_err(|_| PeerError::Timeout("tracker key"))??;
    Ok(tracker::check_fetched_key(&der, pinned)?)
}
