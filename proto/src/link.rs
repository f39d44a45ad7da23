//! Neighbor links: the handshake, the cell cipher, and the reachability probe that shares the listening port.
//!
//! ```text
//! Dialer D                                                   Acceptor A
//! HELLO       magic "ANOMOSL1" | ver u16 | X25519 e_D | n_D  ─────►                    (74 bytes)
//!             ◄───── REPLY  magic "ANOMOSL1" | ver u16 | X25519 e_A | n_A             (74 bytes)
//!   dh = X25519(e_D, e_A) (must be contributory); th1 = SHA256(HELLO || REPLY)
//!   hs_D = HKDF(salt=th1, dh, "hs d2a"), hs_A = HKDF(salt=th1, dh, "hs a2d")
//! AUTH        len u16 | GCM(hs_D, n=0)[ fp_D | sig_D("anomos link auth dialer v1" | th1 | fp_A) ]  ─────►
//!   th2 = SHA256(th1 || AUTH)
//!             ◄───── AUTH_REPLY  len u16 | GCM(hs_A, n=0)[ status u8 | sig_A("anomos link auth acceptor v1" | th2 | fp_D) ]
//!   th3 = SHA256(th2 || AUTH_REPLY)
//!   k_d2a = HKDF(salt=th3, dh || NeighborID, "link d2a"), k_a2d = HKDF(salt=th3, dh || NeighborID, "link a2d")
//! then both send a PADDING cell first (key confirmation: it opens only if the peer knows the NeighborID).
//! ```
//! The NeighborID is never sent; each side's identity is sent only encrypted; the acceptor signs only after the
//! dialer proved to be one of its neighbors; fresh ephemeral keys and nonces on both sides make a recorded
//! handshake useless to replay, and give the link forward secrecy.

use rand::{CryptoRng, RngCore};
use x25519_dalek::{EphemeralSecret, PublicKey as XPublic};

use crate::cell::{Cell, CELL_LEN, SEALED_CELL_LEN};
use crate::crypto::{kdf, sha256, AeadCounter, Secret, TAG_LEN};
use crate::error::{take, take_array, take_u16, ProtoError, Result};
use crate::identity::{Fingerprint, Identity, PublicKey, MAX_RSA_BYTES, MAX_SPKI_LEN};
use crate::ids::NeighborId;

/// First bytes of a neighbor-link handshake.
pub const LINK_MAGIC: [u8; 8] = *b"ANOMOSL1";
/// First bytes of a tracker reachability probe.
pub const PROBE_MAGIC: [u8; 8] = *b"ANOMOSP1";
/// Link protocol version.
pub const LINK_VERSION: u16 = 1;
/// HELLO and REPLY size.
pub const HELLO_LEN: usize = 8 + 2 + 32 + 32;
/// Largest AUTH / AUTH_REPLY body (after its u16 length).
pub const MAX_AUTH_LEN: usize = 32 + 2 + MAX_RSA_BYTES + TAG_LEN;

const HS_SALT_INFO_D: &[u8] = b"anomos link hs d2a";
const HS_SALT_INFO_A: &[u8] = b"anomos link hs a2d";
const SIG_DIALER: &[u8] = b"anomos link auth dialer v1";
const SIG_ACCEPTOR: &[u8] = b"anomos link auth acceptor v1";

/// Acceptor's verdict on a dialer's AUTH.
///
/// "Not one of my neighbors" and "bad signature" are one status on purpose: distinguishing them would let
/// anyone who claims a fingerprint learn whether that key is the acceptor's neighbor, i.e. map the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStatus {
    /// Authenticated; link keys follow.
    Ok = 0,
    /// Not authenticated as a current neighbor (unknown key, or a signature that does not verify). A real
    /// neighbor gets this when the acceptor has not yet learned of the edge: retry after the next announce.
    Refused = 1,
    /// The acceptor has no room for another link.
    Busy = 3,
}

