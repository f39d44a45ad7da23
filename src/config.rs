//! Peer configuration: everything `anomos peer` (and `anomos fetch`, which runs a peer) can be told.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::ChainId;

/// Runtime limits and timings of a peer. Defaults suit a relay on a small server.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Address of the one listening port.
    pub listen: SocketAddr,
    /// Address announced to the tracker (defaults to the bound `listen` address).
    pub advertise: Option<SocketAddr>,
    /// Where keys and state live.
    pub data_dir: PathBuf,
    /// Tracker address (the first of `--tracker`).
    pub tracker: SocketAddr,
    /// Further addresses of the same (replicated) tracker, from `--tracker a,b,c`: the client starts at a random
    /// one of all of them and moves to the next when one fails (SPEC §3.10 "Replicas").
    pub tracker_replicas: Vec<SocketAddr>,
    /// Pinned tracker fingerprint (hex).
    pub tracker_fp: String,
    /// Identity key size for a newly created key.
    pub key_bits: usize,
    /// Chains this peer serves as a target.
    pub serve: Vec<ChainId>,
    /// Fingerprints of the operator's other peers, announced so the tracker keeps them off one path (`--family`).
    pub family: Vec<Fingerprint>,
    /// Most circuits (relayed + endpoints) at once; further OPENs are denied.
    pub max_circuits: usize,
    /// Most neighbor links at once.
    pub max_links: usize,
    /// Flow-control window: DATA cells a sender may have in flight per circuit and direction at each hop.
    /// Each hop buffers at most this many cells per circuit and direction.
    pub circuit_window: u32,
    /// The largest a busy circuit's window may grow to (auto-tuned to the path's bandwidth × delay, SPEC §8).
    pub circuit_window_max: u32,
    /// Most cells queued on one link (all circuits); circuits that would exceed it are broken.
    pub link_queue_cap: usize,
    /// Most cells queued on all links together (the node's buffer budget, ≈ 4.2 KB per cell); circuits that
    /// would exceed it are broken with `resources`.
    pub max_queued_cells: usize,
    /// How long a hop waits for CONFIRM/DENY from downstream.
    pub open_timeout: Duration,
    /// A link that received nothing for this long is dead; so is one whose writes make no progress for this
    /// long (the neighbor stopped reading).
    pub link_idle_timeout: Duration,
    /// PADDING is sent after this long without other traffic.
    pub keepalive: Duration,
    /// Time an incoming connection has to finish its handshake (link: until AUTH is answered; probe: until
    /// its request arrived). Slow or silent connections are closed after it.
    pub handshake_timeout: Duration,
    /// Most incoming connections (handshaking, links, probes) at once on the listening port.
    pub max_conns: usize,
    /// Most incoming connections at once from one IP address.
    pub max_conns_per_ip: usize,
    /// OPENs per second one link may send (each costs us an RSA decryption); excess OPENs are denied with
    /// `circuit-limit` without being peeled.
    pub open_rate: u32,
    /// Burst of OPENs a link may send above `open_rate`. A link that keeps sending OPENs after it was
    /// refused for rate (another burst's worth) is closed.
    pub open_burst: u32,
    /// Tolerated clock skew for TC expiry.
    pub clock_skew: Duration,
    /// Log a `stats` line (links, circuits, queued cells, counters) this often; zero = never.
    pub stats_interval: Duration,
    /// Debug: append every relayed DATA payload (in and out) to this file, for anonymity tests.
    pub cell_trace: Option<PathBuf>,
    /// Serve Prometheus metrics (GET /metrics) on this address.
    pub metrics: Option<SocketAddr>,
    /// Allow `metrics` on a non-loopback address.
    pub metrics_allow_remote: bool,
    /// Serve the local control endpoint (`<data-dir>/control.sock`, for `anomos status`).
    pub control: bool,
}

impl PeerConfig {
    /// Defaults for everything but the addresses.
    pub fn new(listen: SocketAddr, tracker: SocketAddr, tracker_fp: String, data_dir: PathBuf) -> Self {
        PeerConfig {
            listen,
            advertise: None,
            data_dir,
            tracker,
            tracker_replicas: Vec::new(),
            tracker_fp,
            key_bits: 2048,
            serve: Vec::new(),
            family: Vec::new(),
            max_circuits: 10_000,
            max_links: 64,
            circuit_window: 128,
            circuit_window_max: 2048,
            link_queue_cap: 65_536,
            max_queued_cells: 131_072,
            open_timeout: Duration::from_secs(10),
            link_idle_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_conns: 512,
            max_conns_per_ip: 32,
            open_rate: 200,
            open_burst: 400,
            clock_skew: Duration::from_secs(60),
            stats_interval: Duration::from_secs(60),
            cell_trace: None,
            metrics: None,
            metrics_allow_remote: false,
            control: true,
        }
    }

    /// Every tracker address: `tracker` first, then `tracker_replicas`.
    pub fn tracker_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.tracker).chain(self.tracker_replicas.iter().copied()).collect()
    }

    /// SENDME batch: credit is returned in steps of a quarter window.
    pub fn sendme_batch(&self) -> u32 {
        (self.circuit_window / 4).max(1)
    }

    /// Checks values that only make sense together (the command line checks each range).
    pub fn validate(&self) -> Result<(), String> {
        if self.keepalive.is_zero() || self.keepalive >= self.link_idle_timeout {
            return Err(format!(
                "--keepalive ({:?}) must be positive and shorter than --link-idle-timeout ({:?}), or idle links die",
                self.keepalive, self.link_idle_timeout
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err("--handshake-timeout must be positive".into());
        }
        if self.max_conns == 0 || self.max_conns_per_ip == 0 {
            return Err("--max-conns and --max-conns-per-ip must be positive".into());
        }
        if self.open_rate == 0 || self.open_burst == 0 {
            return Err("--open-rate and --open-burst must be positive".into());
        }
        if self.max_queued_cells == 0 || self.link_queue_cap == 0 {
            return Err("--max-queued-cells and --link-queue-cap must be positive".into());
        }
        if let Some(addr) = self.metrics {
            anomos_tracker::metrics::check_addr(addr, self.metrics_allow_remote)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent() {
        let c = PeerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            String::new(),
            PathBuf::from("."),
        );
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.keepalive = bad.link_idle_timeout;
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.open_rate = 0;
        assert!(bad.validate().is_err());
        let mut remote = c;
        remote.metrics = Some("0.0.0.0:9100".parse().unwrap());
        assert!(remote.validate().is_err(), "non-loopback metrics need --metrics-allow-remote");
        remote.metrics_allow_remote = true;
        remote.validate().unwrap();
    }
}
