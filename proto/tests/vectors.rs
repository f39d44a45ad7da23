//! Known-answer tests against the committed vectors in `tests/vectors/{keys,tc,link,cells,tracker}/`
//! (written by `cargo run -p anomos-proto --example gen_vectors -- proto/tests/vectors`; formats are described at
//! the top of each vector file).
//!
//! What these prove, for the current code against the committed bytes:
//! * (i) rebuilding every artefact from the committed inputs (layer fields, committed PEM keys, rng seeds)
//!   reproduces the committed bytes exactly: a change to any wire format or key schedule fails here;
//! * (ii) the committed TC peels hop by hop into the committed intermediate TCs and layers, and every documented
//!   intermediate (OAEP seed, body key, 160-byte header, pad) matches an independent derivation from the spec;
//! * (iii) the committed link handshake, replayed into the Acceptor/Dialer state machines with the same seeded
//!   rngs, reproduces every message and yields link keys that open the committed sealed cells; the key schedule
//!   re-derived from the documented formulas opens them too;
//! * (iv) the committed tracker frames open and decode to the documented messages on both ends of the channel.
//!
//! The keys are loaded from the committed PEM files, never regenerated, so these tests do not depend on how the
//! `rsa` crate turns a seeded rng into a key.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::path::PathBuf;

use anomos_proto::cell::{BreakReason, Cell, Command, DenyReason, CELL_LEN, SEALED_CELL_LEN};
use anomos_proto::crypto::{kdf, kdf_stream, sha256, AeadCounter, Secret, TAG_LEN};
use anomos_proto::identity::{Fingerprint, Identity, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId};
use anomos_proto::link::{self, Acceptor, Dialer};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind, LAYER_HEADER_LEN, TC_LEN};
use anomos_proto::tracker::{self, FromTracker, ToTracker, TrackerChannel, CLIENT_HELLO_HEADER, EPHEMERAL_LEN};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("vectors")
}

/// One parsed vector file: `name = value` pairs (names unique).
struct Vectors {
    file: String,
    map: HashMap<String, String>,
}

impl Vectors {
    fn load(rel: &str) -> Self {
        let path = dir().join(rel);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once(" = ").unwrap_or_else(|| panic!("{rel}:{}: not `name = value`", n + 1));
            assert!(map.insert(k.to_string(), v.to_string()).is_none(), "{rel}:{}: duplicate {k}", n + 1);
        }
        let v = Vectors { file: rel.to_string(), map };
        v.check_rng_keys();
        v
    }

    fn s(&self, k: &str) -> &str {
        self.map.get(k).unwrap_or_else(|| panic!("{}: missing {k}", self.file))
    }

    fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    fn hex(&self, k: &str) -> Vec<u8> {
        let v = self.s(k);
        assert_eq!(v, v.to_ascii_lowercase(), "{}: {k} must be lowercase hex", self.file);
        hex::decode(v).unwrap_or_else(|e| panic!("{}: {k}: {e}", self.file))
    }

    fn arr<const N: usize>(&self, k: &str) -> [u8; N] {
        self.hex(k).try_into().unwrap_or_else(|v: Vec<u8>| panic!("{}: {k} has {} bytes, want {N}", self.file, v.len()))
    }

    fn num<T: std::str::FromStr>(&self, k: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.s(k).parse().unwrap_or_else(|e| panic!("{}: {k}: {e:?}", self.file))
    }

    fn hex_u64(&self, k: &str) -> u64 {
        u64::from_str_radix(self.s(k), 16).unwrap_or_else(|e| panic!("{}: {k}: {e}", self.file))
    }

    fn rng(&self, k: &str) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(self.num(k))
    }

    fn tc(&self, k: &str) -> Box<[u8; TC_LEN]> {
        Box::new(self.arr(k))
    }

    /// Every documented `*.rng_seed.chacha20_key` is what `seed_from_u64` really produces.
    fn check_rng_keys(&self) {
        for (k, v) in &self.map {
            if let Some(seed_key) = k.strip_suffix(".chacha20_key") {
                let seed: u64 = self.num(seed_key);
                assert_eq!(&hex::encode(ChaCha20Rng::seed_from_u64(seed).get_seed()), v, "{}: {k}", self.file);
            }
        }
    }
}

