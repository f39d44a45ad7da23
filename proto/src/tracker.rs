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

/// One end of the tracker channel.
pub struct TrackerChannel {
    send: AeadCounter,
    recv: AeadCounter,
    resumption: Secret,
}

/// The keys of one connection: (p2t, t2p, the session's resumption secret).
type Keys = (Secret, Secret, Secret);

/// A full handshake's keys: `HKDF(SHA256("anomos tracker v1" | e_P | e_T), s | tracker_fp | dh, info)` with
/// info `"p2t"`, `"t2p"` and `"resume"` (the session's resumption secret).
fn channel_keys(s: &[u8; 32], tracker_fp: &Fingerprint, e_p: &[u8; 32], e_t: &[u8; 32], dh: &[u8; 32]) -> Keys {
    let salt = crate::crypto::sha256(&[SALT_CHANNEL, e_p, e_t]);
    let ikm: [&[u8]; 3] = [s, &tracker_fp.0, dh];
    (kdf(&salt, &ikm, b"p2t"), kdf(&salt, &ikm, b"t2p"), kdf(&salt, &ikm, b"resume"))
}

/// A resumed connection's keys: `HKDF(SHA256("anomos tracker resume v1" | ticket | e_P | e_T), rs | tracker_fp |
/// dh, info)` with info `"resume p2t"` and `"resume t2p"`; the resumption secret stays the session's.
fn resume_keys(
    rs: &Secret,
    ticket: &[u8; TICKET_LEN],
    tracker_fp: &Fingerprint,
    e_p: &[u8; 32],
    e_t: &[u8; 32],
    dh: &[u8; 32],
) -> Keys {
    let salt = crate::crypto::sha256(&[SALT_RESUME, ticket, e_p, e_t]);
    let ikm: [&[u8]; 3] = [&rs.0, &tracker_fp.0, dh];
    (kdf(&salt, &ikm, b"resume p2t"), kdf(&salt, &ikm, b"resume t2p"), rs.clone())
}

/// What a peer keeps to resume its session: the ticket's id (from `FromTracker::Ticket`) and the session's
/// resumption secret (from [`TrackerChannel::resumption_secret`]).
#[derive(Clone, Debug)]
pub struct Ticket {
    /// The id the tracker issued.
    pub id: [u8; TICKET_LEN],
    /// The session's resumption secret.
    pub secret: Secret,
}

/// An ephemeral X25519 secret and its public key. X25519 runs in AWS-LC: at a tracker serving 100,000 peers
/// every resumed connection costs two X25519 operations, and AWS-LC's are about 2.4× faster than the pure-Rust
/// backend's (measured here: 74 vs 175 µs for a key and a shared secret). The function is the same (RFC 7748,
/// clamping included), so the bytes on the wire and the vectors of Appendix A are unchanged.
struct Ephemeral {
    secret: aws_lc_rs::agreement::PrivateKey,
    public: [u8; 32],
}

/// An X25519 secret from the first 32 bytes the rng yields (drawn before anything else, so a seeded rng
/// makes the known-answer vectors reproducible whatever the RSA code does with its randomness).
fn x25519_secret(rng: &mut (impl RngCore + CryptoRng)) -> Result<Ephemeral> {
    use aws_lc_rs::agreement::{PrivateKey, X25519};
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    let bad = |_| ProtoError::Invalid { what: "X25519 key", detail: "refused by AWS-LC".into() };
    let secret = PrivateKey::from_private_key(&X25519, &b).map_err(|_| bad(()))?;
    let public = secret.compute_public_key().map_err(|_| bad(()))?;
    let public: [u8; 32] = public.as_ref().try_into().map_err(|_| bad(()))?;
    Ok(Ephemeral { secret, public })
}

/// The shared secret; an all-zero result (a low-order share from the other side) is refused: the exchange
/// must be contributory (§1.2).
fn x25519(eph: Ephemeral, peer: &[u8; 32]) -> Result<[u8; 32]> {
    use aws_lc_rs::agreement::{agree, UnparsedPublicKey, X25519};
    let low = || ProtoError::Invalid { what: "X25519 share", detail: "low-order point".into() };
    let dh: [u8; 32] =
        agree(&eph.secret, UnparsedPublicKey::new(&X25519, peer), low(), |k| k.try_into().map_err(|_| low()))?;
    if dh == [0u8; 32] {
        return Err(low());
    }
    Ok(dh)
}

