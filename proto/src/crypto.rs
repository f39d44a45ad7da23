//! Symmetric primitives shared by every layer: HKDF-SHA256, AES-256-GCM with counter nonces, AES-256-CTR
//! keystreams for onion layers. All keys are 32 bytes; all nonces are derived from counters, never random,
//! and a counter never repeats under one key (see SPEC.md "Key schedule").
//!
//! AES-256-GCM is AWS-LC's through `aws-lc-rs` (AES-NI/VAES and (V)PCLMUL assembly with aggregated GHASH,
//! about 8x the `aes-gcm` crate's speed per core here and 1.4x `ring`'s, which it replaced; docs/PERFORMANCE.md). It is standard GCM, so the bytes on the wire are the same
//! whichever implementation produced them (the known-answer vectors in `tests/vectors` pin them).

use aes::cipher::{KeyInit, KeyIvInit, StreamCipher};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::error::{ProtoError, Result};

/// Length of every symmetric key and secret.
pub const KEY_LEN: usize = 32;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

/// A 32-byte secret that is wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; KEY_LEN]);

impl Secret {
    /// A fresh random secret.
    pub fn random(rng: &mut impl rand::RngCore) -> Self {
        let mut s = [0u8; KEY_LEN];
        rng.fill_bytes(&mut s);
        Secret(s)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HKDF-SHA256 (RFC 5869): extract with `salt` over the concatenation of `ikm` parts, expand with `info`
/// into a 32-byte key.
pub fn kdf(salt: &[u8], ikm: &[&[u8]], info: &[u8]) -> Secret {
    let mut material = Vec::with_capacity(ikm.iter().map(|p| p.len()).sum());
    for p in ikm {
        material.extend_from_slice(p);
    }
    let hk = Hkdf::<Sha256>::new(Some(salt), &material);
    material.zeroize();
    let mut out = [0u8; KEY_LEN];
    // 32 bytes is far below HKDF's 255*32 limit, so expand cannot fail.
    let _ = hk.expand(info, &mut out);
    Secret(out)
}

/// HKDF-SHA256 expanding to an arbitrary length (at most 8160 bytes).
pub fn kdf_stream(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Result<()> {
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, out)
        .map_err(|_| ProtoError::Invalid { what: "hkdf output length", detail: out.len().to_string() })
}

/// The 96-bit GCM nonce for counter `n`: four zero bytes, then `n` big-endian.
pub fn counter_nonce(n: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&n.to_be_bytes());
    nonce
}

/// One direction of an AES-256-GCM channel with a counter nonce. Sealing and opening each advance the counter,
/// so the same state type serves both ends; a failed open does not advance it (the channel is dead anyway).
pub struct AeadCounter {
    cipher: LessSafeKey,
    next: u64,
}

/// The AES-256-GCM key for `key`.
#[allow(clippy::expect_used)] // Cannot fail: `Secret` is a `[u8; 32]`, exactly an AES-256 key.
fn gcm_key(key: &Secret) -> LessSafeKey {
    // `UnboundKey::new` fails only for a key of the wrong length; `Secret` is always 32 bytes.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.0).expect("AES-256 key is 32 bytes"))
}

/// Seals `buf` in place under `nonce`; fails only for plaintexts beyond GCM's limit (64 GiB).
fn gcm_seal(cipher: &LessSafeKey, nonce: [u8; 12], aad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN]> {
    let tag = cipher
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
        .map_err(|_| ProtoError::TooLarge { what: "AEAD plaintext", len: buf.len(), limit: 1 << 36 })?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens `buf` in place under `nonce` if `tag` verifies (constant-time comparison inside AWS-LC).
fn gcm_open(
    cipher: &LessSafeKey,
    nonce: [u8; 12],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
    what: &'static str,
) -> Result<()> {
    cipher
        .open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), tag, buf)
        .map(|_| ())
        .map_err(|_| ProtoError::BadTag(what))
}

impl AeadCounter {
    /// A channel direction keyed with `key`, counter starting at 0.
    pub fn new(key: &Secret) -> Self {
        AeadCounter { cipher: gcm_key(key), next: 0 }
    }

    /// The counter the next seal/open will use.
    pub fn counter(&self) -> u64 {
        self.next
    }

    fn take_nonce(&mut self) -> Result<[u8; 12]> {
        if self.next == u64::MAX {
            return Err(ProtoError::NonceExhausted);
        }
        let n = counter_nonce(self.next);
        self.next += 1;
        Ok(n)
    }

    /// Encrypts `buf` in place with `aad` and returns the tag.
    pub fn seal_in_place(&mut self, aad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN]> {
        let nonce = self.take_nonce()?;
        gcm_seal(&self.cipher, nonce, aad, buf)
    }

