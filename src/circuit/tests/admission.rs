//! OPEN admission at a hop: the checks of SPEC §4.7 each answered with its reason, and the fair shares of the
//! node's cell pool and circuit slots.

use std::time::Duration;

use anomos_proto::cell::{BreakReason, Cell, Command, DenyReason};
use anomos_proto::tc::MAX_LAYER_LIFETIME;

use super::*;

async fn deny_of(w: &Wire, tc: &[u8; tc::TC_LEN]) -> DenyReason {
    let id = w.id();
    w.send(Cell::open(id, tc));
    deny_reason(&w.wait_on(id, Command::Deny).await)
}

/// The expiry check reads the hop's own clock (`Transport::clock`): a hop whose clock runs ahead accepts a layer
/// that expired by the true clock within the skew tolerance (60 s here), and refuses one beyond it.
#[tokio::test]
async fn expiry_is_judged_on_the_hops_own_clock_within_the_skew_tolerance() {
    let now = unix_now();
    // 50 s ahead: a layer that expires in 5 s (true clock) is 45 s past expiry here, within the 60 s tolerance.
    let r = Peer::new(0, Knobs { serve: true, skew: 50, ..Knobs::default() });
    let a = r.link(10, 1, true, 8);
    let id = a.id();
    a.send(Cell::open(id, &tc(vec![(r.public(), layer(10, None, now + 5))])));
    let c = a.wait("an answer", |c| c.circ_id == id && matches!(c.command, Command::Confirm | Command::Deny)).await;
    assert_eq!(c.command, Command::Confirm, "refused: {:?}", c.deny_fields());
    // 90 s ahead: the same layer is 85 s past expiry there.
    let r = Peer::new(0, Knobs { serve: true, skew: 90, ..Knobs::default() });
    let a = r.link(10, 1, true, 8);
    assert_eq!(deny_of(&a, &tc(vec![(r.public(), layer(10, None, now + 5))])).await, DenyReason::Expired);
    // 90 s behind: a layer that expired 80 s ago by the true clock has not expired there.
    let r = Peer::new(0, Knobs { serve: true, skew: -90, ..Knobs::default() });
    let a = r.link(10, 1, true, 8);
    let id = a.id();
    a.send(Cell::open(id, &tc(vec![(r.public(), layer(10, None, now - 80))])));
    let c = a.wait("an answer", |c| c.circ_id == id && matches!(c.command, Command::Confirm | Command::Deny)).await;
    assert_eq!(c.command, Command::Confirm, "refused: {:?}", c.deny_fields());
}

#[tokio::test]
async fn every_failed_check_is_answered_with_its_reason() {
    let r = Peer::new(0, Knobs { serve: true, ..Knobs::default() });
    let a = r.link(10, 1, true, 8);
    let me = r.public();
    // Not a TC for us.
    assert_eq!(deny_of(&a, &[0x42; tc::TC_LEN]).await, DenyReason::BadTc);
    // Issued for another edge.
    assert_eq!(deny_of(&a, &tc(vec![(me.clone(), layer(11, None, soon()))])).await, DenyReason::WrongLink);
    // Expired, and valid for centuries (both `expired`; the second never enters the replay cache).
    let now = unix_now();
    assert_eq!(deny_of(&a, &tc(vec![(me.clone(), layer(10, None, now - 3600))])).await, DenyReason::Expired);
    let far = now + MAX_LAYER_LIFETIME + 3600;
    assert_eq!(deny_of(&a, &tc(vec![(me.clone(), layer(10, None, far))])).await, DenyReason::Expired);
    assert_eq!(r.router.replay_len(), 0, "refused layers leave no tag behind");
    // A chain we do not serve.
    let mut other = layer(10, None, soon());
    other.kind = anomos_proto::tc::LayerKind::Target {
        chain: anomos_proto::ids::ChainId::new("testnet4").unwrap(),
        session: [0; 16],
        e2e_secret: anomos_proto::crypto::Secret([1; 32]),
    };
    assert_eq!(deny_of(&a, &tc(vec![(me.clone(), other)])).await, DenyReason::NoSuchChain);
    // A good TC opens (CONFIRM); the same TC again is a replay.
    let good = tc(vec![(me.clone(), layer(10, None, soon()))]);
    let id = a.id();
    a.send(Cell::open(id, &good));
    a.wait_on(id, Command::Confirm).await;
    assert_eq!(deny_of(&a, &good).await, DenyReason::Replayed);
    // An id from our own half, and an id in use.
    let ours = a.id() ^ anomos_proto::cell::DIALER_CIRC_BIT;
    a.send(Cell::open(ours, &good));
    assert_eq!(deny_reason(&a.wait_on(ours, Command::Deny).await), DenyReason::Protocol);
    a.send(Cell::open(id, &good));
    assert_eq!(deny_reason(&a.wait_on(id, Command::Deny).await), DenyReason::Protocol);
    assert_eq!(r.stats.denied.load(std::sync::atomic::Ordering::Relaxed), 8);
}