/// The peer's side of the channel set-up, between sending ClientHello and reading the tracker's key.
pub struct ClientHandshake {
    s: [u8; 32],
    eph: Ephemeral,
    e_p: [u8; 32],
    tracker_fp: Fingerprint,
}

impl ClientHandshake {
    /// Completes the channel with the tracker's 32-byte ephemeral key.
    pub fn finish(self, server_hello: &[u8]) -> Result<TrackerChannel> {
        let e_t: [u8; 32] = server_hello.try_into().map_err(|_| ProtoError::BadLength {
            what: "tracker ephemeral key",
            len: server_hello.len(),
            expected: EPHEMERAL_LEN,
        })?;
        let dh = x25519(self.eph, &e_t)?;
        let (p2t, t2p, resumption) = channel_keys(&self.s, &self.tracker_fp, &self.e_p, &e_t, &dh);
        Ok(TrackerChannel { send: AeadCounter::new(&p2t), recv: AeadCounter::new(&t2p), resumption })
    }
}

/// The peer's side of a resumption, between sending `ResumeHello` and reading the tracker's answer.
pub struct ResumeHandshake {
    ticket: Ticket,
    eph: Ephemeral,
    e_p: [u8; 32],
    tracker_fp: Fingerprint,
}

/// The tracker's answer to a `ResumeHello`, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeAnswer {
    /// Accepted: [`EPHEMERAL_LEN`] bytes of the tracker's ephemeral key follow.
    Accepted,
    /// The tracker does not hold the ticket: do a full handshake (and forget the ticket).
    Unknown,
}

impl ResumeAnswer {
    /// Parses the first byte of the answer.
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            RESUME_ACCEPTED => Ok(ResumeAnswer::Accepted),
            RESUME_UNKNOWN => Ok(ResumeAnswer::Unknown),
            other => Err(invalid("resume answer", format!("status {other}"))),
        }
    }
}

impl ResumeHandshake {
    /// Completes the resumed channel with the tracker's 32-byte ephemeral key (the bytes after
    /// [`RESUME_ACCEPTED`]).
    pub fn finish(self, e_t: &[u8]) -> Result<TrackerChannel> {
        let e_t: [u8; 32] = e_t.try_into().map_err(|_| ProtoError::BadLength {
            what: "tracker ephemeral key",
            len: e_t.len(),
            expected: EPHEMERAL_LEN,
        })?;
        let dh = x25519(self.eph, &e_t)?;
        let (p2t, t2p, resumption) =
            resume_keys(&self.ticket.secret, &self.ticket.id, &self.tracker_fp, &self.e_p, &e_t, &dh);
        Ok(TrackerChannel { send: AeadCounter::new(&p2t), recv: AeadCounter::new(&t2p), resumption })
    }
}

impl TrackerChannel {
    /// Peer side: the ClientHello to send, and the handshake to finish with the tracker's reply.
    pub fn connect<R: RngCore + CryptoRng>(rng: &mut R, tracker: &PublicKey) -> Result<(Vec<u8>, ClientHandshake)> {
        // Randomness order: ephemeral secret (32 bytes), channel secret (32 bytes), then OAEP.
        let eph = x25519_secret(rng)?;
        let e_p = eph.public;
        let mut s = [0u8; 32];
        rng.fill_bytes(&mut s);
        let ct = tracker.encrypt(rng, &s)?;
        let mut hello = Vec::with_capacity(CLIENT_HELLO_HEADER + ct.len() + EPHEMERAL_LEN);
        hello.extend_from_slice(&TRACKER_MAGIC);
        hello.extend_from_slice(&TRACKER_VERSION.to_be_bytes());
        hello.extend_from_slice(&(ct.len() as u16).to_be_bytes());
        hello.extend_from_slice(&ct);
        hello.extend_from_slice(&e_p);
        Ok((hello, ClientHandshake { s, eph, e_p, tracker_fp: tracker.fingerprint() }))
    }

