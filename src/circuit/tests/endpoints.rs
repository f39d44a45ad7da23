//! Circuit ends (SPEC §7.3, §7.5): a requester router Q and a target router R joined by an in-memory link, with
//! the real end-to-end session between them.

use std::sync::Arc;
use std::time::Duration;

use anomos_proto::cell::{BreakReason, Cell, Command, DenyReason};
use anomos_proto::tracker::{CircuitGrant, FailureKind};

use super::*;

/// Moves cells between two wires (both directions) until dropped.
struct Pump(tokio::task::JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn pump(x: Arc<Wire>, y: Arc<Wire>) -> Pump {
    Pump(tokio::spawn(async move {
        loop {
            for c in x.link.writer.take_written() {
                let _ = y.sink.cell(c);
            }
            for c in y.link.writer.take_written() {
                let _ = x.sink.cell(c);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }))
}

/// A requester Q and a serving target R, joined by an in-memory link (window 8) whose cells are pumped.
struct Joined {
    q: Peer,
    r: Peer,
    qw: Arc<Wire>,
    _pump: Pump,
}

fn joined() -> Joined {
    let q = Peer::new(1, Knobs::default());
    let r = Peer::new(0, Knobs { serve: true, ..Knobs::default() });
    let qw = Arc::new(q.link(5, 0, true, 8));
    let rw = Arc::new(r.link(5, 1, false, 8));
    let _pump = pump(qw.clone(), rw);
    Joined { q, r, qw, _pump }
}

fn grant(r: &Peer, expires: u64) -> CircuitGrant {
    CircuitGrant {
        circuit: 77,
        first_hop: anomos_proto::ids::NeighborId(5),
        tc: tc(vec![(r.public(), layer(5, None, expires))]).to_vec(),
        hop_secrets: vec![[3; 32]],
        e2e_secret: [9; 32],
        session: [7; 16],
        expires,
    }
}

#[tokio::test]
async fn a_requester_and_a_target_talk_end_to_end_and_close_gracefully() {
    let Joined { q, r, qw: _qw, _pump } = joined();
    let mut s = q.router.open_circuit(&grant(&r, soon())).await.expect("circuit opens");
    assert_eq!(s.hops, 1);
    // Messages larger than a window of cells make flow control work in both directions.
    let big = vec![0x5au8; 100_000];
    for msg in [b"ping".to_vec(), big] {
        s.send(msg.clone()).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), msg, "echoed");
    }
    assert_eq!((q.router.by_role().origin, r.router.by_role().target), (1, 1));
    s.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((q.router.circuit_count(), r.router.circuit_count()), (0, 0), "both ends let go");
}

#[tokio::test]
async fn a_refused_circuit_reports_the_deny_and_a_lost_link_breaks_and_reports() {
    let Joined { q, r, qw, _pump } = joined();
    // Expired grant: R denies; Q's open fails with the reason and a report goes to the tracker.
    let err = q.router.open_circuit(&grant(&r, unix_now() - 3600)).await.err().expect("denied");
    assert!(matches!(err, crate::PeerError::Denied(DenyReason::Expired)), "{err}");
    let rep = q.reports.lock().unwrap().try_recv().expect("a report");
    assert_eq!(rep.kind, FailureKind::CircuitDenied(DenyReason::Expired.code()));
    // An open circuit whose link fails: the stream ends with `link-failed` and it is reported.
    let mut s = q.router.open_circuit(&grant(&r, soon())).await.expect("opens");
    q.router.detach(&qw.link);
    assert!(matches!(s.recv().await, Err(crate::PeerError::Broken(BreakReason::LinkFailed))));
    let rep = q.reports.lock().unwrap().try_recv().expect("a report");
    assert_eq!(rep.kind, FailureKind::CircuitBroken(BreakReason::LinkFailed.code()));
    drop(s);
    assert_eq!(q.router.circuit_count(), 0, "the slot is free once the application let go");
}

#[tokio::test]
async fn no_link_to_the_first_hop_is_reported_naming_the_circuit() {
    // The first hop's link never comes up within the requester's wait (it was killed): the open fails and the
    // tracker hears of it, with the circuit's handle (it knows the path, so it can blame the first hop).
    let q = Peer::new(1, Knobs::default());
    let r = Peer::new(0, Knobs { serve: true, ..Knobs::default() });
    let err = q.router.open_circuit(&grant(&r, soon())).await.err().expect("no link");
    assert!(matches!(err, crate::PeerError::NoLink(_)), "{err}");
    let rep = q.reports.lock().unwrap().try_recv().expect("a report");
    assert_eq!(rep.kind, FailureKind::CircuitBroken(BreakReason::LinkFailed.code()));
    assert_eq!((rep.circuit, rep.hop_tag, rep.neighbor), (Some(77), None, None));
}

#[tokio::test]
async fn a_target_breaks_a_circuit_on_cells_only_a_relay_or_requester_may_get() {
    let r = Peer::new(0, Knobs { serve: true, ..Knobs::default() });
    let a = r.link(5, 1, true, 8);
    let id = a.id();
    a.send(Cell::open(id, &tc(vec![(r.public(), layer(5, None, soon()))])));
    a.wait_on(id, Command::Confirm).await;
    // A CONFIRM sent *to* the target (it travels only backward): BREAK `protocol`.
    a.send(Cell::new(id, Command::Confirm));
    assert_eq!(a.wait_on(id, Command::Break).await.break_fields().unwrap().0, BreakReason::Protocol);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(r.router.circuit_count(), 0);
    // Garbage DATA in place of the requester's HELLO: BREAK `integrity`.
    let id = a.id();
    a.send(Cell::open(id, &tc(vec![(r.public(), layer(5, None, soon()))])));
    a.send(data(id, 1));
    assert_eq!(a.wait_on(id, Command::Break).await.break_fields().unwrap().0, BreakReason::Integrity);
}

#[tokio::test]
async fn shutdown_breaks_every_circuit_and_refuses_new_ones() {
    let Joined { q, r, qw: _qw, _pump } = joined();
    let mut s = q.router.open_circuit(&grant(&r, soon())).await.expect("opens");
    assert_eq!(r.router.shutdown(), 1);
    assert!(matches!(s.recv().await, Err(crate::PeerError::Broken(BreakReason::Shutdown))));
    // A send on the ended circuit fails with the reason it ended (the bridge logs it), not a bare `finished`.
    let sent = s.send(b"late".to_vec()).await;
    assert!(matches!(sent, Err(crate::PeerError::Broken(BreakReason::Shutdown))), "{sent:?}");
    let err = q.router.open_circuit(&grant(&r, soon())).await.err().expect("refused");
    assert!(matches!(err, crate::PeerError::Denied(DenyReason::CircuitLimit)), "{err}");
}

/// A far end that reads nothing returns no credit: after `CREDIT_STALL` of waiting, the sender breaks the circuit
/// with `timeout` instead of holding it (and whatever serves it) for ever (found in review, session 10).
#[tokio::test(start_paused = true)]
async fn a_send_without_credit_for_the_stall_time_breaks_the_circuit_with_timeout() {
    let Joined { q, r, qw: _qw, _pump } = joined();
    let s = q.router.open_circuit(&grant(&r, soon())).await.expect("circuit opens");
    let started = tokio::time::Instant::now();
    // The target echoes; we never read, so once we buffered `RECV_BUFFER` (4 MiB) of its echo it gets no more
    // credit, stops reading us, and once it buffered 4 MiB of ours, our own sends wait for its credit in turn.
    // Both waits end at the stall time.
    let sent = tokio::time::timeout(Duration::from_secs(300), async {
        for _ in 0..400 {
            s.send(vec![0x5a; 50_000]).await?;
        }
        Ok::<(), crate::PeerError>(())
    })
    .await
    .expect("the sends end within 300 s");
    assert!(matches!(sent, Err(crate::PeerError::Broken(BreakReason::Timeout))), "{sent:?}");
    let waited = started.elapsed();
    assert!(waited >= crate::circuit::endpoint::CREDIT_STALL, "broken after {waited:?}");
    assert!(waited < crate::circuit::endpoint::CREDIT_STALL * 2, "broken after {waited:?}");
}
