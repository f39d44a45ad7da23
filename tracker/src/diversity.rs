//! Network prefixes of peers: admission limits per address and network, and the /16 (IPv6 /32) that neighbor
//! choice and path finding keep apart (SPEC §3.10 "Admission" and "Diversity").
//!
//! Pure: counts only, no clocks. An IPv4-mapped IPv6 address counts as its IPv4 address.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

/// A network: an address masked to `len` bits, IPv4 and IPv6 apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Net {
    v6: bool,
    len: u8,
    bits: u128,
}

impl Net {
    /// `ip` masked to `v4_len` bits (IPv4) or `v6_len` bits (IPv6).
    pub fn of(ip: IpAddr, v4_len: u8, v6_len: u8) -> Net {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let len = v4_len.min(32);
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
                Net { v6: false, len, bits: u128::from(u32::from(a) & mask) }
            }
            IpAddr::V6(a) => {
                let len = v6_len.min(128);
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
                Net { v6: true, len, bits: u128::from(a) & mask }
            }
        }
    }

    /// The prefix that no two hops of a path, and no two neighbors of a peer, share: IPv4 /16, IPv6 /32.
    pub fn diversity(ip: IpAddr) -> Net {
        Net::of(ip, 16, 32)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v6 {
            write!(f, "{}/{}", std::net::Ipv6Addr::from(self.bits), self.len)
        } else {
            write!(f, "{}/{}", std::net::Ipv4Addr::from(self.bits as u32), self.len)
        }
    }
}

/// Most live identities the tracker admits per network (SPEC §3.10 "Admission"). Zero means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Per IPv4 address.
    pub per_ipv4: usize,
    /// Per IPv4 /24.
    pub per_ipv4_24: usize,
    /// Per IPv6 /64 (one host or one LAN: IPv6's "address").
    pub per_ipv6_64: usize,
    /// Per IPv6 /48 (one site).
    pub per_ipv6_48: usize,
}

impl AdmissionLimits {
    /// No limit at all (`--allow-same-ip` overlays).
    pub const NONE: AdmissionLimits = AdmissionLimits { per_ipv4: 0, per_ipv4_24: 0, per_ipv6_64: 0, per_ipv6_48: 0 };

    /// The networks of `ip` that are limited, each with its limit (zero limits left out).
    fn nets(&self, ip: IpAddr) -> impl Iterator<Item = (Net, usize)> {
        let v4 = ip.to_canonical().is_ipv4();
        let (narrow, wide) = if v4 {
            ((32, self.per_ipv4), (24, self.per_ipv4_24))
        } else {
            ((64, self.per_ipv6_64), (48, self.per_ipv6_48))
        };
        [narrow, wide]
            .into_iter()
            .filter(|(_, limit)| *limit > 0)
            .map(move |(len, limit)| (Net::of(ip, len, len), limit))
    }
}

/// Why an identity was not admitted: its network is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// The network that is full.
    pub net: Net,
    /// Its limit.
    pub limit: usize,
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.net.v6, self.net.len) {
            (false, 32) => "IPv4 address".to_string(),
            (_, len) if !self.net.v6 => format!("IPv4 /{len}"),
            (_, len) => format!("IPv6 /{len}"),
        };
        write!(f, "{} already holds {} live peers, the most this tracker admits per {what}", self.net, self.limit)
    }
}

/// Live identities per limited network and per diversity prefix.
#[derive(Debug)]
pub struct Census {
    limits: AdmissionLimits,
    per_net: HashMap<Net, usize>,
    per_prefix: HashMap<Net, usize>,
    /// Networks the census jumps to when full past a sixteenth of them (`crate::sizing`; 0: it grows by doubling).
    sized_for: usize,
}

impl Census {
    /// Empty.
    pub fn new(limits: AdmissionLimits) -> Self {
        Census { limits, per_net: HashMap::new(), per_prefix: HashMap::new(), sized_for: 0 }
    }

    /// Plans the census for `peers` identities (`crate::sizing`): each counts in at most two limited networks (its
    /// address and its /24, or IPv6 /64 and /48).
    pub fn size_for(&mut self, peers: usize) {
        self.sized_for = peers.saturating_mul(2);
    }

