//! Shared test fixtures: deterministic identities (generated once per process from fixed seeds).
#![allow(dead_code)]

use std::sync::OnceLock;

use anomos_proto::identity::Identity;
use rand::SeedableRng;

/// Four 2048-bit identities and one 3072-bit, from fixed seeds.
pub fn ids() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        let mut v: Vec<Identity> = (0..4u64)
            .map(|i| Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(i), 2048).unwrap())
            .collect();
        v.push(Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(99), 3072).unwrap());
        v
    })
}

pub fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
    rand_chacha::ChaCha20Rng::seed_from_u64(seed)
}
