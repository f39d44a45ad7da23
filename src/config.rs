//! Peer configuration: everything `anomos peer` (and `anomos fetch`, which runs a peer) can be told.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Tracker address.
    pub tracker: SocketAddr,
    /// Pinned tracker fingerprint (hex).
    pub tracker_fp: String,
    /// Identity key size for a newly created key.
    pub key_bits: usize,
    /// Chains this peer serves as a target.
    pub serve: Vec<ChainId>,
    /// Most circuits (relayed + endpoints) at once; further OPENs are denied.
    pub max_circuits: usize,
    /// Most neighbor links at once.
    pub max_links: usize,
    /// Flow-control window: DATA cells a sender may have in flight per circuit and direction at each hop.
    /// Each hop buffers at most this many cells per circuit and direction.
    pub circuit_window: u32,
    /// Most cells queued on one link (all circuits); circuits that would exceed it are broken.
    pub link_queue_cap: usize,
    /// How long a hop waits for CONFIRM/DENY from downstream.
    pub open_timeout: Duration,
    /// A link that received nothing for this long is dead.
    pub link_idle_timeout: Duration,
    /// PADDING is sent after this long without other traffic.
    pub keepalive: Duration,
    /// Tolerated clock skew for TC expiry.
    pub clock_skew: Duration,
    /// Debug: append every relayed DATA payload (in and out) to this file, for anonymity tests.
    pub cell_trace: Option<PathBuf>,
}

impl PeerConfig {
    /// Defaults for everything but the addresses.
    pub fn new(listen: SocketAddr, tracker: SocketAddr, tracker_fp: String, data_dir: PathBuf) -> Self {
        PeerConfig {
            listen,
            advertise: None,
            data_dir,
            tracker,
            tracker_fp,
            key_bits: 2048,
            serve: Vec::new(),
            max_circuits: 10_000,
            max_links: 64,
            circuit_window: 128,
            link_queue_cap: 65_536,
            open_timeout: Duration::from_secs(10),
            link_idle_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(5),
            clock_skew: Duration::from_secs(60),
            cell_trace: None,
        }
    }

    /// SENDME batch: credit is returned in steps of a quarter window.
    pub fn sendme_batch(&self) -> u32 {
        (self.circuit_window / 4).max(1)
    }
}
