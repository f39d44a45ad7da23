//! Unit tests of the link writer: per-circuit charging, credit limits, control-queue overflow, stalled writes.

use super::*;

fn data(id: CircId) -> Cell {
    Cell::new(id, Command::Data)
}

/// The dialer's cipher of a real (in-memory) handshake.
fn link_cipher() -> anomos_proto::link::LinkCipher {
    use anomos_proto::identity::Identity;
    use anomos_proto::link::{Acceptor, Dialer};
    let rng = &mut rand::rngs::OsRng;
    let (d_id, a_id) = (Identity::generate(rng, 2048).unwrap(), Identity::generate(rng, 2048).unwrap());
    let nid = anomos_proto::ids::NeighborId(7);
    let (d, hello) = Dialer::start(rng, a_id.public().clone(), nid);
    let (a, reply) = Acceptor::start(rng, &hello).unwrap();
    let (d, auth) = d.on_reply(&reply, &d_id, rng).unwrap();
    let out = a.on_auth(&auth, &a_id, rng, |_| Some((d_id.public().clone(), nid)), |_| false).unwrap();
    d.on_auth_reply(&out.reply).unwrap()
}

use crate::link::budget::Pool;

fn control() -> Arc<Share> {
    Pool::new("control cells", usize::MAX).share()
}

#[test]
fn cells_are_charged_to_their_circuits_share_and_the_heaviest_is_refused_first() {
    let cells = Pool::new("cells", 20);
    let (heavy, light) = (cells.share(), cells.share());
    // Two links; the heavy neighbor's circuit sits on link `a`, the light one's on link `b`.
    let a = LinkWriter::new(100, control());
    let b = LinkWriter::new(100, control());
    a.add_circuit(1, 0, 0, Drain::none(), heavy.clone());
    b.add_circuit(2, 0, 0, Drain::none(), light.clone());
    for _ in 0..10 {
        a.push(data(1)).unwrap();
    }
    assert_eq!((cells.used(), heavy.held()), (10, 10));
    // Half the pool is used: the heavy share (10 > 10 / 2 members) is refused, the light one is not.
    assert!(matches!(a.push(data(1)), Err(PushError::OverShare(_))));
    for _ in 0..5 {
        b.push(data(2)).unwrap();
    }
    assert!(matches!(b.push(data(2)), Err(PushError::OverShare(_))), "the light share is held to its part too");
    // Control cells never fail because of the pool: no innocent link is closed.
    for _ in 0..50 {
        b.push_control(Cell::padding()).unwrap();
    }
    assert!(!b.is_closed());
    assert_eq!(a.remove_circuit(1), 10);
    assert_eq!((cells.used(), heavy.held()), (5, 0));
    b.close();
    assert_eq!(cells.used(), 0, "a closed link gives its cells back");
}

#[test]
fn credit_beyond_the_announced_maximum_is_refused() {
    let w = LinkWriter::new(100, control());
    w.add_circuit(1, 8, 16, Drain::none(), Pool::new("cells", 100).share());
    w.add_credit(1, 8).unwrap();
    assert_eq!(w.add_credit(1, 1), Err(CreditOverflow { had: 16, added: 1, max: 16 }));
    assert_eq!(w.add_credit(9, 1000), Ok(()), "credit for an unknown circuit is ignored");
}

#[test]
fn a_link_closes_itself_when_its_control_queue_overflows() {
    let w = LinkWriter::new(3, control());
    for _ in 0..3 {
        w.push_control(Cell::padding()).unwrap();
    }
    assert_eq!(w.push_control(Cell::padding()), Err(PushError::Full));
    assert!(w.is_closed());
    let why = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(w.wait_closed());
    assert_eq!(why, Some("control queue overflow (neighbor sends but does not read)"));
}

#[test]
fn a_write_that_makes_no_progress_fails_the_link() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        // A socket whose peer never reads: a 4 KiB pipe fills at once.
        let (ours, _theirs) = tokio::io::duplex(4096);
        let (sealer, _) = link_cipher().split();
        let w = LinkWriter::new(100, control());
        w.add_circuit(1, 10, 10, Drain::none(), Pool::new("cells", 100).share());
        for _ in 0..5 {
            w.push(data(1)).unwrap();
        }
        let stall = std::time::Duration::from_millis(200);
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            w.clone().run(ours, sealer, std::time::Duration::from_secs(60), stall, None),
        )
        .await
        .expect("the writer gives up");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(w.wait_closed().await, Some("write stalled (neighbor stopped reading)"));
    });
}