impl AuthStatus {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            0 => AuthStatus::Ok,
            1 => AuthStatus::Refused,
            3 => AuthStatus::Busy,
            _ => return Err(ProtoError::Invalid { what: "link auth status", detail: b.to_string() }),
        })
    }
}

fn encode_hello(eph: &XPublic, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut m = [0u8; HELLO_LEN];
    m[..8].copy_from_slice(&LINK_MAGIC);
    m[8..10].copy_from_slice(&LINK_VERSION.to_be_bytes());
    m[10..42].copy_from_slice(eph.as_bytes());
    m[42..].copy_from_slice(nonce);
    m
}

fn decode_hello(m: &[u8]) -> Result<XPublic> {
    if m.len() != HELLO_LEN {
        return Err(ProtoError::BadLength { what: "link hello", len: m.len(), expected: HELLO_LEN });
    }
    let mut p = m;
    let magic: [u8; 8] = take_array(&mut p, "link magic")?;
    if magic != LINK_MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let ver = take_u16(&mut p, "link version")?;
    if ver != LINK_VERSION {
        return Err(ProtoError::BadVersion(ver));
    }
    let eph: [u8; 32] = take_array(&mut p, "link ephemeral key")?;
    Ok(XPublic::from(eph))
}

fn shared(secret: EphemeralSecret, peer: &XPublic) -> Result<[u8; 32]> {
    let ss = secret.diffie_hellman(peer);
    if !ss.was_contributory() {
        return Err(ProtoError::Invalid { what: "X25519 share", detail: "low-order point".into() });
    }
    Ok(*ss.as_bytes())
}

fn framed(sealed: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + sealed.len());
    out.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// Parses the u16 length that precedes AUTH and AUTH_REPLY, bounding it before anything is read.
pub fn auth_frame_len(prefix: [u8; 2]) -> Result<usize> {
    let len = u16::from_be_bytes(prefix) as usize;
    if len > MAX_AUTH_LEN {
        return Err(ProtoError::TooLarge { what: "link auth message", len, limit: MAX_AUTH_LEN });
    }
    if len < TAG_LEN + 1 {
        return Err(ProtoError::Truncated { what: "link auth message", need: TAG_LEN + 1, have: len });
    }
    Ok(len)
}

fn link_keys(th3: &[u8; 32], dh: &[u8; 32], nid: NeighborId) -> (Secret, Secret) {
    let nid = nid.0.to_be_bytes();
    (kdf(th3, &[dh, &nid], b"anomos link d2a"), kdf(th3, &[dh, &nid], b"anomos link a2d"))
}

fn strip_frame<'a>(msg: &'a [u8], what: &'static str) -> Result<&'a [u8]> {
    let mut p = msg;
    let len = auth_frame_len(take_array(&mut p, what)?)?;
    if p.len() != len {
        return Err(ProtoError::BadLength { what, len: p.len(), expected: len });
    }
    Ok(p)
}

/// Dialer, after sending HELLO.
pub struct Dialer {
    eph: EphemeralSecret,
    hello: [u8; HELLO_LEN],
    acceptor: PublicKey,
    nid: NeighborId,
}

/// Dialer, after sending AUTH.
pub struct DialerAuthSent {
    th2: [u8; 32],
    dh: [u8; 32],
    hs_a: Secret,
    acceptor: PublicKey,
    my_fp: Fingerprint,
    nid: NeighborId,
}

impl Dialer {
    /// Starts a handshake toward the neighbor with key `acceptor` over edge `nid`; returns HELLO to send.
    pub fn start<R: RngCore + CryptoRng>(rng: &mut R, acceptor: PublicKey, nid: NeighborId) -> (Self, [u8; HELLO_LEN]) {
        let eph = EphemeralSecret::random_from_rng(&mut *rng);
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let hello = encode_hello(&XPublic::from(&eph), &nonce);
        (Dialer { eph, hello, acceptor, nid }, hello)
    }

