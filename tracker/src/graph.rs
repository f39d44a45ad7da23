//! The overlay graph: which peers are announced, who neighbors whom over which edge, and path finding.
//!
//! Pure and synchronous: no sockets, no clocks (callers pass `now`), randomness passed in, so every rule is
//! unit-tested here. The per-peer key is a type parameter `K` (the server uses the peer's `PublicKey`; tests use
//! `()`), because nothing in here looks at it.
//!
//! Rules:
//! * Edges are symmetric and each has its own random, non-zero, unique [`NeighborId`].
//! * A peer is topped up to `target_degree` neighbors on every announce, choosing at random among live,
//!   non-avoided peers that are below `max_degree`, never itself and — unless `allow_same_ip` — never a peer on
//!   the same IP address. Candidates still below the target degree are preferred, which keeps the graph even.
//! * Peers silent for `expire_after` expire; their edges disappear from their neighbors, who are topped up
//!   again on their next announce.
//! * Avoided peers (blamed by a failure report) are not used in new paths or new edges until they announce
//!   again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::{ChainId, NeighborId};
use rand::seq::SliceRandom;
use rand::RngCore;

/// Most reporters remembered per blamed peer (between two of its announces).
pub const MAX_BLAMERS: usize = 16;
/// Node expansions one path request may spend in depth-first search.
const SEARCH_BUDGET: usize = 20_000;
/// Node expansions one target may take from that budget.
const TARGET_BUDGET: usize = 2_000;

/// Limits and policy of the graph.
#[derive(Debug, Clone)]
pub struct GraphConfig {
    /// Neighbors each peer is topped up to.
    pub target_degree: usize,
    /// No peer gets more neighbors than this from other peers' top-ups.
    pub max_degree: usize,
    /// Whether two peers on one IP address may be neighbors.
    pub allow_same_ip: bool,
    /// Most peers kept.
    pub max_peers: usize,
    /// Silence after which a peer expires.
    pub expire_after: Duration,
}

/// One announced peer.
#[derive(Debug)]
pub struct Peer<K> {
    /// The peer's key (opaque here).
    pub key: K,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Chains it serves.
    pub chains: Vec<ChainId>,
    /// Time of its last successful announce.
    pub last_seen: Instant,
    /// Left out of everyone's paths since its last announce (a failed probe, or blamed by enough reporters).
    pub avoided: bool,
    /// Requesters whose failure reports blamed it since its last announce: their own paths leave it out.
    blamed_by: HashSet<Fingerprint>,
    edges: HashMap<Fingerprint, NeighborId>,
}

impl<K> Peer<K> {
    /// Number of neighbors.
    pub fn degree(&self) -> usize {
        self.edges.len()
    }

    fn live(&self, now: Instant, expire_after: Duration) -> bool {
        now.saturating_duration_since(self.last_seen) <= expire_after
    }
}

/// Why the graph refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphError {
    /// `max_peers` reached.
    Full,
    /// The peer is not announced (or has expired).
    UnknownPeer,
    /// No path could be found.
    NoPath,
}

/// What an announce changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// The peer was not known before.
    pub is_new: bool,
    /// The peer's listen address differs from its previous announce.
    pub addr_changed: bool,
    /// The peer had been avoided and is usable again.
    pub was_avoided: bool,
    /// Edges added by this announce.
    pub added: usize,
    /// The peer's degree afterwards.
    pub degree: usize,
}

/// A peer removed by [`Graph::expire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Who.
    pub id: Fingerprint,
    /// How many edges went with it.
    pub edges: usize,
}

/// The overlay graph.
#[derive(Debug)]
pub struct Graph<K> {
    cfg: GraphConfig,
    peers: HashMap<Fingerprint, Peer<K>>,
    /// Every edge by its id: the two ends.
    edges: HashMap<NeighborId, (Fingerprint, Fingerprint)>,
}

impl<K> Graph<K> {
    /// An empty graph.
    pub fn new(cfg: GraphConfig) -> Self {
        Graph { cfg, peers: HashMap::new(), edges: HashMap::new() }
    }

    /// Number of peers (live or not yet expired).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Number of edges.
    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    /// A peer, if known.
    pub fn get(&self, id: &Fingerprint) -> Option<&Peer<K>> {
        self.peers.get(id)
    }

    /// Whether `id` is known and has announced within `expire_after`.
    #[cfg(test)]
    pub fn is_live(&self, id: &Fingerprint, now: Instant) -> bool {
        self.peers.get(id).is_some_and(|p| p.live(now, self.cfg.expire_after))
    }

    /// Whether `id` may be used as a relay or target in `requester`'s paths now.
    fn usable_for(&self, id: &Fingerprint, requester: &Fingerprint, now: Instant) -> bool {
        self.peers
            .get(id)
            .is_some_and(|p| !p.avoided && !p.blamed_by.contains(requester) && p.live(now, self.cfg.expire_after))
    }

