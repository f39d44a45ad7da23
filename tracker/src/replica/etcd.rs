//! The shared state in etcd: connecting, the start-up checks, loading everything, transactions, leases, reading
//! keys back, deleting edges left behind by expired peers, and this instance's own registration.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, Error as EtcdError, GetOptions, LeaseGrantOptions, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use super::*;
use crate::config::TrackerArgs;
use crate::error::TrackerError;
use crate::service::Service;

/// Longest wait for one etcd call; past it the instance counts as cut off.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// TTL of an instance's registration (`r/<instance>`), kept alive every second.
const INSTANCE_TTL: i64 = 5;
/// Keys per page when loading, and reads or deletes per transaction (etcd's default `--max-txn-ops` is 128).
const PAGE: i64 = 1000;
const OPS_PER_TXN: usize = 100;

/// An instance's connection to the shared state.
pub(crate) struct Etcd {
    pub(super) client: Client,
    pub(super) prefix: String,
    /// TTL of a peer's lease: the expiry time (3 intervals).
    peer_ttl: i64,
    /// `Err(why)` while the instance must not serve; the watch task clears it after a resynchronization.
    health: Mutex<Result<(), String>>,
    /// Asks the watch task to resynchronize (a failed commit's keys could not be read back: the graph may hold
    /// changes etcd lacks).
    pub(super) resync: Notify,
    /// Edges of expired peers to delete.
    orphans: mpsc::UnboundedSender<NeighborId>,
    /// Live instances (`r/` keys).
    pub(super) replicas: Mutex<HashSet<String>>,
}

/// What a whole load read.
pub(super) struct Loaded {
    pub(super) graph: Graph<PublicKey>,
    pub(super) revs: Revisions,
    pub(super) revision: i64,
    pub(super) peers: usize,
    pub(super) edges: usize,
    /// Edges left behind by expired peers (deleted after the load).
    pub(super) orphans: Vec<NeighborId>,
    pub(super) replicas: HashSet<String>,
}

fn timeout_err() -> String {
    format!("etcd did not answer within {} s", CALL_TIMEOUT.as_secs())
}

async fn call<T>(f: impl Future<Output = Result<T, EtcdError>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(format!("etcd: {e}")),
        Err(_) => Err(timeout_err()),
    }
}

impl Etcd {
    pub(super) fn peer_key(&self, fp: &Fingerprint) -> String {
        format!("{}p/{}", self.prefix, fp.to_hex())
    }

    pub(super) fn edge_key(&self, nid: NeighborId) -> String {
        format!("{}e/{:016x}", self.prefix, nid.0)
    }

