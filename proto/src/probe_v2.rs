//! The reachability probe, version 2 (SPEC open issue 27): a MAC under a key of the announcing session instead of
//! an RSA signature. The session already proves the peer's key (its `Hello`); the
//! probe only has to show that the announced address reaches the holder of that session.
//!
//! ```text
//! k_probe  = HKDF(salt "anomos probe v2", rs | peer_fp, "probe key")      (rs: the session's resumption secret)
//! addr18   = IPv6 address (IPv4 as ::ffff:a.b.c.d) | port u16 BE
//! probe (tracker → peer, 92 B):   "ANOMOSP1" | ver u16 = 2 | nonce[32] | addr18 |
//!                                 HMAC-SHA256(k_probe, "anomos probe v2 request" | nonce | addr18)
//! answer (peer → tracker, 33 B):  status u8 (0 ok, 1 no session of ours or bad tag, 2 not my address) |
//!                                 HMAC-SHA256(k_probe, "anomos probe v2 answer" | nonce | addr18)
//!                                 (zeros unless status 0)
//! ```
//!
//! Both tags are checked in constant time. The request tag keeps strangers from using a peer's listener as a MAC
//! oracle, and tells the peer which of its (at most two) session keys the probe is under: no session id travels in
//! clear, so probes of one session cannot be linked across addresses. `addr18` keeps an answer for one address
//! from counting for another. What it no longer proves, compared
//! with version 1: that the host answering holds the identity key at that moment (only the session's secret).

use std::net::{IpAddr, SocketAddr};

use aws_lc_rs::hmac;

use crate::crypto::{kdf, Secret};
use crate::error::{take_array, take_u16, ProtoError, Result};
use crate::identity::Fingerprint;
use crate::link::PROBE_MAGIC;

/// The probe version this module speaks.
pub const PROBE_VERSION_2: u16 = 2;
/// Length of a version-2 probe, magic included.
pub const PROBE_V2_LEN: usize = 8 + 2 + 32 + 18 + 32;
/// Length of a version-2 answer.
pub const PROBE_V2_ANSWER_LEN: usize = 1 + 32;
/// The answer's status: the tag is valid.
pub const PROBE_OK: u8 = 0;
/// The answer's status: the request's tag is valid under no session key of ours.
pub const PROBE_UNKNOWN: u8 = 1;
/// The answer's status: the probed address is not the one we announce.
pub const PROBE_NOT_MINE: u8 = 2;

const SALT: &[u8] = b"anomos probe v2";
const LABEL_REQUEST: &[u8] = b"anomos probe v2 request";
const LABEL_ANSWER: &[u8] = b"anomos probe v2 answer";
/// The detail of the error for a `PROBE_UNKNOWN` answer: the tracker then probes with version 1 (the peer may not
/// hold its sessions' probe keys where its listener answers).
pub const UNKNOWN_SESSION: &str = "the peer holds no key of this session";

/// An address as 18 bytes: the IPv6 form (IPv4 mapped) and the port.
pub fn addr18(a: SocketAddr) -> [u8; 18] {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; 18];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&a.port().to_be_bytes());
    out
}

/// A version-2 probe as the peer parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeV2 {
    /// The tracker's fresh nonce.
    pub nonce: [u8; 32],
    /// The probed address.
    pub addr: [u8; 18],
    tag: [u8; 32],
}

/// Peer side: parses the bytes of a version-2 probe after its magic (exactly `PROBE_V2_LEN - 8` bytes).
pub fn decode_probe_v2(body: &[u8]) -> Result<ProbeV2> {
    if body.len() != PROBE_V2_LEN - 8 {
        return Err(ProtoError::BadLength { what: "probe v2", len: body.len(), expected: PROBE_V2_LEN - 8 });
    }
    let mut p = body;
    let ver = take_u16(&mut p, "probe version")?;
    if ver != PROBE_VERSION_2 {
        return Err(ProtoError::BadVersion(ver));
    }
    Ok(ProbeV2 {
        nonce: take_array(&mut p, "probe nonce")?,
        addr: take_array(&mut p, "probe address")?,
        tag: take_array(&mut p, "probe tag")?,
    })
}

/// One session's probe key (both ends derive it from the session's resumption secret).
pub struct ProbeAuth {
    key: hmac::Key,
}

impl ProbeAuth {
    /// The probe key of the session whose resumption secret is `rs`, for the peer `peer_fp`.
    pub fn derive(rs: &Secret, peer_fp: &Fingerprint) -> Result<Self> {
        let k = kdf(SALT, &[&rs.0, &peer_fp.0], b"probe key");
        Ok(ProbeAuth { key: hmac::Key::new(hmac::HMAC_SHA256, &k.0) })
    }

    fn tag(&self, label: &[u8], nonce: &[u8; 32], addr: &[u8; 18]) -> [u8; 32] {
        let t = hmac::sign(&self.key, &[label, nonce, addr].concat());
        let mut out = [0u8; 32];
        out.copy_from_slice(t.as_ref());
        out
    }

    fn check(&self, label: &[u8], nonce: &[u8; 32], addr: &[u8; 18], tag: &[u8]) -> bool {
        hmac::verify(&self.key, &[label, nonce, addr].concat(), tag).is_ok()
    }

    /// Tracker side: the probe of `addr` with `nonce`.
    pub fn probe(&self, nonce: &[u8; 32], addr: SocketAddr) -> [u8; PROBE_V2_LEN] {
        let a = addr18(addr);
        let tag = self.tag(LABEL_REQUEST, nonce, &a);
        let mut out = [0u8; PROBE_V2_LEN];
        let parts: [&[u8]; 5] = [&PROBE_MAGIC, &PROBE_VERSION_2.to_be_bytes(), nonce, &a, &tag];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = out.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        out
    }

