//! The link handshake over TCP (SPEC §5.3), as dialer and as acceptor; an authenticated link then runs in
//! [`super::run`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::identity::PublicKey;
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{self as plink, Acceptor, AuthStatus, Dialer, LinkCipher, HELLO_LEN};
use anomos_proto::ProtoError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::info;

use super::{LinkHost, LinkSettings};
use crate::error::PeerError;

/// How long each step of a handshake we dial may take (incoming handshakes have the node's
/// `handshake_timeout` for all their steps together).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn read_exact_timeout(s: &mut TcpStream, buf: &mut [u8], what: &'static str) -> Result<(), PeerError> {
    timeout(HANDSHAKE_TIMEOUT, s.read_exact(buf)).await.map_err(|_| PeerError::Timeout(what))??;
    Ok(())
}

async fn read_auth(s: &mut TcpStream, what: &'static str) -> Result<Vec<u8>, PeerError> {
    let mut prefix = [0u8; 2];
    read_exact_timeout(s, &mut prefix, what).await?;
    let len = plink::auth_frame_len(prefix)?;
    let mut msg = vec![0u8; 2 + len];
    let (head, body) = msg.split_at_mut(2);
    head.copy_from_slice(&prefix);
    read_exact_timeout(s, body, what).await?;
    Ok(msg)
}

/// Runs CPU-heavy handshake work (RSA) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, PeerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| PeerError::Internal(format!("handshake task: {e}")))
}

/// Dials a neighbor and runs the link until it ends.
pub async fn dial(
    host: Arc<dyn LinkHost>,
    settings: &LinkSettings,
    nid: NeighborId,
    addr: SocketAddr,
    key: PublicKey,
) -> Result<(), PeerError> {
    let mut s = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Timeout("link connect"))??;
    s.set_nodelay(true)?;
    let (dialer, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
    s.write_all(&hello).await?;
    let mut reply = [0u8; HELLO_LEN];
    read_exact_timeout(&mut s, &mut reply, "link reply").await?;
    let id = settings.identity.clone();
    let (dialer, auth) = blocking(move || dialer.on_reply(&reply, &id, &mut rand::rngs::OsRng)).await??;
    s.write_all(&auth).await?;
    let msg = read_auth(&mut s, "link auth reply").await?;
    let cipher = dialer.on_auth_reply(&msg)?;
    let rtt = super::rtt::probe(&s);
    let (rd, wr) = s.into_split();
    super::run(host, settings, rd, wr, cipher, rtt).await;
    Ok(())
}

/// Accepts a link on a connection whose first 8 bytes (the magic) were already read. The whole handshake (up
/// to our AUTH_REPLY) must finish by `deadline`; a slow or silent dialer is dropped then.
pub async fn accept(
    host: Arc<dyn LinkHost>,
    settings: &LinkSettings,
    s: TcpStream,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), PeerError> {
    let (s, cipher) = tokio::time::timeout_at(deadline, accept_handshake(&host, settings, s, remote))
        .await
        .map_err(|_| PeerError::Timeout("link handshake (too slow)"))??;
    let rtt = super::rtt::probe(&s);
    let (rd, wr) = s.into_split();
    super::run(host, settings, rd, wr, cipher, rtt).await;
    Ok(())
}

async fn accept_handshake(
    host: &Arc<dyn LinkHost>,
    settings: &LinkSettings,
    mut s: TcpStream,
    remote: SocketAddr,
) -> Result<(TcpStream, LinkCipher), PeerError> {
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(&plink::LINK_MAGIC);
    read_exact_timeout(&mut s, &mut hello[8..], "link hello").await?;
    let (acceptor, reply) = Acceptor::start(&mut rand::rngs::OsRng, &hello)?;
    s.write_all(&reply).await?;
    let auth = read_auth(&mut s, "link auth").await?;
    let me = settings.identity.clone();
    let (h1, h2) = (host.clone(), host.clone());
    let out = blocking(move || {
        acceptor.on_auth(&auth, &me, &mut rand::rngs::OsRng, |fp| h1.neighbor(fp), |nid| h2.busy(nid))
    })
    .await??;
    s.write_all(&out.reply).await?;
    match out.result {
        Ok(cipher) => Ok((s, cipher)),
        Err(e) => {
            if let Some(fp) = out.peer {
                if host.neighbor(&fp).is_none() {
                    // Possibly a neighbor the tracker assigned after our last announce: the host refreshes.
                    host.stranger(&fp);
                }
                // Refusals race with announces at every start-up (the dialer learned of the edge first): an
                // expected event, not an operator's concern.
                info!(%remote, peer = %fp.short(), "link refused: {e}");
            }
            Err(PeerError::Proto(e))
        }
    }
}

/// Whether the acceptor refused us as not (yet) its neighbor (most often: it has not learned of our edge yet;
/// retry later).
pub fn is_refused(e: &PeerError) -> bool {
    matches!(e, PeerError::Proto(ProtoError::LinkRefused(AuthStatus::Refused)))
}
