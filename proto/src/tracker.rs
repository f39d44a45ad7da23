//! The tracker protocol: messages between peers and the tracker, and the confidential channel carrying them.
//!
//! **Channel.** The peer opens TCP to the tracker and sends
//! `ClientHello = "ANOMOST1" | ver u16 | len u16 | RSA-OAEP-SHA256(tracker key, s[32]) | X25519 e_P[32]` with a
//! fresh secret `s` and ephemeral key `e_P`. The tracker answers with its own ephemeral key `e_T[32]` in clear.
//! Both sides derive, with `dh = X25519(e_P, e_T)` and `salt = SHA256("anomos tracker v1" | e_P | e_T)`:
//! `k_p2t = HKDF(salt, s | tracker_fp | dh, "p2t")` and `k_t2p = …"t2p"`. Every later message is a frame
//! `len u32 BE | AES-256-GCM(k, nonce = counter, bincode(message)) | tag`, counters per direction from 0.
//! Only the holder of the pinned tracker key learns `s`, so only it can read the peer's frames or produce
//! valid replies; the tracker's fresh `e_T` makes every session's keys new even if a ClientHello is replayed
//! (no key/nonce pair ever repeats), and `dh` gives forward secrecy.
//!
//! **Session.** The tracker's first frame is `Challenge{nonce}`; the peer's first is `Hello{public_key, signature}`
//! with an RSA-PSS signature over `"anomos tracker hello v1" | tracker_fp | nonce` (proof of key possession, bound
//! to this session). Then any number of requests, each answered by one reply.
//!
//! **Resumption.** A session outlives its connection: after `Welcome` the peer may ask for a ticket
//! (`Resumable` → `Ticket{ticket, lifetime_secs}`), and later open a new connection with
//! `ResumeHello = "ANOMOSR1" | ver u16 | ticket[16] | X25519 e_P[32]` instead of a ClientHello. The tracker answers
//! `0x00 | e_T[32]` (or `0x01` for a ticket it does not hold, and closes); both sides derive the connection's keys
//! from the session's resumption secret `rs` (an HKDF output of the full handshake that no one else can compute)
//! and a fresh X25519 exchange: `salt = SHA256("anomos tracker resume v1" | ticket | e_P | e_T)`,
//! `k_p2t = HKDF(salt, rs | tracker_fp | dh, "resume p2t")`, `k_t2p = …"resume t2p"`. No RSA on either side; the
//! first peer frame that opens proves possession of `rs` (SPEC §3.4, §10).
//!
//! **Encoding.** bincode 1.3 `DefaultOptions` (varint integers, little endian) with a byte limit of
//! [`MAX_FRAME`] and trailing bytes rejected; every decoded message is then checked by `validate()`.

use std::net::SocketAddr;

use bincode::Options;
use rand::{CryptoRng, RngCore};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::crypto::{kdf, AeadCounter, Secret, TAG_LEN};
use crate::error::{take_array, take_u16, ProtoError, Result};
use crate::identity::{Fingerprint, Identity, PublicKey, MAX_RSA_BYTES, MAX_SPKI_LEN};
use crate::ids::{ChainId, NeighborId, SessionId};
use crate::tc::{MAX_LAYERS, TC_LEN};

/// First bytes of a tracker session.
pub const TRACKER_MAGIC: [u8; 8] = *b"ANOMOST1";
/// Tracker protocol version.
pub const TRACKER_VERSION: u16 = 1;
/// Largest frame body (ciphertext + tag) either side accepts.
pub const MAX_FRAME: usize = 256 * 1024;
/// Fixed part of ClientHello before the OAEP ciphertext.
pub const CLIENT_HELLO_HEADER: usize = 12;
/// The peer's ephemeral X25519 key after the OAEP ciphertext, and the tracker's reply: 32 bytes each.
pub const EPHEMERAL_LEN: usize = 32;
/// Most neighbors in one announce reply.
pub const MAX_NEIGHBORS: usize = 32;
/// Most chains one peer announces.
pub const MAX_CHAINS: usize = 16;
/// Most family members (other peers of the same operator) one peer declares.
pub const MAX_FAMILY: usize = 32;
/// Most circuits in one request.
pub const MAX_CIRCUITS_PER_REQUEST: u8 = 16;
/// Most relays in a path (the target is one more layer).
pub const MAX_RELAYS: u8 = 6;
/// Longest free-text field.
pub const MAX_TEXT: usize = 256;
/// First bytes of a resumed tracker session (SPEC §3.4).
pub const RESUME_MAGIC: [u8; 8] = *b"ANOMOSR1";
/// Length of a session ticket's id.
pub const TICKET_LEN: usize = 16;
/// `ResumeHello`: magic, version u16 BE, ticket id, the peer's ephemeral X25519 key.
pub const RESUME_HELLO_LEN: usize = 8 + 2 + TICKET_LEN + EPHEMERAL_LEN;
/// First byte of the tracker's answer to `ResumeHello`: accepted, its ephemeral key follows.
pub const RESUME_ACCEPTED: u8 = 0;
/// First byte of the tracker's answer to `ResumeHello`: no such ticket (unknown, expired or evicted); the tracker
/// closes and the peer does a full handshake.
pub const RESUME_UNKNOWN: u8 = 1;

