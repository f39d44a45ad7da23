//! The peer's error type.

use anomos_proto::cell::{BreakReason, DenyReason};
use thiserror::Error;

/// Errors of the peer runtime.
#[derive(Debug, Error)]
pub enum PeerError {
    /// Socket I/O.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Protocol decoding or cryptography.
    #[error("protocol: {0}")]
    Proto(#[from] anomos_proto::ProtoError),
    /// Something did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The tracker refused or misbehaved.
    #[error("tracker: {0}")]
    Tracker(String),
    /// The tracker found no path for a circuit request (its error message).
    #[error("tracker: no path: {0}")]
    NoPath(String),
    /// A circuit was refused by a hop.
    #[error("circuit denied: {0}")]
    Denied(DenyReason),
    /// A circuit broke.
    #[error("circuit broken: {0}")]
    Broken(BreakReason),
    /// No usable link to a neighbor.
    #[error("no link to neighbor: {0}")]
    NoLink(String),
    /// Configuration problem.
    #[error("config: {0}")]
    Config(String),
    /// A limit of ours refused the request for now (e.g. too many probes at once); try later.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// The node is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// A task of ours failed (a panic or a cancelled blocking job): a bug, reported instead of propagated.
    #[error("internal: {0}")]
    Internal(String),
    /// The local control socket, or a peer answering on it, failed.
    #[error("control: {0}")]
    Control(String),
    /// A process we started (demo, bench) failed.
    #[error("process: {0}")]
    Process(String),
    /// Chain data problem.
    #[error("chain: {0}")]
    Chain(String),
}
