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
            self.serve(c.clone(), id);
        }
        let peer = Peer { avoided, restored: true, ..Peer::new(key, addr, chains, family, now) };
        self.room_for_peer();
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

    /// Puts back stored edges as [`restore_edge`](Self::restore_edge) does, in order, and returns the edges not
    /// restored. A restart at 100,000 peers puts back about 700,000, so this checks them against a dense
    /// numbering of the peers (a small index, degree counters and new-neighbor lists) instead of the peer table,
    /// fills each peer's neighbor table once at its final size, and indexes the degrees once at the end.
    pub fn restore_edges(&mut self, edges: Vec<(NeighborId, Fingerprint, Fingerprint)>) -> Vec<NeighborId> {
        /// A peer in the dense numbering.
        struct Slot {
            /// Neighbors before this call (none at a restart).
            had: usize,
            /// New neighbors, by number, with the edges' ids.
            added: Vec<(u32, NeighborId)>,
        }
        let cap = anomos_proto::tracker::MAX_NEIGHBORS;
        let mut index: FpMap<Fingerprint, u32> = FpMap::default();
        index.reserve(self.peers.len());
        let mut slots = Vec::with_capacity(self.peers.len());
        let mut ids = Vec::with_capacity(self.peers.len());
        // Room for the mean number of new neighbors (most peers), allocated together rather than grown.
        let mean = (2 * edges.len()).div_ceil(self.peers.len().max(1)).min(cap);
        for (id, p) in &self.peers {
            let Ok(i) = u32::try_from(slots.len()) else { break };
            index.insert(*id, i);
            ids.push(*id);
            slots.push(Slot { had: p.degree(), added: Vec::with_capacity(mean) });
        }
        let mut dropped = Vec::new();
        self.edges.reserve(edges.len());
        for (nid, a, b) in edges {
            // The checks of `put_back_edge`, in its order.
            let taken = nid.0 == 0 || a == b || self.edges.contains_key(&nid);
            let ends = index.get(&a).copied().zip(index.get(&b).copied()).filter(|_| !taken);
            let Some((xi, yi)) = ends else {
                dropped.push(nid);
                continue;
            };
            let Ok([x, y]) = slots.get_disjoint_mut([xi as usize, yi as usize]) else {
                dropped.push(nid);
                continue;
            };
            let full = x.had + x.added.len() >= cap || y.had + y.added.len() >= cap;
            let linked = x.added.iter().any(|&(o, _)| o == yi)
                || (x.had > 0 && self.peers.get(&a).is_some_and(|p| p.edges.contains_key(&b)));
            if full || linked {
                dropped.push(nid);
                continue;
            }
            x.added.push((yi, nid));
            y.added.push((xi, nid));
            self.edges.insert(nid, (a, b));
            self.touch_ends(nid, a, b);
        }
        for (id, p) in &mut self.peers {
            let Some(slot) = index.get(id).and_then(|&i| slots.get(i as usize)) else { continue };
            p.edges.reserve(slot.added.len());
            p.edges.extend(slot.added.iter().filter_map(|&(o, nid)| Some((*ids.get(o as usize)?, nid))));
        }
        self.reindex_degrees();
        dropped
    }

    /// Adds stored edge `nid` between `a` and `b` if it fits: both ends known, distinct, not neighbors yet, each
    /// with fewer neighbors than a reply carries, and the id non-zero and free. Its ends are not moved in the
    /// degree index (the caller does).
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
        self.room_for_edge();
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