    /// Processes the acceptor's REPLY; returns AUTH to send (length-prefixed).
    pub fn on_reply<R: RngCore + CryptoRng>(
        self,
        reply: &[u8],
        me: &Identity,
        rng: &mut R,
    ) -> Result<(DialerAuthSent, Vec<u8>)> {
        let peer_eph = decode_hello(reply)?;
        let dh = shared(self.eph, &peer_eph)?;
        let th1 = sha256(&[&self.hello, reply]);
        let hs_d = kdf(&th1, &[&dh], HS_SALT_INFO_D);
        let hs_a = kdf(&th1, &[&dh], HS_SALT_INFO_A);
        let afp = self.acceptor.fingerprint();
        let sig = me.sign(rng, &[SIG_DIALER, &th1, &afp.0].concat());
        let mut pt = Vec::with_capacity(34 + sig.len());
        pt.extend_from_slice(&me.fingerprint().0);
        pt.extend_from_slice(&(sig.len() as u16).to_be_bytes());
        pt.extend_from_slice(&sig);
        let auth = framed(AeadCounter::new(&hs_d).seal(b"", &pt)?);
        let th2 = sha256(&[&th1, &auth]);
        Ok((DialerAuthSent { th2, dh, hs_a, acceptor: self.acceptor, my_fp: me.fingerprint(), nid: self.nid }, auth))
    }
}

impl DialerAuthSent {
    /// The part of [`DialerAuthSent::on_auth_reply`] before its RSA step: removes the frame, opens AUTH_REPLY and
    /// parses it into the acceptor's status and the rest of the plaintext (the acceptor's signature, not yet
    /// verified). Public so the fuzz target `auth_body` can run it on hostile bytes at full speed, without the
    /// RSA signing that building a `DialerAuthSent` costs; [`DialerAuthSent::on_auth_reply`] is the only other
    /// caller.
    pub fn open_auth_reply(&self, msg: &[u8]) -> Result<(AuthStatus, Vec<u8>)> {
        let body = strip_frame(msg, "link auth reply")?;
        let pt = AeadCounter::new(&self.hs_a).open(b"", body, "link auth reply")?;
        let mut p = pt.as_slice();
        let status = AuthStatus::from_u8(take_array::<1>(&mut p, "auth status")?[0])?;
        Ok((status, p.to_vec()))
    }

    /// Processes AUTH_REPLY (including its length prefix); on success the link keys.
    pub fn on_auth_reply(self, msg: &[u8]) -> Result<LinkCipher> {
        let (status, sig) = self.open_auth_reply(msg)?;
        if status != AuthStatus::Ok {
            return Err(ProtoError::LinkRefused(status));
        }
        self.acceptor.verify(&[SIG_ACCEPTOR, &self.th2, &self.my_fp.0].concat(), &sig, "acceptor link auth")?;
        let th3 = sha256(&[&self.th2, msg]);
        let (d2a, a2d) = link_keys(&th3, &self.dh, self.nid);
        Ok(LinkCipher::new(&d2a, &a2d, self.acceptor.fingerprint(), self.nid, true))
    }
}

/// AUTH as the acceptor reads it before any RSA operation: who the dialer claims to be, and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialerAuth {
    /// The dialer's claimed fingerprint.
    pub fp: Fingerprint,
    /// The dialer's signature (not yet verified; any length up to what the frame holds).
    pub sig: Vec<u8>,
}

/// Acceptor, after sending REPLY.
pub struct Acceptor {
    th1: [u8; 32],
    dh: [u8; 32],
    hs_d: Secret,
    hs_a: Secret,
}

/// What the acceptor concluded from AUTH.
pub struct AcceptOutcome {
    /// AUTH_REPLY to send (always: a refusal tells the dialer why).
    pub reply: Vec<u8>,
    /// The link cipher, when the dialer authenticated as a neighbor.
    pub result: Result<LinkCipher>,
    /// The dialer's claimed fingerprint, when AUTH decrypted.
    pub peer: Option<Fingerprint>,
    /// The status sent in `reply`.
    pub status: AuthStatus,
}

