//! Long-term RSA identities of peers and the tracker.
//!
//! * Key sizes: 2048 (default) or 3072 bits, public exponent 65537; anything else is refused on decode, because
//!   tracking-code capacity (SPEC.md §4) is computed for those modulus sizes.
//! * Fingerprint: SHA-256 of the SubjectPublicKeyInfo DER, shown as lowercase hex.
//! * Encryption: RSA-OAEP with SHA-256 (label empty). Signatures: RSA-PSS with SHA-256, salt length 32.
//! * OAEP decryption, the private operation on attacker-chosen input (every TC peel, every tracker ClientHello),
//!   runs in AWS-LC through `aws-lc-rs`: constant-time exponentiation with blinding and a constant-time OAEP
//!   padding check, so its timing depends neither on the key nor on the ciphertext. The pure-Rust `rsa` crate is
//!   not constant-time (RUSTSEC-2023-0071, "Marvin"); it keeps key generation, PEM/DER encoding and the seeded
//!   encryption of the known-answer vectors ([`PublicKey::encrypt_seeded`]), none of which touches the private key
//!   with attacker-chosen input. Encryption ([`PublicKey::encrypt`]) and verification run in AWS-LC, for speed.
//! * PSS signing (probe answers, link AUTH, the tracker Hello) runs in AWS-LC too ([`Signer::AwsLc`]), for every
//!   identity that is generated, parsed or loaded. Only the known-answer vectors (SPEC Appendix A), which need
//!   the salt drawn from a seeded rng, opt in to the `rsa` crate's signer ([`Identity::with_seeded_signer`]).
//!   SPEC.md §11.8.

use rand::{CryptoRng, RngCore};
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::pss::BlindedSigningKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Oaep, RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::Arc;
use zeroize::Zeroize;

use crate::crypto::sha256;
use crate::error::{ProtoError, Result};

/// Default identity key size.
pub const DEFAULT_KEY_BITS: usize = 2048;
/// Key sizes we generate and accept.
pub const ALLOWED_KEY_BITS: [usize; 2] = [2048, 3072];
/// Largest RSA modulus (and so OAEP ciphertext / PSS signature) in bytes.
pub const MAX_RSA_BYTES: usize = 384;
/// Largest SubjectPublicKeyInfo DER we accept for an allowed key (3072-bit is 422 bytes).
pub const MAX_SPKI_LEN: usize = 600;

/// SHA-256 of a public key's SubjectPublicKeyInfo DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self> {
        let v =
            hex::decode(s.trim()).map_err(|e| ProtoError::Invalid { what: "fingerprint", detail: e.to_string() })?;
        let arr: [u8; 32] = v.try_into().map_err(|v: Vec<u8>| ProtoError::BadLength {
            what: "fingerprint",
            len: v.len(),
            expected: 32,
        })?;
        Ok(Fingerprint(arr))
    }

    /// First 8 hex characters, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

/// A validated RSA public key together with its DER encoding and fingerprint.
#[derive(Clone)]
pub struct PublicKey {
    key: RsaPublicKey,
    der: Vec<u8>,
    /// PKCS#1 RSAPublicKey DER, the form AWS-LC's verifier takes.
    pkcs1: Arc<[u8]>,
    fp: Fingerprint,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}
impl Eq for PublicKey {}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} bits, {})", self.bits(), self.fp.short())
    }
}

fn check_key(key: &RsaPublicKey) -> Result<()> {
    // The modulus' exact bit length: `size()` rounds up to whole bytes and would pass a 2041-bit key as 2048.
    let bits = key.n().bits();
    if !ALLOWED_KEY_BITS.contains(&bits) {
        return Err(ProtoError::BadKey(format!("modulus of {bits} bits (allowed: 2048, 3072)")));
    }
    if key.e() != &BigUint::from(65537u32) {
        return Err(ProtoError::BadKey("public exponent is not 65537".into()));
    }
    Ok(())
}

