//! Tracking codes (TCs): fixed-size onions the tracker builds and each hop peels once.
//!
//! Every TC on the wire is exactly [`TC_LEN`] bytes. At a hop whose RSA modulus is `k` bytes:
//!
//! ```text
//! TC  = R (k bytes)  RSA-OAEP-SHA256(hop key, seed[32])
//!     | T (16)       AES-256-GCM tag
//!     | C (TC_LEN-k-16)  AES-256-GCM(key = HKDF(seed,"body"), nonce = 0, aad = "anomos-tc-v1",
//!                                     header[LAYER_HEADER_LEN] || inner)
//! next TC = inner || HKDF-expand(seed, "pad", k + 16 + LAYER_HEADER_LEN)
//! ```
//!
//! The tag covers the header *and everything nested inside it*. A peel shortens the onion by
//! `k + 16 + LAYER_HEADER_LEN` bytes and appends as many pseudo-random bytes, so every hop sees exactly
//! TC_LEN bytes and cannot tell its position. Because those pad bytes are derived from the hop's seed, the
//! builder can compute them in advance (the "filler", as in Sphinx) and include them under every inner tag.

use rand::{CryptoRng, RngCore};

use crate::crypto::{gcm_open_once, gcm_seal_once, kdf, kdf_stream, Secret, TAG_LEN};
use crate::error::{take, take_array, take_u64, ProtoError, Result};
use crate::identity::{Identity, PublicKey, ALLOWED_KEY_BITS};
use crate::ids::{ChainId, NeighborId, SessionId, CHAIN_ID_MAX};

/// Size of every tracking code (as in the original Anomos).
pub const TC_LEN: usize = 4096;
/// Size of one layer's plaintext header.
pub const LAYER_HEADER_LEN: usize = 160;
/// Most layers (relays + target) one TC carries; fits even when every hop has a 3072-bit key.
pub const MAX_LAYERS: usize = 7;
/// Layer format version.
pub const LAYER_VERSION: u8 = 1;
/// Size of a layer seed (the OAEP plaintext of each layer).
pub const SEED_LEN: usize = 32;
const AAD: &[u8] = b"anomos-tc-v1";
const KDF_SALT: &[u8] = b"anomos tc v1";
const ZERO_NONCE: [u8; 12] = [0u8; 12];

/// What a layer tells its hop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerKind {
    /// Forward the (peeled) TC to the neighbor at the end of edge `next`.
    Relay {
        /// Edge to the next hop.
        next: NeighborId,
    },
    /// This hop is the circuit's target.
    Target {
        /// The chain the requester wants.
        chain: ChainId,
        /// The circuit's session identifier (fresh per circuit, so targets cannot link the circuits of one request).
        session: SessionId,
        /// End-to-end secret shared with the requester (SPEC.md §7.2).
        e2e_secret: Secret,
    },
}

/// The longest a layer may stay valid: its `expires` may lie at most this far (plus the hop's clock-skew
/// tolerance) after the hop's clock. The tracker's `--tc-ttl` cannot exceed it (SPEC §3.10, §4.7).
pub const MAX_LAYER_LIFETIME: u64 = 86_400;

/// One hop's layer: its instructions and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The edge the OPEN must arrive on (the hop checks it against the link it came in on).
    pub prev: NeighborId,
    /// Relay or target.
    pub kind: LayerKind,
    /// The secret from which this hop's onion-layer keys for DATA are derived.
    pub hop_secret: Secret,
    /// Unix time (seconds) after which the TC must be refused.
    pub expires: u64,
    /// Random tag; a hop accepts a given tag at most once (until expiry).
    pub replay_tag: [u8; 16],
}

impl Layer {
    fn encode(&self) -> [u8; LAYER_HEADER_LEN] {
        let mut h = [0u8; LAYER_HEADER_LEN];
        h[0] = LAYER_VERSION;
        h[2..10].copy_from_slice(&self.prev.0.to_be_bytes());
        h[18..50].copy_from_slice(&self.hop_secret.0);
        match &self.kind {
            LayerKind::Relay { next } => {
                h[1] = 1;
                h[10..18].copy_from_slice(&next.0.to_be_bytes());
            }
            LayerKind::Target { chain, session, e2e_secret } => {
                h[1] = 2;
                h[50..82].copy_from_slice(&e2e_secret.0);
                h[82..114].copy_from_slice(&chain.to_fixed());
                h[114..130].copy_from_slice(session);
            }
        }
        h[130..138].copy_from_slice(&self.expires.to_be_bytes());
        h[138..154].copy_from_slice(&self.replay_tag);
        h
    }

