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
    /// Chain data problem.
    #[error("chain: {0}")]
    Chain(String),
}