impl PublicKey {
    fn from_rsa(key: RsaPublicKey) -> Result<Self> {
        check_key(&key)?;
        let der = key.to_public_key_der().map_err(|e| ProtoError::BadKey(e.to_string()))?.into_vec();
        let pkcs1 = key.to_pkcs1_der().map_err(|e| ProtoError::BadKey(e.to_string()))?.as_bytes().into();
        let fp = Fingerprint(sha256(&[&der]));
        Ok(PublicKey { key, der, pkcs1, fp })
    }

    /// Decodes SubjectPublicKeyInfo DER (what goes on the wire), refusing oversized input and disallowed keys.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        if der.len() > MAX_SPKI_LEN {
            return Err(ProtoError::TooLarge { what: "public key DER", len: der.len(), limit: MAX_SPKI_LEN });
        }
        let key = RsaPublicKey::from_public_key_der(der).map_err(|e| ProtoError::BadKey(e.to_string()))?;
        let pk = Self::from_rsa(key)?;
        if pk.der != der {
            return Err(ProtoError::BadKey("non-canonical DER".into()));
        }
        Ok(pk)
    }

    /// SubjectPublicKeyInfo DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the DER.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fp
    }

    /// Modulus size in bytes (= OAEP ciphertext and signature size).
    pub fn size(&self) -> usize {
        self.key.size()
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.key.size() * 8
    }

    /// RSA-OAEP(SHA-256, MGF1-SHA-256, no label) encryption of a short message (≤ size − 66 bytes).
    ///
    /// By AWS-LC, as the decryption and the signatures: about ten times faster than the `rsa` crate's (a circuit
    /// grant encrypts one layer per hop, and that was a third of the tracker's CPU per grant). The OAEP seed comes
    /// from AWS-LC's own generator (seeded by the OS), so the ciphertext cannot be reproduced: known-answer vectors
    /// use [`encrypt_seeded`](Self::encrypt_seeded), which produces the same encoding from a caller's randomness.
    pub fn encrypt(&self, msg: &[u8]) -> Result<Vec<u8>> {
        use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
        let invalid = |detail: &str| ProtoError::Invalid { what: "OAEP plaintext", detail: detail.to_string() };
        let key = PublicEncryptingKey::from_der(&self.der)
            .ok()
            .and_then(|k| OaepPublicEncryptingKey::new(k).ok())
            .ok_or_else(|| invalid("key refused by AWS-LC"))?;
        if msg.len() > key.max_plaintext_size(&OAEP_SHA256_MGF1SHA256) {
            return Err(invalid("message too long for the key"));
        }
        let mut out = vec![0u8; key.ciphertext_size()];
        let n =
            key.encrypt(&OAEP_SHA256_MGF1SHA256, msg, &mut out, None).map_err(|_| invalid("encryption failed"))?.len();
        // Always k bytes (callers copy it into a k-byte slot); anything else is refused, not passed on.
        if n != self.size() {
            return Err(invalid("ciphertext of the wrong length"));
        }
        Ok(out)
    }

    /// The same RSA-OAEP encryption as [`encrypt`](Self::encrypt), its OAEP seed drawn from `rng` (the `rsa`
    /// crate's implementation): a seeded rng gives a reproducible ciphertext, for known-answer vectors and the
    /// version-1 tracker channel's transcript (SPEC §3.2 fixes its order of randomness).
    pub fn encrypt_seeded<R: RngCore + CryptoRng>(&self, rng: &mut R, msg: &[u8]) -> Result<Vec<u8>> {
        self.key
            .encrypt(rng, Oaep::new::<Sha256>(), msg)
            .map_err(|e| ProtoError::Invalid { what: "OAEP plaintext", detail: e.to_string() })
    }

    /// Verifies an RSA-PSS(SHA-256) signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8], what: &'static str) -> Result<()> {
        if sig.len() != self.size() {
            return Err(ProtoError::BadSignature(what));
        }
        // AWS-LC's verifier (PSS, SHA-256, MGF1-SHA-256, salt = digest length, what every signer here uses): about
        // ten times faster than the `rsa` crate's, which cost the tracker a fifth of its CPU per join (two
        // verifications: the session Hello and the probe answer). A public-key operation: nothing secret to leak.
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256, &*self.pkcs1)
            .verify(msg, sig)
            .map_err(|_| ProtoError::BadSignature(what))
    }

    /// [`verify`](Self::verify) with the `rsa` crate's verifier (for cross-checking the two in tests).
    #[cfg(test)]
    fn verify_rsa_crate(&self, msg: &[u8], sig: &[u8]) -> bool {
        use rsa::signature::Verifier;
        rsa::pss::Signature::try_from(sig)
            .is_ok_and(|sig| rsa::pss::VerifyingKey::<Sha256>::new(self.key.clone()).verify(msg, &sig).is_ok())
    }

    /// PEM (SPKI) text.
    pub fn to_pem(&self) -> Result<String> {
        self.key.to_public_key_pem(LineEnding::LF).map_err(|e| ProtoError::KeyFile(e.to_string()))
    }
}