    /// Tracker side: parses the 12-byte ClientHello header; returns the length of the OAEP ciphertext. The
    /// rest of the ClientHello is that many bytes plus [`EPHEMERAL_LEN`].
    pub fn hello_ct_len(header: &[u8]) -> Result<usize> {
        let mut p = header;
        let magic: [u8; 8] = take_array(&mut p, "tracker hello magic")?;
        if magic != TRACKER_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let ver = take_u16(&mut p, "tracker hello version")?;
        if ver != TRACKER_VERSION {
            return Err(ProtoError::BadVersion(ver));
        }
        let len = take_u16(&mut p, "tracker hello length")? as usize;
        if len > MAX_RSA_BYTES {
            return Err(ProtoError::TooLarge { what: "tracker hello", len, limit: MAX_RSA_BYTES });
        }
        Ok(len)
    }

    /// Tracker side: opens the rest of a ClientHello (OAEP ciphertext, then the peer's ephemeral key).
    /// Returns the 32-byte reply to send (our ephemeral key) and the channel.
    pub fn accept<R: RngCore + CryptoRng>(rng: &mut R, tracker: &Identity, rest: &[u8]) -> Result<([u8; 32], Self)> {
        if rest.len() < EPHEMERAL_LEN {
            return Err(ProtoError::Truncated { what: "tracker hello", need: EPHEMERAL_LEN, have: rest.len() });
        }
        let (ct, e_p) = rest.split_at(rest.len() - EPHEMERAL_LEN);
        let mut e_p_arr = [0u8; 32];
        e_p_arr.copy_from_slice(e_p);
        // Randomness: our ephemeral secret (32 bytes) only; the OAEP decryption blinds with AWS-LC's own RNG.
        let eph = x25519_secret(rng)?;
        let s = tracker.decrypt(ct, "tracker hello")?;
        let s: [u8; 32] = s.as_slice().try_into().map_err(|_| ProtoError::BadLength {
            what: "tracker hello secret",
            len: s.len(),
            expected: 32,
        })?;
        let e_t = eph.public;
        let dh = x25519(eph, &e_p_arr)?;
        let (p2t, t2p, resumption) = channel_keys(&s, &tracker.fingerprint(), &e_p_arr, &e_t, &dh);
        Ok((e_t, TrackerChannel { send: AeadCounter::new(&t2p), recv: AeadCounter::new(&p2t), resumption }))
    }

    /// The session's resumption secret (both ends derive it; it is never sent). With the id of a ticket the
    /// tracker issued for this session it makes a [`Ticket`].
    pub fn resumption_secret(&self) -> &Secret {
        &self.resumption
    }

    /// Peer side: the `ResumeHello` that resumes the session of `ticket`, and the handshake to finish with the
    /// tracker's answer. Randomness: the 32-byte X25519 secret only.
    pub fn resume<R: RngCore + CryptoRng>(
        rng: &mut R,
        tracker_fp: &Fingerprint,
        ticket: &Ticket,
    ) -> Result<(Vec<u8>, ResumeHandshake)> {
        let eph = x25519_secret(rng)?;
        let e_p = eph.public;
        let mut hello = Vec::with_capacity(RESUME_HELLO_LEN);
        hello.extend_from_slice(&RESUME_MAGIC);
        hello.extend_from_slice(&TRACKER_VERSION.to_be_bytes());
        hello.extend_from_slice(&ticket.id);
        hello.extend_from_slice(&e_p);
        Ok((hello, ResumeHandshake { ticket: ticket.clone(), eph, e_p, tracker_fp: *tracker_fp }))
    }

