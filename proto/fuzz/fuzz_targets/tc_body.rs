//! Fuzzes what a tracking-code peel does after its RSA step (`tc::peel_with_seed`, which `tc::peel` calls after
//! the OAEP decryption): the layer body's GCM check, the layer header decoder and the next TC with its filler.
//! No RSA operation per input, so this runs at full speed where `tc_peel` manages a few inputs a second.
//!
//! The seed is fixed (0x5a^32, the one `tc_peel` encrypts to id0), as a sender may put any seed under a hop's key.
//! Input: byte 0 selects the mode, the rest is the payload. Bit 1 of byte 0 picks the modulus size k: clear 256
//! (2048-bit key), set 384 (3072-bit).
//! * bit 0 clear: the payload, fitted to TC_LEN, is the TC as received: `peel_with_seed` must fail (the GCM tag
//!   cannot verify under the fixed seed's key for bytes the harness did not seal) unless bit 2 is set, in which
//!   case k is taken from payload[0..2] instead (any value, also impossible ones: it must be refused, not panic).
//! * bit 0 set: the payload, fitted to the body length TC_LEN - k - 16, is the *plaintext* of a layer body; the
//!   harness seals it under the fixed seed's body key, so the header decoder sees fuzz bytes. Checked: the peel
//!   succeeds exactly when the header is in the documented domain (an independent re-statement of the layer
//!   rules), the layer fields are the header's, and a relay's next TC is `plaintext[160..] || pad(seed)` (the
//!   filler), which is again exactly TC_LEN bytes.

#![no_main]

use std::sync::OnceLock;

use anomos_proto::crypto::{kdf, kdf_stream, AeadCounter, Secret, TAG_LEN};
use anomos_proto::ids::ChainId;
use anomos_proto::tc::{self, LayerKind, LAYER_HEADER_LEN, TC_LEN};
use anomos_proto_fuzz::{fit, mode};
use libfuzzer_sys::fuzz_target;

const SEED: [u8; 32] = [0x5a; 32];

struct Fixed {
    body_key: Secret,
    /// The pad for k = 256 and k = 384.
    pads: [Vec<u8>; 2],
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let body_key = kdf(b"anomos tc v1", &[&SEED], b"body");
        let pad = |k: usize| {
            let mut pad = vec![0u8; k + TAG_LEN + LAYER_HEADER_LEN];
            kdf_stream(b"anomos tc v1", &SEED, b"pad", &mut pad).expect("pad");
            pad
        };
        Fixed { body_key, pads: [pad(256), pad(384)] }
    })
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// The documented header domain (tc.rs module docs and `tests/vectors/tc/tc_3hop.txt`), stated independently.
fn header_valid(h: &[u8]) -> bool {
    let zero = |r: std::ops::Range<usize>| h[r].iter().all(|&b| b == 0);
    if h[0] != 1 || be64(&h[2..10]) == 0 || !zero(154..160) {
        return false;
    }
    match h[1] {
        1 => be64(&h[10..18]) != 0 && zero(50..82) && zero(82..114) && zero(114..130),
        2 => {
            let chain: &[u8; 32] = h[82..114].try_into().expect("32");
            be64(&h[10..18]) == 0 && ChainId::from_fixed(chain).is_ok()
        }
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    let big = m & 2 != 0;
    let k = if big { 384 } else { 256 };
    if m & 1 == 0 {
        if m & 4 != 0 {
            let any_k = u16::from_be_bytes(*fit::<2>(rest)) as usize;
            let res = tc::peel_with_seed(&SEED, &fit::<TC_LEN>(rest), any_k);
            if any_k != 256 && any_k != 384 {
                assert!(res.is_err(), "peel with a {any_k}-byte modulus");
            }
            return;
        }
        assert!(tc::peel_with_seed(&SEED, &fit::<TC_LEN>(rest), k).is_err(), "unsealed TC peeled");
        return;
    }
    let f = fixed();
    let body_len = TC_LEN - k - TAG_LEN;
    let plain = &fit::<TC_LEN>(rest)[..body_len];
    let sealed = AeadCounter::new(&f.body_key).seal(b"anomos-tc-v1", plain).expect("seal");
    let mut tc = Box::new([0u8; TC_LEN]);
    // The first k bytes (the OAEP ciphertext) are not read after the RSA step; fill them with payload bytes.
    tc[..k].copy_from_slice(&fit::<TC_LEN>(rest.get(body_len..).unwrap_or_default())[..k]);
    tc[k..k + TAG_LEN].copy_from_slice(&sealed[body_len..]);
    tc[k + TAG_LEN..].copy_from_slice(&sealed[..body_len]);
    let h = &plain[..LAYER_HEADER_LEN];
    let res = tc::peel_with_seed(&SEED, &tc, k);
    assert_eq!(res.is_ok(), header_valid(h), "peel {:?} for header {:02x?}", res.as_ref().err(), h);
    let Ok(p) = res else { return };
    let l = &p.layer;
    assert_eq!(l.prev.0, be64(&h[2..10]));
    assert_eq!(&l.hop_secret.0[..], &h[18..50]);
    assert_eq!(l.expires, be64(&h[130..138]));
    assert_eq!(&l.replay_tag[..], &h[138..154]);
    match (&l.kind, p.next) {
        (LayerKind::Relay { next }, Some(n)) => {
            assert_eq!(next.0, be64(&h[10..18]));
            let inner = body_len - LAYER_HEADER_LEN;
            assert_eq!(&n[..inner], &plain[LAYER_HEADER_LEN..]);
            assert_eq!(&n[inner..], &f.pads[usize::from(big)][..]);
        }
        (LayerKind::Target { chain, session, e2e_secret }, None) => {
            assert_eq!(&chain.to_fixed()[..], &h[82..114]);
            assert_eq!(&session[..], &h[114..130]);
            assert_eq!(&e2e_secret.0[..], &h[50..82]);
        }
        (k, n) => panic!("layer {k:?} with next TC present = {}", n.is_some()),
    }
});
