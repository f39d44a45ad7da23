//! # anomos-tracker
//!
//! The tracker of the anomos overlay. It knows every peer, keeps the random neighbor graph (each edge with its
//! own secret [`NeighborId`](anomos_proto::ids::NeighborId)), and builds tracking codes for paths through it.
//! All state is in memory and bounded; peers and edges are also kept in an embedded database
//! (`<data-dir>/tracker.redb`), so a restarted tracker keeps its graph.
//!
//! * [`config`]: the command-line arguments ([`TrackerArgs`]).
//! * `server`: startup, accept loop, sessions and framing ([`run`], [`run_until`], [`run_on`] over another
//!   transport: `anomos_net`); also answers the key fetch
//!   (`ANOMOSK1`) that lets a peer pinning the tracker's fingerprint obtain its full public key.
//! * `service`: what each request does (announce with reachability check, circuits, failure reports).
//! * [`graph`]: the overlay graph, neighbor choice and path finding — pure, synchronous, unit-tested (public for
//!   the `sybil` simulation).
//! * [`diversity`]: network prefixes, admission limits per address and network.
//! * `circuits`: tracking-code issuing and the memory of issued circuits.
//! * `probe`: the reachability check.
//! * `tickets`: session tickets, so that a session resumes on a new connection without RSA (SPEC §3.4).
//! * `replica`: several instances sharing one state through etcd (`--etcd`, the `etcd` feature).
//! * `store`: the state database (redb); `fds`: the open-file limit; `timed_lock`: the measured state lock;
//!   `limits`: per-address connection and channel set-up limits.
//! * [`metrics`]: Prometheus text exposition and the small HTTP responder behind `--metrics` (shared with
//!   the peer).

#![forbid(unsafe_code)]

mod circuits;
pub mod config;
pub mod config_file;
pub mod diversity;
mod error;
mod fds;
pub mod graph;
mod limits;
pub mod metrics;
mod probe;
mod replica;
mod server;
mod service;
mod sizing;
mod static_key;
mod store;
mod tickets;
mod timed_lock;

pub use config::TrackerArgs;
pub use error::TrackerError;
pub use server::{run, run_on, run_until, shutdown_signal, Ready, HELLO_TIMEOUT};
pub use service::{REPORTS_PER_WINDOW, REPORT_WINDOW};
