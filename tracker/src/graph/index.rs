//! The graph's indexes, kept up to date by every change so that no request has to scan the peer table: every
//! peer once and the peers of each degree (both sampled uniformly in O(1)), the edges, the expiry order, and the
//! set of changes not yet written to the state database. All edge changes go through [`Graph::link`] and
//! [`Graph::unlink`], which keep these consistent.

use super::*;

/// A set of fingerprints that can be sampled uniformly: insert, remove and draw are O(1).
#[derive(Debug, Default)]
pub(super) struct Sampler {
    pub(super) items: Vec<Fingerprint>,
    pub(super) pos: FpMap<Fingerprint, usize>,
    /// Members it jumps to when full past a sixteenth of them (`crate::sizing`; 0: it grows by doubling).
    sized_for: usize,
}

impl Sampler {
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Empties it, keeping its hasher and allocations.
    fn clear(&mut self) {
        self.items.clear();
        self.pos.clear();
    }

    fn reserve(&mut self, n: usize) {
        self.items.reserve(n);
        self.pos.reserve(n);
    }

    pub(super) fn insert(&mut self, fp: Fingerprint) {
        if !self.pos.contains_key(&fp) {
            if let Some(more) = crate::sizing::jump(self.pos.len(), self.pos.capacity(), self.sized_for) {
                // Refused address space leaves it doubling as it fills, as before.
                let _ = (self.pos.try_reserve(more), self.items.try_reserve(more));
            }
            self.pos.insert(fp, self.items.len());
            self.items.push(fp);
        }
    }

