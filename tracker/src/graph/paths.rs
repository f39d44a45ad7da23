//! Path finding over the graph (SPEC §3.10 "Path selection").

use super::*;

impl<K> Graph<K> {
    /// [`find_paths_preferring`](Self::find_paths_preferring) with no busy targets.
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
    /// targets serving `chain`, consecutive nodes adjacent, no node twice, no avoided or expired node, no two
    /// nodes in one /16 (IPv6 /32) or one declared family. Relays already used by an earlier path of the same
    /// request are avoided when another path exists.
    ///
    /// When no such path exists, paths with one relay more are tried. When those fail too, and a usable serving
    /// peer is within `MAX_RELAYS + 1` hops at all, two longer lengths are tried, from the least that can reach
    /// the nearest one (at least two relays more than asked), never more than `MAX_RELAYS`: a requester whose
    /// near neighborhood holds only peers it blamed is not left with them, or with nothing, while a usable target
    /// is a few hops farther (SPEC open issue 23: seeds 100186, 100194, 110196 of the simulator). Only when that fails too, and the overlay cannot
    /// have prefix-diverse paths anyway (it spans fewer /16s than a path has nodes, or `allow_same_ip`), are hops
    /// in one /16 allowed. Families are always kept apart.
    ///
    /// Peers the requester blamed (its failure reports, for `blame_lasts`) are left out of all of that ([`Heed::All`]).
    /// When that finds nothing and left out a serving peer blamed as a whole (a refusal, a broken link:
    /// [`Scope::Any`]), all of it is tried again with blamed peers still left out as relays but such a peer allowed
    /// as the target ([`Heed::Relays`]);
    /// only when no path at all avoids them are blamed peers used again ([`Heed::None`]): a requester whose
    /// neighbors it all blamed during an outage is not cut off once they are back. (Without the middle round, a
    /// requester that blamed its one-relay neighbors for refusing and the nearest honest target for a link failure
    /// was given only paths through the relays that refused, while a path of two unblamed relays reached that
    /// target: simulator seed 4000079, SPEC open issue 30.)
    ///
    /// The targets in `busy` (those of the requester's circuits that may still be open,
    /// [`CircuitBook::targets_in_use`](crate::circuits::CircuitBook::targets_in_use)) are tried only after every
    /// other target at every length: a replacement circuit goes to a target the requester is not already using
    /// whenever the graph has one, over a longer path if need be, and to a busy one rather than none. (The busy
    /// targets used to go last only among the targets of one length: a requester whose only target at one relay
    /// stalled every circuit, which blames nobody, was given that target again and again while an honest one was
    /// two relays away; simulator seed 100186 with stalling serving peers.)
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
        let me = self.peers.get(requester).filter(|p| p.live(now)).ok_or(GraphError::UnknownPeer)?;
        if me.edges.is_empty() || relays == 0 || count == 0 {
            return Err(GraphError::NoPath);
        }
        let most = usize::from(anomos_proto::tracker::MAX_RELAYS);
        let longest = (relays + 1).min(most).max(relays);
        // A path of h relays has h + 2 nodes: with fewer /16s in the overlay it cannot keep them apart, and the
        // (costly, fruitless) attempt is skipped. Hops in one /16 are allowed only where the overlay itself has
        // too few /16s for the requested length, or under allow_same_ip.
        let prefixes = self.census.prefixes();
        let relaxable = self.cfg.allow_same_ip || prefixes < relays + 2;
        let attempts = |lengths: std::ops::RangeInclusive<usize>| -> Vec<(bool, usize)> {
            let apart = lengths.clone().filter(|h| prefixes >= h + 2).map(|h| (true, h));
            apart.chain(lengths.filter(|_| relaxable).map(|h| (false, h))).collect()
        };
        // What the requester's blame left out of the searches so far: a round that heeds less of it runs only if
        // it can find more (the middle one only if a serving peer blamed as a whole was left out).
        let mut left = LeftOut::default();
        // First without the busy targets (at every length), then with them, last among each length's targets.
        let busy_passes: &[bool] = if busy.is_empty() { &[true] } else { &[false, true] };
        for heed in [Heed::All, Heed::Relays, Heed::None] {
            match heed {
                Heed::Relays if !left.serving => continue,
                Heed::None if !left.any => break,
                _ => {}
            }
            for &with_busy in busy_passes {
                let excluded = if with_busy { None } else { Some(busy) };
                let mut tried = attempts(relays..=longest);
                // Longer paths only when these gave nothing, and only if a usable target is in reach at all: from
                // the least length that can reach the nearest one (paths of h relays reach h + 1 hops), two lengths.
                let farther = |g: &Self, left: &mut LeftOut| match g
                    .nearest_target(requester, chain, heed, !relaxable, excluded, now, left)
                {
                    Some(d) => {
                        let from = (longest + 1).max(d.saturating_sub(1));
                        attempts(from..=(from + 1).min(most))
                    }
                    None => Vec::new(),
                };
                let mut extended = false;
                while let Some((apart, hops)) = (!tried.is_empty()).then(|| tried.remove(0)) {
                    let (paths, skipped) =
                        self.search(requester, chain, count, hops, busy, with_busy, apart, heed, now, rng);
                    left.add(skipped);
                    if !paths.is_empty() && paths.len() < count && !with_busy {
                        // Fewer free targets than asked for at this length: the busy ones make up the rest (the
                        // search takes the free ones first).
                        let (more, _) = self.search(requester, chain, count, hops, busy, true, apart, heed, now, rng);
                        return Ok(if more.len() > paths.len() { more } else { paths });
                    }
                    if !paths.is_empty() {
                        return Ok(paths);
                    }
                    if tried.is_empty() && !extended {
                        extended = true;
                        tried = farther(self, &mut left);
                    }
                }
            }
        }
        Err(GraphError::NoPath)
    }

    /// The hop distance from `requester` to the nearest peer serving `chain` that its paths may use (over usable
    /// peers, as [`distances_from`](Self::distances_from); not in the requester's /16 when `apart`), if it is at
    /// most `MAX_RELAYS + 1`. The breadth-first search stops at the first level holding one, or after
    /// [`SEARCH_BUDGET`] edges examined: what a request costs stays bounded when the chain is served only far away
    /// or not at all (and in a large overlay, at degree 10–12, that budget ends the search within 4 hops).
    /// Serving peers it passed over for the requester's blame are recorded in `left`.
    #[allow(clippy::too_many_arguments)]
    fn nearest_target(
        &self,
        requester: &Fingerprint,
        chain: &ChainId,
        heed: Heed,
        apart: bool,
        excluded: Option<&HashSet<Fingerprint>>,
        now: Instant,
        left: &mut LeftOut,
    ) -> Option<usize> {
        let serving = self.serving.get(chain)?;
        let max = usize::from(anomos_proto::tracker::MAX_RELAYS) + 1;
        let mut seen: FpSet<Fingerprint> = FpSet::default();
        seen.insert(*requester);
        let mut level = vec![*requester];
        let mut budget = SEARCH_BUDGET;
        for d in 1..=max {
            let mut next = Vec::new();
            for n in &level {
                let Some(p) = self.peers.get(n) else { continue };
                for fp in p.edges.keys() {
                    if budget == 0 {
                        return None;
                    }
                    budget -= 1;
                    if !seen.insert(*fp) {
                        continue;
                    }
                    let Some(q) = self.peers.get(fp) else { continue };
                    if q.avoided || !q.live(now) {
                        continue;
                    }
                    let blamed = heed.shuns_blamed_relays() && q.blamed_by.by(requester, now);
                    if serving.contains(fp)
                        && !excluded.is_some_and(|x| x.contains(fp))
                        && self.may_share_path(fp, requester, apart)
                    {
                        if self.may_target(q, requester, heed, now) {
                            return Some(d);
                        }
                        left.serving |= blamed && !q.blamed_by.as_target_only_by(requester, now);
                    }
                    if blamed {
                        left.any = true;
                    } else {
                        next.push(*fp);
                    }
                }
            }
            level = next;
        }
        None
    }

    /// Whether `q`, usable in `requester`'s paths, may also be their target: not avoided as one, and not blamed by
    /// `requester` in a way `heed` heeds for targets: under [`Heed::All`] any blame (its [`Scope::Target`] blame
    /// leaves `q` a relay), under [`Heed::Relays`] its [`Scope::Target`] blame only (for serving bad data).
    fn may_target(&self, q: &Peer<K>, requester: &Fingerprint, heed: Heed, now: Instant) -> bool {
        let blamed = match heed {
            Heed::All => q.blamed_by.as_target_by(requester, now),
            Heed::Relays => q.blamed_by.as_target_only_by(requester, now),
            Heed::None => false,
        };
        !(q.avoided_as_target(now) || blamed)
    }

    /// Whether `a` and `b` may both be on one path: not one family, and (if `apart`) not in one /16.
    fn may_share_path(&self, a: &Fingerprint, b: &Fingerprint, apart: bool) -> bool {
        match (self.peers.get(a), self.peers.get(b)) {
            (Some(pa), Some(pb)) => !(family(a, pa, b, pb) || (apart && pa.prefix == pb.prefix)),
            _ => false,
        }
    }

    /// One attempt of [`find_paths_preferring`](Self::find_paths_preferring) with exactly `relays` relays; the
    /// targets in `busy` come last, or (without `with_busy`) not at all.
    #[allow(clippy::too_many_arguments)]
    fn search(
        &self,
        requester: &Fingerprint,
        chain: &ChainId,
        count: usize,
        relays: usize,
        busy: &HashSet<Fingerprint>,
        with_busy: bool,
        apart: bool,
        heed: Heed,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> (Vec<Vec<Fingerprint>>, LeftOut) {
        // Lower bounds on the hop distance from the requester, through usable peers. Targets are taken from
        // them, so a request costs what the requester's neighborhood holds, not what the overlay holds.
        let Some(serving) = self.serving.get(chain) else { return (Vec::new(), LeftOut::default()) };
        let (dist, frontier, mut skipped) = self.distances_from(requester, relays + 1, serving, heed, now, BFS_BUDGET);
        // The candidates, in random order (HashMap order is not random: sort, then shuffle), the busy ones last
        // (stable: random order within each). Whether one may be a target is checked only when its turn comes: a
        // request costs the candidates it examines, not the few thousand in a 3-hop ball at 100,000 peers.
        let mut targets: Vec<Fingerprint> =
            dist.iter().filter(|(fp, d)| **d >= 1 && *fp != requester).map(|(fp, _)| *fp).collect();
        targets.extend(frontier);
        targets.sort_unstable();
        targets.dedup();
        targets.shuffle(rng);
        targets.sort_by_key(|fp| busy.contains(fp));
        // Whether `fp` may be this path's target; records a candidate left out for the requester's blame only
        // (a later round that heeds less of it may use it).
        let usable = |fp: &Fingerprint, skipped: &mut LeftOut| {
            if !serving.contains(fp) {
                return false;
            }
            let Some(q) = self.peers.get(fp) else { return false };
            if !dist.contains_key(fp) && !self.last_level_usable(q, requester, heed, now, skipped) {
                return false;
            }
            if !self.may_share_path(fp, requester, apart) {
                return false;
            }
            let ok = self.may_target(q, requester, heed, now);
            skipped.any |= !ok && !q.avoided_as_target(now);
            ok
        };
        let mut paths = Vec::new();
        let mut used: HashSet<Fingerprint> = HashSet::new();
        let mut budget = SEARCH_BUDGET;
        let mut targets = targets.into_iter();
        for target in targets.by_ref() {
            // Without the busy targets, the search ends at the first (they come last); it still counts for blame.
            let excluded = !with_busy && busy.contains(&target);
            let ok = usable(&target, &mut skipped);
            if excluded {
                break;
            }
            if !ok {
                continue;
            }
            // First try relays not used by earlier paths of this request, then allow sharing them.
            let modes: &[bool] = if used.is_empty() { &[false] } else { &[true, false] };
            let mut found = None;
            for &strict in modes {
                let allowance = budget.min(TARGET_BUDGET);
                let mut search = Search {
                    graph: self,
                    requester,
                    relays,
                    dist: &dist,
                    used: &used,
                    apart,
                    shun_blamed: (heed == Heed::Relays).then_some(now),
                    budget: allowance,
                };
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
                used.extend(rev.get(1..rev.len().saturating_sub(1)).into_iter().flatten().copied());
                paths.push(rev);
            }
            if paths.len() >= count || budget == 0 {
                break;
            }
        }
        // Short of paths: what the candidates not examined (busy ones included) would have told about the
        // requester's blame, as when every candidate was checked first.
        if paths.len() < count {
            for target in targets {
                usable(&target, &mut skipped);
            }
        }
        (paths, skipped)
    }

    /// Breadth-first hop distances from `from` (excluded as an intermediate) over peers usable in `from`'s
    /// paths, below `max`, examining at most `budget` edges (a search passes [`BFS_BUDGET`]). Peers at distance
    /// `max` can only be targets: they are returned unchecked, as a frontier (with repeats, and with peers that
    /// have a distance or were left out lower down), for [`last_level_usable`](Self::last_level_usable) to check
    /// when one is tried. So the search touches the peers within `max - 1` hops and their edges, not the whole
    /// `max`-hop ball. Peers `from` blamed are not usable unless `heed` is [`Heed::None`] (under [`Heed::Relays`]
    /// a blamed serving peer gets its distance, as a target only: nothing is reached through it, and the search
    /// does not take it as a relay); what is returned with the distances says whether blame left any out, and any
    /// serving one (of the levels below `max`).
    pub(super) fn distances_from(
        &self,
        from: &Fingerprint,
        max: usize,
        serving: &FpSet<Fingerprint>,
        heed: Heed,
        now: Instant,
        mut budget: usize,
    ) -> (FpMap<Fingerprint, usize>, Vec<Fingerprint>, LeftOut) {
        let mut skipped = LeftOut::default();
        let mut dist = FpMap::default();
        let mut frontier = Vec::new();
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
            // Out of budget: the distances found so far are exact (breadth first), only fewer peers have one.
            if budget < p.edges.len() {
                break;
            }
            budget -= p.edges.len();
            if d + 1 == max {
                // The last level: its peers can only be targets, so they are checked when tried as one.
                frontier.extend(p.edges.keys().filter(|n| !dist.contains_key(*n)).copied());
                continue;
            }
            for next in p.edges.keys() {
                if dist.contains_key(next) {
                    continue;
                }
                let Some(q) = self.peers.get(next) else { continue };
                let blamed = heed.shuns_blamed_relays() && q.blamed_by.by(from, now);
                skipped.any |= blamed;
                if q.avoided || !q.live(now) {
                    continue;
                }
                if blamed && heed == Heed::All && serving.contains(next) && !q.blamed_by.as_target_only_by(from, now) {
                    skipped.serving = true;
                }
                if !blamed {
                    dist.insert(*next, d + 1);
                    queue.push_back(*next);
                } else if heed == Heed::Relays && serving.contains(next) {
                    dist.insert(*next, d + 1);
                }
            }
        }
        (dist, frontier, skipped)
    }

    /// Whether `q`, a peer of the last level of [`distances_from`](Self::distances_from) `from` (its frontier),
    /// may be a target there: what the search would have checked on reaching it, with the same record of what
    /// the requester's blame left out.
    fn last_level_usable(
        &self,
        q: &Peer<K>,
        from: &Fingerprint,
        heed: Heed,
        now: Instant,
        skipped: &mut LeftOut,
    ) -> bool {
        let blamed = heed.shuns_blamed_relays() && q.blamed_by.by(from, now);
        skipped.any |= blamed;
        if q.avoided || !q.live(now) {
            return false;
        }
        if blamed && heed == Heed::All && !q.blamed_by.as_target_only_by(from, now) {
            skipped.serving = true;
        }
        !blamed || heed == Heed::Relays
    }
}

