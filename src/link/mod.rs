//! Neighbor links: the handshake over TCP (dial and accept), and the reader loop that feeds cells to circuits.
//!
//! A link is up once the handshake authenticated the neighbor the tracker named *and* the first sealed cell
//! (a PADDING) opened, which proves the other side derived the same keys, i.e. knows the NeighborID.
//! One reader task and one writer task ([`writer::LinkWriter`]) per link.

pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomos_proto::cell::{Cell, CircId, CELL_LEN, DIALER_CIRC_BIT, SEALED_CELL_LEN};
use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{self as plink, Acceptor, AuthStatus, Dialer, LinkCipher, HELLO_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::circuit::Route;
use crate::error::PeerError;
use crate::node::Node;
use writer::LinkWriter;

/// The link reader's buffer: about 16 cells per read syscall when cells arrive back to back.
const READ_BUF: usize = 64 * 1024;

/// How long each step of a handshake we dial may take (incoming handshakes have the node's
/// `handshake_timeout` for all their steps together).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { tokens: burst, rate: f64::from(rate.max(1)), burst, last: Instant::now() }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do with an OPEN that arrived on a link, by rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAdmission {
    /// Within the link's rate: peel it.
    Admit,
    /// Over the rate: deny it without peeling.
    Deny,
    /// Far over the rate (a further burst's worth of OPENs after being refused): close the link.
    Abuse,
}

/// Per-link admission of OPENs: a bucket of `rate`/s with `burst`, and a second bucket of the same size
/// that only refused OPENs drain; when that one is empty too, the neighbor is flooding.
#[derive(Debug)]
struct OpenLimiter {
    admit: TokenBucket,
    refused: TokenBucket,
}

impl OpenLimiter {
    fn new(rate: u32, burst: u32) -> Self {
        OpenLimiter { admit: TokenBucket::new(rate, burst), refused: TokenBucket::new(rate, burst) }
    }

    fn admit(&mut self) -> OpenAdmission {
        if self.admit.take() {
            OpenAdmission::Admit
        } else if self.refused.take() {
            OpenAdmission::Deny
        } else {
            OpenAdmission::Abuse
        }
    }
}

/// An established neighbor link.
pub struct Link {
    /// The edge.
    pub nid: NeighborId,
    /// The neighbor.
    pub peer: Fingerprint,
    /// Whether we dialed.
    pub dialer: bool,
    /// Sending side.
    pub writer: Arc<LinkWriter>,
    routes: Mutex<HashMap<CircId, Route>>,
    next_id: AtomicU32,
    peer_window: AtomicU32,
    opens: Mutex<OpenLimiter>,
    close_reason: Mutex<Option<&'static str>>,
}

impl Link {
    fn new(
        nid: NeighborId,
        peer: Fingerprint,
        dialer: bool,
        writer: Arc<LinkWriter>,
        open_rate: u32,
        open_burst: u32,
    ) -> Self {
        Link {
            nid,
            peer,
            dialer,
            writer,
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            peer_window: AtomicU32::new(u32::from(anomos_proto::cell::MIN_WINDOW)),
            opens: Mutex::new(OpenLimiter::new(open_rate, open_burst)),
            close_reason: Mutex::new(None),
        }
    }

    /// Closes the link (its reader and writer end, its circuits break) and records why.
    pub fn close(&self, why: &'static str) {
        self.close_reason.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
        self.writer.close();
    }

    /// Why [`close`](Self::close) was called, if it was.
    pub fn close_reason(&self) -> Option<&'static str> {
        *self.close_reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rate admission of one OPEN received on this link.
    pub fn admit_open(&self) -> OpenAdmission {
        self.opens.lock().unwrap_or_else(|e| e.into_inner()).admit()
    }

    /// Credit each new circuit on this link starts with: the receive window the neighbor announced in its
    /// first cell (it enforces that, not ours).
    pub fn send_window(&self) -> u32 {
        self.peer_window.load(Ordering::Relaxed)
    }

    /// Locks the route table.
    pub fn routes_lock(&self) -> std::sync::MutexGuard<'_, HashMap<CircId, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The route of a circuit id.
    pub fn route(&self, id: CircId) -> Option<Route> {
        self.routes_lock().get(&id).cloned()
    }

    /// Sets a route.
    pub fn set_route(&self, id: CircId, r: Route) {
        self.routes_lock().insert(id, r);
    }

    /// Removes a route.
    pub fn remove_route(&self, id: CircId) -> Option<Route> {
        self.routes_lock().remove(&id)
    }