    /// Whether one more identity may be admitted at `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), OverLimit> {
        for (net, limit) in self.limits.nets(ip) {
            if self.per_net.get(&net).copied().unwrap_or(0) >= limit {
                return Err(OverLimit { net, limit });
            }
        }
        Ok(())
    }

    /// Counts an identity at `ip`.
    pub fn add(&mut self, ip: IpAddr) {
        // Up to two networks go in: jump if the second would make it grow.
        if let Some(more) = crate::sizing::jump(self.per_net.len() + 1, self.per_net.capacity(), self.sized_for) {
            // Refused address space leaves it doubling as it fills, as before.
            let _ = self.per_net.try_reserve(more);
        }
        for (net, _) in self.limits.nets(ip) {
            *self.per_net.entry(net).or_insert(0) += 1;
        }
        *self.per_prefix.entry(Net::diversity(ip)).or_insert(0) += 1;
    }

    /// Forgets an identity at `ip` (one that [`add`](Self::add) counted).
    pub fn remove(&mut self, ip: IpAddr) {
        fn dec(map: &mut HashMap<Net, usize>, net: Net) {
            if let Some(n) = map.get_mut(&net) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&net);
                }
            }
        }
        for (net, _) in self.limits.nets(ip) {
            dec(&mut self.per_net, net);
        }
        dec(&mut self.per_prefix, Net::diversity(ip));
    }

    /// Distinct diversity prefixes (/16, IPv6 /32) among the counted identities.
    pub fn prefixes(&self) -> usize {
        self.per_prefix.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_planned_census_grows_once_past_a_sixteenth_of_its_plan() {
        // Both limits: each identity counts in two networks (an address, and its /24 every 16 addresses).
        let limits = AdmissionLimits { per_ipv4: 1, per_ipv4_24: 16, per_ipv6_64: 0, per_ipv6_48: 0 };
        let mut c = Census::new(limits);
        let peers = 8_000;
        c.size_for(peers);
        let addr = |i: usize| IpAddr::from([10, (i >> 12) as u8, (i >> 4) as u8, i as u8 & 15]);
        let mut growths = 0;
        for i in 0..peers {
            let cap = c.per_net.capacity();
            c.add(addr(i));
            if c.per_net.capacity() != cap && cap >= crate::sizing::JUMP_MIN {
                growths += 1;
            }
        }
        assert_eq!(c.per_net.len(), peers + peers / 16);
        assert_eq!(growths, 1, "it doubled past {} networks", crate::sizing::JUMP_MIN);
        assert!(c.per_net.capacity() >= 2 * peers);

        // Unplanned, the same census doubles: the count above can fail.
        let mut u = Census::new(limits);
        let mut doublings = 0;
        for i in 0..peers {
            let cap = u.per_net.capacity();
            u.add(addr(i));
            doublings += usize::from(u.per_net.capacity() != cap && cap >= crate::sizing::JUMP_MIN);
        }
        assert!(doublings >= 2, "{doublings}");
    }

    #[test]
    fn prefixes_mask_and_canonicalize() {
        assert_eq!(Net::diversity(ip("10.1.2.3")), Net::diversity(ip("10.1.200.9")));
        assert_ne!(Net::diversity(ip("10.1.2.3")), Net::diversity(ip("10.2.2.3")));
        assert_eq!(Net::diversity(ip("::ffff:10.1.2.3")), Net::diversity(ip("10.1.9.9")));
        assert_eq!(Net::diversity(ip("2001:db8:1::1")), Net::diversity(ip("2001:db8:ffff::2")));
        assert_ne!(Net::diversity(ip("2001:db8::1")), Net::diversity(ip("2001:db9::1")));
        assert_eq!(Net::diversity(ip("127.3.0.1")).to_string(), "127.3.0.0/16");
        assert_eq!(Net::of(ip("2001:db8:1:2:3::1"), 32, 64).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn limits_per_address_and_network_both_families() {
        let limits = AdmissionLimits { per_ipv4: 2, per_ipv4_24: 3, per_ipv6_64: 1, per_ipv6_48: 2 };
        let mut c = Census::new(limits);
        c.add(ip("10.0.0.1"));
        c.add(ip("10.0.0.1"));
        let e = c.check(ip("10.0.0.1")).unwrap_err();
        assert_eq!((e.net.to_string(), e.limit), ("10.0.0.1/32".into(), 2));
        assert!(e.to_string().contains("per IPv4 address"), "{e}");
        c.check(ip("10.0.0.2")).unwrap();
        c.add(ip("10.0.0.2"));
        let e = c.check(ip("10.0.0.3")).unwrap_err();
        assert_eq!(e.net.to_string(), "10.0.0.0/24");
        assert!(e.to_string().contains("IPv4 /24"));
        c.check(ip("10.0.1.3")).unwrap();
        // IPv4-mapped counts as IPv4.
        assert!(c.check(ip("::ffff:10.0.0.1")).is_err());
        // IPv6: a /64 is one address.
        c.add(ip("2001:db8:0:1::1"));
        assert!(c.check(ip("2001:db8:0:1::9")).is_err());
        c.check(ip("2001:db8:0:2::1")).unwrap();
        c.add(ip("2001:db8:0:2::1"));
        assert_eq!(c.check(ip("2001:db8:0:3::1")).unwrap_err().net.to_string(), "2001:db8::/48");
        assert_eq!(c.prefixes(), 2);
        // Removal frees room and forgets empty networks.
        c.remove(ip("10.0.0.1"));
        c.check(ip("10.0.0.1")).unwrap();
        c.remove(ip("10.0.0.1"));
        c.remove(ip("10.0.0.2"));
        c.remove(ip("2001:db8:0:1::1"));
        c.remove(ip("2001:db8:0:2::1"));
        assert!(c.per_net.is_empty() && c.per_prefix.is_empty() && c.prefixes() == 0);
        // No limits: anything goes, prefixes still counted.
        let mut c = Census::new(AdmissionLimits::NONE);
        for _ in 0..100 {
            c.add(ip("127.0.0.1"));
        }
        c.check(ip("127.0.0.1")).unwrap();
        assert_eq!(c.prefixes(), 1);
    }
}
