//! Well-formed input with hostile *meaning* against a live relay process (issue 12): every cell here decodes,
//! authenticates and comes over a real neighbor link from a peer the tracker admitted (`tests/harden`'s
//! `RawPeer`). Each attack is its own test so a failure names it. Each must be answered (DENY/BREAK) or ignored
//! with a log line, and leave the relay serving its other neighbors: a bystander circuit through every relay
//! keeps moving, the relay still relays a fresh circuit, and its memory stays bounded.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anomos_proto::cell::{BreakReason, Cell, Command, DenyReason};
use anomos_proto::ids::NeighborId;
use anomos_proto::tc;
use harden::*;

const SECS: Duration = Duration::from_secs(10);

/// A tracker, three relays (relay0 is the victim, with `victim_flags`), a serving peer; a bystander circuit over
/// all three relays; two raw neighbors A and B linked to the victim.
struct Arena {
    net: Net,
    _dir: tempfile::TempDir,
    _requester: Arc<anomos::Node>,
    pinger: Pinger,
    a: Arc<RawPeer>,
    b: Arc<RawPeer>,
    la: RawLink,
    lb: RawLink,
    victim_key: anomos_proto::identity::PublicKey,
}

async fn arena(victim_flags: &[&str]) -> Arena {
    // Debug for the circuit layer: "ignored" cells are logged there.
    let mut net = Net::new_with_env(&["--neighbors", "12"], &[("RUST_LOG", "info,anomos::circuit=debug")]);
    net.peer_flags = ["--handshake-timeout", "2", "--max-conns-per-ip", "24"].map(String::from).to_vec();
    for name in ["relay0", "relay1", "relay2", "server"] {
        net.preset_high_key(name);
    }
    net.add_peer("relay0", victim_flags);
    net.add_peer("relay1", &[]);
    net.add_peer("relay2", &[]);
    net.add_peer("server", &["--serve", "regtest", "--mine", "50"]);
    let dir = tempfile::tempdir().unwrap();
    let requester = node_in(&net, dir.path(), None, |_| {}).await;
    // Three relays on the path: the victim is on it.
    let pinger = Pinger::start(circuit(&requester, "regtest", 3).await);
    pinger.assert_moving("before the attack").await;
    let fps: Vec<_> = net.peers.iter().map(|p| p.fp()).collect();
    let a = RawPeer::start_below(net.tracker_addr(), &net.tracker_fp(), &fps).await;
    let b = RawPeer::start_below(net.tracker_addr(), &net.tracker_fp(), &fps).await;
    let v = net.peers[0].fp();
    let la = a.link(&v).await;
    let lb = b.link(&v).await;
    // Raw peers announce like real ones, or the tracker expires them (3 intervals of 2 s) and the victim
    // retires their links mid-test.
    a.keep_announcing(Duration::from_secs(1));
    b.keep_announcing(Duration::from_secs(1));
    let victim_key = net.identity("relay0").public().clone();
    Arena { net, _dir: dir, _requester: requester, pinger, a, b, la, lb, victim_key }
}

impl Arena {
    fn victim(&self) -> &P {
        &self.net.peers[0]
    }

    /// A TC for A → victim → B (B the target).
    fn a_to_b(&self) -> Box<[u8; tc::TC_LEN]> {
        build_tc(
            &[(self.victim_key.clone(), self.la.nid), (self.b.id.public().clone(), self.lb.nid)],
            "regtest",
            unix_secs() + 120,
        )
        .tc
    }

    /// Opens A → victim → B; returns (id on A's link, id on B's link).
    async fn open_a_to_b(&mut self) -> (u32, u32) {
        let id = self.la.alloc_id();
        let tc = self.a_to_b();
        self.la.send(&Cell::open(id, &tc)).await.unwrap();
        // (Cells of earlier circuits, e.g. their BREAKs, may come first.)
        loop {
            let c = self.lb.recv(SECS).await.expect("the victim forwards the OPEN");
            if c.command == Command::Open {
                return (id, c.circ_id);
            }
        }
    }

