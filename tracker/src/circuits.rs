//! Issuing circuits: turning paths into tracking codes and grants, and remembering what was issued so that a
//! failure report can be traced back to the peer to avoid.
//!
//! Issuing is split in two so the graph lock is held only briefly: [`plan`] (under the lock: edges, keys,
//! fresh secrets and handles) and [`Plan::build`] (no lock: the RSA-OAEP work of [`anomos_proto::tc::build`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use anomos_proto::cell::{BreakReason, DenyReason};
use anomos_proto::crypto::Secret;
use anomos_proto::identity::{Fingerprint, PublicKey};
use anomos_proto::ids::{ChainId, NeighborId, SessionId};
use anomos_proto::tc::{self, HopSpec, Layer, LayerKind};
use anomos_proto::tracker::{CircuitGrant, FailureKind};
use rand::{CryptoRng, Rng, RngCore};

use crate::graph::Graph;

/// Most seconds a layer's expiry is moved earlier than the nominal one (see `plan_one`).
pub const EXPIRY_JITTER: u64 = 20;

/// How long a circuit is remembered after its tracking code expires (late failure reports still count).
pub const REMEMBER_AFTER_EXPIRY: Duration = Duration::from_secs(600);

/// What the tracker remembers about one issued circuit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitRecord {
    /// Who asked for it (only that peer's reports about it count).
    pub requester: Fingerprint,
    /// The hops in path order: relays, then the target.
    pub hops: Vec<Fingerprint>,
    /// Each hop's replay tag, in the same order.
    pub tags: Vec<[u8; 16]>,
    /// When the record may be forgotten.
    pub forget_at: Instant,
}

impl CircuitRecord {
    /// The peer a circuit failure report blames, or why it blames nobody.
    pub fn blame(&self, kind: FailureKind, hop_tag: Option<[u8; 16]>) -> Result<Fingerprint, &'static str> {
        let tagged = || -> Result<usize, &'static str> {
            let tag = hop_tag.ok_or("no hop tag")?;
            self.tags.iter().position(|t| *t == tag).ok_or("hop tag not on this circuit")
        };
        let hop = |i: usize| self.hops.get(i).copied().ok_or("the blamed hop is past the target");
        match kind {
            FailureKind::Misbehaving => self.hops.last().copied().ok_or("empty path"),
            // Each reason names its culprit explicitly (SPEC §3.10, open issue 6).
            FailureKind::CircuitDenied(code) => match DenyReason::from_code(code) {
                // Refused unpeeled, so without a tag: every relay passes such a refusal back as `next-refused`
                // with its own tag, so an untagged one reaching the requester came from its first hop.
                DenyReason::CircuitLimit if hop_tag.is_none() => hop(0),
                // The hop refused for itself: it is full, or it does not serve the chain it announced.
                DenyReason::CircuitLimit | DenyReason::NoSuchChain => hop(tagged()?),
                // The tagged relay's successor refused unpeeled (it was full or over its OPEN rate).
                DenyReason::NextRefused => {
                    let i = tagged()?;
                    if i + 1 >= self.hops.len() {
                        return Err("the target claims a refusal by its successor");
                    }
                    hop(i + 1)
                }
                // The hop could not reach its successor: the successor is suspect (and gets probed).
                DenyReason::NoSuchNeighbor => hop(tagged()? + 1),
                // A timeout is not attributable: every hop waits on the same downstream, and the hop nearest the
                // requester always gives up first. Blaming it would let a stalling target get honest relays avoided.
                DenyReason::Timeout => Err("timeouts are not attributable to a hop"),
                // Expired, replayed, wrong link, a bad layer: the refusal protects the hop, and the fault is the
                // TC's or an upstream hop's, which the DENY cannot say.
                _ => Err("a refusal that blames nobody"),
            },
            FailureKind::CircuitBroken(code) => match BreakReason::from_code(code) {
                // The tagged hop saw its link to the next hop fail: blame the peer across that link. (A BREAK
                // reaches the requester only from downstream, so this is the tagged hop's out-link.)
                // Without a tag the BREAK came from no hop: the requester's own link to the first hop failed (it
                // reports that untagged), so the first hop is the suspect.
                BreakReason::LinkFailed if hop_tag.is_none() => hop(0),
                BreakReason::LinkFailed => hop(tagged()? + 1).map_err(|_| "the target reported its own link failed"),
                // Protocol and resource failures can come from either side of the tagged hop, and shutdown and
                // timeout from no fault: the BREAK does not say which neighbor caused them.
                _ => Err("a break that names no direction"),
            },
            FailureKind::NeighborUnreachable => Err("not a circuit failure"),
        }
    }
}

