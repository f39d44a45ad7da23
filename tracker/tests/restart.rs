//! A tracker restart keeps the graph (issue 16): the real `anomos-tracker` binary is killed (SIGKILL, after its
//! once-a-second write) and started again on the same data directory. Every peer's edges come back with the same
//! NeighborIDs, a circuit is granted within 5 s of the restart without any peer re-announcing, and the peers'
//! next announces return exactly the neighbor sets they had. A damaged database stops the start with a clear
//! error, never a panic.
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::*;

/// The tracker process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the tracker binary on `dir` and waits for its ready line.
fn spawn(dir: &std::path::Path) -> (Proc, SocketAddr) {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("tracker.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_anomos-tracker"))
        .args(["--listen", "127.0.0.1:0", "--allow-same-ip", "--neighbors", "3", "--log-level", "info"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("listen="))
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .parse()
        .unwrap();
    (Proc(child), addr)
}

async fn session(addr: SocketAddr, id: &Identity) -> Client {
    let key = tracker_id().public().clone();
    let mut c = open_channel_from(addr, &key, [127, 0, 0, 1].into()).await.unwrap();
    let FromTracker::Challenge { nonce } = c.recv().await.unwrap() else { panic!("expected a challenge") };
    c.send(&make_hello(id, &key.fingerprint(), &nonce, &mut OsRng)).await;
    assert!(matches!(c.recv().await.unwrap(), FromTracker::Welcome { .. }));
    c
}

/// A peer's neighbor table as a comparable set: (NeighborID, neighbor's address).
type Table = BTreeSet<(u64, SocketAddr)>;

async fn announce_all(addr: SocketAddr, peers: &[FakePeer]) -> Vec<Table> {
    let mut tables = Vec::new();
    for p in peers {
        let mut c = session(addr, p.id()).await;
        tables.push(c.announce_ok(p.listen).await.iter().map(|n| (n.id.0, n.addr)).collect());
    }
    tables
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_tracker_keeps_edges_and_neighbor_ids_and_grants_at_once() {
    let dir = tempfile::tempdir().unwrap();
    save_identity(&dir.path().join("tracker.key"), tracker_id()).unwrap();
    let peers: Vec<FakePeer> = futures_join((1..=8).map(fake_peer)).await;

    let (mut first, addr) = spawn(dir.path());
    // Until the graph is settled: a round of announces that changes nothing.
    let mut before = announce_all(addr, &peers).await;
    for _ in 0..5 {
        let again = announce_all(addr, &peers).await;
        if again == before {
            break;
        }
        before = again;
    }
    assert_eq!(announce_all(addr, &peers).await, before, "the graph did not settle");
    assert!(before.iter().all(|t| t.len() >= 3), "{before:?}");
    // The state is written once a second: give it that, then kill without warning.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    let restarted = Instant::now();
    let (_second, addr) = spawn(dir.path());
    // No peer has announced to the new process: the requester is known and its paths are there.
    let mut c = session(addr, peers[0].id()).await;
    let grants = c.circuits_ok(1, 2).await;
    let granted = restarted.elapsed();
    assert_eq!(grants.len(), 1);
    assert!(granted < Duration::from_secs(5), "first grant {granted:?} after the restart");
    eprintln!("first circuit granted {granted:?} after the restart");

    let after = announce_all(addr, &peers).await;
    assert_eq!(after, before, "edges or NeighborIDs changed across the restart");
    let log = std::fs::read_to_string(dir.path().join("tracker.log")).unwrap();
    assert!(log.contains("peers=8"), "the restart did not restore 8 peers:\n{log}");
    assert_eq!(log.matches("restored peer announced").count(), 8, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_tracker_closes_its_database_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    save_identity(&dir.path().join("tracker.key"), tracker_id()).unwrap();
    let peers: Vec<FakePeer> = futures_join((1..=4).map(fake_peer)).await;
    let (first, addr) = spawn(dir.path());
    announce_all(addr, &peers).await;
    // SIGTERM: the tracker writes its state (and tickets), closes the database, and leaves the rest to the exit.
    let mut first = first;
    Command::new("kill").args(["-TERM", &first.0.id().to_string()]).status().unwrap();
    let status = first.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(dir.path().join("tracker.log")).unwrap();
    assert!(log.contains("shutdown: tracker stopped") && log.contains("peers=4"), "{log}");
    assert!(!log.contains("panicked") && !log.contains("still running"), "{log}");
    // Closed cleanly: opening it needs no repair (an unclean close costs the next start a walk of the file).
    let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&repaired);
    let db = redb::Builder::new()
        .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .create(dir.path().join("tracker.redb"))
        .unwrap();
    drop(db);
    assert!(!repaired.load(std::sync::atomic::Ordering::SeqCst), "the state database needed a repair");
    // The next start has the four peers back.
    let (_second, _) = spawn(dir.path());
    let log = std::fs::read_to_string(dir.path().join("tracker.log")).unwrap();
    assert_eq!(log.matches("state database opened").count(), 2, "{log}");
    assert!(log.trim_end().lines().any(|l| l.contains("state database opened") && l.contains("peers=4")), "{log}");
}

#[test]
fn a_damaged_state_database_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    save_identity(&dir.path().join("tracker.key"), tracker_id()).unwrap();
    std::fs::write(dir.path().join("tracker.redb"), vec![0xa5u8; 64 * 1024]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_anomos-tracker"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a damaged database: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("state database") && err.contains("tracker.redb"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs the futures one after another (fake peers start in microseconds).
async fn futures_join<F: std::future::Future<Output = FakePeer>>(fs: impl Iterator<Item = F>) -> Vec<FakePeer> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}