    /// Number of circuits on this link.
    pub fn circuits(&self) -> usize {
        self.routes_lock().len()
    }

    /// A fresh circuit id from our half of the id space. Ids advance monotonically (wrapping after 2^31), so an
    /// id torn down with BREAK is not reused while late cells for it may still be in flight.
    pub fn alloc_id(&self) -> CircId {
        let routes = self.routes_lock();
        loop {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed) & !DIALER_CIRC_BIT;
            if n == 0 {
                continue;
            }
            let id = if self.dialer { n | DIALER_CIRC_BIT } else { n };
            if !routes.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether `id` belongs to the other side's half (the only ids it may OPEN).
    pub fn is_remote_id(&self, id: CircId) -> bool {
        id != 0 && ((id & DIALER_CIRC_BIT != 0) != self.dialer)
    }
}

async fn read_exact_timeout(s: &mut TcpStream, buf: &mut [u8], what: &'static str) -> Result<(), PeerError> {
    timeout(HANDSHAKE_TIMEOUT, s.read_exact(buf)).await.map_err(|_| PeerError::Timeout(what))??;
    Ok(())
}

async fn read_auth(s: &mut TcpStream, what: &'static str) -> Result<Vec<u8>, PeerError> {
    let mut prefix = [0u8; 2];
    read_exact_timeout(s, &mut prefix, what).await?;
    let len = plink::auth_frame_len(prefix)?;
    let mut msg = vec![0u8; 2 + len];
    msg[..2].copy_from_slice(&prefix);
    read_exact_timeout(s, &mut msg[2..], what).await?;
    Ok(msg)
}

/// Dials a neighbor and runs the link until it ends.
pub async fn dial(
    node: Arc<Node>,
    nid: NeighborId,
    addr: std::net::SocketAddr,
    key: PublicKey,
) -> Result<(), PeerError> {
    let mut s = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Timeout("link connect"))??;
    s.set_nodelay(true)?;
    let peer = key.fingerprint();
    let (dialer, hello) = Dialer::start(&mut rand::rngs::OsRng, key, nid);
    s.write_all(&hello).await?;
    let mut reply = [0u8; HELLO_LEN];
    read_exact_timeout(&mut s, &mut reply, "link reply").await?;
    let id = node.identity.clone();
    let (dialer, auth) = tokio::task::spawn_blocking(move || dialer.on_reply(&reply, &id, &mut rand::rngs::OsRng))
        .await
        .map_err(|e| PeerError::Config(e.to_string()))??;
    s.write_all(&auth).await?;
    let msg = read_auth(&mut s, "link auth reply").await?;
    let cipher = dialer.on_auth_reply(&msg)?;
    run(node, s, cipher, peer).await;
    Ok(())
}

/// Accepts a link on a connection whose first 8 bytes (the magic) were already read. The whole handshake (up
/// to our AUTH_REPLY) must finish by `deadline`; a slow or silent dialer is dropped then.
pub async fn accept(
    node: Arc<Node>,
    s: TcpStream,
    remote: std::net::SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), PeerError> {
    let (s, cipher) = tokio::time::timeout_at(deadline, accept_handshake(&node, s, remote))
        .await
        .map_err(|_| PeerError::Timeout("link handshake (too slow)"))??;
    let peer = cipher.peer;
    run(node, s, cipher, peer).await;
    Ok(())
}

async fn accept_handshake(
    node: &Arc<Node>,
    mut s: TcpStream,
    remote: std::net::SocketAddr,
) -> Result<(TcpStream, LinkCipher), PeerError> {
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(&plink::LINK_MAGIC);
    read_exact_timeout(&mut s, &mut hello[8..], "link hello").await?;
    let (acceptor, reply) = Acceptor::start(&mut rand::rngs::OsRng, &hello)?;
    s.write_all(&reply).await?;
    let auth = read_auth(&mut s, "link auth").await?;
    let me = node.identity.clone();
    let n2 = node.clone();
    let n3 = node.clone();
    let out = tokio::task::spawn_blocking(move || {
        acceptor.on_auth(
            &auth,
            &me,
            &mut rand::rngs::OsRng,
            |fp| n2.neighbor_by_fp(fp),
            // A neighbor that restarted replaces its old link, so it does not need a free slot.
            |nid| n3.link_count() >= n3.cfg.max_links && n3.link(nid).is_none(),
        )
    })
    .await
    .map_err(|e| PeerError::Config(e.to_string()))??;
    s.write_all(&out.reply).await?;
    match out.result {
        Ok(cipher) => Ok((s, cipher)),
        Err(e) => {
            if let Some(fp) = out.peer {
                if node.neighbor_by_fp(&fp).is_none() {
                    // Possibly a neighbor the tracker assigned after our last announce: refresh soon.
                    node.request_reannounce();
                }
                info!(%remote, peer = %fp.short(), "link refused: {e}");
            }
            Err(PeerError::Proto(e))
        }
    }
}

