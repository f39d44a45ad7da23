//! Session tickets (SPEC §3.4): a session outlives its connection. After a full handshake a peer may ask for a
//! ticket; the tracker keeps (the peer's key, the session's resumption secret) under a random 16-byte id, and a
//! later connection that presents the id and proves the secret (its first frame opens under keys derived from it)
//! resumes the session without RSA. The tracker's descriptors thus follow the connections open at once, not the
//! peers.
//!
//! Bounds: a ticket expires once no connection has used it for the session lifetime (`--idle-timeout`, 2·I + 30 s
//! by default), and at most `--max-sessions` tickets are kept (default `--max-peers` + 1,024); past that the least
//! recently used one is dropped (its peer does one full handshake next time). Every operation is O(1) amortized
//! under a short lock: uses are queued in order, and expiry and eviction pop the front of that queue, skipping
//! entries a later use made stale.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anomos_proto::crypto::Secret;
use anomos_proto::identity::PublicKey;
use anomos_proto::tracker::TICKET_LEN;
use rand::RngCore;

/// A ticket's id.
pub(crate) type TicketId = [u8; TICKET_LEN];

/// A resumable session.
struct Entry {
    key: Arc<PublicKey>,
    secret: Secret,
    used: Instant,
}

#[derive(Default)]
struct State {
    map: HashMap<TicketId, Entry>,
    /// (id, time of a use), oldest first; an entry is current only if the ticket's `used` still equals its time.
    uses: VecDeque<(TicketId, Instant)>,
}

/// The tracker's tickets.
pub(crate) struct Tickets {
    max: usize,
    lifetime: Duration,
    st: Mutex<State>,
}

/// What a connection resumes: the peer's key and the session's resumption secret.
pub(crate) struct Resumed {
    pub(crate) key: Arc<PublicKey>,
    pub(crate) secret: Secret,
}

