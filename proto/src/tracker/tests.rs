//! Unit tests of the tracker protocol: handshakes, resumption, frames and message limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// A full handshake between a fresh tracker identity and a peer; returns both channels.
fn full(tracker: &Identity) -> (TrackerChannel, TrackerChannel) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (hello, hs) = TrackerChannel::connect(&mut rng, tracker.public()).unwrap();
    let (e_t, t) = TrackerChannel::accept(&mut rng, tracker, &hello[CLIENT_HELLO_HEADER..]).unwrap();
    (hs.finish(&e_t).unwrap(), t)
}

fn tracker_identity() -> Identity {
    Identity::generate(&mut ChaCha20Rng::seed_from_u64(7), 2048).unwrap()
}

/// Seals `msg` on one end and opens it on the other.
fn pass(from: &mut TrackerChannel, to: &mut TrackerChannel, msg: &ToTracker) -> Result<ToTracker> {
    let frame = from.seal(msg)?;
    to.open(&frame[4..])
}

#[test]
fn a_session_resumes_on_a_new_connection_with_new_keys_and_no_rsa() {
    let tracker = tracker_identity();
    let fp = tracker.fingerprint();
    let (peer, trk) = full(&tracker);
    assert_eq!(peer.resumption_secret(), trk.resumption_secret(), "both ends derive the resumption secret");
    let ticket = Ticket { id: [9; TICKET_LEN], secret: peer.resumption_secret().clone() };
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let (hello, hs) = TrackerChannel::resume(&mut rng, &fp, &ticket).unwrap();
    assert_eq!(hello.len(), RESUME_HELLO_LEN);
    let (id, e_p) = TrackerChannel::resume_hello(&hello).unwrap();
    assert_eq!(id, ticket.id);
    let (answer, mut t) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
    assert_eq!(ResumeAnswer::from_byte(answer[0]).unwrap(), ResumeAnswer::Accepted);
    let mut p = hs.finish(&answer[1..]).unwrap();
    assert_eq!(pass(&mut p, &mut t, &ToTracker::Resumable).unwrap(), ToTracker::Resumable);
    let reply = t.seal(&FromTracker::Ack).unwrap();
    assert_eq!(p.open::<FromTracker>(&reply[4..]).unwrap(), FromTracker::Ack);
    assert_eq!(p.resumption_secret(), trk.resumption_secret(), "the session's secret carries over");
    // The resumed keys differ from the full handshake's: a frame of one does not open under the other.
    let (mut p0, _) = full(&tracker);
    let mut t2 = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap().1;
    assert!(pass(&mut p0, &mut t2, &ToTracker::Resumable).is_err());
}

#[test]
fn a_replayed_or_forged_resume_hello_yields_keys_only_the_ticket_holder_has() {
    let tracker = tracker_identity();
    let fp = tracker.fingerprint();
    let (peer, trk) = full(&tracker);
    let ticket = Ticket { id: [3; TICKET_LEN], secret: peer.resumption_secret().clone() };
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let (hello, hs) = TrackerChannel::resume(&mut rng, &fp, &ticket).unwrap();
    let (id, e_p) = TrackerChannel::resume_hello(&hello).unwrap();
    let (a1, mut t1) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
    // Replay: the tracker's fresh e_T gives new keys, so the recorded connection's frames do not open.
    let (a2, mut t2) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
    assert_ne!(a1, a2, "a fresh tracker share per connection");
    let mut p = hs.finish(&a1[1..]).unwrap();
    let recorded = p.seal(&ToTracker::Resumable).unwrap();
    assert!(t2.open::<ToTracker>(&recorded[4..]).is_err(), "a replayed first frame does not open");
    assert_eq!(t1.open::<ToTracker>(&recorded[4..]).unwrap(), ToTracker::Resumable);
    // Someone who knows the ticket id (it is sent in clear) but not the secret cannot make a frame that opens.
    let thief = Ticket { id: ticket.id, secret: Secret([0; 32]) };
    let (h, hs) = TrackerChannel::resume(&mut rng, &fp, &thief).unwrap();
    let (id, e_p) = TrackerChannel::resume_hello(&h).unwrap();
    let (a, mut t) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
    let mut forged = hs.finish(&a[1..]).unwrap();
    assert!(pass(&mut forged, &mut t, &ToTracker::Resumable).is_err());
    // Another tracker key (fingerprint) gives other keys too.
    let other = Fingerprint([1; 32]);
    let (h, hs) = TrackerChannel::resume(&mut rng, &other, &ticket).unwrap();
    let (id, e_p) = TrackerChannel::resume_hello(&h).unwrap();
    let (a, mut t) = TrackerChannel::accept_resume(&mut rng, &fp, &id, trk.resumption_secret(), &e_p).unwrap();
    let mut wrong = hs.finish(&a[1..]).unwrap();
    assert!(pass(&mut wrong, &mut t, &ToTracker::Resumable).is_err());
}

#[test]
fn resume_hellos_and_answers_are_checked() {
    let ticket = Ticket { id: [1; TICKET_LEN], secret: Secret([2; 32]) };
    let fp = Fingerprint([4; 32]);
    let (hello, _) = TrackerChannel::resume(&mut ChaCha20Rng::seed_from_u64(3), &fp, &ticket).unwrap();
    assert!(TrackerChannel::resume_hello(&hello[..RESUME_HELLO_LEN - 1]).is_err(), "short");
    let mut bad = hello.clone();
    bad[0] = b'X';
    assert!(matches!(TrackerChannel::resume_hello(&bad), Err(ProtoError::BadMagic(_))));
    let mut bad = hello.clone();
    bad[9] = 2;
    assert!(matches!(TrackerChannel::resume_hello(&bad), Err(ProtoError::BadVersion(2))));
    // A low-order share is refused (contributory check), as in the full handshake.
    let (id, _) = TrackerChannel::resume_hello(&hello).unwrap();
    let low = [0u8; 32];
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    assert!(TrackerChannel::accept_resume(&mut rng, &fp, &id, &ticket.secret, &low).is_err());
    assert_eq!(ResumeAnswer::from_byte(1).unwrap(), ResumeAnswer::Unknown);
    assert!(ResumeAnswer::from_byte(2).is_err());
    // The new messages round-trip.
    let t = FromTracker::Ticket { ticket: [5; TICKET_LEN], lifetime_secs: 90 };
    assert_eq!(decode::<FromTracker>(&encode(&t).unwrap()).unwrap(), t);
    assert_eq!(decode::<ToTracker>(&encode(&ToTracker::Resumable).unwrap()).unwrap(), ToTracker::Resumable);
    assert_eq!(encode(&ToTracker::Resumable).unwrap(), vec![4]);
}
