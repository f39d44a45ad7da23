//! Per-source-address limits of the tracker's listener: concurrent connections per address, the rate of channel
//! set-ups (each an RSA decryption) per address, and the channel set-ups in progress overall. An IPv6 /64 counts as
//! one address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::config::TrackerArgs;

/// Most source addresses whose ClientHello rate is tracked individually; beyond it new addresses share one
/// bucket (so an attacker with many addresses cannot grow the table).
const MAX_RATE_ENTRIES: usize = 65_536;

/// Channel set-ups (RSA decryptions) in progress at once; more connections are closed before any RSA work.
pub(crate) const HANDSHAKES_AT_ONCE: usize = 32;
/// Why a connection over [`HANDSHAKES_AT_ONCE`] is closed.
pub(crate) const BUSY: &str = "busy: too many channel set-ups in progress";

/// A token bucket.
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-source-address limits: concurrent connections, and the rate of channel set-ups (RSA decryptions).
pub(crate) struct Limits {
    pub(crate) per_ip_max: usize,
    /// Channel set-ups in progress ([`HANDSHAKES_AT_ONCE`]).
    pub(crate) handshakes: Semaphore,
    rate: f64,
    burst: f64,
    st: Mutex<LimitState>,
}

#[derive(Default)]
struct LimitState {
    conns: HashMap<IpAddr, usize>,
    hellos: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
}

/// One connection slot of an address, released on drop.
pub(crate) struct ConnSlot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut st = self.limits.lock();
        if let Some(n) = st.conns.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.conns.remove(&self.ip);
            }
        }
    }
}

/// The key the per-address limits count under: an IPv4 address (also when it arrives IPv4-mapped on a dual-stack
/// socket) as it is, an IPv6 address by its /64 prefix. One IPv6 host usually has a whole /64 to draw source
/// addresses from, so counting exact IPv6 addresses would multiply its budgets (SPEC open issue 11).
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// Reachability probes in flight per address (an IPv6 /64 as one), so one address cannot hold the tracker's probe
/// slots: a known peer that re-announces with a new port each time needs a probe each time, and its listener can
/// stall every one for the probe's whole timeout (found in review, session 10). Two matches the default admission
/// limit of live peers per address (`--max-per-ipv4`).
pub(crate) const PROBES_PER_ADDRESS: usize = 2;

/// Counts per address, each count held by an [`AddressSlot`] and released when it drops.
#[derive(Default)]
pub(crate) struct AddressSlots(Mutex<HashMap<IpAddr, usize>>);

/// One of an address's slots in an [`AddressSlots`].
pub(crate) struct AddressSlot {
    slots: Arc<AddressSlots>,
    ip: IpAddr,
}

impl AddressSlots {
    /// A slot for `ip` if it holds fewer than `max`.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let ip = limit_key(ip);
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot { slots: Arc::clone(self), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Limits {
    pub(crate) fn new(args: &TrackerArgs) -> Arc<Self> {
        Arc::new(Limits {
            per_ip_max: args.max_sessions_per_ip,
            handshakes: Semaphore::new(HANDSHAKES_AT_ONCE),
            rate: f64::from(args.hello_rate),
            burst: f64::from(args.hello_burst),
            st: Mutex::new(LimitState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimitState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn conn(self: &Arc<Self>, ip: IpAddr) -> Option<ConnSlot> {
        let ip = limit_key(ip);
        let mut st = self.lock();
        let n = st.conns.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return None;
        }
        *n += 1;
        Some(ConnSlot { limits: Arc::clone(self), ip })
    }

    /// Takes one channel set-up token for `ip`; false if it is over its rate.
    pub(crate) fn hello(&self, ip: IpAddr) -> bool {
        let ip = limit_key(ip);
        let now = anomos_net::rt::now();
        let (rate, burst) = (self.rate, self.burst);
        let mut st = self.lock();
        let fresh = || Bucket { tokens: burst, last: now };
        let LimitState { hellos, overflow, .. } = &mut *st;
        let b = if hellos.contains_key(&ip) || hellos.len() < MAX_RATE_ENTRIES {
            hellos.entry(ip).or_insert_with(fresh)
        } else {
            overflow.get_or_insert_with(fresh)
        };
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled (they hold no information).
    pub(crate) fn prune(&self) {
        let now = anomos_net::rt::now();
        let (rate, burst) = (self.rate, self.burst);
        self.lock().hellos.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(per_ip: usize, rate: u32, burst: u32) -> Arc<Limits> {
        let args =
            TrackerArgs { max_sessions_per_ip: per_ip, hello_rate: rate, hello_burst: burst, ..TrackerArgs::default() };
        Limits::new(&args)
    }

    #[test]
    fn connection_slots_are_per_address_and_released_on_drop() {
        let l = limits(2, 10, 10);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let s1 = l.conn(a).unwrap();
        let _s2 = l.conn(a).unwrap();
        assert!(l.conn(a).is_none(), "a third connection from one address");
        assert!(l.conn(b).is_some(), "another address is not affected");
        drop(s1);
        assert!(l.conn(a).is_some(), "a slot comes back when its connection ends");
    }

    #[test]
    fn client_hellos_are_rate_limited_per_address_and_refill() {
        let l = limits(10, 20, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!((0..5).filter(|_| l.hello(a)).count(), 3, "the burst, then refused");
        assert!(l.hello(b), "another address has its own bucket");
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.hello(a), "refilled at the rate");
        // Full buckets carry no information and are forgotten.
        std::thread::sleep(Duration::from_millis(300));
        l.prune();
        assert!(l.lock().hellos.is_empty());
    }

    #[test]
    fn ipv6_addresses_share_their_64_prefix_budget_and_mapped_ipv4_is_ipv4() {
        let l = limits(2, 20, 3);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // Two addresses of one /64 share the connection slots and the hello bucket.
        let _a = l.conn(ip("2001:db8:1:2::1")).unwrap();
        let _b = l.conn(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")).unwrap();
        assert!(l.conn(ip("2001:db8:1:2::9")).is_none(), "a third connection from the same /64");
        assert!(l.conn(ip("2001:db8:1:3::1")).is_some(), "the next /64 is another host");
        assert_eq!((0..3).filter(|i| l.hello(ip(&format!("2001:db8:1:2::{}", i + 1)))).count(), 3);
        assert!(!l.hello(ip("2001:db8:1:2::77")), "the /64's burst is spent, whatever the address");
        // An IPv4 peer seen IPv4-mapped on a dual-stack socket counts as that IPv4 address.
        let _c = l.conn(ip("10.0.0.7")).unwrap();
        let _d = l.conn(ip("::ffff:10.0.0.7")).unwrap();
        assert!(l.conn(ip("10.0.0.7")).is_none(), "mapped and plain IPv4 are one address");
        assert!(l.conn(ip("10.0.0.8")).is_some(), "IPv4 addresses are not grouped");
    }
}