/// Issued circuits by handle, bounded: the oldest is forgotten first.
#[derive(Debug)]
pub struct CircuitBook {
    max: usize,
    records: HashMap<u64, CircuitRecord>,
    /// Handles in issue order (so also in `forget_at` order).
    order: VecDeque<u64>,
    /// Remembered handles by requester, with their targets counted.
    by_requester: HashMap<Fingerprint, RequesterIndex>,
}

/// One requester's remembered circuits: their handles, and how many of them end at each target, kept up to date
/// on every insert and forget so that [`CircuitBook::targets_in_use`] costs O(distinct targets), not O(circuits):
/// a requester that asked for 10,000 circuits used to make every further request walk all of them.
#[derive(Debug, Default)]
struct RequesterIndex {
    handles: HashSet<u64>,
    targets: HashMap<Fingerprint, usize>,
}

impl CircuitBook {
    /// An empty book holding at most `max` circuits.
    pub fn new(max: usize) -> Self {
        CircuitBook { max: max.max(1), records: HashMap::new(), order: VecDeque::new(), by_requester: HashMap::new() }
    }

    /// Number of remembered circuits.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// A random non-zero handle not in use.
    pub fn fresh_handle(&self, rng: &mut impl RngCore, also_taken: &[u64]) -> u64 {
        loop {
            let h = rng.next_u64();
            if h != 0 && !self.records.contains_key(&h) && !also_taken.contains(&h) {
                return h;
            }
        }
    }

    /// Remembers a circuit, forgetting the oldest if full.
    pub fn insert(&mut self, handle: u64, record: CircuitRecord) {
        while self.records.len() >= self.max {
            match self.order.pop_front() {
                Some(old) => self.forget(old),
                None => break,
            }
        }
        let (requester, target) = (record.requester, record.hops.last().copied());
        match self.records.insert(handle, record) {
            None => self.order.push_back(handle),
            Some(old) => self.unindex(&old, handle),
        }
        let idx = self.by_requester.entry(requester).or_default();
        if idx.handles.insert(handle) {
            if let Some(t) = target {
                *idx.targets.entry(t).or_default() += 1;
            }
        }
    }

    /// Removes `handle` (whose record was `record`) from its requester's index.
    fn unindex(&mut self, record: &CircuitRecord, handle: u64) {
        let Some(idx) = self.by_requester.get_mut(&record.requester) else { return };
        if idx.handles.remove(&handle) {
            if let Some(t) = record.hops.last() {
                if let Some(n) = idx.targets.get_mut(t) {
                    *n -= 1;
                    if *n == 0 {
                        idx.targets.remove(t);
                    }
                }
            }
        }
        if idx.handles.is_empty() {
            self.by_requester.remove(&record.requester);
        }
    }

    fn forget(&mut self, handle: u64) {
        if let Some(r) = self.records.remove(&handle) {
            self.unindex(&r, handle);
        }
    }

    /// Targets of the circuits issued to `requester` that may still be open: those still remembered (until
    /// their tracking code's expiry plus [`REMEMBER_AFTER_EXPIRY`]). The tracker does not see circuits end, so
    /// this over-approximates (a failed circuit's target stays in until forgotten); it is used as a preference
    /// only (see [`Graph::find_paths_preferring`]).
    pub fn targets_in_use(&self, requester: &Fingerprint) -> HashSet<Fingerprint> {
        self.by_requester.get(requester).map(|idx| idx.targets.keys().copied().collect()).unwrap_or_default()
    }

    /// The record of `handle`.
    pub fn get(&self, handle: u64) -> Option<&CircuitRecord> {
        self.records.get(&handle)
    }

