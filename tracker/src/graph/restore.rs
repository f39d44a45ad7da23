//! Putting the graph back together from the state database after a restart: peers first, then the edges between
//! them with their NeighborIDs, so that peers re-announce into the edges they had (SPEC §3.10 "Restart").

use super::*;

/// A peer as the state database keeps it.
#[derive(Debug, Clone)]
pub struct Stored<K> {
    /// Its key.
    pub key: K,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Chains it serves.
    pub chains: Vec<ChainId>,
    /// Its declared family.
    pub family: Vec<Fingerprint>,
    /// Left out of everyone's paths until its next announce.
    pub avoided: bool,
}

impl<K> Stored<K> {
    /// Chains and family sorted and without duplicates, the family without the peer `id` itself (as an announce
    /// stores them).
    pub(crate) fn normalized(mut self, id: &Fingerprint) -> Self {
        self.chains.sort_unstable();
        self.chains.dedup();
        self.family.sort_unstable();
        self.family.dedup();
        self.family.retain(|f| f != id);
        self
    }
}

impl<K> Graph<K> {
    /// Puts back a stored peer, live from `now` (so it has a full expiry period to announce again) and marked
    /// [`restored`](Peer::restored). Not restored (false) when known already or the graph is full. Admission
    /// limits are not checked again: the peer was admitted under them.
    pub fn restore_peer(&mut self, id: Fingerprint, stored: Stored<K>, now: Instant) -> bool {
        if self.peers.contains_key(&id) || self.peers.len() >= self.cfg.max_peers {
            return false;
        }
        let Stored { key, addr, chains, family, avoided } = stored.normalized(&id);
        self.census.add(addr.ip());
        for c in &chains {
            self.serving.entry(c.clone()).or_default().insert(id);
        }
        let peer = Peer { avoided, restored: true, ..Peer::new(key, addr, chains, family, now) };
        self.peers.insert(id, peer);
        self.index_peer(id);
        self.set_seen(id, now);
        true
    }

    /// Puts back a stored edge with its NeighborID. Not restored (false) when an end is unknown, the two are the
    /// same peer or neighbors already, the id is taken or zero, or an end already has as many neighbors as a
    /// reply carries.
    pub fn restore_edge(&mut self, nid: NeighborId, a: Fingerprint, b: Fingerprint) -> bool {
        let [da, db] = [a, b].map(|p| self.peers.get(&p).map_or(0, Peer::degree));
        if !self.put_back_edge(nid, a, b) {
            return false;
        }
        self.rebucket(&a, da);
        self.rebucket(&b, db);
        true
    }

    /// Puts back stored edges as [`restore_edge`](Self::restore_edge) does, in order, but indexes the peers'
    /// degrees once at the end instead of at every edge (a restart at 100,000 peers puts back about 700,000).
    /// Returns the edges not restored.
    pub fn restore_edges(&mut self, edges: Vec<(NeighborId, Fingerprint, Fingerprint)>) -> Vec<NeighborId> {
        self.edges.reserve(edges.len());
        let dropped = edges.into_iter().filter(|&(nid, a, b)| !self.put_back_edge(nid, a, b)).map(|e| e.0).collect();
        self.reindex_degrees();
        dropped
    }

    /// Adds stored edge `nid` between `a` and `b` if it fits: both ends known, distinct, not neighbors yet, each
    /// with fewer neighbors than a reply carries, and the id non-zero and free. Its ends are not moved in the
    /// degree index (the caller does). Looks each end up once: most of a restart's time is these lookups.
    fn put_back_edge(&mut self, nid: NeighborId, a: Fingerprint, b: Fingerprint) -> bool {
        let cap = anomos_proto::tracker::MAX_NEIGHBORS;
        // `get_disjoint_mut` panics on equal keys: a self-edge is refused before it.
        if nid.0 == 0 || a == b || self.edges.contains_key(&nid) {
            return false;
        }
        let [Some(pa), Some(pb)] = self.peers.get_disjoint_mut([&a, &b]) else { return false };
        if pa.degree() >= cap || pb.degree() >= cap || pa.edges.contains_key(&b) {
            return false;
        }
        pa.edges.insert(b, nid);
        pb.edges.insert(a, nid);
        self.edges.insert(nid, (a, b));
        self.touch_ends(nid, a, b);
        true
    }

    /// Marks a stored peer that was not restored as changed, so that the next write deletes it.
    pub fn forget_stored_peer(&mut self, id: Fingerprint) {
        if !self.peers.contains_key(&id) {
            self.touch_peer(id);
        }
    }

    /// Marks a stored edge that was not restored as changed, so that the next write deletes it.
    pub fn forget_stored_edge(&mut self, nid: NeighborId) {
        if !self.edges.contains_key(&nid) {
            self.touch_edge(nid);
        }
    }
}
