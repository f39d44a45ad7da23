//! The crate's error type. Every decoder returns one of these for truncated, oversized or garbage input.

use thiserror::Error;

/// Everything that can go wrong decoding or authenticating anomos protocol data (Bitcoin wire errors live in
/// [`crate::btc::BtcError`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Input ended before a complete structure was read.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    /// A length field or a whole input is larger than the protocol allows.
    #[error("{what} too large: {len} bytes (limit {limit})")]
    TooLarge { what: &'static str, len: usize, limit: usize },
    /// Input has the wrong fixed size.
    #[error("{what} has wrong length {len} (expected {expected})")]
    BadLength { what: &'static str, len: usize, expected: usize },
    /// The 8-byte protocol magic is not one we speak.
    #[error("bad protocol magic {0:02x?}")]
    BadMagic([u8; 8]),
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {0}")]
    BadVersion(u16),
    /// A field holds a value outside its domain.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    /// An AEAD tag did not verify: the data was corrupted, forged, or sealed under another key.
    #[error("authentication failed ({0})")]
    BadTag(&'static str),
    /// An RSA signature did not verify.
    #[error("bad signature ({0})")]
    BadSignature(&'static str),
    /// RSA-OAEP decryption failed (wrong key or corrupted ciphertext).
    #[error("RSA decryption failed ({0})")]
    RsaDecrypt(&'static str),
    /// An RSA key is malformed, or of a size/exponent we do not accept.
    #[error("bad RSA key: {0}")]
    BadKey(String),
    /// The acceptor of a link handshake refused us (SPEC §5.3): `Refused` (not a current neighbor, or a bad
    /// signature: most often the acceptor has not yet learned of the edge) or `Busy` (no room for a link).
    #[error("link refused by acceptor: {0:?}")]
    LinkRefused(crate::link::AuthStatus),
    /// A tracking code has expired.
    #[error("tracking code expired at {expires} (now {now})")]
    Expired { expires: u64, now: u64 },
    /// A tracking code claims to stay valid for longer than the protocol allows ([`crate::tc::MAX_LAYER_LIFETIME`]).
    #[error("tracking code expiry {expires} lies beyond the protocol's bound (now {now} + {max} s)")]
    ExpiryTooFar { expires: u64, now: u64, max: u64 },
    /// A path is longer than a tracking code can carry for these key sizes.
    #[error("path does not fit a tracking code: {0}")]
    PathTooLong(String),
    /// A message did not decode (serde/bincode).
    #[error("malformed {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    /// A counter nonce would wrap; the key must be retired.
    #[error("nonce counter exhausted")]
    NonceExhausted,
    /// The state machine received a message it did not expect now.
    #[error("unexpected {0} in this state")]
    Unexpected(&'static str),
    /// PEM/file level key I/O problem (only from helpers that touch files).
    #[error("key file: {0}")]
    KeyFile(String),
}

/// Shorthand.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// Splits `n` bytes off the front of `buf`, or reports truncation.
pub(crate) fn take<'a>(buf: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8]> {
    if buf.len() < n {
        return Err(ProtoError::Truncated { what, need: n, have: buf.len() });
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// Reads a fixed-size array off the front of `buf`.
pub(crate) fn take_array<const N: usize>(buf: &mut &[u8], what: &'static str) -> Result<[u8; N]> {
    let s = take(buf, N, what)?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Ok(out)
}

pub(crate) fn take_u16(buf: &mut &[u8], what: &'static str) -> Result<u16> {
    Ok(u16::from_be_bytes(take_array(buf, what)?))
}

pub(crate) fn take_u64(buf: &mut &[u8], what: &'static str) -> Result<u64> {
    Ok(u64::from_be_bytes(take_array(buf, what)?))
}
