//! One session with the tracker (SPEC.md §3): the channel and the peer's authentication on a new connection, or the
//! resumption of a session with its ticket; then requests and their replies, in order.

use super::*;

/// An open session with the tracker, after Hello/Welcome.
pub struct TrackerSession {
    stream: Box<dyn Stream>,
    pub(super) chan: TrackerChannel,
}

pub(super) async fn read_frame(stream: &mut (impl AsyncRead + Unpin + ?Sized)) -> Result<Vec<u8>, PeerError> {
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
        let (mut s, hello) = Self::start(net, addr, tracker_key, me, connect_timeout, version).await?;
        s.send_all(&[&hello]).await?;
        s.welcome().await?;
        Ok(s)
    }

    /// A new channel of `version`, up to the tracker's `Challenge`, and the `Hello` that answers it, not yet sent:
    /// the caller sends it with its first requests right behind it, in one flight ([`send_all`](Self::send_all)),
    /// and reads `Welcome` ([`welcome`](Self::welcome)) before their replies. The tracker reads nothing after a
    /// `Hello` it refuses (SPEC §3.4 "Pipelining"), so nothing rides on the pipelining but a round trip saved.
    pub(super) async fn start(
        net: &dyn Transport,
        addr: SocketAddr,
        tracker_key: &PublicKey,
        me: &Identity,
        connect_timeout: Duration,
        version: u16,
    ) -> Result<(Self, ToTracker), PeerError> {
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
        Ok((s, hello))
    }

    /// Reads the tracker's answer to our `Hello`: `Welcome`, or the session is refused.
    pub(super) async fn welcome(&mut self) -> Result<(), PeerError> {
        match self.reply().await? {
            FromTracker::Welcome { .. } => Ok(()),
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

    /// This session's ticket from the tracker's answer to `Resumable`: `None` when the tracker does not issue them
    /// (a tracker before SPEC revision 8 closes the connection on the unknown request instead; the caller then
    /// reconnects).
    pub(super) fn ticket_of(&self, reply: &FromTracker) -> Option<(Ticket, Duration)> {
        match reply {
            FromTracker::Ticket { ticket, lifetime_secs } => {
                let t = Ticket { id: *ticket, secret: self.chan.resumption_secret().clone() };
                Some((t, Duration::from_secs(u64::from(*lifetime_secs))))
            }
            _ => None,
        }
    }

    /// Sends one request and reads its reply; tracker errors become [`PeerError::Tracker`].
    pub async fn request(&mut self, msg: &ToTracker) -> Result<FromTracker, PeerError> {
        self.send_all(&[msg]).await?;
        self.reply().await
    }

    /// Sends `msgs` back to back, in one write: the tracker answers them in order.
    pub(super) async fn send_all(&mut self, msgs: &[&ToTracker]) -> Result<(), PeerError> {
        let mut frames = Vec::new();
        for msg in msgs {
            frames.extend_from_slice(&self.chan.seal(msg)?);
        }
        timeout(IO_TIMEOUT, self.stream.write_all(&frames)).await.map_err(|_| PeerError::Timeout("tracker send"))??;
        Ok(())
    }

    /// Reads the reply to the oldest request not yet answered; tracker errors become [`PeerError::Tracker`].
    pub(super) async fn reply(&mut self) -> Result<FromTracker, PeerError> {
        match self.recv().await? {
            FromTracker::Error(e) if e.code == tracker::ErrorCode::NoPath => Err(PeerError::NoPath(e.message)),
            FromTracker::Error(e) => Err(PeerError::Tracker(format!("{:?}: {}", e.code, e.message))),
            reply => Ok(reply),
        }
    }
}
