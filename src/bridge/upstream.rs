//! The upstream service: circuits that end here are joined to new TCP connections to a Bitcoin node.

use std::sync::Arc;

use anomos_proto::btc::{EnvelopeReader, NetParams};
use anomos_proto::cell::BreakReason;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::splice::{splice, IdleLimit, Side, SpliceCtx};
use super::{BridgeOptions, BridgeStats};
use crate::circuit::CircuitStream;
use crate::node::{Service, UpstreamHealth};

/// A [`Service`] that relays every incoming circuit, envelope by envelope, to a new TCP connection to the
/// Bitcoin node at `addr` (its P2P port). The upstream node sees connections from this peer only; this peer
/// learns nothing about the requester.
pub struct UpstreamService {
    addr: String,
    params: NetParams,
    opts: BridgeOptions,
    stats: Arc<BridgeStats>,
    slots: Arc<Semaphore>,
    health: Arc<UpstreamHealth>,
}

impl UpstreamService {
    /// Relays to `addr` (`HOST:PORT`, resolved at each connect) on the network `params`, with the default
    /// [`BridgeOptions`].
    pub fn new(addr: impl Into<String>, params: NetParams) -> UpstreamService {
        Self::with_options(addr, params, BridgeOptions::default())
    }

    /// As [`new`](Self::new), with options.
    pub fn with_options(addr: impl Into<String>, params: NetParams, opts: BridgeOptions) -> UpstreamService {
        let slots = Arc::new(Semaphore::new(opts.max_connections));
        UpstreamService { addr: addr.into(), params, opts, stats: Arc::default(), slots, health: Arc::default() }
    }

    /// The upstream address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The network relayed.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// What the last connection to the upstream node found (`status` shows it).
    pub fn health(&self) -> Arc<UpstreamHealth> {
        self.health.clone()
    }

    /// Tries one connection to the upstream node now (closed at once) and records the outcome; at start-up, so
    /// that `status` and the log tell at once whether the node we serve from is there.
    pub async fn check(&self) -> Result<(), String> {
        let r = match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(self.addr.as_str())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.opts.connect_timeout)),
        };
        self.health.record(r.clone());
        r
    }

    /// The service's counters.
    pub fn stats(&self) -> Arc<BridgeStats> {
        self.stats.clone()
    }
}

impl Service for UpstreamService {
    fn accept(&self, stream: CircuitStream) {
        BridgeStats::bump(&self.stats.accepted, 1);
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            BridgeStats::bump(&self.stats.refused, 1);
            warn!(limit = self.opts.max_connections, "upstream: too many bridged circuits; breaking this one");
            return stream.abort(BreakReason::Resources);
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            warn!("upstream: no async runtime, dropping circuit");
            return;
        };
        let (addr, magic, opts, stats) = (self.addr.clone(), self.params.magic, self.opts.clone(), self.stats.clone());
        let health = self.health.clone();
        let slots = self.slots.clone();
        rt.spawn(async move {
            let tcp = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr.as_str())).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    BridgeStats::bump(&stats.refused, 1);
                    health.record(Err(e.to_string()));
                    warn!(upstream = %addr, "upstream: cannot connect ({e}); breaking the circuit (upstream-unavailable)");
                    return stream.abort(BreakReason::UpstreamUnavailable);
                }
                Err(_) => {
                    BridgeStats::bump(&stats.refused, 1);
                    health.record(Err("connect timed out".into()));
                    warn!(upstream = %addr, "upstream: connect timed out; breaking the circuit (upstream-unavailable)");
                    return stream.abort(BreakReason::UpstreamUnavailable);
                }
            };
            health.record(Ok(()));
            let _ = tcp.set_nodelay(true);
            BridgeStats::bump(&stats.joined, 1);
            BridgeStats::bump(&stats.active, 1);
            info!(upstream = %addr, "upstream: circuit joined to a new connection");
            let ctx = SpliceCtx {
                side: Side::Upstream,
                magic,
                scrub_version: opts.scrub_version,
                stats: &stats,
                label: addr.clone(),
                idle: Some(IdleLimit { after: opts.idle_timeout, slots }),
            };
            splice(tcp, stream, EnvelopeReader::new(magic), &ctx).await;
            stats.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(slot);
        });
    }
}
