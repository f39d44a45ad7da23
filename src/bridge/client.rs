//! The client bridge: a local TCP port whose every connection is carried over a new circuit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anomos_proto::btc::{EnvelopeReader, NetParams};
use anomos_proto::ids::ChainId;
use anomos_proto::tracker::CircuitRequest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::splice::{forward, read_envelope, splice, End, Side, SpliceCtx};
use super::{BridgeOptions, BridgeStats};
use crate::circuit::CircuitStream;
use crate::error::PeerError;
use crate::node::Node;

/// A bound client bridge; [`run`](Self::run) serves it.
pub struct ClientBridge {
    node: Arc<Node>,
    listener: TcpListener,
    local: SocketAddr,
    params: NetParams,
    chain: ChainId,
    relays: u8,
    opts: BridgeOptions,
    stats: Arc<BridgeStats>,
}

/// Binds a client bridge on `listen` with the default [`BridgeOptions`] and serves it until the future is
/// dropped: every connection is carried over a new circuit with `relays` relays to a peer serving
/// `params`' chain. Errors only if it cannot bind (or `params.name` is not a valid chain id).
pub async fn run_bridge(node: Arc<Node>, listen: SocketAddr, params: NetParams, relays: u8) -> Result<(), PeerError> {
    ClientBridge::bind(node, listen, params, relays, BridgeOptions::default()).await?.run().await
}

impl ClientBridge {
    /// Binds the listening port (exactly `listen`; nothing else is opened).
    pub async fn bind(
        node: Arc<Node>,
        listen: SocketAddr,
        params: NetParams,
        relays: u8,
        opts: BridgeOptions,
    ) -> Result<ClientBridge, PeerError> {
        let listener = TcpListener::bind(listen).await?;
        Self::with_listener(node, listener, params, relays, opts)
    }

    /// A client bridge on a port already bound (so a peer can bind it before it announces readiness).
    pub fn with_listener(
        node: Arc<Node>,
        listener: TcpListener,
        params: NetParams,
        relays: u8,
        opts: BridgeOptions,
    ) -> Result<ClientBridge, PeerError> {
        let chain = ChainId::new(&params.name).map_err(|e| PeerError::Config(format!("bridge chain: {e}")))?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() {
            warn!(%local, "the bridge listens beyond loopback: anyone who reaches it opens circuits as this peer");
        }
        info!(listen = %local, chain = %params.name, relays, "bridge listening");
        Ok(ClientBridge { node, listener, local, params, chain, relays, opts, stats: Arc::default() })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The bridge's counters (shared; they keep counting while [`run`](Self::run) runs).
    pub fn stats(&self) -> Arc<BridgeStats> {
        self.stats.clone()
    }

    /// Accepts connections until the future is dropped (connections already joined keep running).
    pub async fn run(self) -> Result<(), PeerError> {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.opts.max_connections));
        loop {
            let (tcp, remote) = match this.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("bridge accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            BridgeStats::bump(&this.stats.accepted, 1);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                BridgeStats::bump(&this.stats.refused, 1);
                warn!(%remote, limit = this.opts.max_connections, "bridge: too many connections; closing this one");
                continue;
            };
            let bridge = this.clone();
            tokio::spawn(async move {
                bridge.connection(tcp, remote).await;
                drop(slot);
            });
        }
    }

    async fn connection(&self, mut tcp: TcpStream, remote: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let ctx = SpliceCtx {
            side: Side::Client,
            magic: self.params.magic,
            scrub_version: self.opts.scrub_version,
            stats: &self.stats,
            label: remote.to_string(),
            idle: None,
        };
        let refuse = |why: String| {
            BridgeStats::bump(&self.stats.refused, 1);
            warn!(%remote, "bridge: closing connection: {why}");
        };
        // The first envelope (a Bitcoin initiator's `version`) before any circuit is spent on the connection.
        let mut reader = EnvelopeReader::new(self.params.magic);
        let mut buf = vec![0u8; 4096];
        let first =
            tokio::time::timeout(self.opts.first_message_timeout, read_envelope(&mut tcp, &mut reader, &mut buf)).await;
        let first = match first {
            Err(_) => return refuse("no complete envelope in time".into()),
            Ok(Ok(None)) => return debug!(%remote, "bridge: closed before sending anything"),
            Ok(Err(End::BadTcpData(e))) => return refuse(format!("invalid envelope: {e}")),
            Ok(Err(e)) => return refuse(e.to_string()),
            Ok(Ok(Some(env))) => env,
        };
        let stream = match self.open_circuit().await {
            Ok(s) => s,
            Err(why) => return refuse(why),
        };
        BridgeStats::bump(&self.stats.joined, 1);
        BridgeStats::bump(&self.stats.active, 1);
        info!(%remote, hops = stream.hops, "bridge: connection joined to a new circuit");
        if let Err(e) = forward(&stream.sender(), first, &ctx).await {
            // Said as a connection that ended, with the circuit's reason (e.g. `upstream-unavailable`: the serving
            // peer broke the circuit as it opened), like one that ends later (`splice`).
            warn!(%remote, "bridged connection ended before its first message went out: {e}");
        } else {
            splice(tcp, stream, reader, &ctx).await;
        }
        self.stats.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// One new circuit, retrying (the tracker may not know a serving peer yet) until the deadline; or why not.
    /// The tracker's "no path" is logged at once, and retried only for [`NO_PATH_GRACE`] (the overlay may still be
    /// forming): a chain nobody serves is not worth the client's whole circuit timeout.
    async fn open_circuit(&self) -> Result<CircuitStream, String> {
        let deadline = tokio::time::Instant::now() + self.opts.circuit_timeout;
        let mut backoff = Duration::from_millis(200);
        let mut no_path_since: Option<tokio::time::Instant> = None;
        let mut warned = false;
        let mut last = String::from("no circuit opened");
        loop {
            let req = CircuitRequest { chain: self.chain.clone(), count: 1, relays: self.relays };
            let attempt = tokio::time::timeout_at(deadline, self.node.request_circuits(req)).await;
            match attempt {
                Err(_) => break,
                Ok(Ok(mut v)) => {
                    if let Some(s) = v.pop() {
                        return Ok(s);
                    }
                    debug!("bridge: no circuit opened; retrying");
                }
                Ok(Err(PeerError::NoPath(msg))) => {
                    let first = *no_path_since.get_or_insert_with(tokio::time::Instant::now);
                    last = format!("the tracker has no path to a '{}' peer ({msg})", self.chain);
                    if first.elapsed() >= NO_PATH_GRACE {
                        return Err(last);
                    }
                    if !std::mem::replace(&mut warned, true) {
                        warn!(
                            "bridge: {last}; retrying for {}s in case the overlay is still forming",
                            NO_PATH_GRACE.as_secs()
                        );
                    }
                }
                Ok(Err(e)) => {
                    last = format!("circuit request failed: {e}");
                    debug!("bridge: {last}; retrying");
                }
            }
            if tokio::time::Instant::now() + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        Err(format!("no circuit to a '{}' peer within {:?} ({last})", self.chain, self.opts.circuit_timeout))
    }
}

/// How long the bridge keeps asking after the tracker first said it has no path for the bridge's chain.
pub const NO_PATH_GRACE: Duration = Duration::from_secs(5);
