//! End-to-end checks of the cryptographic core: TC build/peel over whole paths, the link handshake,
//! circuit onion layers with the end-to-end session, and the tracker channel.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use anomos_proto::cell::{Cell, Command, CELL_LEN, CELL_PAYLOAD_LEN, SEALED_CELL_LEN};
use anomos_proto::circuit::{fragments, E2eHandshake, HopLayer, OnionStack, Reassembler, RecordType, Role};
use anomos_proto::crypto::Secret;
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::link::{Acceptor, AuthStatus, Dialer};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, TC_LEN};
use anomos_proto::tracker::{self, FromTracker, ToTracker, TrackerChannel};
use anomos_proto::ProtoError;
use common::{ids, rng};

fn path(hop_ids: &[usize], expires: u64) -> Vec<HopSpec> {
    let n = hop_ids.len();
    hop_ids
        .iter()
        .enumerate()
        .map(|(i, &h)| HopSpec {
            key: ids()[h].public().clone(),
            layer: Layer {
                prev: NeighborId(100 + i as u64),
                kind: if i + 1 == n {
                    LayerKind::Target {
                        chain: ChainId::new("regtest").unwrap(),
                        session: [7; 16],
                        e2e_secret: Secret([5; 32]),
                    }
                } else {
                    LayerKind::Relay { next: NeighborId(101 + i as u64) }
                },
                hop_secret: Secret([i as u8 + 1; 32]),
                expires,
                replay_tag: [i as u8; 16],
            },
        })
        .collect()
}

#[test]
fn tc_peels_hop_by_hop_at_constant_size_with_mixed_key_sizes() {
    // 7 layers, two of them 3072-bit: the worst case the size budget must hold.
    let hops = path(&[0, 4, 1, 2, 4, 3, 0], 1000);
    let mut tc = tc::build(&hops, &mut rng(1)).unwrap();
    let mut seen = vec![tc.to_vec()];
    for (i, h) in hops.iter().enumerate() {
        let id = ids().iter().find(|id| id.public() == &h.key).unwrap();
        let peeled = tc::peel(&tc, id).unwrap();
        assert_eq!(peeled.layer, h.layer, "layer {i}");
        match peeled.next {
            Some(next) => {
                assert_eq!(next.len(), TC_LEN);
                assert!(seen.iter().all(|s| s != &next.to_vec()));
                seen.push(next.to_vec());
                tc = next;
            }
            None => assert_eq!(i, hops.len() - 1),
        }
    }
}

#[test]
fn tc_refuses_wrong_key_tampering_and_overlong_paths() {
    let hops = path(&[0, 1, 2], 1000);
    let tc = tc::build(&hops, &mut rng(3)).unwrap();
    assert!(tc::peel(&tc, &ids()[1]).is_err(), "wrong hop key must fail");
    // Flip one byte anywhere in the body covered by the outer tag, including deep inside the nested layers.
    for pos in [256, 300, 1000, 2500, 4095] {
        let mut bad = tc.clone();
        bad[pos] ^= 1;
        assert!(matches!(tc::peel(&bad, &ids()[0]), Err(ProtoError::BadTag(_))), "pos {pos}");
    }
    // Tampering in a nested layer is caught when that layer is peeled (its tag covers its nested content too).
    let p1 = tc::peel(&tc, &ids()[0]).unwrap().next.unwrap();
    let mut bad = p1.clone();
    bad[4000] ^= 0x80;
    assert!(tc::peel(&bad, &ids()[1]).is_err());
    assert!(matches!(tc::build(&path(&[0, 4, 4, 4, 4, 4, 4, 4], 1), &mut rng(8)), Err(ProtoError::PathTooLong(_))));
    let l = tc::peel(&tc, &ids()[0]).unwrap().layer;
    assert!(l.check_expiry(1000, 0).is_ok());
    assert!(matches!(l.check_expiry(1061, 60), Err(ProtoError::Expired { .. })));
    // A layer valid for centuries is refused too (its tag would never leave the replay cache).
    let far = Layer { expires: 1000 + tc::MAX_LAYER_LIFETIME + 61, ..l.clone() };
    assert!(matches!(far.check_expiry(1000, 60), Err(ProtoError::ExpiryTooFar { .. })));
    assert!(Layer { expires: 1000 + tc::MAX_LAYER_LIFETIME + 60, ..l }.check_expiry(1000, 60).is_ok());
}

