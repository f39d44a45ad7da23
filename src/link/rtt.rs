//! The smoothed round-trip time of a link's connection, for receive-window auto-tuning (`circuit/window.rs`).
//! The transport measures it (`anomos_net`: the kernel's `TCP_INFO` for TCP on Linux); elsewhere, and on
//! in-memory or simulated links, it is unknown and windows keep their announced size.

/// Reads a link's RTT; called by the link's writer task, which owns the connection's write half.
pub use anomos_net::RttProbe;