/// How much of a requester's blame a round of [`Graph::find_paths_preferring`] heeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heed {
    /// Peers it blamed are neither relays nor targets (those it blamed as targets only, [`Scope::Target`], may
    /// relay).
    All,
    /// Peers it blamed are not relays; one it blamed as a whole ([`Scope::Any`]: a refusal, a broken link) may be
    /// the target, one it blamed as a target ([`Scope::Target`]: bad data) may not.
    Relays,
    /// Its blame is ignored.
    None,
}

/// What a requester's blame left out of a search.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LeftOut {
    /// Some peer: a round that heeds less blame may find more.
    any: bool,
    /// A serving peer blamed as a whole, left out under [`Heed::All`]: a [`Heed::Relays`] round may take it as a
    /// target.
    serving: bool,
}

impl LeftOut {
    fn add(&mut self, other: LeftOut) {
        self.any |= other.any;
        self.serving |= other.serving;
    }
}

impl Heed {
    /// Whether peers the requester blamed ([`Scope::Any`]) are left out as relays.
    fn shuns_blamed_relays(self) -> bool {
        self != Heed::None
    }
}

/// One randomized depth-first search, from a target back towards the requester.
struct Search<'a, K> {
    graph: &'a Graph<K>,
    requester: &'a Fingerprint,
    relays: usize,
    dist: &'a FpMap<Fingerprint, usize>,
    /// Relays of earlier paths of the same request.
    used: &'a HashSet<Fingerprint>,
    /// Keep hops in distinct /16s.
    apart: bool,
    /// Under [`Heed::Relays`] only, the time at which the requester's blame leaves a peer out as a relay (the
    /// distances hold blamed serving peers, as targets; under [`Heed::All`] they hold no blamed peer at all).
    shun_blamed: Option<Instant>,
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
                    && !self
                        .shun_blamed
                        .is_some_and(|now| self.graph.peers.get(n).is_some_and(|q| q.blamed_by.by(self.requester, now)))
            })
            .copied()
            .collect();
        // HashMap order is not random: sort, then shuffle.
        next.sort_unstable();
        next.shuffle(rng);
        for n in next {
            // Checked only for the candidates actually tried (the search usually stops at the first).
            if !self.graph.may_share_path(&n, self.requester, self.apart)
                || !rev.iter().all(|r| self.graph.may_share_path(&n, r, self.apart))
            {
                continue;
            }
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
