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

const SIG_HELLO: &[u8] = b"anomos tracker hello v1";

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
            ToTracker::Report(_) => {}
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
}

fn channel_keys(
    s: &[u8; 32],
    tracker_fp: &Fingerprint,
    e_p: &[u8; 32],
    e_t: &[u8; 32],
    dh: &[u8; 32],
) -> (Secret, Secret) {
    let salt = crate::crypto::sha256(&[b"anomos tracker v1", e_p, e_t]);
    (kdf(&salt, &[s, &tracker_fp.0, dh], b"p2t"), kdf(&salt, &[s, &tracker_fp.0, dh], b"t2p"))
}

/// An X25519 secret from the first 32 bytes the rng yields (drawn before anything else, so a seeded rng
/// makes the known-answer vectors reproducible whatever the RSA code does with its randomness).
fn x25519_secret(rng: &mut (impl RngCore + CryptoRng)) -> x25519_dalek::StaticSecret {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    x25519_dalek::StaticSecret::from(b)
}

fn x25519(secret: x25519_dalek::StaticSecret, peer: &[u8; 32]) -> Result<[u8; 32]> {
    let ss = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
    if !ss.was_contributory() {
        return Err(ProtoError::Invalid { what: "X25519 share", detail: "low-order point".into() });
    }
    Ok(*ss.as_bytes())
}

/// The peer's side of the channel set-up, between sending ClientHello and reading the tracker's key.
pub struct ClientHandshake {
    s: [u8; 32],
    eph: x25519_dalek::StaticSecret,
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
        let (p2t, t2p) = channel_keys(&self.s, &self.tracker_fp, &self.e_p, &e_t, &dh);
        Ok(TrackerChannel { send: AeadCounter::new(&p2t), recv: AeadCounter::new(&t2p) })
    }
}

impl TrackerChannel {
    /// Peer side: the ClientHello to send, and the handshake to finish with the tracker's reply.
    pub fn connect<R: RngCore + CryptoRng>(rng: &mut R, tracker: &PublicKey) -> Result<(Vec<u8>, ClientHandshake)> {
        // Randomness order: ephemeral secret (32 bytes), channel secret (32 bytes), then OAEP.
        let eph = x25519_secret(rng);
        let e_p = *x25519_dalek::PublicKey::from(&eph).as_bytes();
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
        let eph = x25519_secret(rng);
        let s = tracker.decrypt(ct, "tracker hello")?;
        let s: [u8; 32] = s.as_slice().try_into().map_err(|_| ProtoError::BadLength {
            what: "tracker hello secret",
            len: s.len(),
            expected: 32,
        })?;
        let e_t = *x25519_dalek::PublicKey::from(&eph).as_bytes();
        let dh = x25519(eph, &e_p_arr)?;
        let (p2t, t2p) = channel_keys(&s, &tracker.fingerprint(), &e_p_arr, &e_t, &dh);
        Ok((e_t, TrackerChannel { send: AeadCounter::new(&t2p), recv: AeadCounter::new(&p2t) }))
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