/// Loads a committed PEM identity from `tests/vectors/keys/`, signing with the seeded signer so that the
/// committed signatures are reproduced (`Identity::with_seeded_signer`).
fn identity(file: &str) -> Identity {
    let path = dir().join("keys").join(file);
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Identity::from_pkcs8_pem(&pem).unwrap_or_else(|e| panic!("{file}: {e}")).with_seeded_signer()
}

#[test]
fn keys_load_and_match_their_documented_public_halves() {
    let v = Vectors::load("keys/keys.txt");
    let mut n = 0;
    while v.has(&format!("key.{n}.file")) {
        let p = format!("key.{n}");
        let file = v.s(&format!("{p}.file"));
        let pem = std::fs::read_to_string(dir().join("keys").join(file)).unwrap();
        let id = identity(file);
        // Re-encoding reproduces the committed file byte for byte (PKCS#8, LF line endings).
        assert_eq!(id.to_pkcs8_pem().unwrap(), pem, "{file}");
        assert_eq!(id.public().bits(), v.num::<usize>(&format!("{p}.bits")), "{file}");
        let der = v.hex(&format!("{p}.spki_der"));
        assert_eq!(id.public().der(), &der[..], "{file}");
        let fp = v.arr::<32>(&format!("{p}.fingerprint"));
        assert_eq!(fp, sha256(&[&der]), "{file}: fingerprint is SHA-256 of the SPKI DER");
        assert_eq!(id.fingerprint(), Fingerprint(fp));
        assert_eq!(&PublicKey::from_der(&der).unwrap(), id.public());
        n += 1;
    }
    assert_eq!(n, 4, "three 2048-bit identities and one 3072-bit");
}

/// The 160-byte layer header, encoded here independently from the documented layout.
fn spec_header(l: &Layer) -> [u8; LAYER_HEADER_LEN] {
    let mut h = [0u8; LAYER_HEADER_LEN];
    h[0] = 1;
    h[2..10].copy_from_slice(&l.prev.0.to_be_bytes());
    h[18..50].copy_from_slice(&l.hop_secret.0);
    match &l.kind {
        LayerKind::Relay { next } => {
            h[1] = 1;
            h[10..18].copy_from_slice(&next.0.to_be_bytes());
        }
        LayerKind::Target { chain, session, e2e_secret } => {
            h[1] = 2;
            h[50..82].copy_from_slice(&e2e_secret.0);
            h[82..82 + chain.as_str().len()].copy_from_slice(chain.as_str().as_bytes());
            h[114..130].copy_from_slice(session);
        }
    }
    h[130..138].copy_from_slice(&l.expires.to_be_bytes());
    h[138..154].copy_from_slice(&l.replay_tag);
    h
}

/// The committed TC path: (hop identity, layer) per hop.
fn tc_path(v: &Vectors) -> Vec<(Identity, Layer)> {
    let n: usize = v.num("tc.hops");
    (0..n)
        .map(|i| {
            let p = format!("hop.{i}");
            let id = identity(v.s(&format!("{p}.key")));
            assert_eq!(id.public().bits(), v.num::<usize>(&format!("{p}.bits")));
            let kind = match v.s(&format!("{p}.kind")) {
                "relay" => LayerKind::Relay { next: NeighborId(v.num(&format!("{p}.next"))) },
                "target" => LayerKind::Target {
                    chain: ChainId::new(v.s(&format!("{p}.chain"))).unwrap(),
                    session: v.arr(&format!("{p}.session")),
                    e2e_secret: Secret(v.arr(&format!("{p}.e2e_secret"))),
                },
                k => panic!("hop {i}: kind {k}"),
            };
            let layer = Layer {
                prev: NeighborId(v.num(&format!("{p}.prev"))),
                kind,
                hop_secret: Secret(v.arr(&format!("{p}.hop_secret"))),
                expires: v.num(&format!("{p}.expires")),
                replay_tag: v.arr(&format!("{p}.replay_tag")),
            };
            (id, layer)
        })
        .collect()
}

