//! Circuit cryptography: per-hop onion layers on DATA payloads, and the end-to-end session between the
//! requester and the target.
//!
//! **Onion layers.** Each hop i (relays and the target) has `hop_secret_i` from its TC layer; the requester has
//! all of them. `fwd_i = HKDF(salt="anomos hop v1", hop_secret_i, "fwd")`, `bwd_i = …"bwd"`. A DATA payload
//! travelling toward the target is XORed by the requester with the AES-256-CTR keystreams of every `fwd_i` for
//! the circuit's forward cell index `c`; hop i strips its own. Backward, every hop adds its `bwd_i` layer and the
//! requester strips all. Counters are per circuit and direction, advance by one per DATA cell, and stay in step
//! because cells of a circuit are delivered in order. So the payload bytes a relay receives and sends for one
//! cell differ everywhere (they differ by a keystream only that relay and the requester know).
//!
//! **End-to-end.** Inside the onion, every DATA payload is one sealed record (AES-256-GCM, counter nonce):
//! `record = type u8 | len u16 | data[len] | zero fill` (RECORD_LEN = 4096 bytes) followed by the 16-byte tag.
//! The first record each way is HELLO with an ephemeral X25519 key, sealed under keys from the tracker-issued
//! `e2e_secret`; all later records use `HKDF(salt=SHA256(pub_R|pub_T), e2e_secret | X25519, "data r2t"/"data t2r")`.
//! The tracker, which issued `e2e_secret`, cannot read the traffic without also actively substituting HELLOs.

use rand::{CryptoRng, RngCore};
use x25519_dalek::{EphemeralSecret, PublicKey as XPublic};

use crate::cell::CELL_PAYLOAD_LEN;
use crate::crypto::{kdf, sha256, AeadCounter, CtrLayer, Secret, TAG_LEN};
use crate::error::{ProtoError, Result};

/// Plaintext bytes of one end-to-end record.
pub const RECORD_LEN: usize = CELL_PAYLOAD_LEN - TAG_LEN;
/// Data bytes one record carries.
pub const RECORD_DATA_MAX: usize = RECORD_LEN - 3;
/// Largest message a circuit carries (a Bitcoin envelope of 24 + 4,000,000 bytes fits).
pub const MAX_MESSAGE: usize = 4_000_024;

const HOP_SALT: &[u8] = b"anomos hop v1";
const E2E_SALT: &[u8] = b"anomos e2e v1";

/// The keys of one hop's onion layer.
#[derive(Clone)]
pub struct HopKeys {
    fwd: CtrLayer,
    bwd: CtrLayer,
}

impl HopKeys {
    /// Derives both directions from a hop secret.
    pub fn derive(hop_secret: &Secret) -> Self {
        HopKeys {
            fwd: CtrLayer::new(&kdf(HOP_SALT, &[&hop_secret.0], b"fwd")),
            bwd: CtrLayer::new(&kdf(HOP_SALT, &[&hop_secret.0], b"bwd")),
        }
    }
}

/// One hop's view of a circuit: its layer and the two cell counters.
pub struct HopLayer {
    keys: HopKeys,
    fwd_index: u64,
    bwd_index: u64,
}

impl HopLayer {
    /// From the hop secret in the TC layer.
    pub fn new(hop_secret: &Secret) -> Self {
        HopLayer { keys: HopKeys::derive(hop_secret), fwd_index: 0, bwd_index: 0 }
    }

    /// Strips this hop's layer from a DATA payload travelling toward the target.
    pub fn forward(&mut self, payload: &mut [u8]) {
        self.keys.fwd.apply(self.fwd_index, payload);
        self.fwd_index += 1;
    }

    /// Adds this hop's layer to a DATA payload travelling toward the requester.
    pub fn backward(&mut self, payload: &mut [u8]) {
        self.keys.bwd.apply(self.bwd_index, payload);
        self.bwd_index += 1;
    }
}

/// The requester's view: every hop's layer, first hop first.
pub struct OnionStack {
    hops: Vec<HopKeys>,
    fwd_index: u64,
    bwd_index: u64,
}

impl OnionStack {
    /// From the hop secrets the tracker returned (first hop first, target last).
    pub fn new(hop_secrets: &[Secret]) -> Self {
        OnionStack { hops: hop_secrets.iter().map(HopKeys::derive).collect(), fwd_index: 0, bwd_index: 0 }
    }