    fn decode(h: &[u8]) -> Result<Self> {
        let mut p = h;
        let [version, kind] = take_array::<2>(&mut p, "layer header")?;
        if version != LAYER_VERSION {
            return Err(ProtoError::BadVersion(version as u16));
        }
        let prev = NeighborId(take_u64(&mut p, "layer prev")?);
        let next = take_u64(&mut p, "layer next")?;
        let hop_secret = Secret(take_array(&mut p, "layer hop secret")?);
        let e2e = take_array::<32>(&mut p, "layer e2e secret")?;
        let chain = take_array::<CHAIN_ID_MAX>(&mut p, "layer chain")?;
        let session: SessionId = take_array(&mut p, "layer session")?;
        let expires = take_u64(&mut p, "layer expiry")?;
        let replay_tag = take_array(&mut p, "layer replay tag")?;
        let reserved = take(&mut p, 6, "layer reserved")?;
        let bad = |d: &str| ProtoError::Invalid { what: "tracking code layer", detail: d.to_string() };
        if reserved.iter().any(|&b| b != 0) {
            return Err(bad("reserved bytes not zero"));
        }
        if prev.0 == 0 {
            return Err(bad("zero prev NeighborID"));
        }
        let kind = match kind {
            1 => {
                if next == 0 || e2e != [0u8; 32] || chain != [0u8; CHAIN_ID_MAX] || session != [0u8; 16] {
                    return Err(bad("relay layer with target fields"));
                }
                LayerKind::Relay { next: NeighborId(next) }
            }
            2 => {
                if next != 0 {
                    return Err(bad("target layer with a next hop"));
                }
                LayerKind::Target { chain: ChainId::from_fixed(&chain)?, session, e2e_secret: Secret(e2e) }
            }
            k => return Err(bad(&format!("unknown kind {k}"))),
        };
        Ok(Layer { prev, kind, hop_secret, expires, replay_tag })
    }

    /// Refuses an expired layer, and one whose expiry lies further ahead than any tracker may issue
    /// ([`MAX_LAYER_LIFETIME`], SPEC §4.7): such a tag would otherwise sit in the hop's replay cache for ever.
    /// `skew` is the clock difference tolerated between tracker and hop.
    pub fn check_expiry(&self, now: u64, skew: u64) -> Result<()> {
        if now > self.expires.saturating_add(skew) {
            return Err(ProtoError::Expired { expires: self.expires, now });
        }
        let max = MAX_LAYER_LIFETIME.saturating_add(skew);
        if self.expires > now.saturating_add(max) {
            return Err(ProtoError::ExpiryTooFar { expires: self.expires, now, max });
        }
        Ok(())
    }
}

/// One hop of a path to build: the hop's public key and its layer.
#[derive(Debug, Clone)]
pub struct HopSpec {
    /// The hop's identity key (the layer seed is encrypted to it).
    pub key: PublicKey,
    /// What the hop will read.
    pub layer: Layer,
}

/// The result of peeling one layer.
#[derive(Debug)]
pub struct Peeled {
    /// This hop's layer.
    pub layer: Layer,
    /// For a relay layer, the TC to forward; `None` for a target layer.
    pub next: Option<Box<[u8; TC_LEN]>>,
}

struct LayerKeys {
    body: Secret,
    pad: Vec<u8>,
}

fn layer_keys(seed: &[u8; SEED_LEN], k: usize) -> Result<LayerKeys> {
    let body = kdf(KDF_SALT, &[seed], b"body");
    let mut pad = vec![0u8; shift(k)];
    kdf_stream(KDF_SALT, seed, b"pad", &mut pad)?;
    Ok(LayerKeys { body, pad })
}

/// How many bytes a hop with a `k`-byte modulus strips (and re-pads).
fn shift(k: usize) -> usize {
    k + TAG_LEN + LAYER_HEADER_LEN
}

