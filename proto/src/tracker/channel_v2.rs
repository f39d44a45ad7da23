//! The tracker channel, version 2 (SPEC open issue 27): no RSA on the tracker's side of a join. The tracker holds a static X25519 key `B` that its RSA identity certifies
//! (a short-lived certificate, sent in every ServerHello); the peer authenticates the tracker by an X25519
//! exchange with `B` (as Tor's ntor) instead of encrypting a secret to the RSA key:
//!
//! ```text
//! ClientHello v2 (44 B):  "ANOMOST1" | ver u16 = 2 | reserved u16 = 0 | e_P[32]
//! ServerHello v2:         e_T[32] | cert_len u16 | cert
//! cert:                   B[32] | not_before u64 | not_after u64 | sig_len u16 |
//!                         PSS(tracker key, "anomos tracker static v2" | tracker_fp | B | not_before | not_after)
//! dh_e = X25519(e_P, e_T)   (forward secrecy)      dh_s = X25519(e_P, B)   (authenticates the tracker)
//! th   = SHA256("anomos tracker v2" | ClientHello | e_T | cert)
//! k_p2t, k_t2p, rs = HKDF(th, dh_e | dh_s | tracker_fp, "p2t" / "t2p" / "resume")
//! Hello v2 signs "anomos tracker hello v2" | tracker_fp | nonce | th
//! ```
//!
//! Only the holder of `B`'s secret derives the keys, so the first frame that opens authenticates the tracker;
//! the certificate (inside `th`) binds `B` to the pinned fingerprint, and `Hello` bound to `th` cannot be relayed
//! into another connection by someone holding `B`'s secret. But whoever holds `B`'s secret can pose as the tracker
//! to any peer doing a full handshake until the certificate's end (plus the skew allowed): rotating the key does
//! not revoke a stolen one, so certificates are short (48 h in the reference, 7 days at most). Frames, the
//! session and resumption are as in version 1.

use super::*;
use crate::crypto::sha256;

/// Version of a ClientHello that opens a version-2 channel.
pub const TRACKER_VERSION_2: u16 = 2;
/// A version-2 ClientHello: magic, version, a reserved u16 (zero), the peer's ephemeral key.
pub const CLIENT_HELLO_V2_LEN: usize = CLIENT_HELLO_HEADER + EPHEMERAL_LEN;
/// Longest static-key certificate: key, two dates, signature length, a 3072-bit signature.
pub const MAX_STATIC_CERT: usize = 32 + 8 + 8 + 2 + MAX_RSA_BYTES;
/// Longest a certificate may be valid (a stolen static key is good for at most this long).
pub const MAX_CERT_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// Clock skew tolerated when checking a certificate's dates (wider than the TC expiry's, SPEC §4.7: a peer whose
/// clock is off still joins, and the certificate's short life bounds a stolen key, not this).
pub const CERT_SKEW_SECS: u64 = 600;
/// How far before its making a certificate's validity starts (peers whose clocks are behind accept it at once).
pub const CERT_BACKDATE_SECS: u64 = 3600;

const SIG_STATIC: &[u8] = b"anomos tracker static v2";
const SALT_CHANNEL_V2: &[u8] = b"anomos tracker v2";
const SIG_HELLO_V2: &[u8] = b"anomos tracker hello v2";

/// A ClientHello's 12-byte header, by version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloHeader {
    /// Version 1: the OAEP ciphertext's length follows (then the peer's ephemeral key).
    V1 {
        /// Length of the OAEP ciphertext.
        ct_len: usize,
    },
    /// Version 2: the peer's ephemeral key follows ([`CLIENT_HELLO_V2_LEN`] in all).
    V2,
}

/// Tracker side: parses a ClientHello's 12-byte header of either version.
pub fn parse_hello_header(header: &[u8]) -> Result<HelloHeader> {
    if header.get(8..10) == Some(TRACKER_VERSION_2.to_be_bytes().as_slice()) {
        let mut p = header;
        let magic: [u8; 8] = take_array(&mut p, "tracker hello magic")?;
        if magic != TRACKER_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let _ = take_u16(&mut p, "tracker hello version")?;
        if take_u16(&mut p, "tracker hello reserved")? != 0 {
            return Err(invalid("tracker hello v2", "reserved field not zero"));
        }
        return Ok(HelloHeader::V2);
    }
    TrackerChannel::hello_ct_len(header).map(|ct_len| HelloHeader::V1 { ct_len })
}

