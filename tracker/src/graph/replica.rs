//! Applying what the shared state of a replicated tracker holds (`crate::replica`): peers and edges set exactly as
//! stored, without top-ups, probes or admission checks (the instance that wrote them made those).

use super::*;

impl<K> Graph<K> {
    /// Sets a peer's stored fields, inserting it (live from `now`) if unknown. False when it is unknown and the
    /// graph is full. Unlike an announce it tops nobody up and keeps the peer's edges; unlike
    /// [`restore_peer`](Self::restore_peer) the peer is not marked restored (it announced to another instance).
    pub fn set_peer(&mut self, id: Fingerprint, stored: Stored<K>, now: Instant) -> bool {
        if !self.peers.contains_key(&id) {
            let ok = self.restore_peer(id, stored, now);
            if let Some(p) = self.peers.get_mut(&id) {
                p.restored = false;
            }
            return ok;
        }
        let Stored { key, addr, chains, family, avoided } = stored.normalized(&id);
        let Some(p) = self.peers.get_mut(&id) else { return false };
        let old_ip = p.addr.ip();
        let old_chains = std::mem::replace(&mut p.chains, chains.clone());
        p.key = key;
        p.addr = addr;
        p.prefix = Net::diversity(addr.ip());
        p.family = family;
        // Readmitted by an announce to another instance: this instance's live blame stands (it ends with time).
        p.avoided = avoided;
        if old_ip != addr.ip() {
            self.census.remove(old_ip);
            self.census.add(addr.ip());
        }
        if old_chains != chains {
            self.unlist(&id, &old_chains);
            for c in chains {
                self.serve(c, id);
            }
        }
        true
    }

    /// Removes a peer and its edges (its record left the shared state); returns the edges removed with it.
    pub fn remove_peer(&mut self, id: &Fingerprint) -> Vec<NeighborId> {
        let nids: Vec<NeighborId> = self.peers.get(id).map(|p| p.edges.values().copied().collect()).unwrap_or_default();
        self.remove(id);
        nids
    }

    /// Removes edge `nid` (it left the shared state); false if it was not here.
    pub fn unlink_edge(&mut self, nid: NeighborId) -> bool {
        self.unlink(nid).is_some()
    }

    /// Every edge with its ends (for checks across replicas).
    pub fn edge_list(&self) -> Vec<(NeighborId, Fingerprint, Fingerprint)> {
        self.edges.iter().map(|(nid, (a, b))| (*nid, *a, *b)).collect()
    }
}
