//! The link handshake over a transport connection (SPEC §5.3), as dialer and as acceptor; an authenticated link then runs in
//! [`super::run`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anomos_net::Stream;
use anomos_proto::identity::{Identity, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{self as plink, Acceptor, AuthStatus, Dialer, LinkCipher, HELLO_LEN};
use anomos_proto::ProtoError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tracing::{debug, info};

use super::{LinkHost, LinkSettings};
use crate::error::PeerError;

/// How long each step of a handshake we dial may take (incoming handshakes have the node's
/// `handshake_timeout` for all their steps together).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an acceptor that refused an AUTH waits for a fresh neighbor table before checking it once more
/// (SPEC §5.3): a dialer that learned of our edge before we did gets its link instead of a refusal.
pub const REFUSAL_RECHECK: Duration = Duration::from_secs(2);

async fn read_exact_timeout(
    s: &mut (impl AsyncRead + Unpin + ?Sized),
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), PeerError> {
    timeout(HANDSHAKE_TIMEOUT, s.read_exact(buf)).await.map_err(|_| PeerError::Timeout(what))??;
    Ok(())
}

async fn read_auth(s: &mut (impl AsyncRead + Unpin + ?Sized), what: &'static str) -> Result<Vec<u8>, PeerError> {
    let mut prefix = [0u8; 2];
    read_exact_timeout(s, &mut prefix, what).await?;
    let len = plink::auth_frame_len(prefix)?;
    let mut msg = vec![0u8; 2 + len];
    let (head, body) = msg.split_at_mut(2);
    head.copy_from_slice(&prefix);
    read_exact_timeout(s, body, what).await?;
    Ok(msg)
}

/// Writes all of `buf` within [`HANDSHAKE_TIMEOUT`]: a neighbor that stops reading mid-handshake fails the dial
/// instead of holding it.
async fn write_all_timeout(s: &mut Box<dyn Stream>, buf: &[u8], what: &'static str) -> Result<(), PeerError> {
    timeout(HANDSHAKE_TIMEOUT, s.write_all(buf)).await.map_err(|_| PeerError::Timeout(what))??;
    Ok(())
}

/// Runs CPU-heavy handshake work (RSA) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, PeerError> {
    anomos_net::rt::spawn_blocking(f).await.map_err(|e| PeerError::Internal(format!("handshake task: {e}")))
}

