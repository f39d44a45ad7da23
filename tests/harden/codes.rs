//! Tracking codes built by the test itself.

use super::*;

// ---------------------------------------------------------------------------------------------------------
// Tracking codes built by the test
// ---------------------------------------------------------------------------------------------------------

/// Secrets of a circuit the test built.
pub struct Built {
    pub tc: Box<[u8; TC_LEN]>,
    pub hop_secrets: Vec<Secret>,
    pub e2e: Secret,
    pub tags: Vec<[u8; 16]>,
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

/// Builds a TC for hops `(key, prev edge)`: all but the last relay to the next hop's `prev`; the last is the
/// target serving `chain`. `expires` is unix seconds.
pub fn build_tc(hops: &[(PublicKey, NeighborId)], chain: &str, expires: u64) -> Built {
    let e2e = Secret(random());
    let mut specs = Vec::new();
    let mut hop_secrets = Vec::new();
    let mut tags = Vec::new();
    for (i, (key, prev)) in hops.iter().enumerate() {
        let hop_secret = Secret(random());
        let tag = random();
        let kind = match hops.get(i + 1) {
            Some((_, next)) => LayerKind::Relay { next: *next },
            None => {
                LayerKind::Target { chain: ChainId::new(chain).unwrap(), session: random(), e2e_secret: e2e.clone() }
            }
        };
        hop_secrets.push(hop_secret.clone());
        tags.push(tag);
        specs.push(HopSpec {
            key: key.clone(),
            layer: Layer { prev: *prev, kind, hop_secret, expires, replay_tag: tag },
        });
    }
    let tc = tc::build(&specs, &mut rand::rngs::OsRng).unwrap();
    Built { tc, hop_secrets, e2e, tags }
}

/// A grant for [`anomos::Node::open_circuit`] from a TC the test built (`first_hop`: the requester's edge).
pub fn grant(b: &Built, first_hop: NeighborId, expires: u64) -> anomos_proto::tracker::CircuitGrant {
    anomos_proto::tracker::CircuitGrant {
        circuit: u64::from_be_bytes(random()),
        first_hop,
        tc: b.tc.to_vec(),
        hop_secrets: b.hop_secrets.iter().map(|s| s.0).collect(),
        e2e_secret: b.e2e.0,
        session: random(),
        expires,
    }
}

/// Every 16-byte window of `b`, for "does any of these appear" searches.
pub fn windows16(b: &[u8]) -> std::collections::HashSet<[u8; 16]> {
    b.windows(16).map(|w| w.try_into().unwrap()).collect()
}

/// Whether any 16-byte window of `hay` is in `set`.
pub fn any_window(hay: &[u8], set: &std::collections::HashSet<[u8; 16]>) -> bool {
    hay.windows(16).any(|w| set.contains(<&[u8; 16]>::try_from(w).unwrap()))
}
