//! Restoring the graph from the state database (module `restore`): the bulk edge restore of a restart gives the
//! graph, indexes included, that restoring the edges one by one gives.

use super::*;

type Rows = (Vec<(Fingerprint, Stored<()>)>, Vec<(NeighborId, Fingerprint, Fingerprint)>);

/// A graph as the state database keeps it: every peer, and every edge with its ends.
fn stored(g: &Graph<()>) -> Rows {
    let mut peers: Vec<_> = g
        .peers
        .iter()
        .map(|(id, p)| {
            let s =
                Stored { key: (), addr: p.addr, chains: p.chains.clone(), family: p.family.clone(), avoided: false };
            (*id, s)
        })
        .collect();
    peers.sort_by_key(|(id, _)| *id);
    let mut edges: Vec<_> = g.edges.iter().map(|(nid, (a, b))| (*nid, *a, *b)).collect();
    edges.sort_by_key(|(nid, _, _)| *nid);
    (peers, edges)
}

fn restored(peers: &[(Fingerprint, Stored<()>)], now: Instant) -> Graph<()> {
    let mut g = Graph::new(cfg(4));
    for (id, s) in peers {
        assert!(g.restore_peer(*id, s.clone(), now));
    }
    g
}

/// A graph of `n` peers built from `seed`, and its rows as the state database keeps them.
fn stored_graph(seed: u64, n: usize) -> (StdRng, Instant, Graph<()>, Rows) {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = Instant::now();
    let original = build(n, 4, now, &mut rng);
    let rows = stored(&original);
    (rng, now, original, rows)
}

/// Each degree bucket's members, as sets.
fn buckets(g: &Graph<()>) -> Vec<HashSet<Fingerprint>> {
    g.by_degree.iter().map(|b| b.all().iter().copied().collect()).collect()
}

#[test]
fn restoring_edges_at_once_gives_the_graph_restoring_them_one_by_one_gives() {
    let (mut rng, now, original, (peers, mut edges)) = stored_graph(11, 300);
    assert!(edges.len() > 500);
    // Rows that must not come back: a zero id, an id taken, a second edge between two neighbors, an unknown end,
    // a self-edge.
    let (nid, a, b) = edges[0];
    let bad = [
        (NeighborId(0), fp(1), fp(2)),
        (NeighborId(u64::MAX - 2), fp(6), fp(6)),
        (nid, fp(3), fp(4)),
        (NeighborId(u64::MAX), a, b),
        (NeighborId(u64::MAX - 1), fp(5), fp(10_000)),
    ];
    // Some before the good rows (those wrong whatever comes after them), the others after.
    edges.splice(0..0, bad[..2].iter().copied());
    edges.extend(bad[2..].iter().copied());

    let mut one_by_one = restored(&peers, now);
    let mut refused = Vec::new();
    for (nid, a, b) in edges.clone() {
        if !one_by_one.restore_edge(nid, a, b) {
            refused.push(nid);
        }
    }
    let mut at_once = restored(&peers, now);
    let dropped = at_once.restore_edges(edges);

    assert_eq!(dropped, refused);
    assert_eq!(dropped.len(), bad.len(), "{dropped:?}");
    check_invariants(&at_once);
    assert_eq!(at_once.edges, one_by_one.edges);
    assert_eq!(at_once.edges, original.edges);
    assert_eq!(buckets(&at_once), buckets(&one_by_one), "the degree index");
    assert_eq!(buckets(&at_once), buckets(&original));
    for (id, p) in &original.peers {
        assert_eq!(at_once.neighbors(id).len(), p.degree());
    }
    // Drawing peers below a degree sees the restored degrees.
    let below: HashSet<Fingerprint> = at_once.draw_below(5, 10_000, &mut rng).into_iter().collect();
    assert!(below.iter().all(|id| at_once.get(id).is_some_and(|p| p.degree() < 5)));
    assert!(!below.is_empty());
}

#[test]
fn restoring_edges_at_once_keeps_the_cap_and_the_edges_a_graph_has_already() {
    let (_, now, original, (peers, mut edges)) = stored_graph(12, 200);
    // A hub: 40 more rows from one peer, past the cap on neighbors a reply carries (some to its neighbors already).
    let hub = peers[0].0;
    let more = peers.iter().skip(1).take(40).enumerate();
    edges.extend(more.map(|(i, (other, _))| (NeighborId(u64::MAX - 100 - i as u64), hub, *other)));
    // Both graphs have a first part of the edges already, put back one by one (a graph that is not empty); a
    // later row links two of those neighbors again under another id.
    let (_, a0, b0) = edges[0];
    edges.push((NeighborId(u64::MAX - 50), b0, a0));
    let (first, _) = edges.split_at(30);
    let mut one_by_one = restored(&peers, now);
    let mut at_once = restored(&peers, now);
    for g in [&mut one_by_one, &mut at_once] {
        for &(nid, a, b) in first {
            assert!(g.restore_edge(nid, a, b));
        }
    }
    let refused: Vec<NeighborId> =
        edges.iter().filter(|&&(nid, a, b)| !one_by_one.restore_edge(nid, a, b)).map(|e| e.0).collect();
    let dropped = at_once.restore_edges(edges);

    assert_eq!(dropped, refused);
    assert!(dropped.len() > 30, "the first part again, and the hub's rows past the cap: {}", dropped.len());
    // Restored degrees may pass the configured maximum (not `check_invariants`), never what a reply carries.
    assert_eq!(at_once.get(&hub).map(Peer::degree), Some(anomos_proto::tracker::MAX_NEIGHBORS));
    assert_eq!(at_once.edges, one_by_one.edges);
    assert_eq!(buckets(&at_once), buckets(&one_by_one), "the degree index");
    for id in original.peers.keys() {
        let mut a: Vec<_> = at_once.neighbors(id).into_iter().map(|(nid, o, _)| (nid, o)).collect();
        let mut b: Vec<_> = one_by_one.neighbors(id).into_iter().map(|(nid, o, _)| (nid, o)).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
}
