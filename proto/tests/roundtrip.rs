//! Property tests: every encoder/decoder pair of anomos-proto round-trips, range checks accept exactly their
//! documented domains, and every decoder answers truncated, oversized or garbage input with `Err` (never a panic,
//! never a wrong `Ok`).
//!
//! Covered: tracker messages (all `ToTracker`/`FromTracker` variants and their structs, `validate()` limits,
//! prefix/trailing-byte rejection, random bytes), cells of every command and the DENY/BREAK/SENDME fields,
//! `ChainId` and `Fingerprint` text/fixed forms, TC build→peel over random paths of 1..=7 layers, the onion layers
//! plus end-to-end session with fragment reassembly, and the negative side of every decoder: `Cell::decode`, TC
//! peel, the link handshake messages (`Acceptor::start`/`on_auth`, `Dialer::on_reply`/`on_auth_reply`,
//! `auth_frame_len`), the probe (`decode_probe_body`, `verify_probe_answer`), the tracker channel
//! (`hello_ct_len`, `frame_len`, `open`), `PublicKey::from_der` (garbage, 1024/4096-bit and short moduli, bad
//! exponent, trailing bytes) and `E2eSession::open` with any bit flipped.
//!
//! RSA is slow, so the identities are the committed vector keys (loaded once), and properties that do RSA
//! operations run few cases.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::OnceLock;

use anomos_proto::cell::{
    BreakReason, Cell, Command, DenyReason, CELL_LEN, CELL_PAYLOAD_LEN, DIALER_CIRC_BIT, SEALED_CELL_LEN,
};
use anomos_proto::circuit::{
    fragments, E2eHandshake, E2eSession, HopLayer, OnionStack, Reassembler, RecordType, Role, RECORD_DATA_MAX,
};
use anomos_proto::crypto::{AeadCounter, Secret};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey, MAX_RSA_BYTES, MAX_SPKI_LEN};
use anomos_proto::ids::{ChainId, NeighborId, CHAIN_ID_MAX};
use anomos_proto::link::{self, Acceptor, Dialer, LinkCipher, HELLO_LEN, LINK_MAGIC, MAX_AUTH_LEN, MAX_PROBE_ANSWER};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, MAX_LAYERS, TC_LEN};
use anomos_proto::tracker::{
    self, Announce, AnnounceReply, CircuitGrant, CircuitReply, CircuitRequest, ErrorCode, FailureKind, FailureReport,
    FromTracker, NeighborInfo, ToTracker, TrackerChannel, TrackerError, MAX_CHAINS, MAX_CIRCUITS_PER_REQUEST,
    MAX_FAMILY, MAX_FRAME, MAX_NEIGHBORS, MAX_RELAYS, MAX_TEXT, TRACKER_MAGIC,
};
use anomos_proto::ProtoError;
use proptest::collection::vec;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

// ---------------------------------------------------------------------------------------------------------------
// fixtures

/// The committed vector identities: three 2048-bit, one 3072-bit.
fn ids() -> &'static [Identity; 4] {
    static IDS: OnceLock<[Identity; 4]> = OnceLock::new();
    IDS.get_or_init(|| {
        let load = |pem: &str| Identity::from_pkcs8_pem(pem).expect("committed key");
        [
            load(include_str!("vectors/keys/id0_2048.pem")),
            load(include_str!("vectors/keys/id1_2048.pem")),
            load(include_str!("vectors/keys/id2_2048.pem")),
            load(include_str!("vectors/keys/id3_3072.pem")),
        ]
    })
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A complete link handshake between id0 (dialer) and id1 (acceptor).
fn link_pair(seed: u64) -> (LinkCipher, LinkCipher) {
    let (d, a) = (&ids()[0], &ids()[1]);
    let nid = NeighborId(seed | 1);
    let (dialer, hello) = Dialer::start(&mut rng(seed), a.public().clone(), nid);
    let (acceptor, reply) = Acceptor::start(&mut rng(seed + 1), &hello).unwrap();
    let (dialer, auth) = dialer.on_reply(&reply, d, &mut rng(seed + 2)).unwrap();
    let out = acceptor.on_auth(&auth, a, &mut rng(seed + 3), |_| Some((d.public().clone(), nid)), |_| false).unwrap();
    let acc = out.result.unwrap();
    (dialer.on_auth_reply(&out.reply).unwrap(), acc)
}

/// An established end-to-end session pair (requester, target).
fn e2e_pair(secret: &Secret, seed: u64) -> (E2eSession, E2eSession) {
    let mut rp = [0u8; CELL_PAYLOAD_LEN];
    let mut tp = [0u8; CELL_PAYLOAD_LEN];
    let hr = E2eHandshake::start(Role::Requester, secret, &mut rng(seed), &mut rp).unwrap();
    let ht = E2eHandshake::start(Role::Target, secret, &mut rng(seed + 1), &mut tp).unwrap();
    let t = ht.finish(&mut rp).unwrap();
    (hr.finish(&mut tp).unwrap(), t)
}

// ---------------------------------------------------------------------------------------------------------------
// strategies

fn chain_id() -> impl Strategy<Value = ChainId> {
    "[a-z0-9._-]{1,32}".prop_map(|s| ChainId::new(&s).unwrap())
}

fn nid() -> impl Strategy<Value = NeighborId> {
    (1..=u64::MAX).prop_map(NeighborId)
}

/// Socket addresses as the wire carries them (serde drops IPv6 flow info and scope id, so those are 0 here).
fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        any::<std::net::SocketAddrV4>().prop_map(SocketAddr::V4),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn listen_addr() -> impl Strategy<Value = SocketAddr> {
    addr().prop_map(|mut a| {
        if a.port() == 0 {
            a.set_port(1);
        }
        a
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn tc_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), TC_LEN)
}

/// In-range `ToTracker` values of every variant.
fn to_tracker() -> impl Strategy<Value = ToTracker> {
    prop_oneof![
        (bytes(MAX_SPKI_LEN), bytes(MAX_RSA_BYTES))
            .prop_map(|(public_key, signature)| ToTracker::Hello { public_key, signature }),
        (listen_addr(), vec(chain_id(), 0..=MAX_CHAINS), vec(any::<[u8; 32]>().prop_map(Fingerprint), 0..=MAX_FAMILY))
            .prop_map(|(listen, chains, family)| ToTracker::Announce(Announce { listen, chains, family })),
        (chain_id(), 1..=MAX_CIRCUITS_PER_REQUEST, 1..=MAX_RELAYS)
            .prop_map(|(chain, count, relays)| ToTracker::RequestCircuits(CircuitRequest { chain, count, relays })),
        (
            prop_oneof![
                Just(FailureKind::NeighborUnreachable),
                any::<u8>().prop_map(FailureKind::CircuitDenied),
                any::<u8>().prop_map(FailureKind::CircuitBroken),
                Just(FailureKind::Misbehaving),
            ],
            proptest::option::of(nid()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<[u8; 16]>()),
        )
            .prop_map(|(kind, neighbor, circuit, hop_tag)| ToTracker::Report(FailureReport {
                kind,
                neighbor,
                circuit,
                hop_tag
            })),
    ]
}

fn neighbor_info() -> impl Strategy<Value = NeighborInfo> {
    (nid(), addr(), bytes(MAX_SPKI_LEN)).prop_map(|(id, addr, public_key)| NeighborInfo { id, addr, public_key })
}