#[test]
fn tc_rebuilt_from_committed_inputs_matches_committed_bytes() {
    let v = Vectors::load("tc/tc_3hop.txt");
    let path = tc_path(&v);
    assert_eq!(path.len(), 3);
    let bits: Vec<usize> = path.iter().map(|(id, _)| id.public().bits()).collect();
    assert!(bits.contains(&2048) && bits.contains(&3072), "mixed key sizes: {bits:?}");
    let hops: Vec<HopSpec> =
        path.iter().map(|(id, l)| HopSpec { key: id.public().clone(), layer: l.clone() }).collect();
    let built = tc::build_reproducible(&hops, &mut v.rng("tc.build.rng_seed")).unwrap();
    assert_eq!(hex::encode(&built[..]), v.s("hop.0.tc"), "tc::build_reproducible output changed");
    for (i, (_, l)) in path.iter().enumerate() {
        assert_eq!(spec_header(l), v.arr::<LAYER_HEADER_LEN>(&format!("hop.{i}.header")), "layer {i} header layout");
    }
}

#[test]
fn committed_tc_peels_hop_by_hop_into_committed_tcs_and_layers() {
    let v = Vectors::load("tc/tc_3hop.txt");
    let path = tc_path(&v);
    for (i, (id, layer)) in path.iter().enumerate() {
        let p = format!("hop.{i}");
        let cur = v.tc(&format!("{p}.tc"));
        let peeled = tc::peel(&cur, id).unwrap();
        assert_eq!(&peeled.layer, layer, "hop {i}");
        // Independent derivation of this hop's view from the documented formulas.
        let k = id.public().size();
        let seed = id.decrypt(&cur[..k], "test").unwrap();
        assert_eq!(seed, v.hex(&format!("{p}.seed")), "hop {i} OAEP seed");
        let body_key = kdf(b"anomos tc v1", &[&seed], b"body");
        assert_eq!(body_key.0, v.arr::<32>(&format!("{p}.body_key")), "hop {i}");
        let sealed = [&cur[k + TAG_LEN..], &cur[k..k + TAG_LEN]].concat();
        let plain = AeadCounter::new(&body_key).open(b"anomos-tc-v1", &sealed, "test").unwrap();
        assert_eq!(&plain[..LAYER_HEADER_LEN], &v.hex(&format!("{p}.header"))[..], "hop {i} header");
        match peeled.next {
            Some(next) => {
                assert!(matches!(layer.kind, LayerKind::Relay { .. }));
                assert_eq!(hex::encode(&next[..]), v.s(&format!("hop.{}.tc", i + 1)), "TC after peeling hop {i}");
                let mut pad = vec![0u8; k + TAG_LEN + LAYER_HEADER_LEN];
                kdf_stream(b"anomos tc v1", &seed, b"pad", &mut pad).unwrap();
                assert_eq!(pad, v.hex(&format!("{p}.pad")), "hop {i} pad");
                assert_eq!([&plain[LAYER_HEADER_LEN..], &pad[..]].concat(), next.to_vec());
            }
            None => {
                assert_eq!(i + 1, path.len(), "only the last layer is a target");
                assert!(!v.has(&format!("hop.{}.tc", i + 1)));
            }
        }
        // Every other committed key fails on this hop's TC.
        for (j, (other, _)) in path.iter().enumerate() {
            if other.fingerprint() != id.fingerprint() {
                assert!(tc::peel(&cur, other).is_err(), "hop {i} TC opened with hop {j}'s key");
            }
        }
    }
}