impl Acceptor {
    /// Processes HELLO (74 bytes, magic included); returns REPLY.
    pub fn start<R: RngCore + CryptoRng>(rng: &mut R, hello: &[u8]) -> Result<(Self, [u8; HELLO_LEN])> {
        let peer_eph = decode_hello(hello)?;
        let eph = EphemeralSecret::random_from_rng(&mut *rng);
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let reply = encode_hello(&XPublic::from(&eph), &nonce);
        let dh = shared(eph, &peer_eph)?;
        let th1 = sha256(&[hello, &reply]);
        let hs_d = kdf(&th1, &[&dh], HS_SALT_INFO_D);
        let hs_a = kdf(&th1, &[&dh], HS_SALT_INFO_A);
        Ok((Acceptor { th1, dh, hs_d, hs_a }, reply))
    }

    /// The part of [`Acceptor::on_auth`] before its RSA steps: removes AUTH's frame, opens it under the dialer's
    /// handshake key and parses the claimed fingerprint and the signature. Public so the fuzz target `auth_body`
    /// can run it on hostile bytes at full speed (one `Acceptor`, no signature check or signing per input);
    /// [`Acceptor::on_auth`] is the only other caller.
    pub fn open_auth(&self, msg: &[u8]) -> Result<DialerAuth> {
        let body = strip_frame(msg, "link auth")?;
        let pt = AeadCounter::new(&self.hs_d).open(b"", body, "link auth")?;
        let mut p = pt.as_slice();
        let fp = Fingerprint(take_array(&mut p, "auth fingerprint")?);
        let sig_len = take_u16(&mut p, "auth signature length")? as usize;
        let sig = take(&mut p, sig_len, "auth signature")?.to_vec();
        if !p.is_empty() {
            return Err(ProtoError::Invalid { what: "link auth", detail: "trailing bytes".into() });
        }
        Ok(DialerAuth { fp, sig })
    }

    /// Processes AUTH (with its length prefix). `lookup` maps a fingerprint to that neighbor's key and edge,
    /// or `None` if it is not a current neighbor; `busy` (asked only for an authenticated neighbor) refuses it
    /// for lack of room. Errors here are fatal garbage (no reply possible); refusals come back in
    /// [`AcceptOutcome`]. The acceptor is only borrowed: after a refusal it may check the same AUTH again against
    /// a fresher neighbor table (only the last outcome's reply is sent).
    pub fn on_auth<R: RngCore + CryptoRng>(
        &self,
        msg: &[u8],
        me: &Identity,
        rng: &mut R,
        lookup: impl FnOnce(&Fingerprint) -> Option<(PublicKey, NeighborId)>,
        busy: impl FnOnce(NeighborId) -> bool,
    ) -> Result<AcceptOutcome> {
        let DialerAuth { fp, sig } = self.open_auth(msg)?;
        let sig = sig.as_slice();
        let th2 = sha256(&[&self.th1, msg]);
        let signed = [SIG_DIALER, &self.th1, &me.fingerprint().0].concat();
        let (status, found) = match lookup(&fp) {
            None => {
                // A stranger's AUTH costs a signature check too (against our own key, which cannot have signed
                // it), so the time to the refusal does not tell a prober whether a fingerprint is our neighbor
                // (SPEC §5.6, open issue 10).
                dialer_signed(me.public(), &signed, sig);
                (AuthStatus::Refused, None)
            }
            Some((key, nid)) => {
                if !dialer_signed(&key, &signed, sig) {
                    (AuthStatus::Refused, None)
                } else if busy(nid) {
                    (AuthStatus::Busy, None)
                } else {
                    (AuthStatus::Ok, Some(nid))
                }
            }
        };
        let mut rp = vec![status as u8];
        if status == AuthStatus::Ok {
            rp.extend_from_slice(&me.sign(rng, &[SIG_ACCEPTOR, &th2, &fp.0].concat()));
        }
        let reply = framed(AeadCounter::new(&self.hs_a).seal(b"", &rp)?);
        let result = match found {
            Some(nid) => {
                let th3 = sha256(&[&th2, &reply]);
                let (d2a, a2d) = link_keys(&th3, &self.dh, nid);
                Ok(LinkCipher::new(&a2d, &d2a, fp, nid, false))
            }
            None => Err(ProtoError::Invalid { what: "link auth", detail: format!("{status:?}") }),
        };
        Ok(AcceptOutcome { reply, result, peer: Some(fp), status })
    }
}