/// Whether the acceptor refused us (most often: it has not learned of our edge yet; retry later).
pub fn is_refused(e: &PeerError) -> bool {
    matches!(e, PeerError::Proto(anomos_proto::ProtoError::Invalid { detail, .. }) if detail == &format!("{:?}", AuthStatus::Refused))
}

async fn run(node: Arc<Node>, s: TcpStream, cipher: LinkCipher, peer: Fingerprint) {
    let nid = cipher.nid;
    let dialer = cipher.dialer;
    let (rd, wr) = s.into_split();
    let mut rd = BufReader::with_capacity(READ_BUF, rd);
    let (sealer, mut opener) = cipher.split();
    let writer = LinkWriter::new(node.cfg.link_queue_cap, node.budget.clone());
    // Key confirmation and link parameters: our first cell announces our receive window.
    let _ = writer.push_control(Cell::link_params(node.cfg.circuit_window.min(u32::from(u16::MAX)) as u16));
    let link = Arc::new(Link::new(nid, peer, dialer, writer.clone(), node.cfg.open_rate, node.cfg.open_burst));
    let wtask = tokio::spawn(writer.clone().run(wr, sealer, node.cfg.keepalive, node.cfg.link_idle_timeout));
    let mut buf = vec![0u8; SEALED_CELL_LEN];
    let mut first = true;
    let reader = async {
        loop {
            // A whole cell already buffered needs no idle timer (the common case under load).
            let read = if rd.buffer().len() >= SEALED_CELL_LEN {
                rd.read_exact(&mut buf).await
            } else {
                match timeout(node.cfg.link_idle_timeout, rd.read_exact(&mut buf)).await {
                    Err(_) => {
                        break format!("idle timeout (no cell or keepalive for {:?})", node.cfg.link_idle_timeout)
                    }
                    Ok(r) => r,
                }
            };
            if let Err(e) = read {
                break format!("read: {e}");
            }
            if let Err(e) = opener.open_in_place(&mut buf) {
                break if first {
                    format!("key confirmation failed (NeighborID mismatch?): {e}")
                } else {
                    format!("bad cell (authentication failed): {e}")
                };
            }
            let cell = match Cell::decode_reusing(&buf[..CELL_LEN], writer::payload_box()) {
                Ok(c) => c,
                Err(e) => break format!("malformed cell: {e}"),
            };
            if first {
                match cell.link_params_window() {
                    Ok(w) => link.peer_window.store(u32::from(w), Ordering::Relaxed),
                    Err(e) => break format!("bad key-confirmation cell: {e}"),
                }
                first = false;
                info!(peer = %peer.short(), dialer, "link up");
                node.install_link(link.clone());
                continue;
            }
            if let Err(e) = node.handle_cell(&link, cell) {
                break format!("protocol violation: {e}");
            }
        }
    };
    // The link ends when the reader does, or when the writer gives up (write stall, control-queue overflow,
    // socket error) or the link is closed from elsewhere (replaced by a newer link, retired, OPEN flood).
    let reason: String = tokio::select! {
        r = reader => r,
        why = writer.wait_closed() => match why {
            Some(w) => w.to_string(),
            None => link.close_reason().unwrap_or("closed").to_string(),
        },
    };
    if first {
        warn!(peer = %peer.short(), "link failed before it came up: {reason}");
    } else {
        info!(peer = %peer.short(), circuits = link.circuits(), "link down: {reason}");
    }
    writer.close();
    wtask.abort();
    node.link_down(&link);
    debug!(peer = %peer.short(), "link tasks finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_admission_denies_over_the_rate_and_flags_a_flood() {
        let mut l = OpenLimiter::new(10, 5);
        let seen: Vec<OpenAdmission> = (0..11).map(|_| l.admit()).collect();
        assert_eq!(&seen[..5], &[OpenAdmission::Admit; 5]);
        assert_eq!(&seen[5..10], &[OpenAdmission::Deny; 5]);
        assert_eq!(seen[10], OpenAdmission::Abuse);
        // The bucket refills at the rate.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!((l.admit(), l.admit()), (OpenAdmission::Admit, OpenAdmission::Admit));
    }
}