#[test]
fn link_transcript_replays_into_the_state_machines_and_opens_committed_cells() {
    let v = Vectors::load("link/handshake.txt");
    let (d_id, a_id) = (identity(v.s("dialer.key")), identity(v.s("acceptor.key")));
    let nid = NeighborId(v.hex_u64("neighbor_id"));
    let mut drng = v.rng("dialer.rng_seed");
    let mut arng = v.rng("acceptor.rng_seed");
    let mut eph = [0u8; 32];
    drng.clone().fill_bytes(&mut eph);
    assert_eq!(eph, v.arr::<32>("dialer.eph_secret"));
    arng.clone().fill_bytes(&mut eph);
    assert_eq!(eph, v.arr::<32>("acceptor.eph_secret"));

    let (dialer, hello) = Dialer::start(&mut drng, a_id.public().clone(), nid);
    assert_eq!(hello.to_vec(), v.hex("hello"), "HELLO");
    let (acceptor, reply) = Acceptor::start(&mut arng, &v.hex("hello")).unwrap();
    assert_eq!(reply.to_vec(), v.hex("reply"), "REPLY");
    let (dialer, auth) = dialer.on_reply(&v.hex("reply"), &d_id, &mut drng).unwrap();
    assert_eq!(auth, v.hex("auth"), "AUTH");
    let d_fp = d_id.fingerprint();
    let d_pub = d_id.public().clone();
    let out = acceptor
        .on_auth(&v.hex("auth"), &a_id, &mut arng, |fp| (fp == &d_fp).then_some((d_pub, nid)), |_| false)
        .unwrap();
    assert_eq!(out.reply, v.hex("auth_reply"), "AUTH_REPLY");
    assert_eq!(out.peer, Some(d_id.fingerprint()));
    let mut acc = out.result.unwrap();
    let mut dia = dialer.on_auth_reply(&v.hex("auth_reply")).unwrap();
    assert_eq!((dia.peer, acc.peer), (a_id.fingerprint(), d_id.fingerprint()));

    // The documented key schedule, re-derived from the transcript alone.
    let sd = x25519_dalek::StaticSecret::from(v.arr::<32>("dialer.eph_secret"));
    let reply_pub: [u8; 32] = v.hex("reply")[10..42].try_into().unwrap();
    let dh = *sd.diffie_hellman(&x25519_dalek::PublicKey::from(reply_pub)).as_bytes();
    assert_eq!(dh, v.arr::<32>("dh"));
    let sa = x25519_dalek::StaticSecret::from(v.arr::<32>("acceptor.eph_secret"));
    let hello_pub: [u8; 32] = v.hex("hello")[10..42].try_into().unwrap();
    assert_eq!(*sa.diffie_hellman(&x25519_dalek::PublicKey::from(hello_pub)).as_bytes(), dh);
    let th1 = sha256(&[&v.hex("hello"), &v.hex("reply")]);
    assert_eq!(th1, v.arr::<32>("th1"));
    let hs_d = kdf(&th1, &[&dh], b"anomos link hs d2a");
    let hs_a = kdf(&th1, &[&dh], b"anomos link hs a2d");
    assert_eq!((hs_d.0, hs_a.0), (v.arr("hs_d2a"), v.arr("hs_a2d")));
    let auth = v.hex("auth");
    assert_eq!(u16::from_be_bytes([auth[0], auth[1]]) as usize, auth.len() - 2);
    assert_eq!(AeadCounter::new(&hs_d).open(b"", &auth[2..], "t").unwrap(), v.hex("auth.plain"));
    let th2 = sha256(&[&th1, &auth]);
    assert_eq!(th2, v.arr::<32>("th2"));
    let auth_reply = v.hex("auth_reply");
    let arp = AeadCounter::new(&hs_a).open(b"", &auth_reply[2..], "t").unwrap();
    assert_eq!(arp, v.hex("auth_reply.plain"));
    assert_eq!(arp[0], 0, "status ok");
    a_id.public()
        .verify(&[&b"anomos link auth acceptor v1"[..], &th2, &d_id.fingerprint().0].concat(), &arp[1..], "t")
        .unwrap();
    let th3 = sha256(&[&th2, &auth_reply]);
    assert_eq!(th3, v.arr::<32>("th3"));
    let nid_be = nid.0.to_be_bytes();
    let k_d2a = kdf(&th3, &[&dh, &nid_be], b"anomos link d2a");
    let k_a2d = kdf(&th3, &[&dh, &nid_be], b"anomos link a2d");
    assert_eq!((k_d2a.0, k_a2d.0), (v.arr("k_d2a"), v.arr("k_a2d")));

    // The committed cells, each way, in order.
    let tc0 = Vectors::load("tc/tc_3hop.txt").hex("hop.0.tc");
    for (dir, key) in [("d2a", &k_d2a), ("a2d", &k_a2d)] {
        let mut spec = AeadCounter::new(key);
        for (n, want) in [Command::Padding, Command::Open, Command::Data].into_iter().enumerate() {
            let plain = v.hex(&format!("{dir}.{n}.plain"));
            let sealed: [u8; SEALED_CELL_LEN] = v.arr(&format!("{dir}.{n}.sealed"));
            let (tx, rx) = if dir == "d2a" { (&mut dia, &mut acc) } else { (&mut acc, &mut dia) };
            let cell = rx.open_cell(&sealed).unwrap_or_else(|e| panic!("{dir}.{n}: {e}"));
            assert_eq!(cell, Cell::decode(&plain).unwrap(), "{dir}.{n}");
            assert_eq!(cell.command, want);
            assert_eq!(tx.seal_cell(&cell).unwrap().to_vec(), sealed.to_vec(), "{dir}.{n} re-sealed");
            assert_eq!(spec.open(b"", &sealed, "t").unwrap(), plain, "{dir}.{n} under the documented key");
            if want == Command::Open {
                assert_eq!(cell.open_tc().unwrap().to_vec(), tc0, "OPEN carries the committed TC");
            }
            if n == 0 {
                let window = if dir == "d2a" { 128 } else { 64 };
                assert_eq!(cell.link_params_window().unwrap(), window, "{dir}: the first cell announces the window");
            }
        }
    }
    // Replaying a committed cell on the live link fails (its counter has moved on).
    let first: [u8; SEALED_CELL_LEN] = v.arr("d2a.0.sealed");
    assert!(acc.open_cell(&first).is_err());

    // The reachability probe.
    let nonce = v.arr::<32>("probe.nonce");
    assert_eq!(link::encode_probe(&nonce).to_vec(), v.hex("probe.request"));
    assert_eq!(&v.hex("probe.request")[..8], b"ANOMOSP1");
    assert_eq!(link::decode_probe_body(&v.hex("probe.request")[8..]).unwrap(), nonce);
    let p_id = identity(v.s("probe.key"));
    assert_eq!(link::answer_probe(&p_id, &nonce, &mut v.rng("probe.rng_seed")), v.hex("probe.answer"));
    assert_eq!(link::verify_probe_answer(&nonce, &v.hex("probe.answer")).unwrap().fingerprint(), p_id.fingerprint());
    assert!(link::verify_probe_answer(&[0; 32], &v.hex("probe.answer")).is_err(), "answer is bound to the nonce");
}