const SIG_HELLO: &[u8] = b"anomos tracker hello v1";
const SALT_CHANNEL: &[u8] = b"anomos tracker v1";
const SALT_RESUME: &[u8] = b"anomos tracker resume v1";

/// bincode options for every tracker message: fixed limit, no trailing bytes.
fn opts() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_FRAME as u64).reject_trailing_bytes()
}

/// Encodes a message with the protocol's bincode options.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    opts().serialize(msg).map_err(|e| ProtoError::Decode { what: "tracker message", detail: e.to_string() })
}

/// Decodes a message with the protocol's bincode options (byte limit, no trailing bytes).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    opts().deserialize(bytes).map_err(|e| ProtoError::Decode { what: "tracker message", detail: e.to_string() })
}

/// Peer → tracker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToTracker {
    /// First message of every session: the peer's key and proof of possession.
    Hello {
        /// SPKI DER.
        public_key: Vec<u8>,
        /// PSS over `"anomos tracker hello v1" | tracker_fp | challenge nonce`.
        signature: Vec<u8>,
    },
    /// Join or refresh: where the peer listens and what it serves.
    Announce(Announce),
    /// Ask for tracking codes.
    RequestCircuits(CircuitRequest),
    /// Tell the tracker something failed.
    Report(FailureReport),
    /// Ask for a session ticket, to resume this session later on a new connection without RSA (SPEC §3.4).
    Resumable,
}

/// Tracker → peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromTracker {
    /// First message of every session.
    Challenge {
        /// Fresh random nonce to sign.
        nonce: [u8; 32],
    },
    /// Reply to Hello.
    Welcome {
        /// The peer id the tracker knows it by (its fingerprint).
        peer_id: Fingerprint,
    },
    /// Reply to Announce.
    Announced(AnnounceReply),
    /// Reply to RequestCircuits.
    Circuits(CircuitReply),
    /// Reply to Report.
    Ack,
    /// The request was refused.
    Error(TrackerError),
    /// Reply to `Resumable`: the ticket that resumes this session (with the session's resumption secret, which
    /// both ends derived from the full handshake and which is never sent).
    Ticket {
        /// The ticket's id, sent in clear in `ResumeHello`.
        ticket: [u8; TICKET_LEN],
        /// The ticket expires after this many seconds without a connection using it.
        lifetime_secs: u32,
    },
}

/// Announce body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The peer's one listening address (the tracker checks it answers with the same key).
    pub listen: SocketAddr,
    /// Chains this peer serves (may be empty: a pure relay).
    pub chains: Vec<ChainId>,
    /// Fingerprints of the operator's other peers (its declared family, at most [`MAX_FAMILY`]). The tracker
    /// keeps two peers that list each other off one path (SPEC §3.10).
    pub family: Vec<Fingerprint>,
}

/// A neighbor as the tracker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighborInfo {
    /// The edge's secret id.
    pub id: NeighborId,
    /// Where the neighbor listens.
    pub addr: SocketAddr,
    /// The neighbor's SPKI DER.
    pub public_key: Vec<u8>,
}

/// Announce reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceReply {
    /// Seconds until the next announce is due.
    pub interval_secs: u32,
    /// The peer's complete current neighbor set.
    pub neighbors: Vec<NeighborInfo>,
}

/// A request for circuits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitRequest {
    /// Chain wanted.
    pub chain: ChainId,
    /// How many circuits (to distinct targets), 1..=16.
    pub count: u8,
    /// Relays per path, 1..=6.
    pub relays: u8,
}

/// One circuit handed to a requester.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitGrant {
    /// Opaque handle for failure reports.
    pub circuit: u64,
    /// The requester's own edge to the first relay.
    pub first_hop: NeighborId,
    /// The tracking code to send in OPEN (TC_LEN bytes).
    pub tc: Vec<u8>,
    /// Onion-layer secrets, first relay first, target last.
    pub hop_secrets: Vec<[u8; 32]>,
    /// End-to-end secret shared with the target.
    pub e2e_secret: [u8; 32],
    /// Session id the target sees.
    pub session: SessionId,
    /// Unix time after which the TC is refused.
    pub expires: u64,
}

impl std::fmt::Debug for CircuitGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CircuitGrant(#{}, {} hops)", self.circuit, self.hop_secrets.len())
    }
}

impl CircuitGrant {
    /// The hop secrets as [`Secret`]s.
    pub fn secrets(&self) -> Vec<Secret> {
        self.hop_secrets.iter().map(|s| Secret(*s)).collect()
    }

