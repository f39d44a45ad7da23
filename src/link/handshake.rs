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
            host.stranger(&fp);
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
