//! The overlay graph: which peers are announced, who neighbors whom over which edge, and path finding.
//!
//! Pure and synchronous: no sockets, no clocks (callers pass `now`), randomness passed in, so every rule is
//! unit-tested here. The per-peer key is a type parameter `K` (the server uses the peer's `PublicKey`; tests use
//! `()`), because nothing in here looks at it.
//!
//! Rules:
//! * Edges are symmetric and each has its own random, non-zero, unique [`NeighborId`].
//! * A new identity is admitted only while its address and networks hold fewer live peers than the
//!   [`AdmissionLimits`] (none with `allow_same_ip`).
//! * A peer is topped up to the target degree (`target_degree`, raised to ⌈ln N⌉ for N peers unless
//!   `fixed_degree`) on every announce, choosing at random among live, non-avoided peers that are below the
//!   maximum degree, never itself, never a declared family member, and — unless `allow_same_ip` — never a peer on
//!   the same IP address. Candidates whose /16 (IPv6 /32) differs from the peer's and from every current
//!   neighbor's, on both sides, come first, then those still below the target degree (module `neighbors`).
//! * Paths never hold two hops of one /16 or one family (module `paths`).
//! * Peers silent for `expire_after` expire (the value when they last announced: a tracker that hands a large
//!   overlay a longer interval raises it, [`Graph::set_expire_after`]); their edges disappear from their
//!   neighbors, who are topped up again on their next announce.
//! * Avoided peers (a failed probe, or corroborated blame) are not used in new paths or new edges until they
//!   announce again; blamed peers are left out of their reporters' paths, and do not count toward the degree of
//!   their reporters (or, once corroborated, of anyone) for `blame_lasts` (modules `blame`, `neighbors`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anomos_proto::identity::Fingerprint;
use anomos_proto::ids::{ChainId, NeighborId};
use rand::seq::SliceRandom;
use rand::RngCore;

use crate::diversity::{AdmissionLimits, Census, Net, OverLimit};
pub use blame::{Blamers, Scope, BLAME_LASTS, CORROBORATING_REPORTERS, MAX_BLAMERS};
use fphash::{FpMap, FpSet};
pub use index::Dirty;
use index::Sampler;
pub use restore::Stored;

/// Node expansions one path request may spend in depth-first search.
const SEARCH_BUDGET: usize = 20_000;
/// Node expansions one target may take from that budget.
const TARGET_BUDGET: usize = 2_000;
/// Edges one path search's distance BFS may examine: a few milliseconds under the graph lock. Requests for up to
/// 4 relays stay well within it at 100,000 peers (degree 12: about 190,000 edges for 4); for 5 or 6 relays the
/// BFS ends early and the search works from the peers it reached (SPEC open issue 24).
const BFS_BUDGET: usize = 200_000;
/// Degree buckets of the degree index (the last also holds any higher degree).
const DEGREE_BUCKETS: usize = anomos_proto::tracker::MAX_NEIGHBORS + 1;

/// Most peers [`Graph::presize`] plans the tables for: past this they double as peers come (at this size, with
/// the default degrees, the planned edge table is 2²⁴ slots, about 1.3 GB).
pub const PRESIZE_PEERS: usize = 1 << 20;

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
    /// Silence after which a peer announcing (or restored) now expires.
    pub expire_after: Duration,
    /// Most live identities per address and network (all zero: unlimited).
    pub admission: AdmissionLimits,
    /// Keep `target_degree` whatever the overlay's size (otherwise it is raised to ⌈ln N⌉ for N peers).
    pub fixed_degree: bool,
    /// How long a reporter's blame of a peer lasts ([`BLAME_LASTS`] by default).
    pub blame_lasts: Duration,
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
    /// Live until then: its last announce plus the graph's `expire_after` at that announce.
    pub live_until: Instant,
    /// Left out of everyone's paths and given no new edges since a failed probe or the blame of
    /// [`CORROBORATING_REPORTERS`] reporters, until its next announce.
    pub avoided: bool,
    /// Left out of everyone's paths as a target (it may still relay) until then, since [`CORROBORATING_REPORTERS`]
    /// reporters blamed it for misbehaving as one ([`Scope::Target`]): for `blame_lasts`, or until its next
    /// announce to this instance. Kept by this process only: not stored, not shared with replicas (an announce to
    /// another replica does not end it here; time does).
    pub target_avoided_until: Option<Instant>,
    /// Fingerprints it declared as its operator's other peers (honoured when declared both ways).
    pub family: Vec<Fingerprint>,
    /// Requesters whose failure reports blamed it in the last `blame_lasts`: their own paths leave it out
    /// whenever they have another, and they do not count it as a neighbor (nor, once corroborated, does anyone).
    blamed_by: Blamers,
    edges: FpMap<Fingerprint, NeighborId>,
    /// Its /16 (IPv6 /32).
    prefix: Net,
    /// Loaded from the state database and not yet announced to this tracker process.
    pub restored: bool,
}