fn grant() -> impl Strategy<Value = CircuitGrant> {
    (
        any::<u64>(),
        nid(),
        tc_bytes(),
        vec(any::<[u8; 32]>(), 1..=MAX_LAYERS),
        any::<[u8; 32]>(),
        any::<[u8; 16]>(),
        any::<u64>(),
    )
        .prop_map(|(circuit, first_hop, tc, hop_secrets, e2e_secret, session, expires)| CircuitGrant {
            circuit,
            first_hop,
            tc,
            hop_secrets,
            e2e_secret,
            session,
            expires,
        })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Unauthenticated),
        Just(ErrorCode::Unreachable),
        Just(ErrorCode::Full),
        Just(ErrorCode::UnknownPeer),
        Just(ErrorCode::NoPath),
        Just(ErrorCode::AddressLimit),
    ]
}

/// In-range `FromTracker` values of every variant.
fn from_tracker() -> impl Strategy<Value = FromTracker> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|nonce| FromTracker::Challenge { nonce }),
        any::<[u8; 32]>().prop_map(|f| FromTracker::Welcome { peer_id: Fingerprint(f) }),
        (any::<u32>(), vec(neighbor_info(), 0..=MAX_NEIGHBORS))
            .prop_map(|(interval_secs, neighbors)| FromTracker::Announced(AnnounceReply { interval_secs, neighbors })),
        vec(grant(), 0..=3).prop_map(|circuits| FromTracker::Circuits(CircuitReply { circuits })),
        Just(FromTracker::Ack),
        (error_code(), "[ -~]{0,256}").prop_map(|(code, message)| FromTracker::Error(TrackerError { code, message })),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    (0u8..8).prop_map(|b| Command::from_u8(b).unwrap())
}

fn cell() -> impl Strategy<Value = Cell> {
    (command(), 1..=u32::MAX, vec(any::<u8>(), CELL_PAYLOAD_LEN)).prop_map(|(command, circ, payload)| {
        let mut c = Cell::new(if command == Command::Padding { 0 } else { circ }, command);
        c.payload.copy_from_slice(&payload);
        c
    })
}

/// A layer with random fields; `target` picks the kind.
fn layer(target: bool) -> impl Strategy<Value = Layer> {
    (nid(), nid(), any::<[u8; 32]>(), any::<u64>(), any::<[u8; 16]>(), chain_id(), any::<[u8; 16]>(), any::<[u8; 32]>())
        .prop_map(move |(prev, next, hs, expires, replay_tag, chain, session, e2e)| Layer {
            prev,
            kind: if target {
                LayerKind::Target { chain, session, e2e_secret: Secret(e2e) }
            } else {
                LayerKind::Relay { next }
            },
            hop_secret: Secret(hs),
            expires,
            replay_tag,
        })
}

/// A path of 1..=7 hops over the three 2048-bit identities: (identity index, layer) per hop.
fn path() -> impl Strategy<Value = Vec<(usize, Layer)>> {
    (1..=MAX_LAYERS).prop_flat_map(|n| {
        (vec((0usize..3, layer(false)), n - 1), 0usize..3, layer(true)).prop_map(|(mut relays, t, target)| {
            relays.push((t, target));
            relays
        })
    })
}

// ---------------------------------------------------------------------------------------------------------------
// tracker messages