    /// The victim still relays a fresh circuit A → victim → B, confirmed end to end, and the bystander moves.
    async fn assert_still_serving(&mut self, when: &str) {
        let (id, out) = self.open_a_to_b().await;
        self.lb.send(&Cell::new(out, Command::Confirm)).await.unwrap();
        let c = self.la.recv_on(id, SECS).await.map(|c| c.command);
        assert_eq!(c, Some(Command::Confirm), "the victim no longer relays ({when})");
        self.la.send(&Cell::brk(id, BreakReason::Finished, None)).await.unwrap();
        self.pinger.assert_moving(when).await;
        for p in self.net.peers.iter_mut() {
            p.assert_healthy();
        }
    }

    /// Expects a log line with all of `pats` in the victim's log after `t`; returns it.
    fn expect_log(&self, t: u128, pats: &[&str]) -> String {
        match self.victim().wait_log_after(t, pats, SECS) {
            Some(l) => l.text,
            None => panic!("no log line with {pats:?}:\n{}", self.victim().log_text()),
        }
    }
}

fn deny_reason(c: &Option<Cell>) -> Option<DenyReason> {
    c.as_ref().filter(|c| c.command == Command::Deny).and_then(|c| c.deny_fields().ok()).map(|(r, _)| r)
}

#[test]
fn a_path_that_loops_back_over_its_incoming_edge_is_denied_within_a_second() {
    serial_async(async {
        let mut t = arena(&[]).await;
        // The victim's layer names A's edge both as prev and as next (the OPEN that froze every peer before).
        let looped = build_tc(
            &[(t.victim_key.clone(), t.la.nid), (t.a.id.public().clone(), t.la.nid)],
            "regtest",
            unix_secs() + 120,
        );
        let since = unix_ms();
        let start = Instant::now();
        let id = t.la.alloc_id();
        t.la.send(&Cell::open(id, &looped.tc)).await.unwrap();
        let answer = t.la.recv_on(id, SECS).await;
        let took = start.elapsed();
        assert_eq!(deny_reason(&answer), Some(DenyReason::Loop));
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        eprintln!("loop: DENY loop in {took:?}; {}", t.expect_log(since, &["circuit denied: loop"]));
        t.assert_still_serving("after the looping OPEN").await;
    })
}

#[test]
fn a_path_through_the_same_relay_twice_is_relayed_without_harm() {
    serial_async(async {
        let mut t = arena(&[]).await;
        // A → victim → B → victim → A: B peels its own layer and sends the rest back over the same link.
        let exp = unix_secs() + 120;
        let (na, nb) = (t.la.nid, t.lb.nid);
        let path = build_tc(
            &[
                (t.victim_key.clone(), na),
                (t.b.id.public().clone(), nb),
                (t.victim_key.clone(), nb),
                (t.a.id.public().clone(), na),
            ],
            "regtest",
            exp,
        );
        // B's layer names `nb` as next hop (a loop at B, which B does not mind: it is the attacker).
        let id = t.la.alloc_id();
        t.la.send(&Cell::open(id, &path.tc)).await.unwrap();
        let first = t.lb.recv(SECS).await.expect("first pass forwarded to B");
        let peeled = tc::peel(&first.open_tc().unwrap(), &t.b.id).expect("B peels its layer");
        let back = t.lb.alloc_id();
        t.lb.send(&Cell::open(back, &peeled.next.expect("a next TC"))).await.unwrap();
        let second = t.la.recv(SECS).await.expect("second pass forwarded to A");
        assert_eq!(second.command, Command::Open);
        eprintln!("same relay twice: both passes relayed (ids {id:#x} and {back:#x})");
        t.assert_still_serving("after the double pass").await;
    })
}

