//! # Bridges: unmodified Bitcoin software on both ends of a circuit
//!
//! The chain layer ([`crate::chain`]) is a Bitcoin node of our own that speaks over circuits. A bridge lets
//! *any* Bitcoin P2P software use the overlay instead, one TCP connection per circuit, message by message:
//!
//! ```text
//!  your node ──TCP──▶ client bridge ══ circuit (relays) ══▶ serving peer ──TCP──▶ upstream node
//!  (127.0.0.1:PORT)   [`ClientBridge`] on the requester      [`UpstreamService`]   (HOST:PORT)
//! ```
//!
//! * **Client bridge** ([`ClientBridge`], [`run_bridge`]; `anomos peer --bridge 127.0.0.1:PORT
//!   --bridge-chain regtest`): a local TCP port where a Bitcoin node (or any P2P client) connects. Each
//!   accepted connection gets a **new circuit** (one [`Node::request_circuits`] with `count = 1`) to a peer
//!   serving that chain. The circuit is requested only once the connection has sent its first complete,
//!   valid envelope (Bitcoin's initiator always speaks first with `version`), so a port scanner or a client
//!   of the wrong network costs no circuit.
//! * **Upstream service** ([`UpstreamService`]; `anomos peer --serve CHAIN --upstream HOST:PORT`): a serving
//!   peer that, instead of answering from its own store, joins each incoming circuit to a new TCP connection
//!   to a Bitcoin node's P2P port.
//!
//! ## What crosses, and how
//!
//! Every circuit message is exactly one Bitcoin envelope (24-byte header + payload), as everywhere in
//! anomos ([`crate::chain::wire`]). Bytes read from TCP go through a bounded
//! [`EnvelopeReader`](anomos_proto::btc::EnvelopeReader) (at most one maximal envelope, 4 MB + 24, is
//! buffered per connection); each complete envelope is sent as one circuit message with the bytes
//! received — the reader checks the magic, the command bytes, the length and the checksum, so re-encoding
//! the decoded envelope gives back exactly those bytes. A wrong magic, a bad command, an oversized length
//! field or a bad checksum closes that connection (and its circuit) with a log line; other connections are
//! not affected. Each circuit message is checked the same way before it is written to TCP (exactly one
//! envelope of our network, nothing more); anything else breaks the circuit — on the client bridge as
//! [`BreakReason::Misbehaving`](anomos_proto::cell::BreakReason::Misbehaving), which also reports the
//! serving peer to the tracker, since a serving peer only ever forwards envelopes it validated itself.
//! Payloads are not interpreted (beyond the optional `version` scrub below): any command, known or not,
//! passes.
//!
//! Flow control is end to end: while a circuit send waits for credit, nothing more is read from TCP (the
//! kernel's buffers fill and the sender's TCP window closes); while a TCP write is pending, nothing more is
//! taken from the circuit (its receive buffer fills and credit stops going back, see
//! [`RECV_BUFFER`](crate::circuit::endpoint::RECV_BUFFER)).
//!
//! Either side closing closes the other: TCP EOF closes the circuit gracefully (what was sent is delivered
//! first, then Close); a circuit that ends has everything it delivered written to TCP, then the TCP side is
//! shut down. There is no half-close (circuits have none).
//!
//! ## Anonymity, and the `version` scrub
//!
//! As with any circuit, the serving peer learns nothing about the requester and the requester nothing about
//! the serving peer; the upstream node sees a TCP connection from the serving peer only, and the client's
//! node sees only `127.0.0.1:PORT`. **But a bridge carries the Bitcoin conversation, and that conversation
//! can itself carry addresses**:
//!
//! * `version` has two address fields: `addr_recv` (the address the sender believes it is talking to) and
//!   `addr_from` (the sender's own address). Bitcoin Core sends `[::]:0` as `addr_from` but puts the peer's
//!   address as it sees it into `addr_recv` when that address is routable: an upstream node on another host
//!   would write the *serving peer's* public address there. Other implementations may put their own address into `addr_from`.
//!   Therefore [`BridgeOptions::scrub_version`] is **on by default**: both bridges rewrite the IP and port
//!   of both fields of every `version` they send *into* a circuit to the unspecified address `[::]:0`
//!   (same length; service bits, nonce, user agent and everything else are kept byte for byte; the checksum
//!   is recomputed). Bitcoin Core ignores unroutable `addr_recv`/`addr_from` values, so nothing else
//!   changes. Only the direction into the circuit is scrubbed: that is the side the bridge protects (the
//!   other end reads the circuit's plaintext anyway). Turn it off (`scrub_version = false`) for a
//!   byte-for-byte relay of every message.
//! * `addr`/`addrv2` messages, and a node's periodic self-advertisement, pass unchanged. Configure the
//!   node behind a client bridge not to reveal addresses: Bitcoin Core `-listen=0` (a node that does not
//!   listen never advertises itself), `-connect=127.0.0.1:PORT` (talk only to the bridge) and no
//!   `-externalip`. An upstream node that shares the serving peer's host should not advertise its address
//!   either (`-discover=0`, no `-externalip`), or the requester learns the serving peer's address from it.
//! * The user agent, services and start height are passed as they are: they fingerprint software, not
//!   addresses. A transaction the client relays is seen by the upstream node, as on any Bitcoin
//!   connection.
//! * Bind the client bridge to loopback (the default suggestion `127.0.0.1`): anyone who can reach it can
//!   open circuits in this peer's name.

