//! Rewriting the address fields of a `version` payload in place.
//!
//! ```text
//! offset  size  field
//! 0       4     version         i32
//! 4       8     services        u64
//! 12      8     timestamp       i64
//! 20      8     addr_recv.services
//! 28      16    addr_recv.ip    IPv6 (IPv4 as ::ffff:a.b.c.d)
//! 44      2     addr_recv.port  big-endian
//! 46      8     addr_from.services   (protocol version >= 106)
//! 54      16    addr_from.ip
//! 70      2     addr_from.port
//! 72      ...   nonce, user agent, start height, relay (untouched)
//! ```

/// Where the 18 bytes of IP and port of `addr_recv` start.
const ADDR_RECV_IP: usize = 28;
/// Where the 18 bytes of IP and port of `addr_from` start.
const ADDR_FROM_IP: usize = 54;
/// IP (16) + port (2).
const IP_PORT: usize = 18;
/// Protocol versions before this have no `addr_from` (or anything after it).
const ADDR_FROM_VERSION: i32 = 106;

/// Sets the IP and port of `addr_recv` and `addr_from` in a `version` payload to the unspecified address
/// `[::]:0`; everything else (the service bits of both addresses, nonce, user agent, ...) and the length
/// stay as they are. Fields the payload is too short to hold completely are left alone (the receiver
/// rejects such a `version` anyway). Returns whether any byte changed.
pub fn scrub_version_payload(payload: &mut [u8]) -> bool {
    let version = payload.first_chunk::<4>().map_or(0, |v| i32::from_le_bytes(*v));
    let mut fields = vec![ADDR_RECV_IP];
    if version >= ADDR_FROM_VERSION {
        fields.push(ADDR_FROM_IP);
    }
    let mut changed = false;
    for start in fields {
        if let Some(field) = payload.get_mut(start..start + IP_PORT) {
            if field.iter().any(|&b| b != 0) {
                field.fill(0);
                changed = true;
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use anomos_proto::btc::{Address, Message, ServiceFlags, VersionMessage};
    use std::net::SocketAddr;

    fn version(recv: &str, from: &str) -> VersionMessage {
        let a = |s: &str| Address::new(&s.parse::<SocketAddr>().unwrap(), ServiceFlags::NETWORK);
        let mut v = VersionMessage::new(
            ServiceFlags::NETWORK | ServiceFlags::WITNESS,
            1_700_000_000,
            a(recv),
            a(from),
            0x0123_4567_89ab_cdef,
            "/Satoshi:27.0.0/".into(),
            123,
        );
        v.version = 70016;
        v
    }

    #[test]
    fn both_addresses_become_unspecified_and_nothing_else_changes() {
        let v = version("198.51.100.7:8333", "[2001:db8::1]:18444");
        let mut payload = Message::Version(v.clone()).encode_payload();
        let before = payload.clone();
        assert!(scrub_version_payload(&mut payload));
        assert_eq!(payload.len(), before.len());
        let Message::Version(got) = Message::decode_payload("version", &payload).unwrap() else { panic!() };
        for addr in [&got.receiver, &got.sender] {
            assert_eq!(addr.address, [0u16; 8]);
            assert_eq!(addr.port, 0);
            assert_eq!(addr.services, ServiceFlags::NETWORK, "service bits are kept");
        }
        assert_eq!(
            (got.version, got.services, got.timestamp, got.nonce, &got.user_agent, got.start_height, got.relay),
            (v.version, v.services, v.timestamp, v.nonce, &v.user_agent, v.start_height, v.relay)
        );
        let differing: Vec<usize> = (0..payload.len()).filter(|&i| payload[i] != before[i]).collect();
        assert!(differing.iter().all(|&i| (28..46).contains(&i) || (54..72).contains(&i)), "{differing:?}");
        // Already scrubbed: nothing to do.
        assert!(!scrub_version_payload(&mut payload));
    }

    #[test]
    fn short_and_old_payloads_are_left_alone_where_fields_are_missing() {
        let mut short = vec![0x7f; 40];
        assert!(!scrub_version_payload(&mut short));
        assert_eq!(short, vec![0x7f; 40]);
        // Protocol 105: only addr_recv exists; bytes 54.. are something else.
        let mut old = vec![0x7f; 80];
        old[..4].copy_from_slice(&105i32.to_le_bytes());
        assert!(scrub_version_payload(&mut old));
        assert!(old[28..46].iter().all(|&b| b == 0));
        assert!(old[46..].iter().all(|&b| b == 0x7f));
    }
}