/// Whether `sig` is `key`'s signature of `signed`. Always one full RSA public-key operation with `key`, whatever
/// the signature's length: one of another length is checked as a same-length value below the modulus (which
/// fails), not refused early, so a refusal takes about as long for any signature and for any fingerprint.
fn dialer_signed(key: &PublicKey, signed: &[u8], sig: &[u8]) -> bool {
    if sig.len() == key.size() {
        return key.verify(signed, sig, "dialer link auth").is_ok();
    }
    // The last `size - 1` bytes of the signature (or all of a shorter one), right-aligned in a modulus-sized
    // buffer whose first byte stays 0, so the value is below the modulus.
    let mut same_len = vec![0u8; key.size()];
    let keep = sig.len().min(key.size().saturating_sub(1));
    for (d, s) in same_len.iter_mut().rev().zip(sig.iter().rev()).take(keep) {
        *d = *s;
    }
    let _ = key.verify(signed, &same_len, "dialer link auth");
    false
}

/// The established link: seals outgoing cells and opens incoming ones, each with its own counter nonce.
pub struct LinkCipher {
    sealer: CellSealer,
    opener: CellOpener,
    /// The neighbor's fingerprint.
    pub peer: Fingerprint,
    /// The edge this link is.
    pub nid: NeighborId,
    /// Whether this side dialed (it allocates circuit ids with the top bit set).
    pub dialer: bool,
}

impl LinkCipher {
    fn new(send: &Secret, recv: &Secret, peer: Fingerprint, nid: NeighborId, dialer: bool) -> Self {
        LinkCipher {
            sealer: CellSealer { send: AeadCounter::new(send) },
            opener: CellOpener { recv: AeadCounter::new(recv) },
            peer,
            nid,
            dialer,
        }
    }

    /// Seals the plaintext cell in `buf[..CELL_LEN]` in place and writes the tag after it.
    pub fn seal_in_place(&mut self, buf: &mut [u8; SEALED_CELL_LEN]) -> Result<()> {
        self.sealer.seal_in_place(buf)
    }

    /// Opens a sealed cell in place; on success `buf[..CELL_LEN]` holds the plaintext cell.
    pub fn open_in_place(&mut self, buf: &mut [u8; SEALED_CELL_LEN]) -> Result<()> {
        self.opener.open_in_place(buf)
    }

    /// Splits into the sending and the receiving direction (for a writer task and a reader task).
    pub fn split(self) -> (CellSealer, CellOpener) {
        (self.sealer, self.opener)
    }

    /// Encodes and seals `cell`.
    pub fn seal_cell(&mut self, cell: &Cell) -> Result<Box<[u8; SEALED_CELL_LEN]>> {
        let mut buf = Box::new([0u8; SEALED_CELL_LEN]);
        let (plain, _) = buf.split_first_chunk_mut::<CELL_LEN>().ok_or(ProtoError::Unexpected("cell buffer size"))?;
        cell.encode_into(plain);
        self.seal_in_place(&mut buf)?;
        Ok(buf)
    }

    /// Opens and decodes a sealed cell.
    pub fn open_cell(&mut self, buf: &[u8; SEALED_CELL_LEN]) -> Result<Cell> {
        let mut b = Box::new(*buf);
        self.open_in_place(&mut b)?;
        Cell::decode(b.first_chunk::<CELL_LEN>().ok_or(ProtoError::Unexpected("cell buffer size"))?)
    }
}

/// Splits a sealed-cell buffer into the cell and its tag, checking its size.
fn cell_and_tag(buf: &mut [u8]) -> Result<(&mut [u8], &mut [u8])> {
    if buf.len() != SEALED_CELL_LEN {
        return Err(ProtoError::BadLength { what: "sealed cell buffer", len: buf.len(), expected: SEALED_CELL_LEN });
    }
    Ok(buf.split_at_mut(CELL_LEN))
}