mod client;
mod scrub;
mod splice;
mod upstream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use client::{run_bridge, ClientBridge};
pub use scrub::scrub_version_payload;
pub use splice::check_circuit_envelope;
pub use upstream::UpstreamService;

#[cfg(doc)]
use crate::node::Node;

/// Knobs shared by both bridges.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Rewrite the address fields of `version` messages sent into a circuit to `[::]:0` (see the module
    /// docs). Default: on.
    pub scrub_version: bool,
    /// Most bridged connections at once; more are closed at once with a log line. Default 32.
    pub max_connections: usize,
    /// Client bridge: how long a new connection may take to send its first complete envelope. Default 60 s.
    pub first_message_timeout: Duration,
    /// Client bridge: how long to keep asking the tracker for a circuit for a new connection. Default 30 s.
    pub circuit_timeout: Duration,
    /// Upstream service: how long the TCP connect to the upstream node may take. Default 10 s.
    pub connect_timeout: Duration,
    /// Upstream service: a circuit whose requester sends nothing but `ping`/`pong` for this long is broken
    /// (`timeout`), so that abandoned circuits do not hold the `max_connections` slots. Default 10 min.
    pub idle_timeout: Duration,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            scrub_version: true,
            max_connections: 32,
            first_message_timeout: Duration::from_secs(60),
            circuit_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Counters of one bridge (monotonic, except `active`).
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// TCP connections accepted (client bridge) or circuits accepted (upstream service).
    pub accepted: AtomicU64,
    /// Connections refused or closed before a circuit was joined: limit reached, garbage or silence
    /// before the first envelope, no circuit in time, upstream unreachable.
    pub refused: AtomicU64,
    /// Connections joined to a circuit (and running or finished).
    pub joined: AtomicU64,
    /// Joined connections still running.
    pub active: AtomicU64,
    /// Joined connections that ended because the TCP side sent something that is not a valid envelope.
    pub bad_tcp_data: AtomicU64,
    /// Joined connections that ended because the circuit delivered something that is not a valid envelope.
    pub bad_circuit_data: AtomicU64,
    /// Joined circuits broken because their requester sent nothing but `ping`/`pong` for the idle limit.
    pub idle: AtomicU64,
    /// Envelopes sent into circuits.
    pub messages_to_circuit: AtomicU64,
    /// Bytes sent into circuits (whole envelopes).
    pub bytes_to_circuit: AtomicU64,
    /// Envelopes written to TCP.
    pub messages_to_tcp: AtomicU64,
    /// Bytes written to TCP.
    pub bytes_to_tcp: AtomicU64,
    /// `version` messages whose address fields were rewritten.
    pub versions_scrubbed: AtomicU64,
}

impl BridgeStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}