#[test]
fn a_flood_of_opens_to_an_edge_the_relay_lacks_with_data_behind_each_holds_nothing() {
    serial_async(async {
        // The setting: a 4,096-cell (16 MiB) budget. Each OPEN waits for an edge the relay does not know
        // until a fresh neighbor table still lacks it (at most 3 s: it may be new); the DATA behind it is charged
        // to the flooder's share of that budget.
        let mut t = arena(&["--max-queued-cells", "4096"]).await;
        let rss0 = t.victim().rss_kib();
        let since = unix_ms();
        let start = Instant::now();
        let n = 300;
        let mut ids = Vec::new();
        for i in 0..n {
            let nowhere = NeighborId(0x5eed_0000 + i);
            let tc = build_tc(
                &[(t.victim_key.clone(), t.la.nid), (t.b.id.public().clone(), nowhere)],
                "regtest",
                unix_secs() + 120,
            );
            let id = t.la.alloc_id();
            let mut burst = t.la.seal(&Cell::open(id, &tc.tc));
            for _ in 0..128 {
                burst.extend(t.la.seal(&Cell::new(id, Command::Data)));
            }
            t.la.send_raw(&burst).await.unwrap();
            ids.push(id);
        }
        // Each OPEN is answered once: DENY `no-such-neighbor`, or — once the flooder is over its share of the
        // budget with the DATA it piles behind its OPENs — BREAK `resources` for that opening circuit.
        let (mut denied, mut broken) = (0, 0);
        while denied + broken < n {
            match t.la.recv(SECS).await {
                Some(c) if c.command == Command::Deny => {
                    assert_eq!(c.deny_fields().unwrap().0, DenyReason::NoSuchNeighbor);
                    denied += 1;
                }
                Some(c) if c.command == Command::Break => {
                    assert_eq!(c.break_fields().unwrap().0, BreakReason::Resources);
                    broken += 1;
                }
                Some(_) => {}
                None => panic!("only {} of {n} OPENs answered", denied + broken),
            }
        }
        let took = start.elapsed();
        let rss1 = t.victim().rss_kib();
        eprintln!(
            "edge flood: {n} OPENs × 128 DATA: {denied} denied no-such-neighbor, {broken} broken resources, in {took:?}; RSS {} → {} MiB; {}",
            rss0 / 1024,
            rss1 / 1024,
            t.expect_log(since, &["circuit denied", "no-such-neighbor"])
        );
        assert!(took < Duration::from_secs(5), "{took:?}: the relay waited on edges it does not have");
        // Budget (16 MiB) plus the peel threads and allocator slack; before, this flood took 200 MiB and kept it.
        assert!(rss1 < rss0 + 48 * 1024, "RSS grew from {rss0} to {rss1} KiB");
        t.assert_still_serving("after the edge flood").await;
    })
}

#[test]
fn cells_on_unknown_or_opening_ids_are_ignored_with_a_log_line() {
    serial_async(async {
        let mut t = arena(&[]).await;
        let since = unix_ms();
        let unknown = t.la.alloc_id();
        for cell in [
            Cell::new(unknown, Command::Data),
            Cell::sendme(unknown, 32),
            Cell::brk(unknown, BreakReason::Finished, None),
        ] {
            t.la.send(&cell).await.unwrap();
        }
        eprintln!("unknown id: {}", t.expect_log(since, &["cell for unknown circuit dropped"]));
        eprintln!("unknown id: {}", t.expect_log(since, &["SENDME for unknown circuit ignored"]));
        // On an opening id: DATA is buffered, a stray CONFIRM ignored, BREAK acknowledged (and no answer after it).
        let id = t.la.alloc_id();
        let tc = t.a_to_b();
        let mut burst = t.la.seal(&Cell::open(id, &tc));
        burst.extend(t.la.seal(&Cell::new(id, Command::Confirm)));
        burst.extend(t.la.seal(&Cell::brk(id, BreakReason::Finished, None)));
        t.la.send_raw(&burst).await.unwrap();
        let ack = t.la.recv_on(id, SECS).await.map(|c| c.command);
        assert_eq!(ack, Some(Command::AckBreak));
        assert!(t.la.recv_on(id, Duration::from_secs(2)).await.is_none(), "an answer after the ACKBREAK");
        t.assert_still_serving("after cells on unknown and opening ids").await;
    })
}