impl<K> Peer<K> {
    /// A peer with no edges yet (announced now, or restored from the state database).
    fn new(key: K, addr: SocketAddr, chains: Vec<ChainId>, family: Vec<Fingerprint>, now: Instant) -> Peer<K> {
        Peer {
            key,
            addr,
            chains,
            family,
            last_seen: now,
            live_until: now,
            avoided: false,
            target_avoided_until: None,
            blamed_by: Blamers::default(),
            edges: FpMap::default(),
            prefix: Net::diversity(addr.ip()),
            restored: false,
        }
    }

    /// Whether it is left out of everyone's paths as a target at `now`.
    pub fn avoided_as_target(&self, now: Instant) -> bool {
        self.target_avoided_until.is_some_and(|t| now < t)
    }

    /// Number of neighbors.
    pub fn degree(&self) -> usize {
        self.edges.len()
    }

    fn live(&self, now: Instant) -> bool {
        now <= self.live_until
    }
}

/// Whether `a` and `b` declared each other as family.
fn family(a_id: &Fingerprint, a: &Peer<impl Sized>, b_id: &Fingerprint, b: &Peer<impl Sized>) -> bool {
    a.family.contains(b_id) && b.family.contains(a_id)
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
    /// The announced address or its network holds as many live peers as admitted.
    OverLimit(OverLimit),
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
    /// The peer's first announce since it was restored from the state database.
    pub was_restored: bool,
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
    peers: FpMap<Fingerprint, Peer<K>>,
    /// Every edge by its id: the two ends.
    edges: HashMap<NeighborId, (Fingerprint, Fingerprint)>,
    /// Every peer once, for sampling candidates in O(1) each.
    all: Sampler,
    /// Peers by degree (bucket d: degree d), for drawing peers below the target degree in O(1).
    by_degree: Vec<Sampler>,
    /// Peers by the end of their liveness, soonest first: expiry looks at the silent ones only.
    expiry: BTreeSet<(Instant, Fingerprint)>,
    /// Changes not yet written to the state database (`None`: not collected).
    dirty: Option<Dirty>,
    /// Peers per address, network and /16.
    census: Census,
    /// Peers serving each chain (path finding checks its last hop against these, not the whole peer table).
    serving: HashMap<ChainId, FpSet<Fingerprint>>,
    /// The tables' planned sizes ([`presize`](Self::presize); zero: they grow by doubling).
    sizes: Sizes,
}

/// Planned sizes of the graph's tables (`crate::sizing`).
#[derive(Debug, Default, Clone, Copy)]
struct Sizes {
    /// Peers: the peer table, the peer sampler, each degree bucket and each chain's servers.
    peers: usize,
    /// Edges.
    edges: usize,
}

impl<K> Graph<K> {
    /// An empty graph.
    pub fn new(cfg: GraphConfig) -> Self {
        let census = Census::new(if cfg.allow_same_ip { AdmissionLimits::NONE } else { cfg.admission });
        Graph {
            cfg,
            peers: FpMap::default(),
            edges: HashMap::new(),
            all: Sampler::default(),
            by_degree: (0..DEGREE_BUCKETS).map(|_| Sampler::default()).collect(),
            expiry: BTreeSet::new(),
            dirty: None,
            census,
            serving: HashMap::new(),
            sizes: Sizes::default(),
        }
    }

    /// Target and maximum degree now: `target_degree` raised to ⌈ln N⌉ (unless `fixed_degree`), the maximum as
    /// far above it as configured, both within what one announce reply carries.
    pub fn degrees(&self) -> (usize, usize) {
        self.degrees_at(self.peers.len())
    }

