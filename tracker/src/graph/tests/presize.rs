//! Sizing the tables at start (`Graph::presize`): an overlay growing to `max_peers` never grows the peer, sampler
//! or edge tables, so no announce rehashes them under the state lock.

use super::*;

/// The tables' capacities (the peer map, the sampler's list and index, the edge map).
fn capacities(g: &Graph<()>) -> [usize; 4] {
    [g.peers.capacity(), g.all.items.capacity(), g.all.pos.capacity(), g.edges.capacity()]
}

#[test]
fn a_presized_graph_does_not_grow_its_tables_up_to_max_peers() {
    let n = 2_000;
    let mut config = cfg(4);
    config.max_peers = n;
    config.fixed_degree = false; // the degree grows with ln N: the edge table is sized for it at N = max_peers
    let mut g = Graph::new(config);
    assert!(g.peers.capacity() < n, "an unsized graph starts small");
    g.presize();
    let sized = capacities(&g);
    assert!(sized.iter().all(|c| *c >= n), "{sized:?}");
    let mut rng = StdRng::seed_from_u64(7);
    let now = Instant::now();
    for _ in 0..2 {
        for i in 0..n {
            g.announce(fp(i), (), addr(i), vec![chain()], now, &mut rng).unwrap();
        }
    }
    assert_eq!(g.len(), n);
    assert!(g.edge_count() > n, "{} edges", g.edge_count());
    // A table that grew would have doubled; one that did not may report a little less room (removed edges'
    // tombstones).
    let after = capacities(&g);
    assert!(after.iter().zip(sized).all(|(a, s)| *a <= s), "a table grew after presize: {sized:?} -> {after:?}");
    // The tables that hold some of the peers jumped to the full size once they held `JUMP_AT`.
    for b in g.by_degree.iter().filter(|b| b.len() > index::JUMP_AT) {
        assert!(b.pos.capacity() >= n && b.items.capacity() >= n, "a degree bucket of {} was not sized", b.len());
    }
    let servers = g.serving.get(&chain()).map(|s| (s.len(), s.capacity()));
    assert!(servers.is_some_and(|(len, cap)| len == n && cap >= n), "{servers:?}");
    check_invariants(&g);
}

#[test]
fn an_unsized_graph_reserves_nothing_ahead() {
    let mut g = Graph::new(cfg(4));
    let mut rng = StdRng::seed_from_u64(8);
    let now = Instant::now();
    for i in 0..1_500 {
        g.announce(fp(i), (), addr(i), vec![chain()], now, &mut rng).unwrap();
    }
    let servers = g.serving.get(&chain()).map_or(0, |s| s.capacity());
    assert!(servers < 4 * 1_500, "{servers}: sized for max_peers without presize");
    assert!(g.by_degree.iter().all(|b| b.pos.capacity() < 4 * 1_500));
}

#[test]
fn presize_is_capped_and_keeps_what_is_there() {
    let mut config = cfg(4);
    config.max_peers = usize::MAX;
    let mut g: Graph<()> = Graph::new(config);
    g.presize();
    assert!(g.peers.capacity() >= PRESIZE_PEERS && g.peers.capacity() < 4 * PRESIZE_PEERS);
    // A second call (a restored graph is sized again) reserves nothing more.
    let before = capacities(&g);
    g.presize();
    assert_eq!(capacities(&g), before);
}