    /// Decrypts `buf` in place if `tag` verifies; the counter advances only on success.
    pub fn open_in_place(&mut self, aad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN], what: &'static str) -> Result<()> {
        if self.next == u64::MAX {
            return Err(ProtoError::NonceExhausted);
        }
        gcm_open(&self.cipher, counter_nonce(self.next), aad, buf, tag, what)?;
        self.next += 1;
        Ok(())
    }

    /// Seals `plaintext` into a new vector `ciphertext || tag`.
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        let tag = self.seal_in_place(aad, &mut out)?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens `ciphertext || tag` into a new vector.
    pub fn open(&mut self, aad: &[u8], sealed: &[u8], what: &'static str) -> Result<Vec<u8>> {
        if sealed.len() < TAG_LEN {
            return Err(ProtoError::Truncated { what, need: TAG_LEN, have: sealed.len() });
        }
        let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut tag_arr = [0u8; TAG_LEN];
        tag_arr.copy_from_slice(tag);
        let mut out = ct.to_vec();
        self.open_in_place(aad, &mut out, &tag_arr, what)?;
        Ok(out)
    }
}

/// One-shot AES-256-GCM with an explicit key and nonce, for single-use keys (tracking-code layers).
pub(crate) fn gcm_seal_once(key: &Secret, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    // Only fails for plaintexts over 64 GiB; TC bodies are 4 KiB.
    gcm_seal(&gcm_key(key), *nonce, aad, buf).unwrap_or([0u8; TAG_LEN])
}

pub(crate) fn gcm_open_once(
    key: &Secret,
    nonce: &[u8; 12],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
    what: &'static str,
) -> Result<()> {
    gcm_open(&gcm_key(key), *nonce, aad, buf, tag, what)
}

/// CTR needs only the encryption key schedule (`Aes256Enc`): setting up a layer skips the decryption round keys.
/// (It is no smaller in memory: the autodetecting type's size is that of its software fallback either way.)
type Aes256Ctr = ctr::Ctr64BE<aes::Aes256Enc>;

/// XORs `buf` with the AES-256-CTR keystream of `key` for cell index `index`: the 128-bit counter block is
/// `index (u64 BE) || block number within the cell (u64 BE)`, so distinct cells never share keystream.
pub fn ctr_apply(key: &Secret, index: u64, buf: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&index.to_be_bytes());
    let mut c = Aes256Ctr::new((&key.0).into(), (&iv).into());
    c.apply_keystream(buf);
}

/// A precomputed AES-256 key schedule for a CTR layer that is applied to many cells.
#[derive(Clone)]
pub struct CtrLayer {
    cipher: aes::Aes256Enc,
}

impl CtrLayer {
    /// Expands `key` once.
    pub fn new(key: &Secret) -> Self {
        CtrLayer { cipher: aes::Aes256Enc::new((&key.0).into()) }
    }

    /// XORs `buf` with this layer's keystream for cell `index` (same stream as [`ctr_apply`]).
    pub fn apply(&self, index: u64, buf: &mut [u8]) {
        use ctr::cipher::InnerIvInit;
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&index.to_be_bytes());
        let core =
            ctr::CtrCore::<aes::Aes256Enc, ctr::flavors::Ctr64BE>::inner_iv_init(self.cipher.clone(), (&iv).into());
        let mut c = Aes256Ctr::from_core(core);
        c.apply_keystream(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_channel_round_trip_and_order() {
        let k = Secret([7u8; 32]);
        let mut a = AeadCounter::new(&k);
        let mut b = AeadCounter::new(&k);
        let s0 = a.seal(b"x", b"hello").unwrap();
        let s1 = a.seal(b"x", b"hello").unwrap();
        assert_ne!(s0, s1, "same plaintext must not give same ciphertext under counter nonces");
        // Out of order fails, and the failure does not advance the counter.
        assert!(b.open(b"x", &s1, "t").is_err());
        assert_eq!(b.open(b"x", &s0, "t").unwrap(), b"hello");
        assert_eq!(b.open(b"x", &s1, "t").unwrap(), b"hello");
        assert!(b.open(b"x", &s1[..3], "t").is_err());
    }

    #[test]
    fn ctr_layer_matches_one_shot_and_differs_per_index() {
        let k = Secret([9u8; 32]);
        let layer = CtrLayer::new(&k);
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        ctr_apply(&k, 5, &mut a);
        layer.apply(5, &mut b);
        assert_eq!(a, b);
        let mut c = vec![0u8; 100];
        layer.apply(6, &mut c);
        assert_ne!(a, c);
    }
}
