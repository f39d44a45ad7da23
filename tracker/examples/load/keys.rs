//! Fast RSA-2048 identities for simulated peers: a pool of primes, one key per pair of primes.
//!
//! Generating a real RSA-2048 key costs 0.1–0.5 s of CPU (two 1024-bit primes), so 100,000 peers would need
//! hours before the first announce. Instead the generator makes P primes (P/2 ordinary keys from a seeded rng,
//! cached in the temp dir, so a rerun with the same seed starts at once) and gives peer k the key p_i·q_j of the
//! k-th pair i < j: P primes give P(P−1)/2 distinct 2048-bit moduli (the primes have their top two bits set),
//! e.g. 448 primes for 100,000 peers, ~40 s of key generation on one core instead of hours.
//!
//! The trade-off: keys that share a prime are broken (gcd of two moduli factors both), so these identities are
//! for load tests only. The tracker cannot tell and does not care: it checks size, exponent and proof of
//! possession, and every key here is a valid, distinct RSA-2048 key with its own fingerprint, costing the tracker
//! exactly what a real peer's costs. (Keys drawn one by one from a seeded rng would be independent and just as
//! reproducible, but cost the full generation time per peer; a pre-generated pool on disk would have to be
//! shipped or generated once, which is the same cost.)

use std::path::Path;
use std::sync::Arc;

use anomos_proto::identity::PublicKey;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PSS_SHA256};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rsa::traits::PrivateKeyParts;
use rsa::{BigUint, RsaPrivateKey};

/// A simulated peer's identity: its public key as the protocol sends it, and AWS-LC's signing key (PSS-SHA256
/// with a 32-byte salt, what `Identity::sign` produces, but in AWS-LC rather than the pure-Rust `rsa` crate).
pub struct PeerKey {
    pub der: Vec<u8>,
    /// SHA-256 of the DER (the peer's fingerprint).
    pub fingerprint: anomos_proto::identity::Fingerprint,
    pair: RsaKeyPair,
}

impl PeerKey {
    /// RSA-PSS(SHA-256) signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        self.pair.sign(&RSA_PSS_SHA256, &SystemRandom::new(), msg, &mut sig).map_err(|e| format!("sign: {e}"))?;
        Ok(sig)
    }
}

/// The smallest prime count whose pairs cover `n` keys.
fn primes_for(n: usize) -> usize {
    let mut p = 2;
    while p * (p - 1) / 2 < n {
        p += 1;
    }
    p
}

/// The pair (i, j), i < j, of key index `k`, in the order (0,1), (0,2), (1,2), (0,3), …
fn pair(k: usize) -> (usize, usize) {
    let mut j = 1;
    while j * (j + 1) / 2 <= k {
        j += 1;
    }
    (k - j * (j - 1) / 2, j)
}

/// The primes, loaded from the cache and topped up by generation.
pub struct KeyPool {
    primes: Vec<BigUint>,
}

impl KeyPool {
    /// Primes for `n` keys. Key number `g` of the pool comes from `ChaCha20Rng::seed_from_u64(seed + g)`, so the
    /// cache file (`<dir>/anomos-load-primes-<seed>.hex`) only ever grows and stays valid.
    pub fn load_or_generate(n: usize, seed: u64, dir: &Path) -> Result<Self, String> {
        let want = primes_for(n);
        let path = dir.join(format!("anomos-load-primes-{seed}.hex"));
        let mut primes: Vec<BigUint> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| hex::decode(l.trim()).ok().map(|b| BigUint::from_bytes_be(&b)))
            .filter(|p| p.bits() == 1024)
            .collect();
        primes.truncate(primes.len() & !1);
        if primes.len() < want {
            let have = primes.len() / 2;
            let gens = (want - primes.len()).div_ceil(2);
            eprintln!("load: generating {gens} RSA-2048 keys for {} primes (cached in {})", gens * 2, path.display());
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(gens.max(1));
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let next = Arc::clone(&next);
                    std::thread::spawn(move || {
                        let mut out = Vec::new();
                        loop {
                            let g = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if g >= gens {
                                return out;
                            }
                            let mut rng = ChaCha20Rng::seed_from_u64(seed.wrapping_add((have + g) as u64));
                            let key = RsaPrivateKey::new(&mut rng, 2048).map_err(|e| e.to_string());
                            out.push((g, key.map(|k| k.primes().to_vec())));
                        }
                    })
                })
                .collect();
            let mut made: Vec<(usize, Result<Vec<BigUint>, String>)> = Vec::new();
            for w in workers {
                made.extend(w.join().map_err(|_| "key generation thread panicked".to_string())?);
            }
            made.sort_by_key(|(g, _)| *g);
            for (_, ps) in made {
                primes.extend(ps?);
            }
            let text: String = primes.iter().map(|p| hex::encode(p.to_bytes_be()) + "\n").collect();
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("load: cannot cache primes in {}: {e}", path.display());
            }
        }
        Ok(KeyPool { primes })
    }

    /// Key number `k` (< the `n` the pool was made for).
    pub fn key(&self, k: usize) -> Result<PeerKey, String> {
        let (i, j) = pair(k);
        let (p, q) = (self.primes[i].clone(), self.primes[j].clone());
        let private = RsaPrivateKey::from_p_q(p, q, BigUint::from(65_537u32)).map_err(|e| e.to_string())?;
        let der = private.to_public_key().to_public_key_der().map_err(|e| e.to_string())?.into_vec();
        // Checked by the protocol's own decoder: 2048 bits, e = 65537, canonical DER.
        PublicKey::from_der(&der).map_err(|e| format!("key {k}: {e}"))?;
        let pkcs8 = private.to_pkcs8_der().map_err(|e| e.to_string())?;
        let pair = RsaKeyPair::from_pkcs8(pkcs8.as_bytes()).map_err(|e| format!("AWS-LC refused key {k}: {e}"))?;
        let fingerprint = anomos_proto::identity::Fingerprint(anomos_proto::crypto::sha256(&[&der]));
        Ok(PeerKey { der, fingerprint, pair })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pairs_enumerate_every_pair_once() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..super::primes_for(1000) * (super::primes_for(1000) - 1) / 2 {
            let (i, j) = super::pair(k);
            assert!(i < j && j < super::primes_for(1000) && seen.insert((i, j)), "{k}: ({i}, {j})");
        }
        assert_eq!(super::primes_for(100_000), 448);
    }
}
