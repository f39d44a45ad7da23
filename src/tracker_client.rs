//! Talking to the tracker: one encrypted, authenticated session per exchange (SPEC.md §3).

use std::net::SocketAddr;
use std::time::Duration;

use anomos_proto::identity::{Identity, PublicKey};
use anomos_proto::tracker::{self, FromTracker, ToTracker, TrackerChannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::error::PeerError;

const IO_TIMEOUT: Duration = Duration::from_secs(15);

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

    /// Sends one request and reads its reply; tracker errors become [`PeerError::Tracker`].
    pub async fn request(&mut self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        let frame = self.chan.seal(msg)?;
        timeout(IO_TIMEOUT, self.stream.write_all(&frame)).await.map_err(|_| PeerError::Timeout("tracker send"))??;
        match self.recv().await? {
            FromTracker::Error(e) => Err(PeerError::Tracker(format!("{:?}: {}", e.code, e.message))),
            reply => Ok(reply),
        }
    }
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