#[test]
fn a_sendme_beyond_the_window_breaks_the_circuit() {
    serial_async(async {
        let mut t = arena(&[]).await;
        let (id, out) = t.open_a_to_b().await;
        let since = unix_ms();
        // B grants the victim far more credit than B's window (128) allows.
        for _ in 0..20 {
            t.lb.send(&Cell::sendme(out, u16::MAX)).await.unwrap();
        }
        let brk = t.la.recv_on(id, SECS).await.expect("BREAK upstream");
        assert_eq!((brk.command, brk.break_fields().unwrap().0), (Command::Break, BreakReason::Protocol));
        eprintln!("credit overflow: {}", t.expect_log(since, &["SENDME beyond the window"]));
        t.assert_still_serving("after the credit overflow").await;
    })
}

#[test]
fn confirm_or_deny_from_the_requester_side_breaks_the_circuit() {
    serial_async(async {
        let mut t = arena(&[]).await;
        for cmd in [Command::Confirm, Command::Deny] {
            let (id, out) = t.open_a_to_b().await;
            let since = unix_ms();
            t.la.send(&Cell::new(id, cmd)).await.unwrap(); // travels forward: only ever sent backward
            let up = t.la.recv_on(id, SECS).await.expect("BREAK upstream");
            assert_eq!((up.command, up.break_fields().unwrap().0), (Command::Break, BreakReason::Protocol));
            let down = t.lb.recv_on(out, SECS).await.expect("BREAK downstream");
            assert_eq!(down.command, Command::Break);
            eprintln!("{cmd:?} from upstream: {}", t.expect_log(since, &["unexpected cell on relayed circuit"]));
        }
        t.assert_still_serving("after CONFIRM/DENY from the requester side").await;
    })
}

#[test]
fn an_id_reused_right_after_break_carries_a_new_circuit() {
    serial_async(async {
        let mut t = arena(&[]).await;
        let id = t.la.alloc_id();
        for round in 0..3 {
            // OPEN, BREAK and the same id's next OPEN back to back: the first may still be peeling.
            let tc = t.a_to_b();
            let mut burst = t.la.seal(&Cell::open(id, &tc));
            burst.extend(t.la.seal(&Cell::brk(id, BreakReason::Finished, None)));
            t.la.send_raw(&burst).await.unwrap();
            let again = t.a_to_b();
            t.la.send(&Cell::open(id, &again)).await.unwrap();
            // The last OPEN forwarded to B is the live circuit; it confirms end to end.
            let mut out = None;
            let deadline = Instant::now() + SECS;
            while Instant::now() < deadline {
                match t.lb.recv(Duration::from_millis(500)).await {
                    Some(c) if c.command == Command::Open => out = Some(c.circ_id),
                    Some(_) => {}
                    None if out.is_some() => break,
                    None => {}
                }
            }
            let out = out.expect("the reused id's OPEN was forwarded");
            t.lb.send(&Cell::new(out, Command::Confirm)).await.unwrap();
            let mut confirmed = false;
            while let Some(c) = t.la.recv_on(id, Duration::from_secs(3)).await {
                assert_ne!(c.command, Command::Deny, "round {round}: the new circuit on the reused id was refused");
                if c.command == Command::Confirm {
                    confirmed = true;
                    break;
                }
            }
            assert!(confirmed, "round {round}: no CONFIRM for the new circuit on the reused id");
            t.la.send(&Cell::brk(id, BreakReason::Finished, None)).await.unwrap();
            assert_eq!(t.la.recv_on(id, SECS).await.map(|c| c.command), Some(Command::AckBreak));
        }
        eprintln!("id reuse: 3 rounds of OPEN+BREAK+OPEN on one id, each new circuit confirmed");
        t.assert_still_serving("after id reuse").await;
    })
}

