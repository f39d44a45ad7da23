//! The tracker's public key, fetched (`ANOMOSK1`) and checked against the pinned fingerprint, with the channel
//! version the tracker speaks (SPEC.md §3.1).

use super::*;

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