    /// Tracker side: parses a complete `ResumeHello`: the ticket id and the peer's ephemeral key.
    pub fn resume_hello(hello: &[u8]) -> Result<([u8; TICKET_LEN], [u8; EPHEMERAL_LEN])> {
        if hello.len() != RESUME_HELLO_LEN {
            return Err(ProtoError::BadLength { what: "resume hello", len: hello.len(), expected: RESUME_HELLO_LEN });
        }
        let mut p = hello;
        let magic: [u8; 8] = take_array(&mut p, "resume hello magic")?;
        if magic != RESUME_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let ver = take_u16(&mut p, "resume hello version")?;
        if ver != TRACKER_VERSION {
            return Err(ProtoError::BadVersion(ver));
        }
        let ticket: [u8; TICKET_LEN] = take_array(&mut p, "resume hello ticket")?;
        let e_p: [u8; EPHEMERAL_LEN] = take_array(&mut p, "resume hello key")?;
        Ok((ticket, e_p))
    }

    /// Tracker side: resumes the session whose ticket `ticket` holds `secret`, for a peer whose ephemeral key is
    /// `e_p`. Returns the answer to send (`RESUME_ACCEPTED | e_T`) and the channel. Randomness: the 32-byte X25519
    /// secret only. The peer has proved nothing yet: the connection is authenticated once its first frame opens.
    pub fn accept_resume<R: RngCore + CryptoRng>(
        rng: &mut R,
        tracker_fp: &Fingerprint,
        ticket: &[u8; TICKET_LEN],
        secret: &Secret,
        e_p: &[u8; EPHEMERAL_LEN],
    ) -> Result<([u8; 1 + EPHEMERAL_LEN], Self)> {
        let eph = x25519_secret(rng)?;
        let e_t = eph.public;
        let dh = x25519(eph, e_p)?;
        let (p2t, t2p, resumption) = resume_keys(secret, ticket, tracker_fp, e_p, &e_t, &dh);
        let mut answer = [RESUME_ACCEPTED; 1 + EPHEMERAL_LEN];
        if let Some(k) = answer.get_mut(1..) {
            k.copy_from_slice(&e_t);
        }
        Ok((answer, TrackerChannel { send: AeadCounter::new(&t2p), recv: AeadCounter::new(&p2t), resumption }))
    }

    /// Seals a message into a complete frame (length prefix included).
    pub fn seal<T: Serialize>(&mut self, msg: &T) -> Result<Vec<u8>> {
        let body = encode(msg)?;
        if body.len() + TAG_LEN > MAX_FRAME {
            return Err(ProtoError::TooLarge { what: "tracker frame", len: body.len() + TAG_LEN, limit: MAX_FRAME });
        }
        let sealed = self.send.seal(b"", &body)?;
        let mut out = Vec::with_capacity(4 + sealed.len());
        out.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Checks a frame's 4-byte length prefix before its body is read.
    pub fn frame_len(prefix: [u8; 4]) -> Result<usize> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge { what: "tracker frame", len, limit: MAX_FRAME });
        }
        if len < TAG_LEN {
            return Err(ProtoError::Truncated { what: "tracker frame", need: TAG_LEN, have: len });
        }
        Ok(len)
    }

    /// Opens a frame body (after the length prefix) and decodes it.
    pub fn open<T: DeserializeOwned>(&mut self, body: &[u8]) -> Result<T> {
        let pt = self.recv.open(b"", body, "tracker frame")?;
        decode(&pt)
    }
}

/// The message a peer signs in Hello.
pub fn hello_signed_bytes(tracker_fp: &Fingerprint, nonce: &[u8; 32]) -> Vec<u8> {
    [SIG_HELLO, &tracker_fp.0, nonce].concat()
}

/// Peer side: builds Hello for a challenge.
pub fn make_hello<R: RngCore + CryptoRng>(
    me: &Identity,
    tracker_fp: &Fingerprint,
    nonce: &[u8; 32],
    rng: &mut R,
) -> ToTracker {
    ToTracker::Hello {
        public_key: me.public().der().to_vec(),
        signature: me.sign(rng, &hello_signed_bytes(tracker_fp, nonce)),
    }
}

/// Tracker side: verifies a Hello; returns the peer's key.
pub fn verify_hello(
    public_key: &[u8],
    signature: &[u8],
    tracker_fp: &Fingerprint,
    nonce: &[u8; 32],
) -> Result<PublicKey> {
    let key = PublicKey::from_der(public_key)?;
    key.verify(&hello_signed_bytes(tracker_fp, nonce), signature, "tracker hello")?;
    Ok(key)
}