#[test]
fn tc_build_is_deterministic_under_a_seeded_rng() {
    let hops = path(&[0, 1, 2], 1000);
    let a = tc::build_reproducible(&hops, &mut rng(10)).unwrap();
    assert_eq!(a, tc::build_reproducible(&hops, &mut rng(10)).unwrap());
    // `build` encrypts with AWS-LC's own randomness (and so draws less from `rng`): the bytes differ, and every
    // hop reads the same layer out of either.
    let b = tc::build(&hops, &mut rng(10)).unwrap();
    assert_ne!(a[..256], b[..256]);
    let (mut ta, mut tb) = (a, b);
    for (i, h) in [0, 1, 2].into_iter().enumerate() {
        let (pa, pb) = (tc::peel(&ta, &ids()[h]).unwrap(), tc::peel(&tb, &ids()[h]).unwrap());
        assert_eq!(pa.layer, pb.layer);
        assert_eq!(pa.layer, hops[i].layer);
        match (pa.next, pb.next) {
            (Some(na), Some(nb)) => (ta, tb) = (na, nb),
            (None, None) => assert_eq!(i, 2),
            _ => panic!("hop {i}: one TC ends here, the other does not"),
        }
    }
}

#[test]
fn tc_peel_is_the_rsa_step_then_peel_with_seed() {
    // `build` draws the first hop's seed first, so a copy of its rng yields that seed.
    for (first, k) in [(0usize, 256usize), (4, 384)] {
        let hops = path(&[first, 1, 2], 1000);
        let tc = tc::build(&hops, &mut rng(40)).unwrap();
        let mut seed = [0u8; tc::SEED_LEN];
        rand::RngCore::fill_bytes(&mut rng(40), &mut seed);
        let peeled = tc::peel(&tc, &ids()[first]).unwrap();
        let split = tc::peel_with_seed(&seed, &tc, k).unwrap();
        assert_eq!(split.layer, peeled.layer);
        assert_eq!(split.layer, hops[0].layer);
        assert_eq!(split.next, peeled.next);
        // The RSA part of the TC is not read after the RSA step.
        let mut other = tc.clone();
        other[..k].fill(0);
        assert_eq!(tc::peel_with_seed(&seed, &other, k).unwrap().next, peeled.next);
        let mut wrong = seed;
        wrong[0] ^= 1;
        assert!(matches!(tc::peel_with_seed(&wrong, &tc, k), Err(ProtoError::BadTag(_))));
        // A modulus size no key has is refused, not sliced with.
        for bad_k in [0, k - 1, 300, TC_LEN - 16, TC_LEN, usize::MAX] {
            assert!(matches!(tc::peel_with_seed(&seed, &tc, bad_k), Err(ProtoError::Invalid { .. })), "{bad_k}");
        }
    }
}

fn handshake(
    nid_d: NeighborId,
    nid_a: NeighborId,
) -> Result<(anomos_proto::link::LinkCipher, anomos_proto::link::LinkCipher), ProtoError> {
    let (d_id, a_id) = (&ids()[0], &ids()[1]);
    let (dialer, hello) = Dialer::start(&mut rng(20), a_id.public().clone(), nid_d);
    let (acceptor, reply) = Acceptor::start(&mut rng(21), &hello)?;
    let (dialer, auth) = dialer.on_reply(&reply, d_id, &mut rng(22))?;
    let out = acceptor.on_auth(
        &auth,
        a_id,
        &mut rng(23),
        |fp| (fp == &d_id.fingerprint()).then(|| (d_id.public().clone(), nid_a)),
        |_| false,
    )?;
    let a = out.result?;
    let d = dialer.on_auth_reply(&out.reply)?;
    Ok((d, a))
}

#[test]
fn link_handshake_and_cells() {
    let (mut d, mut a) = handshake(NeighborId(42), NeighborId(42)).unwrap();
    assert!(d.dialer && !a.dialer);
    assert_eq!(d.peer, ids()[1].fingerprint());
    assert_eq!(a.peer, ids()[0].fingerprint());
    let mut c = Cell::new(0x8000_0001, Command::Data);
    c.payload[..5].copy_from_slice(b"hello");
    let sealed = d.seal_cell(&c).unwrap();
    assert_eq!(sealed.len(), SEALED_CELL_LEN);
    assert_eq!(a.open_cell(&sealed).unwrap(), c);
    // Replaying the same sealed cell fails (the counter moved on).
    assert!(a.open_cell(&sealed).is_err());
    let back = a.seal_cell(&Cell::sendme(0x8000_0001, 32)).unwrap();
    assert_eq!(d.open_cell(&back).unwrap().sendme_credit().unwrap(), 32);
}

