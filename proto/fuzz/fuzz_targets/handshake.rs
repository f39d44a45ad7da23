//! Fuzzes the neighbor-link handshake state machines (`link::Acceptor`, `link::Dialer`).
//!
//! The fixed transcript is the committed vector's (`tests/vectors/link/handshake.txt`): dialer id0 with
//! `rng(3001)`, acceptor id1 with `rng(3002)`, NeighborID 0x0123456789abcdef, each rng used in protocol order,
//! so the vector's messages are valid inputs here and the success paths are reachable from the seed corpus.
//!
//! Input: byte 0 selects the mode (mod 4), the rest is the payload.
//! * 0: `Acceptor::start` on the first 74 payload bytes (HELLO), then `on_auth` on the rest (AUTH, framed).
//! * 1: the payload is the *plaintext* of AUTH: the harness seals and frames it under the transcript's hs_d2a,
//!   so `on_auth` parses fuzz bytes after authentication. Byte 0 bit 2 makes the lookup refuse the dialer,
//!   bit 3 sets `busy`. Checked: the reply opens under hs_a2d and its status agrees with the outcome.
//! * 2: `Dialer::on_reply` on the first 74 payload bytes (REPLY), then `on_auth_reply` on the rest.
//! * 3: the payload is the *plaintext* of AUTH_REPLY, sealed and framed by the harness under hs_a2d, into the
//!   dialer that sent the vector's AUTH. Checked: a link results only from status 0 with a valid signature.

#![no_main]

use std::sync::OnceLock;

use anomos_proto::crypto::{kdf, sha256, AeadCounter, Secret};
use anomos_proto::identity::Identity;
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{Acceptor, Dialer, HELLO_LEN};
use anomos_proto_fuzz::{ids, mode, rng};
use libfuzzer_sys::fuzz_target;
use rand::RngCore;
use rand_chacha::ChaCha20Rng;

const DIALER_SEED: u64 = 3001;
const ACCEPTOR_SEED: u64 = 3002;
const NID: NeighborId = NeighborId(0x0123_4567_89ab_cdef);

struct Transcript {
    hello: [u8; HELLO_LEN],
    th1: [u8; 32],
    hs_d: Secret,
    hs_a: Secret,
}

fn dialer_id() -> &'static Identity {
    &ids()[0]
}

fn acceptor_id() -> &'static Identity {
    &ids()[1]
}

fn dialer(r: &mut ChaCha20Rng) -> (Dialer, [u8; HELLO_LEN]) {
    Dialer::start(r, acceptor_id().public().clone(), NID)
}

fn transcript() -> &'static Transcript {
    static T: OnceLock<Transcript> = OnceLock::new();
    T.get_or_init(|| {
        let mut eph = [0u8; 32];
        rng(DIALER_SEED).fill_bytes(&mut eph);
        let (_, hello) = dialer(&mut rng(DIALER_SEED));
        let (_, reply) = Acceptor::start(&mut rng(ACCEPTOR_SEED), &hello).expect("vector hello");
        let peer: [u8; 32] = reply[10..42].try_into().expect("32");
        let dh = *x25519_dalek::StaticSecret::from(eph).diffie_hellman(&x25519_dalek::PublicKey::from(peer)).as_bytes();
        let th1 = sha256(&[&hello, &reply]);
        let hs_d = kdf(&th1, &[&dh], b"anomos link hs d2a");
        let hs_a = kdf(&th1, &[&dh], b"anomos link hs a2d");
        Transcript { hello, th1, hs_d, hs_a }
    })
}

/// `len u16 BE | GCM(key, nonce 0)[plain] | tag`, with `plain` cut so the frame length fits a u16.
fn frame(key: &Secret, plain: &[u8]) -> Vec<u8> {
    let plain = &plain[..plain.len().min(u16::MAX as usize - 16)];
    let sealed = AeadCounter::new(key).seal(b"", plain).expect("seal");
    [&(sealed.len() as u16).to_be_bytes()[..], &sealed].concat()
}

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    let (d_id, a_id) = (dialer_id(), acceptor_id());
    let lookup_ok = m & 4 == 0;
    let busy = m & 8 != 0;
    let lookup = |_: &_| lookup_ok.then(|| (d_id.public().clone(), NID));
    match m % 4 {
        0 => {
            let (hello, auth) = rest.split_at(rest.len().min(HELLO_LEN));
            let mut r = rng(ACCEPTOR_SEED);
            if let Ok((acc, reply)) = Acceptor::start(&mut r, hello) {
                assert_eq!(hello.len(), HELLO_LEN);
                assert_eq!(&reply[..8], b"ANOMOSL1");
                let _ = acc.on_auth(auth, a_id, &mut r, lookup, |_| busy);
            }
        }
        1 => {
            let t = transcript();
            let mut r = rng(ACCEPTOR_SEED);
            let (acc, _) = Acceptor::start(&mut r, &t.hello).expect("vector hello");
            let auth = frame(&t.hs_d, rest);
            let Ok(out) = acc.on_auth(&auth, a_id, &mut r, lookup, |_| busy) else { return };
            // A decrypted AUTH always names a peer and gets a reply the dialer can open.
            assert_eq!(out.peer.map(|f| f.0.to_vec()), Some(rest[..32].to_vec()));
            let reply = AeadCounter::new(&t.hs_a).open(b"", &out.reply[2..], "reply").expect("reply opens");
            assert_eq!(out.reply.len(), 2 + u16::from_be_bytes([out.reply[0], out.reply[1]]) as usize);
            assert_eq!(reply[0] == 0, out.result.is_ok(), "status {} vs outcome", reply[0]);
            assert_eq!(reply.len() > 1, reply[0] == 0, "only an accepting reply carries a signature");
            if out.result.is_ok() {
                assert!(lookup_ok && !busy);
                let th2 = sha256(&[&t.th1, &auth]);
                a_id.public()
                    .verify(&[&b"anomos link auth acceptor v1"[..], &th2, &rest[..32]].concat(), &reply[1..], "t")
                    .expect("acceptor signature");
            }
        }
        2 => {
            let (reply, auth_reply) = rest.split_at(rest.len().min(HELLO_LEN));
            let mut r = rng(DIALER_SEED);
            let (dia, _) = dialer(&mut r);
            if let Ok((sent, auth)) = dia.on_reply(reply, d_id, &mut r) {
                assert_eq!(reply.len(), HELLO_LEN);
                assert!(auth.len() > 2);
                let _ = sent.on_auth_reply(auth_reply);
            }
        }
        _ => {
            let t = transcript();
            let mut r = rng(DIALER_SEED);
            let (dia, _) = dialer(&mut r);
            let (_, reply) = Acceptor::start(&mut rng(ACCEPTOR_SEED), &t.hello).expect("vector hello");
            let (sent, _) = dia.on_reply(&reply, d_id, &mut r).expect("vector reply");
            if let Ok(link) = sent.on_auth_reply(&frame(&t.hs_a, rest)) {
                assert_eq!(rest.first(), Some(&0), "link from a refusing AUTH_REPLY");
                assert_eq!(link.peer, a_id.fingerprint());
                assert!(link.dialer);
            }
        }
    }
});