#[test]
fn thousands_of_crossing_opens_leave_the_relay_responsive() {
    serial_async(async {
        let mut t = arena(&["--open-rate", "5000", "--open-burst", "5000"]).await;
        let n = 1500;
        let exp = unix_secs() + 120;
        let (ka, kb, kv) = (t.a.id.public().clone(), t.b.id.public().clone(), t.victim_key.clone());
        let (na, nb) = (t.la.nid, t.lb.nid);
        let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let x = build_tc(&[(kv.clone(), na), (kb.clone(), nb)], "regtest", exp);
            let y = build_tc(&[(kv.clone(), nb), (ka.clone(), na)], "regtest", exp);
            let (ia, ib) = (t.la.alloc_id(), t.lb.alloc_id());
            to_b.extend(t.la.seal(&Cell::open(ia, &x.tc)));
            to_a.extend(t.lb.seal(&Cell::open(ib, &y.tc)));
        }
        let start = Instant::now();
        // Both bursts at once, from both sides, while both sides also read what the victim forwards.
        let Arena { la, lb, .. } = &mut t;
        async fn burst_and_count(l: &mut RawLink, burst: &[u8], n: usize) -> usize {
            l.send_raw(burst).await.unwrap();
            let mut got = 0;
            while got < n {
                match l.recv(SECS).await {
                    Some(c) if c.command == Command::Open => got += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            got
        }
        let (at_a, at_b) = tokio::join!(burst_and_count(la, &to_b, n), burst_and_count(lb, &to_a, n));
        let took = start.elapsed();
        eprintln!("crossing OPENs: {n} each way, {at_b} and {at_a} forwarded in {took:?}");
        assert_eq!((at_a, at_b), (n, n), "the relay stopped forwarding crossing OPENs");
        t.assert_still_serving("after thousands of crossing OPENs").await;
    })
}

#[test]
fn circuits_that_never_return_credit_cost_only_their_opener() {
    serial_async(async {
        // A 4,096-cell budget (16 MiB): A's 64 circuits to B, which never reads, could hold 8,192 cells.
        let mut t = arena(&["--max-queued-cells", "4096"]).await;
        let since = unix_ms();
        let mut opened = Vec::new();
        for _ in 0..64 {
            let (id, _) = t.open_a_to_b().await;
            opened.push(id);
        }
        // A sends a window (128) on each, within its credit; B reads nothing from now on.
        let mut refused = 0;
        for &id in &opened {
            let mut burst = Vec::new();
            for _ in 0..128 {
                burst.extend(t.la.seal(&Cell::new(id, Command::Data)));
            }
            if t.la.send_raw(&burst).await.is_err() {
                break;
            }
        }
        while let Some(c) = t.la.recv(Duration::from_secs(3)).await {
            if c.command == Command::Break {
                assert_eq!(c.break_fields().unwrap().0, BreakReason::Resources);
                refused += 1;
            }
        }
        let g = t.victim().log_text();
        eprintln!("credit hoarding: {refused} of A's 64 circuits broken with `resources`");
        assert!(refused > 0, "A's circuits were never refused");
        assert!(!g.contains("control queue overflow"), "an innocent link was closed:\n{g}");
        let _ = since;
        // B's link is B's own problem (it stopped reading): a third neighbor C must still get circuits.
        let fps: Vec<_> = t.net.peers.iter().map(|p| p.fp()).collect();
        let c = RawPeer::start_below(t.net.tracker_addr(), &t.net.tracker_fp(), &fps).await;
        let lc = c.link(&t.victim().fp()).await;
        c.keep_announcing(Duration::from_secs(1));
        t.b = c;
        t.lb = lc;
        t.assert_still_serving("after A hoarded credit").await;
    })
}

#[test]
fn tracking_codes_valid_for_centuries_are_refused_and_leave_no_tag() {
    serial_async(async {
        let mut t = arena(&[]).await;
        let since = unix_ms();
        let centuries = unix_secs() + 300 * 365 * 86_400;
        for _ in 0..20 {
            let tc = build_tc(
                &[(t.victim_key.clone(), t.la.nid), (t.b.id.public().clone(), t.lb.nid)],
                "regtest",
                centuries,
            );
            let id = t.la.alloc_id();
            t.la.send(&Cell::open(id, &tc.tc)).await.unwrap();
            assert_eq!(deny_reason(&t.la.recv_on(id, SECS).await), Some(DenyReason::Expired));
        }
        eprintln!(
            "immortal TCs: {}",
            t.expect_log(since, &["circuit denied: expired", "no tracker issues such a layer"])
        );
        t.assert_still_serving("after immortal TCs").await;
    })
}
