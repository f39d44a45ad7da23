//! Tracker replicas on etcd (issue 16, SPEC §3.10 "Replicas"): a real `etcd` (Debian's `etcd-server`) on
//! 127.0.0.1 with a temporary data directory, three `anomos-tracker --etcd` processes sharing the same key, fifteen
//! peers that answer reachability probes and talk to the replicas through a client that fails over as the real one
//! does (`src/tracker_client/`), announcing and asking for circuits all the time. One replica is killed
//! (SIGKILL) under that load: every request still gets its answer, within 2 s; afterwards the two survivors hand
//! every peer the same neighbor table (same NeighborIDs), edges are symmetric and every NeighborID names one edge.
//!
//! Run with `cargo test -p anomos-tracker --features etcd --test etcd`. Without an `etcd` binary on the PATH the
//! test says so loudly and passes, unless `CI` is set (then it fails: `.ci/run` installs `etcd-server`).
#![cfg(feature = "etcd")]
// Test code: a failed assumption should fail loudly, so unwrap/expect/panic/indexing are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `etcd` binary, or None (with a loud message) when it is not installed and `CI` is not set.
fn etcd_binary() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("etcd")).find(|p| p.is_file()));
    if found.is_none() {
        let msg = "etcd is not installed (Debian: apt-get install etcd-server): the replica test cannot run";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("\n!!!!!!!!!! SKIPPED: {msg} !!!!!!!!!!\n");
    }
    found
}

/// Starts etcd on free loopback ports with its data in `dir`; returns it and its client URL once it answers.
fn start_etcd(bin: &std::path::Path, dir: &std::path::Path) -> (Proc, String) {
    start_etcd_on(bin, dir, (free_port(), free_port()))
}

/// [`start_etcd`] on the given client and peer ports (to start it again where it was).
fn start_etcd_on(bin: &std::path::Path, dir: &std::path::Path, (client, peer): (u16, u16)) -> (Proc, String) {
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log")).unwrap();
    let child = Command::new(bin)
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "etcd did not start: {}", etcd_log(dir));
        std::thread::sleep(Duration::from_millis(50));
    }
    (proc, url)
}

fn etcd_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
}

/// Starts a replica (the tracker binary with `--etcd`) with the shared key in `dir`; returns it and its address.
fn start_replica(dir: &std::path::Path, etcd: &str) -> (Proc, SocketAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join("tracker.key");
    if !key.exists() {
        save_identity(&key, tracker_id()).unwrap();
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("tracker.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_anomos-tracker"))
        .args(["--listen", "127.0.0.1:0", "--allow-same-ip", "--neighbors", "3", "--interval", "2"])
        .args(["--log-level", "info,anomos_tracker=debug", "--etcd", etcd, "--etcd-prefix", "/test/"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    let addr = line.split_whitespace().find_map(|f| f.strip_prefix("listen=")).map(|a| a.parse().unwrap());
    let Some(addr) = addr else { panic!("replica printed no ready line: {line:?}; its log:\n{}", replica_log(dir)) };
    (Proc(child), addr)
}

fn replica_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("tracker.log")).unwrap_or_default()
}

/// A peer's client of a replicated tracker, as `src/tracker_client/` behaves: one session with the replica in
/// use; on a failed connect (1.5 s at most), a failed or timed-out read, or an `Unavailable` reply it moves to the
/// next address at once and sends the request there.
struct Failover {
    addrs: Vec<SocketAddr>,
    at: usize,
    id: &'static Identity,
    session: Option<Client>,
}

impl Failover {
    async fn connect(&self, addr: SocketAddr) -> Result<Client, String> {
        let key = tracker_id().public();
        let mut c = tokio::time::timeout(Duration::from_millis(1500), open_channel(addr, key))
            .await
            .map_err(|_| "connect timeout".to_string())??;
        let FromTracker::Challenge { nonce } = c.recv().await? else { return Err("no challenge".into()) };
        let hello = make_hello(self.id, &key.fingerprint(), &nonce, &mut OsRng);
        send(&mut c, &hello).await?;
        match c.recv().await? {
            FromTracker::Welcome { .. } => Ok(c),
            other => Err(format!("refused: {other:?}")),
        }
    }

