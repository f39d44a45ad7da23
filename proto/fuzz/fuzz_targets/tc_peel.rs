//! Fuzzes tracking-code peeling (`tc::peel`) with the committed 2048-bit vector key id0.
//!
//! Input: byte 0 selects the mode, the rest is the payload.
//! * even: the payload, truncated or zero-padded to TC_LEN, is a TC received from the wire. Exercises the
//!   OAEP and GCM failure paths (and, from the committed vector TC, a complete peel).
//! * odd: the payload, fitted to the 2048-bit body length (TC_LEN - 256 - 16), is the *plaintext* of a layer
//!   body; the harness seals it under the body key of a fixed seed and prepends that seed's OAEP ciphertext
//!   (computed once), so the peel authenticates and the layer decoder sees fuzz bytes. Checked: peel succeeds
//!   exactly when the header is in the documented domain (an independent re-statement of the layer rules below),
//!   the layer fields are the header's, and a relay's next TC is `plaintext[160..] || pad(seed)`.

#![no_main]

use std::sync::OnceLock;

use anomos_proto::crypto::{kdf, kdf_stream, AeadCounter, Secret, TAG_LEN};
use anomos_proto::ids::ChainId;
use anomos_proto::tc::{self, LayerKind, LAYER_HEADER_LEN, TC_LEN};
use anomos_proto_fuzz::{fit, ids, mode, rng};
use libfuzzer_sys::fuzz_target;

const K: usize = 256;
const BODY_LEN: usize = TC_LEN - K - TAG_LEN;
const SEED: [u8; 32] = [0x5a; 32];

struct Fixed {
    oaep: Vec<u8>,
    body_key: Secret,
    pad: Vec<u8>,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let oaep = ids()[0].public().encrypt_seeded(&mut rng(1), &SEED).expect("oaep");
        let body_key = kdf(b"anomos tc v1", &[&SEED], b"body");
        let mut pad = vec![0u8; K + TAG_LEN + LAYER_HEADER_LEN];
        kdf_stream(b"anomos tc v1", &SEED, b"pad", &mut pad).expect("pad");
        Fixed { oaep, body_key, pad }
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
    let id = &ids()[0];
    if m % 2 == 0 {
        let tc = fit::<TC_LEN>(rest);
        if let Ok(p) = tc::peel(&tc, id) {
            assert_eq!(p.next.is_some(), matches!(p.layer.kind, LayerKind::Relay { .. }));
        }
        return;
    }
    let f = fixed();
    let plain = fit::<BODY_LEN>(rest);
    let sealed = AeadCounter::new(&f.body_key).seal(b"anomos-tc-v1", &plain[..]).expect("seal");
    let mut tc = Box::new([0u8; TC_LEN]);
    tc[..K].copy_from_slice(&f.oaep);
    tc[K..K + TAG_LEN].copy_from_slice(&sealed[BODY_LEN..]);
    tc[K + TAG_LEN..].copy_from_slice(&sealed[..BODY_LEN]);
    let h = &plain[..LAYER_HEADER_LEN];
    let res = tc::peel(&tc, id);
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
            assert_eq!(&n[..BODY_LEN - LAYER_HEADER_LEN], &plain[LAYER_HEADER_LEN..]);
            assert_eq!(&n[BODY_LEN - LAYER_HEADER_LEN..], &f.pad[..]);
        }
        (LayerKind::Target { chain, session, e2e_secret }, None) => {
            assert_eq!(&chain.to_fixed()[..], &h[82..114]);
            assert_eq!(&session[..], &h[114..130]);
            assert_eq!(&e2e_secret.0[..], &h[50..82]);
        }
        (k, n) => panic!("layer {k:?} with next TC present = {}", n.is_some()),
    }
});