/// The sending half of a [`LinkCipher`].
pub struct CellSealer {
    send: AeadCounter,
}

impl CellSealer {
    /// Seals the plaintext cell in `buf[..CELL_LEN]` in place and writes the tag after it.
    pub fn seal_in_place(&mut self, buf: &mut [u8]) -> Result<()> {
        let (cell, tag) = cell_and_tag(buf)?;
        let t = self.send.seal_in_place(b"", cell)?;
        tag.copy_from_slice(&t);
        Ok(())
    }
}

/// The receiving half of a [`LinkCipher`].
pub struct CellOpener {
    recv: AeadCounter,
}

impl CellOpener {
    /// Opens a sealed cell in place; on success `buf[..CELL_LEN]` holds the plaintext cell.
    pub fn open_in_place(&mut self, buf: &mut [u8]) -> Result<()> {
        let (cell, tag) = cell_and_tag(buf)?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag);
        self.recv.open_in_place(b"", cell, &t, "link cell")
    }
}

/// The tracker's probe: "who are you?", with a fresh nonce.
pub fn encode_probe(nonce: &[u8; 32]) -> [u8; 42] {
    let mut m = [0u8; 42];
    m[..8].copy_from_slice(&PROBE_MAGIC);
    m[8..10].copy_from_slice(&LINK_VERSION.to_be_bytes());
    m[10..].copy_from_slice(nonce);
    m
}

/// Peer side: parses the 34 bytes of a probe after its magic; returns the nonce.
pub fn decode_probe_body(body: &[u8]) -> Result<[u8; 32]> {
    let mut p = body;
    let ver = take_u16(&mut p, "probe version")?;
    if ver != LINK_VERSION {
        return Err(ProtoError::BadVersion(ver));
    }
    let nonce = take_array(&mut p, "probe nonce")?;
    if !p.is_empty() {
        return Err(ProtoError::Invalid { what: "probe", detail: "trailing bytes".into() });
    }
    Ok(nonce)
}

const SIG_PROBE: &[u8] = b"anomos probe v1";

/// Peer side: the answer to a probe: `der_len u16 | SPKI DER | sig_len u16 | PSS(label | nonce | der)`.
pub fn answer_probe<R: RngCore + CryptoRng>(me: &Identity, nonce: &[u8; 32], rng: &mut R) -> Vec<u8> {
    let der = me.public().der();
    let sig = me.sign(rng, &[SIG_PROBE, nonce, der].concat());
    let mut out = Vec::with_capacity(4 + der.len() + sig.len());
    out.extend_from_slice(&(der.len() as u16).to_be_bytes());
    out.extend_from_slice(der);
    out.extend_from_slice(&(sig.len() as u16).to_be_bytes());
    out.extend_from_slice(&sig);
    out
}

/// Largest probe answer.
pub const MAX_PROBE_ANSWER: usize = 4 + MAX_SPKI_LEN + MAX_RSA_BYTES;

/// Tracker side: checks an answer; returns the key that answered.
pub fn verify_probe_answer(nonce: &[u8; 32], answer: &[u8]) -> Result<PublicKey> {
    if answer.len() > MAX_PROBE_ANSWER {
        return Err(ProtoError::TooLarge { what: "probe answer", len: answer.len(), limit: MAX_PROBE_ANSWER });
    }
    let mut p = answer;
    let der_len = take_u16(&mut p, "probe key length")? as usize;
    let der = take(&mut p, der_len, "probe key")?;
    let sig_len = take_u16(&mut p, "probe signature length")? as usize;
    let sig = take(&mut p, sig_len, "probe signature")?;
    if !p.is_empty() {
        return Err(ProtoError::Invalid { what: "probe answer", detail: "trailing bytes".into() });
    }
    let key = PublicKey::from_der(der)?;
    key.verify(&[SIG_PROBE, nonce, der].concat(), sig, "probe answer")?;
    Ok(key)
}
