//! Fixtures shared by the anomos-proto fuzz targets: the committed vector identities (loaded once from
//! `proto/tests/vectors/keys/`), seeded rngs, and a helper that fits fuzz input to a fixed-size buffer.
//!
//! Everything here is deterministic, so a crashing input reproduces on every run.

use std::sync::OnceLock;

use anomos_proto::identity::Identity;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// The committed vector identities: id0..id2 are 2048-bit, id3 is 3072-bit.
pub fn ids() -> &'static [Identity; 4] {
    static IDS: OnceLock<[Identity; 4]> = OnceLock::new();
    IDS.get_or_init(|| {
        let load = |pem: &str| Identity::from_pkcs8_pem(pem).expect("committed vector key");
        [
            load(include_str!("../../tests/vectors/keys/id0_2048.pem")),
            load(include_str!("../../tests/vectors/keys/id1_2048.pem")),
            load(include_str!("../../tests/vectors/keys/id2_2048.pem")),
            load(include_str!("../../tests/vectors/keys/id3_3072.pem")),
        ]
    })
}

/// `ChaCha20Rng::seed_from_u64(seed)`.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// `data` truncated or zero-padded to `N` bytes.
pub fn fit<const N: usize>(data: &[u8]) -> Box<[u8; N]> {
    let mut out = Box::new([0u8; N]);
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    out
}

/// Splits off the mode byte: `(mode, rest)`; empty input is mode 0 with no payload.
pub fn mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, &[]),
    }
}