fn body_len(k: usize) -> usize {
    TC_LEN - k - TAG_LEN
}

/// Peels this hop's layer off `tc`. Costs one RSA-OAEP decryption and one AES-GCM pass over ~4 KiB.
/// The caller checks expiry, the replay tag and the incoming link.
pub fn peel(tc: &[u8; TC_LEN], id: &Identity) -> Result<Peeled> {
    let k = id.public().size();
    let head = tc.get(..k).ok_or(ProtoError::BadLength { what: "tracking code layer", len: TC_LEN, expected: k })?;
    let seed_vec = id.decrypt(head, "tracking code layer")?;
    let seed: [u8; SEED_LEN] = seed_vec.as_slice().try_into().map_err(|_| ProtoError::BadLength {
        what: "TC seed",
        len: seed_vec.len(),
        expected: SEED_LEN,
    })?;
    peel_with_seed(&seed, tc, k)
}

/// The part of [`peel`] after the RSA step: given the layer seed that `tc[..k]` decrypted to (`k` is the hop's
/// modulus size in bytes, 256 or 384), opens the layer body, decodes the header and builds the next TC
/// (inner onion followed by the seed's pad). [`peel`] does exactly this after its OAEP decryption.
///
/// Public so the fuzz target `tc_body` can run the code every peel runs on hostile bytes at full speed, without
/// an RSA operation per input (SPEC §4). A sender can put any seed it likes under a hop's public key, so every
/// seed is as reachable here as through [`peel`]. Not needed otherwise: a hop always peels with [`peel`].
pub fn peel_with_seed(seed: &[u8; SEED_LEN], tc: &[u8; TC_LEN], k: usize) -> Result<Peeled> {
    if !ALLOWED_KEY_BITS.iter().any(|bits| bits / 8 == k) {
        return Err(ProtoError::Invalid { what: "tracking code layer", detail: format!("modulus of {k} bytes") });
    }
    let keys = layer_keys(seed, k)?;
    let short = || ProtoError::BadLength { what: "tracking code layer", len: TC_LEN, expected: k + TAG_LEN };
    let (tag, sealed) = tc.get(k..).and_then(|rest| rest.split_first_chunk::<TAG_LEN>()).ok_or_else(short)?;
    let mut body = sealed.to_vec();
    gcm_open_once(&keys.body, &ZERO_NONCE, AAD, &mut body, tag, "tracking code layer")?;
    let (header, inner) = body.split_at_checked(LAYER_HEADER_LEN).ok_or_else(short)?;
    let layer = Layer::decode(header)?;
    let next = match layer.kind {
        LayerKind::Relay { .. } => {
            // The next TC: the inner onion, then this layer's pad (as long as what we took off: `k + TAG +
            // header`, so the TC keeps its size).
            let mut next = Box::new([0u8; TC_LEN]);
            let (front, back) = next.split_at_mut_checked(inner.len()).ok_or_else(short)?;
            if back.len() != keys.pad.len() {
                return Err(ProtoError::BadLength {
                    what: "tracking code pad",
                    len: keys.pad.len(),
                    expected: back.len(),
                });
            }
            front.copy_from_slice(inner);
            back.copy_from_slice(&keys.pad);
            Some(next)
        }
        LayerKind::Target { .. } => None,
    };
    Ok(Peeled { layer, next })
}

/// Builds the TC for `hops` (first hop first; the last must be the target layer, all others relay layers).
/// The seeds and the fill come from `rng`; each layer's RSA-OAEP encryption is AWS-LC's, with its own randomness
/// ([`PublicKey::encrypt`]), so the TC is not reproducible: [`build_reproducible`] is, for known-answer vectors.
pub fn build<R: RngCore + CryptoRng>(hops: &[HopSpec], rng: &mut R) -> Result<Box<[u8; TC_LEN]>> {
    build_with(hops, rng, false)
}

/// [`build`] with all randomness (seeds, OAEP, fill) from `rng` ([`PublicKey::encrypt_seeded`]): a seeded rng
/// gives a reproducible TC. The same format; about ten times the CPU for its RSA step.
pub fn build_reproducible<R: RngCore + CryptoRng>(hops: &[HopSpec], rng: &mut R) -> Result<Box<[u8; TC_LEN]>> {
    build_with(hops, rng, true)
}