proptest! {
    #![proptest_config(cfg(64))]

    #[test]
    fn to_tracker_round_trips_and_validates(msg in to_tracker(), cut in any::<prop::sample::Index>()) {
        let enc = tracker::encode(&msg).unwrap();
        prop_assert_eq!(tracker::decode::<ToTracker>(&enc).unwrap(), msg.clone());
        prop_assert!(msg.validate().is_ok(), "{:?}", msg);
        // Every proper prefix is truncated; any trailing byte is rejected.
        prop_assert!(tracker::decode::<ToTracker>(&enc[..cut.index(enc.len())]).is_err());
        prop_assert!(tracker::decode::<ToTracker>(&[&enc[..], &[0]].concat()).is_err());
    }

    #[test]
    fn from_tracker_round_trips_and_validates(msg in from_tracker(), cut in any::<prop::sample::Index>()) {
        let enc = tracker::encode(&msg).unwrap();
        prop_assert_eq!(tracker::decode::<FromTracker>(&enc).unwrap(), msg.clone());
        prop_assert!(msg.validate().is_ok());
        prop_assert!(tracker::decode::<FromTracker>(&enc[..cut.index(enc.len())]).is_err());
        prop_assert!(tracker::decode::<FromTracker>(&[&enc[..], &[0]].concat()).is_err());
    }

    #[test]
    fn structs_round_trip_on_their_own(
        a in (listen_addr(), vec(chain_id(), 0..4), vec(any::<[u8; 32]>().prop_map(Fingerprint), 0..4)),
        n in neighbor_info(),
        r in (chain_id(), any::<u8>(), any::<u8>()),
        g in grant(),
        e in (error_code(), "[ -~]{0,40}"),
    ) {
        let a = Announce { listen: a.0, chains: a.1, family: a.2 };
        prop_assert_eq!(tracker::decode::<Announce>(&tracker::encode(&a).unwrap()).unwrap(), a);
        prop_assert_eq!(tracker::decode::<NeighborInfo>(&tracker::encode(&n).unwrap()).unwrap(), n);
        let r = CircuitRequest { chain: r.0, count: r.1, relays: r.2 };
        prop_assert_eq!(tracker::decode::<CircuitRequest>(&tracker::encode(&r).unwrap()).unwrap(), r);
        prop_assert_eq!(g.tc_array().unwrap().to_vec(), g.tc.clone());
        prop_assert_eq!(g.secrets().len(), g.hop_secrets.len());
        let g2 = tracker::decode::<CircuitGrant>(&tracker::encode(&g).unwrap()).unwrap();
        prop_assert!(g2 == g);
        let e = TrackerError { code: e.0, message: e.1 };
        prop_assert_eq!(tracker::decode::<TrackerError>(&tracker::encode(&e).unwrap()).unwrap(), e);
    }

    #[test]
    fn to_tracker_validate_refuses_out_of_range(
        big_key in MAX_SPKI_LEN + 1..MAX_SPKI_LEN + 64,
        big_sig in MAX_RSA_BYTES + 1..MAX_RSA_BYTES + 64,
        chains in vec(chain_id(), MAX_CHAINS + 1..MAX_CHAINS + 4),
        listen in listen_addr(),
        chain in chain_id(),
        bad_count in prop_oneof![Just(0u8), MAX_CIRCUITS_PER_REQUEST + 1..=u8::MAX],
        bad_relays in prop_oneof![Just(0u8), MAX_RELAYS + 1..=u8::MAX],
        big_family in MAX_FAMILY + 1..MAX_FAMILY + 8,
    ) {
        let bad = |m: ToTracker| {
            let e = m.validate().is_err();
            // Out-of-range values still encode and decode: validate() is the only gate.
            let back: ToTracker = tracker::decode(&tracker::encode(&m).unwrap()).unwrap();
            e && back == m
        };
        prop_assert!(bad(ToTracker::Hello { public_key: vec![0; big_key], signature: vec![] }), "oversized hello key");
        prop_assert!(bad(ToTracker::Hello { public_key: vec![], signature: vec![0; big_sig] }), "oversized hello signature");
        prop_assert!(bad(ToTracker::Announce(Announce { listen, chains, family: vec![] })), "too many chains");
        let mut port0 = listen;
        port0.set_port(0);
        prop_assert!(bad(ToTracker::Announce(Announce { listen: port0, chains: vec![], family: vec![] })), "port 0");
        let family = vec![Fingerprint([7; 32]); big_family];
        prop_assert!(bad(ToTracker::Announce(Announce { listen, chains: vec![], family })), "too many family members");
        prop_assert!(bad(ToTracker::RequestCircuits(CircuitRequest { chain: chain.clone(), count: bad_count, relays: 1 })), "bad count");
        prop_assert!(bad(ToTracker::RequestCircuits(CircuitRequest { chain, count: 1, relays: bad_relays })), "bad relays");
    }

    #[test]
    fn from_tracker_validate_refuses_out_of_range(
        n in neighbor_info(),
        big_key in MAX_SPKI_LEN + 1..MAX_SPKI_LEN + 64,
        g in grant(),
        bad_tc_len in prop_oneof![0..TC_LEN, TC_LEN + 1..TC_LEN + 8],
        too_many_layers in MAX_LAYERS + 1..MAX_LAYERS + 4,
        long in MAX_TEXT + 1..MAX_TEXT + 50,
    ) {
        let bad = |m: FromTracker| m.validate().is_err();
        let announced = |neighbors| FromTracker::Announced(AnnounceReply { interval_secs: 1, neighbors });
        prop_assert!(bad(announced(vec![n.clone(); MAX_NEIGHBORS + 1])));
        prop_assert!(!bad(announced(vec![n.clone(); MAX_NEIGHBORS])));
        prop_assert!(bad(announced(vec![NeighborInfo { id: NeighborId(0), ..n.clone() }])), "zero neighbor id");
        prop_assert!(bad(announced(vec![NeighborInfo { public_key: vec![1; big_key], ..n }])), "oversized neighbor key");
        let circuits = |circuits| FromTracker::Circuits(CircuitReply { circuits });
        prop_assert!(bad(circuits(vec![g.clone(); MAX_CIRCUITS_PER_REQUEST as usize + 1])));
        prop_assert!(!bad(circuits(vec![g.clone(); MAX_CIRCUITS_PER_REQUEST as usize])));
        let mut short = g.clone();
        short.tc.resize(bad_tc_len, 0);
        prop_assert!(short.tc_array().is_err());
        prop_assert!(bad(circuits(vec![short])));
        let mut none = g.clone();
        none.hop_secrets.clear();
        prop_assert!(bad(circuits(vec![none])));
        let mut many = g;
        many.hop_secrets = vec![[0; 32]; too_many_layers];
        prop_assert!(bad(circuits(vec![many])));
        prop_assert!(bad(FromTracker::Error(TrackerError { code: ErrorCode::Full, message: "x".repeat(long) })), "long error text");
        prop_assert!(!bad(FromTracker::Error(TrackerError { code: ErrorCode::Full, message: "x".repeat(MAX_TEXT) })), "max-length error text");
    }

    #[test]
    fn tracker_decode_never_panics_and_what_decodes_reencodes(b in bytes(300)) {
        if let Ok(m) = tracker::decode::<ToTracker>(&b) {
            let _ = m.validate();
            prop_assert_eq!(tracker::decode::<ToTracker>(&tracker::encode(&m).unwrap()).unwrap(), m);
        }
        if let Ok(m) = tracker::decode::<FromTracker>(&b) {
            let _ = m.validate();
            prop_assert_eq!(tracker::decode::<FromTracker>(&tracker::encode(&m).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn tracker_decode_rejects_invalid_chain_names(name in "[a-zA-Z0-9 ._/-]{0,40}", count in 1u8..=16) {
        // RequestCircuits is variant 2; a string is a varint length then bytes; then count and relays.
        prop_assume!(name.len() < 251);
        let mut raw = vec![2u8, name.len() as u8];
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(&[count, 1]);
        let got = tracker::decode::<ToTracker>(&raw);
        match ChainId::new(&name) {
            Ok(chain) => prop_assert_eq!(got.unwrap(), ToTracker::RequestCircuits(CircuitRequest { chain, count, relays: 1 })),
            Err(_) => prop_assert!(got.is_err(), "{:?} decoded", name),
        }
    }
}

#[test]
fn tracker_decode_refuses_huge_length_claims_without_allocating() {
    // Hello whose public_key claims u64::MAX bytes; Announced claiming 2^32 neighbors.
    let mut huge = vec![0u8, 0xff];
    huge.extend_from_slice(&[0xff; 8]);
    assert!(tracker::decode::<ToTracker>(&huge).is_err());
    let mut many = vec![2u8, 0x01, 0xfc];
    many.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(tracker::decode::<FromTracker>(&many).is_err());
    // A body over the frame limit is refused by the limit.
    let big = ToTracker::Hello { public_key: vec![1; MAX_FRAME], signature: vec![] };
    assert!(tracker::encode(&big).is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// cells

proptest! {
    #![proptest_config(cfg(64))]

    #[test]
    fn cell_round_trips_for_every_command(c in cell()) {
        let mut buf = [0u8; CELL_LEN];
        c.encode_into(&mut buf);
        prop_assert_eq!(&buf[..4], &c.circ_id.to_be_bytes()[..]);
        prop_assert_eq!(buf[4], c.command as u8);
        prop_assert_eq!(Cell::decode(&buf).unwrap(), c);
    }

    #[test]
    fn cell_decode_accepts_exactly_the_valid_cells(mut b in vec(any::<u8>(), CELL_LEN), cmd in 0u8..12, zero in any::<bool>()) {
        b[4] = cmd;
        if zero {
            b[..4].fill(0);
        }
        let circ = u32::from_be_bytes(b[..4].try_into().unwrap());
        let valid = cmd < 8 && ((cmd == 0) == (circ == 0));
        match Cell::decode(&b) {
            Ok(c) => {
                prop_assert!(valid);
                let mut again = [0u8; CELL_LEN];
                c.encode_into(&mut again);
                prop_assert_eq!(&again[..], &b[..]);
            }
            Err(_) => prop_assert!(!valid),
        }
    }

    #[test]
    fn cell_decode_refuses_wrong_lengths(b in prop_oneof![bytes(CELL_LEN - 1), vec(any::<u8>(), CELL_LEN + 1..CELL_LEN + 64), vec(any::<u8>(), SEALED_CELL_LEN)]) {
        prop_assert!(matches!(Cell::decode(&b), Err(ProtoError::BadLength { .. })), "wrong length accepted");
    }

    #[test]
    fn deny_break_sendme_fields_round_trip(circ in 1..=u32::MAX, reason in any::<u8>(), tag in proptest::option::of(any::<[u8; 16]>()), credit in 1..=u16::MAX) {
        let d = Cell::deny(circ, DenyReason::from_code(reason), tag);
        prop_assert_eq!(d.deny_fields().unwrap(), (DenyReason::from_code(reason), tag));
        prop_assert_eq!(DenyReason::from_code(reason).code(), reason);
        let b = Cell::brk(circ, BreakReason::from_code(reason), tag);
        prop_assert_eq!(b.break_fields().unwrap(), (BreakReason::from_code(reason), tag));
        prop_assert_eq!(BreakReason::from_code(reason).code(), reason);
        // Through the encoding too.
        for c in [&d, &b] {
            let mut buf = [0u8; CELL_LEN];
            c.encode_into(&mut buf);
            prop_assert_eq!(&Cell::decode(&buf).unwrap(), c);
        }
        let s = Cell::sendme(circ, credit);
        prop_assert_eq!(s.sendme_credit().unwrap(), credit);
        prop_assert_eq!(Cell::sendme(circ, 0).sendme_credit(), Err(ProtoError::Invalid { what: "SENDME credit", detail: "0".into() }));
    }

    #[test]
    fn reason_tag_flag_other_than_0_or_1_is_refused(circ in 1..=u32::MAX, flag in 2u8..=255) {
        for mut c in [Cell::deny(circ, DenyReason::BadTc, None), Cell::brk(circ, BreakReason::Protocol, None)] {
            c.payload[1] = flag;
            prop_assert!(c.deny_fields().is_err() && c.break_fields().is_err());
        }
    }

    #[test]
    fn open_cell_carries_its_tc_and_only_open_has_one(circ in 1..=u32::MAX, tc in tc_bytes(), other in command()) {
        let tc: [u8; TC_LEN] = tc.try_into().unwrap();
        prop_assert_eq!(Cell::open(circ, &tc).open_tc().unwrap(), tc);
        if other != Command::Open {
            prop_assert!(Cell::new(circ, other).open_tc().is_err());
        }
    }
}

#[test]
fn command_bytes_are_exactly_0_to_7() {
    for b in 0..=255u8 {
        match Command::from_u8(b) {
            Ok(c) => assert_eq!(c as u8, b),
            Err(_) => assert!(b >= 8, "{b}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// ChainId, Fingerprint

proptest! {
    #![proptest_config(cfg(128))]

    #[test]
    fn chain_id_fixed_and_text_forms_round_trip(s in "[a-z0-9._-]{1,32}") {
        let c = ChainId::new(&s).unwrap();
        prop_assert_eq!(c.as_str(), s.as_str());
        prop_assert_eq!(c.to_string(), s.clone());
        prop_assert_eq!(s.parse::<ChainId>().unwrap(), c.clone());
        let fixed = c.to_fixed();
        prop_assert_eq!(&fixed[..s.len()], s.as_bytes());
        prop_assert!(fixed[s.len()..].iter().all(|&b| b == 0));
        prop_assert_eq!(ChainId::from_fixed(&fixed).unwrap(), c.clone());
        prop_assert_eq!(tracker::decode::<ChainId>(&tracker::encode(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn chain_id_rejects_invalid_names(
        s in prop_oneof![
            Just(String::new()),
            "[a-z0-9._-]{33,64}",
            "[a-z0-9._-]{0,10}[^a-z0-9._-][a-z0-9._-]{0,10}",
        ]
    ) {
        prop_assert!(ChainId::new(&s).is_err(), "{:?}", s);
        prop_assert!(s.parse::<ChainId>().is_err());
        prop_assert!(ChainId::try_from(s.clone()).is_err());
    }

    #[test]
    fn chain_id_from_fixed_rejects_bad_padding_and_bytes(s in "[a-z0-9._-]{1,30}", junk in 1u8..=255, at in any::<prop::sample::Index>(), bad in prop_oneof![0x80u8..=0xff, Just(b'A'), Just(b' ')]) {
        let mut fixed = ChainId::new(&s).unwrap().to_fixed();
        // A non-NUL byte after the padding starts.
        let pos = s.len() + 1 + at.index(CHAIN_ID_MAX - s.len() - 1);
        fixed[pos] = junk;
        prop_assert!(ChainId::from_fixed(&fixed).is_err());
        // A byte outside [a-z0-9._-] (or invalid UTF-8) inside the name.
        let mut fixed = ChainId::new(&s).unwrap().to_fixed();
        fixed[at.index(s.len())] = bad;
        prop_assert!(ChainId::from_fixed(&fixed).is_err());
    }

    #[test]
    fn fingerprint_hex_round_trips(b in any::<[u8; 32]>()) {
        let fp = Fingerprint(b);
        let h = fp.to_hex();
        prop_assert_eq!(h.len(), 64);
        prop_assert_eq!(h.clone(), h.to_ascii_lowercase());
        prop_assert_eq!(Fingerprint::from_hex(&h).unwrap(), fp);
        prop_assert_eq!(Fingerprint::from_hex(&h.to_ascii_uppercase()).unwrap(), fp);
        prop_assert_eq!(Fingerprint::from_hex(&format!(" {h}\n")).unwrap(), fp);
        prop_assert_eq!(fp.to_string(), h.clone());
        prop_assert_eq!(fp.short(), h[..8].to_string());
    }

    #[test]
    fn fingerprint_from_hex_rejects_bad_text(
        s in prop_oneof![
            "([0-9a-f]{2}){0,31}",
            "([0-9a-f]{2}){33,40}",
            "[0-9a-f]{63}",
            "[0-9a-f]{10}[g-zG-Z:][0-9a-f]{53}",
        ]
    ) {
        prop_assert!(Fingerprint::from_hex(&s).is_err(), "{:?}", s);
    }
}

#[test]
fn chain_id_from_fixed_edge_cases() {
    assert!(ChainId::from_fixed(&[0; CHAIN_ID_MAX]).is_err(), "empty name");
    let full = ChainId::from_fixed(&[b'a'; CHAIN_ID_MAX]).unwrap();
    assert_eq!(full.as_str().len(), CHAIN_ID_MAX);
}

// ---------------------------------------------------------------------------------------------------------------
// tracking codes (RSA: few cases)

proptest! {
    #![proptest_config(cfg(10))]

    #[test]
    fn tc_build_then_peel_recovers_every_layer(p in path(), seed in any::<u64>()) {
        let hops: Vec<HopSpec> = p.iter().map(|(i, l)| HopSpec { key: ids()[*i].public().clone(), layer: l.clone() }).collect();
        // Odd seeds: the production builder (AWS-LC's OAEP); even ones: the reproducible one, checked as such.
        let mut tc = if seed % 2 == 1 {
            tc::build(&hops, &mut rng(seed)).unwrap()
        } else {
            let tc = tc::build_reproducible(&hops, &mut rng(seed)).unwrap();
            prop_assert!(tc::build_reproducible(&hops, &mut rng(seed)).unwrap() == tc, "deterministic under a seeded rng");
            tc
        };
        for (n, (i, l)) in p.iter().enumerate() {
            let peeled = tc::peel(&tc, &ids()[*i]).unwrap();
            prop_assert_eq!(&peeled.layer, l);
            match peeled.next {
                Some(next) => {
                    prop_assert!(n + 1 < p.len());
                    prop_assert_ne!(&next, &tc);
                    tc = next;
                }
                None => prop_assert_eq!(n + 1, p.len()),
            }
        }
    }

    #[test]
    fn tc_peel_refuses_garbage_and_any_flipped_byte(garbage in tc_bytes(), target in layer(true), pos in 0..TC_LEN, bit in 0u8..8, seed in any::<u64>()) {
        let garbage: [u8; TC_LEN] = garbage.try_into().unwrap();
        prop_assert!(tc::peel(&garbage, &ids()[0]).is_err());
        let tc = tc::build(&[HopSpec { key: ids()[0].public().clone(), layer: target.clone() }], &mut rng(seed)).unwrap();
        prop_assert_eq!(tc::peel(&tc, &ids()[0]).unwrap().layer, target);
        let mut bad = tc.clone();
        bad[pos] ^= 1 << bit;
        prop_assert!(tc::peel(&bad, &ids()[0]).is_err(), "flip at {}", pos);
        // Another key (same or other size) cannot open it.
        prop_assert!(tc::peel(&tc, &ids()[1]).is_err());
        prop_assert!(tc::peel(&tc, &ids()[3]).is_err());
    }

    #[test]
    fn tc_layers_peel_refuses_out_of_domain_fields(relay in layer(false), target in layer(true), seed in any::<u64>()) {
        // build() encodes whatever it is given; peel() is where the domain is enforced.
        let key = ids()[0].public().clone();
        let mut zero_prev = target.clone();
        zero_prev.prev = NeighborId(0);
        let mut zero_next = relay;
        zero_next.kind = LayerKind::Relay { next: NeighborId(0) };
        for (bad, path) in [
            ("zero prev", vec![HopSpec { key: key.clone(), layer: zero_prev }]),
            ("zero next", vec![HopSpec { key: key.clone(), layer: zero_next }, HopSpec { key: key.clone(), layer: target.clone() }]),
        ] {
            let tc = tc::build(&path, &mut rng(seed)).unwrap();
            prop_assert!(matches!(tc::peel(&tc, &ids()[0]), Err(ProtoError::Invalid { .. })), "{}", bad);
        }
    }
}

#[test]
fn tc_build_refuses_bad_paths() {
    let l = |target: bool| Layer {
        prev: NeighborId(1),
        kind: if target {
            LayerKind::Target { chain: ChainId::new("regtest").unwrap(), session: [0; 16], e2e_secret: Secret([0; 32]) }
        } else {
            LayerKind::Relay { next: NeighborId(2) }
        },
        hop_secret: Secret([0; 32]),
        expires: 0,
        replay_tag: [0; 16],
    };
    let hop = |target| HopSpec { key: ids()[0].public().clone(), layer: l(target) };
    assert!(matches!(tc::build(&[], &mut rng(0)), Err(ProtoError::PathTooLong(_))));
    assert!(tc::build(&[hop(false)], &mut rng(0)).is_err(), "last layer must be a target");
    assert!(tc::build(&[hop(true), hop(true)], &mut rng(0)).is_err(), "only the last layer is a target");
    let mut eight: Vec<HopSpec> = (0..MAX_LAYERS).map(|_| hop(false)).collect();
    eight.push(hop(true));
    assert!(matches!(tc::build(&eight, &mut rng(0)), Err(ProtoError::PathTooLong(_))));
    // Seven 3072-bit layers are the documented worst case and must fit.
    let big: Vec<HopSpec> =
        (0..MAX_LAYERS).map(|i| HopSpec { key: ids()[3].public().clone(), layer: l(i + 1 == MAX_LAYERS) }).collect();
    assert!(tc::build(&big, &mut rng(0)).is_ok());
}

proptest! {
    #![proptest_config(cfg(128))]

    #[test]
    fn layer_expiry_is_checked_with_skew(expires in any::<u64>(), now in any::<u64>(), skew in 0u64..100_000) {
        let l = Layer {
            prev: NeighborId(1),
            kind: LayerKind::Relay { next: NeighborId(2) },
            hop_secret: Secret([0; 32]),
            expires,
            replay_tag: [0; 16],
        };
        let not_expired = now <= expires.saturating_add(skew);
        let max = tc::MAX_LAYER_LIFETIME + skew;
        let not_too_far = expires <= now.saturating_add(max);
        prop_assert_eq!(l.check_expiry(now, skew).is_ok(), not_expired && not_too_far);
        if !not_expired {
            prop_assert_eq!(l.check_expiry(now, skew), Err(ProtoError::Expired { expires, now }));
        } else if !not_too_far {
            prop_assert_eq!(l.check_expiry(now, skew), Err(ProtoError::ExpiryTooFar { expires, now, max }));
        }
    }

    #[test]
    fn layer_expiry_near_now_is_what_decides(now in 1_000_000u64..4_000_000_000, ahead in 0u64..200_000, skew in 0u64..1000) {
        // The same property on the values that matter (random u64s almost never land near `now`).
        let l = Layer {
            prev: NeighborId(1),
            kind: LayerKind::Relay { next: NeighborId(2) },
            hop_secret: Secret([0; 32]),
            expires: now + ahead,
            replay_tag: [0; 16],
        };
        prop_assert_eq!(l.check_expiry(now, skew).is_ok(), ahead <= tc::MAX_LAYER_LIFETIME + skew);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// circuits: onion layers, end-to-end session, fragments

proptest! {
    #![proptest_config(cfg(24))]

    #[test]
    fn message_crosses_onion_and_e2e_and_reassembles(
        len in 0..=3 * RECORD_DATA_MAX + 17,
        fill in any::<u8>(),
        secrets in vec(any::<[u8; 32]>(), 1..=MAX_LAYERS),
        e2e in any::<[u8; 32]>(),
        seed in any::<u64>(),
    ) {
        let msg: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ fill).collect();
        let secrets: Vec<Secret> = secrets.into_iter().map(Secret).collect();
        let (mut req, mut tgt) = e2e_pair(&Secret(e2e), seed);
        let mut stack = OnionStack::new(&secrets);
        prop_assert_eq!(stack.len(), secrets.len());
        let mut hops: Vec<HopLayer> = secrets.iter().map(HopLayer::new).collect();
        let frags: Vec<_> = fragments(&msg).collect();
        prop_assert_eq!(frags.len(), len.div_ceil(RECORD_DATA_MAX).max(1));
        prop_assert!(frags[..frags.len() - 1].iter().all(|(k, d)| *k == RecordType::Part && d.len() == RECORD_DATA_MAX));
        prop_assert_eq!(frags.last().unwrap().0, RecordType::End);
        let mut re = Reassembler::new(len);
        let mut got = None;
        for (i, (kind, data)) in frags.iter().enumerate() {
            let mut p = [0u8; CELL_PAYLOAD_LEN];
            req.seal(*kind, data, &mut p).unwrap();
            let sealed = p;
            stack.wrap_forward(&mut p);
            for h in hops.iter_mut() {
                h.forward(&mut p);
            }
            prop_assert_eq!(&p[..], &sealed[..], "onion layers cancel");
            let (k, d) = tgt.open(&mut p).unwrap();
            prop_assert_eq!((k, d), (*kind, *data));
            let r = re.push(k, d).unwrap();
            prop_assert_eq!(r.is_some(), i + 1 == frags.len());
            got = got.or(r);
        }
        prop_assert_eq!(got.unwrap(), msg.clone());
        prop_assert_eq!(re.pending(), 0);
        // Backward: the target's record, every hop adding its layer, the requester removing all.
        let mut p = [0u8; CELL_PAYLOAD_LEN];
        tgt.seal(RecordType::End, &msg[..len.min(RECORD_DATA_MAX)], &mut p).unwrap();
        for h in hops.iter_mut().rev() {
            h.backward(&mut p);
        }
        stack.unwrap_backward(&mut p);
        let (k, d) = req.open(&mut p).unwrap();
        prop_assert_eq!((k, d), (RecordType::End, &msg[..len.min(RECORD_DATA_MAX)]));
        // One byte over the limit is refused.
        if len > 0 {
            let mut small = Reassembler::new(len - 1);
            let res: Result<Vec<_>, _> = fragments(&msg).map(|(k, d)| small.push(k, d)).collect();
            prop_assert!(matches!(res, Err(ProtoError::TooLarge { .. })), "over-limit message accepted");
        }
    }

    #[test]
    fn e2e_open_refuses_any_flipped_bit(bit in 0..CELL_PAYLOAD_LEN * 8, data in bytes(200), seed in any::<u64>()) {
        let (mut req, mut tgt) = e2e_pair(&Secret([7; 32]), seed);
        let mut p = [0u8; CELL_PAYLOAD_LEN];
        req.seal(RecordType::End, &data, &mut p).unwrap();
        let good = p;
        p[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(matches!(tgt.open(&mut p), Err(ProtoError::BadTag(_))));
        // The failure did not advance the session: the intact record still opens.
        let mut p = good;
        prop_assert_eq!(tgt.open(&mut p).unwrap(), (RecordType::End, &data[..]));
    }

    #[test]
    fn e2e_handshake_refuses_flipped_hello(bit in 0..CELL_PAYLOAD_LEN * 8, seed in any::<u64>()) {
        let s = Secret([3; 32]);
        let mut rp = [0u8; CELL_PAYLOAD_LEN];
        let mut tp = [0u8; CELL_PAYLOAD_LEN];
        let _hr = E2eHandshake::start(Role::Requester, &s, &mut rng(seed), &mut rp).unwrap();
        let ht = E2eHandshake::start(Role::Target, &s, &mut rng(seed + 1), &mut tp).unwrap();
        rp[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(ht.finish(&mut rp).is_err());
    }

    #[test]
    fn e2e_refuses_hello_replays_reordering_and_garbage(garbage in vec(any::<u8>(), CELL_PAYLOAD_LEN), seed in any::<u64>()) {
        let (mut req, mut tgt) = e2e_pair(&Secret([4; 32]), seed);
        let mut g: [u8; CELL_PAYLOAD_LEN] = garbage.try_into().unwrap();
        prop_assert!(tgt.open(&mut g).is_err());
        let mut a = [0u8; CELL_PAYLOAD_LEN];
        let mut b = [0u8; CELL_PAYLOAD_LEN];
        req.seal(RecordType::Part, b"a", &mut a).unwrap();
        req.seal(RecordType::Hello, &[0; 32], &mut b).unwrap();
        let mut b2 = b;
        prop_assert!(tgt.open(&mut b2).is_err(), "out of order");
        prop_assert_eq!(tgt.open(&mut a).unwrap(), (RecordType::Part, &b"a"[..]));
        prop_assert!(matches!(tgt.open(&mut b), Err(ProtoError::Unexpected(_))), "second HELLO");
        // A HELLO keyed for the wrong direction does not finish a handshake.
        let mut rp = [0u8; CELL_PAYLOAD_LEN];
        let hr = E2eHandshake::start(Role::Requester, &Secret([4; 32]), &mut rng(seed), &mut rp).unwrap();
        prop_assert!(hr.finish(&mut rp).is_err());
    }
}

#[test]
fn reassembler_refuses_non_data_records() {
    let mut re = Reassembler::new(10);
    assert!(re.push(RecordType::Hello, b"").is_err());
    assert!(re.push(RecordType::Close, b"").is_err());
    assert_eq!(re.push(RecordType::Part, b"abc").unwrap(), None);
    assert_eq!(re.pending(), 3);
    assert_eq!(re.push(RecordType::End, b"").unwrap(), Some(b"abc".to_vec()));
    let (mut req, _) = e2e_pair(&Secret([1; 32]), 1);
    let mut p = [0u8; CELL_PAYLOAD_LEN];
    assert!(matches!(req.seal(RecordType::End, &[0; RECORD_DATA_MAX + 1], &mut p), Err(ProtoError::TooLarge { .. })));
}

// ---------------------------------------------------------------------------------------------------------------
// link handshake, cells on a link, probe

fn well_formed_hello(eph: [u8; 32], nonce: [u8; 32]) -> Vec<u8> {
    [&LINK_MAGIC[..], &1u16.to_be_bytes(), &eph, &nonce].concat()
}

/// Curve25519 points of small order (their shared secrets are all-zero).
const LOW_ORDER: [[u8; 32]; 3] = [
    [0; 32],
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a, 0xda, 0x09,
        0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
    ],
];

proptest! {
    #![proptest_config(cfg(64))]

    #[test]
    fn acceptor_start_accepts_exactly_well_formed_hellos(b in bytes(100), magic_ok in any::<bool>(), ver in prop_oneof![Just(1u16), any::<u16>()], eph in any::<[u8; 32]>(), seed in any::<u64>()) {
        // Random bytes: anything but a 74-byte well-formed HELLO is refused.
        let random_ok = b.len() == HELLO_LEN && b[..8] == LINK_MAGIC && b[8..10] == [0, 1];
        if !random_ok {
            prop_assert!(Acceptor::start(&mut rng(seed), &b).is_err());
        }
        let mut h = well_formed_hello(eph, [9; 32]);
        if !magic_ok {
            h[0] ^= 0x20;
        }
        h[8..10].copy_from_slice(&ver.to_be_bytes());
        let r = Acceptor::start(&mut rng(seed), &h);
        match (magic_ok, ver) {
            (false, _) => prop_assert!(matches!(r, Err(ProtoError::BadMagic(_)))),
            (true, 1) => prop_assert_eq!(&r.unwrap().1[..8], &LINK_MAGIC[..]),
            (true, v) => prop_assert!(matches!(r, Err(ProtoError::BadVersion(x)) if x == v)),
        }
    }

    #[test]
    fn acceptor_on_auth_refuses_garbage(eph in any::<[u8; 32]>(), msg in bytes(MAX_AUTH_LEN + 40), framed in any::<bool>(), seed in any::<u64>()) {
        let (acceptor, _) = Acceptor::start(&mut rng(seed), &well_formed_hello(eph, [1; 32])).unwrap();
        let msg = if framed { [&(msg.len() as u16).to_be_bytes()[..], &msg].concat() } else { msg };
        let mut called = false;
        let r = acceptor.on_auth(&msg, &ids()[1], &mut rng(seed), |_| {
            called = true;
            None
        }, |_| false);
        prop_assert!(r.is_err());
        prop_assert!(!called, "lookup must not run before AUTH authenticates");
    }

    #[test]
    fn auth_frame_len_and_probe_body_match_their_domains(prefix in any::<[u8; 2]>(), body in bytes(40), v1 in any::<bool>()) {
        let n = u16::from_be_bytes(prefix) as usize;
        prop_assert_eq!(link::auth_frame_len(prefix).ok(), (17..=MAX_AUTH_LEN).contains(&n).then_some(n));
        let mut body = body;
        if v1 && body.len() >= 2 {
            body[..2].copy_from_slice(&[0, 1]);
        }
        let ok = body.len() == 34 && body[..2] == [0, 1];
        match link::decode_probe_body(&body) {
            Ok(nonce) => {
                prop_assert!(ok);
                prop_assert_eq!(&nonce[..], &body[2..]);
            }
            Err(_) => prop_assert!(!ok),
        }
    }
}

#[test]
fn acceptor_and_dialer_refuse_low_order_shares() {
    for p in LOW_ORDER {
        assert!(Acceptor::start(&mut rng(1), &well_formed_hello(p, [0; 32])).is_err(), "{p:02x?}");
        let (dialer, _) = Dialer::start(&mut rng(2), ids()[1].public().clone(), NeighborId(1));
        assert!(dialer.on_reply(&well_formed_hello(p, [0; 32]), &ids()[0], &mut rng(3)).is_err());
    }
}

#[test]
fn auth_frame_len_exhaustively() {
    for n in 0..=u16::MAX {
        let r = link::auth_frame_len(n.to_be_bytes());
        assert_eq!(r.is_ok(), (17..=MAX_AUTH_LEN).contains(&(n as usize)), "{n}");
    }
}

proptest! {
    #![proptest_config(cfg(8))]

    #[test]
    fn dialer_refuses_garbage_replies_and_auth_replies(reply in bytes(100), msg in bytes(MAX_AUTH_LEN + 40), framed in any::<bool>(), seed in any::<u64>()) {
        let (d, a) = (&ids()[0], &ids()[1]);
        let (dialer, _) = Dialer::start(&mut rng(seed), a.public().clone(), NeighborId(5));
        if !(reply.len() == HELLO_LEN && reply[..8] == LINK_MAGIC && reply[8..10] == [0, 1]) {
            prop_assert!(dialer.on_reply(&reply, d, &mut rng(seed)).is_err());
        }
        // A real acceptor's REPLY, then a garbage AUTH_REPLY.
        let (dialer, hello) = Dialer::start(&mut rng(seed), a.public().clone(), NeighborId(5));
        let (_acc, real_reply) = Acceptor::start(&mut rng(seed + 1), &hello).unwrap();
        let (sent, _auth) = dialer.on_reply(&real_reply, d, &mut rng(seed + 2)).unwrap();
        let msg = if framed { [&(msg.len() as u16).to_be_bytes()[..], &msg].concat() } else { msg };
        prop_assert!(sent.on_auth_reply(&msg).is_err());
    }

    #[test]
    fn handshake_messages_refuse_any_flipped_bit(which in 0..2usize, pos in any::<prop::sample::Index>(), bit in 0u8..8, seed in any::<u64>()) {
        let (d, a) = (&ids()[0], &ids()[1]);
        let nid = NeighborId(9);
        let (dialer, hello) = Dialer::start(&mut rng(seed), a.public().clone(), nid);
        let (acceptor, reply) = Acceptor::start(&mut rng(seed + 1), &hello).unwrap();
        let (dialer, mut auth) = dialer.on_reply(&reply, d, &mut rng(seed + 2)).unwrap();
        if which == 0 {
            let i = pos.index(auth.len());
            auth[i] ^= 1 << bit;
            prop_assert!(acceptor.on_auth(&auth, a, &mut rng(seed), |_| Some((d.public().clone(), nid)), |_| false).is_err());
        } else {
            let out = acceptor.on_auth(&auth, a, &mut rng(seed + 3), |_| Some((d.public().clone(), nid)), |_| false).unwrap();
            let mut r = out.reply;
            let i = pos.index(r.len());
            r[i] ^= 1 << bit;
            prop_assert!(dialer.on_auth_reply(&r).is_err());
        }
    }

    #[test]
    fn probe_answer_verifies_and_refuses_tampering(nonce in any::<[u8; 32]>(), pos in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<prop::sample::Index>(), junk in bytes(MAX_PROBE_ANSWER + 10), key in 0usize..4) {
        let id = &ids()[key];
        let ans = link::answer_probe(id, &nonce, &mut rng(1));
        prop_assert_eq!(link::verify_probe_answer(&nonce, &ans).unwrap().fingerprint(), id.fingerprint());
        let mut other = nonce;
        other[0] ^= 1;
        prop_assert!(link::verify_probe_answer(&other, &ans).is_err());
        let mut bad = ans.clone();
        bad[pos.index(ans.len())] ^= 1 << bit;
        prop_assert!(link::verify_probe_answer(&nonce, &bad).is_err());
        prop_assert!(link::verify_probe_answer(&nonce, &ans[..cut.index(ans.len())]).is_err());
        prop_assert!(link::verify_probe_answer(&nonce, &[&ans[..], &[0]].concat()).is_err());
        prop_assert!(link::verify_probe_answer(&nonce, &junk).is_err());
    }
}

#[test]
fn verify_probe_answer_refuses_oversized_input() {
    assert!(matches!(
        link::verify_probe_answer(&[0; 32], &vec![0; MAX_PROBE_ANSWER + 1]),
        Err(ProtoError::TooLarge { .. })
    ));
}

#[test]
fn link_cells_round_trip_and_refuse_tampering() {
    let (mut d, mut a) = link_pair(100);
    assert!(d.dialer && !a.dialer);
    let mut c = Cell::new(DIALER_CIRC_BIT | 7, Command::Data);
    c.payload[..3].copy_from_slice(b"abc");
    for i in 0..(SEALED_CELL_LEN * 8) {
        let sealed = d.seal_cell(&c).unwrap();
        let mut bad = *sealed;
        bad[i / 8] ^= 1 << (i % 8);
        // Only every 97th bit, plus the tag, to keep this quick; the counter stays in step because the
        // good cell is then opened.
        if i % 97 == 0 || i >= CELL_LEN * 8 {
            assert!(a.open_cell(&bad).is_err(), "bit {i}");
        }
        assert_eq!(a.open_cell(&sealed).unwrap(), c);
    }
    // A link cipher opens nothing sealed for the other direction.
    let s = a.seal_cell(&Cell::padding()).unwrap();
    assert!(a.open_cell(&s).is_err());
    assert_eq!(d.open_cell(&s).unwrap(), Cell::padding());
}

// ---------------------------------------------------------------------------------------------------------------
// tracker channel

proptest! {
    #![proptest_config(cfg(128))]

    #[test]
    fn hello_ct_len_matches_its_domain(b in bytes(16), magic in any::<bool>(), ver1 in any::<bool>(), len in prop_oneof![0u16..=400, any::<u16>()]) {
        let mut h = b;
        if magic && h.len() >= 8 {
            h[..8].copy_from_slice(&TRACKER_MAGIC);
        }
        if ver1 && h.len() >= 10 {
            h[8..10].copy_from_slice(&[0, 1]);
        }
        if h.len() >= 12 {
            h[10..12].copy_from_slice(&len.to_be_bytes());
        }
        let ok = h.len() >= 12 && h[..8] == TRACKER_MAGIC && h[8..10] == [0, 1] && (len as usize) <= MAX_RSA_BYTES;
        prop_assert_eq!(TrackerChannel::hello_ct_len(&h).ok(), ok.then_some(len as usize));
    }

    #[test]
    fn frame_len_matches_its_domain(n in prop_oneof![0u32..64, MAX_FRAME as u32 - 8..MAX_FRAME as u32 + 8, any::<u32>()]) {
        let ok = (16..=MAX_FRAME).contains(&(n as usize));
        prop_assert_eq!(TrackerChannel::frame_len(n.to_be_bytes()).ok(), ok.then_some(n as usize));
    }
}

proptest! {
    #![proptest_config(cfg(16))]

    #[test]
    fn tracker_channel_refuses_garbage_and_tampered_frames(msg in to_tracker(), garbage in bytes(300), pos in any::<prop::sample::Index>(), bit in 0u8..8, seed in any::<u64>()) {
        let t = &ids()[2];
        let (hello, hs) = TrackerChannel::connect(&mut rng(seed), t.public()).unwrap();
        let (reply, mut trk) = TrackerChannel::accept(&mut rng(seed + 1), t, &hello[12..]).unwrap();
        let mut peer = hs.finish(&reply).unwrap();
        prop_assert!(trk.open::<ToTracker>(&garbage).is_err());
        let frame = peer.seal(&msg).unwrap();
        let len = TrackerChannel::frame_len(frame[..4].try_into().unwrap()).unwrap();
        prop_assert_eq!(len + 4, frame.len());
        let mut bad = frame[4..].to_vec();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(trk.open::<ToTracker>(&bad).is_err());
        prop_assert!(trk.open::<ToTracker>(&frame[4..4 + pos.index(len)]).is_err());
        // Failures did not advance the channel.
        prop_assert_eq!(trk.open::<ToTracker>(&frame[4..]).unwrap(), msg);
        // A reply is not readable with the wrong direction's key.
        let back = trk.seal(&FromTracker::Ack).unwrap();
        prop_assert!(trk.open::<FromTracker>(&back[4..]).is_err());
        prop_assert_eq!(peer.open::<FromTracker>(&back[4..]).unwrap(), FromTracker::Ack);
    }
}

#[test]
fn tracker_accept_refuses_bad_ciphertexts() {
    let t = &ids()[2];
    let (hello, _) = TrackerChannel::connect(&mut rng(1), t.public()).unwrap();
    let rest = &hello[12..];
    assert!(TrackerChannel::accept(&mut rng(2), t, &rest[..rest.len() - 1]).is_err());
    assert!(TrackerChannel::accept(&mut rng(2), t, &[]).is_err());
    assert!(TrackerChannel::accept(&mut rng(2), t, &rest[..31]).is_err());
    let mut bad = rest.to_vec();
    bad[100] ^= 4;
    assert!(TrackerChannel::accept(&mut rng(2), t, &bad).is_err());
    // A 3072-bit tracker and a 2048-bit ciphertext.
    assert!(TrackerChannel::accept(&mut rng(2), &ids()[3], rest).is_err());
    // An OAEP plaintext that is not 32 bytes.
    let mut ct31 = t.public().encrypt(&[0; 31]).unwrap();
    ct31.extend_from_slice(&rest[rest.len() - 32..]);
    assert!(matches!(TrackerChannel::accept(&mut rng(2), t, &ct31), Err(ProtoError::BadLength { .. })));
    // A low-order ephemeral key from the peer is refused.
    let mut low = rest.to_vec();
    let n = low.len();
    low[n - 32..].fill(0);
    assert!(TrackerChannel::accept(&mut rng(2), t, &low).is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// keys

fn spki(n: &rsa::BigUint, e: u32) -> Vec<u8> {
    use rsa::pkcs8::EncodePublicKey;
    rsa::RsaPublicKey::new(n.clone(), rsa::BigUint::from(e)).unwrap().to_public_key_der().unwrap().into_vec()
}

/// An odd number of exactly `bits` bits (not a valid RSA modulus, but structurally a public key).
fn modulus(bits: usize) -> rsa::BigUint {
    (rsa::BigUint::from(1u8) << (bits - 1)) + rsa::BigUint::from(1u8)
}

proptest! {
    #![proptest_config(cfg(128))]

    #[test]
    fn public_key_from_der_refuses_garbage(b in bytes(700), cut in any::<prop::sample::Index>(), pos in any::<prop::sample::Index>()) {
        prop_assert!(PublicKey::from_der(&b).is_err());
        let der = ids()[0].public().der();
        prop_assert!(PublicKey::from_der(&der[..cut.index(der.len())]).is_err());
        prop_assert!(PublicKey::from_der(&[der, &[0]].concat()).is_err(), "trailing byte");
        // Bytes of the DER structure itself (not the modulus digits): any change is refused.
        let mut bad = der.to_vec();
        let i = pos.index(33);
        bad[i] = bad[i].wrapping_add(1);
        prop_assert!(PublicKey::from_der(&bad).is_err(), "changed byte {}", i);
    }
}

#[test]
fn public_key_from_der_refuses_disallowed_keys() {
    // A real 1024-bit key.
    let small = rsa::RsaPrivateKey::new(&mut rng(1024), 1024).unwrap();
    let der = {
        use rsa::pkcs8::EncodePublicKey;
        small.to_public_key().to_public_key_der().unwrap().into_vec()
    };
    assert!(matches!(PublicKey::from_der(&der), Err(ProtoError::BadKey(_))));
    for bits in [1024, 1536, 2040, 2056, 3064, 3080, 4096] {
        assert!(matches!(PublicKey::from_der(&spki(&modulus(bits), 65537)), Err(ProtoError::BadKey(_))), "{bits}");
    }
    for bits in [2048, 3072] {
        assert!(PublicKey::from_der(&spki(&modulus(bits), 65537)).is_ok(), "{bits}-bit structure is accepted");
        assert!(matches!(PublicKey::from_der(&spki(&modulus(bits), 3)), Err(ProtoError::BadKey(_))), "e=3");
        assert!(matches!(PublicKey::from_der(&spki(&modulus(bits), 17)), Err(ProtoError::BadKey(_))), "e=17");
    }
    // Oversized input is refused before parsing.
    assert!(matches!(PublicKey::from_der(&[0x30; MAX_SPKI_LEN + 1]), Err(ProtoError::TooLarge { .. })));
    assert!(Identity::generate(&mut rng(1), 1024).is_err());
    assert!(Identity::from_pkcs8_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err());
    assert!(Identity::from_pkcs8_pem("").is_err());
}

/// The module docs promise "Key sizes: 2048 or 3072 bits ... anything else is refused on decode", but the check
/// rounds the modulus up to whole bytes, so 2041..=2047-bit (and 3065..=3071-bit) moduli pass as "2048"/"3072".
#[test]
fn public_key_from_der_refuses_moduli_a_few_bits_short() {
    for bits in [2041, 2047, 3065, 3071] {
        assert!(
            matches!(PublicKey::from_der(&spki(&modulus(bits), 65537)), Err(ProtoError::BadKey(_))),
            "a {bits}-bit modulus was accepted as an allowed key size"
        );
    }
}

proptest! {
    #![proptest_config(cfg(32))]

    #[test]
    fn identity_decrypt_refuses_wrong_lengths_and_garbage(len in 0usize..400, b in any::<u8>(), key in 0usize..4) {
        let id = &ids()[key];
        let ct = vec![b; len];
        let r = id.decrypt(&ct, "t");
        if len != id.public().size() {
            prop_assert!(matches!(r, Err(ProtoError::BadLength { .. })), "{:?}", r);
        } else {
            prop_assert!(r.is_err());
        }
        // Signatures of the wrong length never verify.
        prop_assert!(id.public().verify(b"m", &ct, "t").is_err());
    }
}

#[test]
fn aead_counter_open_refuses_short_input() {
    let mut ch = AeadCounter::new(&Secret([1; 32]));
    for n in 0..16 {
        assert!(matches!(ch.open(b"", &vec![0; n], "t"), Err(ProtoError::Truncated { .. })));
    }
    assert_eq!(ch.counter(), 0);
}