    /// Records a successful (reachability-checked) announce and tops the peer up to the target degree.
    pub fn announce(
        &mut self,
        id: Fingerprint,
        key: K,
        addr: SocketAddr,
        chains: Vec<ChainId>,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Result<Announced, GraphError> {
        let (is_new, addr_changed, was_avoided) = match self.peers.get_mut(&id) {
            Some(p) => {
                let changed = p.addr != addr;
                let was_avoided = p.avoided;
                p.key = key;
                p.addr = addr;
                p.chains = chains;
                p.last_seen = now;
                p.avoided = false;
                p.blamed_by.clear();
                (false, changed, was_avoided)
            }
            None => {
                if self.peers.len() >= self.cfg.max_peers {
                    return Err(GraphError::Full);
                }
                let peer = Peer {
                    key,
                    addr,
                    chains,
                    last_seen: now,
                    avoided: false,
                    blamed_by: HashSet::new(),
                    edges: HashMap::new(),
                };
                self.peers.insert(id, peer);
                (true, false, false)
            }
        };
        let added = self.top_up(id, now, rng);
        let degree = self.peers.get(&id).map_or(0, Peer::degree);
        Ok(Announced { is_new, addr_changed, was_avoided, added, degree })
    }

    /// Adds random edges until `id` has `target_degree` neighbors or no candidate is left.
    fn top_up(&mut self, id: Fingerprint, now: Instant, rng: &mut impl RngCore) -> usize {
        let Some(me) = self.peers.get(&id) else {
            return 0;
        };
        let have = me.degree();
        if have >= self.cfg.target_degree {
            return 0;
        }
        let my_ip = me.addr.ip();
        let mut candidates: Vec<(bool, Fingerprint)> = self
            .peers
            .iter()
            .filter(|(fp, p)| {
                **fp != id
                    && !me.edges.contains_key(*fp)
                    && !p.avoided
                    && p.live(now, self.cfg.expire_after)
                    && p.degree() < self.cfg.max_degree
                    && (self.cfg.allow_same_ip || p.addr.ip() != my_ip)
            })
            .map(|(fp, p)| (p.degree() >= self.cfg.target_degree, *fp))
            .collect();
        candidates.shuffle(rng);
        // Stable: peers still below the target degree first, each group in random order.
        candidates.sort_by_key(|(saturated, _)| *saturated);
        let want = self.cfg.target_degree - have;
        let chosen: Vec<Fingerprint> = candidates.into_iter().take(want).map(|(_, fp)| fp).collect();
        for other in &chosen {
            self.add_edge(id, *other, rng);
        }
        chosen.len() + self.split_edges_for(id, now, rng)
    }

    /// When every other peer is at the maximum degree, a newcomer would get few neighbors or one, and a peer
    /// with one neighbor hands that neighbor every circuit it starts. So, while `id` is at least two short of the
    /// target degree (and two more fit under the maximum), an edge A–B between usable peers that are not yet its
    /// neighbors is replaced by A–`id` and `id`–B: A and B keep their degree, `id` gains two. A and B drop their
    /// link when their next announce no longer lists each other. Returns the edges added.
    fn split_edges_for(&mut self, id: Fingerprint, now: Instant, rng: &mut impl RngCore) -> usize {
        let Some(me) = self.peers.get(&id) else { return 0 };
        let (target, max) = (self.cfg.target_degree, self.cfg.max_degree);
        if me.degree() + 2 > target || me.degree() + 2 > max {
            return 0;
        }
        let my_ip = me.addr.ip();
        let fits = |p: &Peer<K>| {
            !p.avoided && p.live(now, self.cfg.expire_after) && (self.cfg.allow_same_ip || p.addr.ip() != my_ip)
        };
        let mut splittable: Vec<(NeighborId, Fingerprint, Fingerprint)> = self
            .edges
            .iter()
            .filter(|(_, (a, b))| *a != id && *b != id)
            .filter(|(_, (a, b))| self.peers.get(a).is_some_and(fits) && self.peers.get(b).is_some_and(fits))
            .map(|(nid, (a, b))| (*nid, *a, *b))
            .collect();
        // HashMap order is not random enough to rely on: shuffle.
        splittable.shuffle(rng);
        let mut added = 0;
        for (nid, a, b) in splittable {
            let Some(me) = self.peers.get(&id) else { break };
            if me.degree() + 2 > target || me.degree() + 2 > max {
                break;
            }
            if me.edges.contains_key(&a) || me.edges.contains_key(&b) || !self.edges.contains_key(&nid) {
                continue;
            }
            self.edges.remove(&nid);
            if let Some(p) = self.peers.get_mut(&a) {
                p.edges.remove(&b);
            }
            if let Some(p) = self.peers.get_mut(&b) {
                p.edges.remove(&a);
            }
            self.add_edge(id, a, rng);
            self.add_edge(id, b, rng);
            added += 2;
        }
        added
    }

    fn add_edge(&mut self, a: Fingerprint, b: Fingerprint, rng: &mut impl RngCore) -> NeighborId {
        let nid = loop {
            let n = NeighborId::random(rng);
            if !self.edges.contains_key(&n) {
                break n;
            }
        };
        self.edges.insert(nid, (a, b));
        if let Some(p) = self.peers.get_mut(&a) {
            p.edges.insert(b, nid);
        }
        if let Some(p) = self.peers.get_mut(&b) {
            p.edges.insert(a, nid);
        }
        nid
    }

    /// The peer's neighbors: edge id, neighbor id and neighbor, sorted by neighbor id.
    pub fn neighbors(&self, id: &Fingerprint) -> Vec<(NeighborId, Fingerprint, &Peer<K>)> {
        let Some(me) = self.peers.get(id) else {
            return Vec::new();
        };
        let mut out: Vec<_> =
            me.edges.iter().filter_map(|(fp, nid)| self.peers.get(fp).map(|p| (*nid, *fp, p))).collect();
        out.sort_by_key(|(_, fp, _)| *fp);
        out
    }

    /// The edge between `a` and `b`, if they are neighbors.
    pub fn edge(&self, a: &Fingerprint, b: &Fingerprint) -> Option<NeighborId> {
        self.peers.get(a).and_then(|p| p.edges.get(b)).copied()
    }

    /// The other end of edge `nid`, if `id` is one of its ends.
    pub fn other_end(&self, id: &Fingerprint, nid: NeighborId) -> Option<Fingerprint> {
        match self.edges.get(&nid) {
            Some((a, b)) if a == id => Some(*b),
            Some((a, b)) if b == id => Some(*a),
            _ => None,
        }
    }

    /// Records that `reporter` blamed `id` in a failure report: `id` is left out of `reporter`'s paths until it
    /// announces again. Returns how many distinct reporters have blamed it since its last announce (0 if
    /// unknown). At most [`MAX_BLAMERS`] are remembered; past that the count stays at the cap.
    pub fn blame(&mut self, id: &Fingerprint, reporter: Fingerprint) -> usize {
        match self.peers.get_mut(id) {
            Some(p) => {
                if p.blamed_by.len() < MAX_BLAMERS {
                    p.blamed_by.insert(reporter);
                }
                p.blamed_by.len()
            }
            None => 0,
        }
    }

    /// Marks a peer as avoided; returns whether it was known and not avoided before.
    pub fn avoid(&mut self, id: &Fingerprint) -> bool {
        match self.peers.get_mut(id) {
            Some(p) if !p.avoided => {
                p.avoided = true;
                true
            }
            _ => false,
        }
    }

    /// Removes every peer silent for longer than `expire_after`, with its edges.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let dead: Vec<Fingerprint> =
            self.peers.iter().filter(|(_, p)| !p.live(now, self.cfg.expire_after)).map(|(fp, _)| *fp).collect();
        dead.into_iter().map(|id| Expired { id, edges: self.remove(&id) }).collect()
    }

