//! Writes `tests/vectors/tracker/channel_v2.txt`, the known-answer vector of the version-2 tracker channel and of
//! probe version 2 (SPEC §3.2a, §3.9): `cargo run -p anomos-proto --example gen_vectors_v2 -- proto/tests/vectors`.
//! `tests/vectors_v2.rs` checks the committed file against the implementation and against the formulas.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt::Write as _;
use std::path::PathBuf;

use anomos_proto::identity::Identity;
use anomos_proto::probe_v2::{addr18, decode_probe_v2, ProbeAuth};
use anomos_proto::tracker::{self, StaticKey, TrackerChannel};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Inputs (also written to the file).
const NOW: u64 = 1_800_000_000;
const LIFETIME: u64 = 48 * 3600;
const STATIC_SEED: u64 = 0x5354_4154;
const PEER_SEED: u64 = 0x5045_4552;
const TRACKER_SEED: u64 = 0x5452_434b;
const PROBE_ADDR: &str = "192.0.2.7:8633";

fn key(dir: &std::path::Path, file: &str) -> Identity {
    let pem = std::fs::read_to_string(dir.join("keys").join(file)).unwrap();
    Identity::from_pkcs8_pem(&pem).unwrap().with_seeded_signer()
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("the vectors directory"));
    let (t_id, p_id) = (key(&dir, "id2_2048.pem"), key(&dir, "id0_2048.pem"));
    let tfp = t_id.fingerprint();
    let first32 = |seed: u64| {
        let mut b = [0u8; 32];
        ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut b);
        b
    };
    let sk = StaticKey::generate(&mut ChaCha20Rng::seed_from_u64(STATIC_SEED), &t_id, NOW, LIFETIME).unwrap();
    let mut prng = ChaCha20Rng::seed_from_u64(PEER_SEED);
    let mut trng = ChaCha20Rng::seed_from_u64(TRACKER_SEED);
    let (hello, hs) = TrackerChannel::connect_v2(&mut prng, t_id.public()).unwrap();
    let (server_hello, mut trk) = TrackerChannel::accept_v2(&mut trng, &sk, &tfp, &hello).unwrap();
    let e_t: [u8; 32] = server_hello[..32].try_into().unwrap();
    let peer = hs.finish(&e_t, &server_hello[34..], NOW).unwrap();
    assert_eq!(peer.th, trk.th);
    let mut nonce = [0u8; 32];
    trng.fill_bytes(&mut nonce);
    let challenge = trk.channel.seal(&tracker::FromTracker::Challenge { nonce }).unwrap();
    let signed = tracker::hello_v2_signed_bytes(&tfp, &nonce, &peer.th);
    let signature = p_id.sign(&mut prng, &signed);
    let rs = peer.channel.resumption_secret().clone();
    let auth = ProbeAuth::derive(&rs, &p_id.fingerprint()).unwrap();
    let probe_nonce = [0x5a; 32];
    let addr = PROBE_ADDR.parse().unwrap();
    let probe = auth.probe(&probe_nonce, addr);
    let answer = auth.answer(&decode_probe_v2(&probe[8..]).unwrap(), addr);

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut o = String::new();
    o.push_str(
        "# anomos-proto known-answer vectors: the version-2 tracker channel (SPEC §3.2a) and probe version 2 (§3.9).
# Tracker = ../keys/id2_2048.pem, peer = ../keys/id0_2048.pem, both signing with the seeded `rsa` crate signer
# (PSS salts from the rng given). Each rng is rand_chacha 0.3 ChaCha20Rng::seed_from_u64(seed):
# static.rng_seed     StaticKey::generate: b = its first 32 bytes, then the certificate's PSS salt
# peer.rng_seed       TrackerChannel::connect_v2 (e_P secret = first 32 bytes), then the Hello signature's salt
# tracker.rng_seed    TrackerChannel::accept_v2 (e_T secret = first 32 bytes), then the 32-byte Challenge nonce
# cert                B | not_before u64 BE | not_after u64 BE | sig_len u16 BE | PSS(tracker, \"anomos tracker static v2\"
#                     | tracker fingerprint | B | not_before | not_after); not_before = now - 3600, not_after = now + lifetime
# client_hello        \"ANOMOST1\" | 0002 | 0000 | e_P
# server_hello        e_T | cert_len u16 BE | cert
# dh_e, dh_s          X25519(e_P secret, e_T), X25519(e_P secret, B)
# th                  SHA256(\"anomos tracker v2\" | client_hello | e_T | cert)
# k_p2t, k_t2p, rs    HKDF-SHA256(salt = th, ikm = dh_e | dh_s | tracker fingerprint, info = p2t / t2p / resume)
# frame_challenge     the tracker's first frame, Challenge{challenge_nonce}: len u32 BE | AES-256-GCM(k_t2p,
#                     nonce 0, aad \"\", bincode) | tag
# hello_signature     PSS(peer, \"anomos tracker hello v2\" | tracker fingerprint | challenge_nonce | th)
# k_probe             HKDF-SHA256(salt = \"anomos probe v2\", ikm = rs | peer fingerprint, info = \"probe key\")
# probe               \"ANOMOSP1\" | 0002 | probe_nonce | addr18 | HMAC-SHA256(k_probe, \"anomos probe v2 request\" |
#                     probe_nonce | addr18), addr18 = IPv4-mapped IPv6 address | port u16 BE of probe_addr
# probe_answer        00 | HMAC-SHA256(k_probe, \"anomos probe v2 answer\" | probe_nonce | addr18)
",
    );
    let b = first32(STATIC_SEED);
    let k_probe = anomos_proto::crypto::kdf(b"anomos probe v2", &[&rs.0, &p_id.fingerprint().0], b"probe key");
    for (k, v) in [
        ("now", NOW.to_string()),
        ("lifetime", LIFETIME.to_string()),
        ("static.rng_seed", STATIC_SEED.to_string()),
        ("peer.rng_seed", PEER_SEED.to_string()),
        ("tracker.rng_seed", TRACKER_SEED.to_string()),
        ("static_secret", hex(&b)),
        ("peer_x25519_secret", hex(&first32(PEER_SEED))),
        ("tracker_x25519_secret", hex(&first32(TRACKER_SEED))),
        ("cert", hex(&sk.cert().encode())),
        ("client_hello", hex(&hello)),
        ("server_hello", hex(&server_hello)),
        ("th", hex(&peer.th)),
        ("rs", hex(&rs.0)),
        ("challenge_nonce", hex(&nonce)),
        ("frame_challenge", hex(&challenge)),
        ("hello_signature", hex(&signature)),
        ("k_probe", hex(&k_probe.0)),
        ("probe_addr", PROBE_ADDR.to_string()),
        ("probe_addr18", hex(&addr18(addr))),
        ("probe_nonce", hex(&probe_nonce)),
        ("probe", hex(&probe)),
        ("probe_answer", hex(&answer)),
    ] {
        writeln!(o, "{k} = {v}").unwrap();
    }
    let path = dir.join("tracker").join("channel_v2.txt");
    std::fs::write(&path, o).unwrap();
    println!("wrote {}", path.display());
}
