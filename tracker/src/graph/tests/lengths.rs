//! Path lengths: a request gets the relays it asked for when the graph has such a path, and longer paths (never
//! more than `MAX_RELAYS`) when it has none (SPEC §3.10 "Reach").

use super::*;

/// Peers `0..n`, each on its own /16, those in `serving` serving the chain, with exactly `edges` (degree target 0:
/// announces add none).
fn graph_of(n: usize, serving: &[usize], edges: &[(usize, usize)], rng: &mut StdRng, now: Instant) -> Graph<()> {
    let mut g: Graph<()> = Graph::new(cfg(0));
    for i in 0..n {
        let chains = if serving.contains(&i) { vec![chain()] } else { vec![] };
        g.announce(fp(i), (), honest_addr(i), chains, now, rng).unwrap();
    }
    for &(a, b) in edges {
        g.add_edge(fp(a), fp(b), rng);
    }
    g
}

/// `n` peers on a line `0 - 1 - … - n-1`, each on its own /16; only the last serves the chain.
fn line(n: usize, rng: &mut StdRng, now: Instant) -> Graph<()> {
    let edges: Vec<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
    graph_of(n, &[n - 1], &edges, rng, now)
}

#[test]
fn a_request_finds_a_path_one_relay_longer_when_none_exists() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(50);
    // R - a - b - c - T: no path with two relays, exactly one with three.
    let g = line(5, &mut rng, now);
    let p = g.find_paths(&fp(0), &chain(), 1, 2, now, &mut rng).unwrap();
    assert_eq!(p, vec![(0..5).map(fp).collect::<Vec<_>>()]);
}

/// Two relays more than asked, and more: as many as reach the nearest target, up to `MAX_RELAYS`; none beyond.
#[test]
fn a_request_gets_the_length_that_reaches_the_nearest_target_up_to_the_maximum() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(51);
    let most = usize::from(anomos_proto::tracker::MAX_RELAYS);
    // The target is 4 hops away: 1 relay asked, 3 given.
    let g = line(5, &mut rng, now);
    let p = g.find_paths(&fp(0), &chain(), 1, 1, now, &mut rng).unwrap();
    assert_eq!(p, vec![(0..5).map(fp).collect::<Vec<_>>()]);
    // MAX_RELAYS + 1 hops away: the longest path there is, still given for 1 relay asked.
    let g = line(most + 2, &mut rng, now);
    let p = g.find_paths(&fp(0), &chain(), 1, 1, now, &mut rng).unwrap();
    assert_eq!(p, vec![(0..most + 2).map(fp).collect::<Vec<_>>()]);
    // One hop farther: no path has few enough relays.
    let g = line(most + 3, &mut rng, now);
    assert_eq!(g.find_paths(&fp(0), &chain(), 1, 1, now, &mut rng), Err(GraphError::NoPath));
    assert_eq!(g.find_paths(&fp(0), &chain(), 1, most, now, &mut rng), Err(GraphError::NoPath));
}

/// Seeds 100186, 100194 and 110196 of the simulation: near the requester there is only a serving peer it blamed
/// (it lied) and a neighbor it blamed (it refuses every OPEN) next to the honest serving peer; the honest one is
/// 4 hops away over peers it did not blame. It gets the honest one, over 3 relays, rather than a path through
/// the peers it blamed.
#[test]
fn a_farther_target_over_unblamed_peers_comes_before_near_paths_through_blamed_ones() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(52);
    // 0 requester; 1 refusing neighbor; 2 lying server; 3, 4, 5 honest relays; 6 honest server.
    let edges = [(0, 1), (1, 2), (1, 6), (0, 3), (3, 4), (4, 5), (5, 6)];
    let mut g = graph_of(7, &[2, 6], &edges, &mut rng, now);
    g.blame(&fp(1), fp(0), now);
    g.blame(&fp(2), fp(0), now);
    for relays in [1, 2, 3] {
        let p = g.find_paths(&fp(0), &chain(), 1, relays, now, &mut rng).unwrap();
        assert_eq!(p, vec![[0, 3, 4, 5, 6].map(fp).to_vec()], "{relays} relays asked");
    }
    // Another requester, which blamed nobody, gets the lengths it asks for, the liar included.
    let p = g.find_paths(&fp(3), &chain(), 4, 2, now, &mut rng).unwrap();
    let mut targets: Vec<Fingerprint> = p.iter().filter_map(|p| p.last().copied()).collect();
    targets.sort_unstable();
    assert_eq!(targets, vec![fp(2), fp(6)], "{p:?}");
    assert!(p.iter().all(|p| p.len() == 4), "{p:?}");
}