    /// Target and maximum degree in an overlay of `n` peers.
    fn degrees_at(&self, n: usize) -> (usize, usize) {
        let cap = anomos_proto::tracker::MAX_NEIGHBORS;
        let slack = self.cfg.max_degree.saturating_sub(self.cfg.target_degree);
        let scaled = if self.cfg.fixed_degree { 0 } else { (n.max(1) as f64).ln().ceil() as usize };
        let target = self.cfg.target_degree.max(scaled).min(cap - slack.min(cap));
        (target, (target + slack).min(cap))
    }

    /// Distinct /16s (IPv6 /32s) among the peers.
    pub fn prefixes(&self) -> usize {
        self.census.prefixes()
    }

    /// Number of peers (live or not yet expired).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Number of edges.
    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    /// A peer, if known.
    pub fn get(&self, id: &Fingerprint) -> Option<&Peer<K>> {
        self.peers.get(id)
    }

    /// Whether `id` is known and still live (announced within the `expire_after` of its last announce).
    #[cfg(test)]
    pub fn is_live(&self, id: &Fingerprint, now: Instant) -> bool {
        self.peers.get(id).is_some_and(|p| p.live(now))
    }

    /// How long peers announcing (or restored) from now on stay live without announcing again: the tracker
    /// raises it with the interval it hands out. Peers keep the value of their last announce.
    pub fn set_expire_after(&mut self, expire_after: Duration) {
        self.cfg.expire_after = expire_after;
    }