    /// Number of layers (relays + target).
    pub fn len(&self) -> usize {
        self.hops.len()
    }

    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.hops.is_empty()
    }

    /// Applies every forward layer to an outgoing DATA payload.
    pub fn wrap_forward(&mut self, payload: &mut [u8]) {
        for h in &self.hops {
            h.fwd.apply(self.fwd_index, payload);
        }
        self.fwd_index += 1;
    }

    /// Removes every backward layer from an incoming DATA payload.
    pub fn unwrap_backward(&mut self, payload: &mut [u8]) {
        for h in &self.hops {
            h.bwd.apply(self.bwd_index, payload);
        }
        self.bwd_index += 1;
    }
}

/// Record types inside the end-to-end session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    /// Ephemeral X25519 key (32 bytes).
    Hello = 1,
    /// A fragment of a message; more follow.
    Part = 2,
    /// The last (or only) fragment of a message.
    End = 3,
    /// The sender will send nothing more (graceful close).
    Close = 4,
}

impl RecordType {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => RecordType::Hello,
            2 => RecordType::Part,
            3 => RecordType::End,
            4 => RecordType::Close,
            _ => return Err(ProtoError::Invalid { what: "record type", detail: b.to_string() }),
        })
    }
}

/// Which end of the circuit we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Asked the tracker for the circuit.
    Requester,
    /// Serves the chain at the far end.
    Target,
}

// Bounds: `out` is a `[u8; CELL_PAYLOAD_LEN]`; `data.len() <= RECORD_DATA_MAX` is checked first, so
// `3 + data.len() <= RECORD_LEN < CELL_PAYLOAD_LEN`.
#[allow(clippy::indexing_slicing)]
fn seal_record(ch: &mut AeadCounter, kind: RecordType, data: &[u8], out: &mut [u8; CELL_PAYLOAD_LEN]) -> Result<()> {
    if data.len() > RECORD_DATA_MAX {
        return Err(ProtoError::TooLarge { what: "record data", len: data.len(), limit: RECORD_DATA_MAX });
    }
    out.fill(0);
    out[0] = kind as u8;
    out[1..3].copy_from_slice(&(data.len() as u16).to_be_bytes());
    out[3..3 + data.len()].copy_from_slice(data);
    let (body, tag) = out.split_at_mut(RECORD_LEN);
    let t = ch.seal_in_place(b"", body)?;
    tag.copy_from_slice(&t);
    Ok(())
}

// Bounds: `body` is the first RECORD_LEN bytes of the payload; indices 0..3 are constants and
// `3 + len <= 3 + RECORD_DATA_MAX == RECORD_LEN` after the length check.
#[allow(clippy::indexing_slicing)]
fn open_record<'a>(ch: &mut AeadCounter, payload: &'a mut [u8; CELL_PAYLOAD_LEN]) -> Result<(RecordType, &'a [u8])> {
    let (body, tag) = payload.split_at_mut(RECORD_LEN);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag);
    ch.open_in_place(b"", body, &t, "end-to-end record")?;
    let kind = RecordType::from_u8(body[0])?;
    let len = u16::from_be_bytes([body[1], body[2]]) as usize;
    if len > RECORD_DATA_MAX {
        return Err(ProtoError::TooLarge { what: "record length", len, limit: RECORD_DATA_MAX });
    }
    Ok((kind, &body[3..3 + len]))
}

/// The end-to-end handshake in progress (our HELLO sent, theirs awaited).
pub struct E2eHandshake {
    role: Role,
    e2e_secret: Secret,
    eph: EphemeralSecret,
    my_pub: [u8; 32],
}

impl E2eHandshake {
    /// Starts the handshake; writes our sealed HELLO record into `out` (the DATA payload before onion layers).
    pub fn start<R: RngCore + CryptoRng>(
        role: Role,
        e2e_secret: &Secret,
        rng: &mut R,
        out: &mut [u8; CELL_PAYLOAD_LEN],
    ) -> Result<Self> {
        let eph = EphemeralSecret::random_from_rng(&mut *rng);
        let my_pub = *XPublic::from(&eph).as_bytes();
        let mut ch = AeadCounter::new(&hello_key(e2e_secret, role));
        seal_record(&mut ch, RecordType::Hello, &my_pub, out)?;
        Ok(E2eHandshake { role, e2e_secret: e2e_secret.clone(), eph, my_pub })
    }