    /// Forgets records whose time is up; returns how many.
    pub fn prune(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(h) = self.order.front().copied() {
            match self.records.get(&h) {
                Some(r) if r.forget_at > now => break,
                Some(_) => {
                    self.forget(h);
                    n += 1;
                }
                None => {}
            }
            self.order.pop_front();
        }
        n
    }
}

/// One circuit ready to be built.
pub struct PlannedCircuit {
    handle: u64,
    session: SessionId,
    first_hop: NeighborId,
    hops: Vec<HopSpec>,
    e2e_secret: Secret,
    record: CircuitRecord,
}

/// The circuits of one request, ready to be built.
pub struct Plan {
    circuits: Vec<PlannedCircuit>,
}

/// One circuit built: the grant for the requester and what to remember.
pub struct Issued {
    /// For the requester.
    pub grant: CircuitGrant,
    /// For the book.
    pub record: CircuitRecord,
}

/// Turns paths `[requester, r1, …, target]` into planned circuits: every edge id, hop key, fresh hop secret,
/// replay tag, end-to-end secret and handle. Paths whose edges or peers vanished are skipped.
pub fn plan<R: RngCore + CryptoRng>(
    graph: &Graph<PublicKey>,
    book: &CircuitBook,
    paths: &[Vec<Fingerprint>],
    chain: &ChainId,
    expires: u64,
    forget_at: Instant,
    rng: &mut R,
) -> Plan {
    let mut handles = Vec::new();
    let mut circuits = Vec::new();
    for path in paths {
        let handle = book.fresh_handle(rng, &handles);
        // A fresh session id per circuit: one shared by the circuits of a request would let colluding
        // targets link them to one requester.
        let mut session = [0u8; 16];
        rng.fill_bytes(&mut session);
        if let Some(c) = plan_one(graph, path, chain, session, expires, forget_at, handle, rng) {
            handles.push(handle);
            circuits.push(c);
        }
    }
    Plan { circuits }
}

#[allow(clippy::too_many_arguments)]
fn plan_one<R: RngCore + CryptoRng>(
    graph: &Graph<PublicKey>,
    path: &[Fingerprint],
    chain: &ChainId,
    session: SessionId,
    expires: u64,
    forget_at: Instant,
    handle: u64,
    rng: &mut R,
) -> Option<PlannedCircuit> {
    let (requester, hops) = path.split_first()?;
    if hops.is_empty() {
        return None;
    }
    let e2e_secret = Secret::random(rng);
    let mut specs = Vec::with_capacity(hops.len());
    let mut tags = Vec::with_capacity(hops.len());
    let mut prev_node = requester;
    for (i, node) in hops.iter().enumerate() {
        let prev = graph.edge(prev_node, node)?;
        let kind = match hops.get(i + 1) {
            Some(next_node) => LayerKind::Relay { next: graph.edge(node, next_node)? },
            None => LayerKind::Target { chain: chain.clone(), session, e2e_secret: e2e_secret.clone() },
        };
        let mut replay_tag = [0u8; 16];
        rng.fill_bytes(&mut replay_tag);
        // Each layer gets its own expiry, up to EXPIRY_JITTER earlier than the nominal one, so colluding hops
        // cannot link the layers of one circuit (or the circuits of one request) by equal expiry times.
        let layer_expires = expires.saturating_sub(rng.gen_range(0..=EXPIRY_JITTER));
        let layer = Layer { prev, kind, hop_secret: Secret::random(rng), expires: layer_expires, replay_tag };
        specs.push(HopSpec { key: graph.get(node)?.key.clone(), layer });
        tags.push(replay_tag);
        prev_node = node;
    }
    Some(PlannedCircuit {
        handle,
        session,
        first_hop: graph.edge(requester, hops.first()?)?,
        hops: specs,
        e2e_secret,
        record: CircuitRecord { requester: *requester, hops: hops.to_vec(), tags, forget_at },
    })
}

impl Plan {
    /// Total onion layers (the RSA encryptions [`Plan::build`] will do).
    pub fn layers(&self) -> usize {
        self.circuits.iter().map(|c| c.hops.len()).sum()
    }