/// First bytes of a key fetch: a peer that pins the tracker by fingerprint asks for the full public key
/// (needed for OAEP), then checks it against the pin. The answer is `len u16 BE | SPKI DER`.
pub const KEY_FETCH_MAGIC: [u8; 8] = *b"ANOMOSK1";

/// Tracker side: the answer to a key fetch.
pub fn encode_key_answer(key: &PublicKey) -> Vec<u8> {
    let der = key.der();
    let mut out = Vec::with_capacity(2 + der.len());
    out.extend_from_slice(&(der.len() as u16).to_be_bytes());
    out.extend_from_slice(der);
    out
}

/// Peer side: checks the 2-byte length of a key answer before reading the DER.
pub fn key_answer_len(prefix: [u8; 2]) -> Result<usize> {
    let len = u16::from_be_bytes(prefix) as usize;
    if len > MAX_SPKI_LEN {
        return Err(ProtoError::TooLarge { what: "tracker key", len, limit: MAX_SPKI_LEN });
    }
    Ok(len)
}

/// Peer side: parses the fetched key and requires it to match the pinned fingerprint.
pub fn check_fetched_key(der: &[u8], pinned: &Fingerprint) -> Result<PublicKey> {
    let key = PublicKey::from_der(der)?;
    if &key.fingerprint() != pinned {
        return Err(ProtoError::Invalid {
            what: "tracker key",
            detail: format!("fingerprint {} does not match the pinned {}", key.fingerprint(), pinned),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// A full handshake between a fresh tracker identity and a peer; returns both channels.
    fn full(tracker: &Identity) -> (TrackerChannel, TrackerChannel) {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (hello, hs) = TrackerChannel::connect(&mut rng, tracker.public()).unwrap();
        let (e_t, t) = TrackerChannel::accept(&mut rng, tracker, &hello[CLIENT_HELLO_HEADER..]).unwrap();
        (hs.finish(&e_t).unwrap(), t)
    }

    fn tracker_identity() -> Identity {
        Identity::generate(&mut ChaCha20Rng::seed_from_u64(7), 2048).unwrap()
    }

    /// Seals `msg` on one end and opens it on the other.
    fn pass(from: &mut TrackerChannel, to: &mut TrackerChannel, msg: &ToTracker) -> Result<ToTracker> {
        let frame = from.seal(msg)?;
        to.open(&frame[4..])
    }

    #[test]
    fn a_session_resumes_on_a_new_connection_with_new_keys_and_no_rsa() {
        let tracker = tracker_identity();
        let fp = tracker.fingerprint();
        let (peer, trk) = full(&tracker);
        assert_eq!(peer.resumption_secret(), trk.resumption_secret(), "both ends derive the resumption secret");
        let ticket = Ticket { id: [9; TICKET_LEN], secret: peer.resumption_secret().clone() };
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (hello, hs) = TrackerChannel::resume(&mut rng, &fp, &ticket).unwrap();
        assert_eq!(hello.len(), RESUME_HELLO_LEN);
        let (id, e_p) = TrackerChannel::resume_hello(&hello).unwrap();
        assert_eq!(id, ticket.id);
        let (answer, mut t) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
        assert_eq!(ResumeAnswer::from_byte(answer[0]).unwrap(), ResumeAnswer::Accepted);
        let mut p = hs.finish(&answer[1..]).unwrap();
        assert_eq!(pass(&mut p, &mut t, &ToTracker::Resumable).unwrap(), ToTracker::Resumable);
        let reply = t.seal(&FromTracker::Ack).unwrap();
        assert_eq!(p.open::<FromTracker>(&reply[4..]).unwrap(), FromTracker::Ack);
        assert_eq!(p.resumption_secret(), trk.resumption_secret(), "the session's secret carries over");
        // The resumed keys differ from the full handshake's: a frame of one does not open under the other.
        let (mut p0, _) = full(&tracker);
        let mut t2 = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap().1;
        assert!(pass(&mut p0, &mut t2, &ToTracker::Resumable).is_err());
    }

    #[test]
    fn a_replayed_or_forged_resume_hello_yields_keys_only_the_ticket_holder_has() {
        let tracker = tracker_identity();
        let fp = tracker.fingerprint();
        let (peer, trk) = full(&tracker);
        let ticket = Ticket { id: [3; TICKET_LEN], secret: peer.resumption_secret().clone() };
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (hello, hs) = TrackerChannel::resume(&mut rng, &fp, &ticket).unwrap();
        let (id, e_p) = TrackerChannel::resume_hello(&hello).unwrap();
        let (a1, mut t1) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
        // Replay: the tracker's fresh e_T gives new keys, so the recorded connection's frames do not open.
        let (a2, mut t2) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
        assert_ne!(a1, a2, "a fresh tracker share per connection");
        let mut p = hs.finish(&a1[1..]).unwrap();
        let recorded = p.seal(&ToTracker::Resumable).unwrap();
        assert!(t2.open::<ToTracker>(&recorded[4..]).is_err(), "a replayed first frame does not open");
        assert_eq!(t1.open::<ToTracker>(&recorded[4..]).unwrap(), ToTracker::Resumable);
        // Someone who knows the ticket id (it is sent in clear) but not the secret cannot make a frame that opens.
        let thief = Ticket { id: ticket.id, secret: Secret([0; 32]) };
        let (h, hs) = TrackerChannel::resume(&mut rng, &fp, &thief).unwrap();
        let (id, e_p) = TrackerChannel::resume_hello(&h).unwrap();
        let (a, mut t) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
        let mut forged = hs.finish(&a[1..]).unwrap();
        assert!(pass(&mut forged, &mut t, &ToTracker::Resumable).is_err());
        // Another tracker key (fingerprint) gives other keys too.
        let other = Fingerprint([1; 32]);
        let (h, hs) = TrackerChannel::resume(&mut rng, &other, &ticket).unwrap();
        let (id, e_p) = TrackerChannel::resume_hello(&h).unwrap();
        let (a, mut t) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
        let mut wrong = hs.finish(&a[1..]).unwrap();
        assert!(pass(&mut wrong, &mut t, &ToTracker::Resumable).is_err());
    }

    #[test]
    fn resume_hellos_and_answers_are_checked() {
        let ticket = Ticket { id: [1; TICKET_LEN], secret: Secret([2; 32]) };
        let fp = Fingerprint([4; 32]);
        let (hello, _) = TrackerChannel::resume(&mut ChaCha20Rng::seed_from_u64(3), &fp, &ticket).unwrap();
        assert!(TrackerChannel::resume_hello(&hello[..RESUME_HELLO_LEN - 1]).is_err(), "short");
        let mut bad = hello.clone();
        bad[0] = b'X';
        assert!(matches!(TrackerChannel::resume_hello(&bad), Err(ProtoError::BadMagic(_))));
        let mut bad = hello.clone();
        bad[9] = 2;
        assert!(matches!(TrackerChannel::resume_hello(&bad), Err(ProtoError::BadVersion(2))));
        // A low-order share is refused (contributory check), as in the full handshake.
        let (id, _) = TrackerChannel::resume_hello(&hello).unwrap();
        let low = [0u8; 32];
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        assert!(TrackerChannel::accept_resume(&mut rng, &fp, &id, &ticket.secret, &low).is_err());
        assert_eq!(ResumeAnswer::from_byte(1).unwrap(), ResumeAnswer::Unknown);
        assert!(ResumeAnswer::from_byte(2).is_err());
        // The new messages round-trip.
        let t = FromTracker::Ticket { ticket: [5; TICKET_LEN], lifetime_secs: 90 };
        assert_eq!(decode::<FromTracker>(&encode(&t).unwrap()).unwrap(), t);
        assert_eq!(decode::<ToTracker>(&encode(&ToTracker::Resumable).unwrap()).unwrap(), ToTracker::Resumable);
        assert_eq!(encode(&ToTracker::Resumable).unwrap(), vec![4]);
    }
}