/// Which implementation makes an identity's RSA-PSS(SHA-256) signatures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// AWS-LC: constant-time, blinded; the 32-byte salt comes from AWS-LC's own generator, so the `rng` given to
    /// [`Identity::sign`] is not used. Every identity that is generated, parsed or loaded signs this way.
    AwsLc,
    /// The `rsa` crate with the salt drawn from the caller's rng: the same rng state gives the same signature.
    /// Only for reproducible test vectors: the `rsa` crate's private-key operation is not constant-time
    /// (RUSTSEC-2023-0071).
    SeededRsaCrate,
}

/// A private identity: the RSA private key and its public half.
///
/// The key is held twice: as an `rsa` key (encoding; the seeded signer of the test vectors) and parsed once into
/// AWS-LC's decryption and signing keys, which do every private-key operation of a running peer or tracker.
#[derive(Clone)]
pub struct Identity {
    private: RsaPrivateKey,
    public: PublicKey,
    ct: Arc<ConstantTime>,
    signer: Signer,
}

/// AWS-LC's view of the private key (parsed once from its PKCS#8 DER).
struct ConstantTime {
    decrypting: aws_lc_rs::rsa::OaepPrivateDecryptingKey,
    signing: aws_lc_rs::signature::RsaKeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?})", self.public)
    }
}

