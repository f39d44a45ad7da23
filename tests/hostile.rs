//! Hostile input against live `anomos peer` and `anomos tracker` processes, crafted with `anomos-proto`: each
//! malformed or abusive input must produce a clear log line, drop only the offender, never panic or stop the
//! process, and leave other circuits moving data. Plus the handling of key files.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod harden;

use std::time::Duration;

use anomos_proto::cell::{BreakReason, Cell, Command, DenyReason, SEALED_CELL_LEN};
use anomos_proto::ids::NeighborId;
use anomos_proto::link::{encode_probe, verify_probe_answer, HELLO_LEN, LINK_MAGIC, PROBE_MAGIC};
use anomos_proto::tc::TC_LEN;
use anomos_proto::tracker::{ToTracker, TrackerChannel};
use harden::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: Duration = Duration::from_secs(10);

/// Whether the other side closes `s` within `t`.
async fn closes(s: &mut TcpStream, t: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + t;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Expects a log line (containing all of `pats`) at or after `t` in `p`'s log, within 10 s.
fn expect_log(p: &P, t: u128, pats: &[&str]) -> String {
    match p.wait_log_after(t, pats, SECS) {
        Some(l) => l.text,
        None => panic!("{}: no log line with {pats:?} after {t}:\n{}", p.name, p.log_text()),
    }
}

/// An overlay for attacks: tracker, three relays, a serving peer; every peer with a 2 s handshake timeout.
fn overlay(extra_r0: &[&str]) -> Net {
    let mut net = Net::new(&["--neighbors", "12"]);
    net.peer_flags = ["--handshake-timeout", "2", "--max-conns-per-ip", "24"].map(String::from).to_vec();
    // The raw peers the tests add must be able to draw smaller fingerprints (they dial, SPEC §5.2).
    for name in ["relay0", "relay1", "relay2", "server"] {
        net.preset_high_key(name);
    }
    net.add_peer("relay0", extra_r0);
    net.add_peer("relay1", &[]);
    net.add_peer("relay2", &[]);
    net.add_peer("server", &["--serve", "regtest", "--mine", "100"]);
    net
}

#[test]
fn malformed_link_input_drops_only_the_offender() {
    serial_async(async {
        let mut net = overlay(&[]);
        let server = 3;
        let v_addr = net.peers[server].addr();
        let v_fp = net.peers[server].fp();
        // A bystander circuit to the serving peer, pinging throughout.
        let dir = tempfile::tempdir().unwrap();
        let requester = node_in(&net, dir.path(), None, |_| {}).await;
        let pinger = Pinger::start(circuit(&requester, "regtest", 2).await);
        pinger.assert_moving("before").await;

        let fps: Vec<_> = net.peers.iter().map(|p| p.fp()).collect();
        let a = RawPeer::start_below(net.tracker_addr(), &net.tracker_fp(), &fps).await;
        let nb = a.wait_neighbor(&v_fp).await;
        let v = &net.peers[server];

        // 1. Garbage instead of a magic.
        let t = unix_ms();
        let mut s = TcpStream::connect(v_addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(closes(&mut s, SECS).await);
        eprintln!("garbage: {}", expect_log(v, t, &["connection dropped", "bad protocol magic"]));

        // 2. A truncated HELLO.
        let t = unix_ms();
        let mut s = TcpStream::connect(v_addr).await.unwrap();
        s.write_all(&LINK_MAGIC).await.unwrap();
        s.write_all(&[0u8; 10]).await.unwrap();
        drop(s);
        eprintln!("truncated hello: {}", expect_log(v, t, &["connection dropped", "early eof"]));

        // 3. Slowloris: silent, and stuck after the magic; both closed after the 2 s handshake timeout.
        let t = unix_ms();
        let mut silent = TcpStream::connect(v_addr).await.unwrap();
        let mut stuck = TcpStream::connect(v_addr).await.unwrap();
        stuck.write_all(&LINK_MAGIC).await.unwrap();
        assert!(closes(&mut silent, Duration::from_secs(5)).await, "silent connection not closed");
        assert!(closes(&mut stuck, Duration::from_secs(5)).await, "stuck handshake not closed");
        assert!(unix_ms() - t < 5000);
        eprintln!("slowloris: {}", expect_log(v, t, &["connection dropped", "too slow"]));

        // 4. An AUTH length over the limit.
        let t = unix_ms();
        let (mut s, _, _) = a.hello(v_addr, nb.key.clone(), nb.nid).await;
        s.write_all(&u16::MAX.to_be_bytes()).await.unwrap();
        assert!(closes(&mut s, SECS).await);
        eprintln!("oversized auth: {}", expect_log(v, t, &["connection dropped", "link auth message too large"]));

        // 5. An AUTH with a bad AEAD tag.
        let t = unix_ms();
        let (mut s, d, reply) = a.hello(v_addr, nb.key.clone(), nb.nid).await;
        let (_, mut auth) = d.on_reply(&reply, &a.id, &mut rand::rngs::OsRng).unwrap();
        *auth.last_mut().unwrap() ^= 1;
        s.write_all(&auth).await.unwrap();
        assert!(closes(&mut s, SECS).await);
        eprintln!("bad auth tag: {}", expect_log(v, t, &["connection dropped", "authentication failed"]));

        // 6. A replayed handshake (HELLO and AUTH recorded from a link that came up).
        let (link, hello, auth) = a.dial_recording(v_addr, nb.key.clone(), nb.nid).await.unwrap();
        drop(link);
        let t = unix_ms();
        let mut s = TcpStream::connect(v_addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut reply = [0u8; HELLO_LEN];
        s.read_exact(&mut reply).await.unwrap();
        s.write_all(&auth).await.unwrap();
        assert!(closes(&mut s, SECS).await);
        eprintln!("replayed handshake: {}", expect_log(v, t, &["connection dropped", "authentication failed"]));

        // 7. The right neighbor with the wrong NeighborID: the link never comes up.
        let t = unix_ms();
        let r = a.dial(v_addr, nb.key.clone(), NeighborId(nb.nid.0 ^ 1)).await;
        assert!(r.is_err(), "a link with a wrong NeighborID came up");
        eprintln!("wrong nid: {}", expect_log(v, t, &["link failed before it came up", "NeighborID mismatch"]));

        // 8. A stranger (never announced, not a neighbor) cannot get a link, so cannot send OPEN.
        let stranger = RawPeer::start(net.tracker_addr(), &net.tracker_fp()).await;
        let t = unix_ms();
        let r = stranger.dial(v_addr, nb.key.clone(), nb.nid).await;
        assert!(r.is_err_and(|e| e.contains("Refused")), "a stranger got a link");
        eprintln!("stranger: {}", expect_log(v, t, &["link refused", &stranger.fp().short()]));

        // 9. A truncated cell on an established link.
        let mut l = a.dial(v_addr, nb.key.clone(), nb.nid).await.unwrap();
        let t = unix_ms();
        l.send_raw(&[0u8; 100]).await.unwrap();
        drop(l);
        eprintln!("truncated cell: {}", expect_log(v, t, &["link down", "early eof", &a.fp().short()]));

        // 10. A cell with a bad AEAD tag.
        let mut l = a.dial(v_addr, nb.key.clone(), nb.nid).await.unwrap();
        let t = unix_ms();
        let mut sealed = l.seal(&Cell::padding());
        sealed[SEALED_CELL_LEN - 1] ^= 0x80;
        l.send_raw(&sealed).await.unwrap();
        assert!(l.closed_within(SECS).await, "link with a forged cell stayed open");
        eprintln!("bad cell tag: {}", expect_log(v, t, &["link down", "bad cell (authentication failed)"]));

        // 11. Probers that send the probe magic and stall hold no probe slot (there are 4): a full probe sent
        //     meanwhile is answered, signed by the peer's key (found in review, session 10: the slot was taken at
        //     the magic, so four stalled probers failed every tracker probe for the handshake timeout).
        let mut stalled = Vec::new();
        for _ in 0..8 {
            let mut c = TcpStream::connect(v_addr).await.unwrap();
            c.write_all(&PROBE_MAGIC).await.unwrap();
            stalled.push(c);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let nonce: [u8; 32] = rand::random();
        let mut s = TcpStream::connect(v_addr).await.unwrap();
        s.write_all(&encode_probe(&nonce)).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(SECS, s.read_to_end(&mut answer)).await.expect("probe answered in time").unwrap();
        let key = verify_probe_answer(&nonce, &answer).expect("a valid probe answer while probers stall");
        assert_eq!(key.fingerprint(), v_fp);
        drop(stalled);

        // 12. Connections beyond the per-address limit (24) are refused at once; the idle ones time out.
        let t = unix_ms();
        let mut conns = Vec::new();
        for _ in 0..40 {
            conns.push(TcpStream::connect(v_addr).await.unwrap());
        }
        eprintln!(
            "connection flood: {}",
            expect_log(v, t, &["connection refused", "too many connections from this address"])
        );
        for mut c in conns {
            assert!(closes(&mut c, Duration::from_secs(6)).await);
        }

        pinger.assert_moving("after the link attacks").await;
        for p in net.peers.iter_mut() {
            p.assert_healthy();
        }
    })
}

/// Sends `cell` and returns the next cell on its circuit (DENY, CONFIRM, …).
async fn answer(l: &mut RawLink, cell: Cell) -> Option<Cell> {
    let id = cell.circ_id;
    l.send(&cell).await.unwrap();
    l.recv_on(id, SECS).await
}

fn deny_reason(c: &Option<Cell>) -> Option<DenyReason> {
    c.as_ref().filter(|c| c.command == Command::Deny).and_then(|c| c.deny_fields().ok()).map(|(r, _)| r)
}

#[test]
fn hostile_opens_and_data_are_refused_per_circuit_or_per_link() {
    serial_async(async {
        // relay0 gets a low OPEN rate, to be flooded.
        let mut net = overlay(&["--open-rate", "20", "--open-burst", "20"]);
        let (r0, r1, server) = (0, 1, 3);
        let dir = tempfile::tempdir().unwrap();
        let requester = node_in(&net, dir.path(), None, |_| {}).await;
        let pinger = Pinger::start(circuit(&requester, "regtest", 2).await);
        pinger.assert_moving("before").await;

        let fps: Vec<_> = net.peers.iter().map(|p| p.fp()).collect();
        let a = RawPeer::start_below(net.tracker_addr(), &net.tracker_fp(), &fps).await;
        let b = RawPeer::start_below(net.tracker_addr(), &net.tracker_fp(), &fps).await;
        let v = &net.peers[server];
        let v_key = net.identity("server").public().clone();
        let mut lv = a.link(&v.fp()).await;
        let expires = unix_secs() + 120;

        // A TC that opens; the same TC again is a replay.
        let good = build_tc(&[(v_key.clone(), lv.nid)], "regtest", expires);
        let id = lv.alloc_id();
        let c = answer(&mut lv, Cell::open(id, &good.tc)).await;
        assert_eq!(c.as_ref().map(|c| c.command), Some(Command::Confirm), "a good TC opens");
        let t = unix_ms();
        let id2 = lv.alloc_id();
        assert_eq!(deny_reason(&answer(&mut lv, Cell::open(id2, &good.tc)).await), Some(DenyReason::Replayed));
        eprintln!("replayed TC: {}", expect_log(v, t, &["circuit denied", "replayed"]));

        // Every BREAK on a circuit the peer holds is acknowledged: on the open circuit, and right behind an OPEN
        // (in the same read, so usually while the peer is still peeling the TC).
        lv.send(&Cell::brk(id, BreakReason::Finished, None)).await.unwrap();
        assert_eq!(lv.recv_on(id, SECS).await.map(|c| c.command), Some(Command::AckBreak), "BREAK on an open circuit");
        let quick = build_tc(&[(v_key.clone(), lv.nid)], "regtest", expires);
        let id3 = lv.alloc_id();
        let mut both = lv.seal(&Cell::open(id3, &quick.tc));
        both.extend(lv.seal(&Cell::brk(id3, BreakReason::Finished, None)));
        lv.send_raw(&both).await.unwrap();
        let mut acked = false;
        while let Some(c) = lv.recv_on(id3, SECS).await {
            if c.command == Command::AckBreak {
                acked = true;
                break;
            }
        }
        assert!(acked, "a BREAK right behind its OPEN was not acknowledged");

        // Expired.
        let old = build_tc(&[(v_key.clone(), lv.nid)], "regtest", unix_secs() - 3600);
        let t = unix_ms();
        let id = lv.alloc_id();
        assert_eq!(deny_reason(&answer(&mut lv, Cell::open(id, &old.tc)).await), Some(DenyReason::Expired));
        eprintln!("expired TC: {}", expect_log(v, t, &["circuit denied", "expired"]));

        // Tampered (one bit anywhere breaks the layer's GCM tag).
        let mut bad = build_tc(&[(v_key.clone(), lv.nid)], "regtest", expires);
        bad.tc[TC_LEN / 2] ^= 1;
        let t = unix_ms();
        let id = lv.alloc_id();
        assert_eq!(deny_reason(&answer(&mut lv, Cell::open(id, &bad.tc)).await), Some(DenyReason::BadTc));
        eprintln!("tampered TC: {}", expect_log(v, t, &["tracking code did not peel"]));

        // Issued for another edge.
        let other = build_tc(&[(v_key.clone(), NeighborId(lv.nid.0 ^ 1))], "regtest", expires);
        let t = unix_ms();
        let id = lv.alloc_id();
        assert_eq!(deny_reason(&answer(&mut lv, Cell::open(id, &other.tc)).await), Some(DenyReason::WrongLink));
        eprintln!("wrong-link TC: {}", expect_log(v, t, &["circuit denied", "wrong-link"]));

        // An OPEN on an id from the receiver's half.
        let t = unix_ms();
        let theirs = lv.alloc_id() ^ anomos_proto::cell::DIALER_CIRC_BIT;
        assert_eq!(deny_reason(&answer(&mut lv, Cell::open(theirs, &good.tc)).await), Some(DenyReason::Protocol));
        eprintln!("id from the wrong half: {}", expect_log(v, t, &["OPEN on an id that is not the sender's to use"]));

        // DATA beyond credit at a relay: A → relay1 → B, where B never returns credit.
        let r1 = &net.peers[r1];
        let r1_key = net.identity("relay1").public().clone();
        let mut la = a.link(&r1.fp()).await;
        let mut lb = b.link(&r1.fp()).await;
        let tc = build_tc(&[(r1_key, la.nid), (b.id.public().clone(), lb.nid)], "regtest", expires);
        let id = la.alloc_id();
        la.send(&Cell::open(id, &tc.tc)).await.unwrap();
        let opened = lb.recv(SECS).await.expect("relay1 forwards the OPEN");
        assert_eq!(opened.command, Command::Open);
        let t = unix_ms();
        // relay1 lets us send its window (128) plus what it drained toward B (B's window, 128); 400 is too many.
        for _ in 0..400 {
            if la.send(&Cell::new(id, Command::Data)).await.is_err() {
                break;
            }
        }
        let brk = la.recv_on(id, SECS).await.expect("a BREAK back");
        assert_eq!(brk.command, Command::Break);
        assert_eq!(brk.break_fields().unwrap().0, BreakReason::Protocol);
        eprintln!("DATA beyond credit: {}", expect_log(r1, t, &["DATA beyond credit"]));
        // The circuit is gone; the link stays (the next OPEN is answered).
        let fresh = build_tc(&[(v_key.clone(), lv.nid)], "regtest", expires);
        let id = lv.alloc_id();
        assert_eq!(answer(&mut lv, Cell::open(id, &fresh.tc)).await.map(|c| c.command), Some(Command::Confirm));

        // OPEN flood at relay0 (20/s, burst 20): first denied unpeeled, then the link is closed.
        let r0 = &net.peers[r0];
        let mut lf = a.link(&r0.fp()).await;
        let t = unix_ms();
        let junk = [0x42u8; TC_LEN];
        let mut sent = 0;
        for _ in 0..2000 {
            let id = lf.alloc_id();
            if lf.send(&Cell::open(id, &junk)).await.is_err() {
                break;
            }
            sent += 1;
        }
        assert!(lf.closed_within(SECS).await, "flooding link stayed open after {sent} OPENs");
        eprintln!("OPEN flood ({sent} sent): {}", expect_log(r0, t, &["closing link: OPEN flood"]));

        pinger.assert_moving("after the circuit attacks").await;
        for p in net.peers.iter_mut() {
            p.assert_healthy();
        }
    })
}

#[test]
fn bad_bitcoin_messages_over_a_circuit_end_only_that_circuit() {
    serial_async(async {
        let mut net = overlay(&[]);
        let server = 3;
        let dir = tempfile::tempdir().unwrap();
        let requester = node_in(&net, dir.path(), None, |_| {}).await;
        let pinger = Pinger::start(circuit(&requester, "regtest", 2).await);
        pinger.assert_moving("before").await;
        let magic = regtest_magic();

        // A version whose checksum is wrong.
        let mut s = circuit(&requester, "regtest", 2).await;
        let mut bad = anomos_proto::btc::encode_message(magic, &btc_version());
        bad[20] ^= 0xff;
        let t = unix_ms();
        s.send(bad).await.unwrap();
        assert!(s.recv().await.is_err(), "the circuit survived a bad checksum");
        eprintln!("bad checksum: {}", expect_log(&net.peers[server], t, &["closing chain circuit"]));

        // A header announcing a payload over the 4,000,000-byte limit.
        let mut s = circuit(&requester, "regtest", 2).await;
        let mut big = Vec::new();
        big.extend_from_slice(&magic);
        big.extend_from_slice(b"block\0\0\0\0\0\0\0");
        big.extend_from_slice(&4_000_001u32.to_le_bytes());
        big.extend_from_slice(&[0u8; 4]);
        big.extend_from_slice(&[0u8; 1000]);
        let t = unix_ms();
        s.send(big).await.unwrap();
        assert!(s.recv().await.is_err(), "the circuit survived an over-limit length");
        eprintln!("over-limit length: {}", expect_log(&net.peers[server], t, &["closing chain circuit"]));

        pinger.assert_moving("after").await;
        for p in net.peers.iter_mut() {
            p.assert_healthy();
        }
    })
}

#[test]
fn the_tracker_survives_garbage_slow_clients_and_floods() {
    serial_async(async {
        let mut net = Net::new(&[
            "--hello-timeout",
            "2",
            "--max-sessions-per-ip",
            "30",
            "--hello-rate",
            "10",
            "--hello-burst",
            "20",
        ]);
        net.add_peer("relay0", &[]);
        let tr = net.tracker_addr();
        let tkey = anomos::tracker_client::fetch_tracker_key(tr, &net.tracker_fp()).await.unwrap();
        let tracker = &net.tracker;

        // Garbage.
        let t = unix_ms();
        let mut s = TcpStream::connect(tr).await.unwrap();
        s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage").await.unwrap();
        assert!(closes(&mut s, SECS).await);
        eprintln!("garbage: {}", expect_log(tracker, t, &["connection dropped", "bad protocol magic"]));

        // A ClientHello with an RSA length over the limit.
        let t = unix_ms();
        let mut s = TcpStream::connect(tr).await.unwrap();
        let mut h = b"ANOMOST1".to_vec();
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&u16::MAX.to_be_bytes());
        s.write_all(&h).await.unwrap();
        assert!(closes(&mut s, SECS).await);
        eprintln!("oversized hello: {}", expect_log(tracker, t, &["connection dropped", "too large"]));

        // A truncated ClientHello.
        let t = unix_ms();
        let (hello, _) = TrackerChannel::connect(&mut rand::rngs::OsRng, &tkey).unwrap();
        let mut s = TcpStream::connect(tr).await.unwrap();
        s.write_all(&hello[..100]).await.unwrap();
        drop(s);
        eprintln!("truncated hello: {}", expect_log(tracker, t, &["connection dropped", "early eof"]));

        // A channel, then a frame with a bad tag / an oversized length / a request before Hello.
        for (what, pat) in [("bad tag", "authentication failed"), ("huge frame", "too large"), ("no hello", "hello")] {
            let (hello, hs) = TrackerChannel::connect(&mut rand::rngs::OsRng, &tkey).unwrap();
            let mut s = TcpStream::connect(tr).await.unwrap();
            s.write_all(&hello).await.unwrap();
            let mut e = [0u8; 32];
            s.read_exact(&mut e).await.unwrap();
            let mut chan = hs.finish(&e).unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut body = vec![0u8; TrackerChannel::frame_len(len).unwrap()];
            s.read_exact(&mut body).await.unwrap(); // the Challenge
            let t = unix_ms();
            match what {
                "bad tag" => {
                    let mut f = chan
                        .seal(&ToTracker::Report(anomos_proto::tracker::FailureReport {
                            kind: anomos_proto::tracker::FailureKind::Misbehaving,
                            neighbor: None,
                            circuit: None,
                            hop_tag: None,
                        }))
                        .unwrap();
                    *f.last_mut().unwrap() ^= 1;
                    s.write_all(&f).await.unwrap();
                }
                "huge frame" => s.write_all(&u32::MAX.to_be_bytes()).await.unwrap(),
                _ => {
                    let f = chan
                        .seal(&ToTracker::Announce(anomos_proto::tracker::Announce {
                            listen: "127.0.0.1:1".parse().unwrap(),
                            chains: vec![],
                            family: vec![],
                        }))
                        .unwrap();
                    s.write_all(&f).await.unwrap();
                }
            }
            assert!(closes(&mut s, SECS).await, "{what}: not closed");
            eprintln!("{what}: {}", expect_log(tracker, t, &["connection dropped", pat]));
        }

        // Slowloris: closed after the 2 s hello timeout.
        let t = unix_ms();
        let mut s = TcpStream::connect(tr).await.unwrap();
        assert!(closes(&mut s, Duration::from_secs(6)).await);
        eprintln!("slowloris: {}", expect_log(tracker, t, &["connection dropped", "timed out waiting for hello"]));

        // More connections from one address than allowed.
        let t = unix_ms();
        let mut conns = Vec::new();
        for _ in 0..40 {
            conns.push(TcpStream::connect(tr).await.unwrap());
        }
        eprintln!("connection flood: {}", expect_log(tracker, t, &["too many sessions from this address"]));
        drop(conns);

        // ClientHellos (RSA decryptions) beyond the address's rate are refused before any RSA work.
        let t = unix_ms();
        let mut socks = Vec::new();
        for _ in 0..40 {
            let (hello, _) = TrackerChannel::connect(&mut rand::rngs::OsRng, &tkey).unwrap();
            let mut s = TcpStream::connect(tr).await.unwrap();
            s.write_all(&hello).await.unwrap();
            socks.push(s);
        }
        eprintln!("hello flood: {}", expect_log(tracker, t, &["ClientHello rate exceeded"]));
        drop(socks);

        // Still serving: after the bucket refills, a peer authenticates and announces.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let probe = RawPeer::start(tr, &net.tracker_fp()).await;
        probe.announce().await;
        net.tracker.assert_healthy();
        net.peers[0].assert_healthy();
    })
}

#[test]
fn key_files_are_private_and_a_readable_key_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let mut net = Net::new(&[]);
    net.add_peer("relay0", &[]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let pdir = net.dir.path().join("relay0");
    let tdir = net.dir.path().join("tracker");
    assert_eq!(mode(&pdir.join("peer.key")), 0o600);
    assert_eq!(mode(&pdir), 0o700);
    assert_eq!(mode(&tdir.join("tracker.key")), 0o600);
    assert_eq!(mode(&tdir), 0o700);

    // Make both keys group/world readable: neither process starts again, and both say why.
    net.peers[0].kill();
    net.tracker.kill();
    for key in [pdir.join("peer.key"), tdir.join("tracker.key")] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(exe()).args(&args).env("NO_COLOR", "1").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let mut targs: Vec<String> = vec!["tracker".into(), "--listen".into(), "127.0.0.1:0".into()];
    targs.extend(["--data-dir".into(), tdir.to_str().unwrap().to_string()]);
    let (ok, err) = run(targs);
    assert!(!ok && err.contains("chmod 600"), "tracker started with a readable key: {err}");
    let mut pargs: Vec<String> = vec!["peer".into()];
    pargs.extend(net.join_args("relay0"));
    let (ok, err) = run(pargs);
    assert!(!ok && err.contains("chmod 600"), "peer started with a readable key: {err}");
}

#[test]
fn the_listening_port_limits_connections_in_total_and_frees_slots_after_the_handshake_timeout() {
    serial_async(async {
        let net = Net::new(&[]);
        let dir = tempfile::tempdir().unwrap();
        let node = node_in(&net, dir.path(), None, |c| {
            c.max_conns = 3;
            c.max_conns_per_ip = 100;
            c.handshake_timeout = Duration::from_secs(3);
        })
        .await;
        let addr = node.listen_addr;
        let mut conns = Vec::new();
        for _ in 0..6 {
            conns.push(TcpStream::connect(addr).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(node.gauges().conns <= 3, "{:?}", node.gauges());
        let mut refused = 0;
        let mut held = Vec::new();
        for mut c in conns {
            if closes(&mut c, Duration::from_millis(500)).await {
                refused += 1;
            } else {
                held.push(c);
            }
        }
        assert!(refused >= 3, "only {refused} of 6 refused at a limit of 3");
        // The held ones never complete a handshake: closed after the timeout, and their slots are free again.
        for mut c in held {
            assert!(closes(&mut c, Duration::from_secs(6)).await);
        }
        let mut again = TcpStream::connect(addr).await.unwrap();
        assert!(!closes(&mut again, Duration::from_millis(500)).await, "a slot was not freed");
        assert!(node.gauges().conns >= 1);
    })
}
