//! Fuzzes opening link cells (`LinkCipher::open_cell`) and the plaintext cell decoder (`Cell::decode`).
//!
//! The link is a fixed deterministic handshake (dialer id0 `rng(7001)`, acceptor id1 `rng(7002)`), done once.
//! Its keys differ from the committed vector's, so no committed sealed cell can open here and the outcome of an
//! input never depends on what ran before it.
//!
//! Input: byte 0 selects the mode (mod 3), the rest is the payload.
//! * 0: the payload, fitted to SEALED_CELL_LEN, is a sealed cell from the wire: the acceptor opens it
//!   (garbage must fail; the receive counter must not move).
//! * 1: `Cell::decode` on the raw payload (any length); a decoded cell re-encodes to the same bytes and its
//!   command-specific accessors do not panic.
//! * 2: the payload, fitted to CELL_LEN, is a plaintext cell: the dialer seals it and the acceptor opens it;
//!   the result must equal `Cell::decode` of the plaintext (both ends stay in step either way).

#![no_main]

use std::sync::{Mutex, OnceLock};

use anomos_proto::cell::{Cell, Command, CELL_LEN, SEALED_CELL_LEN};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{Acceptor, Dialer, LinkCipher};
use anomos_proto_fuzz::{fit, ids, mode, rng};
use libfuzzer_sys::fuzz_target;

struct Link {
    dialer: LinkCipher,
    acceptor: LinkCipher,
}

fn link() -> &'static Mutex<Link> {
    static L: OnceLock<Mutex<Link>> = OnceLock::new();
    L.get_or_init(|| {
        let (d, a) = (&ids()[0], &ids()[1]);
        let nid = NeighborId(0x0f0f_0f0f_0f0f_0f0f);
        let (mut dr, mut ar) = (rng(7001), rng(7002));
        let (dialer, hello) = Dialer::start(&mut dr, a.public().clone(), nid);
        let (acceptor, reply) = Acceptor::start(&mut ar, &hello).expect("start");
        let (dialer, auth) = dialer.on_reply(&reply, d, &mut dr).expect("reply");
        let out = acceptor.on_auth(&auth, a, &mut ar, |_| Some((d.public().clone(), nid)), |_| false).expect("auth");
        let acceptor = out.result.expect("accepted");
        let dialer = dialer.on_auth_reply(&out.reply).expect("auth reply");
        Mutex::new(Link { dialer, acceptor })
    })
}

fn exercise(c: &Cell) {
    let mut again = [0u8; CELL_LEN];
    c.encode_into(&mut again);
    assert_eq!(&Cell::decode(&again).expect("re-decode"), c);
    assert_eq!(c.circ_id == 0, c.command == Command::Padding);
    let _ = c.deny_fields();
    let _ = c.break_fields();
    let _ = c.sendme_credit();
    assert_eq!(c.open_tc().is_ok(), c.command == Command::Open);
}

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    match m % 3 {
        0 => {
            let sealed = fit::<SEALED_CELL_LEN>(rest);
            let mut l = link().lock().expect("lock");
            assert!(l.acceptor.open_cell(&sealed).is_err(), "forged cell opened");
        }
        1 => {
            let res = Cell::decode(rest);
            if rest.len() != CELL_LEN {
                assert!(res.is_err());
            }
            if let Ok(c) = res {
                let mut enc = [0u8; CELL_LEN];
                c.encode_into(&mut enc);
                assert_eq!(&enc[..], rest);
                exercise(&c);
            }
        }
        _ => {
            let plain = fit::<CELL_LEN>(rest);
            let mut buf = Box::new([0u8; SEALED_CELL_LEN]);
            buf[..CELL_LEN].copy_from_slice(&plain[..]);
            let mut l = link().lock().expect("lock");
            l.dialer.seal_in_place(&mut buf).expect("seal");
            let opened = l.acceptor.open_cell(&buf);
            let direct = Cell::decode(&plain[..]);
            match (&opened, &direct) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b);
                    exercise(a);
                }
                (Err(a), Err(b)) => assert_eq!(a, b),
                _ => panic!("open_cell {opened:?} but decode {direct:?}"),
            }
        }
    }
});
