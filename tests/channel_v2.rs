//! The version-2 tracker channel end to end (SPEC open issue 27): a tracker of this revision, a peer's tracker
//! client, and a probe responder answering with the session's probe key. A new peer's announce is checked with a
//! version-2 probe (a MAC, no signature at the peer), and a responder that does not hold the session's key fails it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anomos::probe_keys::ProbeKeys;
use anomos::tracker_client::TrackerClient;
use anomos_proto::identity::Identity;
use anomos_proto::probe_v2::decode_probe_v2;
use anomos_proto::tracker::{Announce, ErrorCode, FromTracker, ToTracker};
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn tracker(key: &Identity, dir: &std::path::Path) -> SocketAddr {
    anomos_proto::identity::save_identity(&dir.join("tracker.key"), key).unwrap();
    let args = anomos_tracker::TrackerArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        allow_same_ip: true,
        ..Default::default()
    };
    let (ready, up) = tokio::sync::oneshot::channel();
    tokio::spawn(anomos_tracker::run_until(args, Some(ready), std::future::pending()));
    up.await.unwrap().listen
}

/// A probe responder on 127.0.0.1 answering version-2 probes with `keys` (version-1 ones not at all); records the
/// versions of the probes it got.
async fn responder(keys: Arc<ProbeKeys>) -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let (keys, seen) = (keys.clone(), seen2.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 10];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let version = u16::from_be_bytes([head[8], head[9]]);
                seen.lock().unwrap().push(version);
                if version != 2 {
                    return; // not answered: a version-1 probe would fail
                }
                let mut body = vec![0u8; anomos_proto::probe_v2::PROBE_V2_LEN - 8];
                body[..2].copy_from_slice(&head[8..]);
                if s.read_exact(&mut body[2..]).await.is_ok() {
                    if let Ok(p) = decode_probe_v2(&body) {
                        let _ = s.write_all(&keys.answer(&p, addr)).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_peer_is_probed_with_a_mac_under_its_sessions_key() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let tracker_key = Identity::generate(&mut rng, 2048).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(&tracker_key, dir.path()).await;

    // A peer whose tracker client installs its sessions' probe keys where its responder reads them.
    let keys = Arc::new(ProbeKeys::default());
    let (listen, seen) = responder(keys.clone()).await;
    let me = Arc::new(Identity::generate(&mut rng, 2048).unwrap());
    let client = TrackerClient::new(anomos_net::tcp(), t, tracker_key.public().clone(), me).with_probe_keys(keys);
    let announce = ToTracker::Announce(Announce { listen, chains: vec![], family: vec![] });
    let reply = client.request(&announce).await;
    assert!(matches!(reply, Ok(FromTracker::Announced(_))), "{reply:?}");
    assert_eq!(*seen.lock().unwrap(), vec![2], "one probe, version 2");

    // Another peer whose responder holds no key of its session: it says so, the tracker probes with version 1
    // (the peer would sign), which this responder does not answer: the announce is refused.
    let (listen2, seen2) = responder(Arc::new(ProbeKeys::default())).await;
    let other = Arc::new(Identity::generate(&mut rng, 2048).unwrap());
    let client2 = TrackerClient::new(anomos_net::tcp(), t, tracker_key.public().clone(), other)
        .with_probe_keys(Arc::new(ProbeKeys::default()));
    let reply =
        client2.request(&ToTracker::Announce(Announce { listen: listen2, chains: vec![], family: vec![] })).await;
    match reply {
        Err(anomos::PeerError::Tracker(m)) => assert!(m.starts_with(&format!("{:?}", ErrorCode::Unreachable)), "{m}"),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_eq!(*seen2.lock().unwrap(), vec![2, 1], "version 2, then the fallback to version 1");
}

/// A real node (its own listener, its own tracker client) joins a tracker of this revision: its probe is answered
/// by a MAC (version 2), and it signs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_node_joins_with_a_version_2_probe_and_signs_none() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let tracker_key = Identity::generate(&mut rng, 2048).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = tracker(&tracker_key, dir.path()).await;
    let ndir = tempfile::tempdir().unwrap();
    let cfg = anomos::PeerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        t,
        tracker_key.fingerprint().to_hex(),
        ndir.path().to_path_buf(),
    );
    let key = anomos::tracker_client::fetch_tracker_key(t, &tracker_key.fingerprint()).await.unwrap();
    let (node, l) = anomos::Node::bind(cfg, Identity::generate(&mut rng, 2048).unwrap(), key, None).await.unwrap();
    node.start(l);
    for _ in 0..100 {
        if node.tracker_state().last_ok_unix.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(node.tracker_state().last_ok_unix.is_some(), "the node announced: {:?}", node.tracker_state());
    assert_eq!(node.probes_answered(), (0, 1), "one probe, version 2");
}