/// Where prefixes must differ, a serving peer in the requester's own /16 cannot end its path, so it does not fix
/// how far the longer lengths go (found in review): the usable target 6 hops away is reached over 5 relays.
#[test]
fn a_target_in_the_requesters_own_prefix_does_not_cut_the_longer_lengths_short() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(53);
    let mut g: Graph<()> = Graph::new(cfg(0));
    // 0 - 1 - 2 - 3, where 3 serves from 0's /16; 0 - 4 - 5 - 6 - 7 - 8 - 9, where 9 serves from its own.
    for i in 0..10 {
        let chains = if i == 3 || i == 9 { vec![chain()] } else { vec![] };
        let a = if i == 3 { SocketAddr::from(([1, 0, 7, 7], 8000)) } else { honest_addr(i) };
        g.announce(fp(i), (), a, chains, now, &mut rng).unwrap();
    }
    for (a, b) in [(0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)] {
        g.add_edge(fp(a), fp(b), &mut rng);
    }
    let p = g.find_paths(&fp(0), &chain(), 1, 1, now, &mut rng).unwrap();
    assert_eq!(p, vec![[0, 4, 5, 6, 7, 8, 9].map(fp).to_vec()]);
}

/// The distance BFS stops at its edge budget (SPEC open issue 24); what it found by then is exact.
#[test]
fn the_distance_search_keeps_to_its_budget_and_what_it_found_is_exact() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(54);
    let g = build(2000, 4, now, &mut rng);
    let serving = g.serving.get(&chain()).unwrap();
    let (full, _, _) = g.distances_from(&fp(0), 7, serving, super::super::paths::Heed::All, now, usize::MAX);
    assert!(full.len() > 1500, "the whole graph is within 7 hops: {}", full.len());
    for budget in [50, 500, 5_000] {
        let (part, _, _) = g.distances_from(&fp(0), 7, serving, super::super::paths::Heed::All, now, budget);
        // At most one peer per edge examined (and the start).
        assert!(part.len() <= budget + 1 && part.len() < full.len(), "{budget}: {} peers", part.len());
        for (fp, d) in &part {
            assert_eq!(full.get(fp), Some(d), "{budget}: a distance found early differs");
        }
    }
}

/// Seed 100186 of the simulation with stalling serving peers: the requester's only target at one relay stalled
/// every circuit (which blames nobody), and each replacement went to it again while an honest target was two
/// relays away. Busy targets now come after every other target at every length; when nothing else is in reach,
/// a busy one rather than none.
#[test]
fn a_replacement_goes_to_a_free_target_over_a_longer_path_before_a_busy_near_one() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(53);
    // 0 requester; 1, 2, 3 relays; 4 the near (busy) server; 5 the far one. 0-1-4, 0-2-3-5.
    let g = graph_of(6, &[4, 5], &[(0, 1), (1, 4), (0, 2), (2, 3), (3, 5)], &mut rng, now);
    let busy: HashSet<Fingerprint> = [fp(4)].into();
    let p = g.find_paths_preferring(&fp(0), &chain(), 1, 1, &busy, now, &mut rng).unwrap();
    assert_eq!(p, vec![vec![fp(0), fp(2), fp(3), fp(5)]], "the free target, over two relays");
    // Both busy: the near one, at the length asked.
    let both: HashSet<Fingerprint> = [fp(4), fp(5)].into();
    let p = g.find_paths_preferring(&fp(0), &chain(), 1, 1, &both, now, &mut rng).unwrap();
    assert_eq!(p, vec![vec![fp(0), fp(1), fp(4)]]);
    // Nothing busy: the near one.
    let p = g.find_paths(&fp(0), &chain(), 1, 1, now, &mut rng).unwrap();
    assert_eq!(p, vec![vec![fp(0), fp(1), fp(4)]]);
}
