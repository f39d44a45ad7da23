//! A keyed hasher for fingerprint-keyed maps of the graph. Path finding is dominated by map lookups of 32-byte
//! fingerprints; SipHash-1-3 (std's default) spent about 40 % of a request on hashing. Fingerprints are SHA-256
//! digests of RSA keys, so an attacker can steer one only by generating keys; the hash is keyed with 128 random
//! bits per map (from std's `RandomState`) and every output bit depends on every input bit, so which fingerprints
//! share a bucket cannot be predicted without the key. Not a cryptographic MAC, and not used for anything but
//! bucket placement.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

/// A map keyed by fingerprints (or anything), hashed with [`KeyedState`].
pub(crate) type FpMap<K, V> = HashMap<K, V, KeyedState>;
/// A set hashed with [`KeyedState`].
pub(crate) type FpSet<K> = HashSet<K, KeyedState>;

const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// Folded 64×64→128 multiply: the high and low halves xored.
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Random keys per map.
#[derive(Clone, Debug)]
pub(crate) struct KeyedState {
    k0: u64,
    k1: u64,
}

impl Default for KeyedState {
    fn default() -> Self {
        if anomos_net::rt::is_simulated() {
            // Keys from the simulation's seed: the graph's iteration orders (neighbor lists, path candidates) then
            // replay with it.
            let s = anomos_net::rt::seed_rng();
            let word = |i: usize| s.get(i..i + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            return KeyedState { k0: word(0), k1: word(8) | 1 };
        }
        let s = RandomState::new();
        KeyedState { k0: s.hash_one(0x616e_6f6d_6f73u64), k1: s.hash_one(0x006b_6579_6564_u64) | 1 }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher { h: self.k0, k: self.k1 }
    }
}

/// The hasher of [`KeyedState`].
pub(crate) struct KeyedHasher {
    h: u64,
    k: u64,
}

impl KeyedHasher {
    fn mix(&mut self, w: u64) {
        self.h = fold(self.h ^ w, self.k ^ MUL).rotate_left(23);
    }
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            for (d, b) in w.iter_mut().zip(rest) {
                *d = *b;
            }
            self.mix(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        fold(self.h, self.k.rotate_left(32) ^ MUL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_spreads_and_depends_on_every_byte() {
        let s = KeyedState::default();
        let t = KeyedState::default();
        let mut seen = HashSet::new();
        for i in 0..32 {
            let mut a = [0u8; 32];
            a[i] = 1;
            seen.insert(s.hash_one(a));
        }
        seen.insert(s.hash_one([0u8; 32]));
        assert_eq!(seen.len(), 33, "a changed byte must change the hash");
        assert_ne!(s.hash_one([7u8; 32]), t.hash_one([7u8; 32]), "maps are keyed apart");
        // Low bits (bucket index) spread: 4,096 sequential keys over 256 buckets, none far over its share.
        let mut buckets = [0u32; 256];
        for i in 0u32..4096 {
            let mut a = [0u8; 32];
            a[..4].copy_from_slice(&i.to_le_bytes());
            buckets[(s.hash_one(a) & 255) as usize] += 1;
        }
        assert!(buckets.iter().all(|b| *b < 48), "{buckets:?}");
    }
}
