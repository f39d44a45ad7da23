//! # anomos — the peer
//!
//! One TCP port for everything: neighbor links (handshake, cells) and the tracker's reachability probe.
//! * [`node`]: the peer's place in the overlay (announce loop, neighbor links) and shared state.
//! * [`link`]: link handshakes over TCP, the reader loop, and the fair, flow-controlled writer.
//! * [`circuit`]: routing of cells, OPEN admission, the Relayer, endpoints and the message stream.
//! * [`tracker_client`]: the encrypted session with the tracker.
//! * [`chain`]: the Bitcoin node on top of circuits (store, validation, serving, sync).
//! * [`cmd`]: the command-line surface (`peer`, `fetch`, `demo`, `keygen`, `status`, …).
//! * [`metrics`]: the Prometheus exposition behind `--metrics`.
//! * [`control`]: the local control socket `<data-dir>/control.sock` that `anomos status` asks.

pub mod bridge;
pub mod chain;
pub mod circuit;
pub mod cmd;
pub mod config;
pub mod control;
pub mod error;
pub mod link;
pub mod metrics;
pub mod node;
pub mod probe_keys;
pub mod stats;
pub mod tracker_client;

pub use circuit::{CircuitSender, CircuitStream};
pub use config::PeerConfig;
pub use error::PeerError;
pub use node::{Node, Service};