    /// Builds every tracking code. A circuit whose TC cannot be built is dropped with a log line.
    pub fn build<R: RngCore + CryptoRng>(self, rng: &mut R) -> Vec<Issued> {
        let mut out = Vec::with_capacity(self.circuits.len());
        for c in self.circuits {
            let tc = match tc::build(&c.hops, rng) {
                Ok(tc) => tc,
                Err(e) => {
                    tracing::warn!(hops = c.hops.len(), error = %e, "could not build a tracking code");
                    continue;
                }
            };
            let grant = CircuitGrant {
                circuit: c.handle,
                first_hop: c.first_hop,
                tc: tc.to_vec(),
                hop_secrets: c.hops.iter().map(|h| h.layer.hop_secret.0).collect(),
                e2e_secret: c.e2e_secret.0,
                session: c.session,
                expires: c.hops.iter().map(|h| h.layer.expires).min().unwrap_or(0),
            };
            out.push(Issued { grant, record: c.record });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u8) -> Fingerprint {
        Fingerprint([i; 32])
    }

    fn record(now: Instant, secs: u64) -> CircuitRecord {
        CircuitRecord {
            requester: fp(0),
            hops: vec![fp(1), fp(2), fp(3)],
            tags: vec![[1; 16], [2; 16], [3; 16]],
            forget_at: now + Duration::from_secs(secs),
        }
    }

    #[test]
    fn blame_follows_the_tagged_hop() {
        let r = record(Instant::now(), 1);
        let denied = |d: DenyReason| FailureKind::CircuitDenied(d.code());
        let broken = |b: BreakReason| FailureKind::CircuitBroken(b.code());
        // Refusals for the hop's own reasons blame it; a missing successor blames the successor.
        assert_eq!(r.blame(denied(DenyReason::CircuitLimit), Some([2; 16])), Ok(fp(2)));
        assert_eq!(r.blame(denied(DenyReason::NoSuchChain), Some([3; 16])), Ok(fp(3)));
        assert_eq!(r.blame(denied(DenyReason::NoSuchNeighbor), Some([1; 16])), Ok(fp(2)));
        assert!(r.blame(denied(DenyReason::NoSuchNeighbor), Some([3; 16])).is_err());
        // Refusals that protect the hop, or that an upstream hop caused, blame nobody.
        for d in
            [DenyReason::Expired, DenyReason::Replayed, DenyReason::WrongLink, DenyReason::BadTc, DenyReason::Protocol]
        {
            assert!(r.blame(denied(d), Some([2; 16])).is_err(), "{d}");
        }
        // A failed link onward blames the peer across it; other breaks name no direction.
        assert_eq!(r.blame(broken(BreakReason::LinkFailed), Some([1; 16])), Ok(fp(2)));
        assert_eq!(r.blame(broken(BreakReason::LinkFailed), Some([2; 16])), Ok(fp(3)));
        assert!(r.blame(broken(BreakReason::LinkFailed), Some([3; 16])).is_err());
        for b in [
            BreakReason::Protocol,
            BreakReason::Resources,
            BreakReason::Shutdown,
            BreakReason::Timeout,
            BreakReason::UpstreamUnavailable,
        ] {
            assert!(r.blame(broken(b), Some([1; 16])).is_err(), "{b}");
            assert!(r.blame(broken(b), None).is_err(), "{b}");
        }
        // The requester's own link to the first hop failed (its report has no tag): the first hop is the suspect.
        assert_eq!(r.blame(broken(BreakReason::LinkFailed), None), Ok(fp(1)));
        // A refusal without a tag (circuit-limit, unpeeled) reaches the requester untagged only from its first
        // hop: relays pass a successor's as `next-refused` with their own tag, which names the hop after them.
        assert_eq!(r.blame(denied(DenyReason::CircuitLimit), None), Ok(fp(1)));
        assert_eq!(r.blame(denied(DenyReason::NextRefused), Some([1; 16])), Ok(fp(2)));
        assert_eq!(r.blame(denied(DenyReason::NextRefused), Some([2; 16])), Ok(fp(3)));
        assert!(r.blame(denied(DenyReason::NextRefused), Some([3; 16])).is_err(), "the target relays to nobody");
        assert!(r.blame(denied(DenyReason::NextRefused), None).is_err());
        assert!(r.blame(denied(DenyReason::NextRefused), Some([9; 16])).is_err());
        // Other untagged refusals still blame nobody.
        for d in [DenyReason::BadTc, DenyReason::Protocol, DenyReason::NoSuchChain, DenyReason::NoSuchNeighbor] {
            assert!(r.blame(denied(d), None).is_err(), "{d}");
        }
        // A timeout names the hop that gave up first, not the one that stalled: nobody is blamed.
        assert!(r.blame(denied(DenyReason::Timeout), Some([1; 16])).is_err());
        assert!(r.blame(denied(DenyReason::CircuitLimit), Some([9; 16])).is_err());
        assert_eq!(r.blame(FailureKind::Misbehaving, None), Ok(fp(3)));
        assert!(r.blame(FailureKind::NeighborUnreachable, Some([1; 16])).is_err());
    }

    #[test]
    fn book_is_bounded_and_forgets_in_order() {
        let now = anomos_net::rt::now();
        let mut b = CircuitBook::new(3);
        for h in 1..=5u64 {
            b.insert(h, record(now, h));
        }
        assert_eq!(b.len(), 3);
        assert!(b.get(1).is_none() && b.get(2).is_none());
        assert!(b.get(3).is_some() && b.get(5).is_some());
        assert_eq!(b.prune(now + Duration::from_secs(4)), 2);
        assert_eq!(b.len(), 1);
        assert!(b.get(5).is_some());
        let mut rng = rand::thread_rng();
        let h = b.fresh_handle(&mut rng, &[]);
        assert!(h != 0 && h != 5);
    }

    #[test]
    fn targets_in_use_are_the_requesters_unreported_circuits() {
        let now = anomos_net::rt::now();
        let mut b = CircuitBook::new(4);
        let with = |requester: u8, target: u8, secs: u64| CircuitRecord {
            requester: fp(requester),
            hops: vec![fp(1), fp(target)],
            tags: vec![[1; 16], [2; 16]],
            forget_at: now + Duration::from_secs(secs),
        };
        b.insert(10, with(0, 7, 10));
        b.insert(11, with(0, 8, 20));
        b.insert(12, with(9, 6, 30));
        assert_eq!(b.targets_in_use(&fp(0)), HashSet::from([fp(7), fp(8)]));
        assert_eq!(b.targets_in_use(&fp(9)), HashSet::from([fp(6)]));
        assert!(b.targets_in_use(&fp(5)).is_empty());
        // Forgotten circuits (pruned or pushed out) no longer count, and leave no index behind.
        assert_eq!(b.prune(now + Duration::from_secs(15)), 1);
        assert_eq!(b.targets_in_use(&fp(0)), HashSet::from([fp(8)]));
        assert_eq!(b.prune(now + Duration::from_secs(25)), 1);
        assert!(b.targets_in_use(&fp(0)).is_empty() && !b.by_requester.contains_key(&fp(0)));
        for h in 20..24 {
            b.insert(h, with(3, 4, 40));
        }
        assert_eq!(b.len(), 4);
        assert!(b.targets_in_use(&fp(9)).is_empty() && !b.by_requester.contains_key(&fp(9)));
        // Re-inserting a handle for another requester moves it.
        b.insert(20, with(5, 4, 40));
        assert_eq!(b.targets_in_use(&fp(5)), HashSet::from([fp(4)]));
        assert_eq!(b.by_requester[&fp(3)].handles.len(), 3);
        // Several circuits to one target count once each: the target stays in use until the last is forgotten.
        let mut b = CircuitBook::new(8);
        for h in 1..=3 {
            b.insert(h, with(0, 7, h));
        }
        b.insert(4, with(0, 8, 10));
        assert_eq!(b.by_requester[&fp(0)].targets[&fp(7)], 3);
        assert_eq!(b.prune(now + Duration::from_secs(2)), 2);
        assert_eq!(b.targets_in_use(&fp(0)), HashSet::from([fp(7), fp(8)]));
        // Re-inserting a handle under the same requester with another target moves its count.
        b.insert(4, with(0, 7, 10));
        assert_eq!(b.targets_in_use(&fp(0)), HashSet::from([fp(7)]));
        assert_eq!(b.by_requester[&fp(0)].targets[&fp(7)], 2);
        assert_eq!(b.prune(now + Duration::from_secs(11)), 2);
        assert!(b.targets_in_use(&fp(0)).is_empty() && b.by_requester.is_empty());
    }
}