/// Tracker side: the answer to a key fetch with the highest channel version it speaks after the key (a peer of
/// version 1 reads the key and stops; one of version 2 reads on to the end of the connection).
pub fn encode_key_answer_v2(key: &PublicKey) -> Vec<u8> {
    let mut out = encode_key_answer(key);
    out.extend_from_slice(&TRACKER_VERSION_2.to_be_bytes());
    out
}

/// Peer side: the channel version to speak with a tracker, from what followed the key in its key-fetch answer
/// until the connection closed: nothing (a tracker before version 2) → 1; else the first two bytes, capped at the
/// highest version we speak (a later tracker may send more after them).
pub fn key_answer_version(trailer: &[u8]) -> Result<u16> {
    match trailer {
        [] => Ok(TRACKER_VERSION),
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b]).clamp(TRACKER_VERSION, TRACKER_VERSION_2)),
        _ => Err(invalid("tracker key answer", "a one-byte trailer")),
    }
}

/// X25519 with a key that may be used again (the tracker's static key, or the peer's ephemeral one used twice).
fn agree_ref(secret: &aws_lc_rs::agreement::PrivateKey, peer: &[u8; 32]) -> Result<[u8; 32]> {
    use aws_lc_rs::agreement::{agree, UnparsedPublicKey, X25519};
    let low = || ProtoError::Invalid { what: "X25519 share", detail: "low-order point".into() };
    let dh: [u8; 32] =
        agree(secret, UnparsedPublicKey::new(&X25519, peer), low(), |k| k.try_into().map_err(|_| low()))?;
    if dh == [0u8; 32] {
        return Err(low());
    }
    Ok(dh)
}

fn x25519_key(rng: &mut (impl RngCore + CryptoRng)) -> Result<(aws_lc_rs::agreement::PrivateKey, [u8; 32])> {
    use aws_lc_rs::agreement::{PrivateKey, X25519};
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    let bad = || ProtoError::Invalid { what: "X25519 key", detail: "refused by AWS-LC".into() };
    let secret = PrivateKey::from_private_key(&X25519, &b).map_err(|_| bad())?;
    let public = secret.compute_public_key().map_err(|_| bad())?;
    let public: [u8; 32] = public.as_ref().try_into().map_err(|_| bad())?;
    Ok((secret, public))
}

fn cert_signed_bytes(tracker_fp: &Fingerprint, b: &[u8; 32], not_before: u64, not_after: u64) -> Vec<u8> {
    [SIG_STATIC, &tracker_fp.0, b, &not_before.to_be_bytes(), &not_after.to_be_bytes()].concat()
}

/// A static-key certificate as sent: the key, its validity, the tracker's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticCert {
    /// The tracker's static X25519 public key.
    pub key: [u8; 32],
    /// Valid from (Unix seconds).
    pub not_before: u64,
    /// Valid until (Unix seconds).
    pub not_after: u64,
    /// RSA-PSS by the tracker's identity over the fields above.
    pub signature: Vec<u8>,
}

impl StaticCert {
    /// The certificate's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(50 + self.signature.len());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses a certificate (exactly its bytes: no trailing data).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_STATIC_CERT {
            return Err(ProtoError::TooLarge {
                what: "static-key certificate",
                len: bytes.len(),
                limit: MAX_STATIC_CERT,
            });
        }
        let mut p = bytes;
        let key: [u8; 32] = take_array(&mut p, "certificate key")?;
        let not_before = u64::from_be_bytes(take_array(&mut p, "certificate not_before")?);
        let not_after = u64::from_be_bytes(take_array(&mut p, "certificate not_after")?);
        let sig_len = usize::from(take_u16(&mut p, "certificate signature length")?);
        if p.len() != sig_len {
            return Err(ProtoError::BadLength { what: "certificate signature", len: p.len(), expected: sig_len });
        }
        Ok(StaticCert { key, not_before, not_after, signature: p.to_vec() })
    }

    /// Checks the signature by the pinned tracker key and the dates at `now` (Unix seconds, with
    /// [`CERT_SKEW_SECS`] either way); the lifetime may not exceed [`MAX_CERT_LIFETIME_SECS`].
    pub fn verify(&self, tracker: &PublicKey, now: u64) -> Result<()> {
        if self.not_after < self.not_before || self.not_after - self.not_before > MAX_CERT_LIFETIME_SECS {
            return Err(invalid("static-key certificate", "lifetime over 7 days (or negative)"));
        }
        if now.saturating_add(CERT_SKEW_SECS) < self.not_before || now > self.not_after.saturating_add(CERT_SKEW_SECS) {
            return Err(invalid("static-key certificate", format!("not valid now ({now})")));
        }
        let signed = cert_signed_bytes(&tracker.fingerprint(), &self.key, self.not_before, self.not_after);
        tracker.verify(&signed, &self.signature, "static-key certificate")
    }
}

