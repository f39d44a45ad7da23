//! The announce interval grows with the overlay (`--announce-rate`), and each peer stays live for three of the
//! intervals it was handed, over real sockets on 127.0.0.1.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;

async fn interval(o: &mut Overlay, i: usize) -> u32 {
    match o.clients[i].announce(o.peers[i].listen, vec![]).await {
        FromTracker::Announced(r) => {
            o.tables[i] = r.neighbors;
            r.interval_secs
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_overlay_is_handed_a_longer_interval_and_kept_live_for_it() {
    // At most one announce a second: 3 peers are handed 3 s, and a silent one stays live for 9 s.
    let t = start(|a| {
        a.neighbors = 2;
        a.interval = 1;
        a.announce_rate = 1;
    })
    .await;
    let mut o = Overlay::new(&t, 3).await;
    assert_eq!(interval(&mut o, 0).await, 3);
    assert_eq!(interval(&mut o, 1).await, 3);
    // Peer 2 goes silent after its last announce (handed 3 s in Overlay::new's last round). Past 3 × --interval
    // it is still its neighbors' neighbor: it was told to announce only every 3 s.
    let silent_since = tokio::time::Instant::now();
    while silent_since.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..2 {
            interval(&mut o, i).await;
        }
    }
    for i in 0..2 {
        assert_eq!(o.tables[i].len(), 2, "peer {i} lost the silent peer before 3 of its intervals");
    }
    // Past 3 × 3 s it expires (housekeeping runs every second; a loaded host may be late), and the two left
    // are handed 2 s.
    while o.tables.iter().take(2).any(|t| t.len() != 1) && silent_since.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..2 {
            interval(&mut o, i).await;
        }
    }
    assert!(silent_since.elapsed() >= Duration::from_secs(9), "expired before 3 of its intervals");
    for i in 0..2 {
        assert_eq!(o.tables[i].len(), 1, "expired neighbor still listed");
        assert_eq!(interval(&mut o, i).await, 2);
    }
    assert_eq!(error_code(&o.clients[2].circuits(1, 1).await), Some(ErrorCode::UnknownPeer));
}