impl Identity {
    /// Generates a fresh key of `bits` (2048 or 3072).
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R, bits: usize) -> Result<Self> {
        if !ALLOWED_KEY_BITS.contains(&bits) {
            return Err(ProtoError::BadKey(format!("cannot generate {bits}-bit key (allowed: 2048, 3072)")));
        }
        let private = RsaPrivateKey::new(rng, bits).map_err(|e| ProtoError::BadKey(e.to_string()))?;
        Self::from_private(private)
    }

    fn from_private(private: RsaPrivateKey) -> Result<Self> {
        private.validate().map_err(|e| ProtoError::BadKey(e.to_string()))?;
        let public = PublicKey::from_rsa(private.to_public_key())?;
        let der = private.to_pkcs8_der().map_err(|e| ProtoError::BadKey(e.to_string()))?;
        let bad = |e: aws_lc_rs::error::KeyRejected| ProtoError::BadKey(format!("AWS-LC refused the key: {e}"));
        let decrypting = aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(der.as_bytes()).map_err(bad)?;
        let decrypting = aws_lc_rs::rsa::OaepPrivateDecryptingKey::new(decrypting)
            .map_err(|_| ProtoError::BadKey("AWS-LC refused the key for OAEP".into()))?;
        let signing = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der.as_bytes()).map_err(bad)?;
        if signing.public_modulus_len() != public.size() {
            return Err(ProtoError::BadKey("AWS-LC parsed a different modulus size".into()));
        }
        Ok(Identity { private, public, ct: Arc::new(ConstantTime { decrypting, signing }), signer: Signer::AwsLc })
    }

    /// The same identity, signing with the `rsa` crate and the caller's rng ([`Signer::SeededRsaCrate`]), so that a
    /// seeded rng reproduces every signature. For the known-answer vectors (SPEC Appendix A) only: that signer is
    /// not constant-time (RUSTSEC-2023-0071). Nothing in the peer or the tracker calls this.
    pub fn with_seeded_signer(mut self) -> Self {
        self.signer = Signer::SeededRsaCrate;
        self
    }

    /// Which implementation signs for this identity.
    pub fn signer(&self) -> Signer {
        self.signer
    }

    /// Parses a PKCS#8 PEM private key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self> {
        let private = RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| ProtoError::BadKey(e.to_string()))?;
        Self::from_private(private)
    }

    /// PKCS#8 PEM text of the private key (a secret: write it with mode 0600).
    pub fn to_pkcs8_pem(&self) -> Result<String> {
        Ok(self.private.to_pkcs8_pem(LineEnding::LF).map_err(|e| ProtoError::KeyFile(e.to_string()))?.to_string())
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Shorthand for `public().fingerprint()`.
    pub fn fingerprint(&self) -> Fingerprint {
        self.public.fp
    }

    /// RSA-OAEP(SHA-256, MGF1-SHA-256, empty label) decryption, constant-time (AWS-LC). The ciphertext must be
    /// exactly the modulus size. Every failure gives the same error, whatever went wrong inside.
    pub fn decrypt(&self, ct: &[u8], what: &'static str) -> Result<Vec<u8>> {
        if ct.len() != self.public.size() {
            return Err(ProtoError::BadLength { what, len: ct.len(), expected: self.public.size() });
        }
        let mut out = [0u8; MAX_RSA_BYTES];
        let pt = self
            .ct
            .decrypting
            .decrypt(&aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256, ct, &mut out, None)
            .map(|pt| pt.to_vec());
        out.zeroize();
        pt.map_err(|_| ProtoError::RsaDecrypt(what))
    }

    /// RSA-PSS(SHA-256, MGF1-SHA-256, salt of 32 bytes) signature over `msg`, exactly the modulus size.
    ///
    /// With [`Signer::AwsLc`] (every identity a peer or tracker loads) AWS-LC signs in constant time and draws
    /// the salt itself: `rng` is not used. With [`Signer::SeededRsaCrate`] ([`Identity::with_seeded_signer`], test
    /// vectors only) the `rsa` crate signs, blinded, with the salt drawn from `rng`. Both verify with
    /// [`PublicKey::verify`] (SPEC §11.8).
    #[allow(clippy::expect_used)] // AWS-LC signing cannot fail here: see the comment at the call.
    pub fn sign<R: RngCore + CryptoRng>(&self, rng: &mut R, msg: &[u8]) -> Vec<u8> {
        match self.signer {
            Signer::AwsLc => {
                let mut sig = vec![0u8; self.public.size()];
                // AWS-LC ignores this argument (its own generator draws the salt); it is here for ring's API.
                let unused = aws_lc_rs::rand::SystemRandom::new();
                self.ct
                    .signing
                    .sign(&aws_lc_rs::signature::RSA_PSS_SHA256, &unused, msg, &mut sig)
                    // Fails only on a buffer of the wrong size or an allocation failure inside AWS-LC: the buffer
                    // is the modulus size, checked against AWS-LC's key when the identity was made.
                    .expect("AWS-LC RSA-PSS signing into a modulus-sized buffer");
                sig
            }
            Signer::SeededRsaCrate => {
                BlindedSigningKey::<Sha256>::new(self.private.clone()).sign_with_rng(rng, msg).to_vec()
            }
        }
    }
}