    /// The reply, and how many replicas were tried.
    async fn request(&mut self, msg: &ToTracker) -> (Result<FromTracker, String>, usize) {
        let mut last = String::new();
        for tried in 1..=self.addrs.len() {
            let addr = self.addrs[self.at % self.addrs.len()];
            if self.session.is_none() {
                match self.connect(addr).await {
                    Ok(c) => self.session = Some(c),
                    Err(e) => {
                        last = format!("{addr}: {e}");
                        self.at += 1;
                        continue;
                    }
                }
            }
            let c = self.session.as_mut().unwrap();
            let r = match send(c, msg).await {
                Ok(()) => {
                    tokio::time::timeout(Duration::from_secs(10), c.recv()).await.unwrap_or(Err("timeout".into()))
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(FromTracker::Error(e)) if e.code == ErrorCode::Unavailable => {
                    last = format!("{addr}: {}", e.message)
                }
                Ok(reply) => return (Ok(reply), tried),
                Err(e) => last = format!("{addr}: {e}"),
            }
            self.session = None;
            self.at += 1;
        }
        (Err(last), self.addrs.len())
    }
}

async fn send(c: &mut Client, msg: &ToTracker) -> Result<(), String> {
    let frame = c.chan.seal(msg).map_err(|e| e.to_string())?;
    c.stream.write_all(&frame).await.map_err(|e| e.to_string())
}

/// One request's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    peer: usize,
    started: Instant,
    took: Duration,
    tried: usize,
    result: Result<(), String>,
}

/// What the peers saw.
#[derive(Default)]
struct Log {
    circuits: Vec<Outcome>,
    announces: Vec<Outcome>,
}

type Table = BTreeSet<(u64, Vec<u8>)>;

fn table(r: &FromTracker) -> Option<Table> {
    match r {
        FromTracker::Announced(a) => Some(a.neighbors.iter().map(|n| (n.id.0, n.public_key.clone())).collect()),
        _ => None,
    }
}