/// [`build`], or with `seeded_oaep` [`build_reproducible`].
///
/// Runs at the tracker over its own path (no hostile input). Bounds of the indexing below: `j < n` indexes the
/// per-hop vectors of length `n`; `k` is 256 or 384 (`PublicKey` admits no other size), so `k + TAG_LEN < TC_LEN`;
/// the capacity check keeps `filler.len() + LAYER_HEADER_LEN ≤ blen`, so every split of `body` and of a keystream
/// is in range; and `inner` is a whole TC, longer than `blen - LAYER_HEADER_LEN`.
#[allow(clippy::indexing_slicing)]
fn build_with<R: RngCore + CryptoRng>(hops: &[HopSpec], rng: &mut R, seeded_oaep: bool) -> Result<Box<[u8; TC_LEN]>> {
    let n = hops.len();
    if n == 0 || n > MAX_LAYERS {
        return Err(ProtoError::PathTooLong(format!("{n} layers (1..={MAX_LAYERS})")));
    }
    for (i, h) in hops.iter().enumerate() {
        let is_target = matches!(h.layer.kind, LayerKind::Target { .. });
        if is_target != (i == n - 1) {
            return Err(ProtoError::Invalid {
                what: "path",
                detail: "the last layer, and only it, must be a target layer".into(),
            });
        }
    }
    // Per-hop seeds, keys, GCM keystreams and the filler each hop will find at the end of its TC.
    let mut seeds = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut keystreams = Vec::with_capacity(n);
    let mut filler: Vec<u8> = Vec::new();
    let mut fillers = Vec::with_capacity(n);
    for h in hops {
        let k = h.key.size();
        let mut seed = [0u8; SEED_LEN];
        rng.fill_bytes(&mut seed);
        let lk = layer_keys(&seed, k)?;
        let blen = body_len(k);
        if filler.len() + LAYER_HEADER_LEN > blen {
            return Err(ProtoError::PathTooLong(format!("{n} layers with these key sizes exceed {TC_LEN} bytes")));
        }
        // GCM encrypts as plaintext XOR keystream; encrypting zeros under this single-use key yields the
        // keystream (that ciphertext is discarded, never sent).
        let mut ks = vec![0u8; blen];
        gcm_seal_once(&lk.body, &ZERO_NONCE, AAD, &mut ks);
        fillers.push(filler.clone());
        let tail = blen - filler.len();
        for (f, s) in filler.iter_mut().zip(&ks[tail..]) {
            *f ^= s;
        }
        filler.extend_from_slice(&lk.pad);
        seeds.push(seed);
        keys.push(lk);
        keystreams.push(ks);
    }
    // From the target outwards.
    let mut next: Option<Box<[u8; TC_LEN]>> = None;
    for j in (0..n).rev() {
        let k = hops[j].key.size();
        let blen = body_len(k);
        let mut body = vec![0u8; blen];
        body[..LAYER_HEADER_LEN].copy_from_slice(&hops[j].layer.encode());
        match &next {
            Some(inner) => body[LAYER_HEADER_LEN..].copy_from_slice(&inner[..blen - LAYER_HEADER_LEN]),
            None => {
                // Target: random fill, then whatever makes the ciphertext's tail equal the filler.
                let f = &fillers[j];
                let fill_end = blen - f.len();
                rng.fill_bytes(&mut body[LAYER_HEADER_LEN..fill_end]);
                for ((b, fb), s) in body[fill_end..].iter_mut().zip(f).zip(&keystreams[j][fill_end..]) {
                    *b = fb ^ s;
                }
            }
        }
        let tag = gcm_seal_once(&keys[j].body, &ZERO_NONCE, AAD, &mut body);
        let rsa = match seeded_oaep {
            true => hops[j].key.encrypt_seeded(rng, &seeds[j])?,
            false => hops[j].key.encrypt(&seeds[j])?,
        };
        let mut tc = Box::new([0u8; TC_LEN]);
        tc[..k].copy_from_slice(&rsa);
        tc[k..k + TAG_LEN].copy_from_slice(&tag);
        tc[k + TAG_LEN..].copy_from_slice(&body);
        next = Some(tc);
    }
    next.ok_or(ProtoError::Unexpected("empty path"))
}