    pub(super) fn remove(&mut self, fp: &Fingerprint) {
        let Some(i) = self.pos.remove(fp) else { return };
        self.items.swap_remove(i);
        if let Some(moved) = self.items.get(i) {
            self.pos.insert(*moved, i);
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<Fingerprint> {
        self.items.get(i).copied()
    }

    pub(super) fn all(&self) -> &[Fingerprint] {
        &self.items
    }

    /// One member drawn uniformly.
    pub(super) fn draw(&self, rng: &mut impl RngCore) -> Option<Fingerprint> {
        if self.items.is_empty() {
            return None;
        }
        self.get((rng.next_u64() % self.items.len() as u64) as usize)
    }
}

/// Changes since the state database was last written (only collected once [`Graph::track_changes`] was called).
#[derive(Debug, Default)]
pub struct Dirty {
    /// Peers added, changed or removed.
    pub peers: HashSet<Fingerprint>,
    /// Edges added or removed.
    pub edges: HashSet<NeighborId>,
    /// The ends of the edges in `edges` that were linked or unlinked (a replica needs the ends of a removed edge
    /// to guard the change, `crate::replica`).
    pub ends: HashMap<NeighborId, (Fingerprint, Fingerprint)>,
}

impl<K> Graph<K> {
    /// Starts collecting the changes that [`take_changes`](Self::take_changes) hands out.
    pub fn track_changes(&mut self) {
        self.dirty = Some(Dirty::default());
    }

    /// The peers and edges changed since the last call (their current state is read with [`get`](Self::get)
    /// and [`edge_ends`](Self::edge_ends); gone means deleted).
    pub fn take_changes(&mut self) -> Dirty {
        match &mut self.dirty {
            Some(d) => std::mem::take(d),
            None => Dirty::default(),
        }
    }

    /// Marks `changes` as changed again (writing them failed).
    pub fn mark_changed(&mut self, changes: Dirty) {
        if let Some(d) = &mut self.dirty {
            d.peers.extend(changes.peers);
            d.edges.extend(changes.edges);
            d.ends.extend(changes.ends);
        }
    }

    pub(super) fn touch_peer(&mut self, id: Fingerprint) {
        if let Some(d) = &mut self.dirty {
            d.peers.insert(id);
        }
    }

    pub(super) fn touch_edge(&mut self, nid: NeighborId) {
        if let Some(d) = &mut self.dirty {
            d.edges.insert(nid);
        }
    }

    /// [`touch_edge`](Self::touch_edge) of an edge linked or unlinked between `a` and `b`.
    pub(super) fn touch_ends(&mut self, nid: NeighborId, a: Fingerprint, b: Fingerprint) {
        if let Some(d) = &mut self.dirty {
            d.edges.insert(nid);
            d.ends.insert(nid, (a, b));
        }
    }

    /// The degree bucket a degree is kept in.
    fn bucket(degree: usize) -> usize {
        degree.min(DEGREE_BUCKETS - 1)
    }

    /// Moves `id` from the bucket of `old` degree to that of its current degree.
    pub(super) fn rebucket(&mut self, id: &Fingerprint, old: usize) {
        let Some(new) = self.peers.get(id).map(Peer::degree) else { return };
        if Self::bucket(old) != Self::bucket(new) {
            if let Some(b) = self.by_degree.get_mut(Self::bucket(old)) {
                b.remove(id);
            }
            if let Some(b) = self.by_degree.get_mut(Self::bucket(new)) {
                b.insert(*id);
            }
        }
    }

    /// Rebuilds the degree index from every peer's degree, in the order of the peer index (after edges were
    /// added without it: [`Graph::restore_edges`]).
    pub(super) fn reindex_degrees(&mut self) {
        let Graph { all, by_degree, peers, .. } = self;
        by_degree.iter_mut().for_each(Sampler::clear);
        for id in all.all() {
            let degree = peers.get(id).map_or(0, Peer::degree);
            if let Some(b) = by_degree.get_mut(Self::bucket(degree)) {
                b.insert(*id);
            }
        }
    }

    /// Plans the tables' sizes for `max_peers` peers (at most [`PRESIZE_PEERS`]) at the maximum degree an overlay
    /// of that size has: each table jumps to its planned size, instead of doubling, once it is full at a sixteenth
    /// of it ([`crate::sizing`]). Reserves nothing now.
    pub fn presize(&mut self) {
        let n = self.cfg.max_peers.min(PRESIZE_PEERS);
        self.sizes = Sizes { peers: n, edges: n.saturating_mul(self.degrees_at(n).1) / 2 };
        self.all.sized_for = n;
        self.by_degree.iter_mut().for_each(|b| b.sized_for = n);
        self.census.size_for(n);
    }

    /// Room for one more peer in the peer table: a jump to its planned size rather than a doubling.
    pub(super) fn room_for_peer(&mut self) {
        if let Some(more) = crate::sizing::jump(self.peers.len(), self.peers.capacity(), self.sizes.peers) {
            // Refused address space leaves it doubling as it fills, as before.
            let _ = self.peers.try_reserve(more);
        }
    }

    /// Room for one more edge in the edge table (as [`room_for_peer`](Self::room_for_peer)).
    pub(super) fn room_for_edge(&mut self) {
        if let Some(more) = crate::sizing::jump(self.edges.len(), self.edges.capacity(), self.sizes.edges) {
            let _ = self.edges.try_reserve(more);
        }
    }

    /// Lists `id` among the servers of `chain` (its set jumps to the planned size of the peer table).
    pub(super) fn serve(&mut self, chain: ChainId, id: Fingerprint) {
        let set = self.serving.entry(chain).or_default();
        if let Some(more) = crate::sizing::jump(set.len(), set.capacity(), self.sizes.peers) {
            let _ = set.try_reserve(more);
        }
        set.insert(id);
    }

    /// Room for `peers` more peers and `edges` more edges without growing the tables one by one (a restart).
    pub fn reserve(&mut self, peers: usize, edges: usize) {
        self.peers.reserve(peers);
        self.all.reserve(peers);
        self.edges.reserve(edges);
    }

    /// Adds a peer to the peer and degree indexes (with its current degree).
    pub(super) fn index_peer(&mut self, id: Fingerprint) {
        let degree = self.peers.get(&id).map_or(0, Peer::degree);
        self.all.insert(id);
        if let Some(b) = self.by_degree.get_mut(Self::bucket(degree)) {
            b.insert(id);
        }
    }

    /// Takes a peer out of the peer and degree indexes.
    pub(super) fn unindex_peer(&mut self, id: &Fingerprint, degree: usize) {
        self.all.remove(id);
        if let Some(b) = self.by_degree.get_mut(Self::bucket(degree)) {
            b.remove(id);
        }
    }

    /// Records `id`'s announce time, and its liveness for the current `expire_after` in the expiry order.
    pub(super) fn set_seen(&mut self, id: Fingerprint, now: Instant) {
        // An `expire_after` too long for the clock (a replica's "never") is as good as forever.
        let until = now.checked_add(self.cfg.expire_after).unwrap_or_else(|| far_future(now));
        if let Some(p) = self.peers.get_mut(&id) {
            p.last_seen = now;
            let old = std::mem::replace(&mut p.live_until, until);
            self.expiry.remove(&(old, id));
        }
        self.expiry.insert((until, id));
    }

    /// Peers below `degree` neighbors, drawn uniformly, at most `n` draws (repeats possible).
    pub(super) fn draw_below(&self, degree: usize, n: usize, rng: &mut impl RngCore) -> Vec<Fingerprint> {
        let buckets = self.by_degree.get(..Self::bucket(degree)).unwrap_or(&[]);
        let total: usize = buckets.iter().map(Sampler::len).sum();
        if total == 0 {
            return Vec::new();
        }
        (0..n)
            .filter_map(|_| {
                let mut i = (rng.next_u64() % total as u64) as usize;
                for b in buckets {
                    if i < b.len() {
                        return b.get(i);
                    }
                    i -= b.len();
                }
                None
            })
            .collect()
    }

    /// Adds the edge `nid` between `a` and `b` (both known, not yet neighbors).
    pub(super) fn link(&mut self, a: Fingerprint, b: Fingerprint, nid: NeighborId) {
        self.room_for_edge();
        self.edges.insert(nid, (a, b));
        for (me, other) in [(a, b), (b, a)] {
            let Some(p) = self.peers.get_mut(&me) else { continue };
            let old = p.degree();
            p.edges.insert(other, nid);
            self.rebucket(&me, old);
        }
        self.touch_ends(nid, a, b);
    }

    /// Removes the edge `nid` from both its ends; returns them.
    pub(super) fn unlink(&mut self, nid: NeighborId) -> Option<(Fingerprint, Fingerprint)> {
        let (a, b) = self.edges.remove(&nid)?;
        for (me, other) in [(a, b), (b, a)] {
            let Some(p) = self.peers.get_mut(&me) else { continue };
            let old = p.degree();
            p.edges.remove(&other);
            self.rebucket(&me, old);
        }
        self.touch_ends(nid, a, b);
        Some((a, b))
    }

    /// The two ends of edge `nid`.
    pub fn edge_ends(&self, nid: NeighborId) -> Option<(Fingerprint, Fingerprint)> {
        self.edges.get(&nid).copied()
    }
}

/// The latest instant the clock can reach from `now` in one of a few steps (a century, a year, a day).
fn far_future(now: Instant) -> Instant {
    [36_500u64, 365, 1].iter().find_map(|days| now.checked_add(Duration::from_secs(days * 86_400))).unwrap_or(now)
}