impl Tickets {
    /// At most `max` tickets, each valid until unused for `lifetime`.
    pub(crate) fn new(max: usize, lifetime: Duration) -> Self {
        Tickets { max: max.max(1), lifetime, st: Mutex::new(State::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long an unused ticket lives.
    pub(crate) fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Tickets held now.
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// A new ticket for the session of `key` with resumption secret `secret` (evicting the least recently used
    /// ticket when full).
    pub(crate) fn issue(&self, key: Arc<PublicKey>, secret: Secret) -> TicketId {
        let mut id = [0u8; TICKET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let now = anomos_net::rt::now();
        let mut st = self.lock();
        st.expire(now, self.lifetime);
        while st.map.len() >= self.max && st.evict_oldest() {}
        st.map.insert(id, Entry { key, secret, used: now });
        st.uses.push_back((id, now));
        id
    }

    /// The session of ticket `id`, if it is held and not expired. Not a use by itself: the ticket id travels in
    /// clear, so only a request that opened under the resumed keys ([`Tickets::touch`]) keeps a ticket alive.
    pub(crate) fn resume(&self, id: &TicketId) -> Option<Resumed> {
        let now = anomos_net::rt::now();
        let st = self.lock();
        let e = st.map.get(id)?;
        if now.duration_since(e.used) >= self.lifetime {
            return None; // expired, removed by the next sweep
        }
        Some(Resumed { key: Arc::clone(&e.key), secret: e.secret.clone() })
    }

    /// Marks ticket `id` used now (a request on a connection of its session): it lives another `lifetime`.
    pub(crate) fn touch(&self, id: &TicketId) {
        let now = anomos_net::rt::now();
        let mut st = self.lock();
        if let Some(e) = st.map.get_mut(id) {
            // Queue a use at most once a second per ticket: the queue stays O(tickets), not O(requests).
            if now.duration_since(e.used) >= Duration::from_secs(1) {
                e.used = now;
                st.uses.push_back((*id, now));
            }
        }
    }

    /// Every ticket with its peer, secret and seconds since its last use (to keep them across a restart).
    pub(crate) fn export(&self) -> Vec<crate::store::StoredTicket> {
        let now = anomos_net::rt::now();
        let st = self.lock();
        st.map
            .iter()
            .filter(|(_, e)| now.duration_since(e.used) < self.lifetime)
            .map(|(id, e)| crate::store::StoredTicket {
                id: *id,
                peer: e.key.fingerprint(),
                secret: e.secret.0,
                idle_secs: u32::try_from(now.duration_since(e.used).as_secs()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// Puts back a ticket kept across a restart, last used `idle` ago (the time the tracker was down does not
    /// count: the peers could not use their tickets then).
    pub(crate) fn restore(&self, id: TicketId, key: Arc<PublicKey>, secret: Secret, idle: Duration) {
        if idle >= self.lifetime {
            return;
        }
        let now = anomos_net::rt::now();
        let used = now.checked_sub(idle).unwrap_or(now);
        let mut st = self.lock();
        if st.map.len() >= self.max {
            return;
        }
        st.map.insert(id, Entry { key, secret, used });
        st.uses.push_back((id, used));
    }

    /// Sorts the use queue after restores (they arrive in no particular order).
    pub(crate) fn restored(&self) {
        let mut st = self.lock();
        st.uses.make_contiguous().sort_by_key(|(_, at)| *at);
    }

    /// Drops the tickets unused for `lifetime` (housekeeping).
    pub(crate) fn prune(&self) {
        self.lock().expire(anomos_net::rt::now(), self.lifetime);
    }
}

impl State {
    /// Pops expired uses off the front; removes tickets whose last use that was.
    fn expire(&mut self, now: Instant, lifetime: Duration) {
        while let Some(&(id, at)) = self.uses.front() {
            if now.duration_since(at) < lifetime {
                break;
            }
            self.uses.pop_front();
            if self.map.get(&id).is_some_and(|e| e.used == at) {
                self.map.remove(&id);
            }
        }
    }

    /// Removes the least recently used ticket; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((id, at)) = self.uses.pop_front() {
            if self.map.get(&id).is_some_and(|e| e.used == at) {
                self.map.remove(&id);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use anomos_proto::identity::Identity;
    use rand::SeedableRng;

    fn key() -> Arc<PublicKey> {
        static K: std::sync::OnceLock<PublicKey> = std::sync::OnceLock::new();
        let k = K.get_or_init(|| {
            let id = Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1), 2048).unwrap();
            id.public().clone()
        });
        Arc::new(k.clone())
    }

    #[test]
    fn a_ticket_resumes_its_session_until_unused_for_its_lifetime() {
        let t = Tickets::new(10, Duration::from_millis(300));
        let id = t.issue(key(), Secret([7; 32]));
        let r = t.resume(&id).unwrap();
        assert_eq!(r.secret, Secret([7; 32]));
        assert!(t.resume(&[0; TICKET_LEN]).is_none(), "an id never issued");
        // Used (a request on a resumed connection) within the lifetime: kept. The throttle of one queued use a
        // second does not matter here: the lifetime is checked against the last recorded use.
        let t = Tickets::new(10, Duration::from_millis(2500));
        let id = t.issue(key(), Secret([7; 32]));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1100));
            assert!(t.resume(&id).is_some());
            t.touch(&id);
        }
        // Lookups alone (anyone who saw the id in clear can make them) do not keep it alive.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(900));
            let _ = t.resume(&id);
        }
        assert!(t.resume(&id).is_none(), "unused for longer than its lifetime");
        t.prune();
        assert_eq!(t.len(), 0);
        assert!(t.lock().uses.is_empty(), "the use queue drains with the tickets");
    }

    #[test]
    fn tickets_are_bounded_and_the_least_recently_used_goes_first() {
        let t = Tickets::new(3, Duration::from_secs(60));
        let ids: Vec<_> = (0..3).map(|i| t.issue(key(), Secret([i; 32]))).collect();
        std::thread::sleep(Duration::from_millis(1005));
        t.touch(&ids[0]); // ticket 0 is now the most recently used
        let d = t.issue(key(), Secret([9; 32]));
        assert_eq!(t.len(), 3);
        assert!(t.resume(&ids[1]).is_none(), "ticket 1 was the least recently used");
        assert!(t.resume(&ids[0]).is_some() && t.resume(&ids[2]).is_some() && t.resume(&d).is_some());
        assert_ne!(ids[0], ids[2], "ids are random");
    }
}