/// Dials a neighbor and runs the link until it ends.
pub async fn dial(
    host: Arc<dyn LinkHost>,
    settings: &LinkSettings,
    nid: NeighborId,
    addr: SocketAddr,
    key: PublicKey,
) -> Result<(), PeerError> {
    let mut s = timeout(HANDSHAKE_TIMEOUT, settings.net.connect(addr))
        .await
        .map_err(|_| PeerError::Timeout("link connect"))??
        .stream;
    let (dialer, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
    write_all_timeout(&mut s, &hello, "link hello").await?;
    let mut reply = [0u8; HELLO_LEN];
    read_exact_timeout(&mut s, &mut reply, "link reply").await?;
    let id = settings.identity.clone();
    let (dialer, auth) = blocking(move || dialer.on_reply(&reply, &id, &mut rand::rngs::OsRng)).await??;
    write_all_timeout(&mut s, &auth, "link auth").await?;
    let msg = read_auth(&mut s, "link auth reply").await?;
    let cipher = dialer.on_auth_reply(&msg)?;
    if host.has_link(nid) {
        // The neighbor dialed us meanwhile and that link is up: ours would cross it (SPEC §5.2). Dropped before
        // key confirmation, it never comes up at either end.
        debug!(neighbor = ?nid, "a link came up during our dial; giving ours up");
        return Ok(());
    }
    let rtt = s.rtt_probe();
    let (rd, wr) = s.split();
    super::run(host, settings, rd, wr, cipher, rtt).await;
    Ok(())
}

/// Accepts a link on a connection whose first 8 bytes (the magic) were already read. The whole handshake (up
/// to our AUTH_REPLY) must finish by `deadline`; a slow or silent dialer is dropped then.
pub async fn accept(
    host: Arc<dyn LinkHost>,
    settings: &LinkSettings,
    s: Box<dyn Stream>,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), PeerError> {
    let (s, cipher) = tokio::time::timeout_at(deadline, accept_handshake(&host, settings, s, remote, deadline))
        .await
        .map_err(|_| PeerError::Timeout("link handshake (too slow)"))??;
    let rtt = s.rtt_probe();
    let (rd, wr) = s.split();
    super::run(host, settings, rd, wr, cipher, rtt).await;
    Ok(())
}

async fn accept_handshake(
    host: &Arc<dyn LinkHost>,
    settings: &LinkSettings,
    mut s: Box<dyn Stream>,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(Box<dyn Stream>, LinkCipher), PeerError> {
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(&plink::LINK_MAGIC);
    read_exact_timeout(&mut s, &mut hello[8..], "link hello").await?;
    let (acceptor, reply) = Acceptor::start(&mut rand::rngs::OsRng, &hello)?;
    s.write_all(&reply).await?;
    let auth = read_auth(&mut s, "link auth").await?;
    let me = settings.identity.clone();
    let acceptor = Arc::new(acceptor);
    let check = |host: Arc<dyn LinkHost>, acceptor: Arc<Acceptor>, auth: Arc<Vec<u8>>, me: Arc<Identity>| {
        let h2 = host.clone();
        blocking(move || {
            acceptor.on_auth(&auth, &me, &mut rand::rngs::OsRng, |fp| host.neighbor(fp), |nid| h2.busy(nid))
        })
    };
    let auth = Arc::new(auth);
    let mut out = check(host.clone(), acceptor.clone(), auth.clone(), me.clone()).await??;
    if out.status == AuthStatus::Refused {
        if let Some(fp) = out.peer {
            // Most often a neighbor the tracker paired us with after our last announce: it learned of the edge
            // first. Refresh the table and check once more before refusing (every refusal waits the same way,
            // so the time to a refusal still does not tell whether a fingerprint is our neighbor).
            host.stranger(&fp, remote.ip());
            // Within half of what is left of the handshake's deadline, so the refusal still gets out in time.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            host.table_refreshed(REFUSAL_RECHECK.min(left / 2)).await;
            out = check(host.clone(), acceptor, auth, me).await??;
        }
    }
    s.write_all(&out.reply).await?;
    match out.result {
        Ok(cipher) => Ok((s, cipher)),
        Err(e) => {
            if let Some(fp) = out.peer {
                // After the re-check a refusal is no start-up race: a stranger, a peer whose edge the tracker
                // dropped, or a bad signature. Busy is our own limit (the dialer retries).
                if out.status == AuthStatus::Refused {
                    info!(%remote, peer = %fp.short(), "link refused: not a current neighbor (after a table refresh)");
                } else {
                    debug!(%remote, peer = %fp.short(), "link refused: {e}");
                }
            }
            Err(PeerError::Proto(ProtoError::LinkRefused(out.status)))
        }
    }
}

/// Whether a handshake ended in a refusal (`Refused` or `Busy`) sent or received.
pub fn is_refusal(e: &PeerError) -> bool {
    matches!(e, PeerError::Proto(ProtoError::LinkRefused(_)))
}

/// Whether the acceptor refused us as not (yet) its neighbor (most often: it has not learned of our edge yet;
/// retry later).
pub fn is_refused(e: &PeerError) -> bool {
    matches!(e, PeerError::Proto(ProtoError::LinkRefused(AuthStatus::Refused)))
}

#[cfg(test)]
mod tests {
    //! The dialer's early give-up on a crossing (SPEC §5.2): over loopback TCP, a dial whose host already has a
    //! link over the edge when the AUTH_REPLY arrives ends without key confirmation, and neither end's link comes
    //! up; without that link the same dial comes up at both ends.
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use anomos_proto::identity::Fingerprint;
    use tokio::io::AsyncReadExt;

    use super::super::{CellSink, Link, Violation};
    use super::*;

    fn identity(i: usize) -> Arc<Identity> {
        let pem = match i {
            0 => include_str!("../../proto/tests/vectors/keys/id0_2048.pem"),
            _ => include_str!("../../proto/tests/vectors/keys/id1_2048.pem"),
        };
        Arc::new(Identity::from_pkcs8_pem(pem).expect("vector key"))
    }

    fn settings(id: Arc<Identity>) -> LinkSettings {
        LinkSettings::for_tests(id)
    }

    const NID: NeighborId = NeighborId(42);

    struct Drop;
    impl CellSink for Drop {
        fn cell(&self, _: anomos_proto::cell::Cell) -> Result<(), Violation> {
            Ok(())
        }
    }

    /// A host whose only neighbor is `other`; counts links up; `has_link` as the test says.
    struct Stub {
        other: (Fingerprint, PublicKey),
        has: AtomicBool,
        ups: AtomicUsize,
        links: Mutex<Vec<Arc<Link>>>,
    }

    impl LinkHost for Stub {
        fn neighbor(&self, fp: &Fingerprint) -> Option<(PublicKey, NeighborId)> {
            (*fp == self.other.0).then(|| (self.other.1.clone(), NID))
        }
        fn busy(&self, _: NeighborId) -> bool {
            false
        }
        fn has_link(&self, _: NeighborId) -> bool {
            self.has.load(Ordering::Relaxed)
        }
        fn stranger(&self, _: &Fingerprint, _: std::net::IpAddr) {}
        fn table_refreshed(&self, _: Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
            Box::pin(async {})
        }
        fn up(&self, link: &Arc<Link>) -> Option<Arc<dyn CellSink>> {
            self.ups.fetch_add(1, Ordering::Relaxed);
            self.links.lock().unwrap().push(link.clone());
            Some(Arc::new(Drop))
        }
        fn down(&self, _: &Arc<Link>, _: &str) {}
    }

    async fn dial_once(dialer_has_link: bool) -> (usize, usize, Result<(), PeerError>) {
        let (a, b) = (identity(0), identity(1));
        let stub = |other: &Identity, has: bool| {
            Arc::new(Stub {
                other: (other.fingerprint(), other.public().clone()),
                has: AtomicBool::new(has),
                ups: AtomicUsize::new(0),
                links: Mutex::new(Vec::new()),
            })
        };
        let (ha, hb) = (stub(&b, dialer_has_link), stub(&a, false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sb = settings(b.clone());
        let hb2: Arc<dyn LinkHost> = hb.clone();
        let acceptor = tokio::spawn(async move {
            let (mut s, remote) = listener.accept().await.unwrap();
            let mut magic = [0u8; 8];
            s.read_exact(&mut magic).await.unwrap();
            let s: Box<dyn anomos_net::Stream> = Box::new(s);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let _ = accept(hb2, &sb, s, remote, deadline).await;
        });
        let sa = settings(a.clone());
        let ha2: Arc<dyn LinkHost> = ha.clone();
        let dialed = tokio::time::timeout(Duration::from_secs(2), dial(ha2, &sa, NID, addr, b.public().clone())).await;
        // A link that came up runs until closed: the dial is still running then (the timeout fired).
        let result = dialed.unwrap_or(Ok(()));
        for l in ha.links.lock().unwrap().iter().chain(hb.links.lock().unwrap().iter()) {
            l.close("test over");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), acceptor).await;
        (ha.ups.load(Ordering::Relaxed), hb.ups.load(Ordering::Relaxed), result)
    }

    #[tokio::test]
    async fn a_dialer_that_sees_a_link_come_up_meanwhile_gives_its_own_up_before_key_confirmation() {
        let (up_dialer, up_acceptor, result) = dial_once(true).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!((up_dialer, up_acceptor), (0, 0), "no end brought the crossing link up");
        // The same dial without a link over the edge comes up at both ends.
        let (up_dialer, up_acceptor, _) = dial_once(false).await;
        assert_eq!((up_dialer, up_acceptor), (1, 1));
    }
}