    /// Peer side: whether `probe` is under this session's key (its request tag verifies).
    pub fn owns(&self, probe: &ProbeV2) -> bool {
        self.check(LABEL_REQUEST, &probe.nonce, &probe.addr, &probe.tag)
    }

    /// Peer side: the answer to `probe`, we announcing `announced`.
    pub fn answer(&self, probe: &ProbeV2, announced: SocketAddr) -> [u8; PROBE_V2_ANSWER_LEN] {
        let mut out = [0u8; PROBE_V2_ANSWER_LEN];
        if !self.owns(probe) {
            out[0] = PROBE_UNKNOWN;
        } else if probe.addr != addr18(announced) {
            out[0] = PROBE_NOT_MINE;
        } else {
            out[1..].copy_from_slice(&self.tag(LABEL_ANSWER, &probe.nonce, &probe.addr));
        }
        out
    }

    /// Tracker side: checks the answer to its probe of `addr` with `nonce`.
    pub fn check_answer(&self, nonce: &[u8; 32], addr: SocketAddr, answer: &[u8]) -> Result<()> {
        let bad = |detail: &str| Err(ProtoError::Invalid { what: "probe answer v2", detail: detail.into() });
        let (status, tag) = match answer.split_first() {
            Some((s, t)) if t.len() == 32 => (*s, t),
            _ => {
                return Err(ProtoError::BadLength {
                    what: "probe answer v2",
                    len: answer.len(),
                    expected: PROBE_V2_ANSWER_LEN,
                })
            }
        };
        match status {
            PROBE_OK if self.check(LABEL_ANSWER, nonce, &addr18(addr), tag) => Ok(()),
            PROBE_OK => bad("wrong tag"),
            PROBE_UNKNOWN => Err(ProtoError::Invalid { what: "probe answer v2", detail: UNKNOWN_SESSION.into() }),
            PROBE_NOT_MINE => bad("the peer does not announce this address"),
            _ => bad("unknown status"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn auth(rs: u8, fp: u8) -> ProbeAuth {
        ProbeAuth::derive(&Secret([rs; 32]), &Fingerprint([fp; 32])).unwrap()
    }

    #[test]
    fn a_probe_is_answered_by_the_sessions_holder_at_the_announced_address_only() {
        let (tracker, peer) = (auth(1, 2), auth(1, 2));
        let addr: SocketAddr = "192.0.2.7:8633".parse().unwrap();
        let nonce = [4u8; 32];
        let wire = tracker.probe(&nonce, addr);
        assert_eq!(&wire[..8], &PROBE_MAGIC);
        let p = decode_probe_v2(&wire[8..]).unwrap();
        let ans = peer.answer(&p, addr);
        assert_eq!(ans[0], PROBE_OK);
        tracker.check_answer(&nonce, addr, &ans).unwrap();
        // The IPv4-mapped IPv6 form is the same address.
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:8633".parse().unwrap();
        assert_eq!(addr18(addr), addr18(mapped));
        tracker.check_answer(&nonce, mapped, &ans).unwrap();
        // Another nonce or address: the answer does not count.
        assert!(tracker.check_answer(&[5u8; 32], addr, &ans).is_err());
        assert!(tracker.check_answer(&nonce, "192.0.2.7:8634".parse().unwrap(), &ans).is_err());
        // A peer announcing another address says so, and that is no success.
        let not_mine = peer.answer(&p, "192.0.2.8:8633".parse().unwrap());
        assert_eq!(not_mine[0], PROBE_NOT_MINE);
        assert_eq!(&not_mine[1..], &[0u8; 32]);
        assert!(tracker.check_answer(&nonce, addr, &not_mine).is_err());
    }

    #[test]
    fn another_session_a_stranger_or_a_tampered_probe_gets_no_tag() {
        let tracker = auth(1, 2);
        let addr: SocketAddr = "[2001:db8::1]:9000".parse().unwrap();
        let nonce = [8u8; 32];
        let p = decode_probe_v2(&tracker.probe(&nonce, addr)[8..]).unwrap();
        // Another session (other secret) or another peer (other fingerprint): not its probe, no answer.
        for other in [auth(9, 2), auth(1, 3)] {
            assert!(!other.owns(&p));
            let a = other.answer(&p, addr);
            assert_eq!(a[0], PROBE_UNKNOWN);
            assert!(tracker.check_answer(&nonce, addr, &a).is_err());
        }
        // A stranger without the key cannot make a valid request.
        let peer = auth(1, 2);
        assert!(peer.owns(&p));
        let mut forged = p.clone();
        forged.nonce[0] ^= 1;
        assert_eq!(peer.answer(&forged, addr)[0], PROBE_UNKNOWN);
        let mut forged = p.clone();
        forged.tag[31] ^= 1;
        assert_eq!(peer.answer(&forged, addr)[0], PROBE_UNKNOWN);
        // A tampered answer.
        let mut a = peer.answer(&p, addr);
        a[7] ^= 1;
        assert!(tracker.check_answer(&nonce, addr, &a).is_err());
        // Malformed bytes.
        let wire = tracker.probe(&nonce, addr);
        assert!(decode_probe_v2(&wire[8..wire.len() - 1]).is_err());
        assert!(decode_probe_v2(&[&wire[8..], &[0u8][..]].concat()).is_err());
        let mut v1 = wire;
        v1[9] = 1;
        assert!(decode_probe_v2(&v1[8..]).is_err(), "version 1 is not this probe");
        assert!(tracker.check_answer(&nonce, addr, &[0u8; 32]).is_err());
        let mut odd = peer.answer(&p, addr);
        odd[0] = 7;
        assert!(tracker.check_answer(&nonce, addr, &odd).is_err());
    }
}