    /// Marks the instance cut off (until the watch task has resynchronized).
    pub(super) fn cut_off(&self, why: String) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_ok() {
            warn!(reason = %why, "cut off from etcd: refusing requests until resynchronized");
        }
        *h = Err(why);
    }

    pub(super) fn set_healthy(&self) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Ok(());
    }

    /// Decodes a key of the shared state with its value.
    pub(super) fn decode(&self, key: &[u8], value: Option<&[u8]>, create: i64, modified: i64) -> Decoded {
        let Some(rest) = key.strip_prefix(self.prefix.as_bytes()) else { return Decoded::Other };
        let rest = String::from_utf8_lossy(rest);
        if let Some(hex) = rest.strip_prefix("p/") {
            let Ok(fp) = Fingerprint::from_hex(hex) else { return Decoded::Other };
            let record = match value {
                None => None,
                Some(v) => match crate::store::decode_peer(&fp, v) {
                    Ok(stored) => Some(Box::new(PeerRecord { stored, create, modified })),
                    Err(e) => {
                        warn!(key = %rest, error = %e, "etcd: an undecodable peer record (ignored)");
                        return Decoded::Other;
                    }
                },
            };
            return Decoded::Change(Change::Peer(fp, record));
        }
        if let Some(hex) = rest.strip_prefix("e/") {
            let Ok(n) = u64::from_str_radix(hex, 16) else { return Decoded::Other };
            let nid = NeighborId(n);
            let record = match value.map(|v| v.split_at_checked(32)) {
                None => None,
                Some(Some((a, b))) => match (<[u8; 32]>::try_from(a), <[u8; 32]>::try_from(b)) {
                    (Ok(a), Ok(b)) => Some(EdgeRecord { a: Fingerprint(a), b: Fingerprint(b), create }),
                    _ => return Decoded::Other,
                },
                Some(None) => return Decoded::Other,
            };
            return Decoded::Change(Change::Edge(nid, record));
        }
        if let Some(name) = rest.strip_prefix("r/") {
            return Decoded::Replica(name.to_string(), value.is_some());
        }
        Decoded::Other
    }

    /// Reads every key under the prefix at one revision and builds the graph from it.
    pub(super) async fn load(&self, args: &TrackerArgs) -> Result<Loaded, String> {
        let mut kv = self.client.kv_client();
        let mut revision = 0;
        let mut peers = Vec::new();
        let mut edges = Vec::new();
        let mut replicas = HashSet::new();
        let end = prefix_end(&self.prefix);
        let mut from = self.prefix.clone().into_bytes();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = call(kv.get(from.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                match self.decode(kv.key(), Some(kv.value()), kv.create_revision(), kv.mod_revision()) {
                    Decoded::Change(Change::Peer(fp, Some(r))) => peers.push((fp, r)),
                    Decoded::Change(Change::Edge(nid, Some(e))) => edges.push((nid, e)),
                    Decoded::Replica(name, true) => {
                        replicas.insert(name);
                    }
                    _ => {}
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        let mut graph = Graph::new(graph_config(args));
        let mut revs = Revisions::default();
        let now = Instant::now();
        let mut n_peers = 0;
        for (fp, r) in peers {
            let PeerRecord { stored, create, modified } = *r;
            if graph.set_peer(fp, stored, now) {
                revs.peers.insert(fp, (create, modified));
                n_peers += 1;
            }
        }
        let mut orphans = Vec::new();
        let mut n_edges = 0;
        // In creation order, so that of two records joining one pair (left by an expired peer) the newer counts.
        edges.sort_by_key(|(_, e)| e.create);
        for (nid, e) in edges {
            if edge_valid(&revs, &e) && graph.edge(&e.a, &e.b).is_none() && graph.restore_edge(nid, e.a, e.b) {
                n_edges += 1;
            } else if !edge_valid(&revs, &e) {
                orphans.push(nid);
            }
        }
        graph.track_changes();
        revs.watched = revision;
        Ok(Loaded { graph, revs, revision, peers: n_peers, edges: n_edges, orphans, replicas })
    }

    /// Queues edges left behind by expired peers for deletion.
    pub(super) fn forget(&self, nids: Vec<NeighborId>) {
        for nid in nids {
            let _ = self.orphans.send(nid);
        }
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, CommitError> {
        let mut kv = self.client.kv_client();
        // On an error the transaction may or may not have happened: the caller reads its keys back.
        call(kv.txn(txn)).await.map_err(CommitError::Unavailable)
    }

    async fn commit_inner(&self, staged: &Staged) -> Result<i64, CommitError> {
        self.available().map_err(CommitError::Unavailable)?;
        let mut lease = self.client.lease_client();
        for fp in &staged.new_peers {
            let opts = LeaseGrantOptions::new().with_id(lease_id(fp));
            match call(lease.grant(self.peer_ttl, Some(opts))).await {
                Ok(_) => {}
                // Granted by an earlier attempt, or the record exists after all (the transaction will say).
                Err(e) if e.contains("lease already exists") => {}
                Err(e) => return Err(CommitError::Unavailable(e)),
            }
        }
        let txn = async {
            if staged.writes.is_empty() {
                return Ok(None);
            }
            let when: Vec<Compare> = staged
                .checks
                .iter()
                .map(|c| match c {
                    Check::PeerAt(fp, rev) => Compare::mod_revision(self.peer_key(fp), CompareOp::Equal, *rev),
                    Check::PeerAbsent(fp) => Compare::create_revision(self.peer_key(fp), CompareOp::Equal, 0),
                    Check::EdgeAbsent(nid) => Compare::create_revision(self.edge_key(*nid), CompareOp::Equal, 0),
                })
                .collect();
            let ops: Vec<TxnOp> = staged
                .writes
                .iter()
                .map(|w| match w {
                    Write::Peer(fp, row, Some(lease)) => {
                        TxnOp::put(self.peer_key(fp), row.clone(), Some(PutOptions::new().with_lease(*lease)))
                    }
                    Write::Peer(fp, row, None) => {
                        TxnOp::put(self.peer_key(fp), row.clone(), Some(PutOptions::new().with_ignore_lease()))
                    }
                    Write::Touch(fp) => TxnOp::put(
                        self.peer_key(fp),
                        Vec::new(),
                        Some(PutOptions::new().with_ignore_lease().with_ignore_value()),
                    ),
                    Write::Edge(nid, a, b) => {
                        let (a, b) = if a <= b { (a, b) } else { (b, a) };
                        TxnOp::put(self.edge_key(*nid), [a.0, b.0].concat(), None)
                    }
                    Write::DeleteEdge(nid) => TxnOp::delete(self.edge_key(*nid), None),
                })
                .collect();
            let r = self.txn(Txn::new().when(when).and_then(ops)).await?;
            if !r.succeeded() {
                return Err(CommitError::Conflict);
            }
            Ok(r.header().map(|h| h.revision()))
        };
        let keep = async {
            let Some(fp) = staged.keep_alive else { return Ok(()) };
            let mut lease = self.client.lease_client();
            match tokio::time::timeout(CALL_TIMEOUT, lease.keep_alive(lease_id(&fp))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(EtcdError::LeaseKeepAliveError(m))) if m.contains("not found") => Err(CommitError::Expired(fp)),
                Ok(Err(e)) => Err(CommitError::Unavailable(format!("etcd: {e}"))),
                Err(_) => Err(CommitError::Unavailable(timeout_err())),
            }
        };
        let (t, k) = tokio::join!(txn, keep);
        k?;
        Ok(t?.unwrap_or(0))
    }

    async fn read_inner(&self, peers: &[Fingerprint], edges: &[NeighborId], at: i64) -> Result<Truth, String> {
        let mut truth = Truth { revision: at, ..Truth::default() };
        let keys: Vec<(String, Option<Fingerprint>, Option<NeighborId>)> = peers
            .iter()
            .map(|fp| (self.peer_key(fp), Some(*fp), None))
            .chain(edges.iter().map(|nid| (self.edge_key(*nid), None, Some(*nid))))
            .collect();
        let mut kv = self.client.kv_client();
        for chunk in keys.chunks(OPS_PER_TXN) {
            let opts = || (at > 0).then(|| GetOptions::new().with_revision(at));
            let ops: Vec<TxnOp> = chunk.iter().map(|(k, ..)| TxnOp::get(k.clone(), opts())).collect();
            let r = call(kv.txn(Txn::new().and_then(ops))).await?;
            if at == 0 {
                // The latest revision; several chunks may see several, the oldest counts.
                let rev = r.header().map_or(0, |h| h.revision());
                truth.revision = if truth.revision == 0 { rev } else { truth.revision.min(rev) };
            }
            for ((_, fp, nid), resp) in chunk.iter().zip(r.op_responses()) {
                let TxnOpResponse::Get(g) = resp else { continue };
                let found = g.kvs().first();
                let change = match found {
                    Some(kv) => self.decode(kv.key(), Some(kv.value()), kv.create_revision(), kv.mod_revision()),
                    None => Decoded::Other,
                };
                match (fp, nid, change) {
                    (Some(fp), _, Decoded::Change(Change::Peer(_, r))) => truth.peers.push((*fp, r)),
                    (Some(fp), _, _) => truth.peers.push((*fp, None)),
                    (_, Some(nid), Decoded::Change(Change::Edge(_, e))) => truth.edges.push((*nid, e)),
                    (_, Some(nid), _) => truth.edges.push((*nid, None)),
                    _ => {}
                }
            }
        }
        Ok(truth)
    }
}

/// A decoded key.
pub(super) enum Decoded {
    Change(Change),
    /// An instance's registration, present or gone.
    Replica(String, bool),
    Other,
}

impl Shared for Etcd {
    fn available(&self) -> Result<(), String> {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lost(&self, why: String) {
        self.cut_off(why);
        self.resync.notify_one();
    }

    fn commit<'a>(&'a self, staged: &'a Staged) -> BoxFuture<'a, Result<i64, CommitError>> {
        Box::pin(self.commit_inner(staged))
    }

    fn read<'a>(
        &'a self,
        peers: &'a [Fingerprint],
        edges: &'a [NeighborId],
        at: i64,
    ) -> BoxFuture<'a, Result<Truth, String>> {
        Box::pin(self.read_inner(peers, edges, at))
    }
}

/// The key just past every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The graph settings of a replica: its own, except that peers never expire here (their records' leases expire
/// them in etcd, and the watch removes them).
pub(super) fn graph_config(args: &TrackerArgs) -> crate::graph::GraphConfig {
    crate::graph::GraphConfig { expire_after: Duration::from_secs(100 * 365 * 86_400), ..args.graph_config() }
}

/// What every instance of one overlay must agree on: the key peers pin and the graph's rules.
fn cluster_value(args: &TrackerArgs, fingerprint: &Fingerprint) -> String {
    format!(
        "fingerprint={} neighbors={} fixed-degree={} allow-same-ip={} max-peers={} interval={} admission={}/{}/{}/{}",
        fingerprint.to_hex(),
        args.neighbors,
        args.fixed_degree,
        args.allow_same_ip,
        args.max_peers,
        args.interval,
        args.max_per_ipv4,
        args.max_per_ipv4_24,
        args.max_per_ipv6_64,
        args.max_per_ipv6_48
    )
}

/// Connects to etcd, checks that this instance belongs to the overlay stored there (same key, same graph
/// settings; the first instance records them), loads the graph and returns the service over it, with what it
/// restored. The watch and the registration start with [`Service::start_replica`].
pub(crate) async fn open(
    args: TrackerArgs,
    fingerprint: Fingerprint,
) -> Result<(Service, crate::service::Restored, Arc<Etcd>, i64), TrackerError> {
    let bad = |m: String| TrackerError::Config(m);
    let opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    let endpoints = args.etcd.join(",");
    let client = tokio::time::timeout(CALL_TIMEOUT * 2, Client::connect(&args.etcd, Some(opts)))
        .await
        .map_err(|_| bad(format!("--etcd {endpoints}: no answer within {} s", 2 * CALL_TIMEOUT.as_secs())))?
        .map_err(|e| bad(format!("--etcd {endpoints}: {e}")))?;
    let (orphans, rx) = mpsc::unbounded_channel();
    let etcd = Arc::new(Etcd {
        client,
        prefix: args.etcd_prefix.clone(),
        peer_ttl: args.expire_after().as_secs().max(1) as i64,
        health: Mutex::new(Ok(())),
        resync: Notify::new(),
        orphans,
        replicas: Mutex::new(HashSet::new()),
    });

    // The overlay's identity: the first instance writes it, every later one must match it.
    let key = format!("{}cluster", etcd.prefix);
    let mine = cluster_value(&args, &fingerprint);
    let mut kv = etcd.client.kv_client();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), mine.clone(), None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let r = call(kv.txn(txn)).await.map_err(|e| bad(format!("--etcd {endpoints}: {e}")))?;
    if !r.succeeded() {
        let theirs = r.op_responses().into_iter().find_map(|o| match o {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        if theirs.as_deref() != Some(mine.as_str()) {
            return Err(bad(format!(
                "--etcd: the replicas under {:?} run with `{}`, this instance with `{mine}`: every replica needs the \
                 same tracker.key and graph flags (or delete {key} to start the overlay anew)",
                etcd.prefix,
                theirs.unwrap_or_default()
            )));
        }
    }

    let loaded = etcd.load(&args).await.map_err(|e| bad(format!("--etcd {endpoints}: loading the state: {e}")))?;
    info!(
        endpoints, prefix = %etcd.prefix, peers = loaded.peers, edges = loaded.edges, revision = loaded.revision,
        replicas = loaded.replicas.len(), "replica: state loaded from etcd"
    );
    let restored = crate::service::Restored {
        peers: loaded.peers,
        edges: loaded.edges,
        dropped: loaded.orphans.len(),
        read: Duration::ZERO,
        rebuilt: Duration::ZERO,
    };
    *etcd.replicas.lock().unwrap_or_else(|e| e.into_inner()) = loaded.replicas;
    etcd.forget(loaded.orphans);
    let revision = loaded.revision;
    let shared: Arc<dyn Shared> = etcd.clone();
    let service = Service::replicated(args, loaded.graph, loaded.revs, shared);
    tokio::spawn(delete_orphans(Arc::downgrade(&etcd), rx));
    Ok((service, restored, etcd, revision))
}

/// Deletes the edge keys of expired peers, in batches (every instance does it; deleting twice is harmless).
async fn delete_orphans(etcd: std::sync::Weak<Etcd>, mut rx: mpsc::UnboundedReceiver<NeighborId>) {
    let mut batch = Vec::new();
    while let Some(nid) = rx.recv().await {
        batch.push(nid);
        while batch.len() < OPS_PER_TXN {
            match rx.try_recv() {
                Ok(n) => batch.push(n),
                Err(_) => break,
            }
        }
        let Some(etcd) = etcd.upgrade() else { return };
        let ops: Vec<TxnOp> = batch.drain(..).map(|n| TxnOp::delete(etcd.edge_key(n), None)).collect();
        let mut kv = etcd.client.kv_client();
        if let Err(e) = call(kv.txn(Txn::new().and_then(ops))).await {
            warn!(error = %e, "deleting expired peers' edges from etcd failed (left for later loads to skip)");
        }
    }
}

/// Registers this instance (`r/<listen address>`, a 5 s lease) and keeps the registration alive every second.
/// Runs until the service is gone.
pub(super) async fn register(etcd: Arc<Etcd>, listen: SocketAddr, service: std::sync::Weak<Service>) {
    let key = format!("{}r/{listen}", etcd.prefix);
    loop {
        if service.strong_count() == 0 {
            return;
        }
        let mut lease = etcd.client.lease_client();
        let mut kv = etcd.client.kv_client();
        let granted = async {
            let id = call(lease.grant(INSTANCE_TTL, None)).await?.id();
            call(kv.put(key.clone(), listen.to_string(), Some(PutOptions::new().with_lease(id)))).await?;
            call(lease.keep_alive(id)).await
        };
        match granted.await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if service.strong_count() == 0 {
                    let _ = lease.revoke(keeper.id()).await;
                    return;
                }
                let alive = async {
                    keeper.keep_alive().await.map_err(|e| format!("etcd: {e}"))?;
                    match stream.message().await {
                        Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                        Ok(_) => Err("the instance's lease ended".to_string()),
                        Err(e) => Err(format!("etcd: {e}")),
                    }
                };
                // The registration only tells operators (and the other instances' logs) who is up; whether this
                // instance may serve is the watch's business (etcd's gRPC keep-alive ends it on a dead
                // connection), so a late renewal is only logged.
                match tokio::time::timeout(CALL_TIMEOUT, alive).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(error = %e, "replica: renewing this instance's registration failed; registering again");
                        break;
                    }
                    Err(_) => {
                        warn!("replica: renewing this instance's registration timed out; registering again");
                        break;
                    }
                }
            },
            Err(e) => {
                warn!(error = %e, "replica: registering this instance in etcd failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