    /// Opens the other side's HELLO and derives the session.
    pub fn finish(self, payload: &mut [u8; CELL_PAYLOAD_LEN]) -> Result<E2eSession> {
        let other = match self.role {
            Role::Requester => Role::Target,
            Role::Target => Role::Requester,
        };
        let mut ch = AeadCounter::new(&hello_key(&self.e2e_secret, other));
        let (kind, data) = open_record(&mut ch, payload)?;
        if kind != RecordType::Hello || data.len() != 32 {
            return Err(ProtoError::Unexpected("record other than HELLO at circuit start"));
        }
        let mut their = [0u8; 32];
        their.copy_from_slice(data);
        let ss = self.eph.diffie_hellman(&XPublic::from(their));
        if !ss.was_contributory() {
            return Err(ProtoError::Invalid { what: "X25519 share", detail: "low-order point".into() });
        }
        let (pub_r, pub_t) = match self.role {
            Role::Requester => (self.my_pub, their),
            Role::Target => (their, self.my_pub),
        };
        let salt = sha256(&[&pub_r, &pub_t]);
        let r2t = kdf(&salt, &[&self.e2e_secret.0, ss.as_bytes()], b"data r2t");
        let t2r = kdf(&salt, &[&self.e2e_secret.0, ss.as_bytes()], b"data t2r");
        let (send, recv) = match self.role {
            Role::Requester => (r2t, t2r),
            Role::Target => (t2r, r2t),
        };
        Ok(E2eSession { send: AeadCounter::new(&send), recv: AeadCounter::new(&recv) })
    }
}

fn hello_key(e2e_secret: &Secret, sender: Role) -> Secret {
    let info: &[u8] = match sender {
        Role::Requester => b"hello r2t",
        Role::Target => b"hello t2r",
    };
    kdf(E2E_SALT, &[&e2e_secret.0], info)
}

/// An established end-to-end session.
pub struct E2eSession {
    send: AeadCounter,
    recv: AeadCounter,
}

impl E2eSession {
    /// Seals one record into `out`.
    pub fn seal(&mut self, kind: RecordType, data: &[u8], out: &mut [u8; CELL_PAYLOAD_LEN]) -> Result<()> {
        seal_record(&mut self.send, kind, data, out)
    }

    /// Opens one record in place.
    pub fn open<'a>(&mut self, payload: &'a mut [u8; CELL_PAYLOAD_LEN]) -> Result<(RecordType, &'a [u8])> {
        let (kind, data) = open_record(&mut self.recv, payload)?;
        if kind == RecordType::Hello {
            return Err(ProtoError::Unexpected("second HELLO"));
        }
        Ok((kind, data))
    }
}

/// Splits a message into record fragments (`Part`… then `End`); an empty message is one empty `End`.
pub fn fragments(msg: &[u8]) -> impl Iterator<Item = (RecordType, &[u8])> {
    let n = msg.len().div_ceil(RECORD_DATA_MAX).max(1);
    (0..n).map(move |i| {
        let start = i * RECORD_DATA_MAX;
        let end = (start + RECORD_DATA_MAX).min(msg.len());
        (if i + 1 == n { RecordType::End } else { RecordType::Part }, msg.get(start..end).unwrap_or_default())
    })
}

/// Reassembles messages from fragments, refusing any longer than `limit`.
#[derive(Debug)]
pub struct Reassembler {
    buf: Vec<u8>,
    limit: usize,
    /// Length of the last message: the next one is reserved this much up front (capped at [`RESERVE_MAX`]),
    /// instead of growing by doubling, which copies and page-faults a large message several times over.
    last: usize,
}

/// Most bytes reserved up front for a message (a bulk stream of large messages reserves this much, once per
/// message; an idle circuit reserves nothing).
const RESERVE_MAX: usize = 1 << 20;

impl Reassembler {
    /// A reassembler for messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Reassembler { buf: Vec::new(), limit, last: 0 }
    }

    /// Adds a fragment; returns a complete message on `End`.
    pub fn push(&mut self, kind: RecordType, data: &[u8]) -> Result<Option<Vec<u8>>> {
        match kind {
            RecordType::Part | RecordType::End => {
                if self.buf.len() + data.len() > self.limit {
                    return Err(ProtoError::TooLarge {
                        what: "circuit message",
                        len: self.buf.len() + data.len(),
                        limit: self.limit,
                    });
                }
                if self.buf.capacity() == 0 && kind == RecordType::Part {
                    self.buf.reserve(self.last.min(RESERVE_MAX).max(data.len()));
                }
                self.buf.extend_from_slice(data);
                if kind == RecordType::End {
                    self.last = self.buf.len();
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
                Ok(None)
            }
            _ => Err(ProtoError::Unexpected("non-data record in message")),
        }
    }

    /// Bytes buffered for the message in progress.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}