/// The tracker's static X25519 key and its certificate (kept in memory only; regenerated at start and when the
/// certificate nears its end: one RSA signature each time).
pub struct StaticKey {
    secret: aws_lc_rs::agreement::PrivateKey,
    cert: StaticCert,
    cert_bytes: Vec<u8>,
}

impl StaticKey {
    /// A fresh static key certified by `tracker` from [`CERT_BACKDATE_SECS`] before `now` until `lifetime_secs`
    /// after it (the whole at most [`MAX_CERT_LIFETIME_SECS`]).
    pub fn generate<R: RngCore + CryptoRng>(
        rng: &mut R,
        tracker: &Identity,
        now: u64,
        lifetime_secs: u64,
    ) -> Result<Self> {
        let (secret, key) = x25519_key(rng)?;
        let not_before = now.saturating_sub(CERT_BACKDATE_SECS);
        let not_after = now.saturating_add(lifetime_secs.min(MAX_CERT_LIFETIME_SECS - CERT_BACKDATE_SECS));
        let signature = tracker.sign(rng, &cert_signed_bytes(&tracker.fingerprint(), &key, not_before, not_after));
        let cert = StaticCert { key, not_before, not_after, signature };
        let cert_bytes = cert.encode();
        Ok(StaticKey { secret, cert, cert_bytes })
    }

    /// The certificate.
    pub fn cert(&self) -> &StaticCert {
        &self.cert
    }
}

/// The transcript hash and the channel keys of a version-2 handshake.
fn keys_v2(
    hello: &[u8],
    e_t: &[u8; 32],
    cert: &[u8],
    dh_e: &[u8; 32],
    dh_s: &[u8; 32],
    tracker_fp: &Fingerprint,
) -> ([u8; 32], Secret, Secret, Secret) {
    let th = sha256(&[SALT_CHANNEL_V2, hello, e_t, cert]);
    let ikm: [&[u8]; 3] = [dh_e, dh_s, &tracker_fp.0];
    (th, kdf(&th, &ikm, b"p2t"), kdf(&th, &ikm, b"t2p"), kdf(&th, &ikm, b"resume"))
}

/// The peer's side of a version-2 handshake, between its ClientHello and the tracker's ServerHello.
pub struct ClientHandshakeV2 {
    secret: aws_lc_rs::agreement::PrivateKey,
    hello: [u8; CLIENT_HELLO_V2_LEN],
    tracker: PublicKey,
}

/// A version-2 channel and its transcript hash (what `Hello` v2 signs beside the nonce).
pub struct ChannelV2 {
    /// The channel.
    pub channel: TrackerChannel,
    /// SHA256 of the handshake's transcript.
    pub th: [u8; 32],
}

impl TrackerChannel {
    /// Peer side: a version-2 ClientHello and the handshake to finish with the ServerHello. Randomness: the
    /// 32-byte X25519 secret only.
    pub fn connect_v2<R: RngCore + CryptoRng>(
        rng: &mut R,
        tracker: &PublicKey,
    ) -> Result<([u8; CLIENT_HELLO_V2_LEN], ClientHandshakeV2)> {
        let (secret, e_p) = x25519_key(rng)?;
        let mut hello = [0u8; CLIENT_HELLO_V2_LEN];
        let parts: [&[u8]; 4] = [&TRACKER_MAGIC, &TRACKER_VERSION_2.to_be_bytes(), &[0, 0], &e_p];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = hello.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        Ok((hello, ClientHandshakeV2 { secret, hello, tracker: tracker.clone() }))
    }