#[test]
fn committed_cells_rebuild_and_decode_for_every_command() {
    let v = Vectors::load("cells/cells.txt");
    let tc0 = Vectors::load("tc/tc_3hop.txt").tc("hop.0.tc");
    let mut commands = Vec::new();
    let mut n = 0;
    while v.has(&format!("cell.{n}.hex")) {
        let p = format!("cell.{n}");
        let bytes = v.hex(&format!("{p}.hex"));
        assert_eq!(bytes.len(), CELL_LEN);
        let circ = u32::from_str_radix(v.s(&format!("{p}.circ_id")), 16).unwrap();
        let command = Command::from_u8(v.num(&format!("{p}.command"))).unwrap();
        let tag = |k: &str| -> Option<[u8; 16]> {
            match v.s(k) {
                "none" => None,
                _ => Some(v.arr(k)),
            }
        };
        let built = match command {
            Command::Padding => match v.num::<u16>(&format!("{p}.window")) {
                0 => Cell::padding(),
                w => Cell::link_params(w),
            },
            Command::Open => {
                assert_eq!(v.tc(&format!("{p}.tc")), tc0);
                Cell::open(circ, &tc0)
            }
            Command::Deny => {
                Cell::deny(circ, DenyReason::from_code(v.num(&format!("{p}.reason"))), tag(&format!("{p}.tag")))
            }
            Command::Break => {
                Cell::brk(circ, BreakReason::from_code(v.num(&format!("{p}.reason"))), tag(&format!("{p}.tag")))
            }
            Command::Sendme => Cell::sendme(circ, v.num(&format!("{p}.credit"))),
            Command::Data => {
                let mut c = Cell::new(circ, Command::Data);
                c.payload.copy_from_slice(&v.hex(&format!("{p}.payload")));
                c
            }
            Command::Confirm | Command::AckBreak => Cell::new(circ, command),
        };
        let mut enc = [0u8; CELL_LEN];
        built.encode_into(&mut enc);
        assert_eq!(enc.to_vec(), bytes, "{} ({p})", v.s(&format!("{p}.name")));
        let dec = Cell::decode(&bytes).unwrap();
        assert_eq!(dec, built);
        assert_eq!(dec.circ_id, circ);
        match command {
            Command::Deny => {
                let (r, t) = dec.deny_fields().unwrap();
                assert_eq!((r.code(), t), (v.num(&format!("{p}.reason")), tag(&format!("{p}.tag"))));
            }
            Command::Break => {
                let (r, t) = dec.break_fields().unwrap();
                assert_eq!((r.code(), t), (v.num(&format!("{p}.reason")), tag(&format!("{p}.tag"))));
            }
            Command::Sendme => assert_eq!(dec.sendme_credit().unwrap(), v.num::<u16>(&format!("{p}.credit"))),
            _ => {}
        }
        commands.push(command);
        n += 1;
    }
    for c in 0..8u8 {
        assert!(commands.contains(&Command::from_u8(c).unwrap()), "no vector for command {c}");
    }
}