#[test]
fn on_auth_and_on_auth_reply_parse_through_open_auth_and_open_auth_reply() {
    let (d_id, a_id) = (&ids()[0], &ids()[4]);
    let (dialer, hello) = Dialer::start(&mut rng(24), a_id.public().clone(), NeighborId(5));
    let (acceptor, reply) = Acceptor::start(&mut rng(25), &hello).unwrap();
    let (dialer, auth) = dialer.on_reply(&reply, d_id, &mut rng(26)).unwrap();
    let parsed = acceptor.open_auth(&auth).unwrap();
    assert_eq!(parsed.fp, d_id.fingerprint());
    assert_eq!(parsed.sig.len(), 256);
    let mut bad = auth.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(matches!(acceptor.open_auth(&bad), Err(ProtoError::BadTag(_))));
    assert!(acceptor.open_auth(&auth[..auth.len() - 1]).is_err());
    let out = acceptor.on_auth(&auth, a_id, &mut rng(27), |_| Some((d_id.public().clone(), NeighborId(5))), |_| false);
    let out = out.unwrap();
    let (status, sig) = dialer.open_auth_reply(&out.reply).unwrap();
    assert_eq!(status, AuthStatus::Ok);
    assert_eq!(sig.len(), 384, "the 3072-bit acceptor's signature");
    assert!(dialer.open_auth_reply(&out.reply[..out.reply.len() - 1]).is_err());
    dialer.on_auth_reply(&out.reply).unwrap();
}

#[test]
fn link_keys_depend_on_the_neighbor_id() {
    // Both sides authenticate, but they hold different NeighborIDs for the edge: the first cell fails.
    let (mut d, mut a) = handshake(NeighborId(42), NeighborId(43)).unwrap();
    let sealed = d.seal_cell(&Cell::padding()).unwrap();
    assert!(a.open_cell(&sealed).is_err());
}

#[test]
fn link_refuses_non_neighbors_and_garbage() {
    let (d_id, a_id) = (&ids()[0], &ids()[1]);
    let (dialer, hello) = Dialer::start(&mut rng(30), a_id.public().clone(), NeighborId(1));
    let (acceptor, reply) = Acceptor::start(&mut rng(31), &hello).unwrap();
    let (dialer, auth) = dialer.on_reply(&reply, d_id, &mut rng(32)).unwrap();
    let out = acceptor.on_auth(&auth, a_id, &mut rng(33), |_| None, |_| false).unwrap();
    assert!(out.result.is_err());
    let err = dialer.on_auth_reply(&out.reply).err().unwrap();
    assert!(err.to_string().contains("Refused"), "{err}");
    let mut bad = hello;
    bad[0] = b'X';
    assert!(matches!(Acceptor::start(&mut rng(34), &bad), Err(ProtoError::BadMagic(_))));
    assert!(Acceptor::start(&mut rng(34), &hello[..10]).is_err());
}

#[test]
fn circuit_layers_differ_per_hop_and_e2e_round_trips() {
    let secrets: Vec<Secret> = (1..=3u8).map(|i| Secret([i; 32])).collect();
    let e2e = Secret([9; 32]);
    let mut req = OnionStack::new(&secrets);
    let mut hops: Vec<HopLayer> = secrets.iter().map(HopLayer::new).collect();
    // Handshake records both ways.
    let mut rp = [0u8; CELL_PAYLOAD_LEN];
    let hs_r = E2eHandshake::start(Role::Requester, &e2e, &mut rng(40), &mut rp).unwrap();
    req.wrap_forward(&mut rp);
    let mut seen = vec![rp.to_vec()];
    for h in hops.iter_mut() {
        h.forward(&mut rp);
        assert!(!seen.contains(&rp.to_vec()));
        seen.push(rp.to_vec());
    }
    let mut tp = [0u8; CELL_PAYLOAD_LEN];
    let hs_t = E2eHandshake::start(Role::Target, &e2e, &mut rng(41), &mut tp).unwrap();
    let mut target = hs_t.finish(&mut rp).unwrap();
    for h in hops.iter_mut().rev() {
        h.backward(&mut tp);
    }
    req.unwrap_backward(&mut tp);
    let mut requester = hs_r.finish(&mut tp).unwrap();
    // A message larger than one record, forward.
    let msg: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut re = Reassembler::new(1 << 20);
    let mut got = None;
    for (kind, data) in fragments(&msg) {
        let mut p = [0u8; CELL_PAYLOAD_LEN];
        requester.seal(kind, data, &mut p).unwrap();
        req.wrap_forward(&mut p);
        for h in hops.iter_mut() {
            h.forward(&mut p);
        }
        let (k, d) = target.open(&mut p).unwrap();
        got = re.push(k, d).unwrap();
    }
    assert_eq!(got.unwrap(), msg);
    // A bit flipped at the first relay is caught end to end (SPEC: tagging).
    let mut p = [0u8; CELL_PAYLOAD_LEN];
    requester.seal(RecordType::End, b"x", &mut p).unwrap();
    req.wrap_forward(&mut p);
    p[10] ^= 1;
    for h in hops.iter_mut() {
        h.forward(&mut p);
    }
    assert!(matches!(target.open(&mut p), Err(ProtoError::BadTag(_))));
}