    /// Tracker side: answers a complete version-2 ClientHello (its header already checked to be version 2)
    /// with `static_key`. Returns the ServerHello to send and the channel. Randomness: the 32-byte X25519 secret
    /// only; no RSA.
    pub fn accept_v2<R: RngCore + CryptoRng>(
        rng: &mut R,
        static_key: &StaticKey,
        tracker_fp: &Fingerprint,
        hello: &[u8],
    ) -> Result<(Vec<u8>, ChannelV2)> {
        if hello.len() != CLIENT_HELLO_V2_LEN {
            return Err(ProtoError::BadLength {
                what: "tracker hello v2",
                len: hello.len(),
                expected: CLIENT_HELLO_V2_LEN,
            });
        }
        let mut p = hello;
        let magic: [u8; 8] = take_array(&mut p, "tracker hello magic")?;
        if magic != TRACKER_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let ver = take_u16(&mut p, "tracker hello version")?;
        if ver != TRACKER_VERSION_2 {
            return Err(ProtoError::BadVersion(ver));
        }
        if take_u16(&mut p, "tracker hello reserved")? != 0 {
            return Err(invalid("tracker hello v2", "reserved field not zero"));
        }
        let e_p: [u8; 32] = take_array(&mut p, "tracker hello key")?;
        let (eph, e_t) = x25519_key(rng)?;
        let dh_e = agree_ref(&eph, &e_p)?;
        let dh_s = agree_ref(&static_key.secret, &e_p)?;
        let (th, p2t, t2p, resumption) = keys_v2(hello, &e_t, &static_key.cert_bytes, &dh_e, &dh_s, tracker_fp);
        let mut server_hello = Vec::with_capacity(32 + 2 + static_key.cert_bytes.len());
        server_hello.extend_from_slice(&e_t);
        server_hello.extend_from_slice(&(static_key.cert_bytes.len() as u16).to_be_bytes());
        server_hello.extend_from_slice(&static_key.cert_bytes);
        let channel = TrackerChannel { send: AeadCounter::new(&t2p), recv: AeadCounter::new(&p2t), resumption };
        Ok((server_hello, ChannelV2 { channel, th }))
    }

    /// Peer side: checks a ServerHello v2's certificate length before reading the certificate.
    pub fn server_hello_v2_cert_len(prefix: [u8; 2]) -> Result<usize> {
        let len = usize::from(u16::from_be_bytes(prefix));
        if len > MAX_STATIC_CERT {
            return Err(ProtoError::TooLarge { what: "static-key certificate", len, limit: MAX_STATIC_CERT });
        }
        Ok(len)
    }
}

impl ClientHandshakeV2 {
    /// Completes the channel with the tracker's ephemeral key `e_t` and certificate `cert` (as read: the bytes
    /// after the length), checking the certificate against the pinned key at `now` (Unix seconds).
    pub fn finish(self, e_t: &[u8; 32], cert: &[u8], now: u64) -> Result<ChannelV2> {
        let parsed = StaticCert::decode(cert)?;
        parsed.verify(&self.tracker, now)?;
        let dh_e = agree_ref(&self.secret, e_t)?;
        let dh_s = agree_ref(&self.secret, &parsed.key)?;
        let (th, p2t, t2p, resumption) = keys_v2(&self.hello, e_t, cert, &dh_e, &dh_s, &self.tracker.fingerprint());
        let channel = TrackerChannel { send: AeadCounter::new(&p2t), recv: AeadCounter::new(&t2p), resumption };
        Ok(ChannelV2 { channel, th })
    }
}

/// The message a peer signs in `Hello` on a version-2 channel: bound to the channel's transcript.
pub fn hello_v2_signed_bytes(tracker_fp: &Fingerprint, nonce: &[u8; 32], th: &[u8; 32]) -> Vec<u8> {
    [SIG_HELLO_V2, &tracker_fp.0, nonce, th].concat()
}

/// Peer side: `Hello` for a challenge on a version-2 channel.
pub fn make_hello_v2<R: RngCore + CryptoRng>(
    me: &Identity,
    tracker_fp: &Fingerprint,
    nonce: &[u8; 32],
    th: &[u8; 32],
    rng: &mut R,
) -> ToTracker {
    ToTracker::Hello {
        public_key: me.public().der().to_vec(),
        signature: me.sign(rng, &hello_v2_signed_bytes(tracker_fp, nonce, th)),
    }
}

/// Tracker side: verifies a `Hello` received on a version-2 channel; returns the peer's key.
pub fn verify_hello_v2(
    public_key: &[u8],
    signature: &[u8],
    tracker_fp: &Fingerprint,
    nonce: &[u8; 32],
    th: &[u8; 32],
) -> Result<PublicKey> {
    let key = PublicKey::from_der(public_key)?;
    key.verify(&hello_v2_signed_bytes(tracker_fp, nonce, th), signature, "tracker hello v2")?;
    Ok(key)
}