    /// Records a successful (reachability-checked) announce without a family. See [`announce_with_family`].
    ///
    /// [`announce_with_family`]: Self::announce_with_family
    pub fn announce(
        &mut self,
        id: Fingerprint,
        key: K,
        addr: SocketAddr,
        chains: Vec<ChainId>,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Result<Announced, GraphError> {
        self.announce_with_family(id, key, addr, chains, Vec::new(), now, rng)
    }

    /// Whether a new identity (or a known one moving to another IP address) may be admitted at `ip` now. The
    /// announce checks again; this lets a caller refuse before costly work.
    pub fn admits(&self, id: &Fingerprint, ip: IpAddr) -> Result<(), GraphError> {
        match self.peers.get(id) {
            Some(p) if p.addr.ip() == ip => Ok(()),
            _ => self.census.check(ip).map_err(GraphError::OverLimit),
        }
    }

    /// Records a successful (reachability-checked) announce and tops the peer up to the target degree. A new
    /// identity, or a known one on a new IP address, must fit the admission limits.
    #[allow(clippy::too_many_arguments)]
    pub fn announce_with_family(
        &mut self,
        id: Fingerprint,
        key: K,
        addr: SocketAddr,
        chains: Vec<ChainId>,
        mut family: Vec<Fingerprint>,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Result<Announced, GraphError> {
        family.sort_unstable();
        family.dedup();
        family.retain(|f| *f != id);
        let old_chains = self.peers.get(&id).map(|p| p.chains.clone()).unwrap_or_default();
        let (is_new, addr_changed, was_avoided, was_restored) = match self.peers.get_mut(&id) {
            Some(p) => {
                let changed = p.addr != addr;
                if p.addr.ip() != addr.ip() {
                    let old = p.addr.ip();
                    self.census.remove(old);
                    if let Err(e) = self.census.check(addr.ip()) {
                        self.census.add(old);
                        return Err(GraphError::OverLimit(e));
                    }
                    self.census.add(addr.ip());
                }
                let Some(p) = self.peers.get_mut(&id) else { return Err(GraphError::UnknownPeer) };
                // An announce ends an avoidance (the peer is back; avoided peers are probed again first), not
                // the blame of single reporters (`blamed_by`).
                let was_avoided = p.avoided;
                let was_restored = std::mem::take(&mut p.restored);
                let stored_changed = changed || was_avoided || p.chains != chains || p.family != family;
                p.key = key;
                p.addr = addr;
                p.prefix = Net::diversity(addr.ip());
                p.chains = chains;
                p.family = family;
                p.avoided = false;
                p.target_avoided_until = None;
                self.set_seen(id, now);
                if stored_changed {
                    self.touch_peer(id);
                }
                (false, changed, was_avoided, was_restored)
            }
            None => {
                if self.peers.len() >= self.cfg.max_peers {
                    return Err(GraphError::Full);
                }
                self.census.check(addr.ip()).map_err(GraphError::OverLimit)?;
                self.census.add(addr.ip());
                let peer = Peer::new(key, addr, chains, family, now);
                self.room_for_peer();
                self.peers.insert(id, peer);
                self.index_peer(id);
                self.set_seen(id, now);
                self.touch_peer(id);
                (true, false, false, false)
            }
        };
        if let Some(p) = self.peers.get(&id) {
            if p.chains != old_chains {
                let new_chains = p.chains.clone();
                self.unlist(&id, &old_chains);
                for c in new_chains {
                    self.serve(c, id);
                }
            }
        }
        let added = self.top_up(id, now, rng);
        let degree = self.peers.get(&id).map_or(0, Peer::degree);
        Ok(Announced { is_new, addr_changed, was_avoided, was_restored, added, degree })
    }

    fn add_edge(&mut self, a: Fingerprint, b: Fingerprint, rng: &mut impl RngCore) -> NeighborId {
        let nid = loop {
            let n = NeighborId::random(rng);
            if !self.edges.contains_key(&n) {
                break n;
            }
        };
        self.link(a, b, nid);
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

    /// [`blame_in`](Self::blame_in) with [`Scope::Any`].
    pub fn blame(&mut self, id: &Fingerprint, reporter: Fingerprint, now: Instant) -> usize {
        self.blame_in(id, reporter, Scope::Any, now)
    }

    /// Records that `reporter` blamed `id` in a failure report at `now`: `id` is left out of `reporter`'s paths
    /// (or, for [`Scope::Target`], out of them as a target) for `blame_lasts`, whatever it announces meanwhile.
    /// Returns how many distinct reporters' blame of it in that scope is live (0 if unknown). At most
    /// [`MAX_BLAMERS`] are remembered; past that the count stays at the cap.
    pub fn blame_in(&mut self, id: &Fingerprint, reporter: Fingerprint, scope: Scope, now: Instant) -> usize {
        let lasts = self.cfg.blame_lasts;
        self.peers.get_mut(id).map_or(0, |p| p.blamed_by.add(reporter, scope, now, lasts))
    }

    /// Marks a peer as avoided as a target from `now` ([`Peer::target_avoided_until`]); returns whether it was
    /// known and neither avoided nor avoided as a target before.
    pub fn avoid_as_target(&mut self, id: &Fingerprint, now: Instant) -> bool {
        let lasts = self.cfg.blame_lasts;
        match self.peers.get_mut(id) {
            Some(p) if !p.avoided && !p.avoided_as_target(now) => {
                p.target_avoided_until = Some(now + lasts);
                true
            }
            _ => false,
        }
    }

    /// Marks a peer as avoided; returns whether it was known and not avoided before.
    pub fn avoid(&mut self, id: &Fingerprint) -> bool {
        match self.peers.get_mut(id) {
            Some(p) if !p.avoided => {
                p.avoided = true;
                self.touch_peer(*id);
                true
            }
            _ => false,
        }
    }

    /// Removes every peer silent for longer than the `expire_after` of its last announce, with its edges.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let dead: Vec<Fingerprint> =
            self.expiry.iter().take_while(|(until, _)| now > *until).map(|(_, fp)| *fp).collect();
        dead.into_iter().map(|id| Expired { id, edges: self.remove(&id) }).collect()
    }

    /// Takes `id` off the serving sets of `chains`.
    fn unlist(&mut self, id: &Fingerprint, chains: &[ChainId]) {
        for c in chains {
            if let Some(set) = self.serving.get_mut(c) {
                set.remove(id);
                if set.is_empty() {
                    self.serving.remove(c);
                }
            }
        }
    }

    fn remove(&mut self, id: &Fingerprint) -> usize {
        let Some(nids) = self.peers.get(id).map(|p| p.edges.values().copied().collect::<Vec<_>>()) else {
            return 0;
        };
        for nid in &nids {
            self.unlink(*nid);
        }
        let Some(peer) = self.peers.remove(id) else { return nids.len() };
        self.expiry.remove(&(peer.live_until, *id));
        self.unindex_peer(id, peer.degree());
        self.census.remove(peer.addr.ip());
        self.unlist(id, &peer.chains);
        self.touch_peer(*id);
        nids.len()
    }
}

mod blame;
mod fphash;
mod index;
mod neighbors;
mod paths;
mod replica;
mod restore;
#[cfg(test)]
mod tests;