#[tokio::test]
async fn one_neighbors_circuits_cannot_take_the_cell_budget_from_the_others() {
    // 64 cells of budget (fair part when tight: 32 / 5 shares = 6). A opens circuits to a sink S that never
    // reads; H's circuit to T must keep working, and no link may be closed for what A did.
    let r = Peer::new(0, Knobs { max_cells: 64, ..Knobs::default() });
    let a = r.link(10, 1, true, 8);
    let s = r.link(20, 2, false, 0); // announces no credit: nothing we queue for it ever leaves
    let h = r.link(30, 1, true, 8);
    let t = r.link(40, 2, false, 8);
    let (mut broken, mut denied) = (0, 0);
    for _ in 0..8 {
        let id = a.id();
        a.send(Cell::open(
            id,
            &tc(vec![
                (r.public(), layer(10, Some(20), soon())),
                (identity(2).public().clone(), layer(20, None, soon())),
            ]),
        ));
        // Either the OPEN reaches the sink, or (A over its share already) A is refused.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let opened = loop {
            if s.drain().iter().any(|c| c.command == Command::Open) {
                break true;
            }
            if let Some(d) = a.drain().iter().find(|c| c.circ_id == id && c.command == Command::Deny) {
                assert_eq!(deny_reason(d), DenyReason::CircuitLimit);
                break false;
            }
            assert!(tokio::time::Instant::now() < deadline, "OPEN neither forwarded nor denied");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if !opened {
            denied += 1;
            continue;
        }
        for mark in 0..8 {
            a.send(data(id, mark)); // within A's credit (8)
        }
        if a.drain().iter().any(|c| c.circ_id == id && c.command == Command::Break) {
            broken += 1;
        }
    }
    assert!(broken + denied >= 3, "A's circuits were never refused ({broken} broken, {denied} denied)");
    assert!(r.cells.used() <= 64, "the pool held {}", r.cells.used());
    // H still gets a whole window through to T.
    let id = h.id();
    h.send(Cell::open(
        id,
        &tc(vec![(r.public(), layer(30, Some(40), soon())), (identity(2).public().clone(), layer(40, None, soon()))]),
    ));
    let open = t.wait("H's OPEN", |c| c.command == Command::Open).await;
    for mark in 0..6 {
        h.send(data(id, mark));
    }
    for _ in 0..6 {
        t.wait_on(open.circ_id, Command::Data).await;
    }
    assert!(!h.drain().iter().any(|c| c.command == Command::Break), "an innocent circuit was broken");
    for w in [&a, &s, &h, &t] {
        assert!(!w.link.writer.is_closed(), "a link was closed");
    }
}

#[tokio::test]
async fn one_neighbor_cannot_take_every_circuit_slot() {
    // 20 slots: when more than 10 are in use, a neighbor over 10 / 4 shares is refused `circuit-limit`.
    let r = Peer::new(0, Knobs { max_circuits: 20, serve: true, ..Knobs::default() });
    let a = r.link(10, 1, true, 8);
    let h = r.link(30, 2, true, 8);
    let mut refused = 0;
    for _ in 0..20 {
        let id = a.id();
        a.send(Cell::open(id, &tc(vec![(r.public(), layer(10, None, soon()))])));
        let c = a.wait("an answer", |c| c.circ_id == id && matches!(c.command, Command::Confirm | Command::Deny)).await;
        if c.command == Command::Deny {
            assert_eq!(deny_reason(&c), DenyReason::CircuitLimit);
            refused += 1;
        }
    }
    assert!(refused >= 9, "A got {} of 20 slots", 20 - refused);
    let id = h.id();
    h.send(Cell::open(id, &tc(vec![(r.public(), layer(30, None, soon()))])));
    h.wait_on(id, Command::Confirm).await;
}

#[tokio::test]
async fn a_flood_of_opens_is_denied_unpeeled_then_the_link_is_closed() {
    let r = Peer::new(0, Knobs::default()); // 1000/s, burst 1000
    let a = r.link(10, 1, true, 8);
    for i in 0..2100 {
        let id = a.id();
        let _ = a.sink.cell(Cell::open(id, &[0x42; tc::TC_LEN]));
        if a.link.writer.is_closed() {
            break;
        }
        if i % 100 == 0 {
            a.drain(); // the neighbor reads its DENYs
        }
    }
    assert!(a.link.writer.is_closed(), "a flooding link stays open");
    assert_eq!(a.link.close_reason(), Some("OPEN flood"));
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn cells_on_unknown_or_opening_ids_are_ignored_or_refused() {
    let r = Peer::new(0, Knobs::default());
    let a = r.link(10, 1, true, 8);
    // DATA, SENDME, CONFIRM, DENY on ids that do not exist: nothing happens.
    for cmd in [Command::Data, Command::Confirm, Command::Deny, Command::AckBreak] {
        a.send(Cell::new(0x55, cmd));
    }
    a.send(Cell::sendme(0x55, 4));
    assert!(a.quiet_on(0x55, Duration::from_millis(50)).await);
    // SENDME with zero credit is a link-level violation.
    let mut zero = Cell::sendme(0x55, 1);
    zero.payload[..2].copy_from_slice(&[0, 0]);
    assert!(a.sink.cell(zero).is_err());
    // A BREAK behind an OPEN is acknowledged; the OPEN is then never answered.
    let id = a.id();
    a.send(Cell::open(
        id,
        &tc(vec![(r.public(), layer(10, Some(20), soon())), (identity(2).public().clone(), layer(20, None, soon()))]),
    ));
    a.send(Cell::brk(id, BreakReason::Finished, None));
    a.wait_on(id, Command::AckBreak).await;
    assert!(a.quiet_on(id, Duration::from_millis(200)).await);
    // The peel still completes (its replay tag is recorded) and only then frees the slot: on a loaded machine the
    // RSA step can take longer than the 200 ms above (seen once in a parallel test run beside a build).
    let freed = tokio::time::timeout(Duration::from_secs(10), async {
        while r.router.circuit_count() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(freed.await.is_ok(), "the abandoned opening's slot was never freed");
}