/// One peer: announces every second, asks for a circuit every 150 ms, until `stop`.
async fn run_peer(n: usize, listen: SocketAddr, addrs: Vec<SocketAddr>, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>) {
    let id = &ids()[n];
    // Peers are spread over the replicas as the real client's random start spreads them.
    let mut client = Failover { addrs, at: n, id, session: None };
    let announce = ToTracker::Announce(Announce { listen, chains: vec![chain()], family: vec![] });
    let circuit = ToTracker::RequestCircuits(CircuitRequest { chain: chain(), count: 1, relays: 1 });
    let mut last_announce: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let announcing = last_announce.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let msg = if announcing { &announce } else { &circuit };
        let started = Instant::now();
        let (r, tried) = client.request(msg).await;
        let result = match (&r, announcing) {
            (Ok(FromTracker::Announced(_)), true) => Ok(()),
            (Ok(FromTracker::Circuits(c)), false) if !c.circuits.is_empty() => Ok(()),
            (Ok(other), _) => Err(format!("{other:?}")),
            (Err(e), _) => Err(e.clone()),
        };
        let o = Outcome { peer: n, started, took: started.elapsed(), tried, result };
        if announcing {
            last_announce = Some(started);
            log.lock().unwrap().announces.push(o);
        } else {
            log.lock().unwrap().circuits.push(o);
        }
        if !announcing {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_etcd_survive_losing_one_under_load() {
    let Some(bin) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_etcd, url) = start_etcd(&bin, dir.path());
    let _ = ids(); // keys first: generating them must not eat into the timings
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(start_replica(&dir.path().join(format!("replica{i}")), &url));
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|(_, a)| *a).collect();
    let peers: Vec<FakePeer> = futures_join((1..=15).map(fake_peer)).await;

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> =
        peers.iter().map(|p| tokio::spawn(run_peer(p.n, p.listen, addrs.clone(), log.clone(), stop.clone()))).collect();

    // Warm up until every peer has announced and circuits are granted everywhere.
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let l = log.lock().unwrap();
        let announced: BTreeSet<usize> = l.announces.iter().filter(|o| o.result.is_ok()).map(|o| o.peer).collect();
        let recent_ok = l.circuits.iter().rev().take(40).filter(|o| o.result.is_ok()).count();
        if announced.len() == peers.len() && recent_ok == 40 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no steady overlay after 60 s; replica 0's log:\n{}", {
            replica_log(&dir.path().join("replica0"))
        });
    }
    let warm = log.lock().unwrap().circuits.len();
    eprintln!("warm after {:.1} s: {warm} circuit requests so far", t.elapsed().as_secs_f64());

    // Kill replica 0 under load.
    let (mut killed, killed_addr) = replicas.remove(0);
    let kill_at = Instant::now();
    killed.0.kill().unwrap();
    let _ = killed.0.wait();
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let l = {
        let l = log.lock().unwrap();
        Log { circuits: l.circuits.clone(), announces: l.announces.clone() }
    };
    let after: Vec<&Outcome> = l.circuits.iter().filter(|o| o.started >= kill_at).collect();
    let failed: Vec<&Outcome> = after.iter().copied().filter(|o| o.result.is_err()).collect();
    let failed_over: Vec<&Outcome> = after
        .iter()
        .copied()
        .chain(l.announces.iter().filter(|o| o.started >= kill_at))
        .filter(|o| o.tried > 1)
        .collect();
    let slowest = after.iter().map(|o| o.took).max().unwrap_or_default();
    let slowest_failover = failed_over.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "after the kill: {} circuit requests, {} failed, {} requests failed over (slowest failover {:?}), slowest {:?}",
        after.len(),
        failed.len(),
        failed_over.len(),
        slowest_failover,
        slowest
    );
    // Even the requests caught by the kill get their answer: the client moves to the next replica within them.
    assert!(failed.is_empty(), "circuit requests failed after the kill: {failed:#?}");
    assert!(after.len() > 100, "too few circuit requests after the kill: {}", after.len());
    assert!(!failed_over.is_empty(), "no request failed over: was {killed_addr} in use?");
    assert!(slowest_failover <= Duration::from_secs(2), "a failover took {slowest_failover:?}");
    let failed_announces: Vec<&Outcome> =
        l.announces.iter().filter(|o| o.started >= kill_at && o.result.is_err()).collect();
    assert!(failed_announces.is_empty(), "announces failed after the kill: {failed_announces:#?}");

    // The survivors agree: each peer's table is the same from both (same NeighborIDs), edges are symmetric and
    // every NeighborID names exactly one edge. (A round of announces that changes nothing may take a few tries
    // while the last top-ups settle.)
    let survivors: Vec<SocketAddr> = replicas.iter().map(|(_, a)| *a).collect();
    let mut agreed = None;
    for _ in 0..10 {
        let mut views: Vec<BTreeMap<usize, Table>> = Vec::new();
        for addr in &survivors {
            let mut view = BTreeMap::new();
            for p in &peers {
                let mut c = Failover { addrs: vec![*addr], at: 0, id: p.id(), session: None };
                let (r, _) = c
                    .request(&ToTracker::Announce(Announce { listen: p.listen, chains: vec![chain()], family: vec![] }))
                    .await;
                view.insert(p.n, table(&r.unwrap()).expect("announced"));
            }
            views.push(view);
        }
        if views[0] == views[1] {
            agreed = Some(views.remove(0));
            break;
        }
        for (n, t) in &views[0] {
            if views[1].get(n) != Some(t) {
                let ids = |t: &Table| t.iter().map(|(nid, _)| format!("{:x}", nid & 0xffff)).collect::<Vec<_>>();
                eprintln!("peer {n}: {:?} vs {:?}", ids(t), views[1].get(n).map(ids));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let view = agreed.expect("the surviving replicas never agreed on the neighbor tables");
    let der_of = |n: usize| ids()[n].public().der().to_vec();
    let mut by_nid: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (n, t) in &view {
        assert!(t.len() >= 2, "peer {n} has {} neighbors", t.len());
        for (nid, der) in t {
            by_nid.entry(*nid).or_default().push(*n);
            let m = (1..=15).find(|m| der_of(*m) == *der).expect("a known neighbor");
            assert!(view[&m].contains(&(*nid, der_of(*n))), "edge {nid:x} {n}–{m} is not symmetric");
        }
    }
    assert!(by_nid.values().all(|ends| ends.len() == 2), "a NeighborID names more than one edge: {by_nid:?}");
    eprintln!("survivors agree: {} edges over {} peers", by_nid.len(), view.len());
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    for f in futs {
        out.push(f.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_from_etcd_refuses_rather_than_diverges_and_serves_again_when_it_is_back() {
    let Some(bin) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port());
    let (etcd, url) = start_etcd_on(&bin, dir.path(), ports);
    let _ = ids();
    let (_a, a) = start_replica(&dir.path().join("a"), &url);
    let (_b, b) = start_replica(&dir.path().join("b"), &url);
    let peers: Vec<FakePeer> = futures_join((1..=6).map(fake_peer)).await;
    let announce =
        |p: &FakePeer| ToTracker::Announce(Announce { listen: p.listen, chains: vec![chain()], family: vec![] });
    let circuit = ToTracker::RequestCircuits(CircuitRequest { chain: chain(), count: 1, relays: 1 });
    let unavailable = |r: &Result<FromTracker, String>| r.as_ref().err().is_some_and(|e| e.contains("cannot serve"));
    // Peers 1-5 join through replica a.
    for p in &peers[..5] {
        let mut c = Failover { addrs: vec![a], at: 0, id: p.id(), session: None };
        for _ in 0..2 {
            assert!(matches!(c.request(&announce(p)).await.0, Ok(FromTracker::Announced(_))));
        }
    }
    let mut one = Failover { addrs: vec![a], at: 0, id: peers[0].id(), session: None };
    let t = Instant::now();
    while !matches!(one.request(&circuit).await.0, Ok(FromTracker::Circuits(_))) {
        assert!(t.elapsed() < Duration::from_secs(20), "no circuit before etcd went away");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // etcd goes away: a newcomer's announce is refused, and once the watch has noticed, so are circuit requests.
    drop(etcd);
    let cut = Instant::now();
    let mut newcomer = Failover { addrs: vec![a], at: 0, id: peers[5].id(), session: None };
    let r = newcomer.request(&announce(&peers[5])).await.0;
    assert!(unavailable(&r), "a newcomer's announce without etcd: {r:?}");
    loop {
        let r = one.request(&circuit).await.0;
        if unavailable(&r) {
            break;
        }
        assert!(cut.elapsed() < Duration::from_secs(15), "circuits still served 15 s after etcd went away: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("replica refusing {:.1} s after etcd went away", cut.elapsed().as_secs_f64());

    // etcd is back: the replica reads the state again and serves; the newcomer joins; both replicas agree.
    let (_etcd, _) = start_etcd_on(&bin, dir.path(), ports);
    let back = Instant::now();
    loop {
        let r = one.request(&circuit).await.0;
        if matches!(r, Ok(FromTracker::Circuits(_))) {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(30), "no circuit 30 s after etcd came back: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("replica serving again {:.1} s after etcd came back", back.elapsed().as_secs_f64());
    let r = newcomer.request(&announce(&peers[5])).await.0;
    assert!(matches!(r, Ok(FromTracker::Announced(_))), "the newcomer after etcd came back: {r:?}");
    let mut agreed = false;
    for _ in 0..20 {
        let mut views = Vec::new();
        for addr in [a, b] {
            let mut view = BTreeMap::new();
            for p in &peers {
                let mut c = Failover { addrs: vec![addr], at: 0, id: p.id(), session: None };
                if let (Ok(r), _) = c.request(&announce(p)).await {
                    view.insert(p.n, table(&r));
                }
            }
            views.push(view);
        }
        if views[0] == views[1] && views[0].len() == peers.len() {
            agreed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(agreed, "the replicas disagree after etcd came back");
}