#[test]
fn committed_tracker_frames_open_and_decode_on_both_ends() {
    let v = Vectors::load("tracker/channel.txt");
    let t_id = identity(v.s("tracker.key"));
    let p_id = identity(v.s("peer.key"));
    let tfp = t_id.fingerprint();
    let mut prng = v.rng("peer.rng_seed");
    let mut trng = v.rng("tracker.rng_seed");
    // Documented randomness order: the peer's X25519 secret, then the channel secret; the tracker's X25519 secret.
    let (mut e_p_secret, mut s, mut e_t_secret) = ([0u8; 32], [0u8; 32], [0u8; 32]);
    {
        let mut p = prng.clone();
        p.fill_bytes(&mut e_p_secret);
        p.fill_bytes(&mut s);
        trng.clone().fill_bytes(&mut e_t_secret);
    }
    assert_eq!(s, v.arr::<32>("channel_secret"));
    assert_eq!(e_p_secret, v.arr::<32>("peer_x25519_secret"));
    assert_eq!(e_t_secret, v.arr::<32>("tracker_x25519_secret"));

    // Peer side rebuilds the ClientHello; tracker side accepts the committed one.
    let (hello, handshake) = TrackerChannel::connect(&mut prng, t_id.public()).unwrap();
    let committed_hello = v.hex("client_hello");
    assert_eq!(hello, committed_hello, "ClientHello");
    let ct_len = TrackerChannel::hello_ct_len(&committed_hello[..CLIENT_HELLO_HEADER]).unwrap();
    assert_eq!(CLIENT_HELLO_HEADER + ct_len + EPHEMERAL_LEN, committed_hello.len());
    let (server_hello, mut trk) =
        TrackerChannel::accept(&mut trng, &t_id, &committed_hello[CLIENT_HELLO_HEADER..]).unwrap();
    assert_eq!(server_hello.to_vec(), v.hex("server_hello"), "tracker's hello");
    let mut peer = handshake.finish(&server_hello).unwrap();
    // The key schedule, recomputed from the documented formula.
    let e_p = &committed_hello[CLIENT_HELLO_HEADER + ct_len..];
    let dh = *x25519_dalek::StaticSecret::from(e_p_secret)
        .diffie_hellman(&x25519_dalek::PublicKey::from(server_hello))
        .as_bytes();
    assert_eq!(dh, v.arr::<32>("dh"));
    let salt = anomos_proto::crypto::sha256(&[b"anomos tracker v1", e_p, &server_hello]);
    let k_p2t = kdf(&salt, &[&s, &tfp.0, &dh], b"p2t");
    let k_t2p = kdf(&salt, &[&s, &tfp.0, &dh], b"t2p");
    assert_eq!((k_p2t.0, k_t2p.0), (v.arr("k_p2t"), v.arr("k_t2p")));
    let (mut spec_p2t, mut spec_t2p) = (AeadCounter::new(&k_p2t), AeadCounter::new(&k_t2p));
    let mut nonce = [0u8; 32];
    trng.fill_bytes(&mut nonce);

    let mut types = Vec::new();
    let mut n = 0;
    while v.has(&format!("frame.{n}.frame")) {
        let p = format!("frame.{n}");
        let frame = v.hex(&format!("{p}.frame"));
        let plain = v.hex(&format!("{p}.plain"));
        let len = TrackerChannel::frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len + 4, frame.len());
        let ty = v.s(&format!("{p}.type")).to_string();
        match v.s(&format!("{p}.dir")) {
            "p2t" => {
                let msg: ToTracker = trk.open(&frame[4..]).unwrap_or_else(|e| panic!("{p}: {e}"));
                msg.validate().unwrap();
                assert_eq!(tracker::encode(&msg).unwrap(), plain);
                assert_eq!(tracker::decode::<ToTracker>(&plain).unwrap(), msg);
                assert_eq!(spec_p2t.open(b"", &frame[4..], "t").unwrap(), plain);
                let resealed = peer.seal(&msg).unwrap();
                assert_eq!(resealed, frame, "{p} re-sealed");
                match &msg {
                    ToTracker::Hello { public_key, signature } => {
                        assert_eq!(ty, "ToTracker::Hello");
                        assert_eq!(public_key, &v.hex(&format!("{p}.public_key")));
                        assert_eq!(signature, &v.hex(&format!("{p}.signature")));
                        let key = tracker::verify_hello(public_key, signature, &tfp, &nonce).unwrap();
                        assert_eq!(key.fingerprint(), p_id.fingerprint());
                        // The peer's rng, continued after connect, reproduces the signature.
                        assert_eq!(tracker::make_hello(&p_id, &tfp, &nonce, &mut prng), msg);
                    }
                    ToTracker::Announce(a) => {
                        assert_eq!(ty, "ToTracker::Announce");
                        assert_eq!(a.listen.to_string(), v.s(&format!("{p}.listen")));
                        let chains: Vec<&str> = a.chains.iter().map(|c| c.as_str()).collect();
                        assert_eq!(chains.join(","), v.s(&format!("{p}.chains")));
                        let family: Vec<String> = a.family.iter().map(|f| hex::encode(f.0)).collect();
                        assert_eq!(family.join(","), v.s(&format!("{p}.family")));
                    }
                    other => panic!("{p}: unexpected {other:?}"),
                }
            }
            "t2p" => {
                let msg: FromTracker = peer.open(&frame[4..]).unwrap_or_else(|e| panic!("{p}: {e}"));
                msg.validate().unwrap();
                assert_eq!(tracker::encode(&msg).unwrap(), plain);
                assert_eq!(tracker::decode::<FromTracker>(&plain).unwrap(), msg);
                assert_eq!(spec_t2p.open(b"", &frame[4..], "t").unwrap(), plain);
                assert_eq!(trk.seal(&msg).unwrap(), frame, "{p} re-sealed");
                match &msg {
                    FromTracker::Challenge { nonce: got } => {
                        assert_eq!(ty, "FromTracker::Challenge");
                        assert_eq!(got, &v.arr::<32>(&format!("{p}.nonce")));
                        assert_eq!(got, &nonce, "nonce is the tracker rng's next 32 bytes");
                    }
                    FromTracker::Welcome { peer_id } => {
                        assert_eq!(ty, "FromTracker::Welcome");
                        assert_eq!(peer_id.0, v.arr::<32>(&format!("{p}.peer_id")));
                        assert_eq!(*peer_id, p_id.fingerprint());
                    }
                    FromTracker::Announced(r) => {
                        assert_eq!(ty, "FromTracker::Announced");
                        assert_eq!(r.interval_secs, v.num::<u32>(&format!("{p}.interval_secs")));
                        assert_eq!(r.neighbors.len(), 2);
                        for (i, nb) in r.neighbors.iter().enumerate() {
                            let q = format!("{p}.neighbor.{i}");
                            assert_eq!(nb.id.0, v.hex_u64(&format!("{q}.id")));
                            assert_eq!(nb.addr.to_string(), v.s(&format!("{q}.addr")));
                            assert_eq!(nb.public_key, v.hex(&format!("{q}.public_key")));
                            PublicKey::from_der(&nb.public_key).unwrap();
                        }
                    }
                    other => panic!("{p}: unexpected {other:?}"),
                }
            }
            d => panic!("{p}: direction {d}"),
        }
        types.push(ty);
        n += 1;
    }
    for want in ["FromTracker::Challenge", "ToTracker::Hello", "ToTracker::Announce", "FromTracker::Announced"] {
        assert!(types.iter().any(|t| t == want), "transcript lacks {want}");
    }
}