    fn remove(&mut self, id: &Fingerprint) -> usize {
        let Some(peer) = self.peers.remove(id) else {
            return 0;
        };
        for (other, nid) in &peer.edges {
            self.edges.remove(nid);
            if let Some(o) = self.peers.get_mut(other) {
                o.edges.remove(id);
            }
        }
        peer.edges.len()
    }

    /// [`find_paths_preferring`](Self::find_paths_preferring) with no busy targets.
    #[cfg(test)]
    pub fn find_paths(
        &self,
        requester: &Fingerprint,
        chain: &ChainId,
        count: usize,
        relays: usize,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Result<Vec<Vec<Fingerprint>>, GraphError> {
        self.find_paths_preferring(requester, chain, count, relays, &HashSet::new(), now, rng)
    }

    /// Paths for a circuit request: up to `count` paths `[requester, r1, …, r_relays, target]` to distinct
    /// targets serving `chain`, consecutive nodes adjacent, no node twice, no avoided or expired node. Relays
    /// already used by an earlier path of the same request are avoided when another path exists.
    ///
    /// The targets in `busy` (those of the requester's circuits that may still be open,
    /// [`CircuitBook::targets_in_use`](crate::circuits::CircuitBook::targets_in_use)) are tried only after every
    /// other target: a replacement circuit goes to a target the requester is not already using whenever the
    /// graph has one, and to a busy one rather than none.
    #[allow(clippy::too_many_arguments)]
    pub fn find_paths_preferring(
        &self,
        requester: &Fingerprint,
        chain: &ChainId,
        count: usize,
        relays: usize,
        busy: &HashSet<Fingerprint>,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Result<Vec<Vec<Fingerprint>>, GraphError> {
        let me =
            self.peers.get(requester).filter(|p| p.live(now, self.cfg.expire_after)).ok_or(GraphError::UnknownPeer)?;
        if me.edges.is_empty() || relays == 0 || count == 0 {
            return Err(GraphError::NoPath);
        }
        // Lower bounds on the hop distance from the requester, through usable peers.
        let dist = self.distances_from(requester, relays + 1, now);
        let mut targets: Vec<Fingerprint> = self
            .peers
            .iter()
            .filter(|(fp, p)| *fp != requester && p.chains.contains(chain))
            .map(|(fp, _)| *fp)
            .filter(|fp| self.usable_for(fp, requester, now) && dist.get(fp).is_some_and(|d| *d <= relays + 1))
            .collect();
        targets.shuffle(rng);
        // Stable: random order within the free targets and within the busy ones.
        targets.sort_by_key(|fp| busy.contains(fp));

        let mut paths = Vec::new();
        let mut used: HashSet<Fingerprint> = HashSet::new();
        let mut budget = SEARCH_BUDGET;
        for target in targets {
            if paths.len() >= count || budget == 0 {
                break;
            }
            // First try relays not used by earlier paths of this request, then allow sharing them.
            let modes: &[bool] = if used.is_empty() { &[false] } else { &[true, false] };
            let mut found = None;
            for &strict in modes {
                let allowance = budget.min(TARGET_BUDGET);
                let mut search = Search { graph: self, requester, relays, dist: &dist, used: &used, budget: allowance };
                let mut rev = vec![target];
                let ok = search.dfs(&mut rev, strict, rng);
                budget -= allowance - search.budget;
                if ok {
                    found = Some(rev);
                    break;
                }
                if budget == 0 {
                    break;
                }
            }
            if let Some(mut rev) = found {
                rev.push(*requester);
                rev.reverse();
                used.extend(rev[1..rev.len() - 1].iter().copied());
                paths.push(rev);
            }
        }
        if paths.is_empty() {
            Err(GraphError::NoPath)
        } else {
            Ok(paths)
        }
    }

    /// Breadth-first hop distances from `from` (excluded as an intermediate) over peers usable in `from`'s
    /// paths, up to `max`.
    fn distances_from(&self, from: &Fingerprint, max: usize, now: Instant) -> HashMap<Fingerprint, usize> {
        let mut dist = HashMap::new();
        let mut queue = VecDeque::new();
        dist.insert(*from, 0);
        queue.push_back(*from);
        while let Some(n) = queue.pop_front() {
            let d = dist.get(&n).copied().unwrap_or(0);
            if d >= max {
                continue;
            }
            let Some(p) = self.peers.get(&n) else {
                continue;
            };
            for next in p.edges.keys() {
                if !dist.contains_key(next) && self.usable_for(next, from, now) {
                    dist.insert(*next, d + 1);
                    queue.push_back(*next);
                }
            }
        }
        dist
    }
}

/// One randomized depth-first search, from a target back towards the requester.
struct Search<'a, K> {
    graph: &'a Graph<K>,
    requester: &'a Fingerprint,
    relays: usize,
    dist: &'a HashMap<Fingerprint, usize>,
    /// Relays of earlier paths of the same request.
    used: &'a HashSet<Fingerprint>,
    budget: usize,
}

impl<K> Search<'_, K> {
    /// `rev` = `[target, r_k, …]`, built backwards. Returns true with `rev = [target, r_k, …, r_1]`.
    fn dfs(&mut self, rev: &mut Vec<Fingerprint>, strict: bool, rng: &mut impl RngCore) -> bool {
        let Some(last) = rev.last().copied() else {
            return false;
        };
        let chosen = rev.len() - 1;
        if chosen == self.relays {
            return self.graph.edge(&last, self.requester).is_some();
        }
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        let Some(peer) = self.graph.peers.get(&last) else {
            return false;
        };
        // The next node chosen is r_{k-chosen}; from it the requester is k-chosen hops away.
        let hops_left = self.relays - chosen;
        let mut next: Vec<Fingerprint> = peer
            .edges
            .keys()
            .filter(|n| {
                *n != self.requester
                    && !rev.contains(n)
                    && self.dist.get(n).is_some_and(|d| *d >= 1 && *d <= hops_left)
                    && !(strict && self.used.contains(n))
            })
            .copied()
            .collect();
        next.shuffle(rng);
        for n in next {
            rev.push(n);
            if self.dfs(rev, strict, rng) {
                return true;
            }
            rev.pop();
            if self.budget == 0 {
                return false;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(target: usize) -> GraphConfig {
        GraphConfig {
            target_degree: target,
            max_degree: target + 2,
            allow_same_ip: false,
            max_peers: 10_000,
            expire_after: Duration::from_secs(90),
        }
    }

    fn fp(i: usize) -> Fingerprint {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        Fingerprint(b)
    }

    /// Peer `i` on its own loopback IP.
    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 1, (i >> 8) as u8, i as u8], 8000))
    }

    fn chain() -> ChainId {
        ChainId::new("regtest").unwrap()
    }

    fn build(n: usize, target: usize, now: Instant, rng: &mut StdRng) -> Graph<()> {
        let mut g = Graph::new(cfg(target));
        // Two rounds: in the first, early peers find few others to pick.
        for _ in 0..2 {
            for i in 0..n {
                g.announce(fp(i), (), addr(i), vec![chain()], now, rng).unwrap();
            }
        }
        g
    }

    fn check_invariants(g: &Graph<()>) {
        let mut seen = HashSet::new();
        let mut count = 0;
        for (id, p) in &g.peers {
            assert!(!p.edges.contains_key(id), "self edge");
            assert!(p.degree() <= g.cfg.max_degree, "degree {} over cap", p.degree());
            for (other, nid) in &p.edges {
                assert_ne!(nid.0, 0);
                assert_eq!(g.edge(other, id), Some(*nid), "asymmetric edge");
                assert_eq!(g.other_end(id, *nid), Some(*other));
                seen.insert(*nid);
                count += 1;
            }
        }
        assert_eq!(count, 2 * g.edge_count());
        assert_eq!(seen.len(), g.edge_count(), "NeighborIds not unique");
    }

    fn check_path(g: &Graph<()>, path: &[Fingerprint], requester: &Fingerprint, relays: usize) {
        assert_eq!(path.len(), relays + 2);
        assert_eq!(&path[0], requester);
        let distinct: HashSet<_> = path.iter().collect();
        assert_eq!(distinct.len(), path.len(), "peer repeated in path");
        for w in path.windows(2) {
            assert!(g.edge(&w[0], &w[1]).is_some(), "consecutive nodes not adjacent");
        }
    }

    #[test]
    fn degree_targets_met_and_edges_symmetric() {
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        let g = build(50, 4, now, &mut rng);
        check_invariants(&g);
        for (id, p) in &g.peers {
            assert!(p.degree() >= 4, "{id:?} has degree {}", p.degree());
            assert!(p.degree() <= 6);
            for (nid, other, op) in g.neighbors(id) {
                assert_eq!(op.addr, g.peers[&other].addr);
                assert_eq!(g.edge(&other, id), Some(nid));
            }
        }
    }

    #[test]
    fn a_newcomer_to_a_saturated_graph_splits_edges_instead_of_getting_one_neighbor() {
        let mut rng = StdRng::seed_from_u64(11);
        let now = Instant::now();
        let mut g = build(8, 4, now, &mut rng);
        // Make every peer full: the circulant graph on 8 peers with offsets 1, 2, 3 (degree 6 = the maximum).
        g.edges.clear();
        for p in g.peers.values_mut() {
            p.edges.clear();
        }
        for i in 0..8 {
            for d in 1..=3 {
                g.add_edge(fp(i), fp((i + d) % 8), &mut rng);
            }
        }
        check_invariants(&g);
        let degrees_before: Vec<usize> = (0..8).map(|i| g.peers[&fp(i)].degree()).collect();
        assert!(degrees_before.iter().all(|d| *d == 6));

        let a = g.announce(fp(100), (), addr(100), vec![chain()], now, &mut rng).unwrap();
        assert_eq!(a.degree, 4, "the newcomer reaches the target degree");
        assert_eq!(a.added, 4);
        check_invariants(&g);
        let degrees_after: Vec<usize> = (0..8).map(|i| g.peers[&fp(i)].degree()).collect();
        assert_eq!(degrees_before, degrees_after, "split edges keep the others' degrees");
        assert_eq!(g.edge_count(), 24 - 2 + 4);
        // Its neighbors come in pairs that were neighbors and no longer are.
        let mine: Vec<Fingerprint> = g.neighbors(&fp(100)).iter().map(|(_, f, _)| *f).collect();
        let unlinked =
            mine.iter().flat_map(|x| mine.iter().map(move |y| (x, y))).filter(|(x, y)| x < y && g.edge(x, y).is_none());
        assert!(unlinked.count() >= 2);

        // A second announce changes nothing: it is at the target.
        let again = g.announce(fp(100), (), addr(100), vec![chain()], now, &mut rng).unwrap();
        assert_eq!((again.added, again.degree), (0, 4));
    }

    #[test]
    fn neighbor_ids_unique_across_many_edges() {
        let mut rng = StdRng::seed_from_u64(2);
        let g = build(300, 8, Instant::now(), &mut rng);
        check_invariants(&g);
        assert!(g.edge_count() >= 300 * 8 / 2);
    }

    #[test]
    fn small_graph_and_single_peer() {
        let mut rng = StdRng::seed_from_u64(3);
        let now = Instant::now();
        let mut g: Graph<()> = Graph::new(cfg(4));
        let a = g.announce(fp(0), (), addr(0), vec![], now, &mut rng).unwrap();
        assert!(a.is_new);
        assert_eq!(a.degree, 0);
        assert!(g.neighbors(&fp(0)).is_empty());
        // Three peers: everyone neighbors everyone, never itself.
        let g = build(3, 4, now, &mut rng);
        check_invariants(&g);
        for p in g.peers.values() {
            assert_eq!(p.degree(), 2);
        }
    }

    #[test]
    fn same_ip_rule() {
        let mut rng = StdRng::seed_from_u64(4);
        let now = Instant::now();
        let shared_ip = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut g: Graph<()> = Graph::new(cfg(4));
        for i in 0..5 {
            g.announce(fp(i), (), shared_ip(9000 + i as u16), vec![], now, &mut rng).unwrap();
        }
        assert_eq!(g.edge_count(), 0, "peers on one IP became neighbors");
        // A peer on another IP may neighbor them.
        g.announce(fp(9), (), addr(9), vec![], now, &mut rng).unwrap();
        assert_eq!(g.peers[&fp(9)].degree(), 4);

        let mut c = cfg(4);
        c.allow_same_ip = true;
        let mut g: Graph<()> = Graph::new(c);
        for _ in 0..2 {
            for i in 0..5 {
                g.announce(fp(i), (), shared_ip(9000 + i as u16), vec![], now, &mut rng).unwrap();
            }
        }
        check_invariants(&g);
        assert!(g.peers.values().all(|p| p.degree() == 4));
    }

    #[test]
    fn expiry_removes_edges_and_announce_repairs() {
        let mut rng = StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let mut g = build(20, 4, t0, &mut rng);
        let victim = fp(7);
        let victim_neighbors: Vec<Fingerprint> = g.neighbors(&victim).iter().map(|(_, f, _)| *f).collect();
        assert!(!victim_neighbors.is_empty());
        // Everyone but the victim announces again later.
        let t1 = t0 + Duration::from_secs(60);
        for i in (0..20).filter(|i| *i != 7) {
            g.announce(fp(i), (), addr(i), vec![chain()], t1, &mut rng).unwrap();
        }
        assert!(!g.is_live(&victim, t0 + Duration::from_secs(91)));
        assert!(g.is_live(&fp(0), t0 + Duration::from_secs(91)));
        let expired = g.expire(t0 + Duration::from_secs(91));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, victim);
        assert!(g.get(&victim).is_none());
        check_invariants(&g);
        for n in &victim_neighbors {
            assert!(g.edge(n, &victim).is_none());
        }
        // On their next announce the victim's former neighbors are topped up again.
        let t2 = t0 + Duration::from_secs(95);
        for n in &victim_neighbors {
            let i = (u64::from_be_bytes(n.0[..8].try_into().unwrap()) - 1) as usize;
            let a = g.announce(*n, (), addr(i), vec![chain()], t2, &mut rng).unwrap();
            assert!(a.degree >= 4, "not repaired: degree {}", a.degree);
        }
        check_invariants(&g);
        // Expired peers are never chosen as neighbors: let everyone but one go silent.
        let t3 = t2 + Duration::from_secs(1000);
        let a = g.announce(fp(100), (), addr(100), vec![], t3, &mut rng).unwrap();
        assert_eq!(a.degree, 0);
    }

    #[test]
    fn address_change_keeps_edges() {
        let mut rng = StdRng::seed_from_u64(6);
        let now = Instant::now();
        let mut g = build(10, 4, now, &mut rng);
        let before: Vec<_> = g.neighbors(&fp(3)).iter().map(|(n, f, _)| (*n, *f)).collect();
        let a = g.announce(fp(3), (), addr(203), vec![], now, &mut rng).unwrap();
        assert!(a.addr_changed && !a.is_new);
        let after: Vec<_> = g.neighbors(&fp(3)).iter().map(|(n, f, _)| (*n, *f)).collect();
        assert_eq!(before, after);
        let (_, other) = before[0];
        let seen = g.neighbors(&other).into_iter().find(|(_, f, _)| *f == fp(3)).unwrap();
        assert_eq!(seen.2.addr, addr(203));
    }

    #[test]
    fn paths_have_exact_relays_no_repeats_adjacent() {
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        let g = build(60, 4, now, &mut rng);
        for relays in 1..=6 {
            for r in 0..10 {
                let req = fp(r);
                let paths = g.find_paths(&req, &chain(), 4, relays, now, &mut rng).unwrap();
                assert!(!paths.is_empty());
                for p in &paths {
                    check_path(&g, p, &req, relays);
                }
            }
        }
    }

    #[test]
    fn circuits_go_to_distinct_targets_and_prefer_fresh_relays() {
        let mut rng = StdRng::seed_from_u64(8);
        let now = Instant::now();
        let mut g = build(40, 4, now, &mut rng);
        // Only some peers serve the chain.
        let other = ChainId::new("mainnet").unwrap();
        for i in 10..40 {
            g.announce(fp(i), (), addr(i), vec![other.clone()], now, &mut rng).unwrap();
        }
        let req = fp(0);
        let paths = g.find_paths(&req, &chain(), 16, 2, now, &mut rng).unwrap();
        let targets: HashSet<_> = paths.iter().map(|p| *p.last().unwrap()).collect();
        assert_eq!(targets.len(), paths.len(), "targets repeated");
        for p in &paths {
            check_path(&g, p, &req, 2);
            assert!(g.peers[p.last().unwrap()].chains.contains(&chain()));
            assert!(!p[1..].contains(&req));
        }
        // Relays of one request differ when the graph allows it: R has neighbors A and B, both adjacent to the
        // targets T1 and T2, so two one-relay circuits can (and must) use different relays.
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(100 + seed);
            let mut g: Graph<()> = Graph::new(cfg(0));
            let (r, a, b, t1, t2) = (fp(0), fp(1), fp(2), fp(3), fp(4));
            for i in 0..5 {
                let chains = if i >= 3 { vec![chain()] } else { vec![] };
                g.announce(fp(i), (), addr(i), chains, now, &mut rng).unwrap();
            }
            for (x, y) in [(r, a), (r, b), (a, t1), (a, t2), (b, t1), (b, t2)] {
                g.add_edge(x, y, &mut rng);
            }
            let paths = g.find_paths(&r, &chain(), 2, 1, now, &mut rng).unwrap();
            assert_eq!(paths.len(), 2);
            assert_ne!(paths[0][1], paths[1][1], "relay reused although a fresh one was available");
            // With only one relay available both circuits still get built, sharing it.
            g.avoid(&b);
            let paths = g.find_paths(&r, &chain(), 2, 1, now, &mut rng).unwrap();
            assert_eq!(paths.len(), 2);
            assert!(paths.iter().all(|p| p[1] == a));
        }
        // A chain nobody serves.
        let none = ChainId::new("nobody").unwrap();
        assert_eq!(g.find_paths(&req, &none, 1, 1, now, &mut rng), Err(GraphError::NoPath));
    }

    #[test]
    fn busy_targets_come_last() {
        let now = Instant::now();
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(200 + seed);
            let g = build(30, 4, now, &mut rng);
            let req = fp(0);
            let all: HashSet<_> = g
                .find_paths(&req, &chain(), 16, 1, now, &mut rng)
                .unwrap()
                .iter()
                .map(|p| *p.last().unwrap())
                .collect();
            assert!(all.len() >= 4, "too few targets reachable: {}", all.len());
            // All but one reachable target busy: a single replacement goes to the free one.
            let free = *all.iter().next().unwrap();
            let busy: HashSet<_> = all.iter().copied().filter(|t| *t != free).collect();
            let mut targets_seen = HashSet::new();
            for _ in 0..5 {
                let paths = g.find_paths_preferring(&req, &chain(), 1, 1, &busy, now, &mut rng).unwrap();
                targets_seen.insert(*paths[0].last().unwrap());
            }
            // Targets beyond one relay's reach are not in `all` and may be picked too; never a busy one.
            assert!(targets_seen.iter().all(|t| !busy.contains(t)), "a busy target was handed out: {targets_seen:?}");
            // Asking for more than the free targets: the free ones first, then busy ones rather than nothing.
            let paths = g.find_paths_preferring(&req, &chain(), 16, 1, &busy, now, &mut rng).unwrap();
            let got: Vec<_> = paths.iter().map(|p| *p.last().unwrap()).collect();
            let first_busy = got.iter().position(|t| busy.contains(t)).unwrap_or(got.len());
            assert!(got[first_busy..].iter().all(|t| busy.contains(t)), "free target after a busy one: {got:?}");
            assert!(!busy.contains(&got[0]));
            assert_eq!(got.iter().collect::<HashSet<_>>().len(), got.len(), "targets repeated");
        }
    }

    #[test]
    fn requester_rules() {
        let mut rng = StdRng::seed_from_u64(9);
        let now = Instant::now();
        let g = build(10, 3, now, &mut rng);
        assert_eq!(g.find_paths(&fp(99), &chain(), 1, 1, now, &mut rng), Err(GraphError::UnknownPeer));
        let late = now + Duration::from_secs(91);
        assert_eq!(g.find_paths(&fp(0), &chain(), 1, 1, late, &mut rng), Err(GraphError::UnknownPeer));
        // A peer alone in its graph has no neighbors, so no path.
        let mut lone: Graph<()> = Graph::new(cfg(3));
        lone.announce(fp(0), (), addr(0), vec![chain()], now, &mut rng).unwrap();
        assert_eq!(lone.find_paths(&fp(0), &chain(), 1, 1, now, &mut rng), Err(GraphError::NoPath));
        // The requester is never its own target even if it serves the chain.
        for _ in 0..20 {
            for p in g.find_paths(&fp(0), &chain(), 16, 1, now, &mut rng).unwrap() {
                assert_ne!(p.last(), Some(&fp(0)));
            }
        }
        // Path too long for the graph: 4 peers cannot give 4 distinct relays plus a target.
        let mut tiny: Graph<()> = Graph::new(cfg(3));
        for _ in 0..2 {
            for i in 0..4 {
                tiny.announce(fp(i), (), addr(i), vec![chain()], now, &mut rng).unwrap();
            }
        }
        assert_eq!(tiny.find_paths(&fp(0), &chain(), 1, 3, now, &mut rng), Err(GraphError::NoPath));
        assert!(tiny.find_paths(&fp(0), &chain(), 1, 2, now, &mut rng).is_ok());
    }

    #[test]
    fn avoided_peers_excluded_until_reannounce() {
        let mut rng = StdRng::seed_from_u64(10);
        let now = Instant::now();
        let mut g = build(12, 4, now, &mut rng);
        let bad = fp(5);
        assert!(g.avoid(&bad));
        assert!(!g.avoid(&bad), "second mark is a no-op");
        for _ in 0..50 {
            for r in [0, 1, 2] {
                if let Ok(paths) = g.find_paths(&fp(r), &chain(), 16, 2, now, &mut rng) {
                    for p in paths {
                        assert!(!p.contains(&bad), "avoided peer used");
                    }
                }
            }
        }
        // Nor is it given new neighbors.
        let bad_degree = g.get(&bad).unwrap().degree();
        for i in 50..60 {
            g.announce(fp(i), (), addr(i), vec![], now, &mut rng).unwrap();
            assert!(g.edge(&fp(i), &bad).is_none(), "avoided peer got a new edge");
        }
        assert_eq!(g.get(&bad).unwrap().degree(), bad_degree);
        // After it announces again it is used again.
        let a = g.announce(bad, (), addr(5), vec![chain()], now, &mut rng).unwrap();
        assert!(a.was_avoided);
        let mut used = false;
        for _ in 0..50 {
            for p in g.find_paths(&fp(0), &chain(), 16, 2, now, &mut rng).unwrap() {
                used |= p.contains(&bad);
            }
        }
        assert!(used, "re-announced peer never used");
    }

    #[test]
    fn large_graph_long_paths_within_budget() {
        let mut rng = StdRng::seed_from_u64(12);
        let now = Instant::now();
        let g = build(2000, 4, now, &mut rng);
        check_invariants(&g);
        let started = std::time::Instant::now();
        for r in 0..5 {
            let paths = g.find_paths(&fp(r), &chain(), 16, 6, now, &mut rng).unwrap();
            assert_eq!(paths.len(), 16);
            for p in &paths {
                check_path(&g, p, &fp(r), 6);
            }
        }
        // Generous even for an unoptimized build: the search is bounded, not exhaustive.
        assert!(started.elapsed() < Duration::from_secs(20), "path search took {:?}", started.elapsed());
    }

    #[test]
    fn capacity_limits() {
        let mut rng = StdRng::seed_from_u64(11);
        let now = Instant::now();
        let mut c = cfg(2);
        c.max_peers = 5;
        let mut g: Graph<()> = Graph::new(c);
        for i in 0..5 {
            g.announce(fp(i), (), addr(i), vec![], now, &mut rng).unwrap();
        }
        assert_eq!(g.announce(fp(5), (), addr(5), vec![], now, &mut rng), Err(GraphError::Full));
        // Known peers may still re-announce.
        assert!(g.announce(fp(0), (), addr(0), vec![], now, &mut rng).is_ok());
        // Expiry frees room.
        let later = now + Duration::from_secs(91);
        g.announce(fp(1), (), addr(1), vec![], later, &mut rng).unwrap();
        assert_eq!(g.expire(later).len(), 4);
        assert!(g.announce(fp(5), (), addr(5), vec![], later, &mut rng).is_ok());

        // Degree cap: a hub is never pushed over target + 2 by others' top-ups.
        let mut g: Graph<()> = Graph::new(cfg(3));
        g.announce(fp(0), (), addr(0), vec![], now, &mut rng).unwrap();
        for i in 1..40 {
            g.announce(fp(i), (), addr(i), vec![], now, &mut rng).unwrap();
        }
        check_invariants(&g);
        assert!(g.peers.values().all(|p| p.degree() <= 5));
    }
}
