//! The node's one listening port: connection limits (in total and per source address), then by the first 8
//! bytes either a link handshake or a reachability probe (SPEC §1.3, §3.9).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anomos_net::{Listener, Stream};
use anomos_proto::link::{self as plink, LINK_MAGIC, PROBE_MAGIC};
use anomos_proto::probe_v2::{decode_probe_v2, PROBE_V2_LEN, PROBE_VERSION_2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::Node;
use crate::error::PeerError;
use crate::link;

/// Incoming connections open now, in total and per source IP (the listening port's limits).
#[derive(Default)]
pub(super) struct ConnTable {
    pub(super) total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one slot of the connection limits while an incoming connection lives.
struct ConnSlot {
    node: Arc<Node>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = self.node.conns.lock().unwrap_or_else(|e| e.into_inner());
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Node {
    /// Takes a slot of the incoming-connection limits for `ip`, or says which limit is reached.
    fn take_conn_slot(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, &'static str> {
        let mut t = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if t.total >= self.cfg.max_conns {
            return Err("too many connections (--max-conns)");
        }
        let n = t.per_ip.entry(ip).or_insert(0);
        if *n >= self.cfg.max_conns_per_ip {
            return Err("too many connections from this address (--max-conns-per-ip)");
        }
        *n += 1;
        t.total += 1;
        Ok(ConnSlot { node: self.clone(), ip })
    }

    pub(super) async fn accept_loop(self: Arc<Self>, listener: Box<dyn Listener>) {
        let probes = Arc::new(Semaphore::new(4));
        loop {
            let (s, remote) = match listener.accept().await {
                Ok(c) => (c.stream, c.peer),
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match self.take_conn_slot(remote.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    warn!(%remote, "connection refused: {why}");
                    drop(s);
                    continue;
                }
            };
            let node = self.clone();
            let probes = probes.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match node.serve_connection(s, remote, probes).await {
                    // Logged where it was decided (with the claimed fingerprint).
                    Err(e) if link::is_refusal(&e) => debug!(%remote, "connection dropped: {e}"),
                    Err(e) => info!(%remote, "connection dropped: {e}"),
                    Ok(()) => {}
                }
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        mut s: Box<dyn Stream>,
        remote: SocketAddr,
        probes: Arc<Semaphore>,
    ) -> Result<(), PeerError> {
        // Everything before a link is up (magic, handshake) or a probe is answered shares one deadline, so a
        // slow or silent connection (slowloris) holds its slot only that long.
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        let mut magic = [0u8; 8];
        tokio::time::timeout_at(deadline, s.read_exact(&mut magic))
            .await
            .map_err(|_| PeerError::Timeout("the first bytes (handshake too slow)"))??;
        if magic == LINK_MAGIC {
            let host: Arc<dyn link::LinkHost> = self.host.clone();
            link::accept(host, &self.link_settings, s, remote, deadline).await
        } else if magic == PROBE_MAGIC {
            let mut version = [0u8; 2];
            tokio::time::timeout_at(deadline, s.read_exact(&mut version))
                .await
                .map_err(|_| PeerError::Timeout("probe (too slow)"))??;
            if u16::from_be_bytes(version) == PROBE_VERSION_2 {
                // A MAC under our tracker session's probe key: no signature, no slot (SPEC open issue 27).
                let mut body = [0u8; PROBE_V2_LEN - 8];
                if let Some(rest) = body.get_mut(2..) {
                    tokio::time::timeout_at(deadline, s.read_exact(rest))
                        .await
                        .map_err(|_| PeerError::Timeout("probe (too slow)"))??;
                }
                if let Some(v) = body.get_mut(..2) {
                    v.copy_from_slice(&version);
                }
                let probe = decode_probe_v2(&body)?;
                let announced = self.cfg.advertise.unwrap_or(self.listen_addr);
                let answer = self.probe_keys.answer(&probe, announced);
                tokio::time::timeout(self.cfg.handshake_timeout, s.write_all(&answer))
                    .await
                    .map_err(|_| PeerError::Timeout("the prober to read the answer"))??;
                debug!(%remote, status = answer.first().copied().unwrap_or(0), "answered reachability probe (v2)");
                self.stats.probes_answered[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
            let mut body = [0u8; 34];
            body[..2].copy_from_slice(&version);
            tokio::time::timeout_at(deadline, s.read_exact(&mut body[2..]))
                .await
                .map_err(|_| PeerError::Timeout("probe (too slow)"))??;
            let nonce = plink::decode_probe_body(&body)?;
            // Each probe costs us an RSA signature: at most a few are signed at once, the others wait their turn
            // (first come, first served) until the deadline. A slot is held only while signing, never while the
            // prober sends or reads: a prober that stalls holds none. (It once held one from the magic on, so four
            // connections that sent the magic and stalled failed every tracker probe; found in review, session 10.)
            let permit = tokio::time::timeout_at(deadline, probes.acquire())
                .await
                .map_err(|_| PeerError::Busy("too many probes at once"))?
                .map_err(|_| PeerError::Internal("probe slots closed".into()))?;
            let me = self.identity.clone();
            let answer =
                anomos_net::rt::spawn_blocking(move || plink::answer_probe(&me, &nonce, &mut rand::rngs::OsRng))
                    .await
                    .map_err(|e| PeerError::Internal(format!("probe task: {e}")))?;
            drop(permit);
            tokio::time::timeout(self.cfg.handshake_timeout, s.write_all(&answer))
                .await
                .map_err(|_| PeerError::Timeout("the prober to read the answer"))??;
            debug!(%remote, "answered reachability probe");
            self.stats.probes_answered[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        } else {
            Err(PeerError::Proto(anomos_proto::ProtoError::BadMagic(magic)))
        }
    }
}