    /// The TC as a fixed array.
    pub fn tc_array(&self) -> Result<Box<[u8; TC_LEN]>> {
        let arr: [u8; TC_LEN] = self.tc.as_slice().try_into().map_err(|_| ProtoError::BadLength {
            what: "tracking code",
            len: self.tc.len(),
            expected: TC_LEN,
        })?;
        Ok(Box::new(arr))
    }
}

/// Reply to a circuit request (possibly fewer circuits than asked for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitReply {
    /// The circuits.
    pub circuits: Vec<CircuitGrant>,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// A neighbor did not answer or its link died.
    NeighborUnreachable,
    /// A circuit was refused (DENY reason code).
    CircuitDenied(u8),
    /// A circuit broke (BREAK reason code).
    CircuitBroken(u8),
    /// The far end sent invalid data (bad blocks).
    Misbehaving,
}

/// A failure report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    /// What happened.
    pub kind: FailureKind,
    /// The edge involved, if any.
    pub neighbor: Option<NeighborId>,
    /// The circuit handle involved, if any.
    pub circuit: Option<u64>,
    /// The replay tag of the hop that refused (from DENY), if known.
    pub hop_tag: Option<[u8; 16]>,
}

/// Why the tracker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or out-of-range request.
    BadRequest,
    /// Signature or session problem.
    Unauthenticated,
    /// The announced address did not answer with the announcing key.
    Unreachable,
    /// The tracker is at a capacity limit.
    Full,
    /// Not announced (or expired) yet.
    UnknownPeer,
    /// No path could be built.
    NoPath,
    /// The announced address (or its network) already holds as many live peers as the tracker admits.
    AddressLimit,
    /// This instance of a replicated tracker cannot serve now (it lost its connection to the shared state); a
    /// peer configured with several tracker addresses tries the next one at once (SPEC §3.8, §3.10 "Replicas").
    Unavailable,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerError {
    /// Machine-readable.
    pub code: ErrorCode,
    /// Human-readable.
    pub message: String,
}

fn invalid(what: &'static str, detail: impl Into<String>) -> ProtoError {
    ProtoError::Invalid { what, detail: detail.into() }
}

impl ToTracker {
    /// Range checks beyond what decoding enforces.
    pub fn validate(&self) -> Result<()> {
        match self {
            ToTracker::Hello { public_key, signature } => {
                if public_key.len() > MAX_SPKI_LEN || signature.len() > MAX_RSA_BYTES {
                    return Err(invalid("hello", "oversized key or signature"));
                }
            }
            ToTracker::Announce(a) => {
                if a.chains.len() > MAX_CHAINS {
                    return Err(invalid("announce", format!("{} chains (max {MAX_CHAINS})", a.chains.len())));
                }
                if a.listen.port() == 0 {
                    return Err(invalid("announce", "port 0"));
                }
                if a.family.len() > MAX_FAMILY {
                    return Err(invalid("announce", format!("{} family members (max {MAX_FAMILY})", a.family.len())));
                }
            }
            ToTracker::RequestCircuits(r) => {
                if r.count == 0 || r.count > MAX_CIRCUITS_PER_REQUEST {
                    return Err(invalid("circuit request", format!("count {}", r.count)));
                }
                if r.relays == 0 || r.relays > MAX_RELAYS {
                    return Err(invalid("circuit request", format!("relays {} (1..={MAX_RELAYS})", r.relays)));
                }
            }
            ToTracker::Report(_) | ToTracker::Resumable => {}
        }
        Ok(())
    }
}

impl FromTracker {
    /// Range checks beyond what decoding enforces.
    pub fn validate(&self) -> Result<()> {
        match self {
            FromTracker::Announced(a) => {
                if a.neighbors.len() > MAX_NEIGHBORS {
                    return Err(invalid("announce reply", format!("{} neighbors", a.neighbors.len())));
                }
                if a.neighbors.iter().any(|n| n.public_key.len() > MAX_SPKI_LEN || n.id.0 == 0) {
                    return Err(invalid("announce reply", "bad neighbor entry"));
                }
            }
            FromTracker::Circuits(c) => {
                if c.circuits.len() > MAX_CIRCUITS_PER_REQUEST as usize {
                    return Err(invalid("circuit reply", format!("{} circuits", c.circuits.len())));
                }
                for g in &c.circuits {
                    if g.tc.len() != TC_LEN || g.hop_secrets.is_empty() || g.hop_secrets.len() > MAX_LAYERS {
                        return Err(invalid("circuit reply", "bad grant"));
                    }
                }
            }
            FromTracker::Error(e) if e.message.len() > MAX_TEXT => {
                return Err(invalid("tracker error", "message too long"));
            }
            _ => {}
        }
        Ok(())
    }
}

mod channel;
pub use channel::*;
mod channel_v2;
pub use channel_v2::*;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_v2;
