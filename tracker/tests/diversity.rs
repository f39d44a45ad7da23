//! Issue 14 over real sockets: admission limits per address, and paths that never hold two hops of one /16.
//! Peers sit on distinct addresses of 127.0.0.0/8 (Linux loopback answers on all of them), so 127.A.0.0/16 is
//! a distinct /16 for each A.
// Test and measurement code: a failed assumption should fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::net::IpAddr;

use common::*;

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::from([a, b, c, d])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_refuses_the_excess_identities_of_one_address() {
    let t = start(|a| a.allow_same_ip = false).await;
    let addr = ip(127, 0, 0, 5);
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for n in 1..=4 {
        let p = fake_peer_at(n, addr).await;
        clients.push(connect_from(&t, p.id(), addr).await);
        peers.push(p);
    }
    // The default admits two live identities per IPv4 address.
    for i in 0..2 {
        clients[i].announce_ok(peers[i].listen).await;
    }
    for i in 2..4 {
        let r = clients[i].announce(peers[i].listen, vec![chain()]).await;
        assert_eq!(error_code(&r), Some(ErrorCode::AddressLimit), "identity {i}: {r:?}");
        let FromTracker::Error(e) = r else { unreachable!() };
        assert!(e.message.contains("127.0.0.5/32") && e.message.contains("IPv4 address"), "{}", e.message);
    }
    // The admitted ones keep announcing; a peer on another address is still admitted.
    for i in 0..2 {
        clients[i].announce_ok(peers[i].listen).await;
    }
    let other = ip(127, 0, 0, 6);
    let p = fake_peer_at(5, other).await;
    connect_from(&t, p.id(), other).await.announce_ok(p.listen).await;

    // A /24 limit counts every address in it.
    let t = start(|a| {
        a.allow_same_ip = false;
        a.max_per_ipv4_24 = 3;
    })
    .await;
    let mut refused = 0;
    for n in 1..=4u8 {
        let at = ip(127, 0, 9, n);
        let p = fake_peer_at(usize::from(n), at).await;
        let r = connect_from(&t, p.id(), at).await.announce(p.listen, vec![]).await;
        refused += usize::from(error_code(&r) == Some(ErrorCode::AddressLimit));
    }
    assert_eq!(refused, 1, "the fourth identity in one /24 is refused");

    // --allow-same-ip (loopback overlays) lifts the limits.
    let t = start(|a| a.allow_same_ip = true).await;
    for n in 1..=4 {
        let p = fake_peer_at(n, addr).await;
        connect_from(&t, p.id(), addr).await.announce_ok(p.listen).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_never_holds_two_hops_of_one_16() {
    let t = start(|a| a.allow_same_ip = false).await;
    // Six peers on six /16s, four on one /16 (127.50.0.0/16, distinct addresses and /24s).
    let mut ips: Vec<IpAddr> = (11..=16).map(|a| ip(127, a, 0, 1)).collect();
    ips.extend((0..4).map(|c| ip(127, 50, c, 1)));
    let mut o = Overlay::new_at(&t, &ips).await;
    let prefix = |i: usize| match o.peers[i].listen.ip() {
        IpAddr::V4(v4) => (v4.octets()[0], v4.octets()[1]),
        IpAddr::V6(_) => unreachable!(),
    };
    let prefixes: Vec<(u8, u8)> = (0..ips.len()).map(prefix).collect();
    // Neighbors: nobody has two neighbors in one /16, and no edge lies inside one.
    for (i, table) in o.tables.iter().enumerate() {
        let mut seen: Vec<(u8, u8)> = vec![prefixes[i]];
        for n in table {
            let j = o.by_der(&n.public_key);
            assert!(!seen.contains(&prefixes[j]), "peer {i} has two neighbors in one /16 (or one in its own)");
            seen.push(prefixes[j]);
        }
    }
    let mut crowded_used = 0;
    // Requesters on their own /16s (a crowded peer may have too few neighbors for a path).
    for requester in 0..6 {
        for relays in [2, 3, 3, 4] {
            let grants = match o.clients[requester].circuits(4, relays).await {
                FromTracker::Circuits(r) => r.circuits,
                other => panic!("requester {requester}: {other:?}"),
            };
            for g in &grants {
                let relays = g.hop_secrets.len() - 1;
                let (path, _) = o.trace(requester, g, relays);
                let mut hops: Vec<(u8, u8)> = vec![prefixes[requester]];
                hops.extend(path.iter().map(|h| prefixes[*h]));
                let distinct: HashSet<_> = hops.iter().collect();
                assert_eq!(distinct.len(), hops.len(), "two hops of one /16: {hops:?}");
                crowded_used += path.iter().filter(|h| prefixes[**h] == (127, 50)).count();
            }
        }
        o.announce_all().await;
    }
    // The crowded /16 is not shut out: one of its peers may be on a path.
    assert!(crowded_used > 0, "the crowded /16 never used at all");
}
