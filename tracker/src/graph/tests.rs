//! Unit tests of the graph and its path finding.

use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

mod lengths;
mod presize;
mod restore;

fn cfg(target: usize) -> GraphConfig {
    GraphConfig {
        target_degree: target,
        max_degree: target + 2,
        allow_same_ip: false,
        max_peers: 10_000,
        expire_after: Duration::from_secs(90),
        admission: AdmissionLimits::NONE,
        fixed_degree: true,
        blame_lasts: super::BLAME_LASTS,
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
        assert!(p.degree() <= g.degrees().1.max(g.cfg.max_degree), "degree {} over cap", p.degree());
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
fn each_peer_keeps_the_liveness_of_its_last_announce() {
    let mut rng = StdRng::seed_from_u64(6);
    let t0 = Instant::now();
    let mut g = Graph::new(cfg(2));
    // Peer 0 announced while the overlay was handed 30 s intervals (90 s of liveness), peer 1 once the tracker
    // handed out 100 s (300 s), peer 2 after the overlay shrank back.
    g.announce(fp(0), (), addr(0), vec![chain()], t0, &mut rng).unwrap();
    g.set_expire_after(Duration::from_secs(300));
    g.announce(fp(1), (), addr(1), vec![chain()], t0, &mut rng).unwrap();
    g.set_expire_after(Duration::from_secs(90));
    g.announce(fp(2), (), addr(2), vec![chain()], t0 + Duration::from_secs(10), &mut rng).unwrap();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert!(g.is_live(&fp(0), at(90)) && !g.is_live(&fp(0), at(91)));
    assert!(g.is_live(&fp(1), at(300)) && !g.is_live(&fp(1), at(301)), "shrinking did not shorten peer 1's");
    assert_eq!(g.expire(at(91)).iter().map(|e| e.id).collect::<Vec<_>>(), vec![fp(0)]);
    assert_eq!(g.expire(at(101)).iter().map(|e| e.id).collect::<Vec<_>>(), vec![fp(2)]);
    assert!(g.expire(at(300)).is_empty());
    // A peer's next announce replaces its liveness with the current one, longer or shorter.
    g.announce(fp(1), (), addr(1), vec![chain()], at(200), &mut rng).unwrap();
    assert!(g.is_live(&fp(1), at(290)) && !g.is_live(&fp(1), at(291)));
    assert_eq!(g.expire(at(291)).iter().map(|e| e.id).collect::<Vec<_>>(), vec![fp(1)]);
    assert_eq!(g.len(), 0);
    // "Never" (a replica's graph) does not overflow the clock.
    g.set_expire_after(Duration::from_secs(u64::MAX));
    g.announce(fp(3), (), addr(3), vec![chain()], at(300), &mut rng).unwrap();
    assert!(g.is_live(&fp(3), at(300) + Duration::from_secs(10 * 365 * 86_400)));
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
        let all: HashSet<_> =
            g.find_paths(&req, &chain(), 16, 1, now, &mut rng).unwrap().iter().map(|p| *p.last().unwrap()).collect();
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

/// Honest peer `i` on its own /16; Sybil `j` on 100.64.0.0/16, its own address.
fn honest_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([1 + (i / 256) as u8, i as u8, 0, 1], 8000))
}

fn sybil_addr(j: usize) -> SocketAddr {
    SocketAddr::from(([100, 64, j as u8, 1 + (j / 256) as u8], 8000))
}

fn sybil(j: usize) -> Fingerprint {
    fp(1_000_000 + j)
}

#[test]
fn admission_limits_count_live_identities_per_address_and_network() {
    let mut rng = StdRng::seed_from_u64(20);
    let now = Instant::now();
    let mut c = cfg(4);
    c.admission = AdmissionLimits { per_ipv4: 2, per_ipv4_24: 3, per_ipv6_64: 1, per_ipv6_48: 2 };
    let mut g: Graph<()> = Graph::new(c.clone());
    let at = |d: u8, port: u16| SocketAddr::from(([10, 0, 0, d], port));
    g.announce(fp(0), (), at(1, 1), vec![], now, &mut rng).unwrap();
    g.announce(fp(1), (), at(1, 2), vec![], now, &mut rng).unwrap();
    let over = g.announce(fp(2), (), at(1, 3), vec![], now, &mut rng);
    assert!(matches!(over, Err(GraphError::OverLimit(o)) if o.limit == 2), "{over:?}");
    assert!(g.admits(&fp(2), at(1, 3).ip()).is_err());
    assert!(g.admits(&fp(0), at(1, 9).ip()).is_ok(), "a known identity on its own address is not new");
    // Known identities re-announce; the /24 takes a third.
    g.announce(fp(0), (), at(1, 1), vec![], now, &mut rng).unwrap();
    g.announce(fp(2), (), at(2, 1), vec![], now, &mut rng).unwrap();
    assert!(g.announce(fp(3), (), at(3, 1), vec![], now, &mut rng).is_err(), "/24 full");
    // Moving into a full address is refused and leaves the peer where it was.
    let mv = g.announce(fp(2), (), at(1, 7), vec![], now, &mut rng);
    assert!(matches!(mv, Err(GraphError::OverLimit(_))));
    assert_eq!(g.get(&fp(2)).unwrap().addr, at(2, 1));
    // Expiry frees the slots.
    let later = now + Duration::from_secs(91);
    g.announce(fp(9), (), honest_addr(9), vec![], later, &mut rng).unwrap();
    g.expire(later);
    g.announce(fp(3), (), at(1, 4), vec![], later, &mut rng).unwrap();
    // IPv6: one per /64.
    let v6 = |s: &str| SocketAddr::new(s.parse().unwrap(), 8000);
    g.announce(fp(20), (), v6("2001:db8:0:1::1"), vec![], later, &mut rng).unwrap();
    assert!(g.announce(fp(21), (), v6("2001:db8:0:1::2"), vec![], later, &mut rng).is_err());
    // allow_same_ip lifts every limit.
    c.allow_same_ip = true;
    let mut g: Graph<()> = Graph::new(c);
    for i in 0..10 {
        g.announce(fp(i), (), at(1, 100 + i as u16), vec![], now, &mut rng).unwrap();
    }
}

#[test]
fn a_crowd_on_one_16_holds_at_most_one_slot_of_each_peer_and_no_path_twice() {
    let now = Instant::now();
    for seed in 0..3 {
        let mut rng = StdRng::seed_from_u64(30 + seed);
        let mut g: Graph<()> = Graph::new(cfg(4));
        // 100 honest peers and 300 Sybils, joins interleaved, then three announce rounds.
        let mut joins: Vec<(Fingerprint, SocketAddr, bool)> =
            (0..100).map(|i| (fp(i), honest_addr(i), false)).collect();
        joins.extend((0..300).map(|j| (sybil(j), sybil_addr(j), true)));
        joins.shuffle(&mut rng);
        for _ in 0..4 {
            for (id, a, _) in &joins {
                g.announce(*id, (), *a, vec![chain()], now, &mut rng).unwrap();
            }
        }
        check_invariants(&g);
        let is_sybil = |f: &Fingerprint| *f >= sybil(0);
        for i in 0..100 {
            let n = g.neighbors(&fp(i));
            // One short of the target is possible: every candidate may be at the maximum degree (the crowd takes
            // one slot of each honest peer), and edges are split only for peers two short.
            assert!(n.len() >= 3, "honest peer {i} has {} neighbors", n.len());
            let prefixes: HashSet<Net> = n.iter().map(|(_, _, p)| p.prefix).collect();
            assert_eq!(prefixes.len(), n.len(), "two neighbors of one /16");
            assert!(n.iter().filter(|(_, f, _)| is_sybil(f)).count() <= 1);
        }
        for j in 0..300 {
            assert!(g.neighbors(&sybil(j)).iter().all(|(_, f, _)| !is_sybil(f)), "edge inside the crowd");
        }
        for r in 0..100 {
            for relays in [2, 4] {
                for p in g.find_paths(&fp(r), &chain(), 4, relays, now, &mut rng).unwrap() {
                    check_path(&g, &p, &fp(r), p.len() - 2);
                    assert!(p.iter().filter(|f| is_sybil(f)).count() <= 1, "two Sybils on one path");
                }
            }
        }
    }
}

#[test]
fn family_members_are_never_neighbors_nor_on_one_path_when_both_declare() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(40);
    let mut g: Graph<()> = Graph::new(cfg(4));
    // 0..3 are one operator's, declared both ways; 4 declares 5, which does not declare 4.
    let fam: Vec<Fingerprint> = (0..3).map(fp).collect();
    for _ in 0..3 {
        for i in 0..30 {
            let family = match i {
                0..=2 => fam.clone(),
                4 => vec![fp(5)],
                _ => vec![],
            };
            g.announce_with_family(fp(i), (), honest_addr(i), vec![chain()], family, now, &mut rng).unwrap();
        }
    }
    for a in 0..3 {
        for b in 0..3 {
            assert!(a == b || g.edge(&fp(a), &fp(b)).is_none(), "family members {a} and {b} are neighbors");
        }
    }
    let mut one_sided = false;
    for _ in 0..40 {
        for r in 0..30 {
            for relays in [2, 3] {
                let Ok(paths) = g.find_paths(&fp(r), &chain(), 8, relays, now, &mut rng) else { continue };
                for p in paths {
                    assert!(p.iter().filter(|f| fam.contains(f)).count() <= 1, "two of one family: {p:?}");
                    one_sided |= p.contains(&fp(4)) && p.contains(&fp(5));
                }
            }
        }
    }
    assert!(one_sided, "a one-sided declaration must not keep peers apart");
}

#[test]
fn the_degree_grows_with_the_overlay() {
    let mut rng = StdRng::seed_from_u64(60);
    let now = Instant::now();
    let mut c = cfg(4);
    c.fixed_degree = false;
    let mut g: Graph<()> = Graph::new(c);
    for i in 0..3000 {
        g.announce(fp(i), (), honest_addr(i), vec![], now, &mut rng).unwrap();
    }
    assert_eq!(g.degrees(), (9, 11), "ceil(ln 3000) = 9");
    for i in 0..3000 {
        g.announce(fp(i), (), honest_addr(i), vec![], now, &mut rng).unwrap();
    }
    check_invariants(&g);
    let low = g.peers.values().filter(|p| p.degree() < 9).count();
    assert!(low < 30, "{low} peers below the raised degree");
}
