//! Fuzzes the link handshake's AUTH and AUTH_REPLY parsing, the part before each RSA step:
//! `Acceptor::open_auth` (which `Acceptor::on_auth` runs before it checks the dialer's signature and signs its
//! reply) and `DialerAuthSent::open_auth_reply` (which `on_auth_reply` runs before it checks the acceptor's
//! signature). One acceptor and one dialer are built once, so no input costs an RSA operation or an X25519
//! exchange; `handshake` keeps fuzzing the whole state machines, RSA included, at a few inputs a second.
//!
//! The fixed transcript is the committed vector's, as in `handshake` (dialer id0 with `rng(3001)`, acceptor id1
//! with `rng(3002)`), so `handshake`'s mode 1 and 3 inputs mean the same here.
//! Input: byte 0 selects the mode (mod 4), the rest is the payload.
//! * 0: the payload is AUTH as received (framed): `open_auth` must fail (no tag verifies under the transcript's
//!   key for bytes the harness did not seal).
//! * 1: the payload is the *plaintext* of AUTH: the harness seals and frames it under the transcript's hs_d2a.
//!   Checked: it parses exactly when it is `fp[32] | sig_len u16 | sig[sig_len]` in a frame of at most
//!   MAX_AUTH_LEN bytes (stated independently here), giving that fingerprint and signature; the same frame with
//!   one bit flipped (position from the payload) fails.
//! * 2: the payload is AUTH_REPLY as received (framed): `open_auth_reply` must fail.
//! * 3: the payload is the *plaintext* of AUTH_REPLY, sealed and framed under hs_a2d. Checked: it parses exactly
//!   when its first byte is a known status (0, 1, 3) and the frame fits, giving that status and the rest as the
//!   signature; a one-bit flip fails.

#![no_main]

use std::sync::OnceLock;

use anomos_proto::crypto::{kdf, sha256, AeadCounter, Secret};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{Acceptor, AuthStatus, Dialer, DialerAuthSent, HELLO_LEN, MAX_AUTH_LEN};
use anomos_proto_fuzz::{ids, mode, rng};
use libfuzzer_sys::fuzz_target;
use rand::RngCore;

const DIALER_SEED: u64 = 3001;
const ACCEPTOR_SEED: u64 = 3002;
const NID: NeighborId = NeighborId(0x0123_4567_89ab_cdef);

struct Fixed {
    acceptor: Acceptor,
    dialer: DialerAuthSent,
    hs_d: Secret,
    hs_a: Secret,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let (d_id, a_id) = (&ids()[0], &ids()[1]);
        let mut eph = [0u8; 32];
        rng(DIALER_SEED).fill_bytes(&mut eph);
        let mut dr = rng(DIALER_SEED);
        let (dialer, hello): (Dialer, [u8; HELLO_LEN]) = Dialer::start(&mut dr, a_id.public().clone(), NID);
        let (acceptor, reply) = Acceptor::start(&mut rng(ACCEPTOR_SEED), &hello).expect("vector hello");
        let (dialer, _auth) = dialer.on_reply(&reply, d_id, &mut dr).expect("vector reply");
        // The handshake keys, from the documented key schedule (not from the code under test).
        let peer: [u8; 32] = reply[10..42].try_into().expect("32");
        let dh = *x25519_dalek::StaticSecret::from(eph).diffie_hellman(&x25519_dalek::PublicKey::from(peer)).as_bytes();
        let th1 = sha256(&[&hello, &reply]);
        let hs_d = kdf(&th1, &[&dh], b"anomos link hs d2a");
        let hs_a = kdf(&th1, &[&dh], b"anomos link hs a2d");
        Fixed { acceptor, dialer, hs_d, hs_a }
    })
}

/// `len u16 BE | GCM(key, nonce 0)[plain] | tag`, with `plain` cut so the frame length fits a u16.
fn frame(key: &Secret, plain: &[u8]) -> Vec<u8> {
    let plain = &plain[..plain.len().min(u16::MAX as usize - 16)];
    let sealed = AeadCounter::new(key).seal(b"", plain).expect("seal");
    [&(sealed.len() as u16).to_be_bytes()[..], &sealed].concat()
}

/// `msg` with one bit flipped, the position taken from `pick`.
fn flipped(msg: &[u8], pick: &[u8]) -> Vec<u8> {
    let mut bad = msg.to_vec();
    let at = pick.iter().fold(0usize, |a, &b| a.wrapping_mul(31).wrapping_add(b as usize)) % (bad.len() * 8);
    bad[at / 8] ^= 1 << (at % 8);
    bad
}

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    let f = fixed();
    match m % 4 {
        0 => assert!(f.acceptor.open_auth(rest).is_err(), "unsealed AUTH opened"),
        1 => {
            let auth = frame(&f.hs_d, rest);
            let fits = auth.len() - 2 <= MAX_AUTH_LEN;
            let well_formed = rest.len() >= 34 && rest.len() == 34 + u16::from_be_bytes([rest[32], rest[33]]) as usize;
            let res = f.acceptor.open_auth(&auth);
            assert_eq!(res.is_ok(), fits && well_formed, "open_auth {res:?}");
            if let Ok(a) = res {
                assert_eq!(&a.fp.0[..], &rest[..32]);
                assert_eq!(&a.sig[..], &rest[34..]);
            }
            assert!(f.acceptor.open_auth(&flipped(&auth, rest)).is_err(), "tampered AUTH opened");
        }
        2 => assert!(f.dialer.open_auth_reply(rest).is_err(), "unsealed AUTH_REPLY opened"),
        _ => {
            let reply = frame(&f.hs_a, rest);
            let fits = reply.len() - 2 <= MAX_AUTH_LEN;
            let status = match rest.first() {
                Some(0) => Some(AuthStatus::Ok),
                Some(1) => Some(AuthStatus::Refused),
                Some(3) => Some(AuthStatus::Busy),
                _ => None,
            };
            let res = f.dialer.open_auth_reply(&reply);
            assert_eq!(res.is_ok(), fits && status.is_some(), "open_auth_reply {res:?}");
            if let Ok((s, sig)) = res {
                assert_eq!(Some(s), status);
                assert_eq!(&sig[..], &rest[1..]);
            }
            assert!(f.dialer.open_auth_reply(&flipped(&reply, rest)).is_err(), "tampered AUTH_REPLY opened");
        }
    }
});