#[test]
fn committed_resumption_derives_from_the_channel_session_and_opens_on_both_ends() {
    let c = Vectors::load("tracker/channel.txt");
    let v = Vectors::load("tracker/resume.txt");
    let t_id = identity(v.s("tracker.key"));
    let tfp = t_id.fingerprint();
    // The resumption secret of channel.txt's session, from the documented formula.
    let hello = c.hex("client_hello");
    let e_p0 = &hello[hello.len() - EPHEMERAL_LEN..];
    let salt0 = anomos_proto::crypto::sha256(&[b"anomos tracker v1", e_p0, &c.hex("server_hello")]);
    let rs = kdf(&salt0, &[&c.arr::<32>("channel_secret"), &tfp.0, &c.arr::<32>("dh")], b"resume");
    assert_eq!(rs.0, v.arr::<32>("resumption_secret"));
    assert_eq!(tracker::encode(&ToTracker::Resumable).unwrap(), v.hex("resumable.plain"));
    let issued: FromTracker = tracker::decode(&v.hex("ticket_frame.plain")).unwrap();
    let FromTracker::Ticket { ticket, lifetime_secs } = issued else { panic!("not a ticket: {issued:?}") };
    assert_eq!((ticket, lifetime_secs), (v.arr::<16>("ticket"), 90));
    // Randomness order: the tracker's ticket id, then its X25519 secret; the peer's X25519 secret.
    let (mut prng, mut trng) = (v.rng("peer.rng_seed"), v.rng("tracker.rng_seed"));
    let mut id = [0u8; 16];
    trng.fill_bytes(&mut id);
    assert_eq!(id, ticket);
    let t = tracker::Ticket { id, secret: rs.clone() };
    let (resume_hello, hs) = TrackerChannel::resume(&mut prng, &tfp, &t).unwrap();
    assert_eq!(resume_hello, v.hex("resume_hello"));
    let (got, e_p) = TrackerChannel::resume_hello(&resume_hello).unwrap();
    assert_eq!(got, id);
    let (answer, mut trk) = TrackerChannel::accept_resume(&mut trng, &tfp, &id, &rs, &e_p).unwrap();
    assert_eq!(answer.to_vec(), v.hex("resume_answer"));
    let mut peer = hs.finish(&answer[1..]).unwrap();
    let e_t: [u8; 32] = answer[1..].try_into().unwrap();
    let dh = *x25519_dalek::StaticSecret::from(v.arr::<32>("peer_x25519_secret"))
        .diffie_hellman(&x25519_dalek::PublicKey::from(e_t))
        .as_bytes();
    assert_eq!(dh, v.arr::<32>("dh"));
    let salt = anomos_proto::crypto::sha256(&[b"anomos tracker resume v1", &id, &e_p, &e_t]);
    let k_p2t = kdf(&salt, &[&rs.0, &tfp.0, &dh], b"resume p2t");
    let k_t2p = kdf(&salt, &[&rs.0, &tfp.0, &dh], b"resume t2p");
    assert_eq!((k_p2t.0, k_t2p.0), (v.arr("k_p2t"), v.arr("k_t2p")));
    let f0 = v.hex("frame.0.frame");
    let msg: ToTracker = trk.open(&f0[4..]).unwrap();
    assert_eq!(tracker::encode(&msg).unwrap(), v.hex("frame.0.plain"));
    assert_eq!(peer.seal(&msg).unwrap(), f0, "the peer seals the committed frame");
    let f1 = v.hex("frame.1.frame");
    let reply: FromTracker = peer.open(&f1[4..]).unwrap();
    assert_eq!(tracker::encode(&reply).unwrap(), v.hex("frame.1.plain"));
    assert_eq!(trk.seal(&reply).unwrap(), f1, "the tracker seals the committed frame");
}
