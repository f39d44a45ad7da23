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

/// Each degree bucket's members, as sets.
fn buckets(g: &Graph<()>) -> Vec<HashSet<Fingerprint>> {
    g.by_degree.iter().map(|b| b.all().iter().copied().collect()).collect()
}

#[test]
fn restoring_edges_at_once_gives_the_graph_restoring_them_one_by_one_gives() {
    let mut rng = StdRng::seed_from_u64(11);
    let now = Instant::now();
    let original = build(300, 4, now, &mut rng);
    let (peers, mut edges) = stored(&original);
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
