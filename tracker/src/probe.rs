//! The reachability check: before a peer gets neighbors, the tracker dials the address it announced and asks
//! "who are you?"; the answer must be signed by the key the peer authenticated with.

use std::net::SocketAddr;
use std::time::Duration;

use anomos_net::Transport;
use anomos_proto::identity::{Fingerprint, MAX_RSA_BYTES, MAX_SPKI_LEN};
use anomos_proto::link::{encode_probe, verify_probe_answer, MAX_PROBE_ANSWER};
use anomos_proto::probe_v2::{ProbeAuth, PROBE_V2_ANSWER_LEN, UNKNOWN_SESSION};
use anomos_proto::ProtoError;
use rand::RngCore;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long connecting, asking and reading the answer may take together.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a probe failed.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The answer was malformed or its signature did not verify.
    #[error("bad answer: {0}")]
    Proto(#[from] ProtoError),
    /// A valid answer, but from another key.
    #[error("answered with another key ({0})")]
    WrongKey(String),
}

/// Checks (dialing over `net`) that `addr` answers a fresh probe with the key whose fingerprint is `expected`.
pub async fn check(
    net: &dyn Transport,
    addr: SocketAddr,
    expected: &Fingerprint,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let answer = tokio::time::timeout(timeout, exchange(net, addr, &nonce))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))??;
    let key = verify_probe_answer(&nonce, &answer)?;
    if key.fingerprint() != *expected {
        return Err(ProbeError::WrongKey(key.fingerprint().short()));
    }
    Ok(())
}

/// Checks (dialing over `net`) that `addr` answers a fresh version-2 probe with the MAC of the session `auth`
/// (SPEC open issue 27: no RSA signature at the peer; the session proved the key). A peer that holds no key of the
/// session (its listener is not where its tracker client keeps them) gets a version-1 probe instead, by
/// [`check_either`].
pub async fn check_v2(
    net: &dyn Transport,
    addr: SocketAddr,
    auth: &ProbeAuth,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let exchange = async {
        let mut s = net.connect(addr).await?.stream;
        s.write_all(&auth.probe(&nonce, addr)).await?;
        // The answer, then the end of the connection: a byte more is refused (as after a version-1 answer).
        let mut answer = Vec::with_capacity(PROBE_V2_ANSWER_LEN + 1);
        (&mut s).take(PROBE_V2_ANSWER_LEN as u64 + 1).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange).await.map_err(|_| ProbeError::Timeout(timeout))??;
    auth.check_answer(&nonce, addr, &answer)?;
    Ok(())
}

/// [`check_v2`] with `auth`, falling back to [`check`] (a version-1 probe: the peer signs) when the peer answers
/// that it holds no key of this session; without `auth` (a version-1 or resumed session), [`check`].
pub async fn check_either(
    net: &dyn Transport,
    addr: SocketAddr,
    expected: &Fingerprint,
    auth: Option<&ProbeAuth>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    match auth {
        Some(a) => match check_v2(net, addr, a, timeout).await {
            Err(ProbeError::Proto(ProtoError::Invalid { detail, .. })) if detail == UNKNOWN_SESSION => {
                check(net, addr, expected, timeout).await
            }
            r => r,
        },
        None => check(net, addr, expected, timeout).await,
    }
}

/// Sends the probe and reads `der_len u16 | der | sig_len u16 | sig`, bounding each length before reading.
async fn exchange(net: &dyn Transport, addr: SocketAddr, nonce: &[u8; 32]) -> Result<Vec<u8>, ProbeError> {
    let mut s = net.connect(addr).await?.stream;
    s.write_all(&encode_probe(nonce)).await?;
    let mut answer = Vec::with_capacity(MAX_PROBE_ANSWER);
    for (what, limit) in [("probe key", MAX_SPKI_LEN), ("probe signature", MAX_RSA_BYTES)] {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let n = u16::from_be_bytes(len) as usize;
        if n > limit {
            return Err(ProtoError::TooLarge { what, len: n, limit }.into());
        }
        let start = answer.len();
        answer.extend_from_slice(&len);
        answer.resize(start + 2 + n, 0);
        if let Some(body) = answer.get_mut(start + 2..) {
            s.read_exact(body).await?;
        }
    }
    Ok(answer)
}
