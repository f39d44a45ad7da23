//! Crossing dials (SPEC §5.2, open issue 29 until revision 13): both ends keep the same link, whatever order
//! each saw the two come up in; a restarted neighbor's link still replaces the old one at once.

use super::*;
use crate::link::LinkSettings;
use anomos_proto::identity::Identity;

fn settings() -> LinkSettings {
    let pem = include_str!("../../../proto/tests/vectors/keys/id0_2048.pem");
    LinkSettings::for_tests(Arc::new(Identity::from_pkcs8_pem(pem).expect("vector key")))
}

const NID: NeighborId = NeighborId(7);
const SMALL: Fingerprint = Fingerprint([1; 32]);
const LARGE: Fingerprint = Fingerprint([2; 32]);

/// One TCP link as its two ends see it: at the smaller fingerprint's node and at the larger's.
struct Twin {
    at_small: Arc<Link>,
    at_large: Arc<Link>,
}

/// The link dialed by the smaller fingerprint (`canonical`) or by the larger.
fn twin(by_small: bool, s: &LinkSettings) -> Twin {
    Twin { at_small: Link::new(NID, LARGE, by_small, s), at_large: Link::new(NID, SMALL, !by_small, s) }
}

fn registries() -> (Arc<Links>, Arc<Links>) {
    (Links::new(Arc::new(Neighbors::default()), SMALL), Links::new(Arc::new(Neighbors::default()), LARGE))
}

fn current(l: &Links) -> Arc<Link> {
    l.link(NID).expect("a current link")
}

