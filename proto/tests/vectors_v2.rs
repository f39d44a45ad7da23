//! Known-answer test of the version-2 tracker channel and probe version 2 against the committed
//! `tests/vectors/tracker/channel_v2.txt` (written by `cargo run -p anomos-proto --example gen_vectors_v2 --
//! proto/tests/vectors`): (i) the implementation, replayed with the committed seeds, reproduces every committed
//! byte; (ii) the key schedule re-derived from the documented formulas (X25519 by x25519-dalek, not the
//! implementation's AWS-LC; HKDF and HMAC applied here to the documented inputs) gives the committed values and
//! opens the committed frame.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::path::PathBuf;

use anomos_proto::crypto::{kdf, sha256, AeadCounter};
use anomos_proto::identity::Identity;
use anomos_proto::probe_v2::{decode_probe_v2, ProbeAuth};
use anomos_proto::tracker::{self, FromTracker, StaticCert, StaticKey, TrackerChannel};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("vectors")
}

fn load() -> HashMap<String, String> {
    let text = std::fs::read_to_string(dir().join("tracker").join("channel_v2.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once(" = ").unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn hex(m: &HashMap<String, String>, k: &str) -> Vec<u8> {
    let s = &m[k];
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn arr(m: &HashMap<String, String>, k: &str) -> [u8; 32] {
    hex(m, k).try_into().unwrap()
}

fn key(file: &str) -> Identity {
    let pem = std::fs::read_to_string(dir().join("keys").join(file)).unwrap();
    Identity::from_pkcs8_pem(&pem).unwrap().with_seeded_signer()
}

fn x25519(secret: [u8; 32], public: [u8; 32]) -> [u8; 32] {
    *x25519_dalek::StaticSecret::from(secret).diffie_hellman(&x25519_dalek::PublicKey::from(public)).as_bytes()
}

fn public(secret: [u8; 32]) -> [u8; 32] {
    *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).as_bytes()
}

#[test]
fn the_committed_v2_handshake_and_probe_replay_and_match_the_formulas() {
    let v = load();
    let (t_id, p_id) = (key("id2_2048.pem"), key("id0_2048.pem"));
    let (tfp, pfp) = (t_id.fingerprint(), p_id.fingerprint());
    let num = |k: &str| v[k].parse::<u64>().unwrap();
    let now = num("now");

    // (i) The implementation, replayed.
    let sk = StaticKey::generate(&mut ChaCha20Rng::seed_from_u64(num("static.rng_seed")), &t_id, now, num("lifetime"))
        .unwrap();
    assert_eq!(sk.cert().encode(), hex(&v, "cert"), "certificate");
    let mut prng = ChaCha20Rng::seed_from_u64(num("peer.rng_seed"));
    let mut trng = ChaCha20Rng::seed_from_u64(num("tracker.rng_seed"));
    let (hello, hs) = TrackerChannel::connect_v2(&mut prng, t_id.public()).unwrap();
    assert_eq!(hello.to_vec(), hex(&v, "client_hello"), "ClientHello");
    let (server_hello, mut trk) = TrackerChannel::accept_v2(&mut trng, &sk, &tfp, &hello).unwrap();
    assert_eq!(server_hello, hex(&v, "server_hello"), "ServerHello");
    let peer = hs.finish(&server_hello[..32].try_into().unwrap(), &server_hello[34..], now).unwrap();
    assert_eq!((peer.th, trk.th), (arr(&v, "th"), arr(&v, "th")));
    assert_eq!(peer.channel.resumption_secret().0, arr(&v, "rs"));
    let frame = trk.channel.seal(&FromTracker::Challenge { nonce: arr(&v, "challenge_nonce") }).unwrap();
    assert_eq!(frame, hex(&v, "frame_challenge"));
    let signed = tracker::hello_v2_signed_bytes(&tfp, &arr(&v, "challenge_nonce"), &peer.th);
    assert_eq!(p_id.sign(&mut prng, &signed), hex(&v, "hello_signature"), "Hello signature");

    // (ii) The formulas, with other primitives.
    let cert = StaticCert::decode(&hex(&v, "cert")).unwrap();
    cert.verify(t_id.public(), now).unwrap();
    assert_eq!(cert.key, public(arr(&v, "static_secret")), "B = X25519(b, 9)");
    assert_eq!((cert.not_before, cert.not_after), (now - 3600, now + num("lifetime")));
    let e_p = public(arr(&v, "peer_x25519_secret"));
    let e_t = public(arr(&v, "tracker_x25519_secret"));
    let ch = hex(&v, "client_hello");
    assert_eq!(ch, [b"ANOMOST1".as_slice(), &[0, 2, 0, 0], &e_p].concat());
    let sh = hex(&v, "server_hello");
    let cert_bytes = hex(&v, "cert");
    assert_eq!(sh, [e_t.as_slice(), &(cert_bytes.len() as u16).to_be_bytes(), &cert_bytes].concat());
    let dh_e = x25519(arr(&v, "peer_x25519_secret"), e_t);
    let dh_s = x25519(arr(&v, "peer_x25519_secret"), cert.key);
    assert_eq!(dh_s, x25519(arr(&v, "static_secret"), e_p), "dh_s from either side");
    let th = sha256(&[b"anomos tracker v2", &ch, &e_t, &cert_bytes]);
    assert_eq!(th, arr(&v, "th"));
    let ikm: [&[u8]; 3] = [&dh_e, &dh_s, &tfp.0];
    assert_eq!(kdf(&th, &ikm, b"resume").0, arr(&v, "rs"));
    let k_t2p = kdf(&th, &ikm, b"t2p");
    let fc = hex(&v, "frame_challenge");
    let plain = AeadCounter::new(&k_t2p).open(b"", &fc[4..], "frame").unwrap();
    let msg: FromTracker = tracker::decode(&plain).unwrap();
    assert_eq!(msg, FromTracker::Challenge { nonce: arr(&v, "challenge_nonce") });
    p_id.public()
        .verify(
            &[b"anomos tracker hello v2".as_slice(), &tfp.0, &arr(&v, "challenge_nonce"), &th].concat(),
            &hex(&v, "hello_signature"),
            "hello",
        )
        .unwrap();

    // Probe version 2: the implementation, then the formulas (HMAC-SHA256 from aws-lc's hmac, keyed by HKDF).
    let auth = ProbeAuth::derive(peer.channel.resumption_secret(), &pfp).unwrap();
    let addr = v["probe_addr"].parse().unwrap();
    let probe = auth.probe(&arr(&v, "probe_nonce"), addr);
    assert_eq!(probe.to_vec(), hex(&v, "probe"));
    assert_eq!(auth.answer(&decode_probe_v2(&probe[8..]).unwrap(), addr).to_vec(), hex(&v, "probe_answer"));
    let k_probe = kdf(b"anomos probe v2", &[&arr(&v, "rs"), &pfp.0], b"probe key");
    assert_eq!(k_probe.0, arr(&v, "k_probe"));
    let a18 = hex(&v, "probe_addr18");
    assert_eq!(a18, [[0u8; 10].as_slice(), &[0xff, 0xff, 192, 0, 2, 7], &8633u16.to_be_bytes()].concat());
    let mac = |label: &[u8]| {
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k_probe.0);
        aws_lc_rs::hmac::sign(&k, &[label, &arr(&v, "probe_nonce"), &a18].concat()).as_ref().to_vec()
    };
    let p = hex(&v, "probe");
    assert_eq!(
        p,
        [b"ANOMOSP1".as_slice(), &[0, 2], &arr(&v, "probe_nonce"), &a18, &mac(b"anomos probe v2 request")].concat()
    );
    assert_eq!(hex(&v, "probe_answer"), [[0u8].as_slice(), &mac(b"anomos probe v2 answer")].concat());
}