/// Reads a PKCS#8 PEM identity from `path`. On Unix, refuses a file readable by group or others: a private key
/// that others could read must be treated as compromised, not silently used.
pub fn load_identity(path: &std::path::Path) -> Result<Identity> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| ProtoError::KeyFile(format!("{}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProtoError::KeyFile(format!(
                "{}: private key has mode {mode:03o}; it must not be readable by group or others (chmod 600)",
                path.display()
            )));
        }
    }
    let pem = std::fs::read_to_string(path).map_err(|e| ProtoError::KeyFile(format!("{}: {e}", path.display())))?;
    // An operator must learn which file is bad, not only that some key did not parse.
    Identity::from_pkcs8_pem(&pem).map_err(|e| ProtoError::KeyFile(format!("{}: {e}", path.display())))
}

/// Writes `id` as PKCS#8 PEM to `path`, created with mode 0600 (fails if the file exists).
pub fn save_identity(path: &std::path::Path, id: &Identity) -> Result<()> {
    use std::io::Write;
    let pem = id.to_pkcs8_pem()?;
    let bad = |e: std::io::Error| ProtoError::KeyFile(format!("{}: {e}", path.display()));
    // Written whole to a new file beside it, then linked to `path` (which fails if `path` exists): a process ended
    // in the middle leaves no truncated key at `path`. The temporary name is random (pids repeat across containers
    // sharing a volume).
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let (tmp, mut f) = {
        let mut tries = 0;
        loop {
            let tmp = path.with_file_name(format!(
                ".{}.{:016x}.tmp",
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                rand::random::<u64>()
            ));
            match opts.open(&tmp) {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(bad(e)),
            }
        }
    };
    let written = f.write_all(pem.as_bytes()).and_then(|()| f.sync_all());
    drop(f);
    let placed = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
            // A filesystem without hard links (FAT, some network and FUSE mounts): a rename, after the check.
            std::fs::rename(&tmp, path)
        }
        r => r,
    });
    let _ = std::fs::remove_file(&tmp);
    placed.map_err(bad)?;
    // The new name durable too.
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Loads the identity at `path`, or generates one of `bits` and saves it there if the file does not exist.
/// Returns the identity and whether it was created.
pub fn load_or_create_identity(path: &std::path::Path, bits: usize) -> Result<(Identity, bool)> {
    if path.exists() {
        return Ok((load_identity(path)?, false));
    }
    let id = Identity::generate(&mut rand::rngs::OsRng, bits)?;
    save_identity(path, &id)?;
    Ok((id, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn aws_lc_and_rsa_crate_verifiers_agree() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let id = Identity::generate(&mut rng, 2048).unwrap();
        let key = id.public();
        for msg in [&b"anomos"[..], &[0u8; 300][..]] {
            let sig = id.sign(&mut rng, msg);
            assert!(key.verify(msg, &sig, "t").is_ok() && key.verify_rsa_crate(msg, &sig));
            let mut bad = sig.clone();
            bad[10] ^= 1;
            assert!(key.verify(msg, &bad, "t").is_err() && !key.verify_rsa_crate(msg, &bad));
            assert!(key.verify(b"other", &sig, "t").is_err() && !key.verify_rsa_crate(b"other", &sig));
            assert!(key.verify(msg, &sig[1..], "t").is_err());
        }
    }

    #[test]
    fn a_saved_key_is_whole_never_overwritten_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("anomos-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peer.key");
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (a, b) = (Identity::generate(&mut rng, 2048).unwrap(), Identity::generate(&mut rng, 2048).unwrap());
        save_identity(&path, &a).unwrap();
        assert!(save_identity(&path, &b).is_err(), "an existing key is kept");
        assert_eq!(load_identity(&path).unwrap().fingerprint(), a.fingerprint());
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("peer.key")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