#[test]
fn tracker_channel_round_trip_and_limits() {
    let t = &ids()[3];
    let (hello, hs) = TrackerChannel::connect(&mut rng(50), t.public()).unwrap();
    let ct_len = TrackerChannel::hello_ct_len(&hello[..12]).unwrap();
    assert_eq!(hello.len(), 12 + ct_len + 32);
    let (reply, mut tracker) = TrackerChannel::accept(&mut rng(51), t, &hello[12..]).unwrap();
    let mut peer = hs.finish(&reply).unwrap();
    // A replayed ClientHello gets a fresh tracker key: the session keys differ, so no (key, nonce) repeats.
    let (_, mut replayed) = TrackerChannel::accept(&mut rng(52), t, &hello[12..]).unwrap();
    let a = tracker.seal(&FromTracker::Ack).unwrap();
    let b = replayed.seal(&FromTracker::Ack).unwrap();
    assert_ne!(a, b, "a replayed ClientHello must not reuse the session keys");
    let mut tracker = {
        let (reply2, t2) = TrackerChannel::accept(&mut rng(51), t, &hello[12..]).unwrap();
        assert_eq!(reply2, reply);
        t2
    };
    let frame = tracker.seal(&FromTracker::Challenge { nonce: [3; 32] }).unwrap();
    let len = TrackerChannel::frame_len(frame[..4].try_into().unwrap()).unwrap();
    let msg: FromTracker = peer.open(&frame[4..4 + len]).unwrap();
    let FromTracker::Challenge { nonce } = msg else { panic!() };
    let hello_msg = tracker::make_hello(&ids()[0], &t.fingerprint(), &nonce, &mut rng(52));
    let frame = peer.seal(&hello_msg).unwrap();
    let got: ToTracker = tracker.open(&frame[4..]).unwrap();
    let ToTracker::Hello { public_key, signature } = got else { panic!() };
    let key = tracker::verify_hello(&public_key, &signature, &t.fingerprint(), &nonce).unwrap();
    assert_eq!(key.fingerprint(), ids()[0].fingerprint());
    assert!(tracker::verify_hello(&public_key, &signature, &t.fingerprint(), &[4; 32]).is_err());
    // A channel to the wrong tracker key cannot be opened.
    let (hello, _) = TrackerChannel::connect(&mut rng(53), ids()[2].public()).unwrap();
    assert!(TrackerChannel::accept(&mut rng(54), t, &hello[12..]).is_err());
    assert!(TrackerChannel::frame_len([0xff; 4]).is_err());
    // bincode limit: a length prefix claiming a huge vector fails cleanly.
    assert!(tracker::decode::<ToTracker>(&[2, 0xfd, 0xff, 0xff, 0xff, 0xff]).is_err());
}

#[test]
fn cells_decode_strictly() {
    let mut buf = [0u8; CELL_LEN];
    Cell::deny(5, anomos_proto::cell::DenyReason::Replayed, Some([1; 16])).encode_into(&mut buf);
    let c = Cell::decode(&buf).unwrap();
    assert_eq!(c.deny_fields().unwrap(), (anomos_proto::cell::DenyReason::Replayed, Some([1; 16])));
    buf[4] = 99;
    assert!(Cell::decode(&buf).is_err());
    buf[4] = Command::Padding as u8;
    assert!(Cell::decode(&buf).is_err(), "PADDING must be on circuit 0");
    assert!(Cell::decode(&buf[..100]).is_err());
}