#[tokio::test(start_paused = true)]
async fn crossing_links_leave_the_same_one_current_at_both_ends_in_every_order() {
    let s = settings();
    for gap_ms in [0u64, 100, 1400] {
        for small_first_canonical in [true, false] {
            for large_first_canonical in [true, false] {
                let (a, b) = registries();
                let (c, k) = (twin(true, &s), twin(false, &s));
                let small_order = if small_first_canonical { [&c, &k] } else { [&k, &c] };
                let large_order = if large_first_canonical { [&c, &k] } else { [&k, &c] };
                a.install(&small_order[0].at_small);
                b.install(&large_order[0].at_large);
                tokio::time::advance(Duration::from_millis(gap_ms)).await;
                a.install(&small_order[1].at_small);
                b.install(&large_order[1].at_large);
                let case = format!("gap {gap_ms} ms, orders {small_first_canonical}/{large_first_canonical}");
                assert!(Arc::ptr_eq(&current(&a), &c.at_small), "{case}: the smaller end");
                assert!(Arc::ptr_eq(&current(&b), &c.at_large), "{case}: the larger end");
                for l in [&c.at_small, &c.at_large, &k.at_small, &k.at_large] {
                    assert!(!l.writer.is_closed(), "{case}: a link was closed (its circuits would break)");
                }
                assert_eq!((a.len(), b.len()), (2, 2), "{case}: the other link drains");
                assert!(a.is_draining(&k.at_small) && b.is_draining(&k.at_large), "{case}");
                // OPENs the neighbor sent before it saw the other link are taken; later ones are not.
                assert!(!k.at_small.refuses_opens(anomos_net::rt::now()));
                tokio::time::advance(crate::link::DRAINING_OPENS + Duration::from_millis(1)).await;
                assert!(k.at_small.refuses_opens(anomos_net::rt::now()), "{case}");
                assert!(!c.at_small.refuses_opens(anomos_net::rt::now()), "{case}");
                // Closed, it leaves the registry, and the current link stays.
                a.remove(&k.at_small);
                assert_eq!(a.len(), 1);
                assert!(Arc::ptr_eq(&current(&a), &c.at_small), "{case}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_neighbors_link_replaces_the_old_one_at_once() {
    let s = settings();
    // The larger neighbor restarted: its knock comes well after CROSS_WINDOW, and replaces the canonical link.
    let (a, _) = registries();
    let old = twin(true, &s);
    a.install(&old.at_small);
    tokio::time::advance(Duration::from_secs(2)).await;
    let knock = twin(false, &s);
    a.install(&knock.at_small);
    assert!(Arc::ptr_eq(&current(&a), &knock.at_small));
    assert!(old.at_small.writer.is_closed(), "the old link is closed at once");
    assert_eq!(a.len(), 1);
    // A link of the same kind replaces the current one however young: the neighbor gave the old one up.
    let (_, b) = registries();
    let first = twin(true, &s);
    b.install(&first.at_large);
    let again = twin(true, &s);
    b.install(&again.at_large);
    assert!(Arc::ptr_eq(&current(&b), &again.at_large));
    assert!(first.at_large.writer.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_draining_link_is_promoted_when_the_current_one_goes_down_and_one_drains_at_most() {
    let s = settings();
    let (a, _) = registries();
    let (c, k) = (twin(true, &s), twin(false, &s));
    a.install(&k.at_small);
    a.install(&c.at_small);
    assert!(Arc::ptr_eq(&current(&a), &c.at_small));
    tokio::time::advance(crate::link::DRAINING_OPENS * 2).await;
    assert!(k.at_small.refuses_opens(anomos_net::rt::now()), "draining for a while: no new OPENs");
    // The current link goes down: the draining one (still open) takes over, so the edge keeps a link, and takes
    // OPENs again.
    a.remove(&c.at_small);
    assert!(Arc::ptr_eq(&current(&a), &k.at_small));
    assert_eq!(a.len(), 1);
    assert!(!k.at_small.refuses_opens(anomos_net::rt::now()), "a promoted link refuses no OPEN");
    // A second crossing within the window: the older draining link is closed, one drains.
    let (a, _) = registries();
    let (c1, k1, c2) = (twin(true, &s), twin(false, &s), twin(true, &s));
    a.install(&c1.at_small);
    a.install(&k1.at_small);
    tokio::time::advance(Duration::from_millis(100)).await;
    // The same kind as the current link: a replacement (the neighbor dropped or restarted), and the draining
    // link goes too (after a restart it is dead at the neighbor's end).
    a.install(&c2.at_small);
    assert!(c1.at_small.writer.is_closed() && k1.at_small.writer.is_closed());
    assert_eq!(a.len(), 1);
    // Two crossings in a row: at most one link drains per edge.
    let (k2, k3) = (twin(false, &s), twin(false, &s));
    assert!(a.install(&k2.at_small).is_some_and(|(d, _)| Arc::ptr_eq(&d, &k2.at_small)));
    assert!(a.install(&k3.at_small).is_some());
    assert!(k2.at_small.writer.is_closed(), "at most one link drains per edge");
    assert!(Arc::ptr_eq(&current(&a), &c2.at_small));
    assert_eq!(a.len(), 2);
    // Promotion skips a draining link that is already closed.
    k3.at_small.close("test");
    a.remove(&c2.at_small);
    assert!(a.link(NID).is_none());
    assert_eq!(a.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_draining_link_closes_once_it_carries_no_circuit_or_at_the_latest_after_drain_max() {
    use std::sync::atomic::AtomicUsize;
    let s = settings();
    for (circuits_until, closes_after) in
        [(None, DRAIN_LINGER), (Some(30u64), Duration::from_secs(30)), (Some(10_000), DRAIN_MAX)]
    {
        let (a, _) = registries();
        let (c, k) = (twin(true, &s), twin(false, &s));
        a.install(&c.at_small);
        let (d, since) = a.install(&k.at_small).expect("k drains");
        let circuits = Arc::new(AtomicUsize::new(usize::from(circuits_until.is_some())));
        let count = circuits.clone();
        let task = tokio::spawn(a.clone().drain(d, since, move |_: &Link| count.load(Ordering::Relaxed)));
        let start = tokio::time::Instant::now();
        let end = circuits_until.map(Duration::from_secs);
        while !k.at_small.writer.is_closed() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if end.is_some_and(|e| start.elapsed() >= e) {
                circuits.store(0, Ordering::Relaxed);
            }
            assert!(start.elapsed() <= DRAIN_MAX + Duration::from_secs(5), "never closed");
        }
        let took = start.elapsed();
        assert!(took >= closes_after && took <= closes_after + DRAIN_CHECK + Duration::from_secs(1), "{took:?}");
        assert!(!c.at_small.writer.is_closed());
        task.await.unwrap();
    }
    // Promoted meanwhile (the current link went down): the watch ends and the link stays.
    let (a, _) = registries();
    let (c, k) = (twin(true, &s), twin(false, &s));
    a.install(&c.at_small);
    let (d, since) = a.install(&k.at_small).expect("k drains");
    let task = tokio::spawn(a.clone().drain(d, since, |_: &Link| 0));
    a.remove(&c.at_small);
    task.await.unwrap();
    assert!(!k.at_small.writer.is_closed() && Arc::ptr_eq(&current(&a), &k.at_small));
}

#[tokio::test(start_paused = true)]
async fn a_link_made_to_drain_again_lingers_after_its_second_drain_not_its_first() {
    let s = settings();
    let (a, _) = registries();
    let (c, k) = (twin(true, &s), twin(false, &s));
    a.install(&c.at_small);
    let (d, first) = a.install(&k.at_small).expect("k drains");
    let start = tokio::time::Instant::now();
    let first_watch = tokio::spawn(a.clone().drain(d, first, |_: &Link| 0));
    // At 5 s the current link goes down and k is promoted; at 5.5 s a new crossing link wins and k drains again.
    tokio::time::advance(Duration::from_secs(5)).await;
    a.remove(&c.at_small);
    assert!(Arc::ptr_eq(&current(&a), &k.at_small));
    tokio::time::advance(Duration::from_millis(500)).await;
    let c2 = twin(true, &s);
    let (d, second) = a.install(&c2.at_small).expect("k drains again");
    assert!(Arc::ptr_eq(&d, &k.at_small) && Arc::ptr_eq(&current(&a), &c2.at_small));
    let second_watch = tokio::spawn(a.clone().drain(d, second, |_: &Link| 0));
    // The first drain's watch wakes at 10 s and leaves the link to the second's: it still lingers.
    first_watch.await.unwrap();
    assert!(start.elapsed() >= DRAIN_LINGER);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !k.at_small.writer.is_closed(),
        "closed {:?} after its second drain began",
        start.elapsed() - Duration::from_millis(5500)
    );
    second_watch.await.unwrap();
    assert!(k.at_small.writer.is_closed(), "closed once idle after its second drain's linger");
    assert!(start.elapsed() >= Duration::from_millis(5500) + DRAIN_LINGER);
    assert!(!c2.at_small.writer.is_closed());
}

#[tokio::test(start_paused = true)]
async fn wait_change_returns_when_a_link_comes_up_not_at_its_deadline() {
    let s = settings();
    let (a, _) = registries();
    let t = tokio::time::Instant::now();
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move {
            a.wait_change(Duration::from_secs(60)).await;
            t.elapsed()
        })
    };
    tokio::task::yield_now().await; // the waiter is waiting
    tokio::time::advance(Duration::from_secs(2)).await;
    a.install(&twin(true, &s).at_small);
    let after = waiter.await.expect("the waiter");
    assert!(after >= Duration::from_secs(2) && after < Duration::from_secs(3), "{after:?}");
    // And with no change, at its deadline.
    let t = tokio::time::Instant::now();
    a.wait_change(Duration::from_millis(300)).await;
    assert_eq!(t.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn a_knock_counts_only_from_the_address_of_the_neighbor_it_claims_to_be() {
    let n = Neighbors::default();
    let (home, elsewhere): (IpAddr, IpAddr) = ("10.1.2.3".parse().unwrap(), "10.9.9.9".parse().unwrap());
    // Someone at another address claims the neighbor's fingerprint: our dial to the neighbor does not wait.
    n.knocked(&LARGE, elsewhere);
    assert!(!n.recently_knocked(&LARGE, home));
    // The neighbor itself (its address, here as an IPv4-mapped IPv6 source of a dual-stack listener) does.
    n.knocked(&LARGE, "::ffff:10.1.2.3".parse().unwrap());
    assert!(n.recently_knocked(&LARGE, home) && !n.recently_knocked(&SMALL, home));
    tokio::time::advance(KNOCK_FRESH).await;
    assert!(!n.recently_knocked(&LARGE, home), "a knock counts for KNOCK_FRESH");
    // A flood of claims from elsewhere fills the table, not the neighbor's entry once recorded.
    n.knocked(&LARGE, home);
    for i in 0..(KNOCKED_MAX as u8 * 2) {
        n.knocked(&Fingerprint([i; 32]), elsewhere);
    }
    assert!(n.recently_knocked(&LARGE, home));
}
