//! Planned table sizes (`Graph::presize`, `crate::sizing`): an overlay growing towards `max_peers` grows each table
//! once past a sixteenth of its plan instead of doubling it, so no announce rehashes a large table under the state
//! lock; an overlay that stays small reserves nothing ahead.

use super::*;

/// The tables' capacities: the peer map, the sampler's index, the edge map, the chain's servers, the largest degree
/// bucket's index.
fn capacities(g: &Graph<()>) -> [usize; 5] {
    [
        g.peers.capacity(),
        g.all.pos.capacity(),
        g.edges.capacity(),
        g.serving.get(&chain()).map_or(0, |s| s.capacity()),
        g.by_degree.iter().map(|b| b.pos.capacity()).max().unwrap_or(0),
    ]
}

/// Announces peers `0..n` twice (the second round tops up the early ones) and counts, per table, how often its
/// capacity grew by a sixteenth or more once it was at least `crate::sizing::JUMP_MIN`: a rehash (a reallocation,
/// or an in-place one when removed entries' tombstones used up the room). A tombstone lowers the capacity by one
/// and its reuse raises it by one: not counted.
fn grow(g: &mut Graph<()>, n: usize) -> [usize; 5] {
    let mut rng = StdRng::seed_from_u64(7);
    let now = Instant::now();
    let mut growths = [0; 5];
    for _ in 0..2 {
        for i in 0..n {
            let before = capacities(g);
            g.announce(fp(i), (), addr(i), vec![chain()], now, &mut rng).unwrap();
            for (k, (b, a)) in before.iter().zip(capacities(g)).enumerate() {
                growths[k] += usize::from(a >= *b + *b / 16 && *b >= crate::sizing::JUMP_MIN);
            }
        }
    }
    growths
}

#[test]
fn a_planned_graph_grows_each_table_once_past_a_sixteenth_of_its_plan() {
    let n = 8_000;
    let mut config = cfg(4);
    config.max_peers = n;
    let mut g = Graph::new(config.clone());
    g.presize();
    let growths = grow(&mut g, n);
    assert_eq!(g.len(), n);
    assert!(g.edge_count() > 2 * n, "{} edges", g.edge_count());
    assert!(g.by_degree.iter().any(|b| b.len() >= crate::sizing::JUMP_MIN), "no large degree bucket to check");
    // peers, sampler, edges, servers, the largest bucket: one growth each past JUMP_MIN (a bucket may grow once
    // more when another becomes the largest).
    assert!(growths[..4].iter().all(|g| *g == 1), "{growths:?}");
    assert!(growths[4] <= 2, "{growths:?}");
    check_invariants(&g);

    // Unplanned, the same overlay doubles its tables several times past JUMP_MIN: the counts above can fail.
    let mut u = Graph::new(config);
    let growths = grow(&mut u, n);
    assert!(growths[..4].iter().all(|g| *g >= 2), "{growths:?}");
}

#[test]
fn a_small_overlay_reserves_nothing_ahead() {
    let mut config = cfg(4);
    config.max_peers = 100_000;
    let mut g = Graph::new(config);
    g.presize();
    grow(&mut g, 1_500);
    let caps = capacities(&g);
    assert!(caps.iter().all(|c| *c < 4 * 1_500 * 3), "{caps:?}: reserved for max_peers at 1,500 peers");
    assert!(g.peers.capacity() < 4 * 1_500, "{caps:?}");
}

#[test]
fn the_plan_is_capped() {
    let mut config = cfg(4);
    config.max_peers = usize::MAX;
    let mut g: Graph<()> = Graph::new(config);
    g.presize();
    assert_eq!(g.sizes.peers, PRESIZE_PEERS);
    assert_eq!(g.sizes.edges, PRESIZE_PEERS * 6 / 2);
    assert!(g.peers.capacity() < 1_000, "nothing is reserved by the plan itself");
}
