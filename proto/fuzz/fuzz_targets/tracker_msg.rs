//! Fuzzes the tracker protocol decoders: `tracker::decode` of `ToTracker`/`FromTracker` plus `validate()`,
//! `TrackerChannel::hello_ct_len`, `frame_len` and `open`, and the reachability-probe decoders
//! `link::verify_probe_answer`, `link::decode_probe_body` and `link::auth_frame_len`.
//!
//! Input: byte 0 selects the mode (mod 6), the rest is the payload.
//! * 0 / 1: `decode::<ToTracker>` / `decode::<FromTracker>`; whatever decodes must re-encode and decode to the
//!   same value, and `validate()` must not panic.
//! * 2: `hello_ct_len` on the payload (a ClientHello header); an accepted length is at most MAX_RSA_BYTES.
//! * 3: `frame_len` on payload[..4], `auth_frame_len` on payload[..2] (zero-padded), `decode_probe_body` on
//!   payload[4..]; each accepted value is checked against its documented domain.
//! * 4: `verify_probe_answer` with the fixed nonce 0x42^32 (the committed probe vector's).
//! * 5: the payload is a frame *plaintext*: the harness seals it under the channel key of a fixed channel
//!   (tracker id2, peer `rng(4001)`, tracker `rng(4002)`), and the receiving end's `open` must agree with
//!   `decode` of the plaintext. Byte 0 bit 3 picks the direction (clear: peer→tracker as `ToTracker`; set:
//!   tracker→peer as `FromTracker`). A frame with one bit flipped (position from the payload) must fail first.

#![no_main]

use std::sync::{Mutex, OnceLock};

use anomos_proto::crypto::{kdf, AeadCounter};
use anomos_proto::identity::MAX_RSA_BYTES;
use anomos_proto::link::{self, MAX_AUTH_LEN};
use anomos_proto::tracker::{self, FromTracker, ToTracker, TrackerChannel, CLIENT_HELLO_HEADER, MAX_FRAME};
use anomos_proto_fuzz::{fit, ids, mode, rng};
use libfuzzer_sys::fuzz_target;
use rand::RngCore;

const PROBE_NONCE: [u8; 32] = [0x42; 32];

struct Channel {
    /// Receiving ends.
    tracker: TrackerChannel,
    peer: TrackerChannel,
    /// Sending ends, keyed independently from the documented key schedule.
    p2t: AeadCounter,
    t2p: AeadCounter,
}

fn channel() -> &'static Mutex<Channel> {
    static C: OnceLock<Mutex<Channel>> = OnceLock::new();
    C.get_or_init(|| {
        let t = &ids()[2];
        let mut pr = rng(4001);
        // SPEC §3: the peer's rng yields its X25519 secret, then the channel secret.
        let (mut e_p_secret, mut s) = ([0u8; 32], [0u8; 32]);
        {
            let mut p = pr.clone();
            p.fill_bytes(&mut e_p_secret);
            p.fill_bytes(&mut s);
        }
        let (hello, handshake) = TrackerChannel::connect(&mut pr, t.public()).expect("connect");
        let (reply, tracker) = TrackerChannel::accept(&mut rng(4002), t, &hello[CLIENT_HELLO_HEADER..]).expect("accept");
        let peer = handshake.finish(&reply).expect("finish");
        let fp = t.fingerprint();
        let e_p = &hello[hello.len() - 32..];
        let dh = *x25519_dalek::StaticSecret::from(e_p_secret)
            .diffie_hellman(&x25519_dalek::PublicKey::from(reply))
            .as_bytes();
        let salt = anomos_proto::crypto::sha256(&[b"anomos tracker v1", e_p, &reply]);
        let p2t = AeadCounter::new(&kdf(&salt, &[&s, &fp.0, &dh], b"p2t"));
        let t2p = AeadCounter::new(&kdf(&salt, &[&s, &fp.0, &dh], b"t2p"));
        Mutex::new(Channel { tracker, peer, p2t, t2p })
    })
}

fn to_tracker(b: &[u8]) {
    if let Ok(m) = tracker::decode::<ToTracker>(b) {
        let _ = m.validate();
        let enc = tracker::encode(&m).expect("re-encode");
        assert_eq!(tracker::decode::<ToTracker>(&enc).expect("re-decode"), m);
    }
}

fn from_tracker(b: &[u8]) {
    if let Ok(m) = tracker::decode::<FromTracker>(b) {
        let _ = m.validate();
        let enc = tracker::encode(&m).expect("re-encode");
        assert_eq!(tracker::decode::<FromTracker>(&enc).expect("re-decode"), m);
    }
}

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    match m % 6 {
        0 => to_tracker(rest),
        1 => from_tracker(rest),
        2 => {
            if let Ok(n) = TrackerChannel::hello_ct_len(rest) {
                assert!(rest.len() >= CLIENT_HELLO_HEADER && n <= MAX_RSA_BYTES);
            }
        }
        3 => {
            let p4: [u8; 4] = *fit::<4>(rest);
            if let Ok(n) = TrackerChannel::frame_len(p4) {
                assert!((16..=MAX_FRAME).contains(&n) && n == u32::from_be_bytes(p4) as usize);
            }
            let p2: [u8; 2] = *fit::<2>(rest);
            if let Ok(n) = link::auth_frame_len(p2) {
                assert!((17..=MAX_AUTH_LEN).contains(&n));
            }
            if let Ok(nonce) = link::decode_probe_body(rest.get(4..).unwrap_or_default()) {
                assert_eq!(&rest[6..], &nonce[..]);
            }
        }
        4 => {
            if let Ok(key) = link::verify_probe_answer(&PROBE_NONCE, rest) {
                assert!(rest.windows(key.der().len()).any(|w| w == key.der()));
            }
        }
        _ => {
            let p2t = m & 8 == 0;
            let mut c = channel().lock().expect("lock");
            let c = &mut *c;
            let sender = if p2t { &mut c.p2t } else { &mut c.t2p };
            let sealed = sender.seal(b"", rest).expect("seal");
            let mut bad = sealed.clone();
            let bit = rest.first().copied().unwrap_or(0) as usize * 7 % (bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            if p2t {
                assert!(c.tracker.open::<ToTracker>(&bad).is_err(), "tampered frame opened");
                let got = c.tracker.open::<ToTracker>(&sealed);
                assert_eq!(got.ok(), tracker::decode::<ToTracker>(rest).ok());
                to_tracker(rest);
            } else {
                assert!(c.peer.open::<FromTracker>(&bad).is_err(), "tampered frame opened");
                let got = c.peer.open::<FromTracker>(&sealed);
                assert_eq!(got.ok(), tracker::decode::<FromTracker>(rest).ok());
                from_tracker(rest);
            }
        }
    }
});
